use ledgerlake_ingest::authority::{Submitter, admit};
use ledgerlake_ingest::sign::Keypair;
use ledgerlake_ingest::validate::{BodyFormat, event_to_json, parse_body};
use ledgerlake_ingest::writer::Prepared;
use ledgerlake_ingest::{Principal, Role};
use ledgerlake_lakehouse::events::Event;
use ledgerlake_lakehouse::ids::{Bytes32, ContributionId, Sha256Hex};
use ledgerlake_lakehouse::{Deployment, messages};
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

fn deployment() -> Deployment {
    Deployment { id: Bytes32::from_bytes([5; 32]), chain_id: None }
}

fn reader() -> Submitter {
    Submitter::Key(Principal { id: "key_reader".into(), role: Role::Read, address: None })
}

/// `v` (a participant event's JSON) signed by `signer` for [`deployment`].
fn sign(signer: &Keypair, v: Value) -> Value {
    let mut v = v;
    if v.get("signature").is_none() {
        v["signature"] = json!(ledgerlake_lakehouse::Signature::placeholder().to_string());
    }
    let mut event = one(v).unwrap();
    signer.sign_event(&mut event, &deployment()).unwrap();
    event_to_json(&event)
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339()
}

/// A contribution by `key`'s address, signed by `signer`.
fn contribution(key: &Keypair, signer: &Keypair, content: &str) -> Value {
    sign(signer, json!({"kind": "contribution.submitted", "event_id": format!("c-{}", &Sha256Hex::digest(content.as_bytes()).as_str()[..8]),
           "event_time": now(), "datanet_id": "climate-0", "contributor": key.address().to_string(), "content": content,
           "license": "CC-BY-4.0"}))
}

fn review(signer: &Keypair, cid: &ContributionId, id: &str, verdict: &str, reason: Option<&str>) -> Value {
    sign(signer, json!({"kind": "contribution.reviewed", "event_id": id, "event_time": now(), "contribution_id": cid.to_string(),
        "datanet_id": "climate-0", "reviewer": signer.address().to_string(), "verdict": verdict, "reason": reason}))
}

#[test]
fn contributions_are_signed_by_their_contributor() {
    let alice = Keypair::from_seed(b"alice");
    let mallory = Keypair::from_seed(b"mallory");
    let ok = one(contribution(&alice, &alice, "hello world")).unwrap();
    let Event::ContributionSubmitted(c) = &ok else { panic!() };
    let msg = messages::contribution(&c.datanet_id, &Sha256Hex::digest(b"hello world"));
    assert_eq!(c.contribution_id, Some(ContributionId::for_message(&msg)));
    admit(&ok, &reader(), &deployment()).unwrap();
    let (field, message) = admit(&one(contribution(&alice, &mallory, "hello world")).unwrap(), &reader(), &deployment()).unwrap_err();
    assert_eq!(field, "signature");
    assert!(message.contains(&mallory.address().to_string()), "{message}");
    // The signature covers the content and the time: changing either breaks it.
    let mut tampered = contribution(&alice, &alice, "hello world");
    tampered["content"] = json!("hello world!");
    tampered.as_object_mut().unwrap().remove("content_sha256");
    tampered.as_object_mut().unwrap().remove("contribution_id");
    assert_eq!(admit(&one(tampered).unwrap(), &reader(), &deployment()).unwrap_err().0, "signature");
    let backdated = with(contribution(&alice, &alice, "hello world"), "event_time", json!("2000-01-01T00:00:00Z"));
    assert_eq!(admit(&one(backdated).unwrap(), &reader(), &deployment()).unwrap_err().0, "signature");
    // A derived field that is given must match.
    let wrong_hash = with(contribution(&alice, &alice, "hello world"), "content_sha256", json!("00".repeat(32)));
    assert_eq!(one(wrong_hash).unwrap_err().field, "content_sha256");
}

