//! A Llama-architecture decoder on candle: RMSNorm, rotary position embeddings (the
//! half-split convention of Hugging Face's `LlamaForCausalLM`), SwiGLU, grouped-query
//! attention and a per-sequence KV cache.
//!
//! Weights use Hugging Face's names (`model.layers.<i>.self_attn.q_proj.weight`, ...), so
//! a real checkpoint directory (`config.json` and `*.safetensors`) loads unchanged.
//!
//! Two forward passes share the weights:
//! - [`Llama::step`] serves: the rows of every sequence in a step (a whole prompt for a
//!   new sequence, one token for a running one) are flattened into one `[rows, hidden]`
//!   matrix, so each projection is one matmul for the whole batch; each adapter's
//!   low-rank update is added to its own rows ([`crate::lora::apply_segments`]);
//!   attention runs per sequence against its own cache.
//! - [`Llama::forward_train`] trains: a `[batch, time]` block of tokens with a causal mask,
//!   built from differentiable operations only.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::lora::{Adapter, Projection, apply_segments};
use crate::exact::Rows;
use crate::ops::{HostSeq, causal_attention};
use crate::quant::{Embedding, Weight};
use crate::{Error, Result};

/// `eos_token_id` is one id or a list in Hugging Face configs.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    2048
}

/// The fields of a Hugging Face `LlamaConfig` (`config.json`) the model uses.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Refuses what this implementation cannot run faithfully.
    pub fn check(&self) -> std::result::Result<(), String> {
        if let Some(t) = &self.model_type
            && t != "llama"
        {
            return Err(format!("model_type {t:?} is not llama"));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is not supported".into());
        }
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        if h == 0 || kv == 0 || h % kv != 0 {
            return Err(format!("num_attention_heads ({h}) must be a multiple of num_key_value_heads ({kv})"));
        }
        if self.head_dim() % 2 != 0 || self.head_dim() == 0 {
            return Err(format!("head_dim {} must be even", self.head_dim()));
        }
        if self.hidden_size == 0 || self.intermediate_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return Err("hidden_size, intermediate_size, num_hidden_layers and vocab_size must be positive".into());
        }
        Ok(())
    }

    /// Every parameter's name and shape, in Hugging Face's layout.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (q, kv) = (self.num_attention_heads * hd, self.kv_heads() * hd);
        let mut out = vec![("model.embed_tokens.weight".to_owned(), vec![self.vocab_size, d])];
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![d]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, d]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
        }
        out.push(("model.norm.weight".to_owned(), vec![d]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_owned(), vec![self.vocab_size, d]));
        }
        out
    }

    pub fn parameter_count(&self) -> usize {
        self.parameter_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

#[derive(Clone)]
pub(crate) struct Layer {
    pub(crate) input_norm: Tensor,
    pub(crate) post_norm: Tensor,
    /// q, k, v, o, gate, up, down, in [`Projection::ALL`] order.
    pub(crate) proj: [Weight; 7],
}

/// How the rows of the query and key projections pair the dimensions that rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Hugging Face's `LlamaForCausalLM`: dimension `i` pairs with `i + head_dim / 2`.
    HalfSplit,
    /// llama.cpp's GGUF: its converter permutes the Q and K rows so that dimension `2i`
    /// pairs with `2i + 1` (see [`crate::gguf::permute_rope_rows`]).
    Interleaved,
}

/// The model's weights and rotary tables (a clone shares every tensor).
#[derive(Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    pub(crate) embed: Embedding,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Weight,
    /// Each layer's input and post-attention norm weights, and the final norm's, as host
    /// vectors for the llama.cpp-exact step (empty for other models).
    pub(crate) host_norms: Vec<(Vec<f32>, Vec<f32>)>,
    pub(crate) host_norm: Vec<f32>,
    pub(crate) rope: RopeStyle,
    /// Keys and values cached in half precision, queries and attention weights rounded to
    /// it (llama.cpp's default, so a GGUF model computes what llama.cpp computes).
    kv_f16: bool,
    /// `[max_positions, head_dim / 2]`.
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    device: Device,
    dtype: DType,
}

