use std::collections::HashSet;

use chrono::Utc;
use ledgerlake_lakehouse::events::{self, EventKind};
use ledgerlake_lakehouse::lake::TableWriter;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_commit_per_table() {
    let dir = tempfile::tempdir().unwrap();
    let ingestor = start(dir.path(), "index").await;
    let events = demo(2000, 1);
    // Governance events first (they are what later events depend on), then 20 concurrent
    // requests of inference and fee events.
    let (setup, rest): (Vec<_>, Vec<_>) = events
        .into_iter()
        .partition(|(_, e)| !matches!(e.kind(), EventKind::InferenceCompleted | EventKind::FeeCharged));
    let r = ingestor.submit(setup.clone(), true).await.unwrap();
    assert_eq!(r.accepted, setup.len(), "{:?}", r.errors);
    let before = TableWriter::open(&lake(dir.path()), EventKind::FeeCharged).await.unwrap().version();
    let mut tasks = Vec::new();
    for chunk in rest.chunks(rest.len() / 20 + 1) {
        let (ingestor, chunk) = (ingestor.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move { ingestor.submit(chunk, false).await.unwrap() }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap().accepted;
    }
    assert_eq!(accepted, rest.len());
    let after = TableWriter::open(&lake(dir.path()), EventKind::FeeCharged).await.unwrap().version();
    assert!(after - before < 20, "20 requests took {} commits: no group commit", after - before);
    let stored = all_stored_ids(&lake(dir.path())).await;
    assert_eq!(stored.len(), 2000);
    assert!(stored.values().all(|n| *n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resending_is_a_noop_also_after_restart_and_index_loss() {
    let dir = tempfile::tempdir().unwrap();
    let events = demo(500, 2);
    {
        let ingestor = start(dir.path(), "index").await;
        let r = ingestor.submit(events.clone(), true).await.unwrap();
        assert_eq!((r.accepted, r.duplicates), (500, 0), "{:?}", r.errors);
        let r = ingestor.submit(events.clone(), false).await.unwrap();
        assert_eq!((r.accepted, r.duplicates), (0, 500));
    }
    // A restart with the same index.
    let ingestor = start(dir.path(), "index").await;
    let r = ingestor.submit(events.clone(), false).await.unwrap();
    assert_eq!((r.accepted, r.duplicates), (0, 500));
    drop(ingestor);
    // The index is derived state: a fresh one is rebuilt from the tables.
    let ingestor = start(dir.path(), "fresh-index").await;
    let r = ingestor.submit(events.clone(), false).await.unwrap();
    assert_eq!((r.accepted, r.duplicates), (0, 500));
    let stored = all_stored_ids(&lake(dir.path())).await;
    assert_eq!(stored.len(), 500);
    assert!(stored.values().all(|n| *n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_the_index_missed_is_caught_up_at_start() {
    // What a crash between the Delta commit and the index update leaves behind.
    let dir = tempfile::tempdir().unwrap();
    let events = demo(300, 3);
    {
        let ingestor = start(dir.path(), "index").await;
        let first: Vec<_> = events[..100].to_vec();
        assert_eq!(ingestor.submit(first, true).await.unwrap().accepted, 100);
    }
    let lake = lake(dir.path());
    let fees: Vec<_> = events[100..].iter().filter(|(_, e)| e.kind() == EventKind::FeeCharged).map(|(_, e)| e.clone()).collect();
    let mut writer = TableWriter::open(&lake, EventKind::FeeCharged).await.unwrap();
    let batch = events::to_record_batch(EventKind::FeeCharged, fees.iter(), Utc::now()).unwrap();
    writer.append(&[batch]).await.unwrap();

    let ingestor = start(dir.path(), "index").await;
    let r = ingestor.submit(events.clone(), false).await.unwrap();
    assert_eq!(r.duplicates, 100 + fees.len(), "{:?}", r.errors);
    assert_eq!(r.accepted, 300 - 100 - fees.len());
    let stored = all_stored_ids(&lake).await;
    assert_eq!(stored.len(), 300);
    assert!(stored.values().all(|n| *n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_the_same_tables_store_each_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let events = demo(3000, 4);
    let (setup, rest): (Vec<_>, Vec<_>) = events
        .into_iter()
        .partition(|(_, e)| !matches!(e.kind(), EventKind::InferenceCompleted | EventKind::FeeCharged));
    let a = start(dir.path(), "index-a").await;
    assert_eq!(a.submit(setup.clone(), true).await.unwrap().accepted, setup.len());
    let b = start(dir.path(), "index-b").await;
    // Both writers get every event, in many overlapping requests, at the same time.
    let mut tasks = Vec::new();
    for (w, ingestor) in [a.clone(), b.clone()].into_iter().enumerate() {
        for chunk in rest.chunks(200) {
            let (ingestor, mut chunk) = (ingestor.clone(), chunk.to_vec());
            if w == 1 {
                chunk.reverse();
            }
            tasks.push(tokio::spawn(async move { ingestor.submit(chunk, false).await.unwrap() }));
        }
    }
    let (mut accepted, mut duplicates) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        accepted += r.accepted;
        duplicates += r.duplicates;
    }
    assert_eq!(accepted, rest.len(), "each event accepted by exactly one writer");
    assert_eq!(duplicates, rest.len());
    let stored = all_stored_ids(&lake(dir.path())).await;
    let want: HashSet<_> = setup.iter().chain(&rest).map(|(_, e)| e.event_id().to_string()).collect();
    assert_eq!(stored.keys().cloned().collect::<HashSet<_>>(), want);
    assert!(stored.values().all(|n| *n == 1), "an event was stored twice");
}

/// Two writers each get, for the same 40 datanet ids at the same moment, an atomic request
/// creating the datanet (different owners) and contributing to it. Each datanet is stored
/// once, and each request is all or nothing: a contribution never lands after the creation
/// it came with was refused (whether the refusal happens when the flush plans or after it
/// lost the commit race, which timing decides; the rule holds for both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_atomic_request_that_loses_a_race_writes_nothing_in_later_phases() {
    use ledgerlake_ingest::sign::Keypair;
    use ledgerlake_lakehouse::events::{ContributionSubmitted, DatanetCreated, Event};
    use ledgerlake_lakehouse::ids::{ContributionId, Sha256Hex};
    use ledgerlake_lakehouse::messages;

    let dir = tempfile::tempdir().unwrap();
    let writers = [start(dir.path(), "index-a").await, start(dir.path(), "index-b").await];
    let request = |w: usize, i: usize| -> Vec<(usize, Event)> {
        let owner = Keypair::from_seed(format!("owner-{w}").as_bytes());
        let datanet_id: ledgerlake_lakehouse::ids::DatanetId = format!("race-{i}").parse().unwrap();
        let content = format!("writer {w} contributes to datanet {i}");
        let digest = Sha256Hex::digest(content.as_bytes());
        let message = messages::contribution(&datanet_id, &digest);
        let created = DatanetCreated {
            event_id: format!("d-{w}-{i}").parse().unwrap(),
            event_time: Utc::now(),
            datanet_id: datanet_id.clone(),
            owner: owner.address(),
            name: format!("race {i}"),
            description: String::new(),
            license: "CC-BY-4.0".into(),
            visibility: None,
            signature: None,
        };
        let contribution = ContributionSubmitted {
            event_id: format!("c-{w}-{i}").parse().unwrap(),
            event_time: Utc::now(),
            contribution_id: Some(ContributionId::for_message(&message)),
            datanet_id,
            contributor: owner.address(),
            content,
            content_sha256: Some(digest),
            license: "CC-BY-4.0".into(),
            language: None,
            source: None,
            tags: vec![],
            signature: owner.personal_sign(&message).unwrap(),
        };
        vec![(0, created.into()), (1, contribution.into())]
    };
    let mut tasks = Vec::new();
    for i in 0..40 {
        for (w, writer) in writers.iter().enumerate() {
            let (writer, events) = (writer.clone(), request(w, i));
            tasks.push(tokio::spawn(async move { (w, i, writer.submit(events, true).await.unwrap()) }));
        }
    }
    let mut receipts = Vec::new();
    for t in tasks {
        receipts.push(t.await.unwrap());
    }
    let lake = lake(dir.path());
    let datanets = stored_ids(&lake, EventKind::DatanetCreated).await;
    let contributions = stored_ids(&lake, EventKind::ContributionSubmitted).await;
    assert!(datanets.values().chain(contributions.values()).all(|n| *n == 1), "an event was stored twice");
    for i in 0..40 {
        let won: Vec<usize> = (0..2).filter(|w| datanets.contains_key(&format!("d-{w}-{i}"))).collect();
        assert_eq!(won.len(), 1, "datanet race-{i}: created by {won:?}");
    }
    for (w, i, r) in receipts {
        let created = datanets.contains_key(&format!("d-{w}-{i}"));
        let contributed = contributions.contains_key(&format!("c-{w}-{i}"));
        assert_eq!(created, contributed, "writer {w}, datanet {i}: an atomic request was stored in part ({r:?})");
        if created {
            assert_eq!((r.accepted, r.errors.len()), (2, 0), "{r:?}");
        } else {
            assert_eq!(r.accepted, 0, "{r:?}");
            assert!(!r.errors.is_empty(), "a refused request says why: {r:?}");
        }
    }
}