#[test]
fn a_rejection_needs_a_reason() {
    let owner = Keypair::from_seed(b"owner");
    let cid: ContributionId = "ab".repeat(32).parse().unwrap();
    let unreasoned = json!({"kind": "contribution.reviewed", "event_id": "r1", "event_time": now(),
        "contribution_id": cid.to_string(), "datanet_id": "climate-0", "reviewer": owner.address().to_string(),
        "verdict": "rejected", "signature": ledgerlake_lakehouse::Signature::placeholder().to_string()});
    assert_eq!(one(unreasoned).unwrap_err().field, "reason");
    let rejected = review(&owner, &cid, "r1", "rejected", Some("spam"));
    admit(&one(rejected.clone()).unwrap(), &reader(), &deployment()).unwrap();
    // The signature names the verdict.
    let approved = with(rejected, "verdict", json!("approved"));
    assert_eq!(admit(&one(approved).unwrap(), &reader(), &deployment()).unwrap_err().0, "signature");
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
    let created = sign(&owner, json!({"kind": "datanet.created", "event_id": "d1", "event_time": now(),
        "datanet_id": "climate-0", "owner": owner.address().to_string(), "name": "Climate", "license": "CC-BY-4.0"}));
    let contrib = contribution(&alice, &alice, "sea levels rise");
    let Event::ContributionSubmitted(c) = one(contrib.clone()).unwrap() else { panic!() };
    let cid = c.contribution_id.unwrap();
    let review_by = |who: &Keypair, id: &str| review(who, &cid, id, "approved", None);
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

/// Parsed, admitted and queued as `POST /v1/events` does for `who`.
async fn post(ingestor: &ledgerlake_ingest::Ingestor, who: &Submitter, values: Vec<Value>) -> ledgerlake_ingest::Receipt {
    let items = values.into_iter().enumerate().map(|(i, v)| (i, one(v))).collect();
    let (prepared, errors) = Prepared::from_items(items, false, who, ingestor.deployment()).unwrap();
    ingestor.submit_checked(prepared, errors, false).await.unwrap()
}

/// Signed for the ingestor's own deployment.
fn signed_for(ingestor: &ledgerlake_ingest::Ingestor, signer: &Keypair, v: Value) -> Value {
    let mut event = one(v).unwrap();
    signer.sign_event(&mut event, ingestor.deployment()).unwrap();
    event_to_json(&event)
}

/// Who keeps a contribution id is ingest order: a copy of approved text, signed by someone
/// else and backdated, is refused, in the same request as in a later one; re-sending the
/// original is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_submission_keeps_a_contribution_and_backdated_copies_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ingestor = start(dir.path(), "index").await;
    let (owner, alice, mallory) = (Keypair::from_seed(b"owner"), Keypair::from_seed(b"alice"), Keypair::from_seed(b"mallory"));
    let created = signed_for(&ingestor, &owner, json!({"kind": "datanet.created", "event_id": "d1", "event_time": now(),
        "datanet_id": "climate-0", "owner": owner.address().to_string(), "name": "Climate", "license": "CC-BY-4.0",
        "signature": ledgerlake_lakehouse::Signature::placeholder().to_string()}));
    let text = |who: &Keypair, id: &str, time: &str| {
        signed_for(&ingestor, who, json!({"kind": "contribution.submitted", "event_id": id, "event_time": time, "datanet_id": "climate-0",
            "contributor": who.address().to_string(), "content": "the marquis owned three mills", "license": "CC-BY-4.0",
            "signature": ledgerlake_lakehouse::Signature::placeholder().to_string()}))
    };
    let original = text(&alice, "c-alice", &now());
    let r = post(&ingestor, &reader(), vec![created, original.clone(), text(&mallory, "c-mallory-same-flush", &now())]).await;
    assert_eq!(r.accepted, 2, "{:?}", r.errors);
    assert_eq!((r.errors[0].index, r.errors[0].field.as_str()), (2, "contribution_id"), "{:?}", r.errors);
    // Backdated to 2000: refused for its time, and it would lose to ingest order anyway.
    let r = post(&ingestor, &reader(), vec![text(&mallory, "c-mallory-2000", "2000-01-01T00:00:00Z")]).await;
    assert_eq!(r.errors[0].field, "event_time", "{:?}", r.errors);
    let r = post(&ingestor, &reader(), vec![text(&mallory, "c-mallory-now", &now())]).await;
    assert_eq!((r.accepted, r.errors[0].field.as_str()), (0, "contribution_id"), "{:?}", r.errors);
    let r = post(&ingestor, &reader(), vec![original]).await;
    assert_eq!((r.accepted, r.duplicates, r.errors.len()), (0, 1, 0), "re-sending is a duplicate");
}

