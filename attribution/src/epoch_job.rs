//! Reward epochs on the lake: pinning an epoch to its input versions, reading what the
//! split needs at those versions (DataFusion), recording the rewards, anchoring the root.
//! The rules are `epochs.rs`' and `docs/epochs.md`'s; this module only reads and records.
//!
//! Closing epoch N (`close`), each step idempotent so a crash anywhere can be closed again:
//! 1. **pin**: an `epoch.closed` row of stage `pinned` with the window, the versions of
//!    `fee_charged`, `attributions`, `stake_changed` and `model_registered` read now, and
//!    the policy. Two closers racing pin once (one event id); both go on with the winner.
//! 2. **compute** from the pinned versions alone: the same rows every time.
//! 3. **record** the `reward.earned` rows (ids derived from epoch, account and role).
//! 4. **anchor** the root ([`Anchor`]), then the `closed` row with the anchor's reference.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use alloy_primitives::U256;
use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Decimal128Type, Int64Type, TimeUnit, TimestampMicrosecondType};
use chrono::{DateTime, Utc};
use ledgerlake_lakehouse::events::{EpochClosed, EpochStage, EventKind, RESERVED_ID_PREFIX, RewardEarned, RewardPart, RewardRole};
use ledgerlake_lakehouse::{Address, Amount, Bytes32, Event, Lake, Sha256Hex, snapshot};
use serde::Serialize;

use crate::anchor::{Anchor, AnchorRequest};
use crate::epochs::{self, Fee, Inputs, Policy, Row, Split, StakeEvent};
use crate::job::{lake_error, strings};
use crate::merkle::{EMPTY_ROOT, RewardTree};
use crate::Error;

/// How epochs are cut and paid (configuration).
#[derive(Clone, Debug, PartialEq)]
pub struct EpochConfig {
    /// The start of epoch 0.
    pub genesis: DateTime<Utc>,
    /// Each epoch's length in seconds (at least 1).
    pub length_s: u64,
    /// How long after its window ends an epoch may close, in seconds: the attribution job
    /// has that long to attribute the window's last inferences.
    pub grace_s: u64,
    pub policy: Policy,
}

impl EpochConfig {
    /// Epoch `n`'s window, `[genesis + n·length, genesis + (n+1)·length)`.
    pub fn window(&self, n: u64) -> Result<(DateTime<Utc>, DateTime<Utc>), Error> {
        if self.length_s == 0 {
            return Err(Error::Invalid("epoch_length_s must be at least 1".into()));
        }
        let at = |k: u64| -> Option<DateTime<Utc>> {
            let secs = i64::try_from(k.checked_mul(self.length_s)?).ok()?;
            self.genesis.checked_add_signed(chrono::TimeDelta::try_seconds(secs)?)
        };
        // RFC 3339 (and so JSON and the manifest) writes four-digit years.
        let last = chrono::NaiveDate::from_ymd_opt(10_000, 1, 1).unwrap_or_default().and_time(chrono::NaiveTime::MIN).and_utc();
        match (at(n), n.checked_add(1).and_then(at)) {
            (Some(start), Some(end)) if end <= last => Ok((start, end)),
            _ => Err(Error::Invalid(format!("epoch {n} is beyond the calendar"))),
        }
    }

    /// The epoch whose window holds `t` (none before genesis).
    pub fn epoch_at(&self, t: DateTime<Utc>) -> Option<u64> {
        let secs = (t - self.genesis).num_seconds();
        (secs >= 0 && self.length_s > 0).then(|| secs as u64 / self.length_s)
    }

    /// The last epoch that may close at `now`: its window plus the grace has passed.
    pub fn last_closable(&self, now: DateTime<Utc>) -> Option<u64> {
        let grace = chrono::TimeDelta::try_seconds(i64::try_from(self.grace_s).ok()?)?;
        // The epoch holding `now - grace` is still open; the one before it may close.
        self.epoch_at(now.checked_sub_signed(grace)?)?.checked_sub(1)
    }
}

/// The epoch to close next at `now`, if any: one pinned but not closed (an interrupted
/// close), else the one after the last closed once it may close, else (nothing closed yet)
/// the last that may close.
pub async fn next_to_close(lake: &Lake, config: &EpochConfig, now: DateTime<Utc>) -> Result<Option<u64>, Error> {
    let epochs = recorded(lake).await?;
    let last = config.last_closable(now);
    Ok(match epochs.last_key_value() {
        Some((&n, r)) if r.closed.is_none() => Some(n),
        Some((&n, _)) => n.checked_add(1).filter(|next| last.is_some_and(|l| *next <= l)),
        None => last,
    })
}

/// What the `epochs` table holds of one epoch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recorded {
    pub pinned: Option<EpochClosed>,
    pub closed: Option<EpochClosed>,
}

