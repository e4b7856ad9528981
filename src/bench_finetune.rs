//! `ledgerlake bench finetune`: LoRA and QLoRA training throughput and peak memory on the
//! built-in model and SmolLM2 at several ranks, beside Hugging Face `transformers` + `peft`
//! on PyTorch's CPU build (`scripts/bench_peft.py`: the same model, loaded from the same
//! GGUF, the same token batches, rank, targets, sequence length and batch size), and this
//! machine's f32 GEMM FLOP/s measured in the same run.
//!
//! Each configuration runs in a process of its own (this binary again with `--only`, or
//! Python), so its peak resident memory is its own.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use ledgerlake_serving::checkpoint::{self, Checkpoint};
use ledgerlake_serving::finetune::{self, AdamW, Batch, LoraSpec, TrainableLora};
use ledgerlake_serving::lora::Projection;
use ledgerlake_serving::model::Llama;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// The SmolLM2 GGUF (`scripts/fetch-model`).
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// The built-in model's checkpoint directory (default: the shipped one).
    #[arg(long)]
    pub builtin: Option<PathBuf>,
    #[arg(long, default_value = "8,64", value_delimiter = ',')]
    pub ranks: Vec<usize>,
    #[arg(long, default_value = "q,k,v,o", value_delimiter = ',')]
    pub targets: Vec<String>,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Timed optimizer steps per configuration (after one untimed warm-up step).
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// A Python with torch, transformers and peft for the reference; empty skips it.
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: String,
    /// Internal: run one configuration (`builtin|smollm2:lora|qlora:RANK`) here and print
    /// its result as JSON.
    #[arg(long, hide = true)]
    pub only: Option<String>,
    /// Internal: the token batches of `--only`.
    #[arg(long, hide = true)]
    pub tokens: Option<PathBuf>,
}

/// One configuration's result (ours or the reference's).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Measured {
    tokens_per_second: f64,
    peak_memory_bytes: u64,
    step_seconds: Vec<f64>,
    #[serde(default)]
    trainable_parameters: u64,
    /// Forward and backward FLOPs per token by the formula in the module docs.
    #[serde(default)]
    flops_per_token: f64,
}

/// `[steps + 1][batch][seq]` token ids, seeded, below `vocab`.
fn token_batches(vocab: usize, opts: &Options, seed: u64) -> Vec<Vec<Vec<u32>>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..=opts.steps).map(|_| (0..opts.batch_size).map(|_| (0..opts.seq_len).map(|_| rng.random_range(0..vocab as u32)).collect()).collect()).collect()
}

fn load(which: &str, opts: &Options) -> Result<(Llama, PathBuf)> {
    let path = match which {
        "builtin" => opts.builtin.clone().unwrap_or_else(crate::serve::default_model_dir),
        "smollm2" => opts.model.clone(),
        other => bail!("unknown model {other:?}"),
    };
    let Checkpoint { model, .. } = checkpoint::load(&path, &Device::Cpu).with_context(|| format!("loading {}", path.display()))?;
    Ok((model, path))
}

/// Multiply-adds counted as two FLOPs: each token passes every projection and the output
/// layer forward and backward to its input (`4 · params`), the adapter's pairs forward,
/// backward to the input and to their weights (`6 · lora params`), and attention's two
/// products forward and backward (`8 · layers · seq · hidden`, half of it masked away but
/// computed).
fn flops_per_token(model: &Llama, lora_params: usize, seq: usize) -> f64 {
    let c = &model.config;
    let mut params = c.vocab_size * c.hidden_size;
    for l in 0..c.num_hidden_layers {
        for p in Projection::ALL {
            if let Some(w) = model.projection(l, p)
                && let Ok((o, i)) = w.dims()
            {
                params += o * i;
            }
        }
    }
    4.0 * params as f64 + 6.0 * lora_params as f64 + 8.0 * (c.num_hidden_layers * seq * c.hidden_size) as f64
}

