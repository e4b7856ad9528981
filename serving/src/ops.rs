//! Fused training ops for the CPU. candle composes softmax and cross-entropy from
//! single-threaded elementwise passes, each with its own backward; on the default model
//! those two were half of a training step. These run one parallel pass per row forward
//! and a short backward, and fall back to candle's ops on other devices and dtypes.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The rows of a contiguous f32 tensor, or `None` where the fused path does not apply.
fn f32_rows<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<(&'a [f32], usize)> {
    let CpuStorage::F32(data) = storage else { return None };
    let (start, end) = layout.contiguous_offsets()?;
    let width = *layout.dims().last()?;
    (width > 0).then_some((&data[start..end], width))
}

/// Softmax of one row, in place.
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "ledgerlake-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (src, width) = f32_rows(storage, layout).ok_or_else(|| candle_core::Error::Msg("softmax: contiguous f32 rows expected".into()))?;
        let mut dst = src.to_vec();
        dst.par_chunks_mut(width).for_each(softmax_in_place);
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(softmax_backward(res, grad_res)?))
    }
}

/// The gradient of a softmax's input from its output `p` and the output's gradient `g`:
/// `p ⊙ (g − Σ g⊙p)` over the last dimension (masked entries, `p = 0`, get none).
fn softmax_backward(p: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    let dot = (g * p)?.sum_keepdim(D::Minus1)?;
    p.mul(&g.broadcast_sub(&dot)?)
}

fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !fused(x) {
        return candle_nn::ops::softmax_last_dim(x);
    }
    x.contiguous()?.apply_op1(SoftmaxLastDim)
}

/// The per-row loss `logsumexp(row) − row[target]`; its backward is `softmax − onehot`.
struct CrossEntropyRows {
    targets: Vec<u32>,
}

impl CustomOp1 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "ledgerlake-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (src, width) = f32_rows(storage, layout).ok_or_else(|| candle_core::Error::Msg("cross-entropy: contiguous f32 rows expected".into()))?;
        let rows = src.len() / width;
        if rows != self.targets.len() || self.targets.iter().any(|&t| t as usize >= width) {
            return Err(candle_core::Error::Msg(format!("cross-entropy: {} targets for {rows} rows of {width} classes", self.targets.len())));
        }
        let losses: Vec<f32> = src
            .par_chunks(width)
            .zip(self.targets.par_iter())
            .map(|(row, &target)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
                max + sum.ln() - row[target as usize]
            })
            .collect();
        Ok((CpuStorage::F32(losses), Shape::from(rows)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // (softmax − onehot) · g per row, written in one pass into one buffer (the logits
        // of a training batch are its largest tensor: no second copy for the one-hot).
        let (rows, width) = arg.dims2()?;
        let logits = arg.detach().contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.contiguous()?.to_vec1::<f32>()?;
        let mut out = logits;
        out.par_chunks_mut(width).zip(self.targets.par_iter()).zip(g.par_iter()).for_each(|((row, &t), &g)| {
            softmax_in_place(row);
            row[t as usize] -= 1.0;
            for v in row.iter_mut() {
                *v *= g;
            }
        });
        Ok(Some(Tensor::from_vec(out, (rows, width), arg.device())?))
    }
}

/// Mean cross-entropy of `logits` `[n, classes]` against `targets` `[n]` (u32),
/// differentiable in the logits.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if !fused(logits) {
        return candle_nn::loss::cross_entropy(logits, targets);
    }
    let targets = targets.to_vec1::<u32>()?;
    logits.contiguous()?.apply_op1(CrossEntropyRows { targets })?.mean_all()
}

fn f32_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.detach().contiguous()?.flatten_all()?.to_vec1::<f32>()
}

fn need<T>(x: Option<T>, what: &str) -> candle_core::Result<T> {
    x.ok_or_else(|| candle_core::Error::Msg(format!("{what}: contiguous f32 input expected")))
}

/// Causal softmax of attention scores `[..., rows, time]` whose row `r` is the query at
/// position `r % time`: the scores are scaled, the keys after the query get probability 0.
struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "ledgerlake-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (src, t) = need(f32_rows(storage, layout), "causal softmax")?;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(t).zip(src.par_chunks(t)).enumerate().for_each(|(r, (dst, src))| {
            let seen = r % t + 1;
            let row = &mut dst[..seen];
            for (d, s) in row.iter_mut().zip(src) {
                *d = s * self.scale;
            }
            softmax_in_place(row);
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((softmax_backward(res, grad_res)? * self.scale as f64)?))
    }
}