impl Recorded {
    /// The latest stage's row.
    pub fn latest(&self) -> Option<&EpochClosed> {
        self.closed.as_ref().or(self.pinned.as_ref())
    }
}

/// Every epoch the table holds, by number.
pub async fn recorded(lake: &Lake) -> Result<BTreeMap<u64, Recorded>, Error> {
    let (_, events) = snapshot::read_events(lake, EventKind::EpochClosed, None, "true").await.map_err(lake_error)?;
    let mut out: BTreeMap<u64, Recorded> = BTreeMap::new();
    for e in events {
        if let Event::EpochClosed(e) = e {
            let slot = out.entry(e.epoch).or_default();
            match e.stage {
                EpochStage::Pinned => slot.pinned = Some(e),
                EpochStage::Closed => slot.closed = Some(e),
            }
        }
    }
    Ok(out)
}

/// Micro-second timestamp literal DataFusion compares with a `timestamp(us, UTC)` column.
fn ts(t: DateTime<Utc>) -> String {
    format!("arrow_cast({}, 'Timestamp(Microsecond, Some(\"UTC\"))')", t.timestamp_micros())
}

/// Reads everything the split needs at the pin's versions (`docs/epochs.md`, "What an
/// epoch reads").
pub async fn inputs(lake: &Lake, pin: &EpochClosed) -> Result<Inputs, Error> {
    // An epoch an admin closed empty pays no one: its recompute reads nothing either.
    if pin.empty_reason.is_some() {
        return Ok(Inputs::default());
    }
    let (start, end) = (ts(pin.window_start), ts(pin.window_end));
    // The epoch's fees: before its end, and either in its window or added after the
    // previous epoch's pin (late fees).
    let late = match pin.previous_fee_version {
        Some(_) => format!("OR event_id NOT IN (SELECT event_id FROM prev WHERE event_time < {start})"),
        None => "OR TRUE".to_owned(),
    };
    // Voided fees and attribution rows do not count (`docs/epochs.md`).
    let (cur, attr) = (counted(pin, "cur", "voids"), counted(pin, "attr", "voids"));
    let sql = format!(
        "WITH fees AS (SELECT event_id, inference_id, model_id, amount FROM {cur} AS c \
           WHERE event_time < {end} AND (event_time >= {start} {late})) \
         SELECT f.event_id, f.model_id, f.amount, a.contributor, a.datanet_id, a.weight \
           FROM fees f LEFT JOIN (SELECT inference_id, contributor, datanet_id, weight FROM {attr} AS at \
             WHERE contributor IS NOT NULL AND weight > 0) a ON a.inference_id = f.inference_id"
    );
    let tables = [
        ("cur", EventKind::FeeCharged, Some(pin.fee_version)),
        ("prev", EventKind::FeeCharged, Some(pin.previous_fee_version.unwrap_or(0))),
        ("attr", EventKind::InferenceAttributed, Some(pin.attribution_version)),
        ("voids", EventKind::EventVoided, Some(pin.void_version.unwrap_or(0))),
    ];
    let (_, batches) = snapshot::query_tables(lake, &tables, &sql).await.map_err(lake_error)?;

    // Group by fee (event id), interning model and datanet ids.
    struct Pending {
        model: String,
        amount: u128,
        rows: Vec<(Address, String, u64)>,
    }
    let mut fees: HashMap<String, Pending> = HashMap::new();
    for batch in &batches {
        let ids = strings(batch.column(0))?;
        let models = strings(batch.column(1))?;
        let amounts = decimals(batch.column(2))?;
        let contributors = cast(batch.column(3), &DataType::Utf8).map_err(internal)?;
        let contributors = contributors.as_string::<i32>();
        let datanets = strings(batch.column(4))?;
        let weights = cast(batch.column(5), &DataType::Int64).map_err(internal)?;
        let weights = weights.as_primitive::<Int64Type>();
        for r in 0..batch.num_rows() {
            let fee = fees.entry(ids[r].clone()).or_insert_with(|| Pending { model: models[r].clone(), amount: amounts[r], rows: vec![] });
            if !contributors.is_null(r) {
                let contributor: Address =
                    contributors.value(r).parse().map_err(|e| Error::Internal(format!("stored contributor: {e}")))?;
                let weight = u64::try_from(weights.value(r)).map_err(|_| Error::Internal(format!("stored weight {} is negative", weights.value(r))))?;
                fee.rows.push((contributor, datanets[r].clone(), weight));
            }
        }
    }
    let models: BTreeSet<String> = fees.values().map(|f| f.model.clone()).collect();
    let datanets: BTreeSet<String> = fees.values().flat_map(|f| f.rows.iter().map(|r| r.1.clone())).collect();
    let models: Vec<String> = models.into_iter().collect();
    let datanets: Vec<String> = datanets.into_iter().collect();
    let model_index: HashMap<&str, u32> = models.iter().enumerate().map(|(i, m)| (m.as_str(), i as u32)).collect();
    let datanet_index: HashMap<&str, u32> = datanets.iter().enumerate().map(|(i, d)| (d.as_str(), i as u32)).collect();
    let mut out = Inputs { models: models.clone(), datanets: datanets.clone(), ..Inputs::default() };
    // Fees in event-id order: the split does not depend on it, but a fixed order keeps
    // the work the same every time.
    let mut ids: Vec<&String> = fees.keys().collect();
    ids.sort();
    for id in ids {
        let f = &fees[id];
        let start = out.attributions.len() as u32;
        for (contributor, datanet, weight) in &f.rows {
            out.attributions.push(Row { contributor: *contributor, datanet: datanet_index[datanet.as_str()], weight: *weight });
        }
        out.fees.push(Fee { model: model_index[f.model.as_str()], amount: f.amount, rows: start..out.attributions.len() as u32 });
    }
    out.builders = builders(lake, pin, &models).await?;
    out.stakes = stakes(lake, pin, &models).await?;
    Ok(out)
}

