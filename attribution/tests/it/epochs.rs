//! Reward epochs on a real lake: closing pins the input versions, pays every role exactly,
//! records rewards whose tree has the recorded root, anchors in the hash-chained log, and a
//! recomputation after more events (late ones included) gives the same bytes; late fees go
//! to the next epoch; epochs close in order and only once their window has ended.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use ledgerlake_attribution::anchor::{self, LogAnchor};
use ledgerlake_attribution::epoch_job::{self, Closing, EpochConfig};
use ledgerlake_attribution::epochs::Policy;
use ledgerlake_attribution::merkle;
use ledgerlake_lakehouse::events::{
    AttributionMethod, Event, EventKind, FeeCharged, InferenceAttributed, ModelRegistered, RewardRole, StakeAction, StakeChanged,
};
use ledgerlake_lakehouse::{Amount, Lake, LakeConfig};

use crate::job::{addr, commit};

fn day(d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, d, h, 0, 0).unwrap()
}

fn config() -> EpochConfig {
    EpochConfig {
        genesis: day(27, 0),
        length_s: 86_400,
        grace_s: 0,
        policy: Policy { treasury: addr(0xee), treasury_bps: 1000, builder_bps: 3000, stakers_bps: 1000, contributors_bps: 5000 },
    }
}

fn fee(id: &str, at: DateTime<Utc>, amount: u128) -> Event {
    FeeCharged {
        event_id: format!("{id}:fee").parse().unwrap(),
        event_time: at,
        inference_id: id.parse().unwrap(),
        model_id: "m".parse().unwrap(),
        payer: "key".into(),
        amount: Amount::new(amount).unwrap(),
    }
    .into()
}

fn attributed(id: &str, who: Option<u8>, weight: u64) -> Event {
    InferenceAttributed {
        event_id: format!("{id}:attr:{}", who.unwrap_or(0)).parse().unwrap(),
        event_time: day(28, 1),
        inference_id: id.parse().unwrap(),
        model_id: "m".parse().unwrap(),
        contribution_id: who.map(|w| format!("{w:064x}").parse().unwrap()),
        contributor: who.map(addr),
        datanet_id: who.map(|_| "facts".parse().unwrap()),
        method: AttributionMethod::Spans,
        raw_score: 1.0,
        weight,
        spans: vec![],
        basis: "test".into(),
    }
    .into()
}

fn stake(id: &str, who: u8, at: DateTime<Utc>, amount: u128) -> Event {
    StakeChanged {
        event_id: id.parse().unwrap(),
        event_time: at,
        staker: addr(who),
        model_id: "m".parse().unwrap(),
        action: StakeAction::Stake,
        amount: Amount::new(amount).unwrap(),
    }
    .into()
}