/// A participant's event time is held to the skew bound, after duplicates drop out: a
/// stored event re-sent long after is still a harmless duplicate. ledgerlake's own
/// components are not held to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_times_are_bounded_but_retries_stay_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let ingestor = start(dir.path(), "index").await;
    let owner = Keypair::from_seed(b"owner");
    let old = signed_for(&ingestor, &owner, json!({"kind": "datanet.created", "event_id": "d-old", "event_time": "2026-01-01T00:00:00Z",
        "datanet_id": "old", "owner": owner.address().to_string(), "name": "Old", "license": "CC0-1.0"}));
    let r = post(&ingestor, &reader(), vec![old.clone()]).await;
    assert_eq!(r.errors[0].field, "event_time", "{:?}", r.errors);
    let future = with(old.clone(), "event_time", json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339()));
    let future = signed_for(&ingestor, &owner, future);
    assert_eq!(post(&ingestor, &reader(), vec![future]).await.errors[0].field, "event_time");
    // Stored by ledgerlake itself (as a restore would), then re-sent by a key: a duplicate.
    let r = ingestor.submit(vec![(0, one(old.clone()).unwrap())], false).await.unwrap();
    assert_eq!(r.accepted, 1);
    let r = post(&ingestor, &reader(), vec![old]).await;
    assert_eq!((r.duplicates, r.errors.len()), (1, 0), "{:?}", r.errors);
}

/// A model id belongs to its first registrant: only that builder registers it again, and
/// the base model's id is no one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_id_belongs_to_its_first_registrant() {
    let dir = tempfile::tempdir().unwrap();
    let ingestor = start(dir.path(), "index").await;
    ingestor.reserve_model("ledgerlake-base".parse().unwrap(), ledgerlake_lakehouse::pricing::Price::FREE);
    let (bob, mallory) = (Keypair::from_seed(b"bob"), Keypair::from_seed(b"mallory"));
    let registration = |who: &Keypair, id: &str, model: &str, price: &str| {
        signed_for(&ingestor, who, json!({"kind": "model.registered", "event_id": id, "event_time": now(), "model_id": model,
            "builder": who.address().to_string(), "base_model": "ledgerlake-base", "adapter_uri": format!("adapters/{id}"),
            "price_per_1k_input": price, "price_per_1k_output": price}))
    };
    let r = post(&ingestor, &reader(), vec![registration(&bob, "r1", "bob-lora", "5"), registration(&mallory, "r2", "bob-lora", "0")]).await;
    assert_eq!(r.accepted, 1);
    assert_eq!((r.errors[0].index, r.errors[0].field.as_str()), (1, "model_id"), "{:?}", r.errors);
    let r = post(&ingestor, &reader(), vec![registration(&mallory, "r3", "bob-lora", "0")]).await;
    assert_eq!(r.errors[0].field, "model_id", "a later request too");
    let r = post(&ingestor, &reader(), vec![registration(&bob, "r4", "bob-lora", "7")]).await;
    assert_eq!((r.accepted, r.errors.len()), (1, 0), "the owner registers it again");
    let r = post(&ingestor, &reader(), vec![registration(&mallory, "r5", "ledgerlake-base", "1")]).await;
    assert_eq!(r.errors[0].field, "model_id", "the base model's id is the deployment's");
    // Unsigned, or signed by someone else than `builder`: refused whatever the key.
    let admin = Submitter::Key(Principal { id: "key_admin".into(), role: Role::Admin, address: None });
    let mut forged = registration(&mallory, "r6", "fresh-lora", "1");
    forged["builder"] = json!(bob.address().to_string());
    assert_eq!(post(&ingestor, &admin, vec![forged]).await.errors[0].field, "signature");
    // ModelFactory's directory of bob's model is bob's model's: mallory cannot serve that
    // adapter under a model id of her own, by its URI, its local path or a `..` detour.
    let factory = format!("{}_models/", lake(dir.path()).config().root);
    let pointing = |id: &str, model: &str, uri: String| {
        let mut v = registration(&mallory, id, model, "1");
        v["adapter_uri"] = json!(uri);
        signed_for(&ingestor, &mallory, v)
    };
    let local = factory.trim_start_matches("file://").to_owned();
    for (i, uri) in [format!("{factory}bob-lora/run-1/"), format!("{local}bob-lora/run-1")].into_iter().enumerate() {
        let r = post(&ingestor, &reader(), vec![pointing(&format!("r7-{i}"), "mallory-lora", uri)]).await;
        assert_eq!(r.errors[0].field, "adapter_uri", "{:?}", r.errors);
    }
    let mut detour = registration(&mallory, "r8", "mallory-lora", "1");
    detour["adapter_uri"] = json!(format!("{factory}mallory-lora/../bob-lora/run-1/"));
    let detour = post(&ingestor, &reader(), vec![detour]).await;
    assert_eq!(detour.errors[0].field, "adapter_uri", "{:?}", detour.errors);
    let own = post(&ingestor, &reader(), vec![pointing("r9", "mallory-lora", format!("{factory}mallory-lora/run-2/"))]).await;
    assert_eq!((own.accepted, own.errors.len()), (1, 0), "{:?}", own.errors);
}