/// Each model's builder: that of the registration that counts at the pinned version
/// (`snapshot::latest_registrations`, the rule serving follows), voided ones left out.
async fn builders(lake: &Lake, pin: &EpochClosed, models: &[String]) -> Result<Vec<Option<Address>>, Error> {
    let sql = snapshot::latest_registrations(&format!("{} AS r", counted(pin, "t", "voids")), "model_id, builder");
    let tables = [
        ("t", EventKind::ModelRegistered, Some(pin.registration_version)),
        ("voids", EventKind::EventVoided, Some(pin.void_version.unwrap_or(0))),
    ];
    let (_, batches) = snapshot::query_tables(lake, &tables, &sql).await.map_err(lake_error)?;
    let mut by_model: HashMap<String, Address> = HashMap::new();
    for batch in &batches {
        for (m, b) in strings(batch.column(0))?.into_iter().zip(strings(batch.column(1))?) {
            by_model.insert(m, b.parse().map_err(|e| Error::Internal(format!("stored builder: {e}")))?);
        }
    }
    Ok(models.iter().map(|m| by_model.get(m).copied()).collect())
}

/// Each model's stakers and their stake-time over the window, from `stake_changed` at the
/// pinned version.
async fn stakes(lake: &Lake, pin: &EpochClosed, models: &[String]) -> Result<Vec<Vec<(Address, U256)>>, Error> {
    let sql = format!(
        "SELECT model_id, staker, action, amount, event_time, event_id FROM {} AS s WHERE event_time < {}",
        counted(pin, "t", "voids"),
        ts(pin.window_end)
    );
    let tables = [
        ("t", EventKind::StakeChanged, Some(pin.stake_version)),
        ("voids", EventKind::EventVoided, Some(pin.void_version.unwrap_or(0))),
    ];
    let (_, batches) = snapshot::query_tables(lake, &tables, &sql).await.map_err(lake_error)?;
    let index: HashMap<&str, usize> = models.iter().enumerate().map(|(i, m)| (m.as_str(), i)).collect();
    let mut events: Vec<Vec<StakeEvent>> = vec![Vec::new(); models.len()];
    for batch in &batches {
        let (model_ids, stakers, actions) = (strings(batch.column(0))?, strings(batch.column(1))?, strings(batch.column(2))?);
        let amounts = decimals(batch.column(3))?;
        let times = micros(batch.column(4))?;
        let ids = strings(batch.column(5))?;
        for r in 0..batch.num_rows() {
            let Some(&m) = index.get(model_ids[r].as_str()) else { continue };
            events[m].push(StakeEvent {
                time_us: times[r],
                event_id: ids[r].clone(),
                staker: stakers[r].parse().map_err(|e| Error::Internal(format!("stored staker: {e}")))?,
                stake: actions[r] == "stake",
                amount: amounts[r],
            });
        }
    }
    let (start, end) = (pin.window_start.timestamp_micros(), pin.window_end.timestamp_micros());
    Ok(events.iter_mut().map(|e| epochs::stake_time(e, start, end)).collect())
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

/// A `decimal(38,0)` column as base units (stored amounts are never negative).
fn decimals(column: &dyn Array) -> Result<Vec<u128>, Error> {
    let column = cast(column, &DataType::Decimal128(38, 0)).map_err(internal)?;
    let column = column.as_primitive::<Decimal128Type>();
    column.values().iter().map(|&v| u128::try_from(v).map_err(|_| Error::Internal(format!("stored amount {v} is negative")))).collect()
}

/// A timestamp column as microseconds since 1970.
fn micros(column: &dyn Array) -> Result<Vec<i64>, Error> {
    let column = cast(column, &DataType::Timestamp(TimeUnit::Microsecond, None)).map_err(internal)?;
    Ok(column.as_primitive::<TimestampMicrosecondType>().values().to_vec())
}

/// An epoch computed from its pin: the split, the Merkle tree (none when no one is paid),
/// and the manifest.
#[derive(Clone, Debug)]
pub struct Computed {
    pub pin: EpochClosed,
    pub models: Vec<String>,
    pub datanets: Vec<String>,
    pub split: Split,
    pub tree: Option<RewardTree>,
    pub root: Bytes32,
    /// The canonical JSON manifest (`docs/epochs.md`), and its sha256.
    pub manifest: Vec<u8>,
    pub manifest_sha256: Sha256Hex,
    /// How long the split, the tree and the manifest took.
    pub took: Vec<Timing>,
}

/// Computes an epoch from its pin alone.
pub async fn compute(lake: &Lake, pin: &EpochClosed) -> Result<Computed, Error> {
    let inputs = inputs(lake, pin).await?;
    computed(pin, &inputs)
}

/// `table` at its pinned version without what was voided at the pin's `void_version`
/// (`voids`), as a `FROM` subquery; the table itself for a pin from before voiding.
fn counted(pin: &EpochClosed, table: &str, voids: &str) -> String {
    match pin.void_version {
        Some(_) => snapshot::unvoided(table, voids),
        None => table.to_owned(),
    }
}

/// The epoch of `pin` from its inputs.
pub fn computed(pin: &EpochClosed, inputs: &Inputs) -> Result<Computed, Error> {
    let mut clock = Clock::default();
    let policy = policy_of(pin);
    let split = epochs::split(&policy, inputs)?;
    clock.lap("split");
    let accounts = split.by_account();
    let tree = if accounts.is_empty() { None } else { Some(RewardTree::new(accounts)?) };
    let root = Bytes32::from_bytes(tree.as_ref().map_or(EMPTY_ROOT, |t| t.root()));
    clock.lap("merkle tree");
    let manifest = manifest(pin, &split, &root)?;
    let manifest_sha256 = Sha256Hex::digest(&manifest);
    clock.lap("manifest");
    Ok(Computed {
        pin: pin.clone(),
        models: inputs.models.clone(),
        datanets: inputs.datanets.clone(),
        split,
        tree,
        root,
        manifest,
        manifest_sha256,
        took: clock.laps,
    })
}

/// How long one step of closing took.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timing {
    pub step: &'static str,
    pub seconds: f64,
}

