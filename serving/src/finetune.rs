//! LoRA and QLoRA fine-tuning of a frozen base model: the trainable low-rank pairs, the
//! differentiable forward pass over a dense or a 4/8-bit base, the masked next-token loss
//! of a batch of examples, AdamW with its state, and checkpoints a killed run resumes from.
//!
//! **LoRA** trains over dense f32 weights (the built-in model, or a GGUF model
//! [`dequantized`]). **QLoRA** trains over a GGUF model as loaded: the projections and the
//! tied output layer stay in their Q4_1/Q8_0 blocks, and each product dequantizes one
//! stripe of rows at a time ([`FrozenLinear`]), forward and backward, so no dense copy of the
//! base lives longer than one stripe. The trained pairs are f32 either way.
//!
//! The pairs are trained in the model's own layout. For a GGUF model that layout has the
//! Q and K rows in llama.cpp's rotary order, so [`TrainableLora::peft_tensors`] puts the
//! `lora_B` rows of Q and K back in Hugging Face's order: the adapter it writes is PEFT's,
//! for the Hugging Face form of the base, and [`crate::model::Llama::fit_adapter`] turns it
//! back when it is served.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};
use rand::rngs::StdRng;
use rayon::prelude::*;
use rand::{Rng, SeedableRng};

use crate::kernels::QMatrix;
use crate::lora::{Adapter, AdapterConfig, LoraWeights, Projection};
use crate::model::{Layer, Llama, RopeStyle};
use crate::quant::{Embedding, Weight};
use crate::{Error, Result};

/// What a trained adapter is: its rank, its scale numerator and the projections it adapts
/// (in every layer).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<Projection>,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Refuses a rank of 0, no targets, or a non-finite or non-positive alpha.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.rank == 0 {
            return Err("rank must be at least 1".into());
        }
        if self.targets.is_empty() {
            return Err("at least one target projection is needed".into());
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(format!("alpha must be a positive number, not {}", self.alpha));
        }
        Ok(())
    }
}

/// The trainable pairs: for each (layer, projection), `A` `[r, in]` and `B` `[out, r]`.
/// A clone shares the variables.
#[derive(Clone)]
pub struct TrainableLora {
    pub spec: LoraSpec,
    pairs: BTreeMap<(usize, Projection), (Var, Var)>,
}

/// A normal-free uniform draw in `[-bound, bound)`.
fn uniform(rng: &mut StdRng, bound: f32) -> f32 {
    (rng.random::<f32>() * 2.0 - 1.0) * bound
}