/// What no participant may cause: service facts need a service or admin key, stakes and
/// voids an admin key, and what the epoch job writes no key at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cause_only_what_their_kind_allows() {
    let dir = tempfile::tempdir().unwrap();
    let ingestor = start(dir.path(), "index").await;
    let key = |role| Submitter::Key(Principal { id: format!("key_{role}"), role, address: None });
    let stake = json!({"kind": "stake.changed", "event_id": "s1", "event_time": "2026-11-24T10:00:00Z",
        "staker": Keypair::from_seed(b"x").address().to_string(), "model_id": "m1", "action": "stake", "amount": "1"});
    for role in [Role::Read, Role::Ingest, Role::Builder, Role::Service] {
        let r = post(&ingestor, &key(role), vec![stake.clone()]).await;
        assert_eq!(r.errors[0].field, "kind", "a {role} key stakes: {:?}", r.errors);
    }
    for role in [Role::Read, Role::Ingest, Role::Builder] {
        let r = post(&ingestor, &key(role), vec![fee()]).await;
        assert_eq!(r.errors[0].field, "kind", "a {role} key charges a fee: {:?}", r.errors);
    }
    // A service key's fee comes with the completion it bills and is at most its model's
    // price for those tokens: 1,000 + 2,000 tokens at 10^18 and 10^18 per 1,000 is 3·10^18.
    let open = ledgerlake_lakehouse::Amount::ONE_OPEN;
    ingestor.reserve_model("m1".parse().unwrap(), ledgerlake_lakehouse::pricing::Price::new(open, open).unwrap());
    let completed = json!({"kind": "inference.completed", "event_id": "c1", "event_time": "2026-11-24T10:00:00Z", "inference_id": "i1",
        "model_id": "m1", "caller": "key_1", "prompt_tokens": 1000, "completion_tokens": 2000, "output_sha256": "0".repeat(64),
        "latency_ms": 1});
    let service = key(Role::Service);
    assert_eq!(post(&ingestor, &service, vec![fee()]).await.errors[0].field, "inference_id", "a fee without its completion");
    let over = with(with(fee(), "amount", json!("3000000000000000001")), "event_id", json!("f-over"));
    assert_eq!(post(&ingestor, &service, vec![completed.clone(), over]).await.errors[0].field, "amount");
    let exact = with(fee(), "amount", json!("3000000000000000000"));
    // The completion was stored with the refused fee: it was billed (by nothing) then, and a
    // fee sent later with it again is refused; so are two fees for one new completion.
    let r = post(&ingestor, &service, vec![completed.clone(), exact.clone()]).await;
    assert_eq!((r.accepted, r.duplicates, r.errors[0].field.as_str()), (0, 1, "inference_id"), "{:?}", r.errors);
    let fresh = with(with(completed, "event_id", json!("c2")), "inference_id", json!("i2"));
    let first = with(with(exact.clone(), "event_id", json!("f2")), "inference_id", json!("i2"));
    let second = with(with(exact, "event_id", json!("f2-again")), "inference_id", json!("i2"));
    let r = post(&ingestor, &service, vec![fresh, first, second]).await;
    assert_eq!((r.accepted, r.errors.len(), r.errors[0].field.as_str()), (2, 1, "inference_id"), "{:?}", r.errors);
    assert_eq!(post(&ingestor, &key(Role::Admin), vec![stake]).await.accepted, 1);
    // A void names a stored event and the admin key that voids.
    let void = |target: &str, by: &str| json!({"kind": "event.voided", "event_id": format!("v-{target}-{by}"), "event_time": now(),
        "voided_event_id": target, "voided_kind": "fee.charged", "reason": "forged", "voided_by": by});
    assert_eq!(post(&ingestor, &key(Role::Service), vec![void("f1", "key_service")]).await.errors[0].field, "kind");
    assert_eq!(post(&ingestor, &key(Role::Admin), vec![void("f1", "key_someone")]).await.errors[0].field, "voided_by");
    assert_eq!(post(&ingestor, &key(Role::Admin), vec![void("nope", "key_admin")]).await.errors[0].field, "voided_event_id");
    assert_eq!(post(&ingestor, &key(Role::Admin), vec![void("f2", "key_admin")]).await.accepted, 1);
}
