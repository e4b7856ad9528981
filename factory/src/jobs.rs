//! Training jobs: the queue behind `/v1/training/jobs`.
//!
//! A job is a fine-tuning request planned when it is submitted (access checked, snapshots
//! pinned, so its id is its run id) and trained later, one at a time per process, oldest
//! first. Each job is a JSON file in `<root>/jobs/` rewritten at every change of status and
//! at every checkpoint; its run keeps its checkpoint in `<root>/<run id>/`, as `ledgerlake
//! model finetune` does. A process that stops while a job runs finds the job running when it
//! starts again and queues it first: it resumes from its checkpoint.
//!
//! What a finished run leaves (the adapter in the object store, its events in the lake)
//! goes through a [`Publisher`], which the binary implements; progress goes to whoever
//! [`Jobs::subscribe`]s (server-sent events).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ledgerlake_lakehouse::events::{Evaluation, Event, RunStatus};
use ledgerlake_lakehouse::{Address, Lake};
use ledgerlake_serving::model::Llama;
use ledgerlake_serving::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast};

use crate::{Error, FinetuneSpec, Outcome, Plan, Reporter, Result, StepReport, io};

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    /// Whether the job is over (nothing more happens to it unless it is submitted again).
    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

/// The per-step reports a job keeps (the newest); `training_metrics` has every step.
pub const MAX_METRICS: usize = 1000;

/// A training job as `GET /v1/training/jobs/{id}` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    /// The run id: a hash of the builder, the base model and the pinned request.
    pub id: String,
    pub status: JobStatus,
    /// The address the adapter is trained for (the `builder` of its registration).
    #[schema(value_type = String)]
    pub builder: Address,
    pub base_model: String,
    /// The request, its datanets pinned to the snapshot versions of the submission.
    pub spec: FinetuneSpec,
    /// The id of the API key that submitted it.
    pub submitted_by: String,
    pub submitted_at: DateTime<Utc>,
    /// Queue order: the lowest queued runs next.
    pub seq: u64,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub train_examples: usize,
    pub heldout_examples: usize,
    /// The newest step reports, oldest first (at most [`MAX_METRICS`]).
    pub metrics: Vec<StepReport>,
    /// The step a restarted or resubmitted run resumed from (0: from the start).
    pub resumed_from: Option<usize>,
    pub evaluation: Option<Evaluation>,
    pub adapter_uri: Option<String>,
    pub tokens_per_second: Option<f64>,
    pub peak_memory_bytes: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// A cancel was asked for while it ran; it stops at the next step.
    pub cancel_requested: bool,
}

/// What a job's watchers are told.
#[derive(Clone, Debug)]
pub enum Update {
    /// The job changed status (or was submitted): its whole state.
    Status(Box<Job>),
    /// A step finished.
    Progress(StepReport),
    /// A line of news (resumed, evaluating).
    Note(String),
}

/// Where a finished run goes: the binary stores adapters and sends events.
#[async_trait::async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Copies the files of `dir` under the object-store directory `uri`.
    async fn store(&self, dir: &Path, uri: &str) -> std::result::Result<(), String>;
    /// Makes `events` durable in the lake (all or none; duplicates of stored ids are fine).
    async fn send(&self, events: Vec<Event>) -> std::result::Result<(), String>;
}

/// Where a run's adapter is stored: `<lake root>_models/<model id>/<run id>/`, beside the
/// lake and never inside a table.
pub fn adapter_uri(lake: &Lake, plan: &Plan) -> String {
    format!("{}_models/{}/{}/", lake.config().root, plan.spec.name, plan.run_id)
}

/// The model jobs train over: the base the server serves.
pub struct Base {
    pub model: Arc<Llama>,
    pub tokenizer: Arc<Tokenizer>,
    pub name: String,
}

struct State {
    jobs: BTreeMap<String, Job>,
    next_seq: u64,
    /// The running job's cancel flag.
    running: Option<(String, Arc<AtomicBool>)>,
}

struct Inner {
    lake: Lake,
    base: Base,
    root: PathBuf,
    publisher: Arc<dyn Publisher>,
    max_queued: usize,
    state: Mutex<State>,
    wake: Notify,
    updates: broadcast::Sender<(String, Update)>,
}

/// The job queue and its runner (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Jobs(Arc<Inner>);