/// Stores events as the ingest writer would: one commit per kind.
async fn send(lake: &Lake, events: Vec<Event>) -> Result<(), ledgerlake_attribution::Error> {
    let mut by_kind: BTreeMap<EventKind, Vec<Event>> = BTreeMap::new();
    for e in events {
        by_kind.entry(e.kind()).or_default().push(e);
    }
    for (_, events) in by_kind {
        commit(lake, events).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_pays_every_role_exactly_and_recomputes_byte_for_byte_after_more_events() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(LakeConfig::parse(dir.path().join("lake").to_str().unwrap()).unwrap());
    commit(
        &lake,
        vec![
            ModelRegistered {
                event_id: "reg-m".parse().unwrap(),
                event_time: day(26, 0),
                model_id: "m".parse().unwrap(),
                builder: addr(9),
                base_model: "ledgerlake-base".into(),
                adapter_uri: "adapters/m".into(),
                datanets: vec![],
                price_per_1k_input: Amount::new(1).unwrap(),
                price_per_1k_output: Amount::new(1).unwrap(),
                training_run_id: None,
                contributions_sha256: None,
                hyperparameters: None,
                evaluation: None,
                signature: None,
            }
            .into(),
        ],
    )
    .await;
    // Staker 5 holds 300 all day; staker 6 holds 100 for the second half: 600 : 100.
    commit(&lake, vec![stake("s5", 5, day(26, 12), 300), stake("s6", 6, day(27, 12), 100)]).await;
    // An inference attributed 3:1 to contributors 1 and 2, one attributed to none, one with
    // no rows yet; and one before genesis (the first closed epoch takes every earlier fee).
    commit(
        &lake,
        vec![fee("i1", day(27, 3), 1_000_000), fee("i2", day(27, 4), 2_000_000), fee("i3", day(27, 5), 3_000_001), fee("i0", day(20, 0), 7)],
    )
    .await;
    commit(&lake, vec![attributed("i1", Some(1), 750_000_000), attributed("i1", Some(2), 250_000_000), attributed("i2", None, 0)]).await;

    let config = config();
    let now = day(28, 0);
    assert_eq!(epoch_job::next_to_close(&lake, &config, now).await.unwrap(), Some(0), "nothing closed: the last that may close");
    // Not yet: epoch 1 has not ended, and epoch 0 ends exactly now (grace 0) so it may close.
    let early = epoch_job::close(&lake, &config, 1, now, None, &LogAnchor, async |e| send(&lake, e).await).await.unwrap_err();
    assert!(early.to_string().contains("may close from"), "{early}");
    let closing = epoch_job::close(&lake, &config, 0, now, None, &LogAnchor, async |e| send(&lake, e).await).await.unwrap();
    let Closing::Closed(row, _) = closing else { panic!("closed before?") };
    assert_eq!(row.fees, Some(Amount::new(6_000_008).unwrap()));
    assert_eq!(row.fee_count, Some(4));

    let rewards = epoch_job::rewards(&lake, &row).await.unwrap();
    let amount = |who: u8, role: RewardRole| {
        rewards.iter().filter(|r| r.account == addr(who) && r.role == role).map(|r| r.amount.base_units()).sum::<u128>()
    };
    assert_eq!(rewards.iter().map(|r| r.amount.base_units()).sum::<u128>(), 6_000_008, "rewards sum to fees exactly");
    // Contributors: half of i1's 1,000,000, 3:1.
    assert_eq!(amount(1, RewardRole::Contributor), 375_000);
    assert_eq!(amount(2, RewardRole::Contributor), 125_000);
    // Builder: 30% of every fee: 1,800,002.4 -> 1,800,002 (the .4 loses to larger remainders).
    assert_eq!(amount(9, RewardRole::Builder), 1_800_002);
    // Stakers: 10% = 600,000.8 split 6:1 by stake-time.
    assert_eq!(amount(5, RewardRole::Staker) + amount(6, RewardRole::Staker), 600_001);
    // 514,286.4, 85,714.4 and the builder's .4 tie: the lowest (account, role) gets the unit.
    assert_eq!(amount(5, RewardRole::Staker), 514_287);
    // Treasury: 10%, plus the contributors' half of i2, i3 and i0.
    assert_eq!(amount(0xee, RewardRole::Treasury), 600_000 + 2_500_004 + 1);
    let builder = rewards.iter().find(|r| r.role == RewardRole::Builder).unwrap();
    assert_eq!(builder.breakdown.len(), 1);
    assert_eq!(builder.breakdown[0].model_id.as_str(), "m");

    // The tree of the rewards rows has the recorded root; every proof verifies.
    let tree = epoch_job::tree(&lake, 0).await.unwrap().unwrap();
    assert_eq!(Some(ledgerlake_lakehouse::Bytes32::from_bytes(tree.root())), row.merkle_root);
    for account in [1, 2, 5, 6, 9, 0xee] {
        let p = epoch_job::proof_in(&tree, 0, &addr(account)).unwrap();
        let proof: Vec<[u8; 32]> = p.proof.iter().map(|h| h.to_bytes()).collect();
        assert!(merkle::verify(&tree.root(), &addr(account), p.amount, &proof));
    }
    assert!(epoch_job::proof_in(&tree, 0, &addr(0x77)).is_none());

    // Anchored in the log, and the chain verifies.
    let entries = anchor::entries(&lake).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(row.anchor.as_deref(), Some(format!("log:{}", entries[0].entry_sha256).as_str()));
    assert!(anchor::verify_log(&entries).problems.is_empty());

    // More events: a late fee of epoch 0, a fee of epoch 1, another stake. Epoch 0
    // recomputes to the same bytes, and closing it again writes nothing.
    let before = epoch_job::compute(&lake, &row).await.unwrap();
    commit(&lake, vec![fee("late", day(27, 23), 10), fee("next", day(28, 2), 20)]).await;
    commit(&lake, vec![attributed("late", Some(1), 1_000_000_000)]).await;
    commit(&lake, vec![stake("s7", 7, day(27, 1), 5)]).await;
    let after = epoch_job::compute(&lake, &row).await.unwrap();
    assert_eq!(after.manifest, before.manifest, "a recomputed epoch is byte-identical");
    assert_eq!(after.root, before.root);
    assert_eq!(Some(&after.manifest_sha256), row.manifest_sha256.as_ref());
    let verified = epoch_job::verify(&lake, 0).await.unwrap();
    assert!(verified.problems.is_empty() && verified.rewards_match, "{verified:?}");
    let again = epoch_job::close(&lake, &config, 0, day(30, 0), None, &LogAnchor, async |e| send(&lake, e).await).await.unwrap();
    assert!(matches!(again, Closing::AlreadyClosed(_)));

    // Epochs close in order, and the late fee goes to epoch 1.
    assert_eq!(epoch_job::next_to_close(&lake, &config, day(28, 23)).await.unwrap(), None, "epoch 1 has not ended");
    assert_eq!(epoch_job::next_to_close(&lake, &config, day(30, 0)).await.unwrap(), Some(1), "the next, not the last");
    let skip = epoch_job::close(&lake, &config, 2, day(30, 0), None, &LogAnchor, async |e| send(&lake, e).await).await.unwrap_err();
    assert!(skip.to_string().contains("the next to close is 1"), "{skip}");
    let Closing::Closed(one, _) = epoch_job::close(&lake, &config, 1, day(30, 0), None, &LogAnchor, async |e| send(&lake, e).await).await.unwrap()
    else {
        panic!("closed before?")
    };
    assert_eq!((one.fee_count, one.fees), (Some(2), Some(Amount::new(30).unwrap())));
    assert_eq!(one.previous_fee_version, Some(row.fee_version));
    let late_paid = epoch_job::rewards(&lake, &one).await.unwrap();
    assert_eq!(late_paid.iter().filter(|r| r.account == addr(1)).map(|r| r.amount.base_units()).sum::<u128>(), 5);
    let entries = anchor::entries(&lake).await.unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1].previous_sha256, entries[0].entry_sha256);
    assert!(anchor::verify_log(&entries).problems.is_empty());

    // A tampered reward is found by verify.
    commit(
        &lake,
        vec![
            ledgerlake_lakehouse::events::RewardEarned {
                event_id: "forged".parse().unwrap(),
                event_time: day(27, 0),
                epoch: 0,
                account: addr(0x66),
                role: RewardRole::Contributor,
                amount: Amount::new(1).unwrap(),
                breakdown: vec![],
            }
            .into(),
        ],
    )
    .await;
    let verified = epoch_job::verify(&lake, 0).await.unwrap();
    assert!(!verified.rewards_match && !verified.problems.is_empty(), "{verified:?}");
    assert!(epoch_job::tree(&lake, 0).await.is_err(), "the forged row changes the tree: refused");
}

