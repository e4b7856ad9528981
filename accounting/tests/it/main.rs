//! The spool and its forwarder against a real Delta lake in a temp dir.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use arrow::array::AsArray;
use chrono::Utc;
use ledgerlake_accounting::forward::forward_once;
use ledgerlake_accounting::{Error, Metered, Spool, SpoolMetrics, TokenIds};
use ledgerlake_ingest::{Ingestor, WriterConfig};
use ledgerlake_lakehouse::events::EventKind;
use ledgerlake_lakehouse::ids::Sha256Hex;
use ledgerlake_lakehouse::lake::TableWriter;
use ledgerlake_lakehouse::{Amount, Lake, LakeConfig, Price};

fn metered(id: &str, prompt: u64, completion: u64) -> Metered {
    Metered {
        inference_id: id.into(),
        model_id: "ledgerlake-base".into(),
        caller: "key-1".into(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        output_sha256: Sha256Hex::digest(id.as_bytes()),
        latency: Duration::from_millis(3),
        price: Price::new(Amount::new(1_000_000).unwrap(), Amount::new(2_000_000).unwrap()).unwrap(),
        at: Utc::now(),
        token_ids: None,
        citations: vec![],
    }
}

fn with_tokens(mut m: Metered) -> Metered {
    let prompt = (0..m.prompt_tokens as u32).collect();
    let output = (0..m.completion_tokens as u32).map(|t| t + 100).collect();
    m.token_ids = Some(TokenIds { prompt, output });
    m
}

fn lake(dir: &Path) -> Lake {
    Lake::new(LakeConfig::parse(dir.join("lake").to_str().unwrap()).unwrap())
}

async fn ingestor(dir: &Path) -> Ingestor {
    let config = WriterConfig { max_delay: Duration::from_millis(20), ..WriterConfig::default() };
    Ingestor::start(lake(dir), dir.join("index"), config).await.unwrap()
}

/// Fee amounts stored in `fee_charged`, by event id, with how often each id is stored.
async fn stored_fees(lake: &Lake) -> HashMap<String, (usize, i128)> {
    let mut writer = TableWriter::open(lake, EventKind::FeeCharged).await.unwrap();
    let mut out = HashMap::new();
    for file in writer.all_files().await.unwrap() {
        for batch in writer.read_columns(&file, &["event_id", "amount"]).await.unwrap() {
            let ids = batch.column(0).as_string::<i32>();
            let amounts = batch.column(1).as_primitive::<arrow::datatypes::Decimal128Type>();
            for r in 0..batch.num_rows() {
                let e = out.entry(ids.value(r).to_owned()).or_insert((0, 0));
                e.0 += 1;
                e.1 = amounts.value(r);
            }
        }
    }
    out
}

#[tokio::test]
async fn spooled_completions_land_once_with_their_exact_fee() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    let ingestor = ingestor(dir.path()).await;
    let metrics = SpoolMetrics::default();
    spool.write(&with_tokens(metered("cmpl-a", 7, 3))).unwrap();
    spool.write(&metered("cmpl-b", 1000, 500)).unwrap();
    assert_eq!(forward_once(&spool, &ingestor, &metrics).await.unwrap(), 2);
    // A replay of a completion already in the lake (a crash after forwarding, before the
    // delete) is a duplicate, not a second charge.
    spool.write(&with_tokens(metered("cmpl-a", 7, 3))).unwrap();
    assert_eq!(forward_once(&spool, &ingestor, &metrics).await.unwrap(), 1);
    assert_eq!(spool.pending_count().unwrap(), 0);
    let fees = stored_fees(&lake(dir.path())).await;
    assert_eq!(fees.len(), 2);
    assert_eq!(fees["cmpl-a:fee"], (1, (7 * 1_000_000 + 3 * 2_000_000) / 1000));
    assert_eq!(fees["cmpl-b:fee"], (1, (1000 * 1_000_000 + 500 * 2_000_000) / 1000));
    assert_eq!(metrics.forwarded.get(), 3);
    assert_eq!(metrics.quarantined.get(), 0);
    // The token ids of the one completion that carried them, stored once.
    let mut writer = TableWriter::open(&lake(dir.path()), EventKind::InferenceTokens).await.unwrap();
    let mut rows = 0;
    for file in writer.all_files().await.unwrap() {
        for batch in writer.read_columns(&file, &["inference_id"]).await.unwrap() {
            rows += batch.num_rows();
        }
    }
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn a_corrupt_spool_file_is_quarantined_never_deleted_and_can_be_redriven() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    let ingestor = ingestor(dir.path()).await;
    let metrics = SpoolMetrics::default();
    spool.write(&metered("cmpl-good", 5, 5)).unwrap();
    spool.write(&metered("cmpl-torn", 9, 9)).unwrap();
    // A torn write (as after a disk fault): the first half of the file.
    let torn = spool.dir().join("cmpl-torn.json");
    let whole = std::fs::read(&torn).unwrap();
    std::fs::write(&torn, &whole[..whole.len() / 2]).unwrap();
    assert_eq!(forward_once(&spool, &ingestor, &metrics).await.unwrap(), 2);

    // The good one landed, the torn one is kept, byte for byte, with its reason.
    assert!(!torn.exists());
    let quarantined = spool.quarantined().unwrap();
    assert_eq!(quarantined.len(), 1);
    assert_eq!(quarantined[0].name, "cmpl-torn.json");
    assert!(quarantined[0].reason.starts_with("unreadable"), "{}", quarantined[0].reason);
    let kept = spool.dir().join("quarantine/cmpl-torn.json");
    assert_eq!(std::fs::read(&kept).unwrap(), &whole[..whole.len() / 2]);
    assert_eq!(metrics.quarantined.get(), 1);
    assert_eq!(stored_fees(&lake(dir.path())).await.len(), 1);

    // Re-driving it as it is is refused and changes nothing; once repaired it lands.
    assert!(matches!(spool.redrive("cmpl-torn.json"), Err(Error::Unreadable { .. })));
    assert!(kept.exists());
    assert!(matches!(spool.redrive("../spool/cmpl-torn.json"), Err(Error::NotQuarantined(_))));
    assert!(matches!(spool.redrive("nope.json"), Err(Error::NotQuarantined(_))));
    std::fs::write(&kept, &whole).unwrap();
    spool.redrive("cmpl-torn.json").unwrap();
    assert!(spool.quarantined().unwrap().is_empty());
    assert_eq!(forward_once(&spool, &ingestor, &metrics).await.unwrap(), 1);
    let fees = stored_fees(&lake(dir.path())).await;
    assert_eq!(fees["cmpl-torn:fee"], (1, (9 * 1_000_000 + 9 * 2_000_000) / 1000));
}

