//! `ledgerlake-factory`: ModelFactory, from a datanet snapshot to a trained, registered
//! adapter.
//!
//! [`plan`] checks that the builder may train on every datanet named, pins each to a
//! snapshot (`lakehouse::snapshot`), splits the contributions into training and held-out
//! sets by contribution id, and names the run by a hash of everything that decides it.
//! [`train`] fine-tunes (LoRA over a dense base, QLoRA over a quantized one:
//! `serving::finetune`), checkpointing so that a killed run continues where it stopped, then
//! evaluates and writes the adapter in PEFT's format with its lineage files. [`events`] are
//! the `model.registered` and `training.run` events that record it; the caller stores the
//! adapter and sends them. The rules are in `docs/training.md`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use chrono::{DateTime, Utc};
use ledgerlake_lakehouse::events::{
    DatanetVersion, Evaluation, Event, Hyperparameters, ModelRegistered, RunStatus, TrainingMetric, TrainingRun,
};
use ledgerlake_lakehouse::ids::{Address, Amount, ContributionId, EventId, ModelId, Sha256Hex};
use ledgerlake_lakehouse::snapshot::{self, DatanetSnapshot, SnapshotRef};
use ledgerlake_lakehouse::{Lake, Price};
use ledgerlake_serving::finetune::{self, AdamW, Batch, LoraSpec, TrainableLora};
use ledgerlake_serving::lora::{Adapter, Projection};
use ledgerlake_serving::model::Llama;
use ledgerlake_serving::sampling::SamplingParams;
use ledgerlake_serving::tokenizer::Tokenizer;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod http;
pub mod jobs;

pub use jobs::{Job, JobStatus, Jobs, Publisher};