/// Times consecutive steps.
#[derive(Debug)]
struct Clock {
    since: std::time::Instant,
    laps: Vec<Timing>,
}

impl Default for Clock {
    fn default() -> Self {
        Clock { since: std::time::Instant::now(), laps: Vec::new() }
    }
}

impl Clock {
    fn lap(&mut self, step: &'static str) {
        let now = std::time::Instant::now();
        self.laps.push(Timing { step, seconds: (now - self.since).as_secs_f64() });
        self.since = now;
    }
}

/// The policy a pin recorded.
pub fn policy_of(pin: &EpochClosed) -> Policy {
    Policy {
        treasury: pin.treasury,
        treasury_bps: pin.treasury_bps,
        builder_bps: pin.builder_bps,
        stakers_bps: pin.stakers_bps,
        contributors_bps: pin.contributors_bps,
    }
}

/// Times in the manifest: UTC with microseconds, `2026-11-26T00:00:00.000000Z`.
fn manifest_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// The lines the manifest's `rewards_sha256` hashes: `<account>,<role>,<amount>\n` per
/// reward, account in lowercase hex, sorted by account then role name.
pub fn rewards_listing(split: &Split) -> String {
    let mut lines: Vec<String> =
        split.rewards.iter().map(|r| format!("{},{},{}\n", lower(&r.account), r.role.name(), r.amount)).collect();
    lines.sort();
    lines.concat()
}

fn lower(a: &Address) -> String {
    format!("0x{}", hex::encode(a.as_bytes()))
}

