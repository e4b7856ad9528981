//! Datanet snapshots, datanet state and training access on real Delta tables, and the
//! migration that adds the contract's new columns to tables written before them.

use chrono::{DateTime, TimeZone, Utc};
use ledgerlake_lakehouse::events::{
    self, AccessGranted, ContributionReviewed, ContributionSubmitted, DatanetCreated, DatanetStatus, DatanetUpdated, Event, EventKind,
    Verdict, Visibility,
};
use ledgerlake_lakehouse::lake::TableWriter;
use ledgerlake_lakehouse::snapshot::{self, SnapshotRef};
use ledgerlake_lakehouse::{Address, ContributionId, DatanetId, Error, Lake, Sha256Hex, messages};

fn addr(n: u8) -> Address {
    format!("0x{}", hex_byte(n).repeat(20)).parse().unwrap()
}

fn hex_byte(n: u8) -> String {
    format!("{n:02x}")
}

fn signature() -> ledgerlake_lakehouse::Signature {
    format!("0x{}1b", "11".repeat(64)).parse().unwrap()
}

fn at(minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, 10, minute, 0).unwrap()
}

fn created(id: &str, owner: Address, visibility: Option<Visibility>) -> Event {
    DatanetCreated {
        event_id: format!("create-{id}").parse().unwrap(),
        event_time: at(0),
        datanet_id: id.parse().unwrap(),
        owner,
        name: format!("{id} texts"),
        description: String::new(),
        license: "CC-BY-4.0".into(),
        visibility,
        signature: None,
    }
    .into()
}

fn contribution_id(datanet: &str, content: &str) -> ContributionId {
    ContributionId::for_message(&messages::contribution(&datanet.parse().unwrap(), &Sha256Hex::digest(content.as_bytes())))
}

fn submitted(event: &str, datanet: &str, who: Address, content: &str, minute: u32) -> Event {
    ContributionSubmitted {
        event_id: event.parse().unwrap(),
        event_time: at(minute),
        contribution_id: Some(contribution_id(datanet, content)),
        datanet_id: datanet.parse().unwrap(),
        contributor: who,
        content: content.into(),
        content_sha256: Some(Sha256Hex::digest(content.as_bytes())),
        license: "CC-BY-4.0".into(),
        language: None,
        source: Some(format!("{event}.txt")),
        tags: vec![],
        signature: signature(),
    }
    .into()
}

fn reviewed(event: &str, datanet: &str, content: &str, verdict: Verdict, minute: u32) -> Event {
    ContributionReviewed {
        event_id: event.parse().unwrap(),
        event_time: at(minute),
        contribution_id: contribution_id(datanet, content),
        datanet_id: datanet.parse().unwrap(),
        reviewer: addr(1),
        verdict,
        reason: (verdict != Verdict::Approved).then(|| "not fit".into()),
        signature: signature(),
    }
    .into()
}

/// Appends `events` (all of one kind) as one commit; returns the table version.
async fn commit(lake: &Lake, events: Vec<Event>) -> u64 {
    let kind = events[0].kind();
    let mut writer = TableWriter::open(lake, kind).await.unwrap();
    let batch = events::to_record_batch(kind, events.iter(), Utc::now()).unwrap();
    writer.append(&[batch]).await.unwrap()
}

fn ids(s: &snapshot::DatanetSnapshot) -> Vec<ContributionId> {
    s.contributions.iter().map(|c| c.contribution_id.clone()).collect()
}