/// What fine-tuning can fail with, by whose fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or asks for something that cannot be done (the caller's).
    #[error("{0}")]
    Invalid(String),
    /// The builder may not train on a datanet (the caller's).
    #[error("builder {builder} may not train on datanet {datanet}: it is private and its owner has not granted access")]
    AccessDenied { builder: Address, datanet: String },
    /// Reading the lake failed, or a snapshot the caller named does not exist.
    #[error(transparent)]
    Lake(#[from] ledgerlake_lakehouse::Error),
    /// The model could not train (its weights, a tensor operation).
    #[error("training: {0}")]
    Model(#[from] ledgerlake_serving::Error),
    /// Local files (checkpoints, the adapter) could not be written or read.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The run's per-step events could not be recorded (the server or the lake behind it).
    #[error("recording the run's metrics: {0}")]
    Report(String),
    /// The run was cancelled; its checkpoint stays, so it can resume.
    #[error("the run was cancelled")]
    Cancelled,
    /// No or unknown API key (the caller's).
    #[error("missing or unknown API key: send Authorization: Bearer <key>")]
    Unauthorized,
    /// The key may not do this (the caller's).
    #[error("{0}")]
    Forbidden(String),
    /// No such job for this caller (the caller's).
    #[error("{0}")]
    NotFound(String),
    /// The job is not in a state that allows this (the caller's).
    #[error("{0}")]
    Conflict(String),
    /// The queue is full (the server's load: retry later).
    #[error("{0}")]
    Busy(String),
}

impl Error {
    /// Whether the caller is at fault (a 4xx over HTTP).
    pub fn is_caller(&self) -> bool {
        match self {
            Error::Invalid(_)
            | Error::AccessDenied { .. }
            | Error::Unauthorized
            | Error::Forbidden(_)
            | Error::NotFound(_)
            | Error::Conflict(_) => true,
            Error::Lake(e) => matches!(e, ledgerlake_lakehouse::Error::UnknownDatanet(_) | ledgerlake_lakehouse::Error::BadSnapshot { .. }),
            _ => false,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

/// One prompt of an evaluation set: the model is asked `prompt` and should answer
/// `expected` (JSONL, one object per line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptCase {
    pub prompt: String,
    pub expected: String,
}

fn d_rank() -> usize {
    8
}
fn d_alpha() -> f64 {
    16.0
}
fn d_targets() -> Vec<String> {
    ["q_proj", "k_proj", "v_proj", "o_proj"].map(str::to_owned).to_vec()
}
fn d_lr() -> f64 {
    2e-4
}
fn d_epochs() -> usize {
    3
}
fn d_batch() -> usize {
    8
}
fn d_seq() -> usize {
    256
}
fn d_seed() -> u64 {
    42
}
fn d_norm() -> f64 {
    1.0
}
fn d_heldout() -> u32 {
    100
}
fn d_price() -> Amount {
    Amount::ZERO
}

/// Everything a builder asks of a fine-tuning run (the body of `POST /v1/training/jobs`,
/// the flags of `ledgerlake model finetune`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSpec {
    /// Datanets to train on, each `D` (its newest snapshot) or `D@V`.
    pub datanets: Vec<String>,
    /// The model id the adapter is registered and served under.
    #[schema(value_type = String)]
    pub name: ModelId,
    #[serde(default = "d_rank")]
    pub rank: usize,
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// Module names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
    /// `down_proj`) or the short forms `q,k,v,o,gate,up,down`.
    #[serde(default = "d_targets")]
    pub targets: Vec<String>,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Tokens per example; longer contributions are cut.
    #[serde(default = "d_seq")]
    pub max_seq_len: usize,
    /// Train over the base's quantized blocks (a GGUF base) instead of a dense copy.
    #[serde(default)]
    pub qlora: bool,
    /// Recompute each layer in the backward pass instead of keeping its activations
    /// (about a third more compute, a fraction of the memory); absent: on for QLoRA, off
    /// for LoRA, as PEFT's `prepare_model_for_kbit_training` does. It changes no result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Warm-up steps; absent: 3% of the steps, rounded up.
    #[serde(default)]
    pub warmup_steps: Option<usize>,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_norm")]
    pub max_grad_norm: f64,
    /// Per mille of contributions held out for evaluation.
    #[serde(default = "d_heldout")]
    pub heldout_permille: u32,
    /// An optional prompt set scored by exact match and containment.
    #[serde(default)]
    pub prompts: Vec<PromptCase>,
    #[serde(default = "d_price")]
    #[schema(value_type = String)]
    pub price_per_1k_input: Amount,
    #[serde(default = "d_price")]
    #[schema(value_type = String)]
    pub price_per_1k_output: Amount,
}

impl FinetuneSpec {
    /// Whether the run uses gradient checkpointing (see the field).
    pub fn checkpointing(&self) -> bool {
        self.gradient_checkpointing.unwrap_or(self.qlora)
    }

    /// Defaults for everything but the datanets and the name.
    pub fn new(datanets: Vec<String>, name: ModelId) -> Self {
        Self {
            datanets,
            name,
            rank: d_rank(),
            alpha: d_alpha(),
            targets: d_targets(),
            learning_rate: d_lr(),
            epochs: d_epochs(),
            batch_size: d_batch(),
            max_seq_len: d_seq(),
            qlora: false,
            gradient_checkpointing: None,
            seed: d_seed(),
            warmup_steps: None,
            weight_decay: 0.0,
            max_grad_norm: d_norm(),
            heldout_permille: d_heldout(),
            prompts: Vec::new(),
            price_per_1k_input: d_price(),
            price_per_1k_output: d_price(),
        }
    }

    /// The projections the targets name, in a fixed order.
    pub fn projections(&self) -> Result<Vec<Projection>> {
        let mut out = Vec::new();
        for t in &self.targets {
            let t = t.trim();
            let found = Projection::ALL.into_iter().find(|p| p.module() == t || p.module().strip_suffix("_proj") == Some(t));
            match found {
                Some(p) => out.push(p),
                None => return Err(Error::Invalid(format!("target {t:?} is not one of q, k, v, o, gate, up, down (or q_proj, ...)"))),
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Refuses settings that cannot train.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.datanets.is_empty() {
            return bad("name at least one datanet to train on".into());
        }
        if self.rank == 0 || self.rank > 1024 {
            return bad(format!("rank must be 1 to 1024, not {}", self.rank));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("alpha must be a positive number, not {}", self.alpha));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0 && self.learning_rate <= 1.0) {
            return bad(format!("the learning rate must be in (0, 1], not {}", self.learning_rate));
        }
        if self.epochs == 0 || self.epochs > 1000 {
            return bad(format!("epochs must be 1 to 1000, not {}", self.epochs));
        }
        if self.batch_size == 0 || self.batch_size > 4096 {
            return bad(format!("the batch size must be 1 to 4096, not {}", self.batch_size));
        }
        if self.max_seq_len < 2 || self.max_seq_len > 1 << 16 {
            return bad(format!("max_seq_len must be 2 to 65536, not {}", self.max_seq_len));
        }
        if !(self.weight_decay.is_finite() && (0.0..=1.0).contains(&self.weight_decay)) {
            return bad(format!("weight decay must be in [0, 1], not {}", self.weight_decay));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return bad(format!("max_grad_norm must be a positive number, not {}", self.max_grad_norm));
        }
        if self.heldout_permille >= 1000 {
            return bad(format!("heldout_permille must be below 1000, not {}", self.heldout_permille));
        }
        if i64::try_from(self.seed).is_err() {
            return bad(format!("the seed is at most {}", i64::MAX));
        }
        Price::new(self.price_per_1k_input, self.price_per_1k_output).map_err(|e| Error::Invalid(e.to_string()))?;
        self.projections()?;
        Ok(())
    }

    fn hyperparameters(&self, warmup: usize) -> Hyperparameters {
        Hyperparameters {
            rank: self.rank as u32,
            alpha: self.alpha,
            targets: self.projections().unwrap_or_default().iter().map(|p| p.module().to_owned()).collect(),
            learning_rate: self.learning_rate,
            epochs: self.epochs as u32,
            batch_size: self.batch_size as u32,
            max_seq_len: self.max_seq_len as u32,
            qlora: self.qlora,
            seed: self.seed,
            warmup_steps: warmup as u32,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            heldout_permille: self.heldout_permille,
        }
    }
}

/// Whether a contribution is held out: the first eight bytes of its id (a sha256), read
/// big-endian, modulo 1000, below `permille`. It depends on nothing but the id, so a
/// contribution is on the same side in every run with the same setting.
pub fn held_out(id: &ContributionId, permille: u32) -> bool {
    let hex = id.to_string();
    let digits = hex.trim_start_matches("0x");
    let value = u64::from_str_radix(&digits[..16.min(digits.len())], 16).unwrap_or(0);
    value % 1000 < u64::from(permille)
}

/// One training or evaluation example: a contribution's text.
#[derive(Clone, Debug)]
pub struct Example {
    pub contribution_id: ContributionId,
    pub datanet: String,
    pub content: String,
}

/// A run, decided: who trains what on which snapshots, and its id.
#[derive(Clone, Debug)]
pub struct Plan {
    pub run_id: String,
    pub builder: Address,
    pub base_model: String,
    pub spec: FinetuneSpec,
    pub snapshots: Vec<DatanetVersion>,
    pub train: Vec<Example>,
    pub heldout: Vec<Example>,
    /// Contributions that were rejected or flagged at the pinned versions (never trained on).
    pub excluded: usize,
}

/// Checks access and pins the snapshots; see the module docs. Every datanet is checked
/// before anything is read, and the first one refused is named.
pub async fn plan(lake: &Lake, builder: Address, base_model: &str, spec: FinetuneSpec) -> Result<Plan> {
    spec.check()?;
    // A model id belongs to its first registrant, and the base model's to the deployment:
    // a job named after either is refused before it trains (ingest would refuse the
    // registration anyway).
    if spec.name.as_str() == base_model {
        return Err(Error::Invalid(format!("{} is the base model's id; name the adapter something else", spec.name)));
    }
    if let Some(owner) = snapshot::model_owner(lake, &spec.name).await?
        && owner != builder
    {
        return Err(Error::Invalid(format!("model {} belongs to its first registrant {owner}; name the adapter something else", spec.name)));
    }
    let refs: Vec<SnapshotRef> = spec.datanets.iter().map(|d| d.parse()).collect::<std::result::Result<_, _>>()?;
    for r in &refs {
        if !snapshot::may_train(lake, &r.datanet, &builder).await? {
            return Err(Error::AccessDenied { builder, datanet: r.datanet.to_string() });
        }
    }
    let mut snapshots: Vec<DatanetSnapshot> = Vec::new();
    for r in &refs {
        if snapshots.iter().any(|s| s.datanet.id == r.datanet) {
            return Err(Error::Invalid(format!("datanet {} is named twice", r.datanet)));
        }
        snapshots.push(snapshot::snapshot(lake, r).await?);
    }
    let mut train = Vec::new();
    let mut heldout = Vec::new();
    for s in &snapshots {
        for c in &s.contributions {
            let e = Example { contribution_id: c.contribution_id.clone(), datanet: s.datanet.id.to_string(), content: c.content.clone() };
            if held_out(&c.contribution_id, spec.heldout_permille) { heldout.push(e) } else { train.push(e) }
        }
    }
    if train.is_empty() {
        let sizes: Vec<String> = snapshots.iter().map(|s| format!("{}@{}: {} approved", s.datanet.id, s.version, s.contributions.len())).collect();
        return Err(Error::Invalid(format!("nothing to train on ({}; {} held out)", sizes.join(", "), heldout.len())));
    }
    let versions: Vec<DatanetVersion> = snapshots.iter().map(|s| DatanetVersion { datanet_id: s.datanet.id.clone(), version: s.version }).collect();
    let mut spec_for_id = spec.clone();
    spec_for_id.datanets = versions.iter().map(|v| format!("{}@{}", v.datanet_id, v.version)).collect();
    // Checkpointing changes how, not what: the same run either way.
    spec_for_id.gradient_checkpointing = None;
    let identity = serde_json::json!({ "builder": builder.to_string(), "base_model": base_model, "spec": spec_for_id });
    let digest = Sha256::digest(identity.to_string().as_bytes());
    Ok(Plan {
        run_id: hex::encode(&digest[..8]),
        builder,
        base_model: base_model.to_owned(),
        spec,
        snapshots: versions,
        train,
        heldout,
        excluded: snapshots.iter().map(|s| s.excluded).sum(),
    })
}

/// What a run reports while it trains.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepReport {
    pub run_id: String,
    pub step: usize,
    pub steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
}

/// Where a run's progress and its per-step events go.
pub trait Reporter: Send + Sync {
    /// After every step (a progress bar, server-sent events).
    fn step(&self, report: &StepReport);
    /// A line of news: resumed, evaluating, saving.
    fn note(&self, text: &str);
    /// Per-step `training.metric` events, sent after each checkpoint: they must be durable
    /// when this returns `Ok`.
    fn events(&self, events: Vec<Event>) -> std::result::Result<(), String>;
}

/// A finished run: where its adapter is (locally) and what it scored.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub adapter_dir: PathBuf,
    pub contributions_sha256: Sha256Hex,
    pub evaluation: Evaluation,
    pub warmup_steps: usize,
    pub steps: usize,
    pub train_examples: usize,
    pub train_tokens: u64,
    pub final_loss: Option<f64>,
    pub started_at: DateTime<Utc>,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub peak_memory_bytes: u64,
    pub truncated: usize,
    pub resumed_from: usize,
    pub trainable_parameters: usize,
}

/// The peak resident memory of this process (`VmHWM`), in bytes; 0 where unknown.
pub fn peak_memory_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The text's token ids with the end-of-text id after them, cut to `max_len + 1` ids (so
/// `max_len` positions predict a token).
fn tokenize(tok: &Tokenizer, eos: Option<u32>, text: &str, max_len: usize) -> Result<(Vec<u32>, bool)> {
    let mut ids = tok.encode(text)?;
    ids.extend(eos);
    let cut = ids.len() > max_len + 1;
    ids.truncate(max_len + 1);
    Ok((ids, cut))
}

/// The step's examples: epoch `e` visits the training examples in the order of a shuffle
/// seeded with `seed + e`, in consecutive batches (the last one may be short).
fn batch_of(n: usize, batch: usize, seed: u64, step: usize) -> (usize, Vec<usize>) {
    let per_epoch = n.div_ceil(batch);
    let epoch = step / per_epoch;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed.wrapping_add(epoch as u64)));
    let start = (step % per_epoch) * batch;
    (epoch, order[start..(start + batch).min(n)].to_vec())
}