fn write_job(dir: &Path, job: &Job) -> Result<()> {
    let path = dir.join(format!("{}.json", job.id));
    let tmp = dir.join(format!(".{}.json.tmp", job.id));
    let json = serde_json::to_vec_pretty(job).map_err(|e| Error::Invalid(format!("job {}: {e}", job.id)))?;
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    std::io::Write::write_all(&mut f, &json).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

impl Jobs {
    /// Opens the jobs under `root` (`<state>/training`) and starts the runner, which first
    /// resumes a job that was running when the process stopped. At most `max_queued` jobs
    /// wait at a time.
    pub fn start(lake: Lake, base: Base, root: PathBuf, publisher: Arc<dyn Publisher>, max_queued: usize) -> Result<Jobs> {
        let dir = root.join("jobs");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut jobs = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read(&path).map_err(io(&path))?;
            let mut job: Job = match serde_json::from_slice(&text) {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "a job file that does not parse is left alone");
                    continue;
                }
            };
            if job.status == JobStatus::Running && job.cancel_requested {
                // Its cancel was accepted before the stop.
                job.status = JobStatus::Cancelled;
                job.finished_at = Some(Utc::now());
                write_job(&dir, &job)?;
            } else if job.status == JobStatus::Running {
                job.status = JobStatus::Queued;
                write_job(&dir, &job)?;
                tracing::info!(job = %job.id, "a job that was running when the server stopped is queued again; it resumes from its checkpoint");
            }
            jobs.insert(job.id.clone(), job);
        }
        let next_seq = jobs.values().map(|j| j.seq + 1).max().unwrap_or(0);
        let (updates, _) = broadcast::channel(1024);
        let inner = Inner {
            lake,
            base,
            root,
            publisher,
            max_queued,
            state: Mutex::new(State { jobs, next_seq, running: None }),
            wake: Notify::new(),
            updates,
        };
        let jobs = Jobs(Arc::new(inner));
        tokio::spawn(jobs.clone().run());
        Ok(jobs)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic mid-update of plain data; the data is still whole.
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dir(&self) -> PathBuf {
        self.0.root.join("jobs")
    }

    /// Applies `f` to job `id`, saves it and tells its watchers.
    fn update(&self, id: &str, f: impl FnOnce(&mut Job)) -> Result<Job> {
        self.update_locked(&mut self.state(), id, f)
    }

    /// [`Jobs::update`] under a lock already held: the change is saved before it is made
    /// in memory (a failed write changes nothing), and told while the lock is held, so
    /// watchers see the changes in their order.
    fn update_locked(&self, state: &mut State, id: &str, f: impl FnOnce(&mut Job)) -> Result<Job> {
        let mut job = state.jobs.get(id).cloned().ok_or_else(|| Error::NotFound(format!("no training job {id}")))?;
        f(&mut job);
        write_job(&self.dir(), &job)?;
        state.jobs.insert(id.to_owned(), job.clone());
        let _ = self.0.updates.send((id.to_owned(), Update::Status(Box::new(job.clone()))));
        Ok(job)
    }

    /// Every update of every job, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<(String, Update)> {
        self.0.updates.subscribe()
    }

    pub fn get(&self, id: &str) -> Option<Job> {
        self.state().jobs.get(id).cloned()
    }

    /// All jobs, newest submission first.
    pub fn list(&self) -> Vec<Job> {
        let mut jobs: Vec<Job> = self.state().jobs.values().cloned().collect();
        jobs.sort_by(|a, b| b.seq.cmp(&a.seq));
        jobs
    }

    /// Plans the request (access, pinned snapshots) and queues it. The same request again
    /// (same builder and pinned snapshots) is the same job: a queued, running or finished
    /// one is returned as it is (`false`); a failed or cancelled one is queued again and
    /// resumes from its checkpoint (`true`, as for a new job).
    pub async fn submit(&self, builder: Address, submitted_by: &str, spec: FinetuneSpec) -> Result<(Job, bool)> {
        if spec.qlora && !crate::is_quantized(&self.0.base.model) {
            return Err(Error::Invalid(format!(
                "QLoRA trains over a quantized base; this server's base {} is dense: leave out qlora",
                self.0.base.name
            )));
        }
        let plan = crate::plan(&self.0.lake, builder, &self.0.base.name, spec).await?;
        let mut spec = plan.spec.clone();
        spec.datanets = plan.snapshots.iter().map(|v| format!("{}@{}", v.datanet_id, v.version)).collect();
        let mut state = self.state();
        let queued = state.jobs.values().filter(|j| j.status == JobStatus::Queued).count();
        let seq = state.next_seq;
        let job = match state.jobs.get(&plan.run_id).cloned() {
            // Being cancelled: the cancel is withdrawn and the run goes on.
            Some(j) if j.status == JobStatus::Running && j.cancel_requested => {
                if let Some((_, flag)) = state.running.as_ref().filter(|(r, _)| *r == j.id) {
                    flag.store(false, Ordering::Relaxed);
                }
                let job = self.update_locked(&mut state, &j.id, |j| j.cancel_requested = false)?;
                return Ok((job, true));
            }
            Some(j) if !matches!(j.status, JobStatus::Failed | JobStatus::Cancelled) => return Ok((j, false)),
            _ if queued >= self.0.max_queued => {
                return Err(Error::Busy(format!("{queued} training jobs are waiting already; submit again later")));
            }
            Some(mut j) => {
                j.status = JobStatus::Queued;
                j.seq = seq;
                j.error = None;
                j.finished_at = None;
                j.cancel_requested = false;
                j
            }
            None => Job {
                id: plan.run_id.clone(),
                status: JobStatus::Queued,
                builder,
                base_model: plan.base_model.clone(),
                spec,
                submitted_by: submitted_by.to_owned(),
                submitted_at: Utc::now(),
                seq,
                started_at: None,
                finished_at: None,
                train_examples: plan.train.len(),
                heldout_examples: plan.heldout.len(),
                metrics: Vec::new(),
                resumed_from: None,
                evaluation: None,
                adapter_uri: None,
                tokens_per_second: None,
                peak_memory_bytes: None,
                error: None,
                cancel_requested: false,
            },
        };
        write_job(&self.dir(), &job)?;
        state.next_seq += 1;
        state.jobs.insert(job.id.clone(), job.clone());
        let _ = self.0.updates.send((job.id.clone(), Update::Status(Box::new(job.clone()))));
        drop(state);
        self.0.wake.notify_one();
        Ok((job, true))
    }

    /// Cancels job `id`: a queued job is cancelled now; a running one stops at its next step
    /// (its checkpoint stays, so submitting it again resumes it). A finished job is a
    /// conflict.
    pub fn cancel(&self, id: &str) -> Result<Job> {
        // One critical section: the runner starts and ends jobs under the same lock.
        let mut state = self.state();
        let job = state.jobs.get(id).ok_or_else(|| Error::NotFound(format!("no training job {id}")))?;
        if job.status.is_final() {
            return Err(Error::Conflict(format!("training job {id} is {} already", serde_json::json!(job.status).as_str().unwrap_or("over"))));
        }
        match state.running.as_ref().filter(|(r, _)| r == id).map(|(_, flag)| flag.clone()) {
            Some(flag) => {
                flag.store(true, Ordering::Relaxed);
                self.update_locked(&mut state, id, |j| j.cancel_requested = true)
            }
            None => self.update_locked(&mut state, id, |j| {
                j.status = JobStatus::Cancelled;
                j.finished_at = Some(Utc::now());
            }),
        }
    }

    /// The oldest queued job, marked running (in one critical section, so a cancel sees it
    /// either queued or running with its flag).
    fn next(&self) -> Option<(Job, Arc<AtomicBool>)> {
        let flag = Arc::new(AtomicBool::new(false));
        let job = {
            let mut state = self.state();
            let id = state.jobs.values().filter(|j| j.status == JobStatus::Queued).min_by_key(|j| j.seq).map(|j| j.id.clone())?;
            let job = state.jobs.get_mut(&id)?;
            job.status = JobStatus::Running;
            job.started_at = Some(Utc::now());
            if let Err(e) = write_job(&self.dir(), job) {
                // The job runs anyway; a restart finds it queued and runs it again.
                tracing::warn!(job = %id, error = %e, "the start of a job could not be saved");
            }
            let job = job.clone();
            state.running = Some((id, flag.clone()));
            let _ = self.0.updates.send((job.id.clone(), Update::Status(Box::new(job.clone()))));
            job
        };
        Some((job, flag))
    }

    async fn run(self) {
        loop {
            match self.next() {
                Some((job, cancel)) => {
                    let id = job.id.clone();
                    let (status, error) = match self.execute(job, cancel).await {
                        Ok(()) => (JobStatus::Succeeded, None),
                        Err(Error::Cancelled) => (JobStatus::Cancelled, None),
                        Err(e) => {
                            tracing::warn!(job = %id, error = %e, "a training job failed");
                            (JobStatus::Failed, Some(e.to_string()))
                        }
                    };
                    let mut state = self.state();
                    state.running = None;
                    let saved = self.update_locked(&mut state, &id, |j| {
                        j.status = status;
                        j.error = error;
                        j.finished_at = Some(Utc::now());
                        j.cancel_requested &= status == JobStatus::Cancelled;
                    });
                    drop(state);
                    if let Err(e) = saved {
                        tracing::error!(job = %id, error = %e, "the end of a job could not be saved");
                    }
                }
                None => self.0.wake.notified().await,
            }
        }
    }

    /// Sends events, retrying a storage failure a few times (the ids make a repeat harmless).
    async fn send(&self, events: Vec<Event>) -> Result<()> {
        retry(|| self.0.publisher.send(events.clone())).await.map_err(Error::Report)
    }

    async fn execute(&self, job: Job, cancel: Arc<AtomicBool>) -> Result<()> {
        let started = Utc::now();
        let plan = crate::plan(&self.0.lake, job.builder, &self.0.base.name, job.spec.clone()).await?;
        if plan.run_id != job.id {
            return Err(Error::Invalid(format!("the pinned request now plans as run {}, not {}", plan.run_id, job.id)));
        }
        let work = self.0.root.join(&plan.run_id);
        std::fs::create_dir_all(&work).map_err(io(&work))?;
        let reporter = JobReporter { jobs: self.clone(), id: job.id.clone(), runtime: tokio::runtime::Handle::current() };
        let (model, tok) = (self.0.base.model.clone(), self.0.base.tokenizer.clone());
        let training = plan.clone();
        let flag = cancel.clone();
        let trained = tokio::task::spawn_blocking(move || crate::train(&training, model, &tok, &work, &reporter, &flag))
            .await
            .unwrap_or_else(|e| Err(Error::Invalid(format!("the training task stopped: {e}"))));
        let outcome: Outcome = match trained {
            Ok(o) => o,
            Err(e) => {
                let status = if matches!(e, Error::Cancelled) { RunStatus::Cancelled } else { RunStatus::Failed };
                let message = (status == RunStatus::Failed).then(|| e.to_string());
                if let Err(send) = self.send(vec![crate::ended_event(&plan, status, message, started)]).await {
                    tracing::warn!(job = %job.id, error = %send, "the end of a run could not be recorded");
                }
                return Err(e);
            }
        };
        let uri = adapter_uri(&self.0.lake, &plan);
        retry(|| self.0.publisher.store(&outcome.adapter_dir, &uri)).await.map_err(|e| Error::Report(format!("storing the adapter: {e}")))?;
        self.send(crate::events(&plan, &outcome, &uri)).await?;
        self.update(&job.id, |j| {
            j.resumed_from = Some(outcome.resumed_from);
            j.evaluation = Some(outcome.evaluation.clone());
            j.adapter_uri = Some(uri.clone());
            j.tokens_per_second = Some(outcome.tokens_per_second);
            j.peak_memory_bytes = Some(outcome.peak_memory_bytes);
        })?;
        Ok(())
    }
}

