//! `ledgerlake model ...`: pretraining the default base model and trying a model from the
//! command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use ledgerlake_serving::lora::Adapter;
use ledgerlake_serving::model::{KvCache, Llama, StepSeq, row};
use ledgerlake_serving::pretrain::{PretrainOptions, pretrain};
use ledgerlake_serving::sampling::{Sampler, SamplingParams};
use ledgerlake_serving::tokenizer::{TextStream, Tokenizer};

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Train a base model (tokenizer and weights) from a directory of `*.txt` files.
    ///
    /// The shipped default model was made with `scripts/fetch-corpus` and the defaults
    /// below; its model card (README.md beside the weights) records the exact command.
    Pretrain {
        /// Directory of plain-text `*.txt` files.
        #[arg(long, default_value = "corpus")]
        corpus: PathBuf,
        /// Where the Hugging Face checkpoint is written.
        #[arg(long, default_value = "models/ledgerlake-base")]
        out: PathBuf,
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        #[arg(long, default_value_t = 192)]
        hidden: usize,
        #[arg(long, default_value_t = 512)]
        intermediate: usize,
        #[arg(long, default_value_t = 4)]
        layers: usize,
        #[arg(long, default_value_t = 8)]
        heads: usize,
        #[arg(long, default_value_t = 4)]
        kv_heads: usize,
        /// Tokens per training window.
        #[arg(long, default_value_t = 128)]
        context: usize,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[arg(long, default_value_t = 1600)]
        steps: usize,
        #[arg(long, default_value_t = 3e-3)]
        lr: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Stop early, and save, after this many minutes.
        #[arg(long)]
        max_minutes: Option<f64>,
    },
    /// Continue a prompt with a model directory (and optionally a PEFT adapter).
    Generate {
        prompt: String,
        /// A Hugging Face checkpoint directory.
        #[arg(long, default_value = "models/ledgerlake-base")]
        model: PathBuf,
        /// A PEFT LoRA adapter directory.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long)]
        seed: Option<u64>,
        /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

pub fn run(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Pretrain {
            corpus,
            out,
            vocab_size,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            context,
            batch,
            steps,
            lr,
            seed,
            max_minutes,
        } => {
            let opts = PretrainOptions {
                corpus,
                out,
                vocab_size,
                hidden_size: hidden,
                intermediate_size: intermediate,
                layers,
                heads,
                kv_heads,
                context,
                batch,
                steps,
                learning_rate: lr,
                seed,
                max_minutes,
            };
            let report = pretrain(&opts, &|line: &str| eprintln!("{line}"))?;
            println!(
                "saved {} after {} steps in {:.1} min: train loss {:.3}, validation loss {:.3}",
                opts.out.display(),
                report.steps,
                report.seconds / 60.0,
                report.train_loss,
                report.valid_loss
            );
            Ok(())
        }
        ModelCommand::Generate { prompt, model, adapter, max_tokens, temperature, top_p, top_k, seed, device } => {
            let device = ledgerlake_serving::device(&device)?;
            let llama = Llama::load(&model, &device, DType::F32).with_context(|| format!("loading {}", model.display()))?;
            let tok = Tokenizer::load(&model.join("tokenizer.json"), llama.config.bos_token_id)?;
            let adapter = adapter.map(|dir| Adapter::load(&dir, &device, DType::F32)).transpose()?;
            let params = SamplingParams { temperature, top_p, top_k, seed };
            params.check().map_err(anyhow::Error::msg)?;
            let mut sampler = Sampler::new(params);
            let mut cache = KvCache::default();
            let mut next = tok.encode_prompt(&prompt)?;
            let mut stream = TextStream::default();
            let eos = llama.eos_ids();
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            write!(out, "{prompt}")?;
            for _ in 0..max_tokens {
                if cache.len() + next.len() > llama.config.max_position_embeddings {
                    break;
                }
                let logits = llama.step(&mut [StepSeq { tokens: &next, cache: &mut cache, adapter: adapter.as_ref() }])?;
                let id = sampler.sample(&row(&logits, 0)?);
                if eos.contains(&id) {
                    break;
                }
                write!(out, "{}", stream.push(&tok, id)?)?;
                out.flush()?;
                next = vec![id];
            }
            writeln!(out)?;
            Ok(())
        }
    }
}
