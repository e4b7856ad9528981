//! `ledgerlake bench job`: the attribution job end to end on a real lake, as `up` runs it:
//! a pass reads the approved contributions and the pending inferences from Delta, indexes
//! new contributions with the served model's tokenizer, scores every inference and writes
//! its rows through the ingest writer (validation, dedupe, Delta commits).
//!
//! The lake is synthetic: one public datanet of `--contributions` approved contributions
//! (text decoded from Zipf-distributed ids of the tokenizer's vocabulary, 50 to 250 ids
//! each), and `--inferences` stored answers of `--output-tokens` tokens, half of them
//! quoting pieces (8 to 40 tokens) of random contributions between Zipf-drawn tokens, half
//! only Zipf-drawn. Timed: the first pass (it builds the span index), the reading of the
//! pending inferences on its own, the pass that attributes them all, and a pass with
//! nothing left to do.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use chrono::Utc;
use ledgerlake_attribution::spans::SpanIndex;
use ledgerlake_attribution::{Mix, SpanRule, job};
use ledgerlake_ingest::Ingestor;
use ledgerlake_lakehouse::events::{self, ContributionReviewed, ContributionSubmitted, DatanetCreated, Event, InferenceTokens, Verdict, Visibility};
use ledgerlake_lakehouse::lake::TableWriter;
use ledgerlake_lakehouse::{ContributionId, DatanetId, EventKind, Lake, LakeConfig, Sha256Hex, messages};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::attribute_cmd::{Methods, pass};
use crate::bench_spans::{draw, zipf_cdf};
use crate::config::Config;

#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Approved contributions in the lake.
    #[arg(long, default_value_t = 100_000)]
    pub contributions: usize,
    /// Stored answers to attribute.
    #[arg(long, default_value_t = 100_000)]
    pub inferences: usize,
    /// Tokens of each answer.
    #[arg(long, default_value_t = 200)]
    pub output_tokens: usize,
    /// The model whose tokenizer indexes the contributions (default: the built-in one).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Work directory (default: a temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

const ROWS_PER_COMMIT: usize = 20_000;

/// Writes a bench lake's events straight into Delta, `rows_per_commit` at a time.
pub(crate) async fn commit_in(lake: &Lake, kind: EventKind, events: &[Event], rows_per_commit: usize) -> Result<()> {
    let mut writer = TableWriter::open(lake, kind).await?;
    for chunk in events.chunks(rows_per_commit) {
        let batch = events::to_record_batch(kind, chunk.iter(), Utc::now())?;
        writer.append(&[batch]).await?;
    }
    Ok(())
}

