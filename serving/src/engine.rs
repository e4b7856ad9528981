//! The continuous-batching engine: one thread runs the model in steps; every step mixes
//! the prompts of newly admitted requests with one new token of each running request, for
//! any adapters and the bare base model together.
//!
//! Adapters live in two levels, as in S-LoRA: `max_cpu_loras` loaded in host memory
//! (least recently used evicted, never one in use), and at most `max_loras` distinct ones
//! active in a batch. An adapter not in memory is loaded on first request by a loader
//! thread while the engine keeps serving everybody else; its requests wait until it is
//! there. On the CPU device the active level shares the host copy (no weight copy at all);
//! on a GPU an adapter is copied to the device when a batch first needs it, and device
//! copies beyond `max_loras` that no running request uses are dropped, least recently
//! used first.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use ledgerlake_lakehouse::Price;
use rayon::prelude::*;
use tokio::sync::mpsc;

use crate::lora::Adapter;
use crate::metrics::Metrics;
use crate::model::{KvCache, Llama, StepSeq};
use crate::sampling::{Sampler, SamplingParams, TokenLogprob, logprobs};
use crate::tokenizer::{TextStream, Tokenizer};

/// Limits of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences decoded together in one step.
    pub max_running: usize,
    /// Distinct adapters active in one batch.
    pub max_loras: usize,
    /// Adapters kept loaded in host memory.
    pub max_cpu_loras: usize,
    /// Requests waiting beyond the running ones; more are refused as overload.
    pub max_waiting: usize,
    /// Prompt tokens admitted into one step (a long prompt still goes alone).
    pub max_prefill_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_running: 32, max_loras: 32, max_cpu_loras: 128, max_waiting: 1024, max_prefill_tokens: 2048 }
    }
}

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End of sequence or a stop string.
    Stop,
    /// `max_tokens` or the model's context.
    Length,
    /// The caller went away before the end.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

/// What a request streams back.
#[derive(Debug)]
pub enum Output {
    /// New text (stop strings already held back and cut).
    Text(String),
    /// The log-probabilities of the tokens whose text the next `Text` sends (when the
    /// request asked for them).
    Logprobs(Vec<TokenLogprob>),
    Finished(Completion),
    Failed(EngineError),
}

/// A finished request, as the caller and the accounting see it.
#[derive(Clone, Debug)]
pub struct Completion {
    pub request_id: String,
    /// The adapter name, or the base model's.
    pub model: String,
    pub caller: String,
    pub text: String,
    pub finish_reason: FinishReason,
    /// Prompt tokens billed (0 for the extra choices of an `n > 1` request).
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// From submission to the end.
    pub latency: Duration,
    /// From submission to admission into the batch.
    pub queue_time: Duration,
    /// The model's price when the request was accepted: what the caller is charged at.
    pub price: Price,
    /// Each generated token's log-probability, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
    /// The prompt's token ids as the model read them (chat template applied).
    pub prompt_ids: Vec<u32>,
    /// The generated token ids counted in `completion_tokens`.
    pub output_ids: Vec<u32>,
    /// The passages retrieval put into the prompt.
    pub citations: Vec<crate::retrieval::Citation>,
}

/// Makes the accounting of every finished request durable (also of the cancelled ones).
///
/// The engine calls it on its own accounting thread, never on the scheduler, and the
/// caller sees the end of its answer (the final chunk of a stream, the whole of a plain
/// answer) only once it returned `Ok`. On `Err` the request fails instead, with a message
/// for the caller that names no internals (log those).
pub trait CompletionSink: Send + Sync {
    fn record(&self, completion: &Completion) -> Result<(), String>;

    /// Makes a streamed answer's worst-case bill durable before any of its output is sent
    /// (`record` replaces it when the answer ends). On `Err` the request is refused,
    /// nothing sent. A sink without holds accepts every one.
    fn hold(&self, _hold: &Hold) -> Result<(), String> {
        Ok(())
    }

