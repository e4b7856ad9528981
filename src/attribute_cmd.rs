//! `ledgerlake attribute ...`: attribution from the command line. Glue only: files and
//! standard streams in, `ledgerlake-attribution` does the work.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use ledgerlake_attribution::job;
use ledgerlake_attribution::spans::{DocKey, SpanIndex, parse_tokenized};
use ledgerlake_attribution::gradient::Kernel;
use ledgerlake_attribution::{Mix, SpanRule};
use ledgerlake_serving::model::Llama;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::gradient_job::GradientMethod;
use ledgerlake_lakehouse::{Event, Lake};
use ledgerlake_serving::tokenizer::Tokenizer;

use crate::client::{self, ServerArgs};
use crate::config::{Config, ConfigArgs};

#[derive(Subcommand)]
pub enum AttributeCommand {
    /// Explain one inference: the contributions it is attributed to, heaviest first, with
    /// the output's matched text marked «like this».
    Show {
        inference_id: String,
        /// Print the explanation as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Attribute every inference with stored token ids and no attribution yet (spans, and
    /// gradient influence for adapters with training features), and send the rows to a
    /// running server. `up` runs the same job on its own
    /// every `attribution_interval_s`.
    Run {
        /// Most inferences attributed in this run.
        #[arg(long, default_value_t = 100_000)]
        limit: usize,
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// The span index: suffix arrays over token ids (see docs/attribution.md).
    Spans {
        #[command(subcommand)]
        command: SpansCommand,
    },
}

#[derive(Subcommand)]
pub enum SpansCommand {
    /// Add a shard built from token files to an index directory (created if missing).
    Build {
        /// The index directory.
        #[arg(long)]
        index: PathBuf,
        /// Documents in infini-gram's tokenized layout (u16 LE, each after 0xFFFF).
        #[arg(long, conflicts_with = "docs", required_unless_present = "docs")]
        tokenized: Option<PathBuf>,
        /// Documents as JSON lines: {"tokens": [ids...], "key": "<64 hex digits>"} (key
        /// optional: the line number).
        #[arg(long)]
        docs: Option<PathBuf>,
        /// A label of what the shard covers.
        #[arg(long, default_value = "tokens")]
        covers: String,
        /// Merge every shard into one afterwards.
        #[arg(long)]
        merge: bool,
    },
    /// Count n-grams: one JSON array of token ids per line of standard input, one count
    /// per line of standard output.
    Count {
        #[arg(long)]
        index: PathBuf,
    },
    /// Maximal matching spans of outputs: one JSON array of token ids per line of standard
    /// input, one JSON array of spans (with up to --docs hits each) per line of output.
    Find {
        #[arg(long)]
        index: PathBuf,
        /// Shortest span reported, in tokens.
        #[arg(long, default_value_t = 1)]
        min_len: usize,
        /// Most documents listed per span.
        #[arg(long, default_value_t = 10)]
        docs: usize,
    },
}

pub async fn run(command: AttributeCommand) -> Result<()> {
    match command {
        AttributeCommand::Spans { command } => spans(command),
        AttributeCommand::Show { inference_id, json, config } => {
            let config = Config::load(&config)?;
            let lake = Lake::new(config.lake()?);
            let id: ledgerlake_lakehouse::InferenceId = inference_id.parse().context("not an inference id")?;
            let (tokenizer, _) = crate::serve::load_tokenizer(&config).await?;
            let decode = |ids: &[u32]| tokenizer.decode(ids).unwrap_or_default();
            let Some(e) = ledgerlake_attribution::explain::explain(&lake, &id, &decode).await? else {
                bail!("ledgerlake has neither the token ids nor an attribution of {id}");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
                return Ok(());
            }
            println!("{} ({}): {}", e.inference_id, e.model_id.as_deref().unwrap_or("?"), e.status);
            if let Some(output) = &e.output {
                println!("output: {output}");
            }
            for c in &e.contributions {
                println!("\n{} {} of datanet {} by {} ({}, score {:.2})", c.share, c.contribution_id, c.datanet_id, c.contributor, c.method, c.raw_score);
                if let Some(h) = &c.highlighted {
                    println!("  {h}");
                }
            }
            Ok(())
        }
        AttributeCommand::Run { limit, server, config } => {
            let config = Config::load(&config)?;
            let lake = Lake::new(config.lake()?);
            let (model, tokenizer, name) = crate::serve::load_model(&config).await?;
            let mut methods = Methods::new(&config, Arc::new(model))?;
            let mut index = SpanIndex::open(&index_dir(&config.state_dir()?, &name))?;
            let done = pass(&lake, &mut index, &tokenizer, &mut methods, limit, async |events: Vec<Event>| {
                client::send_atomic(&server, &events, "attribution").await
            })
            .await?;
            println!("{}", serde_json::json!({
                "indexed": done.indexed, "attributed": done.attributed, "unattributed": done.unattributed,
            }));
            Ok(())
        }
    }
}

/// The span index of the served model's tokenizer.
pub fn index_dir(state_dir: &Path, model: &str) -> PathBuf {
    state_dir.join("attribution").join(format!("spans-{model}"))
}

/// What one pass of the job did.
#[derive(Debug, Default)]
pub struct Pass {
    pub indexed: usize,
    pub attributed: usize,
    pub unattributed: usize,
}

/// What a pass scores with: the span rule, the methods' mixes, and the gradient method
/// (absent where the model is not on the CPU, where gradient features are computed).
pub struct Methods {
    pub rule: SpanRule,
    pub mix: Mix,
    pub models: BTreeMap<String, Mix>,
    pub gradient: Option<GradientMethod>,
}

impl Methods {
    pub fn new(config: &Config, model: Arc<Llama>) -> Result<Self> {
        let kernel: Kernel = config.attribution_kernel.parse()?;
        let on_cpu = config.device == "cpu";
        let state_dir = config.state_dir()?;
        let roots = Arc::new(config.adapter_roots()?);
        Ok(Self {
            rule: SpanRule::default(),
            mix: config.attribution_mix.clone(),
            models: config.attribution_models.clone(),
            gradient: on_cpu.then(|| GradientMethod::new(model, kernel, &state_dir, roots)),
        })
    }
}

/// Inferences whose spans are scored together, in parallel.
pub const BLOCK: usize = 512;
/// Rows sent in one atomic write, at most (plus the rows of the inference that passed it).
pub const SEND_ROWS: usize = 4096;

/// One pass of the job: index the newly approved contributions, then attribute up to
/// `limit` pending inferences by every method with evidence, in blocks of [`BLOCK`], rows
/// sent in atomic writes of about [`SEND_ROWS`] (`send`).
pub async fn pass(
    lake: &Lake,
    index: &mut SpanIndex,
    tokenizer: &Tokenizer,
    methods: &mut Methods,
    limit: usize,
    send: impl AsyncFn(Vec<Event>) -> Result<()>,
) -> Result<Pass> {
    let (approved, reviewed) = job::approved(lake).await?;
    let tokenize = |text: &str| tokenizer.encode(text).map_err(|e| e.to_string());
    let indexed = job::index_new(index, &approved, reviewed, &tokenize)?;
    let (pending, version) = job::pending(lake, limit).await?;
    // After `pending`: an inference's citations are committed before its token ids.
    let (cited, cited_version) = job::citations(lake, &pending).await?;
    if !pending.is_empty()
        && let Some(g) = methods.gradient.as_mut()
    {
        g.refresh(lake).await.context("reading the registered adapters")?;
    }
    // Short whatever the index's history: the table version read, the newest review
    // version indexed and the index's shard count so far.
    let basis = format!(
        "inference_tokens@{version} citations@{cited_version} contribution_reviewed@{reviewed} spans#{}",
        index.manifest().next
    );
    let mut done = Pass { indexed, ..Pass::default() };
    for block in pending.chunks(BLOCK) {
        // Spans read only the index: the block's outputs are scored in parallel.
        let spans: Vec<_> = {
            use rayon::prelude::*;
            block.par_iter().map(|inference| job::span_part(index, &approved, &methods.rule, &inference.output)).collect()
        };
        let mut events = Vec::new();
        for (inference, (spans, evidence)) in block.iter().zip(spans) {
            let mix = methods.models.get(inference.model_id.as_str()).unwrap_or(&methods.mix).clone();
            let mut parts = vec![spans];
            if mix.gradient > 0
                && let Some(g) = methods.gradient.as_mut()
            {
                // CPU work on the caller's thread: `up` runs passes on a thread of their own. A
                // feature that cannot be computed (token ids the model does not have) leaves
                // the other methods to score the inference.
                match g.scores(inference.model_id.as_str(), inference.event_time, &inference.prompt, &inference.output) {
                    Ok(Some((keys, scores))) => parts.push(job::gradient_part(&keys, &scores, &approved)),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(inference = %inference.inference_id, error = format!("{e:#}"), "no gradient attribution"),
                }
            }
            if mix.retrieval > 0
                && let Some(cited) = cited.get(&inference.inference_id)
            {
                parts.push(job::retrieval_part(cited, &approved));
            }
            let rows = job::attribute(inference, &mix, &parts, &evidence, &approved, &basis)?;
            if matches!(&rows[..], [Event::InferenceAttributed(a)] if a.contribution_id.is_none()) {
                done.unattributed += 1;
            } else {
                done.attributed += 1;
            }
            events.extend(rows);
            // Each write is atomic: an inference's rows land together, or none do and the
            // next pass redoes them. Writes stay below SEND_ROWS rows (plus one inference's).
            if events.len() >= SEND_ROWS {
                send(std::mem::take(&mut events)).await.with_context(|| format!("recording the attributions up to {}", inference.inference_id))?;
            }
        }
        if !events.is_empty() {
            let last = &block[block.len() - 1].inference_id;
            send(events).await.with_context(|| format!("recording the attributions up to {last}"))?;
        }
    }
    Ok(done)
}

fn open(index: &Path) -> Result<SpanIndex> {
    SpanIndex::open(index).with_context(|| format!("opening the span index {}", index.display()))
}

fn spans(command: SpansCommand) -> Result<()> {
    match command {
        SpansCommand::Build { index, tokenized, docs, covers, merge } => {
            let docs = match (tokenized, docs) {
                (Some(path), _) => {
                    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                    parse_tokenized(&bytes).with_context(|| path.display().to_string())?
                }
                (None, Some(path)) => read_jsonl_docs(&path)?,
                (None, None) => bail!("give --tokenized or --docs"),
            };
            let mut index_ = open(&index)?;
            let started = std::time::Instant::now();
            index_.add(&docs, vec![covers])?;
            if merge {
                index_.merge()?;
            }
            let secs = started.elapsed().as_secs_f64();
            let tokens: usize = docs.iter().map(|(_, t)| t.len()).sum();
            println!(
                "{}",
                serde_json::json!({
                    "docs": docs.len(), "tokens": tokens, "seconds": secs,
                    "shards": index_.shards().len(), "index_tokens": index_.tokens(),
                    "index_bytes": index_.bytes(),
                    "bytes_per_token": index_.bytes() as f64 / index_.tokens().max(1) as f64,
                })
            );
            Ok(())
        }
        SpansCommand::Count { index } => {
            let index = open(&index)?;
            each_query(|q| Ok(index.count(&q).to_string()))
        }
        SpansCommand::Find { index, min_len, docs } => {
            let index = open(&index)?;
            each_query(|q| {
                let spans: Vec<serde_json::Value> = index
                    .maximal_spans(&q, min_len)
                    .into_iter()
                    .map(|s| {
                        let hits: Vec<serde_json::Value> = index
                            .hits(&q[s.start..s.start + s.len], docs)
                            .into_iter()
                            .map(|(shard, h)| {
                                serde_json::json!({
                                    "key": hex::encode(index.shards()[shard].key(h.doc)), "offset": h.offset,
                                })
                            })
                            .collect();
                        serde_json::json!({
                            "start": s.start, "len": s.len, "count": s.count,
                            "unigram_logprob": s.unigram_logprob, "hits": hits,
                        })
                    })
                    .collect();
                Ok(serde_json::to_string(&spans)?)
            })
        }
    }
}

/// Runs `answer` on each line of standard input (a JSON array of token ids).
fn each_query(mut answer: impl FnMut(Vec<u32>) -> Result<String>) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.context("reading standard input")?;
        if line.trim().is_empty() {
            continue;
        }
        let query: Vec<u32> = serde_json::from_str(&line)
            .with_context(|| format!("line {}: expected a JSON array of token ids", n + 1))?;
        writeln!(out, "{}", answer(query)?)?;
    }
    out.flush()?;
    Ok(())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DocLine {
    tokens: Vec<u32>,
    key: Option<String>,
}

fn read_jsonl_docs(path: &Path) -> Result<Vec<(DocKey, Vec<u32>)>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let doc: DocLine =
            serde_json::from_str(&line).with_context(|| format!("{} line {}", path.display(), n + 1))?;
        let key = match doc.key {
            Some(hex_key) => {
                let mut key = [0u8; 32];
                hex::decode_to_slice(&hex_key, &mut key)
                    .with_context(|| format!("{} line {}: key is not 64 hex digits", path.display(), n + 1))?;
                key
            }
            None => {
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&(n as u64).to_le_bytes());
                key
            }
        };
        docs.push((key, doc.tokens));
    }
    Ok(docs)
}