pub async fn run(opts: Options) -> Result<()> {
    ensure!(opts.contributions > 0 && opts.inferences > 0 && opts.output_tokens > 0, "give at least one contribution, inference and output token");
    let tmp = tempfile::tempdir()?;
    let dir = opts.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    let lake_dir = dir.join("lake");
    let mut config = Config { data: lake_dir.display().to_string(), ..Config::default() };
    config.model = opts.model.clone();
    let lake = Lake::new(LakeConfig::parse(&config.data)?);
    let state = dir.join("state");
    let (tokenizer, model) = crate::serve::load_tokenizer(&config).await.context("loading the tokenizer")?;
    let vocab = tokenizer.vocab_size();
    println!("tokenizer: {model} ({vocab} ids)");
    let mut rng = StdRng::seed_from_u64(2026);
    let cdf = zipf_cdf(vocab);
    let zipf = |rng: &mut StdRng| draw(rng, &cdf, vocab - 1);

    // The datanet and its approved contributions, written straight into Delta.
    let started = Instant::now();
    let datanet: DatanetId = "bench".parse()?;
    let owner = ledgerlake_ingest::sign::Keypair::from_seed(b"bench-owner").address();
    let signature: ledgerlake_lakehouse::Signature = format!("0x{}1b", "11".repeat(64)).parse()?;
    let at = Utc::now() - chrono::Duration::hours(1);
    commit_in(&lake, EventKind::DatanetCreated, &[DatanetCreated {
        event_id: "bench-datanet".parse()?,
        event_time: at,
        datanet_id: datanet.clone(),
        owner,
        name: "bench".into(),
        description: String::new(),
        license: "CC0-1.0".into(),
        visibility: Some(Visibility::Public),
        signature: None,
    }
    .into()], ROWS_PER_COMMIT)
    .await?;
    let contributors: Vec<_> =
        (0..1000).map(|i| ledgerlake_ingest::sign::Keypair::from_seed(format!("bench-{i}").as_bytes()).address()).collect();
    let mut submitted = Vec::with_capacity(opts.contributions);
    let mut reviewed = Vec::with_capacity(opts.contributions);
    for i in 0..opts.contributions {
        let ids: Vec<u32> = (0..rng.random_range(50..=250)).map(|_| zipf(&mut rng)).collect();
        let content = format!("{} {i}", tokenizer.decode(&ids)?);
        let sha = Sha256Hex::digest(content.as_bytes());
        let id = ContributionId::for_message(&messages::contribution(&datanet, &sha));
        submitted.push(Event::from(ContributionSubmitted {
            event_id: format!("bench-sub-{i}").parse()?,
            event_time: at,
            contribution_id: Some(id.clone()),
            datanet_id: datanet.clone(),
            contributor: contributors[i % contributors.len()],
            content,
            content_sha256: Some(sha),
            license: "CC0-1.0".into(),
            language: None,
            source: None,
            tags: vec![],
            signature,
        }));
        reviewed.push(Event::from(ContributionReviewed {
            event_id: format!("bench-rev-{i}").parse()?,
            event_time: at,
            contribution_id: id,
            datanet_id: datanet.clone(),
            reviewer: owner,
            verdict: Verdict::Approved,
            reason: None,
            signature,
        }));
    }
    commit_in(&lake, EventKind::ContributionSubmitted, &submitted, ROWS_PER_COMMIT).await?;
    commit_in(&lake, EventKind::ContributionReviewed, &reviewed, ROWS_PER_COMMIT).await?;
    drop((submitted, reviewed));
    println!("lake: {} approved contributions written in {:.1} s", opts.contributions, started.elapsed().as_secs_f64());

    let ingestor = Ingestor::start(lake.clone(), state.join("index"), config.writer()).await?;
    let publisher = crate::finetune_cmd::LakePublisher(ingestor);
    let send = async |events: Vec<Event>| {
        use ledgerlake_factory::Publisher;
        publisher.send(events).await.map_err(anyhow::Error::msg)
    };
    let mut methods = Methods { rule: SpanRule::default(), mix: Mix::default(), models: Default::default(), gradient: None };
    let mut index = SpanIndex::open(&crate::attribute_cmd::index_dir(&state, &model))?;

    let started = Instant::now();
    let first = pass(&lake, &mut index, &tokenizer, &mut methods, opts.inferences, &send).await?;
    let indexing = started.elapsed().as_secs_f64();
    ensure!(first.indexed == opts.contributions, "indexed {} of {}", first.indexed, opts.contributions);
    println!(
        "first pass (reads the snapshot, tokenizes and indexes {} contributions, {} tokens): {indexing:.1} s",
        first.indexed,
        index.tokens()
    );

    // The answers: token ids straight into `inference_tokens`.
    let shard = &index.shards()[0];
    let docs = shard.docs() as u32;
    let mut stored = Vec::with_capacity(opts.inferences);
    let mut quoted_tokens = 0usize;
    for i in 0..opts.inferences {
        let mut output = Vec::with_capacity(opts.output_tokens);
        while output.len() < opts.output_tokens {
            if i % 2 == 0 {
                let doc = shard.doc_tokens(rng.random_range(0..docs));
                let len = rng.random_range(8..=40).min(doc.len());
                let s = rng.random_range(0..=doc.len() - len);
                output.extend_from_slice(&doc[s..s + len]);
                quoted_tokens += len;
            }
            output.extend((0..rng.random_range(5..=30)).map(|_| zipf(&mut rng)));
        }
        output.truncate(opts.output_tokens);
        stored.push(Event::from(InferenceTokens {
            event_id: format!("bench-{i:07}:tokens").parse()?,
            event_time: Utc::now(),
            inference_id: format!("bench-{i:07}").parse()?,
            model_id: model.parse()?,
            prompt_token_ids: (0..32).map(|_| zipf(&mut rng)).collect(),
            output_token_ids: output,
        }));
    }
    commit_in(&lake, EventKind::InferenceTokens, &stored, ROWS_PER_COMMIT).await?;
    drop(stored);
    println!(
        "answers: {} of {} tokens stored ({:.0}% of output tokens quoted)",
        opts.inferences,
        opts.output_tokens,
        100.0 * quoted_tokens.min(opts.inferences * opts.output_tokens) as f64 / (opts.inferences * opts.output_tokens) as f64
    );

    let started = Instant::now();
    let (pending, _) = job::pending(&lake, opts.inferences).await?;
    let reading = started.elapsed().as_secs_f64();
    ensure!(pending.len() == opts.inferences, "{} pending of {}", pending.len(), opts.inferences);
    drop(pending);
    println!("reading the pending inferences alone: {reading:.2} s");

    let started = Instant::now();
    let done = pass(&lake, &mut index, &tokenizer, &mut methods, opts.inferences, &send).await?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(done.attributed + done.unattributed == opts.inferences, "{done:?}");
    println!(
        "attribution pass: {} inferences ({} attributed, {} to none) in {seconds:.1} s: {:.0} inferences/s, {:.0} output tokens/s",
        opts.inferences,
        done.attributed,
        done.unattributed,
        opts.inferences as f64 / seconds,
        (opts.inferences * opts.output_tokens) as f64 / seconds
    );
    let (_, rows) = ledgerlake_lakehouse::snapshot::query(&lake, EventKind::InferenceAttributed, None, "SELECT count(*), count(DISTINCT inference_id) FROM t").await?;
    let counts = arrow::util::pretty::pretty_format_batches(&rows)?;
    println!("attributions stored (rows, inferences):\n{counts}");

    let started = Instant::now();
    let idle = pass(&lake, &mut index, &tokenizer, &mut methods, opts.inferences, &send).await?;
    ensure!(idle.attributed + idle.unattributed + idle.indexed == 0, "{idle:?}");
    println!("a pass with nothing to do: {:.2} s", started.elapsed().as_secs_f64());
    println!(
        "{}",
        serde_json::json!({
            "contributions": opts.contributions, "inferences": opts.inferences, "output_tokens": opts.output_tokens,
            "first_pass_s": indexing, "pending_read_s": reading, "attribution_pass_s": seconds, "target_s": 60,
        })
    );
    Ok(())
}
