//! Llama checkpoints in llama.cpp's GGUF format: the hyper-parameters, the tokenizer and
//! the chat template from the file's metadata, the weights through candle's GGUF reader.
//! Quantized projection weights stay in their blocks ([`Weight::Quant`]); norms and the
//! embedding lookup table are f32, and a tied output layer reuses the embedding's blocks.
//!
//! llama.cpp's converter permutes the rows of every Q and K projection so that the two
//! dimensions each rotary frequency turns are adjacent ([`RopeStyle::Interleaved`]);
//! [`permute_rope_rows`] is that permutation, which adapters trained on the Hugging Face
//! layout need too (see [`crate::model::Llama::fit_adapter`]).

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::chat::ChatTemplate;
use crate::lora::Projection;
use crate::model::{Llama, LlamaConfig, RopeStyle, TokenIds};
use crate::quant::{Embedding, Weight};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// A model read from a GGUF file.
pub struct GgufModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// `general.name`, when the file has one.
    pub general_name: Option<String>,
}

/// Hugging Face row order to llama.cpp's, for a `[heads · head_dim, ...]` Q or K
/// projection (or an adapter's `lora_B` of one): within each head, row `i · head_dim/2 + j`
/// (half `i`, frequency `j`) moves to row `2j + i`. This is `permute` of llama.cpp's
/// `convert_hf_to_gguf.py`.
pub fn permute_rope_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let (rows, rest) = (dims[0], dims[1..].iter().product::<usize>());
    let half = rows / heads / 2;
    Ok(t.reshape((heads, 2, half, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// The inverse of [`permute_rope_rows`]: llama.cpp's row order back to Hugging Face's.
pub fn unpermute_rope_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let (rows, rest) = (dims[0], dims[1..].iter().product::<usize>());
    let half = rows / heads / 2;
    Ok(t.reshape((heads, half, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// The GGUF tensor name of a projection's weight in layer `layer`.
pub fn tensor_name(layer: usize, p: Projection) -> String {
    let short = match p {
        Projection::Q => "attn_q",
        Projection::K => "attn_k",
        Projection::V => "attn_v",
        Projection::O => "attn_output",
        Projection::Gate => "ffn_gate",
        Projection::Up => "ffn_up",
        Projection::Down => "ffn_down",
    };
    format!("blk.{layer}.{short}.weight")
}

struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error::Gguf { path: self.path.display().to_string(), message: message.into() }
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.md.get(key).ok_or_else(|| self.err(format!("metadata has no {key}")))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n = v.to_u64().or_else(|_| v.to_u32().map(u64::from)).or_else(|_| v.to_i32().map(|x| x as i64 as u64)).map_err(|e| self.err(format!("{key}: {e}")))?;
        usize::try_from(n).map_err(|_| self.err(format!("{key} = {n} is too large")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.md.contains_key(key) { self.usize(key).map(Some) } else { Ok(None) }
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => v.to_f32().map(f64::from).or_else(|_| v.to_f64()).map(Some).map_err(|e| self.err(format!("{key}: {e}"))),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => v.to_string().map(|s| Some(s.as_str())).map_err(|e| self.err(format!("{key}: {e}"))),
        }
    }

    fn bool(&self, key: &str) -> Option<bool> {
        self.md.get(key).and_then(|v| v.to_bool().ok())
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let list = self.get(key)?.to_vec().map_err(|e| self.err(format!("{key}: {e}")))?;
        list.iter().map(|v| v.to_string().map(String::as_str).map_err(|e| self.err(format!("{key}: {e}")))).collect()
    }

    fn ints(&self, key: &str) -> Result<Vec<i64>> {
        let list = self.get(key)?.to_vec().map_err(|e| self.err(format!("{key}: {e}")))?;
        list.iter().map(|v| v.to_i32().map(i64::from).or_else(|_| v.to_u32().map(i64::from)).map_err(|e| self.err(format!("{key}: {e}")))).collect()
    }
}

/// The Hugging Face config equivalent of a GGUF file's `llama.*` metadata.
fn config(meta: &Meta<'_>, content: &Content, tied: bool) -> Result<LlamaConfig> {
    let arch = meta.string("general.architecture")?.unwrap_or("");
    if arch != "llama" {
        return Err(meta.err(format!("architecture {arch:?} is not llama")));
    }
    if let Some(kind) = meta.string("llama.rope.scaling.type")?
        && kind != "none"
    {
        return Err(meta.err(format!("rope scaling {kind:?} is not supported")));
    }
    let hidden = meta.usize("llama.embedding_length")?;
    let heads = meta.usize("llama.attention.head_count")?;
    let head_dim = match meta.opt_usize("llama.attention.key_length")? {
        Some(d) => d,
        None => hidden / heads.max(1),
    };
    if let Some(rot) = meta.opt_usize("llama.rope.dimension_count")?
        && rot != head_dim
    {
        return Err(meta.err(format!("rotary dimension {rot} differs from the head dimension {head_dim}: partial rotary is not supported")));
    }
    let vocab = match meta.opt_usize("llama.vocab_size")? {
        Some(v) => v,
        None => meta.strings("tokenizer.ggml.tokens")?.len(),
    };
    if !content.tensor_infos.contains_key("token_embd.weight") {
        return Err(meta.err("no token_embd.weight tensor"));
    }
    let eos = meta.opt_usize("tokenizer.ggml.eos_token_id")?.map(|e| TokenIds::One(e as u32));
    Ok(LlamaConfig {
        hidden_size: hidden,
        intermediate_size: meta.usize("llama.feed_forward_length")?,
        num_hidden_layers: meta.usize("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(meta.opt_usize("llama.attention.head_count_kv")?.unwrap_or(heads)),
        head_dim: Some(head_dim),
        vocab_size: vocab,
        rms_norm_eps: meta.f64("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        rope_theta: meta.f64("llama.rope.freq_base")?.unwrap_or(10_000.0),
        max_position_embeddings: meta.opt_usize("llama.context_length")?.unwrap_or(2048),
        tie_word_embeddings: tied,
        bos_token_id: meta.opt_usize("tokenizer.ggml.bos_token_id")?.map(|b| b as u32),
        eos_token_id: eos,
        rope_scaling: None,
        model_type: Some("llama".into()),
        architectures: Some(vec!["LlamaForCausalLM".into()]),
        torch_dtype: None,
    })
}

/// The pre-tokenizer of a GGUF `tokenizer.ggml.pre`, as Hugging Face's `tokenizer.json`
/// of that model family writes it (llama.cpp splits with the same expressions).
fn pre_tokenizer(meta: &Meta<'_>) -> Result<serde_json::Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre = meta.string("tokenizer.ggml.pre")?.unwrap_or("default");
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        // StarCoder's family: every digit alone, then GPT-2's expression.
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]})
        }
        other => return Err(meta.err(format!("pre-tokenizer {other:?} is not supported (supported: gpt2, smollm, starcoder, refact, codeshell)"))),
    })
}

/// A `tokenizers` tokenizer from the GGUF vocabulary: byte-level BPE with the file's
/// tokens, merges and token types (control tokens are special added tokens).
fn tokenizer(meta: &Meta<'_>) -> Result<(tokenizers::Tokenizer, Vec<u32>)> {
    let model = meta.string("tokenizer.ggml.model")?.unwrap_or("");
    if model != "gpt2" {
        return Err(meta.err(format!("tokenizer model {model:?} is not supported (byte-level BPE, \"gpt2\", is)")));
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let types = if meta.md.contains_key("tokenizer.ggml.token_type") { meta.ints("tokenizer.ggml.token_type")? } else { vec![1; tokens.len()] };
    if types.len() != tokens.len() {
        return Err(meta.err(format!("{} token types for {} tokens", types.len(), tokens.len())));
    }
    let vocab: serde_json::Map<String, serde_json::Value> = tokens.iter().enumerate().map(|(i, t)| ((*t).to_owned(), json!(i))).collect();
    // llama.cpp's token types: 3 control, 4 user-defined.
    const CONTROL: i64 = 3;
    const USER_DEFINED: i64 = 4;
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(**t, CONTROL | USER_DEFINED))
        .map(|(i, t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": *t == CONTROL})
        })
        .collect();
    // End-of-generation tokens: the declared end-of-sequence and end-of-turn ids, and the
    // control tokens llama.cpp also treats as ending generation.
    let mut eog: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| meta.opt_usize(k).ok().flatten())
        .map(|id| id as u32)
        .collect();
    for (i, t) in tokens.iter().enumerate() {
        if types[i] == CONTROL && matches!(*t, "<|endoftext|>" | "<|im_end|>" | "<|eot_id|>" | "<|end|>" | "<end_of_turn>" | "<|end_of_text|>") {
            eog.push(i as u32);
        }
    }
    eog.sort_unstable();
    eog.dedup();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(meta)?,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    let inner: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| meta.err(format!("building the tokenizer: {e}")))?;
    Ok((inner, eog))
}

