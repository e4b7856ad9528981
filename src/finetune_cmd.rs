//! `ledgerlake model finetune`: plan a run against the lake, train it here (resuming from
//! its checkpoint when the same command ran before), store the adapter beside the lake,
//! and send its `training.metric`, `training.run` and `model.registered` events to the
//! server, which serves the adapter as soon as it sees the registration.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use ledgerlake_factory::{FinetuneSpec, PromptCase, Reporter, StepReport};
use ledgerlake_lakehouse::{Amount, Event, Lake};
use ledgerlake_serving::checkpoint::{self, Checkpoint};

use crate::client::{self, ServerArgs};
use crate::config::{Config, ConfigArgs};

#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// A datanet snapshot to train on, `D` (its newest) or `D@V`; repeat for several.
    #[arg(long = "datanet", required = true)]
    pub datanets: Vec<String>,
    /// The model id the adapter is registered and served under.
    #[arg(long)]
    pub name: String,
    /// The builder's key, as `ledgerlake sign` takes it; its address is the builder of the
    /// registration.
    #[command(flatten)]
    pub key: crate::config::SigningKeyArgs,
    /// The base model: a GGUF file or a checkpoint directory (default: `--model` of the
    /// configuration, else the shipped ledgerlake-base).
    #[arg(long)]
    pub base: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Projections to adapt: q,k,v,o,gate,up,down (or their module names).
    #[arg(long, default_value = "q,k,v,o", value_delimiter = ',')]
    pub targets: Vec<String>,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens per example (longer contributions are cut).
    #[arg(long, default_value_t = 256)]
    pub max_seq_len: usize,
    /// Train over the base's 4/8-bit blocks (a GGUF base) instead of a dense f32 copy.
    #[arg(long)]
    pub qlora: bool,
    /// Recompute each layer in the backward pass instead of keeping its activations:
    /// `true` or `false` (default: on with --qlora, off without).
    #[arg(long)]
    pub gradient_checkpointing: Option<bool>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Warm-up steps (default: 3% of the steps).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Per mille of contributions held out for evaluation (by contribution id).
    #[arg(long, default_value_t = 100)]
    pub heldout_permille: u32,
    /// A JSONL prompt set (`{"prompt": ..., "expected": ...}` per line) scored by exact
    /// match and containment, for the adapter and the base.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Price per 1,000 input tokens, in base units.
    #[arg(long, default_value = "0")]
    pub price_per_1k_input: Amount,
    /// Price per 1,000 output tokens, in base units.
    #[arg(long, default_value = "0")]
    pub price_per_1k_output: Amount,
    /// Where runs keep their checkpoints (default: `<state dir>/training`).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Print the outcome as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub server: ServerArgs,
}

fn read_prompts(path: &Path) -> Result<Vec<PromptCase>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{} line {}: expected {{\"prompt\": ..., \"expected\": ...}}", path.display(), i + 1)))
        .collect()
}

/// Progress on the terminal; per-step events to the server.
struct CliReporter {
    bar: ProgressBar,
    server: ServerArgs,
    runtime: tokio::runtime::Handle,
}

impl Reporter for CliReporter {
    fn step(&self, r: &StepReport) {
        self.bar.set_length(r.steps as u64);
        self.bar.set_position(r.step as u64);
        self.bar.set_message(format!(
            "epoch {} loss {:.4} lr {:.2e} {:.0} tokens/s",
            r.epoch + 1,
            r.loss,
            r.learning_rate,
            r.tokens_per_second
        ));
    }

    fn note(&self, text: &str) {
        self.bar.println(text);
    }

    fn events(&self, events: Vec<Event>) -> std::result::Result<(), String> {
        self.runtime.block_on(client::send_events(&self.server, &events, "training metric")).map(|_| ()).map_err(|e| format!("{e:#}"))
    }
}

/// Copies the files of `src` under the object-store directory `uri` (`file://` or
/// `s3://`; each put is atomic: an object is whole or absent).
pub async fn store_dir(src: &Path, uri: &str) -> Result<()> {
    use object_store::ObjectStoreExt;
    let (store, prefix) = crate::serve::object_store_at(uri)?;
    for entry in std::fs::read_dir(src)? {
        let path = entry?.path();
        if path.is_file() {
            let name = path.file_name().context("a file without a name")?.to_string_lossy().into_owned();
            let bytes = std::fs::read(&path)?;
            store.put(&prefix.clone().join(name.as_str()), bytes.into()).await.with_context(|| format!("storing {name} under {uri}"))?;
        }
    }
    Ok(())
}

/// Where `ledgerlake up`'s training jobs leave their runs: adapters beside the lake, events
/// straight into the writer (checked as `POST /v1/events` checks them).
pub struct LakePublisher(pub ledgerlake_ingest::Ingestor);

#[async_trait::async_trait]
impl ledgerlake_factory::Publisher for LakePublisher {
    async fn store(&self, dir: &Path, uri: &str) -> std::result::Result<(), String> {
        store_dir(dir, uri).await.map_err(|e| format!("{e:#}"))
    }

    async fn send(&self, events: Vec<Event>) -> std::result::Result<(), String> {
        let checked = events
            .into_iter()
            .enumerate()
            .map(|(i, e)| ledgerlake_ingest::validate::check(i, e).map(|e| (i, e)).map_err(|e| format!("event {i}: {}: {}", e.field, e.message)))
            .collect::<std::result::Result<Vec<_>, String>>()?;
        let receipt = self.0.submit(checked, true).await.map_err(|e| e.to_string())?;
        match receipt.errors.first() {
            Some(e) => Err(format!("the lake refused event {}: {}: {}", e.index, e.field, e.message)),
            None => Ok(()),
        }
    }
}