/// `up`'s job merges the span index's shards into one when it has more than this many.
pub const MERGE_ABOVE_SHARDS: usize = 8;

/// `up`'s attribution job: a pass every `every`, on a thread of its own (building a shard
/// and scoring are CPU work that must not hold the server's runtime), each inference's
/// rows written through the server's ingest writer.
pub fn spawn_job(
    lake: Lake,
    dir: PathBuf,
    tokenizer: Arc<Tokenizer>,
    mut methods: Methods,
    ingestor: ledgerlake_ingest::Ingestor,
    every: std::time::Duration,
) -> Result<()> {
    use ledgerlake_factory::Publisher;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("attribution".into()).spawn(move || {
        runtime.block_on(async move {
            let publisher = crate::finetune_cmd::LakePublisher(ingestor);
            let send = async |events: Vec<Event>| publisher.send(events).await.map_err(anyhow::Error::msg);
            let mut index: Option<SpanIndex> = None;
            loop {
                if index.is_none() {
                    match SpanIndex::open(&dir) {
                        Ok(i) => index = Some(i),
                        Err(e) => tracing::warn!(error = %e, dir = %dir.display(), "opening the span index"),
                    }
                }
                if let Some(index) = index.as_mut() {
                    match pass(&lake, index, &tokenizer, &mut methods, 10_000, &send).await {
                        Ok(p) if p.indexed + p.attributed + p.unattributed > 0 => tracing::info!(
                            indexed = p.indexed, attributed = p.attributed, unattributed = p.unattributed, "attribution pass"
                        ),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = format!("{e:#}"), "attribution pass"),
                    }
                    // Shards merge in the background: each new snapshot adds one, and a
                    // query visits every shard.
                    if index.shards().len() > MERGE_ABOVE_SHARDS {
                        let started = std::time::Instant::now();
                        match index.merge() {
                            Ok(()) => tracing::info!(seconds = started.elapsed().as_secs_f64(), "merged the span index's shards"),
                            Err(e) => tracing::warn!(error = %e, "merging the span index's shards"),
                        }
                    }
                }
                tokio::time::sleep(every).await;
            }
        })
    })?;
    Ok(())
}