fn read_tensor<R: Read + Seek>(content: &Content, reader: &mut R, name: &str, device: &Device, path: &Path) -> Result<candle_core::quantized::QTensor> {
    content.tensor(reader, name, device).map_err(|e| Error::Gguf { path: path.display().to_string(), message: format!("tensor {name}: {e}") })
}

/// Loads a GGUF Llama checkpoint. The model's end-of-sequence ids include every token
/// that ends generation (end of turn too).
pub fn load(path: &Path, device: &Device) -> Result<GgufModel> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| Error::Gguf { path: path.display().to_string(), message: format!("not a GGUF file: {e}") })?;
    let meta = Meta { path, md: &content.metadata };
    let tied = !content.tensor_infos.contains_key("output.weight");
    let mut cfg = config(&meta, &content, tied)?;
    let (inner, eog) = tokenizer(&meta)?;
    if inner.get_vocab_size(true) > cfg.vocab_size {
        return Err(meta.err(format!("the tokenizer has {} tokens, the model {}", inner.get_vocab_size(true), cfg.vocab_size)));
    }
    cfg.eos_token_id = Some(TokenIds::Many(eog));
    cfg.check().map_err(|m| meta.err(m))?;

    let mut weight = |name: &str, shape: (usize, usize)| -> Result<Weight> {
        let w = Weight::from_qtensor(read_tensor(&content, &mut reader, name, device, path)?, name)?;
        if w.dims()? != shape {
            return Err(meta.err(format!("{name} is {:?}, the metadata says {shape:?}", w.dims()?)));
        }
        Ok(w)
    };
    let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
    let shapes = |p: Projection| match p {
        Projection::Q => (q, d),
        Projection::K | Projection::V => (kv, d),
        Projection::O => (d, q),
        Projection::Gate | Projection::Up => (f, d),
        Projection::Down => (d, f),
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let mut proj = Vec::with_capacity(7);
        for p in Projection::ALL {
            proj.push(weight(&tensor_name(i, p), shapes(p))?);
        }
        let proj: [Weight; 7] = proj.try_into().map_err(|_| Error::Weights("seven projections per layer".into()))?;
        layers.push((format!("blk.{i}.attn_norm.weight"), format!("blk.{i}.ffn_norm.weight"), proj));
    }
    let token_embd = weight("token_embd.weight", (cfg.vocab_size, d))?;
    let lm_head = if tied { token_embd.clone() } else { weight("output.weight", (cfg.vocab_size, d))? };
    drop(weight);
    // Quantized embeddings our kernels read stay in blocks (rows dequantized on lookup).
    let embed = match token_embd {
        Weight::Blocks(m) => Embedding::Blocks(m),
        Weight::Dense(t) => Embedding::Dense(t),
        Weight::Quant { .. } => Embedding::Dense(
            read_tensor(&content, &mut reader, "token_embd.weight", device, path)?.dequantize(device)?.to_dtype(DType::F32)?,
        ),
    };
    let mut vector = |name: &str| -> Result<Tensor> {
        let t = read_tensor(&content, &mut reader, name, device, path)?.dequantize(device)?.to_dtype(DType::F32)?;
        if t.dims() != [d] {
            return Err(meta.err(format!("{name} is {:?}, expected [{d}]", t.dims())));
        }
        Ok(t)
    };
    let mut built = Vec::with_capacity(layers.len());
    for (input, post, proj) in layers {
        built.push((vector(&input)?, vector(&post)?, proj));
    }
    let norm = vector("output_norm.weight")?;
    let add_bos = meta.bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
    let text = |id: Option<u32>| id.and_then(|id| inner.id_to_token(id)).unwrap_or_default();
    let bos_text = text(cfg.bos_token_id);
    let eos_text = text(meta.opt_usize("tokenizer.ggml.eos_token_id")?.map(|e| e as u32));
    let chat = match meta.string("tokenizer.chat_template")? {
        Some(source) => ChatTemplate::new(source, &bos_text, &eos_text)?,
        None => ChatTemplate::builtin(),
    };
    let tokenizer = Tokenizer::from_inner(inner, if add_bos { cfg.bos_token_id } else { None }).with_chat(chat);
    let general_name = meta.string("general.name")?.map(str::to_owned);
    let model = Llama::from_parts(cfg, embed, built, norm, lm_head, RopeStyle::Interleaved, true, device)?;
    Ok(GgufModel { model, tokenizer, general_name })
}
