//! Group commit: the one task that writes the lake.
//!
//! Requests hand their validated events to [`Ingestor::submit`] and wait. The writer task
//! collects requests until the oldest has waited `max_delay` or `max_rows` events are
//! pending, then performs one flush: drop events whose `event_id` is already in the index
//! (or earlier in the same flush), check the rules that depend on the lake's state, write
//! one Delta commit per table, record the commit in the index, and only then answer every
//! request of the flush. An answer therefore always means "durable in Delta".
//!
//! A commit that loses a race with another writer (another process on the same tables) is
//! retried after the index has caught up with the winner's commit, so events the other
//! writer stored are reported as duplicates instead of being stored twice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{BooleanArray, RecordBatch, TimestampMicrosecondArray};
use arrow::compute::{concat_batches, filter_record_batch};
use chrono::Utc;
use ledgerlake_lakehouse::events::{self, Event, EventKind};
use ledgerlake_lakehouse::Deployment;
use ledgerlake_lakehouse::pricing::Price;
use ledgerlake_lakehouse::ids::{Address, ContributionId, DatanetId, ModelId};
use ledgerlake_lakehouse::index::{self, Index, Learned};
use ledgerlake_lakehouse::lake::{Lake, TableWriter};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::Error;
use crate::authority::{Submitter, admit};
use crate::validate::{Item, ItemError};

/// How the writer batches.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Longest an event waits for its flush to start.
    pub max_delay: Duration,
    /// A flush starts as soon as this many events are pending.
    pub max_rows: usize,
    /// Events accepted into the queue but not yet durable; past this, submit refuses
    /// (HTTP 503 with `Retry-After`) instead of growing memory.
    pub max_queued_rows: usize,
    /// Attempts at one table commit when other writers keep winning.
    pub max_commit_attempts: usize,
    /// How far a participant event's `event_time` may be from the server's clock, either
    /// way (events from a key; `docs/security.md`).
    pub max_event_skew: Duration,
    /// The EVM chain participant signatures name (the EIP-712 domain's `chainId`), when
    /// one is configured.
    pub chain_id: Option<u64>,
    /// Model ids no participant may register (the base model a server answers as).
    pub reserved_models: Vec<(ModelId, Price)>,
    /// The address of the staking contract `up` follows, if any: then stakes come only
    /// from it, through ledgerlake's follower, and no key records one.
    pub staking: Option<String>,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            max_delay: Duration::from_millis(100),
            max_rows: 200_000,
            max_queued_rows: 1_000_000,
            max_commit_attempts: 20,
            max_event_skew: Duration::from_secs(300),
            chain_id: None,
            reserved_models: Vec::new(),
            staking: None,
        }
    }
}

/// The outcome of one submitted batch, once durable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Receipt {
    /// Events stored by this request.
    pub accepted: usize,
    /// Events whose `event_id` was already stored: not stored again.
    pub duplicates: usize,
    /// Items not stored, with why.
    pub errors: Vec<ItemError>,
}

/// Events of one request, already converted to Arrow per table (done by the request, in
/// parallel with other requests, so the single writer task only filters and commits).
pub struct Prepared {
    events: Vec<(usize, Event)>,
    /// Per table: the batch and, per row, the position of its event in `events`.
    tables: Vec<(EventKind, RecordBatch, Vec<usize>)>,
    /// Sent with a key: participant event times are held to the skew bound.
    from_outside: bool,
    /// Sent with a service key: each fee is bounded by its model's price for the tokens of
    /// its `inference.completed`, sent with it.
    bounded_fees: bool,
}

impl Prepared {
    /// Converts validated events (with their positions in the request) to record batches.
    /// For ledgerlake's own components; what comes from a key goes through
    /// [`Prepared::from_items`].
    pub fn new(events: Vec<(usize, Event)>) -> Result<Self, Error> {
        let mut positions: BTreeMap<EventKind, Vec<usize>> = BTreeMap::new();
        for (pos, (_, event)) in events.iter().enumerate() {
            positions.entry(event.kind()).or_default().push(pos);
        }
        // `ingested_at` is stamped again by the flush that makes the rows durable.
        let now = Utc::now();
        let mut tables = Vec::with_capacity(positions.len());
        for (kind, rows) in positions {
            let batch = events::to_record_batch(kind, rows.iter().map(|p| &events[*p].1), now)?;
            tables.push((kind, batch, rows));
        }
        Ok(Self { events, tables, from_outside: false, bounded_fees: false })
    }