/// The model to train over: QLoRA keeps the quantized base, LoRA needs a dense one.
pub fn base_for(model: Arc<Llama>, qlora: bool) -> Result<Arc<Llama>> {
    match (qlora, is_quantized(&model)) {
        (true, true) => Ok(model),
        (true, false) => Err(Error::Invalid("QLoRA trains over a quantized base (a GGUF model); this base is dense: leave out --qlora".into())),
        (false, true) => Ok(Arc::new(finetune::dequantized(&model)?)),
        (false, false) => Ok(model),
    }
}

/// Trains the plan's adapter over `base` (see the module docs). `work` is the run's own
/// directory: its checkpoint, then the adapter. Returns [`Error::Cancelled`] when `cancel`
/// is set (the checkpoint stays).
pub fn train(plan: &Plan, base: Arc<Llama>, tok: &Tokenizer, work: &Path, reporter: &dyn Reporter, cancel: &AtomicBool) -> Result<Outcome> {
    let started_at = Utc::now();
    let spec = &plan.spec;
    let model = base_for(base, spec.qlora)?;
    if spec.max_seq_len > model.config.max_position_embeddings {
        return Err(Error::Invalid(format!("max_seq_len {} exceeds the model's {} positions", spec.max_seq_len, model.config.max_position_embeddings)));
    }
    let eos = tok.token_id("<|endoftext|>").or_else(|| model.eos_ids().first().copied());
    let mut truncated = 0;
    let mut encode = |examples: &[Example]| -> Result<Vec<Vec<u32>>> {
        examples
            .iter()
            .map(|e| {
                let (ids, cut) = tokenize(tok, eos, &e.content, spec.max_seq_len)?;
                truncated += usize::from(cut);
                Ok(ids)
            })
            .collect()
    };
    let train_ids = encode(&plan.train)?;
    let heldout_ids = encode(&plan.heldout)?;
    let steps_per_epoch = train_ids.len().div_ceil(spec.batch_size);
    let steps = steps_per_epoch * spec.epochs;
    let warmup = spec.warmup_steps.unwrap_or_else(|| (steps * 3).div_ceil(100)).min(steps);

    let lora_spec = LoraSpec { rank: spec.rank, alpha: spec.alpha, targets: spec.projections()? };
    let lora = TrainableLora::new(&model, lora_spec, spec.seed)?;
    let vars = lora.vars();
    let mut opt = AdamW::new(&vars, spec.weight_decay)?;
    let checkpoint = work.join("checkpoint");
    let resumed_from = if finetune::load_state(&checkpoint, &lora, &mut opt)? { opt.t as usize } else { 0 };
    if resumed_from > 0 {
        reporter.note(&format!("resuming run {} at step {resumed_from} of {steps}", plan.run_id));
    }
    let mut last_loss = read_last_loss(work);
    let mut pending: Vec<Event> = Vec::new();
    let mut last_save = Instant::now();
    let mut train_tokens: u64 = 0;
    let loop_started = Instant::now();
    let save_every = (steps / 20).clamp(1, 50);
    for step in resumed_from..steps {
        if cancel.load(Ordering::Relaxed) {
            finetune::save_state(&checkpoint, &lora, &opt)?;
            return Err(Error::Cancelled);
        }
        let step_started = Instant::now();
        let (epoch, picked) = batch_of(train_ids.len(), spec.batch_size, spec.seed, step);
        let examples: Vec<&[u32]> = picked.iter().map(|&i| train_ids[i].as_slice()).filter(|e| e.len() >= 2).collect();
        if examples.is_empty() {
            continue;
        }
        let batch = Batch::new(&examples)?;
        let lr = finetune::learning_rate(spec.learning_rate, step, steps, warmup);
        let finetune::Step { loss, grads, norm: grad_norm, clip } = finetune::backward(&model, &lora, &batch, spec.max_grad_norm, spec.checkpointing())?;
        opt.step(&vars, &grads, lr, clip)?;
        train_tokens += batch.tokens as u64;
        let tps = batch.tokens as f64 / step_started.elapsed().as_secs_f64().max(1e-9);
        last_loss = Some(loss as f64);
        let report = StepReport {
            run_id: plan.run_id.clone(),
            step: step + 1,
            steps,
            epoch,
            loss: loss as f64,
            learning_rate: lr,
            grad_norm,
            tokens_per_second: tps,
        };
        reporter.step(&report);
        pending.push(metric_event(&report, batch.tokens as u64));
        let done = step + 1 == steps;
        if done || (step + 1) % save_every == 0 || last_save.elapsed().as_secs() >= 60 {
            finetune::save_state(&checkpoint, &lora, &opt)?;
            write_progress(work, step + 1, loss as f64)?;
            reporter.events(std::mem::take(&mut pending)).map_err(Error::Report)?;
            last_save = Instant::now();
        }
    }
    let seconds = loop_started.elapsed().as_secs_f64();

    reporter.note("evaluating on the held-out contributions and the prompt set");
    let (base_sum, tokens) = finetune::eval_loss(&model, None, &heldout_ids, spec.batch_size)?;
    let (sum, _) = finetune::eval_loss(&model, Some(&lora), &heldout_ids, spec.batch_size)?;
    let mean = |s: f64| (tokens > 0).then(|| s / tokens as f64);
    let adapter = lora.to_adapter()?;
    let (mut exact, mut contains, mut base_exact, mut base_contains) = (0, 0, 0, 0);
    for case in &spec.prompts {
        let (e, c) = score(&model, tok, case, Some(&adapter))?;
        let (be, bc) = score(&model, tok, case, None)?;
        exact += u32::from(e);
        contains += u32::from(c);
        base_exact += u32::from(be);
        base_contains += u32::from(bc);
    }
    let evaluation = Evaluation {
        heldout_examples: plan.heldout.len() as u32,
        heldout_tokens: tokens as u64,
        base_loss: mean(base_sum),
        loss: mean(sum),
        base_perplexity: mean(base_sum).map(f64::exp),
        perplexity: mean(sum).map(f64::exp),
        prompts: spec.prompts.len() as u32,
        exact_match: exact,
        contains,
        base_exact_match: base_exact,
        base_contains,
    };

    let adapter_dir = work.join("adapter");
    lora.save_peft(&model, &plan.base_model, &adapter_dir)?;
    // Training examples in contribution-id order: the lines of contributions.txt and the
    // rows of the features.
    let mut order: Vec<(String, usize)> = plan.train.iter().enumerate().map(|(i, e)| (e.contribution_id.to_string(), i)).collect();
    order.sort();
    let trained: String = order.iter().map(|(id, _)| format!("{id}\n")).collect();
    let mut heldout: Vec<String> = plan.heldout.iter().map(|e| format!("{}\n", e.contribution_id)).collect();
    heldout.sort();

    // Attribution's features: one projected gradient per training example, in the order
    // of contributions.txt (sorted ids), with the final adapter.
    reporter.note("computing the gradient features of the training examples");
    let projector = finetune::Projector::new(&lora, spec.seed)?;
    let mut features = Vec::with_capacity(order.len() * projector.dim());
    for &(_, i) in &order {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let ids = &train_ids[i];
        if ids.len() < 2 {
            features.extend(std::iter::repeat_n(0f32, projector.dim()));
            continue;
        }
        features.extend(finetune::gradient_feature(&model, &lora, ids, 1, &projector)?);
    }
    let features = Tensor::from_vec(features, (order.len(), projector.dim()), &candle_core::Device::Cpu)?;
    let tmp = adapter_dir.join(".features.safetensors.tmp");
    candle_core::safetensors::save(&std::collections::HashMap::from([("features".to_owned(), features)]), &tmp)?;
    std::fs::rename(&tmp, adapter_dir.join("features.safetensors")).map_err(io(&adapter_dir))?;
    std::fs::write(adapter_dir.join("contributions.txt"), &trained).map_err(io(&adapter_dir))?;
    std::fs::write(adapter_dir.join("heldout.txt"), heldout.concat()).map_err(io(&adapter_dir))?;
    let lineage = serde_json::json!({
        "run_id": plan.run_id, "builder": plan.builder.to_string(), "base_model": plan.base_model,
        "datanets": plan.snapshots, "hyperparameters": spec.hyperparameters(warmup), "evaluation": evaluation,
        "contributions_sha256": Sha256Hex::digest(trained.as_bytes()).to_string(),
        "features": {
            "file": "features.safetensors", "tensor": "features", "rows": "contributions.txt, in order",
            "dim": projector.dim(), "seed": spec.seed, "per_pair": finetune::FEATURE_PER_PAIR,
            "method": "serving::finetune::gradient_feature: Kronecker-projected LoRA gradients (docs/training.md)",
        },
    });
    std::fs::write(adapter_dir.join("lineage.json"), serde_json::to_vec_pretty(&lineage).unwrap_or_default()).map_err(io(&adapter_dir))?;
    Ok(Outcome {
        adapter_dir,
        contributions_sha256: Sha256Hex::digest(trained.as_bytes()),
        evaluation,
        warmup_steps: warmup,
        steps,
        train_examples: plan.train.len(),
        train_tokens: train_ids.iter().map(|e| e.len().saturating_sub(1) as u64).sum::<u64>() * spec.epochs as u64,
        final_loss: last_loss,
        started_at,
        seconds,
        tokens_per_second: if seconds > 0.0 { train_tokens as f64 / seconds } else { 0.0 },
        peak_memory_bytes: peak_memory_bytes(),
        truncated,
        resumed_from,
        trainable_parameters: lora.parameter_count(),
    })
}

