//! Spool metrics, registered into the server's Prometheus registry under
//! `ledgerlake_spool_*`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters of the spool and its forwarder; cheap to clone (they share their values).
#[derive(Clone, Debug, Default)]
pub struct SpoolMetrics {
    /// Completions whose events were made durable in the spool.
    pub written: Counter,
    /// Completions whose events could not be made durable (their answers were withheld).
    pub write_failures: Counter,
    /// Spool files whose events are durable in the lake (and were deleted).
    pub forwarded: Counter,
    /// Spool files moved to the quarantine (unreadable, or refused by the lake).
    pub quarantined: Counter,
    /// Files waiting in the spool at the last look.
    pub pending: Gauge,
}

impl SpoolMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("ledgerlake_spool");
        r.register("written", "Completions whose events were made durable in the spool", self.written.clone());
        r.register("write_failures", "Completions whose events could not be spooled (answer withheld)", self.write_failures.clone());
        r.register("forwarded", "Spool files whose events are durable in the lake", self.forwarded.clone());
        r.register("quarantined", "Spool files moved to the quarantine (unreadable or refused)", self.quarantined.clone());
        r.register("pending", "Files waiting in the spool", self.pending.clone());
    }
}
