//! Anchoring an epoch's root somewhere others can check it. [`Anchor`] has two
//! implementations: [`LogAnchor`] (the default), a hash-chained log in the lake's `anchors`
//! table, and the EVM anchor contract (the binary's, over `alloy`). Rules: `docs/epochs.md`.

use ledgerlake_lakehouse::events::{AnchorLogged, EventKind, RESERVED_ID_PREFIX};
use ledgerlake_lakehouse::{Amount, Bytes32, Event, Lake, Sha256Hex, snapshot};

use crate::Error;
use crate::job::lake_error;

/// What one epoch's anchoring asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnchorRequest {
    pub epoch: u64,
    pub root: Bytes32,
    pub manifest_sha256: Sha256Hex,
    /// What the epoch's leaves pay in all (its fees): a distributor pays no more for it.
    pub total: Amount,
}

/// Where a root went: the reference recorded in the epoch's `closed` row, and the events
/// the caller must store for it (the log's entry; none for a chain).
#[derive(Clone, Debug, PartialEq)]
pub struct Anchored {
    pub reference: String,
    pub events: Vec<Event>,
}

/// A place roots are anchored. `anchor` is idempotent: anchoring an epoch already anchored
/// with the same root answers the first reference and anchors nothing again, so a close
/// that crashed after anchoring can run again.
#[allow(async_fn_in_trait)]
pub trait Anchor {
    async fn anchor(&self, lake: &Lake, request: &AnchorRequest, now: chrono::DateTime<chrono::Utc>) -> Result<Anchored, Error>;
}

/// The previous hash of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of one entry of the log: sha256 of
/// `ledgerlake anchor v1\nepoch:<N>\nroot:<0x root>\nmanifest:<hex>\nprevious:<hex>`.
pub fn entry_hash(epoch: u64, root: &Bytes32, manifest: &Sha256Hex, previous: &Sha256Hex) -> Sha256Hex {
    Sha256Hex::digest(format!("ledgerlake anchor v1\nepoch:{epoch}\nroot:{root}\nmanifest:{manifest}\nprevious:{previous}").as_bytes())
}

/// Every entry of the log, by epoch.
pub async fn entries(lake: &Lake) -> Result<Vec<AnchorLogged>, Error> {
    let (_, events) = snapshot::read_events(lake, EventKind::AnchorLogged, None, "true").await.map_err(lake_error)?;
    let mut out: Vec<AnchorLogged> = events.into_iter().filter_map(|e| if let Event::AnchorLogged(a) = e { Some(a) } else { None }).collect();
    out.sort_by_key(|a| a.epoch);
    Ok(out)
}

/// The default anchor: the hash-chained log in the lake.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogAnchor;

impl Anchor for LogAnchor {
    async fn anchor(&self, lake: &Lake, request: &AnchorRequest, now: chrono::DateTime<chrono::Utc>) -> Result<Anchored, Error> {
        let entries = entries(lake).await?;
        if let Some(e) = entries.iter().find(|e| e.epoch == request.epoch) {
            if e.merkle_root != request.root || e.manifest_sha256 != request.manifest_sha256 {
                return Err(Error::Invalid(format!(
                    "the anchor log already holds epoch {} with root {} and manifest {}, not {} and {}",
                    e.epoch, e.merkle_root, e.manifest_sha256, request.root, request.manifest_sha256
                )));
            }
            return Ok(Anchored { reference: format!("log:{}", e.entry_sha256), events: vec![] });
        }
        if let Some(later) = entries.iter().find(|e| e.epoch > request.epoch) {
            return Err(Error::Invalid(format!("the anchor log already holds epoch {}, after {}", later.epoch, request.epoch)));
        }
        let previous: Sha256Hex = match entries.last() {
            Some(e) => e.entry_sha256.clone(),
            None => GENESIS.parse().map_err(|e| Error::Internal(format!("genesis hash: {e}")))?,
        };
        let entry = entry_hash(request.epoch, &request.root, &request.manifest_sha256, &previous);
        let event = AnchorLogged {
            event_id: format!("{RESERVED_ID_PREFIX}anchor:{}", request.epoch).parse().map_err(|e| Error::Internal(format!("anchor event id: {e}")))?,
            event_time: now,
            epoch: request.epoch,
            merkle_root: request.root.clone(),
            manifest_sha256: request.manifest_sha256.clone(),
            previous_sha256: previous,
            entry_sha256: entry.clone(),
        };
        Ok(Anchored { reference: format!("log:{entry}"), events: vec![event.into()] })
    }
}