/// One sequence's keys and values for every layer: `[kv_heads, len, head_dim]` tensors on
/// a device, or, on the CPU in f32, time-major `[len, kv_heads, head_dim]` host vectors
/// that a step extends in place.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    host: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

impl KvCache {
    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every position after the first `len`: undoes what a failed step appended to
    /// some layers before it failed. `per_row` is `kv_heads · head_dim`.
    fn truncate(&mut self, len: usize, per_row: usize) -> Result<()> {
        for (k, v) in &mut self.host {
            k.truncate(len * per_row);
            v.truncate(len * per_row);
        }
        if len == 0 {
            self.layers.clear();
        } else {
            for (k, v) in &mut self.layers {
                if k.dim(1)? > len {
                    *k = k.narrow(1, 0, len)?;
                    *v = v.narrow(1, 0, len)?;
                }
            }
        }
        self.len = len;
        Ok(())
    }

    /// Bytes the cache holds.
    pub fn bytes(&self) -> usize {
        let device: usize = self.layers.iter().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum();
        device + self.host.iter().map(|(k, v)| (k.len() + v.len()) * size_of::<f32>()).sum::<usize>()
    }
}

/// A sequence's part of one [`Llama::step`]: its new tokens, its cache, its adapter.
pub struct StepSeq<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a Adapter>,
}

fn config_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Config { path: path.display().to_string(), message: message.into() }
}