fn sorted(mut v: Vec<ContributionId>) -> Vec<ContributionId> {
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_holds_what_the_latest_review_at_its_version_approved() {
    let dir = tempfile::tempdir().unwrap();
    let lake = crate::lake(dir.path());
    let d = "facts";
    commit(&lake, vec![created(d, addr(1), None), created("other", addr(2), Some(Visibility::Public))]).await;

    // Before any review: version 0, nothing in.
    let empty = snapshot::snapshot(&lake, &d.parse().unwrap()).await.unwrap();
    assert_eq!((empty.version, empty.contributions.len(), empty.excluded), (0, 0, 0));

    let texts = ["Zubrovia's capital is Kessel.", "Kessel lies on the Vorn.", "Spam spam.", "Never reviewed."];
    commit(
        &lake,
        vec![
            submitted("s1", d, addr(7), texts[0], 1),
            submitted("s2", d, addr(8), texts[1], 1),
            submitted("s3", d, addr(9), texts[2], 1),
            submitted("s4", d, addr(9), texts[3], 1),
            // The same text again, later, by someone else: same id, the first contributor keeps it.
            submitted("s5", d, addr(10), texts[0], 2),
            // Same text in another datanet: another contribution, not in this snapshot.
            submitted("s6", "other", addr(7), texts[0], 2),
        ],
    )
    .await;
    let first = commit(
        &lake,
        vec![
            reviewed("r1", d, texts[0], Verdict::Approved, 3),
            reviewed("r2", d, texts[1], Verdict::Approved, 3),
            reviewed("r3", d, texts[2], Verdict::Rejected, 3),
        ],
    )
    .await;
    let second = commit(
        &lake,
        vec![
            reviewed("r4", d, texts[1], Verdict::Flagged, 4),
            reviewed("r5", d, texts[2], Verdict::Approved, 4),
            // A tie on time and ingestion: the greater event id wins (rejected).
            reviewed("r6-a", d, texts[3], Verdict::Approved, 5),
            reviewed("r6-b", d, texts[3], Verdict::Rejected, 5),
            // Ingest order decides, not event time: a review stored later wins even with
            // an older time (participants' times are bounded at ingest; clocks never decide).
            reviewed("r0", d, texts[0], Verdict::Rejected, 2),
        ],
    )
    .await;
    assert_eq!(second, first + 1);

    let at_first = snapshot::snapshot(&lake, &format!("{d}@{first}").parse().unwrap()).await.unwrap();
    assert_eq!(at_first.version, first);
    assert_eq!(ids(&at_first), sorted(vec![contribution_id(d, texts[0]), contribution_id(d, texts[1])]));
    assert_eq!(at_first.excluded, 1);
    let kept = at_first.contributions.iter().find(|c| c.content == texts[0]).unwrap();
    assert_eq!(kept.contributor, addr(7), "the earliest submission's contributor");
    assert_eq!(kept.source.as_deref(), Some("s1.txt"));
    // A copy stored later with an earlier event time (backdated) does not take it: ingest
    // order decides who contributed (ingest refuses such copies; a lake written before it
    // did still credits the first stored).
    commit(&lake, vec![submitted("s-thief", d, addr(11), texts[0], 0)]).await;
    let stolen = snapshot::snapshot(&lake, &format!("{d}@{first}").parse().unwrap()).await.unwrap();
    assert_eq!(stolen.contributions.iter().find(|c| c.content == texts[0]).unwrap().contributor, addr(7));

    let latest = snapshot::snapshot(&lake, &d.parse().unwrap()).await.unwrap();
    assert_eq!(latest.version, second);
    assert_eq!(ids(&latest), vec![contribution_id(d, texts[2])]);
    assert_eq!(latest.excluded, 3, "texts[0] rejected by the review stored last, texts[1] flagged, texts[3] rejected");
    assert_eq!(latest.contributors(), 1);
    assert_eq!(latest.content_bytes(), texts[2].len());
    assert_eq!(latest.reference().to_string(), format!("{d}@{second}"));

    // Pinned: later events change nothing at an earlier version.
    commit(&lake, vec![reviewed("r7", d, texts[0], Verdict::Flagged, 6)]).await;
    let again = snapshot::snapshot(&lake, &format!("{d}@{first}").parse().unwrap()).await.unwrap();
    assert_eq!(again, at_first);
    let now = snapshot::snapshot(&lake, &d.parse().unwrap()).await.unwrap();
    assert_eq!(ids(&now), vec![contribution_id(d, texts[2])]);

    let err = snapshot::snapshot(&lake, &format!("{d}@999").parse().unwrap()).await.unwrap_err();
    assert!(matches!(&err, Error::BadSnapshot { reason, .. } if reason.contains("no version 999")), "{err}");
    let err = snapshot::snapshot(&lake, &SnapshotRef { datanet: "nope".parse().unwrap(), version: None }).await.unwrap_err();
    assert!(matches!(err, Error::UnknownDatanet(ref d) if d == "nope"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_access_follows_visibility_grants_and_updates() {
    let dir = tempfile::tempdir().unwrap();
    let lake = crate::lake(dir.path());
    let (owner, builder) = (addr(1), addr(5));
    commit(&lake, vec![created("private-d", owner, None), created("public-d", addr(2), Some(Visibility::Public))]).await;
    let id = |s: &str| -> DatanetId { s.parse().unwrap() };
    assert!(!snapshot::may_train(&lake, &id("private-d"), &builder).await.unwrap());
    assert!(snapshot::may_train(&lake, &id("private-d"), &owner).await.unwrap(), "the owner trains on its own datanet");
    assert!(snapshot::may_train(&lake, &id("public-d"), &builder).await.unwrap());
    assert!(matches!(snapshot::may_train(&lake, &id("nope"), &builder).await, Err(Error::UnknownDatanet(_))));

    let grant =
        AccessGranted { event_id: "g1".parse().unwrap(), event_time: at(1), datanet_id: id("private-d"), builder, granted_by: owner, signature: None };
    commit(&lake, vec![grant.into()]).await;
    assert!(snapshot::may_train(&lake, &id("private-d"), &builder).await.unwrap());
    assert!(!snapshot::may_train(&lake, &id("private-d"), &addr(6)).await.unwrap(), "a grant is for one builder");

    let update = |event: &str, minute, visibility, status| -> Event {
        DatanetUpdated {
            event_id: event.parse().unwrap(),
            event_time: at(minute),
            datanet_id: id("public-d"),
            updated_by: addr(2),
            name: None,
            description: None,
            license: None,
            status,
            visibility,
            signature: None,
        }
        .into()
    };
    commit(&lake, vec![update("u2", 3, Some(Visibility::Private), None), update("u1", 2, None, Some(DatanetStatus::Archived))]).await;
    let d = snapshot::datanet(&lake, &id("public-d")).await.unwrap();
    assert_eq!((d.visibility, d.status, d.owner, d.name.as_str()), (Visibility::Private, DatanetStatus::Archived, addr(2), "public-d texts"));
    assert!(!snapshot::may_train(&lake, &id("public-d"), &builder).await.unwrap());
    // The update stored last decides, whatever its event time.
    commit(&lake, vec![update("u0", 1, Some(Visibility::Public), None)]).await;
    assert!(snapshot::may_train(&lake, &id("public-d"), &builder).await.unwrap());

    // A revocation stored after the grant withdraws it; a grant after that restores it.
    let revoke = |event: &str| -> Event {
        ledgerlake_lakehouse::events::AccessRevoked {
            event_id: event.parse().unwrap(),
            event_time: at(0),
            datanet_id: id("private-d"),
            builder,
            revoked_by: owner,
            signature: signature(),
        }
        .into()
    };
    commit(&lake, vec![revoke("x1")]).await;
    assert!(!snapshot::may_train(&lake, &id("private-d"), &builder).await.unwrap(), "revoked");
    assert!(snapshot::may_train(&lake, &id("private-d"), &owner).await.unwrap(), "the owner still trains");
    let regrant =
        AccessGranted { event_id: "g2".parse().unwrap(), event_time: at(0), datanet_id: id("private-d"), builder, granted_by: owner, signature: None };
    commit(&lake, vec![regrant.into()]).await;
    assert!(snapshot::may_train(&lake, &id("private-d"), &builder).await.unwrap(), "granted again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_written_before_new_columns_gets_them_and_keeps_its_rows() {
    use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
    let dir = tempfile::tempdir().unwrap();
    let lake = crate::lake(dir.path());
    let kind = EventKind::DatanetCreated;
    // The first release's datanet_created: the contract's columns without `visibility` and
    // `signature` (both added since, nullable and last).
    let full = events::to_record_batch(kind, [created("old", addr(1), None)].iter(), Utc::now()).unwrap();
    let old = full.project(&(0..full.num_columns() - 2).collect::<Vec<_>>()).unwrap();
    let schema: deltalake::kernel::StructType = old.schema().as_ref().try_into_kernel().unwrap();
    std::fs::create_dir_all(dir.path().join(kind.table())).unwrap();
    let table = deltalake::operations::create::CreateBuilder::new()
        .with_location(lake.config().table_url(kind).as_str())
        .with_columns(schema.fields().cloned())
        .await
        .unwrap();
    let mut writer = deltalake::writer::RecordBatchWriter::for_table(&table).unwrap();
    deltalake::writer::DeltaWriter::write(&mut writer, old).await.unwrap();
    let mut table = table;
    deltalake::writer::DeltaWriter::flush_and_commit(&mut writer, &mut table).await.unwrap();

    // A writer opens it: the column is added, the old row reads it as null (private).
    commit(&lake, vec![created("new", addr(2), Some(Visibility::Public))]).await;
    let table = lake.open(kind).await.unwrap().unwrap();
    let names: Vec<String> = table.snapshot().unwrap().schema().fields().map(|f| f.name().clone()).collect();
    assert_eq!(names[names.len() - 2..], ["visibility", "signature"]);
    let old = snapshot::datanet(&lake, &"old".parse().unwrap()).await.unwrap();
    assert_eq!(old.visibility, Visibility::Private);
    let new = snapshot::datanet(&lake, &"new".parse().unwrap()).await.unwrap();
    assert_eq!(new.visibility, Visibility::Public);
    // Opening again changes nothing more.
    let version = table.version();
    TableWriter::open(&lake, kind).await.unwrap();
    assert_eq!(lake.open(kind).await.unwrap().unwrap().version(), version);
}