pub async fn run(args: FinetuneArgs) -> Result<()> {
    let config = Config::load(&args.config)?;
    let lake_config = config.lake()?;
    let lake = Lake::new(lake_config.clone());
    let signer = args.key.load()?;
    let mut spec = FinetuneSpec::new(args.datanets.clone(), args.name.parse().context("--name must be a model id (lowercase slug)")?);
    spec.rank = args.rank;
    spec.alpha = args.alpha;
    spec.targets = args.targets.clone();
    spec.learning_rate = args.lr;
    spec.epochs = args.epochs;
    spec.batch_size = args.batch_size;
    spec.max_seq_len = args.max_seq_len;
    spec.qlora = args.qlora;
    spec.gradient_checkpointing = args.gradient_checkpointing;
    spec.seed = args.seed;
    spec.warmup_steps = args.warmup_steps;
    spec.weight_decay = args.weight_decay;
    spec.heldout_permille = args.heldout_permille;
    spec.price_per_1k_input = args.price_per_1k_input;
    spec.price_per_1k_output = args.price_per_1k_output;
    if let Some(p) = &args.prompts {
        spec.prompts = read_prompts(p)?;
    }
    spec.check()?;
    let base_path = args.base.clone().or_else(|| config.model.clone()).unwrap_or_else(crate::serve::default_model_dir);
    let Checkpoint { model, tokenizer, name, .. } = tokio::task::block_in_place(|| checkpoint::load(&base_path, &candle_core::Device::Cpu))
        .with_context(|| format!("loading the base model from {}", base_path.display()))?;
    let base_name = config.model_name.clone().unwrap_or(name);
    let plan = ledgerlake_factory::plan(&lake, signer.address(), &base_name, spec).await?;
    let work_root = match &args.work_dir {
        Some(w) => w.clone(),
        None => config.state_dir()?.join("training"),
    };
    let work = work_root.join(&plan.run_id);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let snapshots: Vec<String> = plan.snapshots.iter().map(|s| format!("{}@{}", s.datanet_id, s.version)).collect();
    eprintln!(
        "run {}: {} on {} ({} contributions to train on, {} held out, {} rejected or flagged left out), {} as builder {}",
        plan.run_id,
        plan.spec.name,
        snapshots.join(", "),
        plan.train.len(),
        plan.heldout.len(),
        plan.excluded,
        if plan.spec.qlora { "QLoRA over the quantized base" } else { "LoRA" },
        plan.builder
    );
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps, eta {eta} {msg}")?);
    let reporter = CliReporter { bar: bar.clone(), server: args.server.clone(), runtime: tokio::runtime::Handle::current() };
    let model = Arc::new(model);
    let cancel = AtomicBool::new(false);
    let started = chrono::Utc::now();
    let trained = tokio::task::block_in_place(|| ledgerlake_factory::train(&plan, model, &tokenizer, &work, &reporter, &cancel));
    bar.finish_and_clear();
    let outcome = match trained {
        Ok(o) => o,
        Err(e) => {
            let event = ledgerlake_factory::ended_event(&plan, ledgerlake_lakehouse::events::RunStatus::Failed, Some(e.to_string()), started);
            if let Err(send) = client::send_events(&args.server, &[event], "training run").await {
                eprintln!("recording the failed run: {send:#}");
            }
            bail!("run {} failed: {e}", plan.run_id);
        }
    };
    let uri = ledgerlake_factory::jobs::adapter_uri(&lake, &plan);
    store_dir(&outcome.adapter_dir, &uri).await?;
    let mut events = ledgerlake_factory::events(&plan, &outcome, &uri);
    // The registration is the builder's own act: signed with its key for the server's
    // deployment (the training run is a service fact, sent with the server's API key).
    let deployment = client::deployment_of(&args.server.server).await?;
    for event in events.iter_mut().filter(|e| e.kind() == ledgerlake_lakehouse::EventKind::ModelRegistered) {
        signer.sign_event(event, &deployment).map_err(anyhow::Error::msg)?;
    }
    client::send_events(&args.server, &events, "registration").await?;
    let e = &outcome.evaluation;
    if args.json {
        let out = serde_json::json!({
            "run_id": plan.run_id, "model_id": plan.spec.name.to_string(), "builder": plan.builder.to_string(),
            "adapter_uri": uri, "datanets": snapshots, "train_examples": outcome.train_examples,
            "heldout_examples": plan.heldout.len(), "steps": outcome.steps, "resumed_from": outcome.resumed_from,
            "final_loss": outcome.final_loss, "evaluation": e, "seconds": outcome.seconds,
            "tokens_per_second": outcome.tokens_per_second, "peak_memory_bytes": outcome.peak_memory_bytes,
            "truncated": outcome.truncated, "trainable_parameters": outcome.trainable_parameters,
            "contributions_sha256": outcome.contributions_sha256.to_string(),
        });
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.4}"));
    println!("trained {} (run {}) in {:.1} s: {} steps, {:.0} tokens/s, peak memory {} MB", plan.spec.name, plan.run_id, outcome.seconds, outcome.steps, outcome.tokens_per_second, outcome.peak_memory_bytes >> 20);
    println!("held-out loss {} (base {}), perplexity {} (base {}) over {} contributions", f(e.loss), f(e.base_loss), f(e.perplexity), f(e.base_perplexity), e.heldout_examples);
    if e.prompts > 0 {
        println!("prompts: {}/{} exact, {}/{} contain the answer (base: {} exact, {} contain)", e.exact_match, e.prompts, e.contains, e.prompts, e.base_exact_match, e.base_contains);
    }
    println!("adapter {uri}, registered as model {}", plan.spec.name);
    Ok(())
}