impl Llama {
    /// Loads a Hugging Face checkpoint directory: `config.json` and every `*.safetensors`
    /// file in it (one file or shards).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io { path: config_path.display().to_string(), source })?;
        let config: LlamaConfig = serde_json::from_str(&text).map_err(|e| config_error(&config_path, e.to_string()))?;
        let entries = std::fs::read_dir(dir).map_err(|source| Error::Io { path: dir.display().to_string(), source })?;
        let mut files: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Weights(format!("{} holds no *.safetensors file", dir.display())));
        }
        let mut tensors = HashMap::new();
        for file in files {
            let loaded = candle_core::safetensors::load(&file, device).map_err(|e| match e {
                candle_core::Error::Io(source) => Error::Io { path: file.display().to_string(), source },
                other => Error::Weights(format!("{}: {other}", file.display())),
            })?;
            tensors.extend(loaded);
        }
        Self::from_tensors(config, &tensors, device, dtype).map_err(|e| match e {
            Error::Config { message, .. } => config_error(&config_path, message),
            other => other,
        })
    }

    /// Builds the model from named tensors (a checkpoint, or the variables being trained:
    /// the tensors are used as they are, so gradients reach them).
    pub fn from_tensors(config: LlamaConfig, tensors: &HashMap<String, Tensor>, device: &Device, dtype: DType) -> Result<Self> {
        config.check().map_err(|message| Error::Config { path: "config.json".into(), message })?;
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors.get(name).ok_or_else(|| Error::Weights(format!("missing tensor {name}")))?;
            if t.dims() != shape {
                return Err(Error::Weights(format!("{name} is {:?}, config says {shape:?}", t.dims())));
            }
            Ok(t.to_device(device)?.to_dtype(dtype)?)
        };
        let shapes: HashMap<String, Vec<usize>> = config.parameter_shapes().into_iter().collect();
        let param = |name: String| get(&name, &shapes[&name]);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let proj = |m: Projection| param(m.weight_name(i)).map(Weight::Dense);
            layers.push(Layer {
                input_norm: param(format!("{p}.input_layernorm.weight"))?,
                post_norm: param(format!("{p}.post_attention_layernorm.weight"))?,
                proj: [
                    proj(Projection::Q)?,
                    proj(Projection::K)?,
                    proj(Projection::V)?,
                    proj(Projection::O)?,
                    proj(Projection::Gate)?,
                    proj(Projection::Up)?,
                    proj(Projection::Down)?,
                ],
            });
        }
        let embed = param("model.embed_tokens.weight".into())?;
        let lm_head = Weight::Dense(if config.tie_word_embeddings { embed.clone() } else { param("lm_head.weight".into())? });
        let embed = Embedding::Dense(embed);
        let (cos, sin) = rotary_tables(&config, device, dtype)?;
        Ok(Self {
            embed,
            layers,
            norm: param("model.norm.weight".into())?,
            lm_head,
            host_norms: Vec::new(),
            host_norm: Vec::new(),
            rope: RopeStyle::HalfSplit,
            kv_f16: false,
            cos,
            sin,
            device: device.clone(),
            dtype,
            config,
        })
    }

    /// A model from already-built parts (the GGUF loader): `embed` is the `[vocab, hidden]`
    /// lookup table, `layers[i]` holds layer `i`'s input norm, its
    /// post-attention norm and its projections in [`Projection::ALL`] order; `kv_f16`
    /// keeps the KV cache in half precision as llama.cpp does.
    pub(crate) fn from_parts(
        config: LlamaConfig,
        embed: Embedding,
        layers: Vec<(Tensor, Tensor, [Weight; 7])>,
        norm: Tensor,
        lm_head: Weight,
        rope: RopeStyle,
        kv_f16: bool,
        device: &Device,
    ) -> Result<Self> {
        config.check().map_err(|message| Error::Config { path: "gguf metadata".into(), message })?;
        let layers: Vec<Layer> = layers.into_iter().map(|(input_norm, post_norm, proj)| Layer { input_norm, post_norm, proj }).collect();
        let (cos, sin) = rotary_tables(&config, device, DType::F32)?;
        let (host_norms, host_norm) = if kv_f16 && device.is_cpu() {
            (layers.iter().map(|l| Ok((host_vec(&l.input_norm)?, host_vec(&l.post_norm)?))).collect::<Result<_>>()?, host_vec(&norm)?)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Self { config, embed, layers, norm, lm_head, host_norms, host_norm, rope, kv_f16, cos, sin, device: device.clone(), dtype: DType::F32 })
    }

    /// How this model's Q and K rows are laid out for the rotary embedding.
    pub fn rope_style(&self) -> RopeStyle {
        self.rope
    }

    /// Bytes of the weights in memory (quantized blocks at their packed size).
    pub fn weight_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let layers: usize = self.layers.iter().map(|l| dense(&l.input_norm) + dense(&l.post_norm) + l.proj.iter().map(Weight::bytes).sum::<usize>()).sum();
        // A tied output layer shares the embedding's storage.
        let tied = match (&self.embed, &self.lm_head) {
            (Embedding::Dense(e), Weight::Dense(w)) => e.is_contiguous() && w.is_contiguous() && e.dims() == w.dims() && self.config.tie_word_embeddings,
            (Embedding::Blocks(e), Weight::Blocks(w)) => std::sync::Arc::ptr_eq(e, w),
            _ => false,
        };
        self.embed.bytes() + layers + dense(&self.norm) + if tied { 0 } else { self.lm_head.bytes() }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// End-of-sequence ids from the config.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.config.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }

    /// Runs one serving step and returns the logits of each sequence's last new token,
    /// `[sequences, vocab]`, in f32. Each sequence's cache grows by its new tokens.
    ///
    /// Consecutive sequences with the same adapter form one segment of the low-rank
    /// update; order the batch by adapter to make the segments few.
    pub fn step(&self, seqs: &mut [StepSeq<'_>]) -> Result<Tensor> {
        // The step runs on a rayon worker, so its many small parallel loops (about 250 in
        // a decode step of a 30-layer model) start on the pool directly instead of each
        // being injected from the engine's thread and waking a worker.
        rayon::scope(|_| self.step_on_pool(seqs))
    }

    fn step_on_pool(&self, seqs: &mut [StepSeq<'_>]) -> Result<Tensor> {
        let cfg = &self.config;
        if seqs.is_empty() {
            return Err(Error::Weights("a step needs at least one sequence".into()));
        }
        // Rows, positions and segments of the flattened batch.
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut rows: Vec<Range<usize>> = Vec::with_capacity(seqs.len());
        let mut segments: Vec<(Range<usize>, Option<&Adapter>)> = Vec::new();
        for seq in seqs.iter() {
            if seq.tokens.is_empty() {
                return Err(Error::Weights("every sequence in a step needs at least one new token".into()));
            }
            let start = ids.len();
            let past = seq.cache.len;
            if past + seq.tokens.len() > cfg.max_position_embeddings {
                return Err(Error::Weights(format!(
                    "sequence of {} tokens exceeds the model's {} positions",
                    past + seq.tokens.len(),
                    cfg.max_position_embeddings
                )));
            }
            if let Some(&bad) = seq.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::Weights(format!("token id {bad} is outside the vocabulary of {}", cfg.vocab_size)));
            }
            ids.extend_from_slice(seq.tokens);
            positions.extend((past..past + seq.tokens.len()).map(|p| p as u32));
            let range = start..ids.len();
            match segments.last_mut() {
                Some((r, a)) if same_adapter(*a, seq.adapter) => r.end = range.end,
                _ => segments.push((range.clone(), seq.adapter)),
            }
            rows.push(range);
        }
        if self.device.is_cpu() && self.dtype == DType::F32 && self.kv_f16 {
            // A GGUF model on the CPU computes with llama.cpp's arithmetic (exact.rs).
            let logits = self.step_exact(seqs, Rows { ids: &ids, positions: &positions, rows: &rows, segments: &segments })?;
            for (seq, range) in seqs.iter_mut().zip(&rows) {
                seq.cache.len += range.len();
            }
            return Ok(logits);
        }
        let n = ids.len();
        let any_adapter = segments.iter().any(|(_, a)| a.is_some());
        let mut x = self.embed.lookup(&ids, &self.device)?.to_dtype(self.dtype)?;
        let pos = Tensor::from_vec(positions.clone(), n, &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;

        let (h, kv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let eps = cfg.rms_norm_eps as f32;
        // On the CPU in f32, attention runs fused over host caches (see ops.rs).
        let host = self.device.is_cpu() && self.dtype == DType::F32;
        let norm = |x: &Tensor, w: &Tensor| -> Result<Tensor> { Ok(candle_nn::ops::rms_norm(x, w, eps)?) };
        for (li, layer) in self.layers.iter().enumerate() {
            let linear = |x: &Tensor, p: Projection| -> Result<Tensor> {
                let base = layer.proj[p as usize].forward(x)?;
                if !any_adapter {
                    return Ok(base);
                }
                let segs: Vec<_> = segments.iter().map(|(r, a)| (r.clone(), a.and_then(|a| a.get(li, p)))).collect();
                apply_segments(x, &base, &segs)
            };
            let normed = norm(&x, &layer.input_norm)?;
            // [rows, heads, hd] -> [1, heads, rows, hd] for the rotary kernel.
            let heads = |t: Tensor, count: usize| -> Result<Tensor> { Ok(t.reshape((n, count, hd))?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?) };
            let rope = |t: &Tensor| match self.rope {
                RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(t, &cos, &sin),
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(t, &cos, &sin),
            };
            let attn = if host {
                // Time-major rows `[n, kv, hd]` appended to each sequence's host cache, and
                // the queries as `[heads, n, hd]`.
                let q = rope(&heads(linear(&normed, Projection::Q)?, h)?)?.squeeze(0)?;
                let k = rope(&heads(linear(&normed, Projection::K)?, kv)?)?.squeeze(0)?;
                let v = heads(linear(&normed, Projection::V)?, kv)?.squeeze(0)?;
                let time_major = |t: &Tensor| -> Result<Vec<f32>> { host_vec(&t.transpose(0, 1)?) };
                let (q, kn, vn) = (host_vec(&q)?, time_major(&k)?, time_major(&v)?);
                let views = append_host(seqs, &rows, li, &kn, &vn, kv * hd);
                let out = causal_attention(&q, n, h, kv, hd, &views);
                Tensor::from_vec(out, (n, h * hd), &self.device)?
            } else {
                let q = rope(&heads(linear(&normed, Projection::Q)?, h)?)?.squeeze(0)?;
                let k = rope(&heads(linear(&normed, Projection::K)?, kv)?)?.squeeze(0)?;
                let v = heads(linear(&normed, Projection::V)?, kv)?.squeeze(0)?;
                let mut outs = Vec::with_capacity(seqs.len());
                for (seq, range) in seqs.iter_mut().zip(&rows) {
                    let t = range.len();
                    let qs = q.narrow(1, range.start, t)?;
                    let (ks, vs) = append(seq.cache, li, k.narrow(1, range.start, t)?, v.narrow(1, range.start, t)?)?;
                    outs.push(attend(&qs, &ks, &vs, kv, hd)?);
                }
                Tensor::cat(&outs, 1)?.transpose(0, 1)?.reshape((n, h * hd))?
            };
            x = (x + linear(&attn, Projection::O)?)?;
            let normed = norm(&x, &layer.post_norm)?;
            let gate = linear(&normed, Projection::Gate)?;
            let up = linear(&normed, Projection::Up)?;
            let act = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + linear(&act, Projection::Down)?)?;
        }
        for (seq, range) in seqs.iter_mut().zip(&rows) {
            seq.cache.len += range.len();
        }
        let last: Vec<u32> = rows.iter().map(|r| (r.end - 1) as u32).collect();
        let last = Tensor::from_vec(last, rows.len(), &self.device)?;
        let x = norm(&x.index_select(&last, 0)?, &self.norm)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// Logits `[batch, time, vocab]` of a block of token ids `[batch, time]`, from
    /// differentiable operations (training and the reference for [`Llama::step`]).
    pub fn forward_train(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let x = self.hidden_train(tokens, None, None)?;
        Ok(crate::finetune::train_linear(&self.lm_head, &x)?.reshape((b, t, self.config.vocab_size))?)
    }

    /// Every weight under its Hugging Face name (for saving a trained model); refused for
    /// a quantized model.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let dense = |w: &Weight| w.dense().cloned().ok_or_else(|| Error::Weights("a quantized model has no dense weights to save".into()));
        let mut out = HashMap::new();
        let Embedding::Dense(embed) = &self.embed else {
            return Err(Error::Weights("a quantized model has no dense weights to save".into()));
        };
        out.insert("model.embed_tokens.weight".to_owned(), embed.clone());
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.insert(format!("{p}.input_layernorm.weight"), layer.input_norm.clone());
            out.insert(format!("{p}.post_attention_layernorm.weight"), layer.post_norm.clone());
            for m in Projection::ALL {
                out.insert(m.weight_name(i), dense(&layer.proj[m as usize])?);
            }
        }
        out.insert("model.norm.weight".to_owned(), self.norm.clone());
        if !self.config.tie_word_embeddings {
            out.insert("lm_head.weight".to_owned(), dense(&self.lm_head)?);
        }
        Ok(out)
    }

    /// [`Llama::step`] that keeps one failing adapter from failing the batch: each
    /// sequence's logits row, or the error of the group it failed in. When the whole step
    /// fails, every cache is put back and each group of consecutive sequences with the
    /// same adapter runs again on its own; a group that still fails gets its error (its
    /// caches put back too), the others their logits, equal to the batched ones.
    pub fn step_isolated(&self, seqs: &mut [StepSeq<'_>]) -> Vec<std::result::Result<Vec<f32>, String>> {
        let lens: Vec<usize> = seqs.iter().map(|s| s.cache.len()).collect();
        let run = |seqs: &mut [StepSeq<'_>]| -> Result<Vec<Vec<f32>>> {
            // One copy of every row (on a GPU, one transfer instead of one per sequence).
            Ok(self.step(seqs)?.to_vec2::<f32>()?)
        };
        let restore = |seqs: &mut [StepSeq<'_>], lens: &[usize]| -> Result<()> {
            seqs.iter_mut().zip(lens).try_for_each(|(s, &len)| self.rollback(s.cache, len))
        };
        let whole = match run(seqs) {
            Ok(rows) => return rows.into_iter().map(Ok).collect(),
            Err(e) => e.to_string(),
        };
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        while start < seqs.len() {
            let first = seqs[start].adapter;
            let end = start + seqs[start..].iter().take_while(|s| same_adapter(s.adapter, first)).count();
            let group = &mut seqs[start..end];
            let result = restore(group, &lens[start..end]).and_then(|()| run(group));
            match result {
                Ok(rows) => out.extend(rows.into_iter().map(Ok)),
                Err(e) => {
                    // Best effort: the group's requests end here, their caches are dropped.
                    let _ = restore(group, &lens[start..end]);
                    let message = if end - start == seqs.len() { whole.clone() } else { e.to_string() };
                    out.extend(std::iter::repeat_n(Err(message), end - start));
                }
            }
            start = end;
        }
        out
    }

    /// Puts a sequence's cache back to its first `len` positions (after a failed step, so
    /// the sequence can run again).
    pub fn rollback(&self, cache: &mut KvCache, len: usize) -> Result<()> {
        cache.truncate(len, self.config.kv_heads() * self.config.head_dim())
    }

    /// Checks an adapter against this model: every layer it adapts exists and each
    /// `lora_A` is `[r, in]` and `lora_B` is `[out, r]` for that projection's `[out, in]`
    /// base weight. The error names the first tensor that does not fit.
    pub fn check_adapter(&self, adapter: &Adapter) -> std::result::Result<(), String> {
        let mut keys: Vec<_> = adapter.weights.keys().copied().collect();
        keys.sort();
        for (layer, p) in keys {
            let w = &adapter.weights[&(layer, p)];
            let Some(base) = self.projection(layer, p) else {
                return Err(format!(
                    "{} adapts layer {layer}, but the base model has {} layers (0..{})",
                    p.lora_name(layer, 'A'),
                    self.layers.len(),
                    self.layers.len()
                ));
            };
            let (out, inp) = base.dims().map_err(|e| e.to_string())?;
            let r = w.a.dim(0).map_err(|e| e.to_string())?;
            if w.a.dims() != [r, inp] {
                return Err(format!("{} is {:?}; the base model needs [{r}, {inp}]", p.lora_name(layer, 'A'), w.a.dims()));
            }
            if w.b.dims() != [out, r] {
                return Err(format!("{} is {:?}; the base model needs [{out}, {r}]", p.lora_name(layer, 'B'), w.b.dims()));
            }
        }
        Ok(())
    }

    /// Checks an adapter trained on the Hugging Face layout ([`Llama::check_adapter`]) and
    /// puts it in this model's layout: for a GGUF model, the `lora_B` rows of the Q and K
    /// projections in llama.cpp's rotary order ([`crate::gguf::permute_rope_rows`]), as
    /// llama.cpp's converter did to the base weights.
    pub fn fit_adapter(&self, mut adapter: Adapter) -> std::result::Result<Adapter, String> {
        self.check_adapter(&adapter)?;
        if self.rope == RopeStyle::Interleaved {
            for ((_, p), w) in adapter.weights.iter_mut() {
                let heads = match p {
                    Projection::Q => self.config.num_attention_heads,
                    Projection::K => self.config.kv_heads(),
                    _ => continue,
                };
                w.b = crate::gguf::permute_rope_rows(&w.b, heads).map_err(|e| e.to_string())?;
            }
        }
        Ok(adapter)
    }

    /// The `[out, in]` weight of one projection.
    pub fn projection(&self, layer: usize, p: Projection) -> Option<&Weight> {
        self.layers.get(layer).map(|l| &l.proj[p as usize])
    }
}