    /// Splits parsed items into the events `submitter` may cause (the authority of each
    /// kind, [`crate::authority`]), converted for the writer, and the item errors. An atomic
    /// batch with an error keeps no events.
    pub fn from_items(
        items: Vec<Item>,
        atomic: bool,
        submitter: &Submitter,
        deployment: &Deployment,
    ) -> Result<(Option<Self>, Vec<ItemError>), Error> {
        let mut events = Vec::with_capacity(items.len());
        let mut errors = Vec::new();
        for (index, item) in items {
            match item {
                Ok(event) => match admit(&event, submitter, deployment) {
                    Ok(()) => events.push((index, event)),
                    Err((field, message)) => {
                        errors.push(ItemError { index, event_id: Some(event.event_id().to_string()), field: field.into(), message })
                    }
                },
                Err(e) => errors.push(e),
            }
        }
        if atomic && !errors.is_empty() {
            return Ok((None, errors));
        }
        let mut prepared = Self::new(events)?;
        prepared.from_outside = submitter.from_outside();
        prepared.bounded_fees = matches!(submitter, Submitter::Key(p) if p.role == crate::Role::Service);
        Ok((Some(prepared), errors))
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

struct Job {
    prepared: Prepared,
    /// When the job was queued: the flush it joins starts at most `max_delay` later.
    queued_at: Instant,
    atomic: bool,
    reply: oneshot::Sender<Result<Receipt, Error>>,
    _permit: OwnedSemaphorePermit,
}

/// A handle to the writer task; cheap to clone.
#[derive(Clone)]
pub struct Ingestor {
    tx: mpsc::UnboundedSender<Job>,
    queue: Arc<Semaphore>,
    config: WriterConfig,
    deployment: Deployment,
    reserved: Arc<std::sync::RwLock<Vec<(ModelId, Price)>>>,
}

impl Ingestor {
    /// Opens (creating if needed) every table, brings the index in `index_dir` up to date
    /// with them, and starts the writer task.
    pub async fn start(lake: Lake, index_dir: PathBuf, config: WriterConfig) -> Result<Self, Error> {
        let index = Index::open(&index_dir)?;
        let deployment = Deployment::load_or_create(&lake, config.chain_id).await?;
        let mut writers = BTreeMap::new();
        for kind in EventKind::ALL {
            let mut writer = TableWriter::open(&lake, *kind).await?;
            let rows = index.catch_up(&mut writer).await?;
            if rows > 0 {
                tracing::info!(table = kind.table(), rows, "index caught up with the table");
            }
            writers.insert(*kind, writer);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Semaphore::new(config.max_queued_rows));
        let reserved = Arc::new(std::sync::RwLock::new(config.reserved_models.clone()));
        let factory_root = format!("{}_models/", lake.config().root);
        let task =
            WriterTask { index, writers, config: config.clone(), stale: BTreeSet::new(), reserved: reserved.clone(), factory_root, lake: lake.clone() };
        tokio::spawn(task.run(rx));
        Ok(Self { tx, queue, config, deployment, reserved })
    }

    /// Reserves a model id no participant may register (the base model a server answers
    /// as, known once the model is loaded), served at `price`.
    pub fn reserve_model(&self, id: ModelId, price: Price) {
        let mut reserved = self.reserved.write().unwrap_or_else(|p| p.into_inner());
        reserved.retain(|(m, _)| *m != id);
        reserved.push((id, price));
    }

    /// The deployment participant signatures name (`GET /v1/deployment`).
    pub fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    /// The address of the staking contract this deployment follows, if any.
    pub fn staking(&self) -> Option<&str> {
        self.config.staking.as_deref()
    }

    /// How far a participant event's time may be from the server's clock.
    pub fn max_event_skew(&self) -> Duration {
        self.config.max_event_skew
    }

    /// Queues validated events (with their positions in the request) and waits until they
    /// are durable. With `atomic`, an event that fails a state check fails the whole batch.
    pub async fn submit(&self, events: Vec<(usize, Event)>, atomic: bool) -> Result<Receipt, Error> {
        self.submit_prepared(Prepared::new(events)?, atomic).await
    }

    /// Like [`Ingestor::submit`], for events already converted with [`Prepared::new`].
    pub async fn submit_prepared(&self, prepared: Prepared, atomic: bool) -> Result<Receipt, Error> {
        if prepared.is_empty() {
            return Ok(Receipt::default());
        }
        let n = u32::try_from(prepared.len()).unwrap_or(u32::MAX);
        if n as usize > self.config.max_queued_rows {
            return Err(Error::BatchTooLarge { events: prepared.len(), limit: self.config.max_queued_rows });
        }
        let permit = self.queue.clone().try_acquire_many_owned(n).map_err(|_| Error::Overloaded)?;
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job { prepared, queued_at: Instant::now(), atomic, reply, _permit: permit })
            .map_err(|_| Error::Unavailable("the writer has stopped".into()))?;
        answer.await.map_err(|_| Error::Unavailable("the writer stopped before answering".into()))?
    }

    /// Stores what [`Prepared::from_items`] kept and answers the receipt with the item
    /// `errors` found before merged in, ordered by index.
    pub async fn submit_checked(&self, prepared: Option<Prepared>, errors: Vec<ItemError>, atomic: bool) -> Result<Receipt, Error> {
        let mut receipt = match prepared {
            Some(p) => self.submit_prepared(p, atomic).await?,
            None => Receipt::default(),
        };
        receipt.errors.extend(errors);
        receipt.errors.sort_by_key(|e| e.index);
        Ok(receipt)
    }

    /// Validates and stores the events of one Arrow record batch exactly as `POST
    /// /v1/events` stores an Arrow stream (Flight `DoPut` uses this). `default_kind` names
    /// the kind of rows without a `kind` column. Parsing runs off the async workers.
    pub async fn submit_arrow(
        &self,
        batch: RecordBatch,
        default_kind: Option<EventKind>,
        atomic: bool,
        submitter: Submitter,
    ) -> Result<Receipt, Error> {
        let deployment = self.deployment.clone();
        let (prepared, errors) = tokio::task::spawn_blocking(move || {
            crate::validate::parse_batch(&batch, 0, default_kind).and_then(|items| Prepared::from_items(items, atomic, &submitter, &deployment))
        })
        .await
        .map_err(|e| Error::Unavailable(format!("parser task failed: {e}")))??;
        self.submit_checked(prepared, errors, atomic).await
    }
}

struct WriterTask {
    index: Index,
    writers: BTreeMap<EventKind, TableWriter>,
    config: WriterConfig,
    /// Tables whose last commit the index failed to learn: caught up from the log before
    /// the next flush plans, so no event of that commit can be accepted twice.
    stale: BTreeSet<EventKind>,
    /// Model ids no participant may register, and their prices.
    reserved: Arc<std::sync::RwLock<Vec<(ModelId, Price)>>>,
    /// Where ModelFactory stores adapters (`<lake root>_models/`): a registration naming a
    /// directory there names its own model's (`<root><model id>/...`) or none.
    factory_root: String,
    /// The lake: registered prices are read from it when a service key sends fees.
    lake: Lake,
}

/// The rows one flush writes to one table: the data, and per row its event (job and
/// position in the job) and event id.
struct TableRows {
    batch: RecordBatch,
    rows: Vec<(usize, usize)>,
    ids: Vec<String>,
}

/// What became of one row of a table commit.
#[derive(Debug)]
enum RowOutcome {
    Stored,
    /// Another writer stored its event id first.
    Duplicate,
    /// A state rule no longer holds after another writer's commit (the datanet it
    /// creates exists now).
    Rejected(ItemError),
    /// Not written because another event of its atomic request was rejected.
    Withdrawn,
}

/// The order a flush commits tables in: the datanets first (contributions need them), then
/// the contributions (reviews need them), then every other table at once, and
/// `inference_tokens` last. Each phase's commits are in the index before the next phase is
/// checked again, so no event lands on a datanet or contribution that lost a race. Token
/// ids come last because attribution takes a stored `inference.tokens` as the sign that
/// everything else of its inference (its citations) is stored too.
const PHASES: [Option<EventKind>; 4] =
    [Some(EventKind::DatanetCreated), Some(EventKind::ContributionSubmitted), None, Some(EventKind::InferenceTokens)];

fn in_phase(phase: Option<EventKind>, kind: EventKind) -> bool {
    match phase {
        Some(k) => k == kind,
        None => !PHASES.contains(&Some(kind)),
    }
}

/// Kinds whose events a state rule checks (so their flush first sees other writers'
/// commits to the tables the rules read).
fn checks_state(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::DatanetCreated
            | EventKind::DatanetUpdated
            | EventKind::ContributionSubmitted
            | EventKind::ContributionReviewed
            | EventKind::AccessGranted
            | EventKind::AccessRevoked
            | EventKind::AccessRequested
            | EventKind::ModelRegistered
            | EventKind::EventVoided
    )
}

