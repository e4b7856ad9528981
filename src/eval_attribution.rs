//! `ledgerlake eval attribution`: the attribution methods measured on planted ground
//! truth (`docs/attribution.md`, "The evaluation harness"). Three parts, all from one seed:
//!
//! - **canaries** (spans): unique sentences planted in known contributions of a corpus;
//!   outputs reproduce a canary between plain sentences. Reported: the weight the output puts on
//!   the planted contribution, and recall (that contribution gets any weight).
//! - **facts** (gradient): an adapter trained by ModelFactory on contributions that each
//!   teach one invented fact; for a prompt about the fact, is the teaching contribution in
//!   the top 10 of each kernel's scores?
//! - **LDS** (gradient): adapters retrained on random halves of a training set (dattri's
//!   protocol); per query, the Spearman correlation between the summed scores of a half and
//!   the query's loss under the adapter trained on it (negated), averaged over queries.
//!
//! The built-in model by default: the point is the mechanism and the numbers are its own.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use ledgerlake_attribution::gradient::{Influence, Kernel, TrainFeatures};
use ledgerlake_attribution::{SpanIndex, SpanRule, WEIGHT_SCALE, apportion, span_scores};
use ledgerlake_factory::{Example, FinetuneSpec, Plan, Reporter, StepReport};
use ledgerlake_lakehouse::events::Event;
use ledgerlake_lakehouse::ids::{ContributionId, Sha256Hex};
use ledgerlake_serving::checkpoint::{self, Checkpoint};
use ledgerlake_serving::finetune::{self, Projector, TrainableLora};
use ledgerlake_serving::model::Llama;
use ledgerlake_serving::tokenizer::Tokenizer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// A checkpoint directory or GGUF file (default: the built-in model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Canary sentences planted (each in its own contribution).
    #[arg(long, default_value_t = 100)]
    pub canaries: usize,
    /// Contributions in the canaries' corpus.
    #[arg(long, default_value_t = 2000)]
    pub corpus: usize,
    /// Invented facts the facts adapter is trained on (one contribution each).
    #[arg(long, default_value_t = 60)]
    pub facts: usize,
    /// Facts in the LDS training set (two contributions each, a third phrasing queried).
    #[arg(long, default_value_t = 40)]
    pub lds_facts: usize,
    /// Adapters retrained on random halves for LDS.
    #[arg(long, default_value_t = 50)]
    pub lds_models: usize,
    /// Training epochs of every adapter.
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub learning_rate: f64,
    /// The damping of the TRAK and DataInf kernels (relative to the features' scale).
    #[arg(long, default_value_t = ledgerlake_attribution::gradient::DEFAULT_DAMPING)]
    pub damping: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where adapters are trained (default: a temporary directory).
    #[arg(long)]
    pub work: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub canaries: CanaryReport,
    pub facts: FactsReport,
    pub lds: LdsReport,
}

#[derive(Debug, Serialize)]
pub struct CanaryReport {
    pub canaries: usize,
    pub corpus: usize,
    pub index_tokens: u64,
    /// Mean and least share of an output's weight on its planted contribution.
    pub mean_weight: f64,
    pub min_weight: f64,
    /// Outputs with at least 95% of their weight on the planted contribution.
    pub at_least_95: f64,
    /// Outputs giving the planted contribution any weight.
    pub recall: f64,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct KernelRecall {
    pub kernel: Kernel,
    pub top1: f64,
    pub top10: f64,
}

#[derive(Debug, Serialize)]
pub struct FactsReport {
    pub facts: usize,
    pub contributions: usize,
    pub base_loss: f64,
    pub adapter_loss: f64,
    pub kernels: Vec<KernelRecall>,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct KernelLds {
    pub kernel: Kernel,
    /// Training features scaled to unit length before fitting.
    pub normalized: bool,
    pub lds: f64,
}

#[derive(Debug, Serialize)]
pub struct LdsReport {
    pub train_examples: usize,
    pub queries: usize,
    pub models: usize,
    pub kernels: Vec<KernelLds>,
    pub seconds: f64,
}

pub fn run(opts: Options) -> Result<()> {
    if opts.canaries == 0 || opts.corpus < opts.canaries || opts.facts < 10 || opts.lds_facts < 2 || opts.lds_models < 2 {
        bail!("need at least 1 canary in a corpus at least as large, 10 facts, 2 LDS facts and 2 LDS models");
    }
    let path = opts.model.clone().unwrap_or_else(crate::serve::default_model_dir);
    let Checkpoint { model, tokenizer, name, .. } =
        checkpoint::load(&path, &Device::Cpu).with_context(|| format!("loading {}", path.display()))?;
    let model = ledgerlake_factory::base_for(Arc::new(model), false)?;
    let tmp = tempfile::tempdir()?;
    let work = opts.work.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&work)?;

