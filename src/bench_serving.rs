//! `ledgerlake bench serving`: the serving engine in-process (no HTTP) on the default base
//! model or `--model` (a GGUF file or a checkpoint directory): throughput by batch size,
//! the same 32 requests over 1, 8 and 32 adapters, cold adapter loads, the cost of
//! switching between resident adapters, and many registered adapters against 10. For a
//! GGUF model it first measures prompt processing and single-stream decoding beside
//! llama.cpp (llama-cpp-python, the same file, prompt and thread count) in the same run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use ledgerlake_lakehouse::Price;
use ledgerlake_serving::engine::{Completion, CompletionSink, Engine, EngineConfig, Output, Request, Source};
use ledgerlake_serving::lora::Adapter;
use ledgerlake_serving::metrics::Metrics;
use ledgerlake_serving::checkpoint::{self, Checkpoint};
use ledgerlake_serving::model::{KvCache, Llama, StepSeq, argmax, row};
use ledgerlake_serving::sampling::SamplingParams;
use ledgerlake_serving::tokenizer::Tokenizer;
use tokio::sync::mpsc;

struct NoAccounting;
impl CompletionSink for NoAccounting {
    fn record(&self, _: &Completion) -> std::result::Result<(), String> {
        Ok(())
    }
}

const PROMPTS: [&str; 4] = ["It was a fine morning, and", "\"I do not know,\" said", "The little rabbit", "When the ship came"];

/// A PEFT adapter directory with seeded random weights on q, k, v and o of every layer.
fn write_adapter(dir: &Path, model: &Llama, rank: usize, seed: u64) -> Result<u64> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("adapter_config.json"),
        format!(r#"{{"peft_type": "LORA", "r": {rank}, "lora_alpha": {}, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}"#, 2 * rank),
    )?;
    let c = &model.config;
    let (d, hd) = (c.hidden_size, c.head_dim());
    let (q, kv) = (c.num_attention_heads * hd, c.kv_heads() * hd);
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut rand = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect()
    };
    let mut tensors = HashMap::new();
    for l in 0..c.num_hidden_layers {
        for (proj, out, inp) in [("q_proj", q, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, q)] {
            let p = format!("base_model.model.model.layers.{l}.self_attn.{proj}");
            tensors.insert(format!("{p}.lora_A.weight"), Tensor::from_vec(rand(rank * inp), (rank, inp), &Device::Cpu)?);
            tensors.insert(format!("{p}.lora_B.weight"), Tensor::from_vec(rand(out * rank), (out, rank), &Device::Cpu)?);
        }
    }
    let file = dir.join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &file)?;
    Ok(std::fs::metadata(&file)?.len())
}

/// Submits one request per entry of `adapters` at once and waits for all; returns the
/// generated tokens and the wall time.
async fn batch(engine: &Engine, adapters: &[Option<String>], max_tokens: usize) -> Result<(usize, Duration)> {
    let started = Instant::now();
    let mut rxs = Vec::new();
    for (i, adapter) in adapters.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        engine.submit(Request {
            id: format!("bench-{i}"),
            adapter: adapter.clone(),
            prompt: engine.tokenizer.encode_prompt(PROMPTS[i % PROMPTS.len()])?,
            max_tokens,
            // Sampled (seeded) so no request stops early on end-of-text more than another.
            sampling: SamplingParams { temperature: 0.8, top_p: 0.95, top_k: 0, seed: Some(i as u64), ..SamplingParams::default() },
            stop: vec![],
            caller: "bench".into(),
            logprobs: None,
            bill_prompt: true,
            citations: vec![],
            output: tx,
        })?;
        rxs.push(rx);
    }
    let mut tokens = 0;
    for mut rx in rxs {
        loop {
            match rx.recv().await {
                Some(Output::Finished(c)) => {
                    tokens += c.completion_tokens;
                    break;
                }
                Some(Output::Failed(e)) => bail!("request failed: {e}"),
                Some(Output::Text(_) | Output::Logprobs(_)) => {}
                None => bail!("the engine stopped"),
            }
        }
    }
    Ok((tokens, started.elapsed()))
}