impl WriterTask {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        while let Some(first) = rx.recv().await {
            // Counted from when the first job was queued, not from when the writer got to
            // it: a job that waited for the previous flush does not wait a full delay again.
            let deadline = first.queued_at + self.config.max_delay;
            let mut rows = first.prepared.len();
            let mut jobs = vec![first];
            while rows < self.config.max_rows {
                tokio::select! {
                    // Queued jobs first: a past deadline must not cut a flush short while
                    // more work is already waiting.
                    biased;
                    job = rx.recv() => match job {
                        Some(job) => { rows += job.prepared.len(); jobs.push(job); }
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            self.flush(jobs).await;
        }
        if let Err(e) = self.index.sync() {
            tracing::error!(error = %e, "could not sync the index on shutdown");
        }
    }

    async fn flush(&mut self, jobs: Vec<Job>) {
        let started = std::time::Instant::now();
        let needs_state = jobs.iter().any(|j| j.prepared.tables.iter().any(|(k, _, _)| checks_state(*k)));
        let ready = match self.catch_up_stale().await {
            Ok(()) if needs_state => self.see_other_writers().await,
            other => other,
        };
        if let Err(e) = ready {
            tracing::error!(error = %e, "the index is behind the tables and cannot catch up");
            let receipts = jobs.iter().map(|_| Err(Error::Unavailable(e.to_string()))).collect();
            return answer_all(jobs, receipts);
        }
        // A service key's fees are bounded by the prices of the registrations that count.
        let bounded = jobs.iter().any(|j| j.prepared.bounded_fees && j.prepared.tables.iter().any(|(k, _, _)| *k == EventKind::FeeCharged));
        let prices = match bounded {
            true => match ledgerlake_lakehouse::snapshot::model_prices(&self.lake).await {
                Ok((_, prices)) => prices,
                Err(e) => {
                    tracing::error!(error = %e, "reading the registered prices");
                    let receipts = jobs.iter().map(|_| Err(Error::Unavailable(format!("reading the registered prices: {e}")))).collect();
                    return answer_all(jobs, receipts);
                }
            },
            false => HashMap::new(),
        };
        let mut receipts: Vec<Result<Receipt, Error>> = jobs.iter().map(|_| Ok(Receipt::default())).collect();
        let mut accepted = match self.plan(&jobs, &mut receipts, &prices) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "flush planning failed");
                let receipts = jobs.iter().map(|_| Err(Error::Unavailable(e.to_string()))).collect();
                return answer_all(jobs, receipts);
            }
        };
        tracing::debug!(jobs = jobs.len(), took = ?started.elapsed(), "flush planned");
        let now = Utc::now();
        let mut committed = Vec::new();
        for (p, phase) in PHASES.into_iter().enumerate() {
            let mut tables = match gather(&jobs, &accepted, |k| in_phase(phase, k)) {
                Ok(tables) if tables.is_empty() => continue,
                Ok(tables) => tables,
                Err(e) => {
                    tracing::error!(error = %e, "flush gathering failed");
                    fail_remaining(&jobs, &accepted, &mut receipts, &e.to_string());
                    break;
                }
            };
            // The tables of a phase commit concurrently: one Delta commit each.
            let index = &self.index;
            let attempts = self.config.max_commit_attempts;
            let commits = self
                .writers
                .iter_mut()
                .filter_map(|(kind, writer)| tables.remove(kind).map(|rows| commit_table(writer, index, attempts, rows, now, &jobs)));
            let mut phase_committed = Vec::new();
            let mut storage_failed = None;
            let mut rejected_any = false;
            let mut atomic_rejected = Vec::new();
            for result in futures::future::join_all(commits).await {
                match result {
                    Ok((outcome, learn)) => {
                        phase_committed.extend(learn);
                        for ((job, pos), row) in outcome {
                            let receipt = receipts[job].as_mut();
                            match (row, receipt) {
                                (RowOutcome::Stored, Ok(r)) => r.accepted += 1,
                                (RowOutcome::Duplicate, Ok(r)) => {
                                    r.duplicates += 1;
                                    accepted[job][pos] = false;
                                }
                                (RowOutcome::Rejected(e), Ok(r)) => {
                                    rejected_any = true;
                                    r.errors.push(e);
                                    accepted[job][pos] = false;
                                    if jobs[job].atomic {
                                        atomic_rejected.push(job);
                                    }
                                }
                                (RowOutcome::Withdrawn, _) | (_, Err(_)) => accepted[job][pos] = false,
                            }
                        }
                    }
                    Err((kind, rows_hit, e)) => {
                        tracing::error!(error = %e, "commit failed");
                        // The commit may have landed even though its answer did not (a lost
                        // response): the next flush learns the table from its log first.
                        self.stale.insert(kind);
                        let message = format!("storage failed, nothing acknowledged: {e}");
                        for (job, pos) in rows_hit {
                            accepted[job][pos] = false;
                            receipts[job] = Err(Error::Unavailable(message.clone()));
                        }
                        storage_failed = Some(message);
                    }
                }
            }
            if let Some(message) = storage_failed {
                // What later phases would write may depend on what did not commit: none
                // of it is written, and its requests are told to retry.
                committed.extend(phase_committed);
                fail_remaining(&jobs, &accepted, &mut receipts, &message);
                break;
            }
            // An atomic request that lost a row in this phase (its other rows of that table
            // were withdrawn in the same commit) writes nothing in later phases: none of its
            // events may land after one it came with was refused.
            for &job in &atomic_rejected {
                for (pos, (_, event)) in jobs[job].prepared.events.iter().enumerate() {
                    if PHASES[p + 1..].iter().any(|later| in_phase(*later, event.kind())) {
                        accepted[job][pos] = false;
                    }
                }
            }
            let last = p + 1 == PHASES.len();
            if last {
                committed.extend(phase_committed);
                break;
            }
            // The next phase is checked against what this one stored: the index learns it now.
            for c in phase_committed {
                self.learn(c);
            }
            if rejected_any && let Err(e) = self.recheck(&jobs, &mut accepted, &mut receipts, PHASES[p + 1..].to_vec()) {
                tracing::error!(error = %e, "re-checking a flush after a lost race failed");
                fail_remaining(&jobs, &accepted, &mut receipts, &e.to_string());
                break;
            }
        }
        for r in receipts.iter_mut().flatten() {
            r.errors.sort_by_key(|e| e.index);
        }
        tracing::debug!(jobs = jobs.len(), took = ?started.elapsed(), "flush committed");
        // The commits are durable: answer now, and teach the index before the next flush
        // plans. If the process dies in between, the index catches up from the log.
        answer_all(jobs, receipts);
        for c in committed {
            self.learn(c);
        }
        tracing::debug!(took = ?started.elapsed(), "flush indexed");
    }

    /// Records a commit in the index; if that fails the table is caught up from its log
    /// before the next flush.
    fn learn(&mut self, Committed { kind, version, learned }: Committed) {
        if let Err(e) = learned.and_then(|l| self.index.record(kind, version, &l)) {
            tracing::error!(table = kind.table(), error = %e, "index update failed after commit; catching up from the log");
            self.stale.insert(kind);
        }
    }

    /// Brings the index up to every commit other writers made to the tables state rules
    /// read, so a flush checks them against the whole lake, not only this process's writes.
    /// Costs one existence check per table when nothing is new.
    async fn see_other_writers(&mut self) -> Result<(), Error> {
        for kind in [EventKind::DatanetCreated, EventKind::ContributionSubmitted, EventKind::ModelRegistered] {
            if let Some(writer) = self.writers.get_mut(&kind)
                && writer.has_newer().await?
            {
                writer.refresh().await?;
                self.index.catch_up(writer).await?;
            }
        }
        Ok(())
    }

    /// Checks the events still to be written in `phases` again, against the index (which
    /// now holds the winners of lost races and this flush's earlier phases) and what this
    /// flush stages before them. An event that no longer passes is rejected; with it go
    /// the other unwritten events of an atomic request.
    fn recheck(
        &self,
        jobs: &[Job],
        accepted: &mut [Vec<bool>],
        receipts: &mut [Result<Receipt, Error>],
        phases: Vec<Option<EventKind>>,
    ) -> Result<(), Error> {
        let later = |k: EventKind| phases.iter().any(|p| in_phase(*p, k));
        let reserved = self.reserved.read().unwrap_or_else(|p| p.into_inner()).clone();
        let flushed = State::default();
        let mut staged = State::default();
        for (j, job) in jobs.iter().enumerate() {
            let mut errors = Vec::new();
            for (pos, (index, event)) in job.prepared.events.iter().enumerate() {
                if !accepted[j][pos] || !later(event.kind()) {
                    continue;
                }
                let lookup = Lookup { index: &self.index, flushed: &flushed, staged: &staged, reserved: &reserved, factory_root: &self.factory_root };
                if let Err((field, message)) = lookup.check(event)? {
                    accepted[j][pos] = false;
                    let event_id = Some(event.event_id().to_string());
                    errors.push(ItemError { index: *index, event_id, field: field.to_owned(), message });
                    continue;
                }
                staged.stage(event);
            }
            if errors.is_empty() {
                continue;
            }
            if job.atomic {
                for (pos, (_, event)) in job.prepared.events.iter().enumerate() {
                    if later(event.kind()) {
                        accepted[j][pos] = false;
                    }
                }
            }
            if let Ok(r) = &mut receipts[j] {
                r.errors.extend(errors);
            }
        }
        Ok(())
    }

    async fn catch_up_stale(&mut self) -> Result<(), Error> {
        while let Some(kind) = self.stale.first().copied() {
            if let Some(writer) = self.writers.get_mut(&kind) {
                // Up to the newest version on storage: a commit whose answer was lost may
                // be there, and must be known before anything else is planned.
                writer.refresh().await?;
                self.index.catch_up(writer).await?;
            }
            self.stale.remove(&kind);
        }
        Ok(())
    }

    /// Decides, per event, duplicate / rejected / to be written. Duplicates and rejections
    /// go straight into the receipts; returns, per job and event, whether to write it.
    fn plan(&self, jobs: &[Job], receipts: &mut [Result<Receipt, Error>], prices: &HashMap<ModelId, Price>) -> Result<Vec<Vec<bool>>, Error> {
        let mut seen: HashSet<&str> = HashSet::new();
        let reserved = self.reserved.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut flushed = State::default();
        let mut accepted = Vec::with_capacity(jobs.len());
        let now = Utc::now();
        let skew = chrono::Duration::from_std(self.config.max_event_skew).unwrap_or(chrono::Duration::MAX);
        for (j, job) in jobs.iter().enumerate() {
            let events = &job.prepared.events;
            let mut take = vec![false; events.len()];
            let mut staged_ids: HashSet<&str> = HashSet::new();
            let mut staged = State::default();
            let mut duplicates = 0;
            let mut errors = Vec::new();
            // The completions a service key's fees are bounded by: those its request stores
            // (one already stored was billed when it was), each billed by one fee.
            let mut completions: HashMap<&str, &events::InferenceCompleted> = HashMap::new();
            if job.prepared.bounded_fees {
                for (_, e) in events {
                    if let Event::InferenceCompleted(c) = e
                        && !seen.contains(c.event_id.as_str())
                        && !self.index.contains_event(c.event_id.as_str())?
                    {
                        completions.insert(c.inference_id.as_str(), c);
                    }
                }
            }
            for (pos, (index, event)) in events.iter().enumerate() {
                let id = event.event_id().as_str();
                if seen.contains(id) || staged_ids.contains(&id) || self.index.contains_event(id)? {
                    duplicates += 1;
                    continue;
                }
                // Checked after duplicates drop out: re-sending a stored event stays harmless.
                if job.prepared.from_outside
                    && matches!(event.kind().authority(), ledgerlake_lakehouse::Authority::Participant { .. })
                    && (event.event_time() - now).abs() > skew
                {
                    let message = format!(
                        "event_time {} is more than {} s from the server's clock ({}): participant events are signed when they happen",
                        event.event_time().to_rfc3339(),
                        skew.num_seconds(),
                        now.to_rfc3339()
                    );
                    errors.push(ItemError { index: *index, event_id: Some(id.to_owned()), field: "event_time".into(), message });
                    continue;
                }
                if let (true, Event::FeeCharged(f)) = (job.prepared.bounded_fees, event) {
                    if let Err((field, message)) = fee_within_price(f, &completions, &reserved, prices) {
                        errors.push(ItemError { index: *index, event_id: Some(id.to_owned()), field: field.to_owned(), message });
                        continue;
                    }
                    // One fee per inference: the completion is used up.
                    completions.remove(f.inference_id.as_str());
                }
                // The authority of stakes (ledgerlake_lakehouse::authority): an admin key's
                // only where no staking contract is followed.
                if let (true, Some(contract), EventKind::StakeChanged) = (job.prepared.from_outside, &self.config.staking, event.kind()) {
                    let message = format!("stakes come from the staking contract {contract}, which this deployment follows; no key records one");
                    errors.push(ItemError { index: *index, event_id: Some(id.to_owned()), field: "kind".into(), message });
                    continue;
                }
                // Nor does any key undo one: voiding a followed stake would change stakes too.
                if let (true, Some(contract), Event::EventVoided(v)) = (job.prepared.from_outside, &self.config.staking, event)
                    && v.voided_kind == EventKind::StakeChanged.name()
                {
                    let message = format!("stakes follow the staking contract {contract}: they are not voided here");
                    errors.push(ItemError { index: *index, event_id: Some(id.to_owned()), field: "voided_kind".into(), message });
                    continue;
                }
                let lookup = Lookup { index: &self.index, flushed: &flushed, staged: &staged, reserved: &reserved, factory_root: &self.factory_root };
                if let Err((field, message)) = lookup.check(event)? {
                    errors.push(ItemError { index: *index, event_id: Some(id.to_owned()), field: field.to_owned(), message });
                    continue;
                }
                staged.stage(event);
                staged_ids.insert(id);
                take[pos] = true;
            }
            let receipt = receipts[j].as_mut().map_err(|e| Error::Unavailable(e.to_string()))?;
            if job.atomic && !errors.is_empty() {
                receipt.errors = errors;
                accepted.push(vec![false; events.len()]);
                continue;
            }
            receipt.duplicates = duplicates;
            receipt.errors = errors;
            seen.extend(staged_ids);
            flushed.absorb(staged);
            accepted.push(take);
        }
        Ok(accepted)
    }
}