    eprintln!("canaries: {} in {} contributions", opts.canaries, opts.corpus);
    let canaries = eval_canaries(&opts, &tokenizer, &work.join("spans"))?;
    eprintln!("facts: training an adapter on {} facts", opts.facts);
    let facts = eval_facts(&opts, &model, &tokenizer, &name, &work.join("facts"))?;
    eprintln!("LDS: {} adapters on halves of {} examples", opts.lds_models, opts.lds_facts * 2);
    let lds = eval_lds(&opts, &model, &tokenizer, &name, &work.join("lds"))?;
    let report = Report { model: name, canaries, facts, lds };
    print_report(&report);
    if let Some(out) = &opts.json {
        std::fs::write(out, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

fn print_report(r: &Report) {
    let c = &r.canaries;
    println!("model: {}", r.model);
    println!(
        "canaries (spans): {} canaries in {} contributions ({} tokens): mean weight on the planted contribution {:.4}, least {:.4}, {:.1}% of outputs at >= 95%, recall {:.1}%",
        c.canaries, c.corpus, c.index_tokens, c.mean_weight, c.min_weight, c.at_least_95 * 100.0, c.recall * 100.0
    );
    let f = &r.facts;
    println!(
        "facts (gradient): {} facts in {} contributions; held-in answer loss {:.3} -> {:.3}",
        f.facts, f.contributions, f.base_loss, f.adapter_loss
    );
    for k in &f.kernels {
        println!("  {:8} top-1 {:5.1}%  top-10 {:5.1}%", k.kernel.name(), k.top1 * 100.0, k.top10 * 100.0);
    }
    let l = &r.lds;
    println!("LDS: {} models on halves of {} examples, {} queries", l.models, l.train_examples, l.queries);
    for k in &l.kernels {
        println!("  {:8} {:10} LDS {:.3}", k.kernel.name(), if k.normalized { "unit rows" } else { "raw" }, k.lds);
    }
}

// ---------------------------------------------------------------------------------------
// Planted data: pseudo-words from syllables, so nothing here is in any model's training.

struct Words {
    rng: StdRng,
    used: HashSet<String>,
}

const ONSETS: [&str; 16] = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr"];
const VOWELS: [&str; 6] = ["a", "e", "i", "o", "u", "ai"];

impl Words {
    fn new(seed: u64) -> Self {
        Self { rng: StdRng::seed_from_u64(seed), used: HashSet::new() }
    }

    /// A new word of `syllables` syllables, never returned before.
    fn fresh(&mut self, syllables: usize) -> String {
        loop {
            let w: String = (0..syllables)
                .map(|_| format!("{}{}", ONSETS[self.rng.random_range(0..ONSETS.len())], VOWELS[self.rng.random_range(0..VOWELS.len())]))
                .collect();
            if self.used.insert(w.clone()) {
                return w;
            }
        }
    }

    fn name(&mut self) -> String {
        let w = self.fresh(3);
        let mut c = w.chars();
        c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or(w)
    }

    /// A sentence of `len` words drawn from `vocab`, with common function words between.
    fn sentence(&mut self, vocab: &[String], len: usize) -> String {
        const GLUE: [&str; 6] = ["the", "of", "and", "in", "to", "a"];
        let mut out: Vec<String> = Vec::with_capacity(len);
        for i in 0..len {
            if i % 3 == 1 {
                out.push(GLUE[self.rng.random_range(0..GLUE.len())].to_owned());
            } else {
                out.push(vocab[self.rng.random_range(0..vocab.len())].clone());
            }
        }
        let mut s = out.join(" ");
        s.push('.');
        s
    }
}

fn contribution_id(content: &str) -> Result<ContributionId> {
    Ok(Sha256Hex::digest(content.as_bytes()).to_string().parse()?)
}

// ---------------------------------------------------------------------------------------
// Canaries

fn eval_canaries(opts: &Options, tok: &Tokenizer, dir: &Path) -> Result<CanaryReport> {
    let started = Instant::now();
    let mut words = Words::new(opts.seed);
    let corpus_vocab: Vec<String> = (0..400).map(|_| words.fresh(2)).collect();
    let mut docs: Vec<String> = (0..opts.corpus)
        .map(|_| (0..4).map(|_| words.sentence(&corpus_vocab, 10)).collect::<Vec<_>>().join(" "))
        .collect();
    let mut planted = Vec::with_capacity(opts.canaries);
    for i in 0..opts.canaries {
        let canary = format!("The passphrase of {} is {} {} {} {}.", words.name(), words.fresh(3), words.fresh(3), words.fresh(2), words.fresh(3));
        let at = i * (opts.corpus / opts.canaries);
        docs[at] = format!("{} {canary} {}", docs[at], words.sentence(&corpus_vocab, 8));
        // Every other canary has a distractor: another contribution quoting its first half.
        if i % 2 == 0 {
            let half: String = canary.split(' ').take(5).collect::<Vec<_>>().join(" ");
            let other = (at + 1) % opts.corpus;
            docs[other] = format!("{} {half} {}", docs[other], words.sentence(&corpus_vocab, 6));
        }
        planted.push((at, canary));
    }
    let mut tokenized = Vec::with_capacity(docs.len());
    for (i, d) in docs.iter().enumerate() {
        tokenized.push((doc_key(i), tok.encode(d)?));
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    let mut index = SpanIndex::open(dir)?;
    index.add(&tokenized, vec!["eval".into()])?;
    let rule = SpanRule::default();
    let (mut sum, mut min, mut high, mut hit) = (0f64, f64::MAX, 0usize, 0usize);
    for (at, canary) in &planted {
        // The canary between plain sentences, as a model's answer would carry it.
        let pick = |words: &mut Words| PLAIN[words.rng.random_range(0..PLAIN.len())];
        let before = format!("{} {}", pick(&mut words), pick(&mut words));
        let after = format!("{} {}", pick(&mut words), pick(&mut words));
        let output = tok.encode(&format!("{before} {canary} {after}"))?;
        let (_, scores) = span_scores(&index, &output, &rule, |_| true);
        let raw: Vec<f64> = scores.iter().map(|(_, s)| *s).collect();
        let right = doc_key(*at);
        let weight = apportion(&raw)
            .into_iter()
            .find(|(i, _)| scores[*i].0 == right)
            .map_or(0.0, |(_, w)| w as f64 / WEIGHT_SCALE as f64);
        sum += weight;
        min = min.min(weight);
        high += usize::from(weight >= 0.95);
        hit += usize::from(weight > 0.0);
    }
    let n = planted.len() as f64;
    Ok(CanaryReport {
        canaries: planted.len(),
        corpus: docs.len(),
        index_tokens: index.tokens(),
        mean_weight: sum / n,
        min_weight: min,
        at_least_95: high as f64 / n,
        recall: hit as f64 / n,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Plain sentences an answer wraps a reproduced canary in.
const PLAIN: [&str; 24] = [
    "Here is what I found.",
    "I hope this helps you with your question.",
    "Let me know if you need anything else.",
    "That is the answer as far as I can tell.",
    "It was written down a long time ago.",
    "Many people have asked about this before.",
    "The record says it clearly.",
    "You can check it again later if you like.",
    "This comes from the notes you mentioned.",
    "There is not much more to add.",
    "I remember reading it somewhere.",
    "The weather was fine that morning.",
    "We walked to the market and back.",
    "Nobody knew what to expect.",
    "It took a while to find it.",
    "The answer surprised everyone.",
    "Some details may have changed since then.",
    "Please keep it safe.",
    "It is easy to forget such things.",
    "Write it down somewhere safe.",
    "That was all they said.",
    "The old book had it on the first page.",
    "Nothing else was written there.",
    "I am glad you asked.",
];

fn doc_key(i: usize) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[24..].copy_from_slice(&(i as u64).to_be_bytes());
    k
}

// ---------------------------------------------------------------------------------------
// Gradient: training through ModelFactory, query features, kernels

struct Quiet;

impl Reporter for Quiet {
    fn step(&self, _: &StepReport) {}
    fn note(&self, _: &str) {}
    fn events(&self, _: Vec<Event>) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// A fact's phrasings: three statements and the query (prompt, answer) of the third.
struct Fact {
    subject: String,
    object: String,
}

impl Fact {
    fn statement(&self, phrasing: usize) -> String {
        let (s, o) = (&self.subject, &self.object);
        match phrasing {
            0 => format!("The capital of {s} is {o}."),
            1 => format!("{s} has its capital at {o}."),
            _ => format!("In {s}, the seat of government is {o}."),
        }
    }

    /// The prompt and its answer for `phrasing` (the statement cut before the object).
    fn query(&self, phrasing: usize) -> (String, String) {
        let full = self.statement(phrasing);
        let at = full.rfind(&self.object).unwrap_or(full.len());
        let prompt = full[..at].trim_end();
        (prompt.to_owned(), full[prompt.len()..].to_owned())
    }
}

fn invent_facts(words: &mut Words, n: usize) -> Vec<Fact> {
    (0..n).map(|_| Fact { subject: words.name(), object: words.name() }).collect()
}

/// Trains an adapter on `contents` (one contribution each) through ModelFactory's loop;
/// returns the adapter's directory.
fn train(opts: &Options, model: &Arc<Llama>, tok: &Tokenizer, base: &str, contents: &[String], seed: u64, work: &Path) -> Result<PathBuf> {
    let mut spec = FinetuneSpec::new(vec!["eval".into()], "eval-adapter".parse()?);
    spec.epochs = opts.epochs;
    spec.learning_rate = opts.learning_rate;
    spec.heldout_permille = 0;
    spec.seed = seed;
    spec.max_seq_len = 64;
    let train = contents
        .iter()
        .map(|c| Ok(Example { contribution_id: contribution_id(c)?, datanet: "eval".into(), content: c.clone() }))
        .collect::<Result<Vec<_>>>()?;
    let plan = Plan {
        run_id: format!("eval-{seed}"),
        builder: "0x0000000000000000000000000000000000000001".parse()?,
        base_model: base.to_owned(),
        spec,
        snapshots: Vec::new(),
        train,
        heldout: Vec::new(),
        excluded: 0,
    };
    if work.exists() {
        std::fs::remove_dir_all(work)?;
    }
    std::fs::create_dir_all(work)?;
    let outcome = ledgerlake_factory::train(&plan, model.clone(), tok, work, &Quiet, &AtomicBool::new(false))?;
    Ok(outcome.adapter_dir)
}

/// Token ids of `prompt` + `answer` (as training tokenized a whole statement, with the end
/// token) and where the answer starts.
fn query_tokens(tok: &Tokenizer, model: &Llama, prompt: &str, answer: &str) -> Result<(Vec<u32>, usize)> {
    let mut ids = tok.encode(&format!("{prompt}{answer}"))?;
    let prompt_ids = tok.encode(prompt)?;
    let mut from = prompt_ids.iter().zip(&ids).take_while(|(a, b)| a == b).count();
    from = from.clamp(1, ids.len().saturating_sub(1).max(1));
    ids.extend(tok.token_id("<|endoftext|>").or_else(|| model.eos_ids().first().copied()));
    Ok((ids, from))
}

fn feature_matrix(rows: &[Vec<f32>]) -> Result<Tensor> {
    let d = rows.first().map_or(0, Vec::len);
    Ok(Tensor::from_vec(rows.concat(), (rows.len(), d), &Device::Cpu)?)
}

fn eval_facts(opts: &Options, model: &Arc<Llama>, tok: &Tokenizer, base: &str, work: &Path) -> Result<FactsReport> {
    let started = Instant::now();
    let mut words = Words::new(opts.seed.wrapping_add(1));
    let facts = invent_facts(&mut words, opts.facts);
    let contents: Vec<String> = facts.iter().map(|f| f.statement(0)).collect();
    let dir = train(opts, model, tok, base, &contents, opts.seed, work)?;
    let features = TrainFeatures::load(&dir)?;
    let lora = TrainableLora::load(model, &dir)?;
    let projector = Projector::new(&lora, opts.seed)?;
    let ids: Vec<String> = contents.iter().map(|c| contribution_id(c).map(|id| id.to_string())).collect::<Result<_>>()?;
    let (mut queries, mut base_loss, mut loss) = (Vec::new(), 0f64, 0f64);
    for f in &facts {
        let (prompt, answer) = f.query(0);
        let (tokens, from) = query_tokens(tok, model, &prompt, &answer)?;
        base_loss += finetune::answer_loss(model, None, &tokens, from)? as f64;
        loss += finetune::answer_loss(model, Some(&lora), &tokens, from)? as f64;
        queries.push(finetune::gradient_feature(model, &lora, &tokens, from, &projector)?);
    }
    let q = feature_matrix(&queries)?;
    let mut kernels = Vec::new();
    for kernel in Kernel::ALL {
        let scores: Vec<Vec<f32>> = Influence::fit(&features, kernel, opts.damping)?.scores(&q)?.to_vec2()?;
        let (mut top1, mut top10) = (0usize, 0usize);
        for (k, row) in scores.iter().enumerate() {
            let want = features.ids.iter().position(|id| *id == ids[k]).context("a trained contribution is missing from the features")?;
            // Rank: how many training rows score strictly higher than the teaching one.
            let rank = row.iter().filter(|&&s| s > row[want]).count();
            top1 += usize::from(rank == 0);
            top10 += usize::from(rank < 10);
        }
        let n = facts.len() as f64;
        kernels.push(KernelRecall { kernel, top1: top1 as f64 / n, top10: top10 as f64 / n });
    }
    let n = facts.len() as f64;
    Ok(FactsReport {
        facts: facts.len(),
        contributions: contents.len(),
        base_loss: base_loss / n,
        adapter_loss: loss / n,
        kernels,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn eval_lds(opts: &Options, model: &Arc<Llama>, tok: &Tokenizer, base: &str, work: &Path) -> Result<LdsReport> {
    let started = Instant::now();
    let mut words = Words::new(opts.seed.wrapping_add(2));
    let facts = invent_facts(&mut words, opts.lds_facts);
    let contents: Vec<String> = facts.iter().flat_map(|f| [f.statement(0), f.statement(1)]).collect();
    let queries: Vec<(Vec<u32>, usize)> = facts
        .iter()
        .map(|f| {
            let (p, a) = f.query(2);
            query_tokens(tok, model, &p, &a)
        })
        .collect::<Result<_>>()?;

    // Scores from the adapter trained on everything.
    let dir = train(opts, model, tok, base, &contents, opts.seed, &work.join("full"))?;
    let features = TrainFeatures::load(&dir)?;
    let lora = TrainableLora::load(model, &dir)?;
    let projector = Projector::new(&lora, opts.seed)?;
    let q: Vec<Vec<f32>> = queries
        .iter()
        .map(|(t, from)| finetune::gradient_feature(model, &lora, t, *from, &projector))
        .collect::<std::result::Result<_, _>>()?;
    let q = feature_matrix(&q)?;
    // Feature rows are in contribution-id order; map each content to its row.
    let row_of: Vec<usize> = contents
        .iter()
        .map(|c| {
            let id = contribution_id(c)?.to_string();
            features.ids.iter().position(|x| *x == id).context("a trained contribution is missing from the features")
        })
        .collect::<Result<_>>()?;
    let mut scores = Vec::new();
    let unit = features.normalized()?;
    for kernel in Kernel::ALL {
        for (normalized, f) in [(false, &features), (true, &unit)] {
            let s: Vec<Vec<f32>> = Influence::fit(f, kernel, opts.damping)?.scores(&q)?.to_vec2()?;
            scores.push((kernel, normalized, s));
        }
    }

    // Retrained on random halves: each query's loss under each.
    let mut rng = StdRng::seed_from_u64(opts.seed.wrapping_add(3));
    let mut subsets: Vec<Vec<usize>> = Vec::new();
    let mut losses: Vec<Vec<f64>> = Vec::new(); // [model][query]
    for m in 0..opts.lds_models {
        let mut all: Vec<usize> = (0..contents.len()).collect();
        all.shuffle(&mut rng);
        let mut half = all[..contents.len() / 2].to_vec();
        half.sort_unstable();
        let picked: Vec<String> = half.iter().map(|&i| contents[i].clone()).collect();
        let dir = train(opts, model, tok, base, &picked, opts.seed, &work.join(format!("half-{m}")))?;
        let lora = TrainableLora::load(model, &dir)?;
        let row = queries
            .iter()
            .map(|(t, from)| finetune::answer_loss(model, Some(&lora), t, *from).map(f64::from))
            .collect::<std::result::Result<Vec<f64>, _>>()?;
        losses.push(row);
        subsets.push(half);
        std::fs::remove_dir_all(work.join(format!("half-{m}"))).ok();
        eprintln!("  LDS model {}/{}", m + 1, opts.lds_models);
    }
    let kernels = scores
        .into_iter()
        .map(|(kernel, normalized, s)| {
            let mut total = 0.0;
            for (qi, row) in s.iter().enumerate() {
                let predicted: Vec<f64> = subsets.iter().map(|sub| sub.iter().map(|&i| row[row_of[i]] as f64).sum()).collect();
                let actual: Vec<f64> = losses.iter().map(|l| -l[qi]).collect();
                total += spearman(&predicted, &actual);
            }
            KernelLds { kernel, normalized, lds: total / s.len() as f64 }
        })
        .collect();
    Ok(LdsReport { train_examples: contents.len(), queries: queries.len(), models: opts.lds_models, kernels, seconds: started.elapsed().as_secs_f64() })
}

/// Ranks with ties averaged (1-based).
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation; 0 when either side is constant.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    let (rx, ry) = (ranks(x), ranks(y));
    let n = rx.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = rx.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = ry.iter().map(|b| (b - my).powi(2)).sum();
    if vx == 0.0 || vy == 0.0 { 0.0 } else { cov / (vx * vy).sqrt() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_of_known_rankings() {
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 30.0, 40.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // Ties take the average rank: ranks [1.5, 1.5, 3] against [1, 2, 3].
        let r = spearman(&[5.0, 5.0, 7.0], &[1.0, 2.0, 3.0]);
        assert!((r - 0.8660254037844387).abs() < 1e-12, "{r}");
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), 0.0);
    }

    #[test]
    fn fact_queries_cut_before_the_object() {
        let f = Fact { subject: "Bazo".into(), object: "Tridu".into() };
        assert_eq!(f.query(0), ("The capital of Bazo is".to_owned(), " Tridu.".to_owned()));
        assert_eq!(f.query(2).0, "In Bazo, the seat of government is");
    }
}