/// Fees whose sum is past what an amount holds are refused with a clear error, and the
/// epoch records nothing (not even its pin), so nothing is left half-closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_whose_fees_overflow_an_amount_is_refused_and_pins_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(LakeConfig::parse(dir.path().join("lake").to_str().unwrap()).unwrap());
    let max = Amount::MAX.base_units();
    commit(&lake, vec![fee("a", day(27, 1), max), fee("b", day(27, 2), max)]).await;
    let e = epoch_job::close(&lake, &config(), 0, day(28, 0), None, &LogAnchor, async |e| send(&lake, e).await).await.unwrap_err();
    assert!(e.is_caller() && e.to_string().contains("10^38 - 1"), "{e}");
    assert!(epoch_job::recorded(&lake).await.unwrap().is_empty());
    assert!(anchor::entries(&lake).await.unwrap().is_empty());
}

fn void(id: &str, target: &str) -> Event {
    ledgerlake_lakehouse::events::EventVoided {
        event_id: id.parse().unwrap(),
        event_time: day(28, 0),
        voided_event_id: target.parse().unwrap(),
        voided_kind: "fee.charged".into(),
        reason: "a forged fee of 10^38 - 1".into(),
        voided_by: "key_admin".into(),
    }
    .into()
}

/// One bad input never blocks the epochs after it: an admin voids a forged fee and the
/// epoch closes without it (and recomputes the same, with the void pinned); an epoch that
/// still cannot be split is closed empty by decision, recorded, and the next one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voided_inputs_do_not_count_and_an_epoch_closed_empty_unblocks_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(LakeConfig::parse(dir.path().join("lake").to_str().unwrap()).unwrap());
    let max = Amount::MAX.base_units();
    let config = config();
    // Epoch 0: two fees that overflow together, and an honest one.
    commit(&lake, vec![fee("a", day(27, 1), max - 5000), fee("b", day(27, 2), max), fee("ok", day(27, 3), 1000)]).await;
    let e = epoch_job::close(&lake, &config, 0, day(28, 0), None, &LogAnchor, async |e| send(&lake, e).await).await.unwrap_err();
    assert!(e.to_string().contains("10^38 - 1"), "{e}");
    commit(&lake, vec![void("v-b", "b:fee")]).await;
    let Closing::Closed(zero, _) = epoch_job::close(&lake, &config, 0, day(28, 0), None, &LogAnchor, async |e| send(&lake, e).await).await.unwrap()
    else {
        panic!("closed before?")
    };
    assert_eq!(zero.fees, Some(Amount::new(max - 4000).unwrap()), "the voided fee is not counted");
    assert_eq!(zero.fee_count, Some(2));
    assert!(zero.void_version.is_some());
    // A void after the close changes nothing of it: the recompute reads the pinned voids.
    commit(&lake, vec![void("v-a", "a:fee")]).await;
    let verified = epoch_job::verify(&lake, 0).await.unwrap();
    assert!(verified.problems.is_empty() && verified.rewards_match, "{verified:?}");

    // Epoch 1: fees that overflow and nobody voids; it cannot close...
    commit(&lake, vec![fee("c", day(28, 1), max), fee("d", day(28, 2), max)]).await;
    let e = epoch_job::close(&lake, &config, 1, day(29, 0), None, &LogAnchor, async |e| send(&lake, e).await).await.unwrap_err();
    assert!(e.to_string().contains("10^38 - 1"), "{e}");
    // ...until an admin closes it empty, which is recorded and recomputes the same.
    let reason = Some("fees c and d overflow; incident 7".to_owned());
    let Closing::Closed(one, _) = epoch_job::close(&lake, &config, 1, day(29, 0), reason.clone(), &LogAnchor, async |e| send(&lake, e).await).await.unwrap()
    else {
        panic!("closed before?")
    };
    assert_eq!((one.fees, one.fee_count, one.accounts, one.empty_reason.clone()), (Some(Amount::ZERO), Some(0), Some(0), reason.clone()));
    assert!(epoch_job::rewards(&lake, &one).await.unwrap().is_empty());
    let computed = epoch_job::compute(&lake, &one).await.unwrap();
    assert!(String::from_utf8(computed.manifest).unwrap().starts_with(r#"{"empty_reason":"fees c and d overflow; incident 7","epoch":1,"#));
    assert!(epoch_job::verify(&lake, 1).await.unwrap().problems.is_empty());
    // Epoch 2 closes as usual; the empty epoch's fees are not its late fees.
    commit(&lake, vec![fee("e", day(29, 1), 40)]).await;
    let Closing::Closed(two, _) = epoch_job::close(&lake, &config, 2, day(30, 0), None, &LogAnchor, async |e| send(&lake, e).await).await.unwrap()
    else {
        panic!("closed before?")
    };
    assert_eq!((two.fees, two.fee_count), (Some(Amount::new(40).unwrap()), Some(1)));
    // An epoch pinned to close with its fees cannot be turned empty.
    assert!(epoch_job::close(&lake, &config, 2, day(30, 0), reason, &LogAnchor, async |e| send(&lake, e).await).await.is_ok_and(|c| matches!(c, Closing::AlreadyClosed(_))));
}

#[test]
fn the_last_closable_epoch_is_the_one_before_the_epoch_of_now_minus_the_grace() {
    let mut c = config();
    assert_eq!(c.last_closable(day(27, 23)), None);
    assert_eq!(c.last_closable(day(28, 0)), Some(0));
    assert_eq!(c.last_closable(day(29, 1)), Some(1));
    c.grace_s = 3_600;
    assert_eq!(c.last_closable(day(28, 0)), None);
    assert_eq!(c.last_closable(day(28, 1)), Some(0));
    assert_eq!(c.last_closable(day(20, 0)), None, "before genesis");
}