    /// Drops the hold of a request that ends without a charge (refused, or failed by the
    /// server): nothing of it is billed. Quick (no fsync): a hold left by a crash in
    /// between is billed, which errs on the side of billing.
    fn release(&self, _request_id: &str) {}
}

/// What a streamed answer can cost at most, held before its first token: its prompt (when
/// billed with it) and `max_tokens` completion tokens at the price it is served at.
#[derive(Clone, Debug, PartialEq)]
pub struct Hold {
    pub request_id: String,
    /// The adapter name, or the base model's.
    pub model: String,
    pub caller: String,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub price: Price,
}

/// What the engine refuses or fails with.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("The model `{0}` does not exist")]
    UnknownModel(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the server is overloaded ({0} requests waiting); retry later")]
    Overloaded(usize),
    #[error("loading adapter `{name}`: {message}")]
    AdapterLoad { name: String, message: String },
    /// An adapter failed inside a step; the other requests of the batch went on.
    #[error("adapter `{name}` failed: {message}")]
    AdapterFailed { name: String, message: String },
    /// The request conflicts with how the adapter was registered.
    #[error("{0}")]
    Conflict(String),
    /// The answer was not delivered because its billing could not be made durable.
    #[error("{0}")]
    Accounting(String),
    #[error("the engine has stopped")]
    Stopped,
    #[error("inference failed: {0}")]
    Internal(String),
}

/// One generation request.
pub struct Request {
    pub id: String,
    /// An adapter name; `None` is the base model.
    pub adapter: Option<String>,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub caller: String,
    /// Log-probabilities of each generated token and this many alternatives.
    pub logprobs: Option<usize>,
    /// Whether the prompt's tokens are billed with this request: the extra choices of an
    /// `n > 1` request share the first one's prompt, which OpenAI bills once.
    pub bill_prompt: bool,
    /// The passages retrieval put into the prompt, which the completion cites.
    pub citations: Vec<crate::retrieval::Citation>,
    pub output: mpsc::UnboundedSender<Output>,
}

/// Who registered an adapter, which decides who may take it away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A `model.registered` event in the lake: the lake decides (its latest registration
    /// wins), so an admin cannot unload it.
    Lake,
    /// `POST /v1/load_lora_adapter`: an admin loads and unloads it.
    Admin,
}

/// An adapter the server can serve, by name.
#[derive(Clone, Debug)]
pub struct AdapterEntry {
    pub name: String,
    pub path: PathBuf,
    /// What its requests are charged.
    pub price: Price,
    pub source: Source,
    /// Seconds since the epoch.
    pub created: u64,
}

enum Command {
    Submit(Box<Request>, Instant, Price),
    Loaded { name: String, path: PathBuf, result: Result<Adapter, String>, took: Duration },
    /// Forget the loaded weights (the adapter is gone or now points elsewhere); `fail`
    /// also refuses its waiting requests.
    Evict { name: String, fail: bool },
}

/// A finished request on its way to the accounting thread.
type Accounted = (Completion, mpsc::UnboundedSender<Output>);

