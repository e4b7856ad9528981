//! `ledgerlake model ...`: pretraining the default base model and trying a model from the
//! command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use ledgerlake_serving::chat::ChatMessage;
use ledgerlake_serving::checkpoint::{self, Checkpoint};
use ledgerlake_serving::lora::Adapter;
use ledgerlake_serving::model::{KvCache, StepSeq, row};
use ledgerlake_serving::pretrain::{PretrainOptions, pretrain};
use ledgerlake_serving::sampling::{Sampler, SamplingParams};
use ledgerlake_serving::tokenizer::TextStream;

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Fine-tune a LoRA (or QLoRA) adapter on datanet snapshots, register it and serve it.
    ///
    /// Needs a running `ledgerlake up` (the events go through its API) and read access to
    /// its lake (`--data`). Running the same command again after it was killed resumes
    /// the run from its checkpoint. See docs/training.md.
    Finetune(Box<crate::finetune_cmd::FinetuneArgs>),
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
    /// Continue a prompt with a model (and optionally a PEFT adapter), or answer it as a
    /// chat message with `--chat`.
    Generate {
        /// One or more prompts, answered one after the other.
        #[arg(required = true)]
        prompts: Vec<String>,
        /// A GGUF file or a Hugging Face checkpoint directory.
        #[arg(long, default_value = "models/ledgerlake-base")]
        model: PathBuf,
        /// Send each prompt as a user message through the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Print one JSON object per prompt instead of text: the prompt's token ids, the
        /// generated ids and text, and with `--logits` the logits of the first step.
        #[arg(long)]
        json: bool,
        /// With `--json`: include the full logits row of the first generated token.
        #[arg(long, requires = "json")]
        logits: bool,
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
        ModelCommand::Finetune(_) => anyhow::bail!("model finetune runs on the async runtime (main dispatches it)"),
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
        ModelCommand::Generate { prompts, model, chat, json, logits, adapter, max_tokens, temperature, top_p, top_k, seed, device } => {
            let device = ledgerlake_serving::device(&device)?;
            let Checkpoint { model: llama, tokenizer: tok, .. } =
                checkpoint::load(&model, &device).with_context(|| format!("loading {}", model.display()))?;
            let adapter = match adapter {
                Some(dir) => {
                    let loaded = Adapter::load(&dir, &Device::Cpu, DType::F32).with_context(|| format!("loading {}", dir.display()))?;
                    let fitted = llama.fit_adapter(loaded).map_err(|m| anyhow::anyhow!("{}: {m}", dir.display()))?;
                    Some(fitted.to_device(&device)?)
                }
                None => None,
            };
            let params = SamplingParams { temperature, top_p, top_k, seed, ..SamplingParams::default() };
            params.check().map_err(anyhow::Error::msg)?;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for prompt in prompts {
                let (text, stop) = if chat {
                    let messages = [ChatMessage { role: "user".into(), content: prompt.clone() }];
                    (tok.chat.render(&messages, true)?, tok.chat.stop.clone())
                } else {
                    (prompt.clone(), Vec::new())
                };
                let mut sampler = Sampler::new(params.clone());
                let mut cache = KvCache::default();
                let prompt_ids = tok.encode_prompt(&text)?;
                let mut next = prompt_ids.clone();
                let mut stream = TextStream::default();
                let mut ids = Vec::new();
                let mut first_logits = None;
                let eos = llama.eos_ids();
                if !chat && !json {
                    write!(out, "{prompt}")?;
                }
                for _ in 0..max_tokens {
                    if cache.len() + next.len() > llama.config.max_position_embeddings {
                        break;
                    }
                    let step = llama.step(&mut [StepSeq { tokens: &next, cache: &mut cache, adapter: adapter.as_ref() }])?;
                    let row = row(&step, 0)?;
                    let id = sampler.sample(&row);
                    if logits && first_logits.is_none() {
                        first_logits = Some(row);
                    }
                    if eos.contains(&id) {
                        break;
                    }
                    ids.push(id);
                    let piece = stream.push(&tok, id)?;
                    if stop.iter().any(|s| stream.text().contains(s.as_str())) {
                        break;
                    }
                    if !json {
                        write!(out, "{piece}")?;
                        out.flush()?;
                    }
                    next = vec![id];
                }
                if json {
                    let line = serde_json::json!({
                        "prompt": prompt, "prompt_text": text, "prompt_ids": prompt_ids, "ids": ids, "text": stream.text(), "logits": first_logits,
                    });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out)?;
                }
            }
            Ok(())
        }
    }
}