#[tokio::test]
async fn a_spool_file_with_an_event_the_contract_refuses_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    let ingestor = ingestor(dir.path()).await;
    let metrics = SpoolMetrics::default();
    // Valid JSON, but the amount is negative: the lake would refuse it.
    let bad = r#"[{"kind": "fee.charged", "event_id": "x:fee", "event_time": "2026-11-24T00:00:00Z",
                  "inference_id": "x", "model_id": "m", "payer": "k", "amount": "-5"}]"#;
    std::fs::write(spool.dir().join("x.json"), bad).unwrap();
    std::fs::write(spool.dir().join("empty.json"), "[]").unwrap();
    assert_eq!(forward_once(&spool, &ingestor, &metrics).await.unwrap(), 2);
    let q = spool.quarantined().unwrap();
    assert_eq!(q.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(), ["empty.json", "x.json"]);
    assert!(q[1].reason.contains("amount"), "{}", q[1].reason);
    assert_eq!(metrics.quarantined.get(), 2);
}

#[test]
fn a_failed_spool_write_is_reported_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    // The spool's directory is gone (a lost mount): the write must say so.
    std::fs::remove_dir_all(spool.dir()).unwrap();
    assert!(matches!(spool.write(&metered("cmpl-x", 1, 1)), Err(Error::Storage { .. })));
    assert!(!spool.dir().exists());
}

#[test]
fn a_completion_outside_the_contract_is_refused_before_it_is_spooled() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    let too_long = metered("cmpl-long", ledgerlake_lakehouse::pricing::MAX_INFERENCE_TOKENS, 1);
    assert!(matches!(spool.write(&too_long), Err(Error::Pricing(_))));
    let mut bad_id = metered("cmpl-ok", 1, 1);
    bad_id.caller = String::new();
    assert!(matches!(spool.write(&bad_id), Err(Error::InvalidEvent { .. })));
    let mut bad_token = with_tokens(metered("cmpl-ok", 1, 1));
    bad_token.token_ids.as_mut().unwrap().output = vec![u32::MAX];
    assert!(matches!(spool.write(&bad_token), Err(Error::InvalidEvent { field, .. }) if field == "output_token_ids"));
    assert_eq!(spool.pending_count().unwrap(), 0);
}

/// A stream's hold bills its worst case only if its answer never ended: a hold left beside
/// the answer's real events, or after they were forwarded, charges nothing more; a hold
/// alone is the answer's bill; a released hold is gone.
#[tokio::test]
async fn holds_bill_only_the_answers_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    let ingestor = ingestor(dir.path()).await;
    let metrics = SpoolMetrics::default();
    let worst = |id: &str| metered(id, 10, 400);
    // Ended and forwarded, then the process died before removing its hold.
    spool.hold(&worst("ended-forwarded")).unwrap();
    spool.write(&metered("ended-forwarded", 10, 7)).unwrap();
    forward_once(&spool, &ingestor, &metrics).await.unwrap();
    // Ended, not yet forwarded, hold not removed.
    spool.hold(&worst("ended-spooled")).unwrap();
    spool.write(&metered("ended-spooled", 10, 5)).unwrap();
    // Ended and released as `up` does.
    spool.hold(&worst("released")).unwrap();
    spool.write(&metered("released", 10, 3)).unwrap();
    spool.release("released").unwrap();
    spool.release("never-held").unwrap();
    // Cut off by the crash: only its hold.
    spool.hold(&worst("cut")).unwrap();
    assert_eq!(spool.held().unwrap(), 3);

    assert_eq!(spool.recover_holds().unwrap(), 2, "the cut stream's and the forwarded one's holds are billed");
    assert_eq!(spool.held().unwrap(), 0);
    while spool.pending_count().unwrap() > 0 {
        forward_once(&spool, &ingestor, &metrics).await.unwrap();
    }
    let fees = stored_fees(&lake(dir.path())).await;
    let fee = |prompt: i128, completion: i128| (prompt * 1_000_000 + completion * 2_000_000) / 1000;
    assert_eq!(fees["ended-forwarded:fee"], (1, fee(10, 7)), "a duplicate of the real fee, not a second charge");
    assert_eq!(fees["ended-spooled:fee"], (1, fee(10, 5)));
    assert_eq!(fees["released:fee"], (1, fee(10, 3)));
    assert_eq!(fees["cut:fee"], (1, fee(10, 400)), "the cut answer is billed its worst case");
    assert_eq!(fees.len(), 4);
}
