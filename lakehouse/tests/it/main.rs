//! Integration tests of the lake on real Delta tables in temp directories.

mod snapshot;

use std::time::Duration;

use chrono::{TimeZone, Utc};
use ledgerlake_lakehouse::events::{self, Event, EventKind, FeeCharged};
use ledgerlake_lakehouse::index::Index;
use ledgerlake_lakehouse::lake::{CHECKPOINT_INTERVAL, TableWriter};
use ledgerlake_lakehouse::{Amount, Error, Lake, LakeConfig};

fn fee(i: usize) -> Event {
    FeeCharged {
        event_id: format!("fee-{i}").parse().unwrap(),
        event_time: Utc.with_ymd_and_hms(2026, 11, 1 + (i % 3) as u32, 12, 0, 0).unwrap(),
        inference_id: format!("inf-{i}").parse().unwrap(),
        model_id: "m1".parse().unwrap(),
        payer: "key_1".into(),
        amount: Amount::new(i as u128 * 1_000).unwrap(),
    }
    .into()
}

pub(crate) fn lake(dir: &std::path::Path) -> Lake {
    Lake::new(LakeConfig::parse(dir.to_str().unwrap()).unwrap())
}

async fn append(writer: &mut TableWriter, range: std::ops::Range<usize>) -> u64 {
    let events: Vec<Event> = range.map(fee).collect();
    let batch = events::to_record_batch(EventKind::FeeCharged, events.iter(), Utc::now()).unwrap();
    writer.append(&[batch]).await.unwrap()
}

#[test]
fn locations() {
    let dir = tempfile::tempdir().unwrap();
    let local = LakeConfig::parse(dir.path().join("new/lake").to_str().unwrap()).unwrap();
    assert_eq!(local.root.scheme(), "file");
    assert!(local.root.path().ends_with("/new/lake/"));
    assert!(dir.path().join("new/lake").is_dir());
    assert_eq!(local.table_url(EventKind::FeeCharged).path(), format!("{}fee_charged/", local.root.path()));
    let s3 = LakeConfig::parse("s3://bucket/some/prefix").unwrap();
    assert_eq!(s3.table_url(EventKind::StakeChanged).as_str(), "s3://bucket/some/prefix/stake_changed/");
    assert!(matches!(LakeConfig::parse("ftp://x/y"), Err(Error::InvalidLocation { .. })));
    assert!(matches!(LakeConfig::parse("s3:///nobucket"), Err(Error::InvalidLocation { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_checkpoint_and_report_their_shape() {
    let dir = tempfile::tempdir().unwrap();
    let lake = lake(dir.path());
    let mut writer = TableWriter::open(&lake, EventKind::FeeCharged).await.unwrap();
    let mut version = 0;
    for i in 0..CHECKPOINT_INTERVAL as usize + 2 {
        version = append(&mut writer, i * 3..i * 3 + 3).await;
    }
    assert_eq!(version, CHECKPOINT_INTERVAL + 2);
    writer.finish_checkpoint().await;
    let log = dir.path().join("fee_charged/_delta_log");
    let checkpoint = format!("{:020}.checkpoint.parquet", CHECKPOINT_INTERVAL - 1);
    assert!(log.join(&checkpoint).exists(), "no {checkpoint} after {CHECKPOINT_INTERVAL} commits");
    let last: serde_json::Value = serde_json::from_slice(&std::fs::read(log.join("_last_checkpoint")).unwrap()).unwrap();
    assert_eq!(last["version"], CHECKPOINT_INTERVAL - 1);
    let tables = lake.tables().await.unwrap();
    let fees = tables.iter().find(|t| t.kind == EventKind::FeeCharged).unwrap();
    assert_eq!(fees.version, Some(version));
    assert_eq!(fees.rows, 3 * (CHECKPOINT_INTERVAL + 2));
    let stakes = tables.iter().find(|t| t.kind == EventKind::StakeChanged).unwrap();
    assert_eq!(stakes.version, None);

    // Time travel: an older version has fewer rows.
    let old = lake.open_at(EventKind::FeeCharged, 5).await.unwrap();
    assert_eq!(old.snapshot().unwrap().log_data().num_files(), 5 * 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_vacuum_keep_every_row_and_the_index_rebuilds() {
    let dir = tempfile::tempdir().unwrap();
    let lake = lake(dir.path().join("lake").as_path());
    let mut writer = TableWriter::open(&lake, EventKind::FeeCharged).await.unwrap();
    for i in 0..10 {
        append(&mut writer, i * 10..i * 10 + 10).await;
    }
    let index = Index::open(&dir.path().join("index")).unwrap();
    index.catch_up(&mut writer).await.unwrap();
    let files_before = writer.all_files().await.unwrap().len();
    let (removed, added) = lake.compact(EventKind::FeeCharged).await.unwrap();
    assert_eq!(removed as usize, files_before);
    assert!(added < removed, "{added} files from {removed}");
    // Compaction leaves a checkpoint, so readers do not replay every removal.
    let last = std::fs::read(dir.path().join("lake/fee_charged/_delta_log/_last_checkpoint")).unwrap();
    let last: serde_json::Value = serde_json::from_slice(&last).unwrap();
    assert_eq!(last["version"], 11);
    let deleted = lake.vacuum(EventKind::FeeCharged, Duration::ZERO).await.unwrap();
    assert_eq!(deleted, removed);

    // The compaction commit adds no new rows, so catching up over it learns nothing new...
    writer.refresh().await.unwrap();
    assert_eq!(index.catch_up(&mut writer).await.unwrap(), 0);
    // ...and a fresh index rebuilt from the compacted files knows every id.
    let fresh = Index::open(&dir.path().join("fresh")).unwrap();
    assert_eq!(fresh.catch_up(&mut writer).await.unwrap(), 100);
    for i in 0..100 {
        assert!(fresh.contains_event(&format!("fee-{i}")).unwrap());
    }
    assert!(!fresh.contains_event("fee-100").unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_writer_gets_a_conflict_not_a_silent_retry() {
    let dir = tempfile::tempdir().unwrap();
    let lake = lake(dir.path());
    let mut a = TableWriter::open(&lake, EventKind::FeeCharged).await.unwrap();
    let mut b = TableWriter::open(&lake, EventKind::FeeCharged).await.unwrap();
    append(&mut a, 0..5).await;
    let events: Vec<Event> = (5..10).map(fee).collect();
    let batch = events::to_record_batch(EventKind::FeeCharged, events.iter(), Utc::now()).unwrap();
    let err = b.append(std::slice::from_ref(&batch)).await.unwrap_err();
    assert!(matches!(err, Error::CommitConflict { .. }), "{err}");
    b.refresh().await.unwrap();
    assert_eq!(b.append(&[batch]).await.unwrap(), 2);
    let tables = lake.tables().await.unwrap();
    assert_eq!(tables.iter().find(|t| t.kind == EventKind::FeeCharged).unwrap().rows, 10);
}