/// The accepted rows of every job, per table of the kinds `which` picks: each job's
/// prepared batch filtered to its accepted rows, concatenated.
fn gather(jobs: &[Job], accepted: &[Vec<bool>], which: impl Fn(EventKind) -> bool) -> Result<BTreeMap<EventKind, TableRows>, Error> {
    type Parts = (Vec<RecordBatch>, Vec<(usize, usize)>, Vec<String>);
    let mut parts: BTreeMap<EventKind, Parts> = BTreeMap::new();
    for (j, job) in jobs.iter().enumerate() {
        for (kind, batch, rows) in job.prepared.tables.iter().filter(|(k, _, _)| which(*k)) {
            let mask: BooleanArray = rows.iter().map(|p| Some(accepted[j][*p])).collect();
            if mask.true_count() == 0 {
                continue;
            }
            let entry = parts.entry(*kind).or_default();
            entry.0.push(filter_record_batch(batch, &mask).map_err(ledgerlake_lakehouse::Error::from)?);
            for p in rows.iter().filter(|p| accepted[j][**p]) {
                entry.1.push((j, *p));
                entry.2.push(job.prepared.events[*p].1.event_id().to_string());
            }
        }
    }
    let mut tables = BTreeMap::new();
    for (kind, (batches, rows, ids)) in parts {
        let batch = concat_batches(&events::schema(kind), &batches).map_err(ledgerlake_lakehouse::Error::from)?;
        tables.insert(kind, TableRows { batch, rows, ids });
    }
    Ok(tables)
}

