use ledgerlake_ingest::sign::Keypair;
use ledgerlake_ingest::validate::{BodyFormat, event_to_json, parse_body};
use ledgerlake_lakehouse::events::{Event, Verdict};
use ledgerlake_lakehouse::ids::{ContributionId, Sha256Hex};
use ledgerlake_lakehouse::messages;
use serde_json::{Value, json};

use crate::common::*;

fn one(v: Value) -> Result<Event, ledgerlake_ingest::validate::ItemError> {
    let body = serde_json::to_vec(&json!([v])).unwrap();
    parse_body(BodyFormat::JsonArray, &body, None).unwrap().remove(0).1
}

fn fee() -> Value {
    json!({"kind": "fee.charged", "event_id": "f1", "event_time": "2026-11-24T10:00:00Z",
           "inference_id": "i1", "model_id": "m1", "payer": "key_1", "amount": "1000000000000000000"})
}

fn with(mut v: Value, field: &str, value: Value) -> Value {
    v[field] = value;
    v
}

#[test]
fn field_errors_name_the_field() {
    assert!(one(fee()).is_ok());
    for (field, value, needle) in [
        ("amount", json!("-5"), "negative"),
        ("amount", json!(-5), "negative"),
        ("amount", json!("1".repeat(39)), "exceeds"),
        ("amount", json!(1.5), "whole number"),
        ("event_time", json!("yesterday"), ""),
        ("model_id", json!("Has Spaces"), "alphabet"),
        ("kind", json!("fee.refunded"), "unknown event kind"),
        ("extra", json!(1), "unknown field"),
    ] {
        let e = one(with(fee(), field, value.clone())).unwrap_err();
        assert_eq!(e.field, field, "{field}={value}: {e:?}");
        assert!(e.message.contains(needle), "{field}={value}: {e:?}");
        assert_eq!(e.index, 0);
    }
    let mut missing = fee();
    missing.as_object_mut().unwrap().remove("payer");
    assert_eq!(one(missing).unwrap_err().field, "payer");
}

#[test]
fn addresses_must_carry_a_valid_checksum() {
    let stake = |addr: &str| json!({"kind": "stake.changed", "event_id": "s1", "event_time": "2026-11-24T10:00:00Z",
        "staker": addr, "model_id": "m1", "action": "stake", "amount": "1"});
    assert!(one(stake("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed")).is_ok());
    assert!(one(stake("0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed")).is_ok());
    let e = one(stake("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD")).unwrap_err();
    assert_eq!(e.field, "staker");
    assert!(e.message.contains("checksum"), "{e:?}");
    assert_eq!(one(stake("0x1234")).unwrap_err().field, "staker");
}

fn contribution(key: &Keypair, signer: &Keypair, content: &str) -> Value {
    let datanet = "climate-0".parse().unwrap();
    let digest = Sha256Hex::digest(content.as_bytes());
    let sig = signer.personal_sign(&messages::contribution(&datanet, &digest)).unwrap();
    json!({"kind": "contribution.submitted", "event_id": "c1", "event_time": "2026-11-24T10:00:00Z",
           "datanet_id": "climate-0", "contributor": key.address().to_string(), "content": content,
           "license": "CC-BY-4.0", "signature": sig.to_string()})
}

#[test]
fn contributions_are_signed_by_their_contributor() {
    let alice = Keypair::from_seed(b"alice");
    let mallory = Keypair::from_seed(b"mallory");
    let ok = one(contribution(&alice, &alice, "hello world")).unwrap();
    let Event::ContributionSubmitted(c) = &ok else { panic!() };
    let msg = messages::contribution(&c.datanet_id, &Sha256Hex::digest(b"hello world"));
    assert_eq!(c.contribution_id, Some(ContributionId::for_message(&msg)));
    let e = one(contribution(&alice, &mallory, "hello world")).unwrap_err();
    assert_eq!(e.field, "signature");
    assert!(e.message.contains(&mallory.address().to_string()), "{e:?}");
    // The signature covers the content: changing it breaks the signature.
    let mut tampered = contribution(&alice, &alice, "hello world");
    tampered["content"] = json!("hello world!");
    assert_eq!(one(tampered).unwrap_err().field, "signature");
    // A derived field that is given must match.
    let wrong_hash = with(contribution(&alice, &alice, "hello world"), "content_sha256", json!("00".repeat(32)));
    assert_eq!(one(wrong_hash).unwrap_err().field, "content_sha256");
}