impl TrainableLora {
    /// New pairs for `model`, as PEFT initialises them: `A` from Kaiming-uniform with
    /// `a = √5` (uniform in `±1/√in`), drawn from `seed` in (layer, projection) order,
    /// and `B` zero, so the adapter starts as the bare base model.
    pub fn new(model: &Llama, spec: LoraSpec, seed: u64) -> Result<Self> {
        spec.check().map_err(Error::Weights)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        let mut targets = spec.targets.clone();
        targets.sort();
        targets.dedup();
        for layer in 0..model.config.num_hidden_layers {
            for &p in &targets {
                let weight = model.projection(layer, p).ok_or_else(|| Error::Weights(format!("layer {layer} has no {}", p.module())))?;
                let (out, inp) = weight.dims()?;
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..spec.rank * inp).map(|_| uniform(&mut rng, bound)).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (spec.rank, inp), &Device::Cpu)?)?;
                let b = Var::from_tensor(&Tensor::zeros((out, spec.rank), DType::F32, &Device::Cpu)?)?;
                pairs.insert((layer, p), (a, b));
            }
        }
        Ok(Self { spec: LoraSpec { targets, ..spec }, pairs })
    }

    /// The pairs of a loaded adapter (already in `model`'s layout: the output of
    /// [`Llama::fit_adapter`]), as variables: to compute gradient features of a trained
    /// adapter.
    pub fn from_adapter(adapter: &Adapter) -> Result<Self> {
        let mut pairs = BTreeMap::new();
        let mut targets: Vec<Projection> = Vec::new();
        let mut scale = None;
        for (&(layer, p), w) in &adapter.weights {
            let a = Var::from_tensor(&w.a.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?;
            let b = Var::from_tensor(&w.b.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?;
            pairs.insert((layer, p), (a, b));
            targets.push(p);
            scale = Some(w.scale);
        }
        targets.sort();
        targets.dedup();
        let rank = adapter.config.r;
        // The scale the pairs were made with, as `alpha / r` (the same update).
        let alpha = scale.unwrap_or(1.0) * rank as f64;
        Ok(Self { spec: LoraSpec { rank, alpha, targets }, pairs })
    }

    /// A PEFT adapter directory's pairs in `model`'s layout ([`Adapter::load`], then
    /// [`Llama::fit_adapter`], then [`TrainableLora::from_adapter`]).
    pub fn load(model: &Llama, dir: &Path) -> Result<Self> {
        let adapter = Adapter::load(dir, &Device::Cpu, DType::F32)?;
        let adapter = model.fit_adapter(adapter).map_err(Error::Weights)?;
        Self::from_adapter(&adapter)
    }

    /// Every trainable tensor, `A` then `B` of each pair in (layer, projection) order.
    pub fn vars(&self) -> Vec<Var> {
        self.pairs.values().flat_map(|(a, b)| [a.clone(), b.clone()]).collect()
    }

    /// How many numbers are trained.
    pub fn parameter_count(&self) -> usize {
        self.pairs.values().map(|(a, b)| a.elem_count() + b.elem_count()).sum()
    }

    /// The pair of one projection, if adapted.
    pub fn pair(&self, layer: usize, p: Projection) -> Option<(&Tensor, &Tensor)> {
        self.pairs.get(&(layer, p)).map(|(a, b)| (a.as_tensor(), b.as_tensor()))
    }

    /// The (layer, projection) keys in order, with their `A` and `B`.
    pub fn pairs(&self) -> impl Iterator<Item = ((usize, Projection), &Tensor, &Tensor)> {
        self.pairs.iter().map(|(k, (a, b))| (*k, a.as_tensor(), b.as_tensor()))
    }

    /// `x Wᵀ + s·(x Aᵀ) Bᵀ` for a projection, differentiable in `A` and `B` (and `x`).
    fn linear(&self, layer: usize, p: Projection, base: &Weight, x: &Tensor) -> Result<Tensor> {
        let y = train_linear(base, x)?;
        match self.pairs.get(&(layer, p)) {
            Some((a, b)) => Ok((y + (x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)? * self.spec.scale())?)?),
            None => Ok(y),
        }
    }

    /// The adapter as serving holds it, in `model`'s layout (for evaluating in-process).
    pub fn to_adapter(&self) -> Result<Adapter> {
        let mut weights = HashMap::new();
        let mut bytes = 0;
        for ((layer, p), a, b) in self.pairs() {
            bytes += (a.elem_count() + b.elem_count()) * 4;
            weights.insert((layer, p), LoraWeights { a: a.detach().copy()?, b: b.detach().copy()?, scale: self.spec.scale() });
        }
        Ok(Adapter { config: AdapterConfig::new(self.spec.rank, self.spec.alpha, &self.spec.targets), weights, bytes })
    }

    /// PEFT's `adapter_config.json` for this adapter on the base named `base`.
    pub fn peft_config(&self, base: &str) -> serde_json::Value {
        let modules: Vec<&str> = self.spec.targets.iter().map(|p| p.module()).collect();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": self.spec.rank,
            "lora_alpha": self.spec.alpha,
            "lora_dropout": 0.0,
            "target_modules": modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }

    /// The tensors of `adapter_model.safetensors` under PEFT's names, in Hugging Face's
    /// layout: for a model with llama.cpp's rotary order, the Q/K `lora_B` rows go back
    /// to Hugging Face's order (the inverse of what [`Llama::fit_adapter`] does).
    pub fn peft_tensors(&self, model: &Llama) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for ((layer, p), a, b) in self.pairs() {
            let mut b = b.detach().copy()?;
            if model.rope_style() == RopeStyle::Interleaved {
                let heads = match p {
                    Projection::Q => Some(model.config.num_attention_heads),
                    Projection::K => Some(model.config.kv_heads()),
                    _ => None,
                };
                if let Some(heads) = heads {
                    b = crate::gguf::unpermute_rope_rows(&b, heads)?;
                }
            }
            out.insert(p.lora_name(layer, 'A'), a.detach().copy()?);
            out.insert(p.lora_name(layer, 'B'), b);
        }
        Ok(out)
    }

    /// Writes the adapter in PEFT's format into `dir`.
    pub fn save_peft(&self, model: &Llama, base: &str, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let config = serde_json::to_string_pretty(&self.peft_config(base)).map_err(|e| Error::Weights(e.to_string()))?;
        write_atomic(&dir.join("adapter_config.json"), config.as_bytes())?;
        let tensors = self.peft_tensors(model)?;
        let tmp = dir.join(".adapter_model.safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, dir.join("adapter_model.safetensors")).map_err(io(dir))
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it and renames it into place.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Rows of a frozen quantized weight dequantized per stripe: at most this many f32 values
/// at once.
const STRIPE_VALUES: usize = 1 << 21;

/// The input of a custom op as a CPU tensor of its shape (`op` names the op in errors).
fn cpu_input(storage: &CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<Tensor> {
    let CpuStorage::F32(data) = storage else {
        return Err(candle_core::Error::Msg(format!("{op}: f32 input expected")));
    };
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: contiguous input expected")))?;
    Tensor::from_slice(&data[start..end], layout.shape(), &Device::Cpu)
}

/// A frozen base weight `[out, in]`: dense, or quantized blocks.
enum Frozen {
    Dense(Tensor),
    Blocks(Arc<QMatrix>),
}

/// `x Wᵀ` over a frozen base weight, differentiable in `x` only. candle's matmul backward
/// computes the gradient of both operands, so a plain `x.matmul(&w.t())` would spend a
/// third of a LoRA step (and a weight-sized buffer per projection) on gradients of weights
/// that never change. Quantized blocks are dequantized one stripe of rows at a time,
/// forward and backward, so the dense weight never exists whole and nothing of it is kept
/// for the backward pass; a dense weight is one stripe.
struct FrozenLinear(Frozen);

impl Frozen {
    fn dims(&self) -> (usize, usize) {
        match self {
            Frozen::Dense(w) => w.dims2().unwrap_or((0, 0)),
            Frozen::Blocks(m) => (m.rows, m.cols),
        }
    }

    /// Ranges of rows of at most [`STRIPE_VALUES`] values (at least 16 rows); a dense
    /// weight is one stripe unless `split_dense`.
    fn stripes(&self, split_dense: bool) -> impl Iterator<Item = std::ops::Range<usize>> + use<> {
        let (rows, cols) = self.dims();
        let per = match self {
            Frozen::Dense(_) if !split_dense => rows.max(1),
            _ => (STRIPE_VALUES / cols.max(1)).max(16),
        };
        (0..rows.div_ceil(per)).map(move |i| i * per..((i + 1) * per).min(rows))
    }

    fn stripe(&self, rows: std::ops::Range<usize>) -> candle_core::Result<Tensor> {
        match self {
            Frozen::Dense(w) => w.narrow(0, rows.start, rows.len()),
            Frozen::Blocks(m) => {
                let len = rows.len();
                Tensor::from_vec(m.dequantize_rows(rows), (len, m.cols), &Device::Cpu)
            }
        }
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "ledgerlake-frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_input(storage, layout, "frozen linear")?;
        let (n, cols) = x.dims2()?;
        let (rows, expected) = self.0.dims();
        if cols != expected {
            return Err(candle_core::Error::Msg(format!("frozen linear: input has {cols} columns, the weight {expected}")));
        }
        let mut out = vec![0f32; n * rows];
        for stripe in self.0.stripes(false) {
            let y = x.matmul(&self.0.stripe(stripe.clone())?.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            let width = stripe.len();
            for (i, part) in y.chunks_exact(width).enumerate() {
                out[i * rows + stripe.start..][..width].copy_from_slice(part);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, rows))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d(x Wᵀ)/dx = g W, summed over the stripes of W's rows.
        let g = grad_res.contiguous()?;
        let mut dx: Option<Tensor> = None;
        for rows in self.0.stripes(false) {
            let part = g.narrow(1, rows.start, rows.len())?.contiguous()?.matmul(&self.0.stripe(rows)?)?;
            dx = Some(match dx {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        Ok(dx)
    }
}

/// `x Wᵀ` of a base weight, differentiable in `x`; in `W` too when `W` is being trained
/// (pretraining passes variables), never for a frozen base.
pub(crate) fn train_linear(w: &Weight, x: &Tensor) -> Result<Tensor> {
    match w {
        Weight::Dense(w) if w.track_op() || !x.device().is_cpu() || w.dtype() != DType::F32 => Ok(x.matmul(&w.t()?)?),
        Weight::Dense(w) => Ok(x.contiguous()?.apply_op1(FrozenLinear(Frozen::Dense(w.clone())))?),
        Weight::Blocks(m) if x.device().is_cpu() => Ok(x.contiguous()?.apply_op1(FrozenLinear(Frozen::Blocks(m.clone())))?),
        _ => Err(Error::Weights(format!("training over {} weights on this device is not supported: use the CPU, or a dense (f32) base", w.format()))),
    }
}

/// A copy of `model` whose quantized weights are dense f32 (LoRA over a dequantized GGUF
/// base). The rotary layout stays the model's.
pub fn dequantized(model: &Llama) -> Result<Llama> {
    let dense = |w: &Weight| -> Result<Weight> {
        Ok(match w {
            Weight::Dense(t) => Weight::Dense(t.clone()),
            Weight::Blocks(m) => Weight::Dense(Tensor::from_vec(m.dequantize(), (m.rows, m.cols), &Device::Cpu)?),
            Weight::Quant { matmul: _, dims, format, .. } => {
                return Err(Error::Weights(format!("a {dims:?} {format:?} weight cannot be dequantized for training here")));
            }
        })
    };
    let mut out = model.clone();
    for layer in &mut out.layers {
        for p in layer.proj.iter_mut() {
            *p = dense(p)?;
        }
    }
    let head_is_embed = matches!((&model.lm_head, &model.embed), (Weight::Blocks(a), Embedding::Blocks(b)) if Arc::ptr_eq(a, b));
    out.lm_head = dense(&model.lm_head)?;
    out.embed = match &model.embed {
        Embedding::Dense(t) => Embedding::Dense(t.clone()),
        Embedding::Blocks(m) if head_is_embed => match &out.lm_head {
            Weight::Dense(t) => Embedding::Dense(t.clone()),
            _ => Embedding::Blocks(m.clone()),
        },
        Embedding::Blocks(m) => Embedding::Dense(Tensor::from_vec(m.dequantize(), (m.rows, m.cols), &Device::Cpu)?),
    };
    // Training's forward pass is candle's: no llama.cpp host norms needed.
    out.host_norms.clear();
    out.host_norm.clear();
    Ok(out)
}

/// A batch of examples: inputs padded to the longest, and the positions that predict a
/// real next token with their targets.
pub struct Batch {
    /// `[batch, time]`.
    pub inputs: Tensor,
    /// Flat indices (`b · time + t`) of the positions with a target.
    pub rows: Tensor,
    /// `[rows]`.
    pub targets: Tensor,
    /// Predicted tokens (the number of rows).
    pub tokens: usize,
}

impl Batch {
    /// Each example is a token sequence; position `t` predicts token `t + 1`. Examples of
    /// fewer than two tokens predict nothing and are skipped; an all-empty batch is an
    /// error.
    pub fn new(examples: &[&[u32]]) -> Result<Self> {
        let time = examples.iter().map(|e| e.len().saturating_sub(1)).max().unwrap_or(0);
        if time == 0 {
            return Err(Error::Weights("a batch needs an example of at least two tokens".into()));
        }
        let mut inputs = vec![0u32; examples.len() * time];
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for (b, e) in examples.iter().enumerate() {
            for t in 0..e.len().saturating_sub(1) {
                inputs[b * time + t] = e[t];
                rows.push((b * time + t) as u32);
                targets.push(e[t + 1]);
            }
        }
        let tokens = rows.len();
        Ok(Self {
            inputs: Tensor::from_vec(inputs, (examples.len(), time), &Device::Cpu)?,
            rows: Tensor::from_vec(rows, tokens, &Device::Cpu)?,
            targets: Tensor::from_vec(targets, tokens, &Device::Cpu)?,
            tokens,
        })
    }
}

impl Batch {
    /// One sequence whose targets are the tokens at positions `predict_from..` (an
    /// answer after its prompt): what [`gradient_feature`] and [`answer_loss`] score.
    pub fn answer(tokens: &[u32], predict_from: usize) -> Result<Self> {
        if tokens.len() < 2 || predict_from == 0 || predict_from >= tokens.len() {
            return Err(Error::Weights(format!("a feature needs a token to predict: {} tokens, predicting from {predict_from}", tokens.len())));
        }
        let n = tokens.len() - 1;
        let rows: Vec<u32> = (predict_from - 1..n).map(|i| i as u32).collect();
        let targets: Vec<u32> = tokens[predict_from..].to_vec();
        let count = rows.len();
        Ok(Self {
            inputs: Tensor::from_vec(tokens[..n].to_vec(), (1, n), &Device::Cpu)?,
            rows: Tensor::from_vec(rows, count, &Device::Cpu)?,
            targets: Tensor::from_vec(targets, count, &Device::Cpu)?,
            tokens: count,
        })
    }
}

/// The mean cross-entropy of the tokens at `predict_from..` of `tokens` (an answer given
/// its prompt) under `model` with `lora`.
pub fn answer_loss(model: &Llama, lora: Option<&TrainableLora>, tokens: &[u32], predict_from: usize) -> Result<f32> {
    Ok(loss(model, lora, &Batch::answer(tokens, predict_from)?)?.to_scalar::<f32>()?)
}

/// Logits `[batch, time, vocab]` of `tokens` `[batch, time]` under `model` with `lora`
/// (the training forward pass; serving the saved adapter must give the same).
pub fn forward(model: &Llama, lora: Option<&TrainableLora>, tokens: &Tensor) -> Result<Tensor> {
    let (b, t) = tokens.dims2()?;
    let hidden = model.hidden_train(tokens, lora, None)?;
    Ok(train_linear(&model.lm_head, &hidden)?.reshape((b, t, model.config.vocab_size))?)
}

/// Mean next-token cross-entropy of a batch under `model` with `lora` (or the bare base).
pub fn loss(model: &Llama, lora: Option<&TrainableLora>, batch: &Batch) -> Result<Tensor> {
    loss_with(model, lora, batch, None)
}

/// [`loss`], with every layer under gradient checkpointing when `checkpoint` is given
/// (the pairs' gradients then land in it, not in the graph's); a frozen output layer on
/// the CPU then never makes the batch's logits whole (see `HeadCrossEntropy`).
fn loss_with(model: &Llama, lora: Option<&TrainableLora>, batch: &Batch, checkpoint: Option<&SideGrads>) -> Result<Tensor> {
    let hidden = model.hidden_train(&batch.inputs, lora, checkpoint)?;
    let picked = hidden.index_select(&batch.rows, 0)?;
    // Whole logits are faster (one product, no recomputation); under checkpointing, where
    // memory is the point, the output layer goes by stripes too.
    let frozen = match &model.lm_head {
        _ if checkpoint.is_none() => None,
        Weight::Dense(w) if !w.track_op() && w.device().is_cpu() && w.dtype() == DType::F32 && picked.dtype() == DType::F32 => Some(Frozen::Dense(w.clone())),
        Weight::Blocks(m) if picked.device().is_cpu() => Some(Frozen::Blocks(m.clone())),
        _ => None,
    };
    match frozen {
        Some(head) => {
            let targets = batch.targets.to_vec1::<u32>()?;
            Ok(picked.contiguous()?.apply_op1(HeadCrossEntropy::new(head, targets))?.mean_all()?)
        }
        None => Ok(crate::ops::cross_entropy(&train_linear(&model.lm_head, &picked)?, &batch.targets)?),
    }
}

/// What every layer of one training forward pass shares.
#[derive(Clone)]
struct Pass {
    b: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    rope: RopeStyle,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

/// One decoder layer of the training forward pass: `x` `[batch · time, hidden]` in, the
/// same out. Differentiable in `x` and in the layer's LoRA pairs.
fn layer_train(layer: &Layer, li: usize, pass: &Pass, x: &Tensor, lora: Option<&TrainableLora>) -> Result<Tensor> {
    let Pass { b, t, heads: h, kv_heads: kv, head_dim: hd, eps, .. } = *pass;
    let group = h / kv;
    let lin = |x: &Tensor, p: Projection| -> Result<Tensor> {
        let w = &layer.proj[p as usize];
        match lora {
            Some(l) => l.linear(li, p, w, x),
            None => train_linear(w, x),
        }
    };
    let rope = |x: &Tensor| crate::ops::rope(x, &pass.cos, &pass.sin, pass.rope == RopeStyle::Interleaved);
    let normed = crate::ops::rms_norm(x, &layer.input_norm, eps)?;
    let split = |t2: Tensor, count: usize| t2.reshape((b, t, count, hd))?.transpose(1, 2)?.contiguous();
    let q = rope(&split(lin(&normed, Projection::Q)?, h)?)?;
    let k = rope(&split(lin(&normed, Projection::K)?, kv)?)?;
    let v = split(lin(&normed, Projection::V)?, kv)?;
    // Queries grouped by the key/value head they share: [b, kv, group * t, hd].
    let q = q.reshape((b, kv, group * t, hd))?;
    let scores = q.matmul(&k.t()?.contiguous()?)?;
    let probs = crate::ops::causal_softmax(&scores, 1.0 / (hd as f64).sqrt(), &pass.mask)?;
    let attn = probs.matmul(&v)?.reshape((b, h, t, hd))?.transpose(1, 2)?.reshape((b * t, h * hd))?;
    let x = (x + lin(&attn, Projection::O)?)?;
    let normed = crate::ops::rms_norm(&x, &layer.post_norm, eps)?;
    let act = crate::ops::swiglu(&lin(&normed, Projection::Gate)?, &lin(&normed, Projection::Up)?)?;
    Ok((&x + lin(&act, Projection::Down)?)?)
}

/// Gradients that checkpointed layers computed for the LoRA pairs inside them (the
/// autograd graph outside sees only each layer's input).
pub(crate) type SideGrads = Arc<std::sync::Mutex<HashMap<candle_core::TensorId, Tensor>>>;

/// A decoder layer under gradient checkpointing: the forward pass keeps only the layer's
/// input; the backward pass runs the layer again with autograd, takes the gradient of its
/// input (returned) and of its LoRA pairs (added to the side store).
struct CheckpointedLayer {
    layer: Layer,
    li: usize,
    pass: Pass,
    lora: Option<TrainableLora>,
    side: SideGrads,
}

impl CustomOp1 for CheckpointedLayer {
    fn name(&self) -> &'static str {
        "ledgerlake-checkpointed-layer"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_input(storage, layout, "checkpointed layer")?;
        let y = layer_train(&self.layer, self.li, &self.pass, &x, self.lora.as_ref()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((CpuStorage::F32(y.detach().flatten_all()?.to_vec1::<f32>()?), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = layer_train(&self.layer, self.li, &self.pass, x.as_tensor(), self.lora.as_ref()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        if let Some(lora) = &self.lora {
            let mut side = self.side.lock().unwrap_or_else(|p| p.into_inner());
            for ((layer, _), a, b) in lora.pairs() {
                if layer != self.li {
                    continue;
                }
                for v in [a, b] {
                    if let Some(g) = grads.get(v) {
                        let sum = match side.remove(&v.id()) {
                            Some(acc) => (acc + g)?,
                            None => g.clone(),
                        };
                        side.insert(v.id(), sum);
                    }
                }
            }
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}

impl Llama {
    /// The hidden states after the final norm, `[batch · time, hidden]`, of a block of
    /// token ids `[batch, time]`, from differentiable operations; with `lora`, each
    /// adapted projection adds its low-rank update. With `checkpoint`, every layer is
    /// recomputed in the backward pass instead of keeping its activations, and the pairs'
    /// gradients land in that store.
    pub(crate) fn hidden_train(&self, tokens: &Tensor, lora: Option<&TrainableLora>, checkpoint: Option<&SideGrads>) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t) = tokens.dims2()?;
        if t > cfg.max_position_embeddings {
            return Err(Error::Weights(format!("{t} positions exceed the model's {}", cfg.max_position_embeddings)));
        }
        let pass = Pass {
            b,
            t,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.kv_heads(),
            head_dim: cfg.head_dim(),
            eps: cfg.rms_norm_eps as f32,
            rope: self.rope,
            cos: self.cos.narrow(0, 0, t)?,
            sin: self.sin.narrow(0, 0, t)?,
            mask: crate::model::causal_mask(t, 0, self.device())?.to_dtype(self.dtype())?,
        };
        let ids = tokens.flatten_all()?;
        let mut x = match &self.embed {
            Embedding::Dense(embed) => embed.index_select(&ids, 0)?,
            Embedding::Blocks(_) => self.embed.lookup(&ids.to_vec1::<u32>()?, self.device())?,
        };
        let checkpoint = checkpoint.filter(|_| x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op());
        if let Some(side) = checkpoint {
            // The chain of layer ops must be tracked for the backward pass to reach them,
            // though no weight outside them trains: the embeddings' output becomes a variable.
            x = Var::from_tensor(&x)?.into_inner();
            for (li, layer) in self.layers.iter().enumerate() {
                let op = CheckpointedLayer { layer: layer.clone(), li, pass: pass.clone(), lora: lora.cloned(), side: side.clone() };
                x = x.contiguous()?.apply_op1(op)?;
            }
        } else {
            for (li, layer) in self.layers.iter().enumerate() {
                x = layer_train(layer, li, &pass, &x, lora)?;
            }
        }
        Ok(crate::ops::rms_norm(&x, &self.norm, pass.eps)?)
    }
}

/// Mean next-token cross-entropy of hidden states through a frozen output layer, by
/// stripes of the vocabulary (an online log-sum-exp), so the logits `[rows, vocab]` never
/// exist whole: forward keeps each row's log-sum-exp; backward computes the logits of each
/// stripe again.
struct HeadCrossEntropy {
    head: Frozen,
    targets: Vec<u32>,
    /// The forward pass's log-sum-exps, for the backward pass.
    lse: std::sync::Mutex<Option<Vec<f32>>>,
}

impl HeadCrossEntropy {
    fn new(head: Frozen, targets: Vec<u32>) -> Self {
        Self { head, targets, lse: std::sync::Mutex::new(None) }
    }

    /// Per row: log-sum-exp of the logits and the target's logit.
    fn lse(&self, x: &Tensor) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let n = self.targets.len();
        // Per row: running max, running sum of exp(logit − max), the target's logit.
        let mut acc = vec![(f32::NEG_INFINITY, 0f32, 0f32); n];
        for stripe in self.head.stripes(true) {
            let width = stripe.len();
            let logits = x.matmul(&self.head.stripe(stripe.clone())?.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            acc.par_iter_mut().zip(logits.par_chunks(width)).zip(self.targets.par_iter()).for_each(|((a, row), &target)| {
                let m = row.iter().copied().fold(a.0, f32::max);
                a.1 = a.1 * (a.0 - m).exp() + row.iter().map(|v| (v - m).exp()).sum::<f32>();
                a.0 = m;
                if stripe.contains(&(target as usize)) {
                    a.2 = row[target as usize - stripe.start];
                }
            });
        }
        Ok(acc.into_iter().map(|(m, s, p)| (m + s.ln(), p)).unzip())
    }
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "ledgerlake-head-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_input(storage, layout, "head cross-entropy")?;
        let (n, cols) = x.dims2()?;
        let (vocab, expected) = self.head.dims();
        if cols != expected || n != self.targets.len() || self.targets.iter().any(|&t| t as usize >= vocab) {
            return Err(candle_core::Error::Msg(format!("head cross-entropy: {n} rows of {cols} for {} targets over {vocab} classes of {expected}", self.targets.len())));
        }
        let (lse, picked) = self.lse(&x)?;
        let losses: Vec<f32> = lse.iter().zip(&picked).map(|(l, p)| l - p).collect();
        *self.lse.lock().unwrap_or_else(|p| p.into_inner()) = Some(lse);
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d loss_r / d x_r = Σ_v (softmax_rv − [v = target_r]) · g_r · W_v, by stripes of v.
        let x = arg.detach().contiguous()?;
        let cached = self.lse.lock().unwrap_or_else(|p| p.into_inner()).take();
        let lse = match cached {
            Some(lse) => lse,
            None => self.lse(&x)?.0,
        };
        let g = grad_res.contiguous()?.to_vec1::<f32>()?;
        let mut dx: Option<Tensor> = None;
        for stripe in self.head.stripes(true) {
            let w = self.head.stripe(stripe.clone())?;
            let width = stripe.len();
            let mut p = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            p.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
                for v in row.iter_mut() {
                    *v = (*v - lse[r]).exp() * g[r];
                }
                let target = self.targets[r] as usize;
                if stripe.contains(&target) {
                    row[target - stripe.start] -= g[r];
                }
            });
            let part = Tensor::from_vec(p, (self.targets.len(), width), &Device::Cpu)?.matmul(&w)?;
            dx = Some(match dx {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        Ok(dx)
    }
}

/// AdamW (decoupled weight decay, bias-corrected moments, PyTorch's update) whose state
/// can be saved and restored exactly.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken.
    pub t: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(vars: &[Var], weight_decay: f64) -> Result<Self> {
        let zeros = |v: &Var| v.zeros_like();
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// The gradients' global L2 norm, before clipping.
    pub fn grad_norm(vars: &[Var], grads: &GradStore) -> Result<f64> {
        let mut sum = 0f64;
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        Ok(sum.sqrt())
    }

    /// One update at learning rate `lr`, the gradients scaled by `clip` (the factor that
    /// brings their global norm to the clipping bound, or 1).
    pub fn step(&mut self, vars: &[Var], grads: &GradStore, lr: f64, clip: f64) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let (c1, c2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for (i, var) in vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = (g * clip)?;
            let m = ((&self.m[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Everything a run needs to continue exactly where it stopped: the pairs, AdamW's
/// moments and step count, written to `dir/state.safetensors` (atomically: a kill while
/// saving leaves the previous checkpoint).
pub fn save_state(dir: &Path, lora: &TrainableLora, opt: &AdamW) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tensors = HashMap::new();
    for (i, var) in lora.vars().iter().enumerate() {
        tensors.insert(format!("param.{i}"), var.as_tensor().detach().copy()?);
        tensors.insert(format!("m.{i}"), opt.m[i].clone());
        tensors.insert(format!("v.{i}"), opt.v[i].clone());
    }
    tensors.insert("adam.t".to_owned(), Tensor::new(&[opt.t as i64], &Device::Cpu)?);
    let tmp = dir.join(".state.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, dir.join("state.safetensors")).map_err(io(dir))
}

/// Restores what [`save_state`] wrote into `lora` and `opt` (built with the same model,
/// spec and settings); `false` when there is no checkpoint yet.
pub fn load_state(dir: &Path, lora: &TrainableLora, opt: &mut AdamW) -> Result<bool> {
    let path = dir.join("state.safetensors");
    if !path.exists() {
        return Ok(false);
    }
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let get = |name: String, like: &Tensor| -> Result<Tensor> {
        let t = tensors.get(&name).ok_or_else(|| Error::Weights(format!("{}: no {name}", path.display())))?;
        if t.dims() != like.dims() {
            return Err(Error::Weights(format!("{}: {name} is {:?}, the run needs {:?}", path.display(), t.dims(), like.dims())));
        }
        Ok(t.clone())
    };
    let vars = lora.vars();
    if tensors.len() != 3 * vars.len() + 1 {
        return Err(Error::Weights(format!("{} holds {} tensors; this run has {} trained tensors", path.display(), tensors.len(), vars.len())));
    }
    for (i, var) in vars.iter().enumerate() {
        var.set(&get(format!("param.{i}"), var.as_tensor())?)?;
        opt.m[i] = get(format!("m.{i}"), var.as_tensor())?;
        opt.v[i] = get(format!("v.{i}"), var.as_tensor())?;
    }
    let t = tensors.get("adam.t").ok_or_else(|| Error::Weights(format!("{}: no adam.t", path.display())))?;
    opt.t = u64::try_from(t.to_vec1::<i64>()?.first().copied().unwrap_or(0)).unwrap_or(0);
    Ok(true)
}

/// Learning rate at `step` of `steps`: linear warm-up over `warmup` steps, then linear
/// decay to zero (Hugging Face's `linear` schedule).
pub fn learning_rate(base: f64, step: usize, steps: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    base * (steps.saturating_sub(step)) as f64 / (steps.saturating_sub(warmup)).max(1) as f64
}

/// One batch's backward pass: its loss, the gradients, their global norm before clipping,
/// and the factor that clips them to `max_norm`.
pub struct Step {
    pub loss: f32,
    pub grads: GradStore,
    pub norm: f64,
    pub clip: f64,
}

/// The gradients of one batch's loss (see [`Step`]). With `checkpoint`, each layer's
/// activations are computed again in the backward pass instead of being kept (gradient
/// checkpointing: about a third more compute, activation memory of one layer).
pub fn backward(model: &Llama, lora: &TrainableLora, batch: &Batch, max_norm: f64, checkpoint: bool) -> Result<Step> {
    let side: SideGrads = Arc::default();
    let loss = loss_with(model, Some(lora), batch, checkpoint.then_some(&side))?;
    let value = loss.to_scalar::<f32>()?;
    if !value.is_finite() {
        return Err(Error::Weights(format!("the loss is {value}: lower the learning rate")));
    }
    let mut grads = loss.backward()?;
    let side = std::mem::take(&mut *side.lock().unwrap_or_else(|p| p.into_inner()));
    for (id, g) in side {
        let sum = match grads.get_id(id) {
            Some(acc) => (acc + g)?,
            None => g,
        };
        grads.insert_id(id, sum);
    }
    let norm = AdamW::grad_norm(&lora.vars(), &grads)?;
    let clip = if norm > max_norm && norm > 0.0 { max_norm / norm } else { 1.0 };
    Ok(Step { loss: value, grads, norm, clip })
}

/// Sum of next-token cross-entropies over `examples` (in batches of `batch`) and the
/// number of predicted tokens: held-out loss is `sum / tokens`.
pub fn eval_loss(model: &Llama, lora: Option<&TrainableLora>, examples: &[Vec<u32>], batch: usize) -> Result<(f64, usize)> {
    let mut sum = 0f64;
    let mut tokens = 0;
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&[u32]> = chunk.iter().map(|e| e.as_slice()).filter(|e| e.len() >= 2).collect();
        if refs.is_empty() {
            continue;
        }
        let b = Batch::new(&refs)?;
        let l = loss(model, lora, &b)?.to_scalar::<f32>()? as f64;
        sum += l * b.tokens as f64;
        tokens += b.tokens;
    }
    Ok((sum, tokens))
}

/// Rows and columns each half of a pair's gradient is projected to (LoGra's Kronecker
/// projection): `A`'s gradient `[r, in]` becomes `[4, 8]`, `B`'s `[out, r]` becomes `[8, 4]`.
/// Measured by `ledgerlake eval attribution`: DataInf's LDS was 0.249 at 16 numbers per
/// pair (`[2, 4]`) and 0.349 at these 64 (`BENCHMARKS.md`).
pub const FEATURE_LEFT: usize = 4;
pub const FEATURE_RIGHT: usize = 8;
/// Feature numbers per adapted projection.
pub const FEATURE_PER_PAIR: usize = 2 * FEATURE_LEFT * FEATURE_RIGHT;

/// The seeded random projection of LoRA gradients into features: for each adapted
/// (layer, projection) in order, `L_A · ∇A · R_A` (`[2, r] · [r, in] · [in, 4]`) and
/// `L_B · ∇B · R_B` (`[4, out] · [out, r] · [r, 2]`), flattened row-major and concatenated.
/// Every matrix has independent N(0, 1/k) entries (k its number of columns after the
/// product, so norms are kept in expectation), drawn from `seed` in (layer, projection,
/// half, left then right) order: the same seed and adapter shape give the same projection.
pub struct Projector {
    pub seed: u64,
    mats: Vec<[Tensor; 4]>,
}

fn gaussian(rng: &mut StdRng, rows: usize, cols: usize, scale: f32) -> Result<Tensor> {
    // Box-Muller over the seeded generator.
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * scale
        })
        .collect();
    Ok(Tensor::from_vec(data, (rows, cols), &Device::Cpu)?)
}

impl Projector {
    pub fn new(lora: &TrainableLora, seed: u64) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let (kl, kr) = (FEATURE_LEFT, FEATURE_RIGHT);
        let mut mats = Vec::new();
        for (_, a, b) in lora.pairs() {
            let (r, inp) = a.dims2()?;
            let (out, _) = b.dims2()?;
            mats.push([
                gaussian(&mut rng, kl, r, 1.0 / (kl as f32).sqrt())?,
                gaussian(&mut rng, inp, kr, 1.0 / (kr as f32).sqrt())?,
                gaussian(&mut rng, kr, out, 1.0 / (kr as f32).sqrt())?,
                gaussian(&mut rng, r, kl, 1.0 / (kl as f32).sqrt())?,
            ]);
        }
        Ok(Self { seed, mats })
    }

    /// Feature numbers per example.
    pub fn dim(&self) -> usize {
        self.mats.len() * FEATURE_PER_PAIR
    }
}

/// The projected gradient feature of one sequence: the gradient, with respect to the
/// adapter's pairs, of the mean next-token cross-entropy of the tokens at positions
/// `predict_from..` (a training example: 1, every token after the first; an inference:
/// the first output token's position, so only the output counts), projected by
/// `projector`. The one function training and attribution both call.
pub fn gradient_feature(model: &Llama, lora: &TrainableLora, tokens: &[u32], predict_from: usize, projector: &Projector) -> Result<Vec<f32>> {
    let batch = Batch::answer(tokens, predict_from)?;
    let grads = loss(model, Some(lora), &batch)?.backward()?;
    let mut out = Vec::with_capacity(projector.dim());
    for ((_, a, b), [la, ra, lb, rb]) in lora.pairs().zip(&projector.mats) {
        let ga = grads.get(a).map_or_else(|| a.zeros_like(), |g| Ok(g.clone()))?;
        let gb = grads.get(b).map_or_else(|| b.zeros_like(), |g| Ok(g.clone()))?;
        out.extend(la.matmul(&ga)?.matmul(ra)?.flatten_all()?.to_vec1::<f32>()?);
        out.extend(lb.matmul(&gb)?.matmul(rb)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Format;

    fn q8(rows: usize, cols: usize, seed: u64) -> QMatrix {
        // Q8_0 blocks: an f16 scale then 32 signed bytes.
        let mut rng = StdRng::seed_from_u64(seed);
        let mut data = Vec::new();
        for _ in 0..rows * cols / 32 {
            data.extend_from_slice(&half::f16::from_f32(0.01 + rng.random::<f32>() * 0.02).to_le_bytes());
            data.extend((0..32).map(|_| rng.random_range(-127i32..=127) as i8 as u8));
        }
        QMatrix::new(Format::Q8_0, rows, cols, data).unwrap()
    }

    #[test]
    fn the_striped_head_loss_matches_whole_logits_forward_and_backward() {
        // 40,000 rows of 64 are two stripes: the log-sum-exp runs across both, and the
        // targets fall in either.
        let rows = 40_000;
        let m = Arc::new(q8(rows, 64, 2));
        let dense = Tensor::from_vec(m.dequantize(), (rows, 64), &Device::Cpu).unwrap();
        let targets = vec![3u32, 39_999, 20_000, 32_767, 32_768];
        let x = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (5, 64), &Device::Cpu).unwrap() * 8.0).unwrap()).unwrap();
        let reference = candle_nn::loss::cross_entropy(&x.as_tensor().matmul(&dense.t().unwrap()).unwrap(), &Tensor::new(targets.as_slice(), &Device::Cpu).unwrap()).unwrap();
        for head in [Frozen::Blocks(m.clone()), Frozen::Dense(dense.clone())] {
            assert_eq!(head.stripes(true).count(), 2);
            let loss = x.as_tensor().apply_op1(HeadCrossEntropy::new(head, targets.clone())).unwrap().mean_all().unwrap();
            let (a, b) = (loss.to_scalar::<f32>().unwrap(), reference.to_scalar::<f32>().unwrap());
            assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "loss {a} vs {b}");
            let g1 = loss.backward().unwrap();
            let g2 = reference.backward().unwrap();
            let (g1, g2) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
            let diff = (g1 - g2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = g2.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0 && diff < 1e-4 * scale, "gradient differs by {diff} of {scale}");
        }
    }

    #[test]
    fn qlinear_matches_the_dense_product_forward_and_backward() {
        // 40,000 rows of 64 are two stripes of 2^21 values, the second one short.
        let rows = 40_000;
        let m = Arc::new(q8(rows, 64, 1));
        let dense = Tensor::from_vec(m.dequantize(), (rows, 64), &Device::Cpu).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 64), &Device::Cpu).unwrap()).unwrap();
        assert_eq!(Frozen::Blocks(m.clone()).stripes(false).count(), 2);
        let y = x.as_tensor().apply_op1(FrozenLinear(Frozen::Blocks(m.clone()))).unwrap();
        let reference = x.as_tensor().matmul(&dense.t().unwrap()).unwrap();
        let diff = (&y - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "forward differs by {diff}");
        let w = Tensor::randn(0f32, 1.0, (5, rows), &Device::Cpu).unwrap();
        let g1 = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        // Sums of 40,000 products: compare relative to their size.
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5 * scale, "backward differs by {diff} (scale {scale})");
    }

    #[test]
    fn stripes_cover_every_row_once() {
        let op = FrozenLinear(Frozen::Blocks(Arc::new(q8(50_000, 64, 2))));
        let stripes: Vec<_> = op.0.stripes(false).collect();
        assert!(stripes.len() > 1);
        assert_eq!(stripes.first().unwrap().start, 0);
        assert_eq!(stripes.last().unwrap().end, 50_000);
        assert!(stripes.windows(2).all(|w| w[0].end == w[1].start));
    }

    #[test]
    fn batch_masks_padding_and_skips_single_tokens() {
        let b = Batch::new(&[&[1, 2, 3], &[4], &[5, 6]]).unwrap();
        assert_eq!(b.inputs.dims(), [3, 2]);
        assert_eq!(b.rows.to_vec1::<u32>().unwrap(), vec![0, 1, 4]);
        assert_eq!(b.targets.to_vec1::<u32>().unwrap(), vec![2, 3, 6]);
        assert_eq!(b.tokens, 3);
        assert!(Batch::new(&[&[1]]).is_err());
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(learning_rate(1.0, 0, 10, 2), 0.5);
        assert_eq!(learning_rate(1.0, 1, 10, 2), 1.0);
        assert_eq!(learning_rate(1.0, 2, 10, 2), 1.0);
        assert_eq!(learning_rate(1.0, 6, 10, 2), 0.5);
        assert_eq!(learning_rate(1.0, 10, 10, 2), 0.0);
    }

    #[test]
    fn adamw_matches_pytorch_on_one_parameter() {
        // torch.optim.AdamW(lr=0.1, weight_decay=0.01) on p = [1.0, -2.0] with gradients
        // [0.5, -0.25] then [0.1, 0.2]: the update below is PyTorch's formula step by step.
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(std::slice::from_ref(&p), 0.01).unwrap();
        let mut expect = [1.0f64, -2.0];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for (t, g) in [[0.5f64, -0.25], [0.1, 0.2]].iter().enumerate() {
            let grad = Tensor::new(&[g[0] as f32, g[1] as f32], &Device::Cpu).unwrap();
            let loss = (p.as_tensor() * &grad).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(std::slice::from_ref(&p), &grads, 0.1, 1.0).unwrap();
            for i in 0..2 {
                expect[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t as i32 + 1));
                let vh = v[i] / (1.0 - 0.999f64.powi(t as i32 + 1));
                expect[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - expect[i]).abs() < 1e-5, "{got:?} vs {expect:?}");
        }
    }
}
