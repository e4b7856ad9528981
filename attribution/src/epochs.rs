//! The rules of a reward epoch, with no I/O: how an epoch's fees are split among the
//! treasury, the model builders, the stakers and the contributors, exactly, in integer base
//! units. `epoch_job` reads the inputs from the lake at the epoch's pinned versions and
//! records the result. Rules: `docs/epochs.md` (an independent re-implementation follows
//! that document alone, so the two must say the same).
//!
//! Every share is first computed exactly in *sub-units* (1 base unit = [`SUB_UNITS`] =
//! 10^13 sub-units: basis points times the attribution weight scale), and rounded to base
//! units once, at the end, by [`apportion`]: largest remainder, ties to the lower key. So an
//! epoch's rewards sum to exactly its fees.

use std::collections::HashMap;

use alloy_primitives::{U256, U512};
use ledgerlake_lakehouse::events::{RewardRole, WEIGHT_SCALE};
use ledgerlake_lakehouse::{Address, Amount};

use crate::Error;

/// Basis points in the whole.
pub const BPS: u32 = 10_000;
/// Sub-units in one base unit: [`BPS`] × [`WEIGHT_SCALE`].
pub const SUB_UNITS: u64 = BPS as u64 * WEIGHT_SCALE;

/// The split policy: where what has no recipient goes, and each role's share of a fee.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    pub treasury: Address,
    pub treasury_bps: u32,
    pub builder_bps: u32,
    pub stakers_bps: u32,
    pub contributors_bps: u32,
}

impl Policy {
    /// The four shares must sum to exactly [`BPS`].
    pub fn check(&self) -> Result<(), Error> {
        let sum: u64 = [self.treasury_bps, self.builder_bps, self.stakers_bps, self.contributors_bps].iter().map(|&b| u64::from(b)).sum();
        if sum != u64::from(BPS) {
            return Err(Error::Invalid(format!(
                "the policy's shares (treasury {}, builder {}, stakers {}, contributors {}) sum to {sum} basis points, not {BPS}",
                self.treasury_bps, self.builder_bps, self.stakers_bps, self.contributors_bps
            )));
        }
        Ok(())
    }
}

/// One fee of the epoch: its model (an index into [`Inputs::models`]), its amount, and the
/// attribution rows of its inference (a range of [`Inputs::attributions`]).
#[derive(Clone, Debug)]
pub struct Fee {
    pub model: u32,
    pub amount: u128,
    pub rows: std::ops::Range<u32>,
}

/// One attribution row with a contributor and a positive weight.
#[derive(Clone, Debug)]
pub struct Row {
    pub contributor: Address,
    /// An index into [`Inputs::datanets`].
    pub datanet: u32,
    pub weight: u64,
}

/// Everything an epoch's split reads, already selected by the epoch's rules.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Model ids, sorted (indices order like the ids).
    pub models: Vec<String>,
    /// Datanet ids, sorted.
    pub datanets: Vec<String>,
    pub fees: Vec<Fee>,
    pub attributions: Vec<Row>,
    /// The builder of each model (by index), if it was registered.
    pub builders: Vec<Option<Address>>,
    /// Each model's stakers with their stake-time ([`stake_time`]), by index.
    pub stakes: Vec<Vec<(Address, U256)>>,
}

/// What one account earned in one role, with the parts by model and datanet (indices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reward {
    pub account: Address,
    pub role: RewardRole,
    pub amount: Amount,
    /// (model, datanet or none, amount), summing to `amount`, sorted by model then datanet.
    pub breakdown: Vec<(u32, Option<u32>, Amount)>,
}

/// The split of an epoch: every reward with a positive amount, sorted by account then role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub fees: Amount,
    pub fee_count: u64,
    pub rewards: Vec<Reward>,
}

impl Split {
    /// The total paid in one role.
    pub fn total(&self, role: RewardRole) -> u128 {
        self.rewards.iter().filter(|r| r.role == role).map(|r| r.amount.base_units()).sum()
    }

