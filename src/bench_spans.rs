//! `ledgerlake bench spans`: the span index beside infini-gram on the same token ids, in one
//! run: build tokens/s and bytes per token, n-gram count p50/p99, and the maximal spans of
//! 500-token outputs (with up to 10 documents per span) p50/p99. The reference is
//! infini-gram's own Rust indexer and C++ engine (`scripts/bench_infini_gram.py`).
//!
//! The corpus is synthetic: documents of 50-500 tokens drawn from a Zipf distribution over
//! SmolLM2's 49,152-token vocabulary; outputs are pieces of documents between random tokens,
//! so they hold long matches as a model's copied text would.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ledgerlake_attribution::spans::{DocKey, SpanIndex};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Tokens in the corpus.
    #[arg(long, default_value_t = 100_000_000)]
    pub tokens: usize,
    /// N-grams counted (half of them present).
    #[arg(long, default_value_t = 2000)]
    pub queries: usize,
    /// 500-token outputs whose maximal spans are found.
    #[arg(long, default_value_t = 200)]
    pub outputs: usize,
    /// A Python with the infini-gram package; empty skips the reference.
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: String,
    /// Work directory (default: a temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

const VOCAB: usize = 49_152;

pub fn run(opts: Options) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = opts.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let mut rng = StdRng::seed_from_u64(2026);
    let started = Instant::now();
    let docs = corpus(&mut rng, opts.tokens);
    println!("corpus: {} tokens in {} documents, generated in {:.1} s", opts.tokens, docs.len(), started.elapsed().as_secs_f64());

    // The same token ids for infini-gram, in its layout.
    let ig_dir = dir.join("infini-gram");
    std::fs::create_dir_all(&ig_dir)?;
    {
        let mut data = std::io::BufWriter::new(std::fs::File::create(ig_dir.join("tokenized.0"))?);
        let mut offsets = Vec::with_capacity(docs.len() * 8);
        let mut at = 0u64;
        for (_, tokens) in &docs {
            offsets.extend_from_slice(&at.to_le_bytes());
            data.write_all(&u16::MAX.to_le_bytes())?;
            for &t in tokens {
                data.write_all(&(t as u16).to_le_bytes())?;
            }
            at += 2 * (tokens.len() as u64 + 1);
        }
        data.flush()?;
        std::fs::write(ig_dir.join("offset.0"), offsets)?;
    }

    let queries = ngram_queries(&mut rng, &docs, opts.queries);
    let outputs = outputs(&mut rng, &docs, opts.outputs);
    let write_lines = |name: &str, rows: &[Vec<u32>]| -> Result<PathBuf> {
        let path = dir.join(name);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for r in rows {
            serde_json::to_writer(&mut f, r)?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
        Ok(path)
    };
    let queries_path = write_lines("queries.jsonl", &queries)?;
    let outputs_path = write_lines("outputs.jsonl", &outputs)?;

    // Ours: build (suffix array, packing) and write the shard, then load it as `up` would.
    let index_dir = dir.join("ours");
    let _ = std::fs::remove_dir_all(&index_dir);
    let mut index = SpanIndex::open(&index_dir)?;
    let started = Instant::now();
    index.add(&docs, vec!["bench".into()])?;
    let build_s = started.elapsed().as_secs_f64();
    drop(docs);
    let bytes_per_token = index.bytes() as f64 / index.tokens() as f64;
    drop(index);
    let started = Instant::now();
    let index = SpanIndex::open(&index_dir)?;
    let load_s = started.elapsed().as_secs_f64();

    for q in queries.iter().take(50) {
        index.count(q);
    }
    let mut counts = Vec::with_capacity(queries.len());
    let mut count_ms = Vec::with_capacity(queries.len());
    for q in &queries {
        let t = Instant::now();
        counts.push(index.count(q));
        count_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut span_ms = Vec::with_capacity(outputs.len());
    let mut span_counts = Vec::with_capacity(outputs.len());
    for o in &outputs {
        let t = Instant::now();
        let spans = index.maximal_spans(o, 1);
        let mut hits = 0;
        for s in &spans {
            hits += index.hits(&o[s.start..s.start + s.len], 10).len();
        }
        span_ms.push(t.elapsed().as_secs_f64() * 1e3);
        span_counts.push((spans.len(), hits));
    }
    // A whole span attribution: spans kept by the rule, scores, weights.
    let rule = ledgerlake_attribution::SpanRule::default();
    let mut attribute_ms = Vec::with_capacity(outputs.len());
    let mut attributed = 0usize;
    for o in &outputs {
        let t = Instant::now();
        let (_, scores) = ledgerlake_attribution::span_scores(&index, o, &rule, |_| true);
        let part = ledgerlake_attribution::Part { method: ledgerlake_lakehouse::events::AttributionMethod::Spans, scores };
        let weights = ledgerlake_attribution::combine(&ledgerlake_attribution::Mix::default(), &[part]);
        attribute_ms.push(t.elapsed().as_secs_f64() * 1e3);
        attributed += usize::from(!weights.is_empty());
    }
    let tokens = opts.tokens as f64;
    println!("ours:        build {:>6.1} s = {:>5.2} M tokens/s (built and written; loaded again in {:.1} s), {:.2} bytes/token",
        build_s, tokens / build_s / 1e6, load_s, bytes_per_token);
    println!("ours:        count p50 {:.4} ms p99 {:.4} ms; maximal spans of a 500-token output (+ up to 10 docs each) p50 {:.2} ms p99 {:.2} ms",
        pct(&count_ms, 50.0), pct(&count_ms, 99.0), pct(&span_ms, 50.0), pct(&span_ms, 99.0));
    let mean_spans = span_counts.iter().map(|c| c.0).sum::<usize>() as f64 / span_counts.len().max(1) as f64;
    println!("ours:        whole attribution of a 500-token output (spans, rule, scores, weights) p50 {:.2} ms p99 {:.2} ms; {attributed} of {} outputs attributed",
        pct(&attribute_ms, 50.0), pct(&attribute_ms, 99.0), outputs.len());
    println!("             {:.1} maximal spans per output on average; {} of {} n-grams present",
        mean_spans, counts.iter().filter(|&&c| c > 0).count(), counts.len());

    if opts.python.is_empty() {
        println!("infini-gram: skipped (--python '')");
        return Ok(());
    }
    let script = std::env::current_dir()?.join("scripts/bench_infini_gram.py");
    let out = std::process::Command::new(&opts.python)
        .arg(&script)
        .arg(&ig_dir)
        .arg(&queries_path)
        .arg(&outputs_path)
        .arg(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).to_string())
        .output()
        .with_context(|| format!("running {} {}", opts.python, script.display()))?;
    if !out.status.success() {
        bail!("infini-gram reference failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).context("the reference's JSON")?;
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let theirs: Vec<u64> = r["counts"].as_array().map(|a| a.iter().filter_map(|v| v.as_u64()).collect()).unwrap_or_default();
    let agree = theirs == counts;
    println!("infini-gram: build {:>6.1} s = {:>5.2} M tokens/s, {:.2} bytes/token",
        f("build_seconds"), tokens / f("build_seconds") / 1e6, f("index_bytes") / tokens);
    println!("infini-gram: count p50 {:.4} ms p99 {:.4} ms; attribute() of a 500-token output p50 {:.2} ms p99 {:.2} ms",
        f("count_ms_p50"), f("count_ms_p99"), f("spans_ms_p50"), f("spans_ms_p99"));
    println!("counts equal on all {} n-grams: {agree}", counts.len());
    if !agree {
        bail!("our counts differ from infini-gram's");
    }
    Ok(())
}

fn pct(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((p / 100.0) * (v.len().saturating_sub(1)) as f64).round() as usize).copied().unwrap_or(f64::NAN)
}

/// The cumulative distribution of Zipf(1.1) over ids `0..vocab` (the benchmarks' corpora).
pub(crate) fn zipf_cdf(vocab: usize) -> Vec<f64> {
    let weights: Vec<f64> = (1..=vocab).map(|r| 1.0 / (r as f64).powf(1.1)).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect()
}

/// An id drawn against `cdf` ([`zipf_cdf`]), at most `max`.
pub(crate) fn draw(rng: &mut StdRng, cdf: &[f64], max: usize) -> u32 {
    cdf.partition_point(|&c| c < rng.random::<f64>()).min(max) as u32
}

/// Documents of 50-500 Zipf(1.1)-distributed token ids, `tokens` in all.
fn corpus(rng: &mut StdRng, tokens: usize) -> Vec<(DocKey, Vec<u32>)> {
    let cdf = zipf_cdf(VOCAB);
    let mut docs = Vec::new();
    let mut left = tokens;
    while left > 0 {
        let len = rng.random_range(50..=500).min(left);
        let doc = (0..len).map(|_| draw(rng, &cdf, VOCAB - 2)).collect();
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&(docs.len() as u64).to_le_bytes());
        docs.push((key, doc));
        left -= len;
    }
    docs
}

fn ngram_queries(rng: &mut StdRng, docs: &[(DocKey, Vec<u32>)], n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let (_, d) = &docs[rng.random_range(0..docs.len())];
            let len = rng.random_range(1..=8).min(d.len());
            if i % 2 == 0 {
                let s = rng.random_range(0..=d.len() - len);
                d[s..s + len].to_vec()
            } else {
                (0..len).map(|_| rng.random_range(0..VOCAB as u32 - 1)).collect()
            }
        })
        .collect()
}

/// 500-token outputs: pieces of 5-60 tokens of random documents between random tokens.
fn outputs(rng: &mut StdRng, docs: &[(DocKey, Vec<u32>)], n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|_| {
            let mut out = Vec::with_capacity(500);
            while out.len() < 500 {
                let (_, d) = &docs[rng.random_range(0..docs.len())];
                let len = rng.random_range(5..=60).min(d.len());
                let s = rng.random_range(0..=d.len() - len);
                out.extend_from_slice(&d[s..s + len]);
                out.extend((0..rng.random_range(1..10)).map(|_| rng.random_range(0..VOCAB as u32 - 1)));
            }
            out.truncate(500);
            out
        })
        .collect()
}