/// Fails every request that still has unwritten accepted events (503: retry is safe).
fn fail_remaining(jobs: &[Job], accepted: &[Vec<bool>], receipts: &mut [Result<Receipt, Error>], message: &str) {
    for (j, _) in jobs.iter().enumerate() {
        if accepted[j].iter().any(|a| *a) && receipts[j].is_ok() {
            receipts[j] = Err(Error::Unavailable(message.to_owned()));
        }
    }
}

/// `batch` with every `ingested_at` set to `now`.
fn stamp(batch: &RecordBatch, now: chrono::DateTime<Utc>) -> Result<RecordBatch, Error> {
    let schema = batch.schema();
    let i = schema.index_of("ingested_at").map_err(ledgerlake_lakehouse::Error::from)?;
    let mut columns = batch.columns().to_vec();
    columns[i] = Arc::new(TimestampMicrosecondArray::from_value(now.timestamp_micros(), batch.num_rows()).with_timezone("UTC"));
    Ok(RecordBatch::try_new(schema, columns).map_err(ledgerlake_lakehouse::Error::from)?)
}

/// A commit the index has yet to learn.
struct Committed {
    kind: EventKind,
    version: u64,
    learned: Result<Learned, ledgerlake_lakehouse::Error>,
}

/// Commits one table's rows; returns what became of each row (by job and position), and
/// what the index must learn from the commit. After a lost race it catches up with the
/// winner and checks every row again before the next attempt: duplicates drop out, a
/// datanet the winner created is rejected here (with the other rows of its atomic
/// request), and the flush re-checks what depends on it before its next phase.
async fn commit_table(
    writer: &mut TableWriter,
    index: &Index,
    max_attempts: usize,
    mut rows: TableRows,
    now: chrono::DateTime<Utc>,
    jobs: &[Job],
) -> Result<(Vec<((usize, usize), RowOutcome)>, Option<Committed>), (EventKind, Vec<(usize, usize)>, Error)> {
    let kind = writer.kind();
    let mut outcome = Vec::with_capacity(rows.rows.len());
    for _attempt in 0..max_attempts {
        if rows.rows.is_empty() {
            return Ok((outcome, None));
        }
        let batch = match stamp(&rows.batch, now) {
            Ok(b) => b,
            Err(e) => return Err((kind, rows.rows, e)),
        };
        let started = std::time::Instant::now();
        let appended = writer.append(std::slice::from_ref(&batch)).await;
        tracing::debug!(table = kind.table(), rows = batch.num_rows(), took = ?started.elapsed(), "committed");
        match appended {
            Ok(version) => {
                // Registry tables teach the index more than ids, so those read the batch.
                let learned = match kind {
                    EventKind::DatanetCreated | EventKind::ContributionSubmitted | EventKind::ModelRegistered => {
                        let mut l = Learned::default();
                        index::learn(kind, &batch, &mut l).map(|_| l)
                    }
                    _ => Ok(Learned { event_ids: rows.ids, ..Learned::default() }),
                };
                outcome.extend(rows.rows.iter().map(|r| (*r, RowOutcome::Stored)));
                return Ok((outcome, Some(Committed { kind, version, learned })));
            }
            Err(ledgerlake_lakehouse::Error::CommitConflict { .. }) => {
                tracing::info!(table = kind.table(), "another writer committed first; catching up");
                let caught_up = match writer.refresh().await {
                    Ok(()) => index.catch_up(writer).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = caught_up {
                    return Err((kind, rows.rows, e.into()));
                }
                let verdicts = match recheck_rows(index, &rows, jobs) {
                    Ok(v) => v,
                    Err(e) => return Err((kind, rows.rows, e)),
                };
                // An atomic request with a rejected row writes none of its rows.
                let failed: HashSet<usize> =
                    rows.rows.iter().zip(&verdicts).filter(|(_, v)| matches!(v, Some(RowOutcome::Rejected(_)))).map(|((j, _), _)| *j).collect();
                let mut keep = Vec::with_capacity(rows.ids.len());
                let (mut kept_rows, mut kept_ids) = (Vec::new(), Vec::new());
                for ((row, id), verdict) in rows.rows.into_iter().zip(rows.ids).zip(verdicts) {
                    let verdict = match verdict {
                        None if failed.contains(&row.0) && jobs[row.0].atomic => Some(RowOutcome::Withdrawn),
                        other => other,
                    };
                    keep.push(verdict.is_none());
                    match verdict {
                        None => {
                            kept_rows.push(row);
                            kept_ids.push(id);
                        }
                        Some(v) => outcome.push((row, v)),
                    }
                }
                let batch = match filter_record_batch(&rows.batch, &BooleanArray::from(keep)) {
                    Ok(b) => b,
                    Err(e) => return Err((kind, kept_rows, ledgerlake_lakehouse::Error::from(e).into())),
                };
                rows = TableRows { batch, rows: kept_rows, ids: kept_ids };
            }
            Err(e) => return Err((kind, rows.rows, e.into())),
        }
    }
    Err((kind, rows.rows, Error::Unavailable(format!("{kind}: other writers kept committing first"))))
}

/// After catching up with a winner: per row, `None` to write it again, or why not.
fn recheck_rows(index: &Index, rows: &TableRows, jobs: &[Job]) -> Result<Vec<Option<RowOutcome>>, Error> {
    let mut out = Vec::with_capacity(rows.rows.len());
    for (&(j, pos), id) in rows.rows.iter().zip(&rows.ids) {
        if index.contains_event(id)? {
            out.push(Some(RowOutcome::Duplicate));
            continue;
        }
        let (item, event) = &jobs[j].prepared.events[pos];
        let rejected = |field: &str, message: String| Some(RowOutcome::Rejected(ItemError { index: *item, event_id: Some(id.clone()), field: field.into(), message }));
        // The rules that say who was first, against the winner's commit.
        let verdict = match event {
            Event::DatanetCreated(d) if index.datanet_owner(&d.datanet_id)?.is_some() => {
                rejected("datanet_id", format!("datanet {} already exists", d.datanet_id))
            }
            Event::ContributionSubmitted(c) if c.contribution_id.as_ref().map(|cid| index.contribution_datanet(cid)).transpose()?.flatten().is_some() => {
                rejected("contribution_id", "this content was contributed to the datanet first by another submission".into())
            }
            Event::ModelRegistered(m) => match index.model_owner(&m.model_id)? {
                Some(owner) if owner != m.builder => rejected("model_id", format!("model {} belongs to its first registrant {owner}", m.model_id)),
                _ => None,
            },
            _ => None,
        };
        out.push(verdict);
    }
    Ok(out)
}

/// A fee a service key sends is at most its model's price (the base model's, or the
/// registration that counts) for the tokens of its `inference.completed`, which comes in
/// the same request: a leaked service key cannot mint fees beyond what serving could charge.
fn fee_within_price(
    f: &events::FeeCharged,
    completions: &HashMap<&str, &events::InferenceCompleted>,
    reserved: &[(ModelId, Price)],
    prices: &HashMap<ModelId, Price>,
) -> Check {
    let Some(c) = completions.get(f.inference_id.as_str()) else {
        return Err((
            "inference_id",
            format!("a service key sends one fee with its new inference.completed ({}), in the same request", f.inference_id),
        ));
    };
    if c.model_id != f.model_id {
        return Err(("model_id", format!("the fee names model {}, its inference.completed {}", f.model_id, c.model_id)));
    }
    let price = reserved.iter().find(|(m, _)| *m == f.model_id).map(|(_, p)| *p).or_else(|| prices.get(&f.model_id).copied());
    let Some(price) = price else {
        return Err(("model_id", format!("model {} is neither this server's base model nor registered: it has no price", f.model_id)));
    };
    let most = price.fee(u64::from(c.prompt_tokens), u64::from(c.completion_tokens)).map_err(|e| ("amount", e.to_string()))?;
    if f.amount > most {
        return Err((
            "amount",
            format!(
                "{} base units is more than model {}'s price for {} prompt and {} completion tokens ({most})",
                f.amount, f.model_id, c.prompt_tokens, c.completion_tokens
            ),
        ));
    }
    Ok(())
}

/// Sends each job its receipt (one receipt per job, in order).
fn answer_all(jobs: Vec<Job>, receipts: Vec<Result<Receipt, Error>>) {
    for (job, receipt) in jobs.into_iter().zip(receipts) {
        // A client that went away no longer waits for its answer; that is fine.
        let _ = job.reply.send(receipt);
    }
}

/// Whether a registration's `adapter_uri`, if it is under ModelFactory's `factory_root`
/// (as a URI, or as the local path of a `file://` root), is under its own model's directory
/// there: no one serves another builder's trained adapter as their own model.
fn factory_dir_is_its_own(factory_root: &str, m: &ledgerlake_lakehouse::events::ModelRegistered) -> bool {
    let roots = [factory_root.to_owned(), factory_root.strip_prefix("file://").unwrap_or(factory_root).to_owned()];
    let uri = m.adapter_uri.trim_end_matches('/').to_owned() + "/";
    match roots.iter().find(|r| uri.starts_with(r.as_str())) {
        Some(root) => uri[root.len()..].starts_with(&format!("{}/", m.model_id)),
        None => true,
    }
}

/// What accepted events of a flush add to the state later events are checked against
/// before the index learns it: datanets and their owners, contributions and their datanets,
/// model ids and their owners.
#[derive(Default)]
struct State {
    datanets: HashMap<DatanetId, Address>,
    contributions: HashMap<ContributionId, DatanetId>,
    models: HashMap<ModelId, Address>,
}

impl State {
    fn stage(&mut self, event: &Event) {
        match event {
            Event::DatanetCreated(d) => {
                self.datanets.entry(d.datanet_id.clone()).or_insert(d.owner);
            }
            Event::ContributionSubmitted(c) => {
                if let Some(cid) = &c.contribution_id {
                    self.contributions.entry(cid.clone()).or_insert_with(|| c.datanet_id.clone());
                }
            }
            Event::ModelRegistered(m) => {
                self.models.entry(m.model_id.clone()).or_insert(m.builder);
            }
            _ => {}
        }
    }

    fn absorb(&mut self, other: State) {
        for (k, v) in other.datanets {
            self.datanets.entry(k).or_insert(v);
        }
        for (k, v) in other.contributions {
            self.contributions.entry(k).or_insert(v);
        }
        for (k, v) in other.models {
            self.models.entry(k).or_insert(v);
        }
    }
}

/// The state checks of one event against the index and what this flush adds before it
/// (`flushed`: earlier requests of the flush; `staged`: earlier events of this request).
struct Lookup<'a> {
    index: &'a Index,
    flushed: &'a State,
    staged: &'a State,
    reserved: &'a [(ModelId, Price)],
    factory_root: &'a str,
}