/// What `ledgerlake anchor verify` found in the log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct LogReport {
    /// Entries checked, in epoch order.
    pub entries: usize,
    /// The last entry's hash (the head of the chain), if any.
    pub head: Option<Sha256Hex>,
    /// Every break found: a wrong hash, a broken link, epochs out of order.
    pub problems: Vec<String>,
}

/// Walks the log: each entry's hash must be its content's, each must name the previous
/// entry's hash (the first, [`GENESIS`]), and epochs must strictly increase.
pub fn verify_log(entries: &[AnchorLogged]) -> LogReport {
    let mut problems = Vec::new();
    let mut previous = GENESIS.to_owned();
    let mut last_epoch: Option<u64> = None;
    for e in entries {
        if last_epoch.is_some_and(|l| e.epoch <= l) {
            problems.push(format!("epoch {} comes after epoch {}", e.epoch, last_epoch.unwrap_or_default()));
        }
        if e.previous_sha256.as_str() != previous {
            problems.push(format!("epoch {}: previous hash {} is not the previous entry's {previous}", e.epoch, e.previous_sha256));
        }
        let want = entry_hash(e.epoch, &e.merkle_root, &e.manifest_sha256, &e.previous_sha256);
        if want != e.entry_sha256 {
            problems.push(format!("epoch {}: entry hash {} is not the hash of its content, {want}", e.epoch, e.entry_sha256));
        }
        previous = e.entry_sha256.to_string();
        last_epoch = Some(e.epoch);
    }
    LogReport { entries: entries.len(), head: entries.last().map(|e| e.entry_sha256.clone()), problems }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AnchorLogged> {
        let mut out: Vec<AnchorLogged> = Vec::new();
        let mut previous: Sha256Hex = GENESIS.parse().unwrap();
        for epoch in 0..n {
            let root = Bytes32::from_bytes([epoch as u8 + 1; 32]);
            let manifest = Sha256Hex::digest(&[epoch as u8]);
            let entry = entry_hash(epoch, &root, &manifest, &previous);
            out.push(AnchorLogged {
                event_id: format!("ledgerlake:anchor:{epoch}").parse().unwrap(),
                event_time: chrono::Utc::now(),
                epoch,
                merkle_root: root,
                manifest_sha256: manifest,
                previous_sha256: previous,
                entry_sha256: entry.clone(),
            });
            previous = entry;
        }
        out
    }

    #[test]
    fn a_good_chain_verifies_and_every_kind_of_tampering_is_found() {
        let good = chain(4);
        let report = verify_log(&good);
        assert!(report.problems.is_empty(), "{report:?}");
        assert_eq!((report.entries, report.head.as_ref()), (4, Some(&good[3].entry_sha256)));

        let mut root_changed = good.clone();
        root_changed[1].merkle_root = Bytes32::from_bytes([9; 32]);
        assert!(verify_log(&root_changed).problems.iter().any(|p| p.contains("epoch 1: entry hash")));

        let mut dropped = good.clone();
        dropped.remove(2);
        assert!(verify_log(&dropped).problems.iter().any(|p| p.contains("epoch 3: previous hash")));

        let mut swapped = good.clone();
        swapped.swap(0, 1);
        assert!(!verify_log(&swapped).problems.is_empty());
    }
}