/// The manifest: canonical JSON (keys sorted, no spaces, amounts as decimal strings), so
/// anyone can rebuild it byte for byte. Field order here is alphabetical on purpose.
pub fn manifest(pin: &EpochClosed, split: &Split, root: &Bytes32) -> Result<Vec<u8>, Error> {
    #[derive(Serialize)]
    struct Manifest {
        #[serde(skip_serializing_if = "Option::is_none")]
        empty_reason: Option<String>,
        epoch: u64,
        format: &'static str,
        inputs: Inputs,
        merkle_root: String,
        policy: PolicyOut,
        rewards_sha256: String,
        totals: Totals,
        window: Window,
    }
    #[derive(Serialize)]
    struct Inputs {
        attributions: u64,
        fee_charged: u64,
        fee_charged_previous: Option<u64>,
        model_registered: u64,
        stake_changed: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        voided_events: Option<u64>,
    }
    #[derive(Serialize)]
    struct PolicyOut {
        builder_bps: u32,
        contributors_bps: u32,
        stakers_bps: u32,
        treasury: String,
        treasury_bps: u32,
    }
    #[derive(Serialize)]
    struct Totals {
        accounts: u64,
        builder: String,
        contributor: String,
        fee_count: u64,
        fees: String,
        staker: String,
        treasury: String,
    }
    #[derive(Serialize)]
    struct Window {
        end: String,
        start: String,
    }
    let m = Manifest {
        empty_reason: pin.empty_reason.clone(),
        epoch: pin.epoch,
        format: "ledgerlake-epoch-v1",
        inputs: Inputs {
            attributions: pin.attribution_version,
            fee_charged: pin.fee_version,
            fee_charged_previous: pin.previous_fee_version,
            model_registered: pin.registration_version,
            stake_changed: pin.stake_version,
            voided_events: pin.void_version,
        },
        merkle_root: root.to_string(),
        policy: PolicyOut {
            builder_bps: pin.builder_bps,
            contributors_bps: pin.contributors_bps,
            stakers_bps: pin.stakers_bps,
            treasury: lower(&pin.treasury),
            treasury_bps: pin.treasury_bps,
        },
        rewards_sha256: Sha256Hex::digest(rewards_listing(split).as_bytes()).to_string(),
        totals: Totals {
            accounts: split.by_account().len() as u64,
            builder: split.total(RewardRole::Builder).to_string(),
            contributor: split.total(RewardRole::Contributor).to_string(),
            fee_count: split.fee_count,
            fees: split.fees.to_string(),
            staker: split.total(RewardRole::Staker).to_string(),
            treasury: split.total(RewardRole::Treasury).to_string(),
        },
        window: Window { end: manifest_time(pin.window_end), start: manifest_time(pin.window_start) },
    };
    serde_json::to_vec(&m).map_err(internal)
}

fn event_id(text: String) -> Result<ledgerlake_lakehouse::EventId, Error> {
    text.parse().map_err(|e| Error::Internal(format!("event id {text}: {e}")))
}