    /// Each account's total over its roles, sorted by account (the Merkle tree's values).
    pub fn by_account(&self) -> Vec<(Address, Amount)> {
        let mut out: Vec<(Address, u128)> = Vec::new();
        for r in &self.rewards {
            match out.last_mut() {
                Some((a, sum)) if *a == r.account => *sum += r.amount.base_units(),
                _ => out.push((r.account, r.amount.base_units())),
            }
        }
        // Each sum is at most the epoch's fees, an amount.
        out.into_iter().map(|(a, s)| (a, Amount::new(s).unwrap_or(Amount::MAX))).collect()
    }
}

/// Splits `amount` by `weights` with the largest-remainder rule: share `i` is
/// `floor(amount × w_i / W)` (`W` the sum of the weights), and the units left over go one
/// each to the largest remainders `amount × w_i mod W`, ties to the lower index (callers
/// order the weights by key). All zero weights give all zeros. Exact: the shares sum to
/// `amount` whenever a weight is positive.
pub fn apportion(amount: U256, weights: &[U256]) -> Vec<U256> {
    let total: U512 = weights.iter().fold(U512::ZERO, |s, w| s + wide(*w));
    if total.is_zero() {
        return vec![U256::ZERO; weights.len()];
    }
    let amount_wide = wide(amount);
    let mut shares = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    let mut given = U512::ZERO;
    for (i, w) in weights.iter().enumerate() {
        let product = amount_wide * wide(*w);
        let (share, rem) = product.div_rem(total);
        given += share;
        shares.push(narrow(share));
        remainders.push((rem, i));
    }
    // Less than one unit per weight is left: `Σ floor(x_i) > Σ x_i - n`.
    let left = narrow(amount_wide - given).to::<u64>() as usize;
    if left > 0 {
        remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, i) in remainders.iter().take(left) {
            shares[i] += U256::from(1u8);
        }
    }
    shares
}

fn wide(x: U256) -> U512 {
    U512::from_limbs_slice(x.as_limbs())
}

/// A share of a product that was divided back below 2^256 (callers' products are of a
/// 256-bit amount and a weight at most the total).
fn narrow(x: U512) -> U256 {
    U256::from_limbs_slice(&x.as_limbs()[..4])
}

/// One `stake.changed` of a model, as the split reads it.
#[derive(Clone, Debug)]
pub struct StakeEvent {
    /// Event time in microseconds since 1970.
    pub time_us: i64,
    pub event_id: String,
    pub staker: Address,
    /// Stake (`true`) or unstake.
    pub stake: bool,
    pub amount: u128,
}

