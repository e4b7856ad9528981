//! Draining the spool into the lake.
//!
//! The forwarder takes up to [`BATCH_FILES`] spool files, reads them (a file that does not
//! read goes to the quarantine), submits their events to the ingestor as one request and,
//! once the answer says they are durable, deletes the files whose events were stored or
//! were already there (duplicates). A file with an event the lake refused goes to the
//! quarantine with the refusal. If the lake does not answer (an outage, a full queue) the
//! files stay and the forwarder retries with a backoff: events wait, they are never lost.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ledgerlake_ingest::Ingestor;
use tokio::sync::Notify;

use crate::metrics::SpoolMetrics;
use crate::spool::Spool;
use crate::{Result, io};

/// Spool files forwarded in one request (two events each).
pub const BATCH_FILES: usize = 500;

/// Forwards forever: wakes when `wake` is notified (a new file) or every few seconds.
pub async fn forward(spool: Spool, ingestor: Ingestor, wake: Arc<Notify>, metrics: SpoolMetrics) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match forward_once(&spool, &ingestor, &metrics).await {
            Ok(0) => {
                backoff = Duration::from_millis(200);
                let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
            }
            Ok(_) => backoff = Duration::from_millis(200),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "spooled inference events wait in the spool");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One batch: returns how many files were settled (forwarded or quarantined).
pub async fn forward_once(spool: &Spool, ingestor: &Ingestor, metrics: &SpoolMetrics) -> Result<usize> {
    let files = spool.pending(BATCH_FILES)?;
    metrics.pending.set(i64::try_from(spool.pending_count()?).unwrap_or(i64::MAX));
    if files.is_empty() {
        return Ok(0);
    }
    let mut settled = 0;
    let mut events = Vec::new();
    // Per event, the file it came from.
    let mut owner: Vec<usize> = Vec::new();
    let mut readable: Vec<PathBuf> = Vec::new();
    for path in files {
        match Spool::read(&path) {
            Ok(file_events) => {
                owner.extend(std::iter::repeat_n(readable.len(), file_events.len()));
                events.extend(file_events);
                readable.push(path);
            }
            Err(reason) => {
                spool.quarantine(&path, &format!("unreadable: {reason}"))?;
                metrics.quarantined.inc();
                settled += 1;
            }
        }
    }
    if events.is_empty() {
        return Ok(settled);
    }
    let receipt = ingestor.submit(events.into_iter().enumerate().collect(), false).await?;
    let mut refused: HashMap<usize, Vec<String>> = HashMap::new();
    for e in &receipt.errors {
        if let Some(&file) = owner.get(e.index) {
            refused.entry(file).or_default().push(format!("{}: {}", e.field, e.message));
        }
    }
    for (i, path) in readable.iter().enumerate() {
        match refused.get(&i) {
            Some(reasons) => {
                spool.quarantine(path, &format!("refused by the lake: {}", reasons.join("; ")))?;
                metrics.quarantined.inc();
            }
            None => {
                std::fs::remove_file(path).map_err(io(path))?;
                metrics.forwarded.inc();
            }
        }
        settled += 1;
    }
    metrics.pending.set(i64::try_from(spool.pending_count()?).unwrap_or(i64::MAX));
    Ok(settled)
}