/// Best tokens/s of `runs` runs.
async fn throughput(engine: &Engine, adapters: &[Option<String>], max_tokens: usize, runs: usize) -> Result<f64> {
    let mut best: f64 = 0.0;
    for _ in 0..runs {
        let (tokens, took) = batch(engine, adapters, max_tokens).await?;
        best = best.max(tokens as f64 / took.as_secs_f64());
    }
    Ok(best)
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn engine(model: &Arc<Llama>, tok: &Arc<Tokenizer>, max_cpu_loras: usize, max_running: usize) -> Engine {
    let config = EngineConfig { max_running, max_loras: 32, max_cpu_loras, max_waiting: 4096, max_prefill_tokens: 4096 };
    Engine::start("ledgerlake-base", Price::FREE, model.clone(), tok.clone(), config, Arc::new(NoAccounting), Arc::new(Metrics::new()))
}

/// A passage of plain prose; its first [`PP_TOKENS`] tokens are the prompt both engines
/// process in the GGUF comparison.
const PASSAGE: &str = "The history of the city begins in the early medieval period, when a small settlement grew \
around a river crossing. Over the following centuries, merchants, craftsmen and farmers arrived from the surrounding \
regions, and the town became a centre of trade for wool, grain and salt. Its walls were built in the thirteenth century, \
and a cathedral followed soon after. In the sixteenth century a university was founded, and printers, lawyers and \
scholars came to live in the narrow streets around the market square. Today the old town is a place of museums, \
cafés and small shops, and every summer thousands of visitors walk along the river to see the bridges and the gardens.";
const PP_TOKENS: usize = 105;

/// llama.cpp through llama-cpp-python: prompt processing and greedy single-stream decode
/// of the same token ids, best of `runs`; prints one JSON line.
const LLAMA_CPP: &str = r#"
import json, sys, time
import llama_cpp
spec = json.loads(sys.argv[1])
m = llama_cpp.Llama(model_path=spec["model"], n_threads=spec["threads"], n_threads_batch=spec["threads"], n_ctx=1024, verbose=False)
ids, new = spec["prompt"], spec["new_tokens"]
pp, tg = 0.0, 0.0
for _ in range(spec["runs"]):
    m.reset()
    t = time.perf_counter(); m.eval(ids); pp = max(pp, len(ids) / (time.perf_counter() - t))
    m.reset()
    n, t1 = 0, None
    for tok in m.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        n += 1
        if n == 1:
            t1 = time.perf_counter()
        if n > new:
            break
    tg = max(tg, new / (time.perf_counter() - t1))
print(json.dumps({"pp": pp, "tg": tg, "version": llama_cpp.__version__}))
"#;

/// Our prompt processing and greedy single-stream decode rates (tokens/s, best of `runs`)
/// over `prompt`, and the greedy continuation (the same in every run).
fn single_stream(model: &Llama, prompt: &[u32], new_tokens: usize, runs: usize) -> Result<(f64, f64, Vec<u32>)> {
    let (mut pp, mut tg) = (0f64, 0f64);
    let mut continuation = Vec::with_capacity(new_tokens);
    for _ in 0..runs {
        continuation.clear();
        let mut cache = KvCache::default();
        let t = Instant::now();
        let logits = model.step(&mut [StepSeq { tokens: prompt, cache: &mut cache, adapter: None }])?;
        pp = pp.max(prompt.len() as f64 / t.elapsed().as_secs_f64());
        let mut next = argmax(&row(&logits, 0)?);
        let t = Instant::now();
        for _ in 0..new_tokens {
            continuation.push(next);
            let logits = model.step(&mut [StepSeq { tokens: &[next], cache: &mut cache, adapter: None }])?;
            next = argmax(&row(&logits, 0)?);
        }
        tg = tg.max(new_tokens as f64 / t.elapsed().as_secs_f64());
    }
    Ok((pp, tg, continuation))
}

fn passage_prompt(tok: &Tokenizer) -> Result<Vec<u32>> {
    let mut prompt = tok.encode_prompt(PASSAGE)?;
    prompt.truncate(PP_TOKENS);
    Ok(prompt)
}

/// Prompt processing and single-stream decode of `model` beside llama.cpp's on `file`;
/// returns llama.cpp's decode rate.
fn against_llama_cpp(model: &Llama, tok: &Tokenizer, file: &Path, new_tokens: usize, runs: usize, python: &Path) -> Result<f64> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let prompt = passage_prompt(tok)?;
    let (pp, tg, continuation) = single_stream(model, &prompt, new_tokens, runs)?;
    println!("\ngreedy continuation of the passage: {:?}", tok.decode(&continuation)?);
    let spec = serde_json::json!({"model": file, "threads": threads, "prompt": prompt, "new_tokens": new_tokens, "runs": runs});
    let out = std::process::Command::new(python).arg("-c").arg(LLAMA_CPP).arg(spec.to_string()).output().with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!("llama-cpp-python failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let reference: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading llama-cpp-python's answer")?;
    let (rpp, rtg) = (reference["pp"].as_f64().unwrap_or(0.0), reference["tg"].as_f64().unwrap_or(0.0));
    println!(
        "\nagainst llama.cpp (llama-cpp-python {}, n_threads {threads}; {} prompt tokens, {new_tokens} greedy new tokens, best of {runs})",
        reference["version"].as_str().unwrap_or("?"),
        prompt.len()
    );
    println!("\n| | ledgerlake | llama.cpp | ratio |\n|---|---|---|---|");
    println!("| prompt processing, tokens/s | {pp:.0} | {rpp:.0} | {:.2}x |", pp / rpp);
    println!("| single-stream decode, tokens/s | {tg:.0} | {rtg:.0} | {:.2}x |", tg / rtg);
    Ok(rtg)
}