/// Each staker's stake × time on one model over the window `[start_us, end_us)`: the
/// integral of its balance, in base units × microseconds. Events apply in order of
/// (event time, event id), each from its own time on; an unstake takes at most the
/// balance. Only stakers with a positive stake-time are returned, sorted by address.
pub fn stake_time(events: &mut [StakeEvent], start_us: i64, end_us: i64) -> Vec<(Address, U256)> {
    events.sort_by(|a, b| a.time_us.cmp(&b.time_us).then_with(|| a.event_id.cmp(&b.event_id)));
    let overlap = |from: i64, to: i64| -> U256 {
        let (a, b) = (from.max(start_us), to.min(end_us));
        if b > a { U256::from((b - a) as u64) } else { U256::ZERO }
    };
    // staker -> (balance, since, stake-time so far)
    let mut state: HashMap<Address, (U256, i64, U256)> = HashMap::new();
    for e in events.iter() {
        if e.time_us >= end_us {
            break;
        }
        let (balance, since, total) = state.entry(e.staker).or_insert((U256::ZERO, e.time_us, U256::ZERO));
        *total += *balance * overlap(*since, e.time_us);
        let amount = U256::from(e.amount);
        *balance = if e.stake { *balance + amount } else { balance.saturating_sub(amount) };
        *since = e.time_us;
    }
    let mut out: Vec<(Address, U256)> = state
        .into_iter()
        .map(|(staker, (balance, since, total))| (staker, total + balance * overlap(since, end_us)))
        .filter(|(_, t)| !t.is_zero())
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// An entitlement being summed: sub-units by (model, datanet or `NONE`).
type Parts = HashMap<(u32, u32), U256>;
const NONE: u32 = u32::MAX;

/// Splits the epoch's fees (`docs/epochs.md`, "The split"):
///
/// 1. For each model, with `F` the sum of its fees: the treasury is owed `F × treasury_bps`,
///    the builder `F × builder_bps` and the model's stakers' pool `F × stakers_bps`, each
///    × [`WEIGHT_SCALE`] sub-units. A model with no registration owes its builder share to
///    the treasury.
/// 2. For each fee `a`, its contributors' part `a × contributors_bps × WEIGHT_SCALE` is
///    apportioned among its inference's (contributor, datanet) pairs by their summed
///    weights. A fee whose inference has no such row owes that part to the treasury.
/// 3. Each stakers' pool is apportioned among the model's stakers by stake-time; a model
///    with none owes its pool to the treasury.
/// 4. The fees' sum `T` is apportioned over every (account, role) by its sub-units,
///    ordered by account then role: the amounts. Each amount is apportioned over its
///    (model, datanet) parts for the breakdown.
pub fn split(policy: &Policy, inputs: &Inputs) -> Result<Split, Error> {
    policy.check()?;
    let scale = U256::from(WEIGHT_SCALE);
    let bps = |b: u32| U256::from(b) * scale;
    let mut owed: HashMap<(Address, RewardRole), Parts> = HashMap::new();
    let mut add = |account: Address, role: RewardRole, model: u32, datanet: u32, sub: U256| {
        if !sub.is_zero() {
            *owed.entry((account, role)).or_default().entry((model, datanet)).or_default() += sub;
        }
    };
    let mut by_model = vec![U256::ZERO; inputs.models.len()];
    let mut total = U256::ZERO;
    let contributors_bps = bps(policy.contributors_bps);
    for fee in &inputs.fees {
        let a = U256::from(fee.amount);
        total += a;
        let model = fee.model as usize;
        let sum = by_model.get_mut(model).ok_or_else(|| Error::Internal(format!("fee of model index {model} out of range")))?;
        *sum += a;
        let part = a * contributors_bps;
        let rows = inputs
            .attributions
            .get(fee.rows.start as usize..fee.rows.end as usize)
            .ok_or_else(|| Error::Internal("a fee's attribution rows are out of range".into()))?;
        // (contributor, datanet) -> summed weight, in key order.
        let mut pairs: Vec<((Address, u32), u64)> =
            rows.iter().filter(|r| r.weight > 0).map(|r| ((r.contributor, r.datanet), r.weight)).collect();
        if pairs.is_empty() {
            add(policy.treasury, RewardRole::Treasury, fee.model, NONE, part);
            continue;
        }
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|later, first| {
            let same = later.0 == first.0;
            if same {
                // Weights are at most 10^9 each: no u64 sum of rows overflows in practice.
                first.1 = first.1.saturating_add(later.1);
            }
            same
        });
        let weight_sum: u128 = pairs.iter().map(|(_, w)| u128::from(*w)).sum();
        if weight_sum == u128::from(WEIGHT_SCALE) {
            // The job's rows sum to the whole: every share is exact.
            for ((contributor, datanet), w) in &pairs {
                add(*contributor, RewardRole::Contributor, fee.model, *datanet, a * U256::from(policy.contributors_bps) * U256::from(*w));
            }
        } else {
            let weights: Vec<U256> = pairs.iter().map(|(_, w)| U256::from(*w)).collect();
            for (((contributor, datanet), _), share) in pairs.iter().zip(apportion(part, &weights)) {
                add(*contributor, RewardRole::Contributor, fee.model, *datanet, share);
            }
        }
    }
    if total > U256::from(Amount::MAX.base_units()) {
        return Err(Error::Invalid(format!(
            "the epoch's fees sum to {total} base units, more than an amount holds (10^38 - 1)"
        )));
    }
    for (model, f) in by_model.iter().enumerate() {
        if f.is_zero() {
            continue;
        }
        let m = model as u32;
        add(policy.treasury, RewardRole::Treasury, m, NONE, *f * bps(policy.treasury_bps));
        let builder = *f * bps(policy.builder_bps);
        match inputs.builders.get(model).copied().flatten() {
            Some(b) => add(b, RewardRole::Builder, m, NONE, builder),
            None => add(policy.treasury, RewardRole::Treasury, m, NONE, builder),
        }
        let pool = *f * bps(policy.stakers_bps);
        let stakers = inputs.stakes.get(model).map(Vec::as_slice).unwrap_or_default();
        if stakers.is_empty() {
            add(policy.treasury, RewardRole::Treasury, m, NONE, pool);
        } else {
            let weights: Vec<U256> = stakers.iter().map(|(_, t)| *t).collect();
            for ((staker, _), share) in stakers.iter().zip(apportion(pool, &weights)) {
                add(*staker, RewardRole::Staker, m, NONE, share);
            }
        }
    }
    // Round once: the fees' sum over every (account, role), by account then role.
    let mut entries: Vec<((Address, RewardRole), Parts)> = owed.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let subs: Vec<U256> = entries.iter().map(|(_, parts)| parts.values().fold(U256::ZERO, |s, v| s + *v)).collect();
    let owed_total = subs.iter().fold(U256::ZERO, |s, v| s + *v);
    if owed_total != total * U256::from(SUB_UNITS) {
        return Err(Error::Internal(format!("the shares owe {owed_total} sub-units for fees of {total} base units")));
    }
    let amounts = apportion(total, &subs);
    let mut rewards = Vec::with_capacity(entries.len());
    for (((account, role), parts), amount) in entries.into_iter().zip(amounts) {
        if amount.is_zero() {
            continue;
        }
        let mut parts: Vec<((u32, u32), U256)> = parts.into_iter().collect();
        parts.sort_by(|a, b| a.0.cmp(&b.0));
        let weights: Vec<U256> = parts.iter().map(|(_, s)| *s).collect();
        let breakdown = parts
            .iter()
            .zip(apportion(amount, &weights))
            .filter(|(_, share)| !share.is_zero())
            .map(|(((model, datanet), _), share)| Ok((*model, (*datanet != NONE).then_some(*datanet), base_units(share)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        rewards.push(Reward { account, role, amount: base_units(amount)?, breakdown });
    }
    Ok(Split { fees: base_units(total)?, fee_count: inputs.fees.len() as u64, rewards })
}

/// A share of the fees' sum (checked to be an amount) as an amount.
fn base_units(x: U256) -> Result<Amount, Error> {
    let units: u128 = x.try_into().map_err(|_| Error::Internal(format!("{x} is not an amount")))?;
    Amount::new(units).map_err(|e| Error::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn address(i: u8) -> Address {
        Address::from_bytes([i; 20])
    }

    fn policy() -> Policy {
        Policy { treasury: address(0xee), treasury_bps: 1000, builder_bps: 3000, stakers_bps: 1000, contributors_bps: 5000 }
    }

    #[test]
    fn apportion_gives_the_leftover_to_the_largest_remainders_ties_to_the_first() {
        let u = |v: u64| U256::from(v);
        let shares = apportion(u(10), &[u(1), u(1), u(1)]);
        assert_eq!(shares, vec![u(4), u(3), u(3)]);
        let shares = apportion(u(10), &[u(1), u(2), u(4)]);
        // 10/7, 20/7, 40/7 = 1.43, 2.86, 5.71: floors 1, 2, 5 and one unit to the .86.
        assert_eq!(shares, vec![u(1), u(3), u(6)]);
        assert_eq!(apportion(u(5), &[U256::ZERO, U256::ZERO]), vec![U256::ZERO, U256::ZERO]);
        let max = U256::MAX;
        assert_eq!(apportion(max, &[max, max]).iter().fold(U256::ZERO, |s, v| s + *v), max);
    }

    #[test]
    fn one_fee_splits_by_the_policy_and_the_weights() {
        let inputs = Inputs {
            models: vec!["m".into()],
            datanets: vec!["d".into()],
            fees: vec![Fee { model: 0, amount: 1_000_000, rows: 0..2 }],
            attributions: vec![
                Row { contributor: address(1), datanet: 0, weight: 750_000_000 },
                Row { contributor: address(2), datanet: 0, weight: 250_000_000 },
            ],
            builders: vec![Some(address(9))],
            stakes: vec![vec![(address(5), U256::from(3)), (address(6), U256::from(1))]],
        };
        let split = split(&policy(), &inputs).unwrap();
        let got: Vec<(u8, RewardRole, u128)> =
            split.rewards.iter().map(|r| (r.account.as_bytes()[0], r.role, r.amount.base_units())).collect();
        assert_eq!(
            got,
            vec![
                (1, RewardRole::Contributor, 375_000),
                (2, RewardRole::Contributor, 125_000),
                (5, RewardRole::Staker, 75_000),
                (6, RewardRole::Staker, 25_000),
                (9, RewardRole::Builder, 300_000),
                (0xee, RewardRole::Treasury, 100_000),
            ]
        );
        assert_eq!(split.fees.base_units(), 1_000_000);
    }

    #[test]
    fn what_has_no_recipient_goes_to_the_treasury() {
        let inputs = Inputs {
            models: vec!["m".into()],
            datanets: vec![],
            fees: vec![Fee { model: 0, amount: 999, rows: 0..0 }],
            attributions: vec![],
            builders: vec![None],
            stakes: vec![vec![]],
        };
        let split = split(&policy(), &inputs).unwrap();
        assert_eq!(split.rewards.len(), 1);
        assert_eq!((split.rewards[0].role, split.rewards[0].amount.base_units()), (RewardRole::Treasury, 999));
    }

    #[test]
    fn fees_beyond_an_amount_are_refused_not_wrapped() {
        let max = Amount::MAX.base_units();
        let inputs = Inputs {
            models: vec!["m".into()],
            fees: vec![Fee { model: 0, amount: max, rows: 0..0 }, Fee { model: 0, amount: 1, rows: 0..0 }],
            builders: vec![None],
            stakes: vec![vec![]],
            ..Inputs::default()
        };
        let e = split(&policy(), &inputs).unwrap_err();
        assert!(e.is_caller() && e.to_string().contains("10^38 - 1"), "{e}");
        let mut one = inputs.clone();
        one.fees.pop();
        assert_eq!(split(&policy(), &one).unwrap().fees, Amount::MAX);
    }

    #[test]
    fn stake_time_integrates_balances_over_the_window() {
        let ev = |t: i64, id: &str, who: u8, stake: bool, amount: u128| StakeEvent {
            time_us: t,
            event_id: id.into(),
            staker: address(who),
            stake,
            amount,
        };
        let mut events = vec![
            ev(-50, "a", 1, true, 10), // before the window: 10 from its start
            ev(40, "b", 1, false, 4),  // 6 from 40
            ev(50, "c", 2, true, 7),   // 7 from 50
            ev(80, "d", 2, false, 100), // at most the balance: 0 from 80
            ev(100, "e", 3, true, 1000), // at the end: nothing
        ];
        let got = stake_time(&mut events, 0, 100);
        assert_eq!(got, vec![(address(1), U256::from(10 * 40 + 6 * 60)), (address(2), U256::from(7 * 30))]);
    }

    fn inputs_strategy() -> impl Strategy<Value = (Policy, Inputs)> {
        let bps = (0u32..=10_000, 0u32..=10_000, 0u32..=10_000).prop_map(|(a, b, c)| {
            let mut v = [a, b, c];
            v.sort();
            [v[0], v[1] - v[0], v[2] - v[1], BPS - v[2]]
        });
        let fee = (0u32..3, prop_oneof![0u128..1_000_000_000_000_000_000, Just(0u128), 0u128..10], prop::collection::vec((0u8..6, 0u32..2, 0u64..=1_000_000_000), 0..4));
        (bps, prop::collection::vec(fee, 0..12), prop::collection::vec(prop::collection::vec((0u8..6, 0u64..1_000_000), 0..3), 3), prop::collection::vec(any::<bool>(), 3))
            .prop_map(|(bps, fees, stakes, registered)| {
                let policy = Policy { treasury: address(0xee), treasury_bps: bps[0], builder_bps: bps[1], stakers_bps: bps[2], contributors_bps: bps[3] };
                let mut inputs = Inputs {
                    models: vec!["a".into(), "b".into(), "c".into()],
                    datanets: vec!["x".into(), "y".into()],
                    builders: registered.iter().enumerate().map(|(i, r)| r.then(|| address(0x90 + i as u8))).collect(),
                    ..Inputs::default()
                };
                for (model, amount, rows) in fees {
                    let start = inputs.attributions.len() as u32;
                    for (who, datanet, weight) in rows {
                        inputs.attributions.push(Row { contributor: address(who), datanet, weight });
                    }
                    inputs.fees.push(Fee { model, amount, rows: start..inputs.attributions.len() as u32 });
                }
                inputs.stakes = stakes
                    .into_iter()
                    .map(|s| {
                        let mut s: Vec<(Address, U256)> = s.into_iter().map(|(who, t)| (address(0x50 + who), U256::from(t))).filter(|(_, t)| !t.is_zero()).collect();
                        s.sort_by(|a, b| a.0.cmp(&b.0));
                        s.dedup_by(|a, b| a.0 == b.0);
                        s
                    })
                    .collect();
                (policy, inputs)
            })
    }

    proptest! {
        /// For random fees, stakes and weights: the rewards sum to exactly the fees, every
        /// amount is positive, every breakdown sums to its amount, and the same inputs give
        /// the same rewards (in any order of the attribution rows of a fee).
        #[test]
        fn rewards_sum_exactly_to_fees_and_are_deterministic((policy, inputs) in inputs_strategy()) {
            let split = split(&policy, &inputs).unwrap();
            let fees: u128 = inputs.fees.iter().map(|f| f.amount).sum();
            prop_assert_eq!(split.fees.base_units(), fees);
            let paid: u128 = split.rewards.iter().map(|r| r.amount.base_units()).sum();
            prop_assert_eq!(paid, fees);
            for r in &split.rewards {
                prop_assert!(r.amount.base_units() > 0);
                prop_assert_eq!(r.breakdown.iter().map(|p| p.2.base_units()).sum::<u128>(), r.amount.base_units());
            }
            prop_assert!(split.rewards.windows(2).all(|w| (w[0].account, w[0].role) < (w[1].account, w[1].role)));
            // Each role gets its exact share to within one base unit per reward.
            let n = split.rewards.len() as u128;
            let exact = |bps: u32| fees * u128::from(bps) / 10_000;
            let stakers = split.total(RewardRole::Staker);
            prop_assert!(stakers <= exact(policy.stakers_bps) + n);
            let mut shuffled = inputs.clone();
            for f in &shuffled.fees {
                shuffled.attributions[f.rows.start as usize..f.rows.end as usize].reverse();
            }
            prop_assert_eq!(split, super::split(&policy, &shuffled).unwrap());
        }
    }
}