#[test]
fn a_rejection_needs_a_reason() {
    let owner = Keypair::from_seed(b"owner");
    let cid: ContributionId = "ab".repeat(32).parse().unwrap();
    let sig = owner.personal_sign(&messages::review(&cid, Verdict::Rejected)).unwrap();
    let review = json!({"kind": "contribution.reviewed", "event_id": "r1", "event_time": "2026-11-24T10:00:00Z",
        "contribution_id": cid.to_string(), "datanet_id": "climate-0", "reviewer": owner.address().to_string(),
        "verdict": "rejected", "signature": sig.to_string()});
    assert_eq!(one(review.clone()).unwrap_err().field, "reason");
    assert!(one(with(review.clone(), "reason", json!("spam"))).is_ok());
    // The signature names the verdict.
    let approved = with(with(review, "reason", json!("spam")), "verdict", json!("approved"));
    assert_eq!(one(approved).unwrap_err().field, "signature");
}

#[test]
fn malformed_bodies_and_lines() {
    assert!(parse_body(BodyFormat::JsonArray, b"[{", None).is_err());
    assert!(parse_body(BodyFormat::JsonArray, b"42", None).is_err());
    let items = parse_body(BodyFormat::Ndjson, b"{\"kind\": 1}\nnot json\n", None).unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].1.as_ref().unwrap_err().field, "kind");
    assert!(items[1].1.as_ref().unwrap_err().message.contains("invalid JSON"));
    assert_eq!(items[1].1.as_ref().unwrap_err().index, 1);
}

#[test]
fn every_demo_event_validates_and_round_trips() {
    for (_, event) in demo(3000, 9) {
        let back = one(event_to_json(&event)).unwrap();
        assert_eq!(back, event);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_rules_reject_and_atomic_batches_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ingestor = start(dir.path(), "index").await;
    let owner = Keypair::from_seed(b"owner");
    let alice = Keypair::from_seed(b"alice");
    let created = json!({"kind": "datanet.created", "event_id": "d1", "event_time": "2026-11-24T10:00:00Z",
        "datanet_id": "climate-0", "owner": owner.address().to_string(), "name": "Climate", "license": "CC-BY-4.0"});
    let contrib = contribution(&alice, &alice, "sea levels rise");
    let Event::ContributionSubmitted(c) = one(contrib.clone()).unwrap() else { panic!() };
    let cid = c.contribution_id.unwrap();
    let review_by = |who: &Keypair, id: &str| {
        let sig = who.personal_sign(&messages::review(&cid, Verdict::Approved)).unwrap();
        json!({"kind": "contribution.reviewed", "event_id": id, "event_time": "2026-11-24T10:00:00Z",
            "contribution_id": cid.to_string(), "datanet_id": "climate-0", "reviewer": who.address().to_string(),
            "verdict": "approved", "signature": sig.to_string()})
    };
    let items = |values: Vec<Value>| {
        values.into_iter().enumerate().map(|(i, v)| (i, one(v).unwrap())).collect::<Vec<_>>()
    };

    // Atomic: the contribution to a datanet that does not exist yet fails the whole batch.
    let r = ingestor.submit(items(vec![fee(), contrib.clone()]), true).await.unwrap();
    assert_eq!(r.accepted, 0);
    assert_eq!(r.errors.len(), 1);
    assert_eq!((r.errors[0].index, r.errors[0].field.as_str()), (1, "datanet_id"));
    assert!(all_stored_ids(&lake(dir.path())).await.is_empty(), "an atomic batch wrote something");

    // Not atomic: the valid items are stored, the invalid one is listed.
    let r = ingestor.submit(items(vec![fee(), contrib.clone()]), false).await.unwrap();
    assert_eq!((r.accepted, r.errors.len()), (1, 1));

    // In order within one batch: the datanet, then the contribution, then its review.
    let r = ingestor
        .submit(items(vec![created, contrib, review_by(&alice, "r0"), review_by(&owner, "r1")]), false)
        .await
        .unwrap();
    assert_eq!(r.accepted, 3, "{:?}", r.errors);
    assert_eq!(r.errors.len(), 1);
    assert_eq!((r.errors[0].index, r.errors[0].field.as_str()), (2, "reviewer"));
}