/// What `bench serving` measures (its command-line arguments).
#[derive(clap::Args)]
pub struct Options {
    /// A GGUF file or a checkpoint directory (default: the shipped base model). A GGUF
    /// model is also measured against llama.cpp through llama-cpp-python (on the CPU).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The Python with llama-cpp-python, for a GGUF model (default: .venv/bin/python).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// New tokens per request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Runs of each measurement; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Rank of the benchmark adapters.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Concurrent requests of the batch table.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// Only llama.cpp's reference and the batch table: no adapters or memory.
    #[arg(long)]
    pub only_batches: bool,
}

/// Runs the benchmark; `default_model` names the model when `--model` is not given.
pub async fn run(opts: Options, default_model: fn() -> PathBuf) -> Result<()> {
    let Options { model: model_path, python, max_tokens, runs, rank, device, batches, only_batches } = opts;
    if batches.contains(&0) {
        bail!("--batches takes numbers of concurrent requests of at least 1");
    }
    let device = ledgerlake_serving::device(&device)?;
    let path = model_path.unwrap_or_else(default_model);
    let rss_before = rss_mb();
    let Checkpoint { model, tokenizer, name, format, file_bytes } = checkpoint::load(&path, &device).with_context(|| format!("loading {}", path.display()))?;
    let (model, tok) = (Arc::new(model), Arc::new(tokenizer));
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "model {name} ({format}, {} parameters; {:.1} MB on disk, weights {:.1} MB in memory, process RSS +{:.0} MB after loading), {threads} threads, {max_tokens} new tokens per request, best of {runs}",
        model.config.parameter_count(),
        file_bytes as f64 / 1e6,
        model.weight_bytes() as f64 / 1e6,
        rss_mb() - rss_before,
    );
    // llama.cpp's single-stream decode rate, for the batch table.
    // llama.cpp runs on the CPU: a GPU run reports its own single stream alone.
    let reference = if format == "gguf" && device.is_cpu() {
        let python = python.unwrap_or_else(|| PathBuf::from(".venv/bin/python"));
        against_llama_cpp(&model, &tok, &path, max_tokens, runs, &python)?
    } else {
        if format == "gguf" {
            let prompt = passage_prompt(&tok)?;
            let (pp, tg, continuation) = single_stream(&model, &prompt, max_tokens, runs)?;
            println!("\ngreedy continuation of the passage: {:?}", tok.decode(&continuation)?);
            println!("\non {device:?} ({} prompt tokens, {max_tokens} greedy new tokens, best of {runs}; no llama.cpp reference off the CPU)", prompt.len());
            println!("\n| | ledgerlake |\n|---|---|");
            println!("| prompt processing, tokens/s | {pp:.0} |");
            println!("| single-stream decode, tokens/s | {tg:.0} |");
        }
        0.0
    };
    // 1. Batch sizes, base model (the engine runs as many at once as the largest batch).
    let widest = batches.iter().copied().max().unwrap_or(32).max(32);
    let e = engine(&model, &tok, 128, widest);
    let _ = throughput(&e, &vec![None; 4], 8, 1).await?; // warm-up
    if reference > 0.0 {
        println!("\n| concurrent requests | tokens/s (base model) | vs llama.cpp single stream |\n|---|---|---|");
    } else {
        println!("\n| batch | tokens/s (base model) |\n|---|---|");
    }
    for &b in &batches {
        let tps = throughput(&e, &vec![None; b], max_tokens, runs).await?;
        if reference > 0.0 {
            println!("| {b} | {tps:.0} | {:.2}x |", tps / reference);
        } else {
            println!("| {b} | {tps:.0} |");
        }
    }

    if only_batches {
        return Ok(());
    }

    // Big models get 100 adapters (the issue's 100 registered, 10 in use), small ones 1,000.
    let registered = if model.config.parameter_count() > 20_000_000 { 100 } else { 1000 };
    let work = tempfile::tempdir()?;
    let names: Vec<String> = (0..registered).map(|i| format!("bench-lora-{i}")).collect();
    let mut bytes = 0;
    let write_started = Instant::now();
    for (i, name) in names.iter().enumerate() {
        bytes = write_adapter(&work.path().join(name), &model, rank, i as u64)?;
    }
    println!(
        "\nwrote {registered} PEFT adapters (rank {rank}, q/k/v/o, {:.1} KB each) in {:.1} s",
        bytes as f64 / 1024.0,
        write_started.elapsed().as_secs_f64()
    );

    // 2. 32 requests over 1, 8 and 32 adapters (all resident: warmed first).
    for name in &names[..32] {
        e.register(name, work.path().join(name), Price::FREE, Source::Admin)?;
    }
    let warm: Vec<Option<String>> = names[..32].iter().cloned().map(Some).collect();
    batch(&e, &warm, 2).await?;
    println!("\n| 32 requests over | tokens/s | vs 1 adapter |\n|---|---|---|");
    // The four mixes take turns, run by run, so drift of this shared machine falls on all.
    let mixes: Vec<Vec<Option<String>>> = [1usize, 8, 32]
        .iter()
        .map(|&spread| (0..32).map(|i| Some(names[i % spread].clone())).collect())
        .chain(std::iter::once(vec![None; 32]))
        .collect();
    let mut best = [0f64; 4];
    for _ in 0..runs {
        for (b, mix) in best.iter_mut().zip(&mixes) {
            *b = b.max(throughput(&e, mix, max_tokens, 1).await?);
        }
    }
    let single = best[0];
    for (spread, tps) in [1usize, 8, 32].iter().zip(best) {
        println!("| {spread} adapter{} | {tps:.0} | {:.2}x |", if *spread == 1 { "" } else { "s" }, tps / single);
    }
    let base32 = best[3];
    println!("| (no adapter) | {base32:.0} | {:.2}x |", base32 / single);

    // 3. Cold loads: Adapter::load from disk (page cache warm, as after the write).
    let mut load_total = Duration::ZERO;
    let n_loads = 50;
    for name in &names[names.len() - n_loads..] {
        let t = Instant::now();
        let a = Adapter::load(&work.path().join(name), &device, DType::F32)?;
        load_total += t.elapsed();
        std::hint::black_box(a);
    }
    let per = load_total / n_loads as u32;
    println!(
        "\ncold adapter load: {:.3} ms per adapter of {:.1} KB = {:.2} ms/MB (mean of {n_loads})",
        per.as_secs_f64() * 1e3,
        bytes as f64 / 1024.0,
        per.as_secs_f64() * 1e3 / (bytes as f64 / 1e6)
    );

    // 4. Switching between resident adapters: one sequence decoding, the adapter changed
    // every step against kept, over the same number of steps.
    let a1 = Adapter::load(&work.path().join(&names[0]), &device, DType::F32)?;
    let a2 = Adapter::load(&work.path().join(&names[1]), &device, DType::F32)?;
    let steps = 100;
    let decode = |switch: bool| -> Result<Duration> {
        let mut cache = KvCache::default();
        let prompt = tok.encode_prompt(PROMPTS[0])?;
        model.step(&mut [StepSeq { tokens: &prompt, cache: &mut cache, adapter: Some(&a1) }])?;
        let t = Instant::now();
        for s in 0..steps {
            let adapter = if switch && s % 2 == 1 { &a2 } else { &a1 };
            model.step(&mut [StepSeq { tokens: &[42], cache: &mut cache, adapter: Some(adapter) }])?;
        }
        Ok(t.elapsed())
    };
    let (mut same, mut switched) = (Duration::MAX, Duration::MAX);
    for _ in 0..20 {
        same = same.min(decode(false)?);
        switched = switched.min(decode(true)?);
    }
    let per_switch_us = (switched.as_secs_f64() - same.as_secs_f64()) / (steps / 2) as f64 * 1e6;
    println!(
        "switch between resident adapters: {per_switch_us:.1} µs per switch (decode step {:.0} µs kept, {:.0} µs alternating; nothing is copied or merged)",
        same.as_secs_f64() / steps as f64 * 1e6,
        switched.as_secs_f64() / steps as f64 * 1e6
    );
    drop(e);

    // 5. Many registered adapters, a working set of 10, against only 10 registered. Both
    // engines live side by side and their runs alternate, so drift of this shared machine
    // falls on both alike.
    let working: Vec<Option<String>> = (0..32).map(|i| Some(names[i % 10].clone())).collect();
    let rss0 = rss_mb();
    let small = engine(&model, &tok, 128, 32);
    let big = engine(&model, &tok, 128, 32);
    for (i, name) in names.iter().enumerate() {
        if i < 10 {
            small.register(name, work.path().join(name), Price::FREE, Source::Admin)?;
        }
        big.register(name, work.path().join(name), Price::FREE, Source::Admin)?;
    }
    batch(&small, &working, 2).await?;
    batch(&big, &working, 2).await?;
    let (mut tps10, mut tps1000) = (0f64, 0f64);
    for _ in 0..runs.max(3) {
        tps10 = tps10.max(throughput(&small, &working, max_tokens, 1).await?);
        tps1000 = tps1000.max(throughput(&big, &working, max_tokens, 1).await?);
    }
    let rss1 = rss_mb();
    println!(
        "\n{registered} registered / working set 10: {tps1000:.0} tokens/s; 10 registered: {tps10:.0} tokens/s ({:+.1}%); process RSS {rss1:.0} MB (model weights {:.1} MB, before the engines {rss0:.0} MB)",
        (tps1000 / tps10 - 1.0) * 100.0,
        model.weight_bytes() as f64 / 1e6
    );
    Ok(())
}