async fn retry<F, Fut>(mut f: F) -> std::result::Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), String>>,
{
    let mut tries = 0;
    loop {
        match f().await {
            Ok(()) => return Ok(()),
            Err(e) if tries >= 4 => return Err(e),
            Err(e) => {
                tries += 1;
                tracing::warn!(error = %e, "publishing a training run failed; retrying");
                tokio::time::sleep(Duration::from_secs(1 << tries)).await;
            }
        }
    }
}

/// A running job's reporter: progress to the watchers, metric events to the publisher,
/// the job file saved at every checkpoint.
struct JobReporter {
    jobs: Jobs,
    id: String,
    runtime: tokio::runtime::Handle,
}

impl Reporter for JobReporter {
    fn step(&self, report: &StepReport) {
        let mut state = self.jobs.state();
        if let Some(job) = state.jobs.get_mut(&self.id) {
            if job.metrics.len() >= MAX_METRICS {
                job.metrics.remove(0);
            }
            job.metrics.push(report.clone());
        }
        let _ = self.jobs.0.updates.send((self.id.clone(), Update::Progress(report.clone())));
    }

    fn note(&self, text: &str) {
        let _ = self.jobs.0.updates.send((self.id.clone(), Update::Note(text.to_owned())));
    }

    fn events(&self, events: Vec<Event>) -> std::result::Result<(), String> {
        self.runtime.block_on(self.jobs.send(events)).map_err(|e| e.to_string())?;
        let state = self.jobs.state();
        match state.jobs.get(&self.id) {
            Some(job) => write_job(&self.jobs.dir(), job).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}
