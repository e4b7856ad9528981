//! Serving metrics in the Prometheus (OpenMetrics) text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::FinishReason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Finish {
    pub finish_reason: &'static str,
}

/// Every serving metric, registered under `ledgerlake_serving_*`.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<Finish, Counter>,
    pub prompt_tokens: Counter,
    pub tokens_generated: Counter,
    pub time_per_token_seconds: Histogram,
    pub queue_seconds: Histogram,
    pub requests_running: Gauge,
    pub requests_waiting: Gauge,
    pub adapters_loaded: Counter,
    pub adapters_evicted: Counter,
    pub adapter_load_seconds: Histogram,
    pub adapters_registered: Gauge,
    pub adapters_resident: Gauge,
    pub adapters_active: Gauge,
    pub adapters_waiting: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // Serving's own metrics are `ledgerlake_serving_*`; other components register theirs
        // at the root through `registry_mut`, under their own prefixes.
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("ledgerlake_serving");
        let m = Self {
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            tokens_generated: Counter::default(),
            time_per_token_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            queue_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            requests_running: Gauge::default(),
            requests_waiting: Gauge::default(),
            adapters_loaded: Counter::default(),
            adapters_evicted: Counter::default(),
            adapter_load_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            adapters_registered: Gauge::default(),
            adapters_resident: Gauge::default(),
            adapters_active: Gauge::default(),
            adapters_waiting: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Finished generation requests, by finish reason", m.requests.clone());
        registry.register("prompt_tokens", "Prompt tokens of admitted requests", m.prompt_tokens.clone());
        registry.register("generated_tokens", "Tokens generated", m.tokens_generated.clone());
        registry.register("time_per_output_token_seconds", "Time between two tokens of one request", m.time_per_token_seconds.clone());
        registry.register("queue_time_seconds", "Time from submission to admission into the batch", m.queue_seconds.clone());
        registry.register("requests_running", "Requests in the running batch", m.requests_running.clone());
        registry.register("requests_waiting", "Requests waiting for admission", m.requests_waiting.clone());
        registry.register("adapter_loads", "Adapters loaded into memory", m.adapters_loaded.clone());
        registry.register("adapter_evictions", "Adapters evicted from memory (least recently used)", m.adapters_evicted.clone());
        registry.register("adapter_load_seconds", "Time to load one adapter from storage", m.adapter_load_seconds.clone());
        registry.register("adapters_registered", "Adapters that can be served", m.adapters_registered.clone());
        registry.register("adapters_resident", "Adapters loaded in memory", m.adapters_resident.clone());
        registry.register("adapters_active", "Distinct adapters in the running batch", m.adapters_active.clone());
        registry.register("adapters_waiting", "Distinct adapters that waiting requests need", m.adapters_waiting.clone());
        Self { registry: root, ..m }
    }

    pub fn requests_finished(&self, reason: FinishReason) {
        self.requests.get_or_create(&Finish { finish_reason: reason.as_str() }).inc();
    }

    /// A request the server failed (label `finish_reason="error"`): not answered, not charged.
    pub fn requests_failed(&self) {
        self.requests.get_or_create(&Finish { finish_reason: "error" }).inc();
    }

    /// Adds other components' metrics (the spool's) to what `/metrics` shows; call before
    /// the metrics are shared.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The text exposition (`Content-Type: application/openmetrics-text; version=1.0.0`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