/// The `reward.earned` rows of a computed epoch.
pub fn reward_events(c: &Computed) -> Result<Vec<Event>, Error> {
    let mut out = Vec::with_capacity(c.split.rewards.len());
    for r in &c.split.rewards {
        let breakdown = r
            .breakdown
            .iter()
            .map(|(m, d, amount)| {
                Ok(RewardPart {
                    model_id: c.models[*m as usize].parse().map_err(|e| Error::Internal(format!("stored model id: {e}")))?,
                    datanet_id: match d {
                        Some(d) => Some(c.datanets[*d as usize].parse().map_err(|e| Error::Internal(format!("stored datanet id: {e}")))?),
                        None => None,
                    },
                    amount: *amount,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        out.push(Event::from(RewardEarned {
            event_id: event_id(format!("{RESERVED_ID_PREFIX}reward:{}:{}:{}", c.pin.epoch, lower(&r.account), r.role.name()))?,
            event_time: c.pin.window_start,
            epoch: c.pin.epoch,
            account: r.account,
            role: r.role,
            amount: r.amount,
            breakdown,
        }));
    }
    Ok(out)
}

/// Rows sent in one atomic write when recording rewards: a few writes for 100k accounts
/// (the ingest writer commits a flush at 200k rows or after 100 ms), well under the
/// writer's queue (`max_queued_rows`, 1M by default).
pub const SEND_ROWS: usize = 20_000;

/// What closing did.
#[derive(Clone, Debug, PartialEq)]
pub enum Closing {
    /// The epoch was closed before; nothing was written.
    AlreadyClosed(EpochClosed),
    /// Closed now, and how long each step took.
    Closed(EpochClosed, Vec<Timing>),
}

impl Closing {
    pub fn row(&self) -> &EpochClosed {
        match self {
            Closing::AlreadyClosed(r) | Closing::Closed(r, _) => r,
        }
    }
}

/// Closes epoch `n` (see the module's steps), or answers its `closed` row if it is closed.
/// Epochs close in order: the first closed may be any epoch whose window has ended (it
/// takes every earlier fee too), each later one the next number. `send` stores events
/// atomically (through the ingest writer) and returns once they are durable.
///
/// With `empty` (an admin's decision, with the reason), the epoch closes paying no one: what
/// cannot be split (fees that overflow an amount) then no longer blocks every later epoch.
/// Its pin records the reason, so the recompute agrees. An epoch already pinned to close
/// normally finishes as it was pinned.
pub async fn close(
    lake: &Lake,
    config: &EpochConfig,
    n: u64,
    now: DateTime<Utc>,
    empty: Option<String>,
    anchor: &impl Anchor,
    send: impl AsyncFn(Vec<Event>) -> Result<(), Error>,
) -> Result<Closing, Error> {
    let mut clock = Clock::default();
    let mut epochs = recorded(lake).await?;
    if let Some(closed) = epochs.get(&n).and_then(|r| r.closed.clone()) {
        return Ok(Closing::AlreadyClosed(closed));
    }
    let pinned = epochs.get(&n).and_then(|r| r.pinned.clone());
    if let (Some(pin), Some(_)) = (&pinned, &empty)
        && pin.empty_reason.is_none()
    {
        return Err(Error::Invalid(format!("epoch {n} is pinned to close with its fees; close it without `empty`")));
    }
    let (pin, computed) = match pinned {
        Some(pin) => {
            clock.lap("read table versions");
            let computed = compute_timed(lake, &pin, &mut clock).await?;
            (pin, computed)
        }
        None => {
            let mut candidate = new_pin(lake, config, &epochs, n, now).await?;
            candidate.empty_reason = empty;
            clock.lap("read table versions");
            // Computed before the pin is recorded: an epoch that cannot be split (fees past
            // an amount) records nothing.
            let computed = compute_timed(lake, &candidate, &mut clock).await?;
            send(vec![candidate.clone().into()]).await?;
            // Another closer may have pinned first: go on with what the table holds.
            epochs = recorded(lake).await?;
            let pin = epochs
                .get(&n)
                .and_then(|r| r.pinned.clone())
                .ok_or_else(|| Error::Internal(format!("epoch {n}'s pin was sent but is not in the table")))?;
            clock.lap("record pin");
            if (EpochClosed { event_time: candidate.event_time, ..pin.clone() }) == candidate {
                (pin, computed)
            } else {
                let computed = compute_timed(lake, &pin, &mut clock).await?;
                (pin, computed)
            }
        }
    };
    let rewards = reward_events(&computed)?;
    for chunk in rewards.chunks(SEND_ROWS) {
        send(chunk.to_vec()).await?;
    }
    clock.lap("record rewards");
    let request =
        AnchorRequest { epoch: n, root: computed.root.clone(), manifest_sha256: computed.manifest_sha256.clone(), total: computed.split.fees };
    let anchored = anchor.anchor(lake, &request, now).await?;
    if !anchored.events.is_empty() {
        send(anchored.events).await?;
    }
    clock.lap("anchor");
    let closed = EpochClosed {
        event_id: event_id(format!("{RESERVED_ID_PREFIX}epoch:{n}:closed"))?,
        event_time: now,
        stage: EpochStage::Closed,
        fees: Some(computed.split.fees),
        fee_count: Some(computed.split.fee_count),
        accounts: Some(computed.tree.as_ref().map_or(0, |t| t.len() as u64)),
        merkle_root: Some(computed.root.clone()),
        manifest_sha256: Some(computed.manifest_sha256.clone()),
        anchor: Some(anchored.reference),
        ..pin
    };
    send(vec![closed.into()]).await?;
    let row = recorded(lake)
        .await?
        .remove(&n)
        .and_then(|r| r.closed)
        .ok_or_else(|| Error::Internal(format!("epoch {n}'s closed row was sent but is not in the table")))?;
    clock.lap("closed row");
    Ok(Closing::Closed(row, clock.laps))
}

/// [`compute`], with its steps on `clock`.
async fn compute_timed(lake: &Lake, pin: &EpochClosed, clock: &mut Clock) -> Result<Computed, Error> {
    let inputs = inputs(lake, pin).await?;
    clock.lap("read inputs (DataFusion)");
    let computed = computed(pin, &inputs)?;
    clock.laps.extend(computed.took.iter().cloned());
    clock.since = std::time::Instant::now();
    Ok(computed)
}

/// The pin of epoch `n` if it may close now.
async fn new_pin(lake: &Lake, config: &EpochConfig, epochs: &BTreeMap<u64, Recorded>, n: u64, now: DateTime<Utc>) -> Result<EpochClosed, Error> {
    config.policy.check()?;
    let (start, end) = config.window(n)?;
    let previous = match epochs.last_key_value() {
        None => None,
        Some((&last, r)) => {
            let Some(closed) = &r.closed else {
                return Err(Error::Invalid(format!("epoch {last} is pinned but not closed: close it first")));
            };
            if n <= last {
                return Err(Error::Invalid(format!("epoch {last} is closed already; epochs close in order, the next is {}", last + 1)));
            }
            if n != last + 1 {
                return Err(Error::Invalid(format!("epochs close in order: the next to close is {}, not {n}", last + 1)));
            }
            Some(closed.fee_version)
        }
    };
    let opens = i64::try_from(config.grace_s)
        .ok()
        .and_then(chrono::TimeDelta::try_seconds)
        .and_then(|grace| end.checked_add_signed(grace))
        .ok_or_else(|| Error::Invalid(format!("epoch_grace_s = {} is beyond the calendar", config.grace_s)))?;
    if now < opens {
        return Err(Error::Invalid(format!(
            "epoch {n} ({} to {}) may close from {} (its end plus epoch_grace_s = {})",
            start.to_rfc3339(),
            end.to_rfc3339(),
            opens.to_rfc3339(),
            config.grace_s
        )));
    }
    let version = async |kind: EventKind| -> Result<u64, Error> {
        Ok(lake.open(kind).await.map_err(lake_error)?.and_then(|t| t.version()).map_or(0, |v| v.max(0) as u64))
    };
    Ok(EpochClosed {
        event_id: event_id(format!("{RESERVED_ID_PREFIX}epoch:{n}:pinned"))?,
        event_time: now,
        epoch: n,
        stage: EpochStage::Pinned,
        window_start: start,
        window_end: end,
        fee_version: version(EventKind::FeeCharged).await?,
        attribution_version: version(EventKind::InferenceAttributed).await?,
        stake_version: version(EventKind::StakeChanged).await?,
        registration_version: version(EventKind::ModelRegistered).await?,
        void_version: Some(version(EventKind::EventVoided).await?),
        empty_reason: None,
        previous_fee_version: previous,
        treasury: config.policy.treasury,
        treasury_bps: config.policy.treasury_bps,
        builder_bps: config.policy.builder_bps,
        stakers_bps: config.policy.stakers_bps,
        contributors_bps: config.policy.contributors_bps,
        fees: None,
        fee_count: None,
        accounts: None,
        merkle_root: None,
        manifest_sha256: None,
        anchor: None,
    })
}

/// What recomputing a closed epoch found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Verification {
    pub epoch: u64,
    /// The recorded and recomputed roots and manifest hashes.
    pub recorded_root: Bytes32,
    pub computed_root: Bytes32,
    pub recorded_manifest_sha256: Sha256Hex,
    pub computed_manifest_sha256: Sha256Hex,
    /// Whether the `rewards` rows of the epoch are exactly the recomputed ones.
    pub rewards_match: bool,
    /// Every difference found (empty: verified).
    pub problems: Vec<String>,
}

/// Recomputes closed epoch `n` from its pin and compares it with what was recorded: root,
/// manifest hash, and every `rewards` row.
pub async fn verify(lake: &Lake, n: u64) -> Result<Verification, Error> {
    let epochs = recorded(lake).await?;
    let Some(closed) = epochs.get(&n).and_then(|r| r.closed.clone()) else {
        return Err(Error::Invalid(format!("epoch {n} is not closed")));
    };
    let computed = compute(lake, &closed).await?;
    let recorded_root = closed.merkle_root.clone().unwrap_or_else(|| Bytes32::from_bytes(EMPTY_ROOT));
    let recorded_manifest = closed.manifest_sha256.clone().ok_or_else(|| Error::Internal(format!("epoch {n}'s closed row has no manifest hash")))?;
    let mut problems = Vec::new();
    if recorded_root != computed.root {
        problems.push(format!("root: recorded {recorded_root}, recomputed {}", computed.root));
    }
    if recorded_manifest != computed.manifest_sha256 {
        problems.push(format!("manifest: recorded {recorded_manifest}, recomputed {}", computed.manifest_sha256));
    }
    let mut stored = paid(lake, &closed).await?;
    stored.sort();
    let want: Vec<(Address, RewardRole, Amount)> = computed.split.rewards.iter().map(|r| (r.account, r.role, r.amount)).collect();
    let rewards_match = stored == want;
    if !rewards_match {
        problems.push(format!("rewards: {} rows stored, {} recomputed, and they differ", stored.len(), want.len()));
    }
    Ok(Verification {
        epoch: n,
        recorded_root,
        computed_root: computed.root,
        recorded_manifest_sha256: recorded_manifest,
        computed_manifest_sha256: computed.manifest_sha256,
        rewards_match,
        problems,
    })
}

/// The `rewards` rows of the epoch of `row` (its rows are all in the partition of its
/// start's date).
pub async fn rewards(lake: &Lake, row: &EpochClosed) -> Result<Vec<RewardEarned>, Error> {
    let filter = format!("event_date = DATE '{}' AND epoch = {}", row.window_start.date_naive(), row.epoch);
    let (_, events) = snapshot::read_events(lake, EventKind::RewardEarned, None, &filter).await.map_err(lake_error)?;
    Ok(events.into_iter().filter_map(|e| if let Event::RewardEarned(r) = e { Some(r) } else { None }).collect())
}

/// The (account, role, amount) of every `rewards` row of the epoch of `row`: the columns
/// the tree needs, without the breakdowns.
async fn paid(lake: &Lake, row: &EpochClosed) -> Result<Vec<(Address, RewardRole, Amount)>, Error> {
    let sql = format!(
        "SELECT account, role, amount FROM t WHERE event_date = DATE '{}' AND epoch = {}",
        row.window_start.date_naive(),
        row.epoch
    );
    let (_, batches) = snapshot::query(lake, EventKind::RewardEarned, None, &sql).await.map_err(lake_error)?;
    let mut out = Vec::new();
    for batch in &batches {
        let (accounts, roles, amounts) = (strings(batch.column(0))?, strings(batch.column(1))?, decimals(batch.column(2))?);
        for ((account, role), amount) in accounts.iter().zip(&roles).zip(amounts) {
            let account: Address = account.parse().map_err(|e| Error::Internal(format!("stored account: {e}")))?;
            let role: RewardRole = serde_json::from_value(serde_json::Value::String(role.clone()))
                .map_err(|e| Error::Internal(format!("stored role {role:?}: {e}")))?;
            out.push((account, role, Amount::new(amount).map_err(|e| Error::Internal(e.to_string()))?));
        }
    }
    Ok(out)
}

/// The Merkle tree of closed epoch `n` from its `rewards` rows, checked against the
/// recorded root (`None`: the epoch paid no one).
pub async fn tree(lake: &Lake, n: u64) -> Result<Option<RewardTree>, Error> {
    let epochs = recorded(lake).await?;
    let Some(closed) = epochs.get(&n).and_then(|r| r.closed.clone()) else {
        return Err(Error::Invalid(format!("epoch {n} is not closed")));
    };
    let mut by_account: BTreeMap<Address, u128> = BTreeMap::new();
    for (account, _, amount) in paid(lake, &closed).await? {
        let sum = by_account.entry(account).or_default();
        *sum = sum.checked_add(amount.base_units()).ok_or_else(|| Error::Internal("an account's rewards overflow".into()))?;
    }
    let values = by_account
        .into_iter()
        .map(|(a, s)| Ok((a, Amount::new(s).map_err(|e| Error::Internal(e.to_string()))?)))
        .collect::<Result<Vec<_>, Error>>()?;
    let tree = if values.is_empty() { None } else { Some(RewardTree::new(values)?) };
    let root = Bytes32::from_bytes(tree.as_ref().map_or(EMPTY_ROOT, |t| t.root()));
    if Some(&root) != closed.merkle_root.as_ref() {
        return Err(Error::Corrupt(format!(
            "epoch {n}'s rewards rows give root {root}, but {} was recorded",
            closed.merkle_root.map_or("none".into(), |r| r.to_string())
        )));
    }
    Ok(tree)
}

/// An account's amount and proof in a tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Proof {
    pub epoch: u64,
    pub account: Address,
    /// Base units, as a decimal string.
    #[schema(value_type = String)]
    pub amount: Amount,
    pub merkle_root: Bytes32,
    /// Sibling hashes from the leaf up, as `MerkleProof.verify` takes them.
    pub proof: Vec<Bytes32>,
}

/// The proof of `account` in epoch `n`'s tree, if it earned anything.
pub fn proof_in(tree: &RewardTree, n: u64, account: &Address) -> Option<Proof> {
    // Values are sorted by account.
    let index = tree.values().binary_search_by(|(a, _)| a.cmp(account)).ok()?;
    let proof = tree.proof(index)?;
    Some(Proof {
        epoch: n,
        account: *account,
        amount: tree.values()[index].1,
        merkle_root: Bytes32::from_bytes(tree.root()),
        proof: proof.into_iter().map(Bytes32::from_bytes).collect(),
    })
}

/// Used by `compute` for epochs not yet pinned: the pin closing would record now (a
/// preview; nothing is written).
pub async fn preview_pin(lake: &Lake, config: &EpochConfig, epochs: &BTreeMap<u64, Recorded>, n: u64) -> Result<EpochClosed, Error> {
    if let Some(pin) = epochs.get(&n).and_then(|r| r.latest().cloned()) {
        return Ok(pin);
    }
    // A preview of an open epoch: the same pin closing would record, minus the time rule.
    // "Now" far enough ahead that the time rule passes.
    let far = DateTime::<Utc>::MAX_UTC;
    new_pin(lake, config, epochs, n, far).await
}