/// One configuration in this process.
fn run_one(spec: &str, opts: &Options) -> Result<Measured> {
    let parts: Vec<&str> = spec.split(':').collect();
    let [which, kind, rank] = parts.as_slice() else { bail!("--only wants model:kind:rank") };
    let rank: usize = rank.parse()?;
    let (model, _) = load(which, opts)?;
    let model = match *kind {
        "qlora" => model,
        // The quantized model is dropped here: LoRA's peak is its dense copy's, not both.
        "lora" if ledgerlake_factory::is_quantized(&model) => finetune::dequantized(&model)?,
        "lora" => model,
        other => bail!("unknown kind {other:?}"),
    };
    let model = Arc::new(model);
    let tokens: Vec<Vec<Vec<u32>>> = serde_json::from_slice(&std::fs::read(opts.tokens.as_ref().context("--tokens")?)?)?;
    let targets = opts.targets.iter().map(|t| {
        Projection::ALL.into_iter().find(|p| p.module() == t || p.module().strip_suffix("_proj") == Some(t.as_str())).with_context(|| format!("target {t}"))
    });
    let lora = TrainableLora::new(&model, LoraSpec { rank, alpha: 2.0 * rank as f64, targets: targets.collect::<Result<_>>()? }, 1)?;
    let vars = lora.vars();
    let mut opt = AdamW::new(&vars, 0.0)?;
    let mut step_seconds = Vec::new();
    let mut timed = 0.0;
    for (i, rows) in tokens.iter().enumerate() {
        let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
        let batch = Batch::new(&refs)?;
        let started = Instant::now();
        // QLoRA with gradient checkpointing, as PEFT's k-bit preparation sets it up.
        let step = finetune::backward(&model, &lora, &batch, 1.0, *kind == "qlora")?;
        opt.step(&vars, &step.grads, 1e-4, step.clip)?;
        let secs = started.elapsed().as_secs_f64();
        if i > 0 {
            step_seconds.push(secs);
            timed += secs;
        }
    }
    let counted = (tokens.len() - 1) * opts.batch_size * opts.seq_len;
    Ok(Measured {
        tokens_per_second: counted as f64 / timed,
        peak_memory_bytes: ledgerlake_factory::peak_memory_bytes(),
        step_seconds,
        trainable_parameters: lora.parameter_count() as u64,
        flops_per_token: flops_per_token(&model, lora.parameter_count(), opts.seq_len),
    })
}

/// f32 GEMM FLOP/s of candle's matmul (the one training uses), best of five
/// 1024 × 1024 × 1024 products.
pub(crate) fn gemm_flops() -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (1024, 1024), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (1024, 1024), &Device::Cpu)?;
    let mut best = f64::MAX;
    for _ in 0..6 {
        let started = Instant::now();
        let c = a.matmul(&b)?;
        c.sum_all()?.to_scalar::<f32>()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(2.0 * 1024f64.powi(3) / best)
}

fn child(args: &[String]) -> Result<Measured> {
    let out = std::process::Command::new(&args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.starts_with('{')).with_context(|| format!("no JSON from {}: {text}", args.join(" ")))?;
    Ok(serde_json::from_str(line)?)
}

pub async fn run(opts: Options) -> Result<()> {
    tokio::task::block_in_place(|| run_blocking(opts))
}