fn same_adapter(a: Option<&Adapter>, b: Option<&Adapter>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

/// `cos` and `sin` of every position and frequency, `[max_positions, head_dim / 2]`.
fn rotary_tables(cfg: &LlamaConfig, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32).collect();
    let inv = Tensor::from_vec(inv, (1, hd / 2), device)?;
    let pos = Tensor::arange(0u32, cfg.max_position_embeddings as u32, device)?.to_dtype(DType::F32)?.reshape((cfg.max_position_embeddings, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?.to_dtype(dtype)?.contiguous()?, freqs.sin()?.to_dtype(dtype)?.contiguous()?))
}

/// `[t, past + t]`: 0 where query `i` (at position `past + i`) may see key `j`, -inf after.
pub(crate) fn causal_mask(t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t).flat_map(|i| (0..past + t).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(mask, (t, past + t), device)?)
}

/// Appends a sequence's new keys and values (`[kv, t, hd]`) to layer `li` of its cache and
/// returns the whole of both.
/// A tensor's values as one f32 vector on the host.
pub(crate) fn host_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Appends a step's new keys and values of layer `li` (time-major, `per_row` values a row,
/// sequence `i` owning `rows[i]`) to each sequence's host cache, and returns the caches as
/// the views attention reads.
pub(crate) fn append_host<'s>(seqs: &'s mut [StepSeq<'_>], rows: &[Range<usize>], li: usize, k: &[f32], v: &[f32], per_row: usize) -> Vec<HostSeq<'s>> {
    for (seq, range) in seqs.iter_mut().zip(rows) {
        if seq.cache.host.len() <= li {
            seq.cache.host.push((Vec::new(), Vec::new()));
        }
        let (ck, cv) = &mut seq.cache.host[li];
        ck.extend_from_slice(&k[range.start * per_row..range.end * per_row]);
        cv.extend_from_slice(&v[range.start * per_row..range.end * per_row]);
    }
    seqs.iter()
        .zip(rows)
        .map(|(seq, range)| HostSeq { rows: range.clone(), k: &seq.cache.host[li].0, v: &seq.cache.host[li].1 })
        .collect()
}

fn append(cache: &mut KvCache, li: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    if cache.layers.len() <= li {
        cache.layers.push((k.contiguous()?, v.contiguous()?));
    } else {
        let (pk, pv) = &cache.layers[li];
        // `cat` along dim 1 leaves a time-major layout; attention's batched matmuls on a
        // GPU need contiguous operands.
        cache.layers[li] = (Tensor::cat(&[pk, &k], 1)?.contiguous()?, Tensor::cat(&[pv, &v], 1)?.contiguous()?);
    }
    Ok(cache.layers[li].clone())
}

/// Attention of one sequence's new queries `[heads, t, hd]` over its keys and values
/// `[kv, len, hd]` (the last `t` positions being the new ones); returns `[heads, t, hd]`.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, kv: usize, hd: usize) -> Result<Tensor> {
    let (h, t, _) = q.dims3()?;
    let len = k.dim(1)?;
    let group = h / kv;
    let q = q.contiguous()?.reshape((kv, group * t, hd))?;
    let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
    let scores = if t > 1 {
        let mask = causal_mask(t, len - t, q.device())?.to_dtype(q.dtype())?;
        scores.reshape((kv, group, t, len))?.broadcast_add(&mask)?.reshape((kv, group * t, len))?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(v)?.reshape((h, t, hd))?)
}

/// Index of the largest value of a `[vocab]` row of logits.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The logits of row `i` of a step's output as a vector.
pub fn row(logits: &Tensor, i: usize) -> Result<Vec<f32>> {
    Ok(logits.i(i)?.to_vec1::<f32>()?)
}