/// `checkpoint/progress.json`: the step and loss of the last checkpoint (for a resumed
/// run's report, and for whoever watches a run).
fn read_last_loss(work: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(work.join("checkpoint").join("progress.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["loss"].as_f64()
}

fn write_progress(work: &Path, step: usize, loss: f64) -> Result<()> {
    let path = work.join("checkpoint").join("progress.json");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::json!({ "step": step, "loss": loss }).to_string()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

fn metric_event(r: &StepReport, tokens: u64) -> Event {
    TrainingMetric {
        event_id: event_id(&format!("run-{}-step-{}", r.run_id, r.step)),
        event_time: Utc::now(),
        run_id: r.run_id.clone(),
        step: r.step as u32,
        epoch: r.epoch as u32,
        loss: r.loss,
        learning_rate: r.learning_rate,
        grad_norm: r.grad_norm,
        tokens,
        tokens_per_second: r.tokens_per_second,
    }
    .into()
}

fn event_id(s: &str) -> EventId {
    // Run ids are hex and steps numbers: always a valid event id.
    s.parse().unwrap_or_else(|_| unreachable!("event id {s}"))
}

/// The greedy answer to a prompt (at most 48 tokens, or until an end-of-generation token),
/// and whether it matches: exactly (the answer's first line, trimmed, equals the expected
/// text, trimmed) and by containment (the answer contains the expected text, ignoring case).
fn score(model: &Llama, tok: &Tokenizer, case: &PromptCase, adapter: Option<&Adapter>) -> Result<(bool, bool)> {
    let greedy = SamplingParams { temperature: 0.0, ..SamplingParams::default() };
    let text = ledgerlake_serving::pretrain::continue_text(model, tok, &case.prompt, 48, greedy, adapter)?;
    let expected = case.expected.trim();
    let first = text.trim().lines().next().unwrap_or("").trim();
    Ok((first == expected, text.to_lowercase().contains(&expected.to_lowercase())))
}

/// The `training.run` of a run that stopped before training anything: the plan's fields,
/// nothing measured. A completed run fills in what it measured.
fn run_event(plan: &Plan, status: RunStatus, started_at: DateTime<Utc>, warmup: usize) -> TrainingRun {
    let now = Utc::now();
    TrainingRun {
        event_id: event_id(&format!("run-{}", plan.run_id)),
        event_time: now,
        run_id: plan.run_id.clone(),
        model_id: plan.spec.name.clone(),
        builder: plan.builder,
        base_model: plan.base_model.clone(),
        datanets: plan.snapshots.clone(),
        status,
        hyperparameters: plan.spec.hyperparameters(warmup),
        evaluation: None,
        train_examples: plan.train.len() as u32,
        train_tokens: 0,
        steps: 0,
        started_at,
        seconds: (now - started_at).num_milliseconds().max(0) as f64 / 1000.0,
        tokens_per_second: 0.0,
        peak_memory_bytes: peak_memory_bytes(),
        final_loss: None,
        adapter_uri: None,
        contributions_sha256: None,
        error: None,
    }
}

/// The events that record a completed run whose adapter is stored at `adapter_uri`: its
/// `model.registered` (event id `reg-<run>`) and its `training.run` (`run-<run>`).
pub fn events(plan: &Plan, outcome: &Outcome, adapter_uri: &str) -> Vec<Event> {
    let run = TrainingRun {
        evaluation: Some(outcome.evaluation.clone()),
        train_examples: outcome.train_examples as u32,
        train_tokens: outcome.train_tokens,
        steps: outcome.steps as u32,
        seconds: outcome.seconds,
        tokens_per_second: outcome.tokens_per_second,
        peak_memory_bytes: outcome.peak_memory_bytes,
        final_loss: outcome.final_loss,
        adapter_uri: Some(adapter_uri.to_owned()),
        contributions_sha256: Some(outcome.contributions_sha256.clone()),
        ..run_event(plan, RunStatus::Completed, outcome.started_at, outcome.warmup_steps)
    };
    let registered = ModelRegistered {
        event_id: event_id(&format!("reg-{}", plan.run_id)),
        event_time: run.event_time,
        model_id: plan.spec.name.clone(),
        builder: plan.builder,
        base_model: plan.base_model.clone(),
        adapter_uri: adapter_uri.to_owned(),
        datanets: plan.snapshots.clone(),
        price_per_1k_input: plan.spec.price_per_1k_input,
        price_per_1k_output: plan.spec.price_per_1k_output,
        training_run_id: Some(plan.run_id.clone()),
        contributions_sha256: Some(outcome.contributions_sha256.clone()),
        hyperparameters: Some(run.hyperparameters.clone()),
        evaluation: Some(outcome.evaluation.clone()),
        // Written by ledgerlake's own ModelFactory for the builder its key is bound to
        // (`Authority::Participant { factory_may_write: true }`).
        signature: None,
    };
    vec![run.into(), registered.into()]
}

/// The `training.run` of a run that failed or was cancelled before it finished.
pub fn ended_event(plan: &Plan, status: RunStatus, error: Option<String>, started_at: DateTime<Utc>) -> Event {
    let error = error.map(|e| e.chars().take(1000).collect());
    TrainingRun { error, ..run_event(plan, status, started_at, plan.spec.warmup_steps.unwrap_or(0)) }.into()
}

/// Whether any projection of `model` is quantized (QLoRA can train over it; LoRA needs a
/// dense copy).
pub fn is_quantized(model: &Llama) -> bool {
    (0..model.config.num_hidden_layers).any(|l| Projection::ALL.iter().any(|&p| model.projection(l, p).is_some_and(|w| w.dense().is_none())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_example_once_per_epoch_in_a_seeded_order() {
        for (n, batch) in [(10usize, 3usize), (7, 7), (5, 8)] {
            let per_epoch = n.div_ceil(batch);
            for epoch in 0..3 {
                let mut seen: Vec<usize> = (0..per_epoch).flat_map(|s| batch_of(n, batch, 42, epoch * per_epoch + s).1).collect();
                assert!((0..per_epoch).all(|s| batch_of(n, batch, 42, epoch * per_epoch + s).0 == epoch));
                seen.sort();
                assert_eq!(seen, (0..n).collect::<Vec<_>>());
            }
        }
        assert_ne!(batch_of(10, 10, 42, 0).1, batch_of(10, 10, 42, 1).1, "each epoch has its own order");
        assert_eq!(batch_of(10, 3, 42, 5), batch_of(10, 3, 42, 5), "the order is a function of seed and step");
    }

    #[test]
    fn held_out_is_a_function_of_the_id_alone() {
        let ids: Vec<ContributionId> =
            (0..2000u32).map(|i| hex::encode(Sha256::digest(i.to_be_bytes())).parse().unwrap()).collect();
        let out = ids.iter().filter(|id| held_out(id, 100)).count();
        assert!((140..=260).contains(&out), "about a tenth held out: {out}");
        assert!(ids.iter().all(|id| !held_out(id, 0)));
        assert!(ids.iter().filter(|id| held_out(id, 100)).all(|id| held_out(id, 200)), "a larger share holds out a superset");
    }

    #[test]
    fn specs_are_checked() {
        let spec = FinetuneSpec::new(vec!["d".into()], "m".parse().unwrap());
        assert!(spec.check().is_ok());
        assert_eq!(spec.projections().unwrap(), vec![Projection::Q, Projection::K, Projection::V, Projection::O]);
        let short = FinetuneSpec { targets: vec!["down".into(), "q".into(), "q_proj".into()], ..spec.clone() };
        assert_eq!(short.projections().unwrap(), vec![Projection::Q, Projection::Down]);
        for bad in [
            FinetuneSpec { rank: 0, ..spec.clone() },
            FinetuneSpec { targets: vec!["c_attn".into()], ..spec.clone() },
            FinetuneSpec { learning_rate: f64::NAN, ..spec.clone() },
            FinetuneSpec { epochs: 0, ..spec.clone() },
            FinetuneSpec { datanets: vec![], ..spec.clone() },
            FinetuneSpec { heldout_permille: 1000, ..spec.clone() },
            FinetuneSpec { seed: u64::MAX, ..spec.clone() },
        ] {
            let e = bad.check().unwrap_err();
            assert!(e.is_caller(), "{e}");
        }
        let parsed: FinetuneSpec = serde_json::from_str(r#"{"datanets": ["d@3"], "name": "m", "qlora": true}"#).unwrap();
        assert_eq!((parsed.rank, parsed.epochs, parsed.qlora), (8, 3, true));
        assert!(serde_json::from_str::<FinetuneSpec>(r#"{"datanets": [], "name": "m", "ranks": 3}"#).is_err());
    }
}