fn run_blocking(opts: Options) -> Result<()> {
    if let Some(spec) = &opts.only {
        println!("{}", serde_json::to_string(&run_one(spec, &opts)?)?);
        return Ok(());
    }
    if opts.ranks.is_empty() || opts.steps == 0 || opts.batch_size == 0 || opts.seq_len < 2 {
        bail!("--ranks, --steps, --batch-size and --seq-len must be positive (seq-len at least 2)");
    }
    let exe = std::env::current_exe()?.display().to_string();
    let dir = tempfile::tempdir()?;
    let gemm = gemm_flops()?;
    println!("f32 GEMM (candle, 1024³, best of 6): {:.1} GFLOP/s", gemm / 1e9);
    println!("batch {} × {} tokens, targets {}, {} timed steps after one warm-up\n", opts.batch_size, opts.seq_len, opts.targets.join(","), opts.steps);
    println!("| model | method | rank | ledgerlake tokens/s | peak MB | PEFT tokens/s | PEFT peak MB | vs PEFT | ledgerlake FLOP/s of GEMM |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut smollm_peaks: Vec<(String, usize, u64)> = Vec::new();
    for which in ["builtin", "smollm2"] {
        let (model, path) = load(which, &opts)?;
        let vocab = model.config.vocab_size;
        drop(model);
        let tokens = dir.path().join(format!("{which}.json"));
        std::fs::write(&tokens, serde_json::to_vec(&token_batches(vocab, &opts, 7))?)?;
        let kinds: &[&str] = if which == "smollm2" { &["lora", "qlora"] } else { &["lora"] };
        for &rank in &opts.ranks {
            let peft = if opts.python.is_empty() {
                None
            } else {
                let args = vec![
                    opts.python.clone(),
                    "scripts/bench_peft.py".into(),
                    "--model".into(),
                    path.display().to_string(),
                    "--rank".into(),
                    rank.to_string(),
                    "--targets".into(),
                    opts.targets.join(","),
                    "--tokens".into(),
                    tokens.display().to_string(),
                ];
                match child(&args) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        eprintln!("PEFT reference: {e:#}");
                        None
                    }
                }
            };
            for &kind in kinds {
                let mut args = vec![exe.clone(), "bench".into(), "finetune".into(), "--only".into(), format!("{which}:{kind}:{rank}")];
                args.extend(["--tokens".into(), tokens.display().to_string(), "--model".into(), opts.model.display().to_string()]);
                args.extend(["--targets".into(), opts.targets.join(","), "--batch-size".into(), opts.batch_size.to_string()]);
                args.extend(["--seq-len".into(), opts.seq_len.to_string(), "--steps".into(), opts.steps.to_string()]);
                if let Some(b) = &opts.builtin {
                    args.extend(["--builtin".into(), b.display().to_string()]);
                }
                let ours = child(&args)?;
                if which == "smollm2" {
                    smollm_peaks.push((kind.to_owned(), rank, ours.peak_memory_bytes));
                }
                let (pt, pm, ratio) = match &peft {
                    Some(p) if kind == "lora" => (
                        format!("{:.0}", p.tokens_per_second),
                        format!("{}", p.peak_memory_bytes >> 20),
                        format!("{:.2}x", ours.tokens_per_second / p.tokens_per_second),
                    ),
                    Some(p) => (format!("({:.0}, LoRA)", p.tokens_per_second), format!("({}, LoRA)", p.peak_memory_bytes >> 20), format!("{:.2}x of PEFT LoRA", ours.tokens_per_second / p.tokens_per_second)),
                    None => ("-".into(), "-".into(), "-".into()),
                };
                println!(
                    "| {which} | {} | {rank} | {:.0} | {} | {pt} | {pm} | {ratio} | {:.0}% |",
                    if kind == "qlora" { "QLoRA (Q4_1 base)" } else { "LoRA (f32 base)" },
                    ours.tokens_per_second,
                    ours.peak_memory_bytes >> 20,
                    100.0 * ours.tokens_per_second * ours.flops_per_token / gemm
                );
            }
        }
    }
    for &rank in &opts.ranks {
        let peak = |k: &str| smollm_peaks.iter().find(|(kind, r, _)| kind == k && *r == rank).map(|p| p.2);
        if let (Some(q), Some(l)) = (peak("qlora"), peak("lora")) {
            println!("\nSmolLM2 rank {rank}: QLoRA peak memory is {:.2} of LoRA's (target: at most 0.5)", q as f64 / l as f64);
        }
    }
    Ok(())
}