/// A handle to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: std_mpsc::Sender<Command>,
    registry: Arc<Mutex<HashMap<String, AdapterEntry>>>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    base_name: Arc<str>,
    base_price: Price,
    model: Arc<Llama>,
    pub tokenizer: Arc<Tokenizer>,
    pub metrics: Arc<Metrics>,
    max_positions: usize,
    pub created: u64,
    /// The accounting sink, for holds (completions go through the accounting thread).
    sink: Arc<dyn CompletionSink>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Engine {
    /// Starts the engine thread, its adapter loader and its accounting thread. Requests
    /// for the base model are charged `base_price`.
    pub fn start(
        base_name: &str,
        base_price: Price,
        model: Arc<Llama>,
        tokenizer: Arc<Tokenizer>,
        config: EngineConfig,
        sink: Arc<dyn CompletionSink>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = std_mpsc::channel();
        let registry = Arc::new(Mutex::new(HashMap::new()));
        let waiting = Arc::new(AtomicUsize::new(0));
        let (load_tx, load_rx) = std_mpsc::channel::<(String, PathBuf)>();
        let loaded_tx = tx.clone();
        let for_loader = model.clone();
        std::thread::Builder::new()
            .name("adapter-loader".into())
            .spawn(move || {
                while let Ok((name, path)) = load_rx.recv() {
                    let started = Instant::now();
                    let result = load_checked(&for_loader, &path);
                    if loaded_tx.send(Command::Loaded { name, path, result, took: started.elapsed() }).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning a thread only fails when the OS is out of resources");
        // Durable accounting (an fsync per completion) runs here, off the scheduler.
        let holds = sink.clone();
        let (accounted_tx, accounted_rx) = std_mpsc::channel::<Accounted>();
        std::thread::Builder::new()
            .name("accounting".into())
            .spawn(move || {
                while let Ok((completion, output)) = accounted_rx.recv() {
                    let _ = output.send(match sink.record(&completion) {
                        Ok(()) => Output::Finished(completion),
                        Err(message) => Output::Failed(EngineError::Accounting(message)),
                    });
                }
            })
            .expect("spawning a thread only fails when the OS is out of resources");
        let max_positions = model.config.max_position_embeddings;
        let state = Scheduler {
            base_name: base_name.to_owned(),
            model: model.clone(),
            tokenizer: tokenizer.clone(),
            config: config.clone(),
            accounted: accounted_tx,
            sink: holds.clone(),
            metrics: metrics.clone(),
            registry: registry.clone(),
            waiting_count: waiting.clone(),
            load_tx,
            waiting: VecDeque::new(),
            running: Vec::new(),
            cpu: HashMap::new(),
            loading: HashSet::new(),
            clock: 0,
        };
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || state.run(rx))
            .expect("spawning a thread only fails when the OS is out of resources");
        Self {
            tx,
            registry,
            waiting,
            max_waiting: config.max_waiting,
            base_name: base_name.into(),
            base_price,
            model,
            tokenizer,
            metrics,
            max_positions,
            created: now_secs(),
            sink: holds,
        }
    }

    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    /// What requests for the base model are charged.
    pub fn base_price(&self) -> Price {
        self.base_price
    }

    /// Loads the adapter at `path` and checks it against the base model, as its first
    /// request would, so a bad one is refused when it is registered. Blocking (reads
    /// the weights).
    pub fn check_adapter(&self, path: &std::path::Path) -> Result<(), String> {
        load_checked(&self.model, path).map(|_| ())
    }

    /// Queues a request, or refuses it at once (unknown model, bad parameters, overload).
    /// The price `adapter` (the base model for `None`) is served at now.
    fn price_of(&self, adapter: Option<&str>) -> Result<Price, EngineError> {
        match adapter {
            None => Ok(self.base_price),
            Some(name) => match self.registry.lock().map_err(|_| EngineError::Stopped)?.get(name) {
                Some(entry) => Ok(entry.price),
                None => Err(EngineError::UnknownModel(name.to_owned())),
            },
        }
    }

    /// Makes `request`'s worst-case bill durable (the sink's hold), before it is submitted
    /// and any of its output can be sent: what a stream does first.
    pub async fn hold(&self, request: &Request) -> Result<(), EngineError> {
        let hold = Hold {
            request_id: request.id.clone(),
            model: request.adapter.clone().unwrap_or_else(|| self.base_name.to_string()),
            caller: request.caller.clone(),
            prompt_tokens: if request.bill_prompt { request.prompt.len() } else { 0 },
            // No answer is longer than the context leaves it.
            max_tokens: request.max_tokens.min(self.max_positions.saturating_sub(request.prompt.len())),
            price: self.price_of(request.adapter.as_deref())?,
        };
        let sink = self.sink.clone();
        match tokio::task::spawn_blocking(move || sink.hold(&hold)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(EngineError::Accounting(message)),
            Err(e) => Err(EngineError::Internal(format!("the hold's writer failed: {e}"))),
        }
    }

    /// Drops a request's hold (it was refused before it ran).
    pub fn release(&self, request_id: &str) {
        self.sink.release(request_id);
    }

    pub fn submit(&self, request: Request) -> Result<(), EngineError> {
        // The price is fixed now: a request is never served at a price the server does
        // not know, and a later re-registration does not reprice it.
        let price = self.price_of(request.adapter.as_deref())?;
        if request.prompt.is_empty() {
            return Err(EngineError::BadRequest("the prompt is empty".into()));
        }
        if request.prompt.len() >= self.max_positions {
            return Err(EngineError::BadRequest(format!(
                "the prompt has {} tokens; this model's context is {} tokens",
                request.prompt.len(),
                self.max_positions
            )));
        }
        request.sampling.check().map_err(EngineError::BadRequest)?;
        let waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Overloaded(waiting));
        }
        self.metrics.requests_waiting.inc();
        self.tx.send(Command::Submit(Box::new(request), Instant::now(), price)).map_err(|_| EngineError::Stopped)
    }

    /// Makes an adapter servable by name (loaded on its first request) at `price`.
    /// Replaces an entry of the same name: new requests get the new price, and if the
    /// path changed, the old weights are dropped so the next request loads the new ones
    /// (running requests finish on what they started with).
    pub fn register(&self, name: &str, path: PathBuf, price: Price, source: Source) -> Result<(), EngineError> {
        if name.is_empty() || name == &*self.base_name {
            return Err(EngineError::BadRequest(format!("`{name}` cannot name an adapter")));
        }
        let mut reg = self.registry.lock().map_err(|_| EngineError::Stopped)?;
        let moved = reg.get(name).is_some_and(|old| old.path != path);
        let created = reg.get(name).filter(|_| !moved).map_or_else(now_secs, |old| old.created);
        reg.insert(name.to_owned(), AdapterEntry { name: name.to_owned(), path, price, source, created });
        self.metrics.adapters_registered.set(reg.len() as i64);
        drop(reg);
        if moved {
            self.tx.send(Command::Evict { name: name.to_owned(), fail: false }).map_err(|_| EngineError::Stopped)?;
        }
        Ok(())
    }

    /// Forgets an adapter an admin loaded: new requests for it are refused and its memory
    /// is freed once no running request uses it. An adapter registered in the lake is
    /// refused with [`EngineError::Conflict`]: the lake would bring it back.
    pub fn unregister(&self, name: &str) -> Result<bool, EngineError> {
        let mut reg = self.registry.lock().map_err(|_| EngineError::Stopped)?;
        if reg.get(name).is_some_and(|e| e.source == Source::Lake) {
            return Err(EngineError::Conflict(format!(
                "`{name}` is registered in the lake by a model.registered event and cannot be unloaded here; \
                 its latest registration decides how it is served"
            )));
        }
        let removed = reg.remove(name).is_some();
        self.metrics.adapters_registered.set(reg.len() as i64);
        drop(reg);
        if removed {
            self.tx.send(Command::Evict { name: name.to_owned(), fail: true }).map_err(|_| EngineError::Stopped)?;
        }
        Ok(removed)
    }

    /// The registration of one adapter.
    pub fn adapter(&self, name: &str) -> Option<AdapterEntry> {
        self.registry.lock().ok().and_then(|r| r.get(name).cloned())
    }

    /// Every registered adapter, by name.
    pub fn adapters(&self) -> Vec<AdapterEntry> {
        let mut out: Vec<AdapterEntry> = self.registry.lock().map(|r| r.values().cloned().collect()).unwrap_or_default();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn is_registered(&self, name: &str) -> bool {
        self.registry.lock().map(|r| r.contains_key(name)).unwrap_or(false)
    }
}

/// Loads an adapter on the CPU, checks it against the base model and puts it in the
/// model's layout.
fn load_checked(model: &Llama, path: &std::path::Path) -> Result<Adapter, String> {
    let adapter = Adapter::load(path, &Device::Cpu, DType::F32).map_err(|e| e.to_string())?;
    model.fit_adapter(adapter)
}

/// A loaded adapter and when it was last used (for LRU).
struct Resident {
    adapter: Arc<Adapter>,
    /// Its copy on the model's device, when that is not the CPU.
    on_device: Option<Arc<Adapter>>,
    last_used: u64,
}

struct Seq {
    request: Box<Request>,
    price: Price,
    adapter: Option<Arc<Adapter>>,
    cache: KvCache,
    /// Tokens the next step feeds: the prompt at first, then the last sampled token.
    pending: Vec<u32>,
    generated: Vec<u32>,
    sampler: Sampler,
    logprobs: Vec<TokenLogprob>,
    /// Log-probabilities already sent.
    logprobs_sent: usize,
    stream: TextStream,
    /// Bytes of the decoded text already sent.
    sent: usize,
    submitted: Instant,
    queue_time: Duration,
    last_token: Instant,
}

struct Scheduler {
    base_name: String,
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    accounted: std_mpsc::Sender<Accounted>,
    /// For releasing the holds of requests that fail without a charge.
    sink: Arc<dyn CompletionSink>,
    metrics: Arc<Metrics>,
    registry: Arc<Mutex<HashMap<String, AdapterEntry>>>,
    waiting_count: Arc<AtomicUsize>,
    load_tx: std_mpsc::Sender<(String, PathBuf)>,
    waiting: VecDeque<(Box<Request>, Instant, Price)>,
    running: Vec<Seq>,
    cpu: HashMap<String, Resident>,
    loading: HashSet<String>,
    clock: u64,
}

impl Scheduler {
    fn run(mut self, rx: std_mpsc::Receiver<Command>) {
        loop {
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) if self.running.is_empty() && self.waiting.is_empty() => return,
                    Err(std_mpsc::TryRecvError::Disconnected) => break,
                }
            }
            self.admit();
            if self.running.is_empty() {
                // Nothing can run until something arrives (a request or a loaded adapter).
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
                continue;
            }
            self.step();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(request, at, price) => self.waiting.push_back((request, at, price)),
            Command::Loaded { name, path, result, took } => {
                self.loading.remove(&name);
                // Weights of a path the adapter no longer points to are dropped (its
                // waiting requests start a load of the new path).
                let current = self.registry.lock().map(|r| r.get(&name).is_some_and(|e| e.path == path)).unwrap_or(false);
                match result {
                    Ok(adapter) if current => {
                        self.metrics.adapters_loaded.inc();
                        self.metrics.adapter_load_seconds.observe(took.as_secs_f64());
                        self.clock += 1;
                        self.cpu.insert(name, Resident { adapter: Arc::new(adapter), on_device: None, last_used: self.clock });
                        self.evict();
                    }
                    Ok(_) => {} // unregistered while loading
                    Err(message) => {
                        let error = EngineError::AdapterLoad { name: name.clone(), message };
                        self.fail_waiting(|r| r.adapter.as_deref() == Some(&name), &error);
                    }
                }
            }
            Command::Evict { name, fail } => {
                if self.cpu.remove(&name).is_some() {
                    self.metrics.adapters_evicted.inc();
                }
                if fail {
                    let error = EngineError::UnknownModel(name.clone());
                    self.fail_waiting(|r| r.adapter.as_deref() == Some(&name), &error);
                }
            }
        }
        self.metrics.adapters_resident.set(self.cpu.len() as i64);
    }

    fn fail_waiting(&mut self, which: impl Fn(&Request) -> bool, error: &EngineError) {
        let (failed, kept): (Vec<_>, Vec<_>) = self.waiting.drain(..).partition(|(r, _, _)| which(r));
        self.waiting = kept.into();
        for (r, _, _) in failed {
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
            self.metrics.requests_waiting.dec();
            self.sink.release(&r.id);
            let _ = r.output.send(Output::Failed(error.clone()));
        }
    }

    /// Evicts least recently used adapters beyond `max_cpu_loras`, never one that a
    /// running or waiting request needs.
    fn evict(&mut self) {
        while self.cpu.len() > self.config.max_cpu_loras {
            let in_use: HashSet<&str> = self
                .running
                .iter()
                .filter_map(|s| s.request.adapter.as_deref())
                .chain(self.waiting.iter().filter_map(|(r, _, _)| r.adapter.as_deref()))
                .collect();
            let victim = self.cpu.iter().filter(|(n, _)| !in_use.contains(n.as_str())).min_by_key(|(_, r)| r.last_used).map(|(n, _)| n.clone());
            match victim {
                Some(name) => {
                    self.cpu.remove(&name);
                    self.metrics.adapters_evicted.inc();
                }
                None => break,
            }
        }
    }

    /// Keeps at most `max_loras` adapters copied to the device, dropping the least
    /// recently used copies that no running request holds.
    fn release_device_copies(&mut self) {
        let mut copies: Vec<(u64, String)> = self.cpu.iter().filter(|(_, r)| r.on_device.is_some()).map(|(n, r)| (r.last_used, n.clone())).collect();
        let excess = copies.len().saturating_sub(self.config.max_loras);
        if excess == 0 {
            return;
        }
        let in_use: HashSet<&str> = self.running.iter().filter_map(|s| s.request.adapter.as_deref()).collect();
        copies.retain(|(_, n)| !in_use.contains(n.as_str()));
        copies.sort();
        for (_, name) in copies.into_iter().take(excess) {
            if let Some(resident) = self.cpu.get_mut(&name) {
                resident.on_device = None;
            }
        }
    }

    /// Moves waiting requests into the batch, in arrival order, as far as the limits
    /// allow; a request whose adapter is not loaded yet starts its load and waits
    /// without holding up the others.
    fn admit(&mut self) {
        let mut active: HashSet<String> = self.running.iter().filter_map(|s| s.request.adapter.clone()).collect();
        let mut prefill = 0;
        let mut i = 0;
        while i < self.waiting.len() && self.running.len() < self.config.max_running {
            let (request, _, _) = &self.waiting[i];
            if request.output.is_closed() {
                // Gone before it started: nothing was computed, nothing to account.
                self.waiting.remove(i);
                self.waiting_count.fetch_sub(1, Ordering::SeqCst);
                self.metrics.requests_waiting.dec();
                continue;
            }
            if prefill > 0 && prefill + request.prompt.len() > self.config.max_prefill_tokens {
                break;
            }
            let adapter = match &request.adapter {
                None => None,
                Some(name) => {
                    if !self.cpu.contains_key(name) {
                        if !self.loading.contains(name) {
                            let path = self.registry.lock().ok().and_then(|r| r.get(name).map(|e| e.path.clone()));
                            match path {
                                Some(path) => {
                                    self.loading.insert(name.clone());
                                    let _ = self.load_tx.send((name.clone(), path));
                                }
                                None => {
                                    let name = name.clone();
                                    self.fail_waiting(|r| r.adapter.as_deref() == Some(&name), &EngineError::UnknownModel(name.clone()));
                                    continue;
                                }
                            }
                        }
                        i += 1;
                        continue;
                    }
                    if !active.contains(name) && active.len() >= self.config.max_loras {
                        i += 1;
                        continue;
                    }
                    self.clock += 1;
                    let resident = self.cpu.get_mut(name).expect("checked above");
                    resident.last_used = self.clock;
                    let device = self.model.device();
                    let chosen = if device.is_cpu() {
                        Some(resident.adapter.clone())
                    } else if let Some(copy) = &resident.on_device {
                        Some(copy.clone())
                    } else {
                        match resident.adapter.to_device(device) {
                            Ok(copy) => {
                                let copy = Arc::new(copy);
                                resident.on_device = Some(copy.clone());
                                Some(copy)
                            }
                            Err(e) => {
                                let name = name.clone();
                                let error = EngineError::AdapterLoad { name: name.clone(), message: e.to_string() };
                                self.fail_waiting(|r| r.adapter.as_deref() == Some(&name), &error);
                                continue;
                            }
                        }
                    };
                    active.insert(name.clone());
                    chosen
                }
            };
            let Some((request, submitted, price)) = self.waiting.remove(i) else { break };
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
            self.metrics.requests_waiting.dec();
            prefill += request.prompt.len();
            let queue_time = submitted.elapsed();
            self.metrics.queue_seconds.observe(queue_time.as_secs_f64());
            self.running.push(Seq {
                pending: request.prompt.clone(),
                sampler: Sampler::new(request.sampling.clone()).with_prompt(&request.prompt),
                logprobs: Vec::new(),
                logprobs_sent: 0,
                request,
                price,
                adapter,
                cache: KvCache::default(),
                generated: Vec::new(),
                stream: TextStream::default(),
                sent: 0,
                submitted,
                queue_time,
                last_token: Instant::now(),
            });
        }
        self.metrics.adapters_active.set(active.len() as i64);
        let waiting_adapters: HashSet<&str> = self.waiting.iter().filter_map(|(r, _, _)| r.adapter.as_deref()).collect();
        self.metrics.adapters_waiting.set(waiting_adapters.len() as i64);
        self.metrics.requests_running.set(self.running.len() as i64);
    }

    fn step(&mut self) {
        // Group by adapter so each adapter's rows are one segment.
        self.running.sort_by(|a, b| a.request.adapter.cmp(&b.request.adapter));
        let rows = self.run_model();
        let eos = self.model.eos_ids();
        let max_positions = self.model.config.max_position_embeddings;
        let mut finished = Vec::new();
        let mut failed = Vec::new();
        // Each sequence draws its token (and its log-probabilities) in parallel: a softmax
        // over the vocabulary per sequence adds up in a large batch.
        let drawn: Vec<Option<(u32, Option<TokenLogprob>)>> = self
            .running
            .par_iter_mut()
            .zip(&rows)
            .map(|(seq, logits)| {
                let logits = logits.as_ref().ok().filter(|_| !seq.request.output.is_closed())?;
                let id = seq.sampler.sample(logits);
                Some((id, seq.request.logprobs.map(|top| logprobs(logits, id, top))))
            })
            .collect();
        for (i, ((seq, logits), drawn)) in self.running.iter_mut().zip(rows).zip(drawn).enumerate() {
            let now = Instant::now();
            if !seq.generated.is_empty() {
                self.metrics.time_per_token_seconds.observe((now - seq.last_token).as_secs_f64());
            }
            seq.last_token = now;
            if seq.request.output.is_closed() {
                finished.push((i, FinishReason::Cancelled));
                continue;
            }
            let (id, logprob) = match (logits, drawn) {
                (Err(e), _) => {
                    failed.push((i, e));
                    continue;
                }
                (Ok(_), Some(d)) => d,
                // Not drawn only for an error or a closed output, both handled above.
                (Ok(_), None) => {
                    failed.push((i, EngineError::Internal("no token was drawn".into())));
                    continue;
                }
            };
            if eos.contains(&id) {
                finished.push((i, FinishReason::Stop));
                continue;
            }
            seq.generated.push(id);
            seq.logprobs.extend(logprob);
            self.metrics.tokens_generated.inc();
            if let Err(e) = seq.stream.push(&self.tokenizer, id) {
                failed.push((i, EngineError::Internal(e.to_string())));
                continue;
            }
            let text = seq.stream.text().to_owned();
            if let Some(cut) = first_stop(&text, &seq.request.stop) {
                send_text(seq, &text[..cut]);
                finished.push((i, FinishReason::Stop));
                continue;
            }
            // Hold back a tail that could still become a stop string, and half characters.
            let hold = seq.request.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
            let mut safe = text.len().saturating_sub(hold);
            while !text.is_char_boundary(safe) {
                safe -= 1;
            }
            if !text.ends_with('\u{FFFD}') {
                send_text(seq, &text[..safe]);
            }
            if seq.generated.len() >= seq.request.max_tokens || seq.cache.len() + 1 >= max_positions {
                send_text(seq, &text);
                finished.push((i, FinishReason::Length));
                continue;
            }
            seq.pending = vec![id];
        }
        // Failed requests end without a charge: the server failed them, they got no answer.
        let mut ended: Vec<(usize, Result<FinishReason, EngineError>)> =
            finished.into_iter().map(|(i, r)| (i, Ok(r))).chain(failed.into_iter().map(|(i, e)| (i, Err(e)))).collect();
        ended.sort_by_key(|(i, _)| *i);
        for (i, end) in ended.into_iter().rev() {
            let seq = self.running.swap_remove(i);
            match end {
                Ok(reason) => self.finish(seq, reason),
                Err(error) => {
                    self.metrics.requests_failed();
                    self.sink.release(&seq.request.id);
                    let _ = seq.request.output.send(Output::Failed(error));
                }
            }
        }
        self.release_device_copies();
        if self.cpu.len() > self.config.max_cpu_loras {
            // Adapters kept over the limit while in use can go now.
            self.evict();
            self.metrics.adapters_resident.set(self.cpu.len() as i64);
        }
        self.metrics.requests_running.set(self.running.len() as i64);
    }

    /// Runs the model over the running batch: each sequence's logits, or why its row
    /// failed. A failure inside the step fails only the requests of the adapter whose
    /// group still fails on its own ([`Llama::step_isolated`]); the base model's and the
    /// other adapters' requests go on.
    fn run_model(&mut self) -> Vec<Result<Vec<f32>, EngineError>> {
        let names: Vec<Option<String>> = self.running.iter().map(|s| s.request.adapter.clone()).collect();
        let mut steps: Vec<StepSeq> =
            self.running.iter_mut().map(|s| StepSeq { tokens: &s.pending, cache: &mut s.cache, adapter: s.adapter.as_deref() }).collect();
        let rows = self.model.step_isolated(&mut steps);
        rows.into_iter()
            .zip(names)
            .map(|(row, name)| {
                row.map_err(|message| match name {
                    Some(name) => EngineError::AdapterFailed { name, message },
                    None => EngineError::Internal(message),
                })
            })
            .collect()
    }

    fn finish(&mut self, mut seq: Seq, reason: FinishReason) {
        let text = seq.stream.text().to_owned();
        let text = match first_stop(&text, &seq.request.stop) {
            Some(cut) => text[..cut].to_owned(),
            None => text,
        };
        // What was held back for a stop string that never came.
        send_text(&mut seq, &text);
        let completion = Completion {
            request_id: seq.request.id.clone(),
            model: seq.request.adapter.clone().unwrap_or_else(|| self.base_name.clone()),
            caller: seq.request.caller.clone(),
            text,
            finish_reason: reason,
            prompt_tokens: if seq.request.bill_prompt { seq.request.prompt.len() } else { 0 },
            completion_tokens: seq.generated.len(),
            latency: seq.submitted.elapsed(),
            queue_time: seq.queue_time,
            price: seq.price,
            logprobs: std::mem::take(&mut seq.logprobs),
            prompt_ids: seq.request.prompt.clone(),
            output_ids: std::mem::take(&mut seq.generated),
            citations: seq.request.citations.clone(),
        };
        self.metrics.requests_finished(reason);
        // The accounting thread makes it durable, then ends the answer.
        if let Err(std_mpsc::SendError((_, output))) = self.accounted.send((completion, seq.request.output.clone())) {
            let _ = output.send(Output::Failed(EngineError::Stopped));
        }
    }
}

/// Sends the part of `upto` (a prefix of the decoded text) not sent yet.
fn send_text(seq: &mut Seq, upto: &str) {
    if let Some(new) = upto.get(seq.sent..)
        && !new.is_empty()
    {
        if seq.logprobs.len() > seq.logprobs_sent {
            let _ = seq.request.output.send(Output::Logprobs(seq.logprobs[seq.logprobs_sent..].to_vec()));
            seq.logprobs_sent = seq.logprobs.len();
        }
        let _ = seq.request.output.send(Output::Text(new.to_owned()));
        seq.sent = upto.len();
    }
}

/// Where the earliest stop string starts in `text`.
fn first_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}