/// Attention probabilities from raw scores `[..., rows, time]` (row `r` the query at
/// position `r % time`): `softmax(scores · scale + causal mask)`, differentiable. `mask` is
/// the `[time, time]` additive mask the fallback off the CPU uses.
pub fn causal_softmax(scores: &Tensor, scale: f64, mask: &Tensor) -> candle_core::Result<Tensor> {
    if !fused(scores) {
        let dims = scores.dims().to_vec();
        let (rows, t) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let lead = scores.elem_count() / (rows * t);
        let masked = (scores * scale)?.reshape((lead, rows / t, t, t))?.broadcast_add(mask)?.reshape(dims)?;
        return candle_nn::ops::softmax_last_dim(&masked);
    }
    scores.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32 })
}

/// RMS norm over the last dimension: `x / √(mean(x²) + eps) · w`.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ledgerlake-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, width) = need(f32_rows(s1, l1), "rms norm")?;
        let (w, wn) = need(f32_rows(s2, l2), "rms norm weight")?;
        if wn != width || w.len() != width {
            return Err(candle_core::Error::Msg(format!("rms norm: rows of {width}, weight of {}", w.len())));
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(width).zip(x.par_chunks(width)).for_each(|(y, x)| {
            let r = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / width as f32 + self.eps).sqrt();
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // With r = 1/√(mean(x²)+eps) and h = g ⊙ w: dx = r·h − x·r³·(h·x)/n; dw = Σ_rows g ⊙ x·r.
        let width = *w.dims().last().unwrap_or(&1);
        let (xs, ws, gs) = (f32_vec(x)?, f32_vec(w)?, f32_vec(g)?);
        let n = width as f32;
        let inv_rms = |x: &[f32]| 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / n + self.eps).sqrt();
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(width).zip(xs.par_chunks(width)).zip(gs.par_chunks(width)).for_each(|((dx, x), g)| {
            let r = inv_rms(x);
            let dot: f32 = x.iter().zip(g).zip(&ws).map(|((x, g), w)| g * w * x).sum();
            let k = r * r * r * dot / n;
            for (((d, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(&ws) {
                *d = r * g * w - x * k;
            }
        });
        // The weight's gradient only when it trains (pretraining); fine-tuning freezes it.
        let dw = w.track_op().then(|| {
            let mut sum = vec![0f32; width];
            for (x, g) in xs.chunks(width).zip(gs.chunks(width)) {
                let r = inv_rms(x);
                for ((s, x), g) in sum.iter_mut().zip(x).zip(g) {
                    *s += g * x * r;
                }
            }
            sum
        });
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = dw.map(|d| Tensor::from_vec(d, w.shape(), w.device())).transpose()?;
        Ok((Some(dx), dw))
    }
}

/// RMS norm over the last dimension, differentiable in `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if !fused(x) || !fused(w) {
        return candle_nn::ops::rms_norm_slow(x, w, eps);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

/// `silu(gate) ⊙ up`, the SwiGLU of a Llama MLP.
struct SwiGlu;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "ledgerlake-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, _) = need(f32_rows(s1, l1), "swiglu")?;
        let (b, _) = need(f32_rows(s2, l2), "swiglu")?;
        if l1.shape() != l2.shape() {
            return Err(candle_core::Error::Msg(format!("swiglu: {:?} and {:?}", l1.shape(), l2.shape())));
        }
        let mut y = vec![0f32; a.len()];
        y.par_chunks_mut(4096).zip(a.par_chunks(4096)).zip(b.par_chunks(4096)).for_each(|((y, a), b)| {
            for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
                *y = a * sigmoid(*a) * b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // da = g·b·σ(a)·(1 + a·(1 − σ(a))); db = g·a·σ(a).
        let (av, bv, gv) = (f32_vec(a)?, f32_vec(b)?, f32_vec(g)?);
        let (mut da, mut db) = (vec![0f32; av.len()], vec![0f32; av.len()]);
        da.par_chunks_mut(4096)
            .zip(db.par_chunks_mut(4096))
            .zip(av.par_chunks(4096).zip(bv.par_chunks(4096)).zip(gv.par_chunks(4096)))
            .for_each(|((da, db), ((a, b), g))| {
                for i in 0..a.len() {
                    let s = sigmoid(a[i]);
                    da[i] = g[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
                    db[i] = g[i] * a[i] * s;
                }
            });
        Ok((Some(Tensor::from_vec(da, a.shape(), a.device())?), Some(Tensor::from_vec(db, b.shape(), b.device())?)))
    }
}

/// `silu(gate) ⊙ up`, differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if !fused(gate) || !fused(up) {
        return candle_nn::ops::silu(gate)? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// Rotary embeddings of `[batch, heads, time, head_dim]`: each pair of dimensions (`2i`,
/// `2i + 1` interleaved; `i`, `i + head_dim/2` half-split) turns by the position's angle.
/// The backward pass turns the gradient back (the rotation is orthogonal).
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    interleaved: bool,
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "ledgerlake-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, hd) = need(f32_rows(storage, layout), "rope")?;
        let (_, _, t, _) = layout.shape().dims4()?;
        let half = hd / 2;
        if hd % 2 != 0 || self.cos.len() != t * half || self.sin.len() != t * half {
            return Err(candle_core::Error::Msg(format!("rope: {t} positions of {hd} for a table of {}", self.cos.len())));
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t * hd).zip(x.par_chunks(t * hd)).for_each(|(y, x)| {
            for p in 0..t {
                let (y, x) = (&mut y[p * hd..(p + 1) * hd], &x[p * hd..(p + 1) * hd]);
                for i in 0..half {
                    let (c, s) = (self.cos[p * half + i], sign * self.sin[p * half + i]);
                    let (j, k) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                    y[j] = x[j] * c - x[k] * s;
                    y[k] = x[j] * s + x[k] * c;
                }
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = Rope { cos: self.cos.clone(), sin: self.sin.clone(), interleaved: self.interleaved, inverse: !self.inverse };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// Rotary embeddings (`interleaved`: llama.cpp's pairing, else Hugging Face's), `cos` and
/// `sin` `[time, head_dim / 2]`; differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> candle_core::Result<Tensor> {
    if !fused(x) || !fused(cos) || !fused(sin) || cos.track_op() || sin.track_op() {
        return if interleaved { candle_nn::rotary_emb::rope_i_slow(x, cos, sin) } else { candle_nn::rotary_emb::rope_slow(x, cos, sin) };
    }
    x.contiguous()?.apply_op1(Rope { cos: f32_vec(cos)?, sin: f32_vec(sin)?, interleaved, inverse: false })
}

/// One sequence of a decode step for [`causal_attention`]: its rows of the step's
/// queries, and its keys and values `[len, kv_heads, head_dim]` (time-major, the last
/// `rows.len()` positions being the new ones).
pub struct HostSeq<'a> {
    pub rows: std::ops::Range<usize>,
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// `x` rounded to the nearest half-precision value (ties to even, as F16C converts).
#[inline(always)]
pub fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// For each of a step's `n` rows: which sequence it belongs to and which of that
/// sequence's new rows it is.
pub fn row_owners(n: usize, seqs: &[HostSeq<'_>]) -> Vec<(usize, usize)> {
    let mut owner = vec![(0usize, 0usize); n];
    for (s, seq) in seqs.iter().enumerate() {
        for (i, row) in seq.rows.clone().enumerate() {
            owner[row] = (s, i);
        }
    }
    owner
}

/// Causal grouped-query attention of a whole serving step on the CPU, one parallel pass
/// over its rows: `q` is `[heads, n, head_dim]`; the answer is `[n, heads · head_dim]`.
/// Replaces a dozen tensor ops per sequence and layer, which dominated small batches.
pub fn causal_attention(q: &[f32], n: usize, heads: usize, kv_heads: usize, head_dim: usize, seqs: &[HostSeq<'_>]) -> Vec<f32> {
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let owner = row_owners(n, seqs);
    let width = heads * head_dim;
    let mut out = vec![0f32; n * width];
    out.par_chunks_mut(width).enumerate().for_each(|(row, out)| {
        let (s, i) = owner[row];
        let seq = &seqs[s];
        let len = seq.k.len() / (kv_heads * head_dim);
        // This row is at position `len - t + i`; it sees every key up to there.
        let visible = len - seq.rows.len() + i + 1;
        let mut scores = vec![0f32; visible];
        for h in 0..heads {
            let g = h / group;
            let qh = &q[(h * n + row) * head_dim..][..head_dim];
            for (j, score) in scores.iter_mut().enumerate() {
                let kj = &seq.k[(j * kv_heads + g) * head_dim..][..head_dim];
                *score = qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            softmax_in_place(&mut scores);
            let oh = &mut out[h * head_dim..][..head_dim];
            for (j, &w) in scores.iter().enumerate() {
                let vj = &seq.v[(j * kv_heads + g) * head_dim..][..head_dim];
                for (o, v) in oh.iter_mut().zip(vj) {
                    *o += w * v;
                }
            }
        }
    });
    out
}