type Check = Result<(), (&'static str, String)>;

impl Lookup<'_> {
    fn owner(&self, datanet: &DatanetId) -> Result<Option<Address>, Error> {
        if let Some(o) = self.flushed.datanets.get(datanet).or_else(|| self.staged.datanets.get(datanet)) {
            return Ok(Some(*o));
        }
        Ok(self.index.datanet_owner(datanet)?)
    }

    fn contribution_datanet(&self, c: &ContributionId) -> Result<Option<DatanetId>, Error> {
        if let Some(d) = self.flushed.contributions.get(c).or_else(|| self.staged.contributions.get(c)) {
            return Ok(Some(d.clone()));
        }
        Ok(self.index.contribution_datanet(c)?)
    }

    fn model_owner(&self, m: &ModelId) -> Result<Option<Address>, Error> {
        if let Some(o) = self.flushed.models.get(m).or_else(|| self.staged.models.get(m)) {
            return Ok(Some(*o));
        }
        Ok(self.index.model_owner(m)?)
    }

    fn check(&self, event: &Event) -> Result<Check, Error> {
        let unknown = |d: &DatanetId| Err(("datanet_id", format!("datanet {d} does not exist")));
        Ok(match event {
            Event::DatanetCreated(d) => match self.owner(&d.datanet_id)? {
                Some(_) => Err(("datanet_id", format!("datanet {} already exists", d.datanet_id))),
                None => Ok(()),
            },
            Event::DatanetUpdated(d) => match self.owner(&d.datanet_id)? {
                None => unknown(&d.datanet_id),
                Some(owner) if owner != d.updated_by => {
                    Err(("updated_by", format!("only the owner {owner} updates datanet {}", d.datanet_id)))
                }
                Some(_) => Ok(()),
            },
            Event::ContributionSubmitted(c) => match self.owner(&c.datanet_id)? {
                None => unknown(&c.datanet_id),
                // Who keeps a contribution id is decided by ingest order: the first
                // submission is the contribution, a copy signed later by anyone is refused.
                Some(_) => match c.contribution_id.as_ref().map(|cid| self.contribution_datanet(cid)).transpose()?.flatten() {
                    Some(_) => Err((
                        "contribution_id",
                        format!("this content was already contributed to datanet {} (the first submission keeps it)", c.datanet_id),
                    )),
                    None => Ok(()),
                },
            },
            Event::ContributionReviewed(r) => match self.owner(&r.datanet_id)? {
                None => unknown(&r.datanet_id),
                Some(owner) if owner != r.reviewer => {
                    Err(("reviewer", format!("reviews of datanet {} are signed by its owner {owner}", r.datanet_id)))
                }
                Some(_) => match self.contribution_datanet(&r.contribution_id)? {
                    Some(d) if d == r.datanet_id => Ok(()),
                    Some(d) => Err(("contribution_id", format!("contribution {} belongs to datanet {d}", r.contribution_id))),
                    None => Err(("contribution_id", format!("contribution {} does not exist", r.contribution_id))),
                },
            },
            Event::AccessGranted(a) => match self.owner(&a.datanet_id)? {
                None => unknown(&a.datanet_id),
                Some(owner) if owner != a.granted_by => {
                    Err(("granted_by", format!("only the owner {owner} grants access to datanet {}", a.datanet_id)))
                }
                Some(_) => Ok(()),
            },
            Event::AccessRequested(a) => match self.owner(&a.datanet_id)? {
                None => unknown(&a.datanet_id),
                Some(_) => Ok(()),
            },
            Event::AccessRevoked(a) => match self.owner(&a.datanet_id)? {
                None => unknown(&a.datanet_id),
                Some(owner) if owner != a.revoked_by => {
                    Err(("revoked_by", format!("only the owner {owner} revokes access to datanet {}", a.datanet_id)))
                }
                Some(_) => Ok(()),
            },
            // A model id belongs to its first registrant (ingest order); the base model's
            // id belongs to no participant.
            Event::ModelRegistered(m) if self.reserved.iter().any(|(id, _)| *id == m.model_id) => {
                Err(("model_id", format!("{} is the id of the base model this deployment serves; choose another id", m.model_id)))
            }
            Event::ModelRegistered(m) if !factory_dir_is_its_own(self.factory_root, m) => Err((
                "adapter_uri",
                format!("{} is a directory of ModelFactory's for another model: a registration names its own model's ({}{}/...)", m.adapter_uri, self.factory_root, m.model_id),
            )),
            Event::ModelRegistered(m) => match self.model_owner(&m.model_id)? {
                Some(owner) if owner != m.builder => {
                    Err(("model_id", format!("model {} belongs to its first registrant {owner}; only that builder registers it again", m.model_id)))
                }
                _ => Ok(()),
            },
            Event::EventVoided(v) => match self.index.contains_event(v.voided_event_id.as_str())? {
                true => Ok(()),
                false => Err(("voided_event_id", format!("no stored event has id {}", v.voided_event_id))),
            },
            Event::InferenceCompleted(_)
            | Event::FeeCharged(_)
            | Event::InferenceTokens(_)
            | Event::InferenceAttributed(_)
            | Event::InferenceCited(_)
            | Event::StakeChanged(_)
            | Event::EpochClosed(_)
            | Event::RewardEarned(_)
            | Event::AnchorLogged(_)
            | Event::TrainingRun(_)
            | Event::TrainingMetric(_) => Ok(()),
        })
    }
}
