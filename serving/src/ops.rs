//! Fused training ops for the CPU. candle composes softmax and cross-entropy from
//! single-threaded elementwise passes, each with its own backward; on the default model
//! those two were half of a training step. These run one parallel pass per row forward
//! and a short backward, and fall back to candle's ops on other devices and dtypes.

use candle_core::{CpuStorage, CustomOp1, D, Layout, Shape, Tensor};
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
        // d softmax: p ⊙ (g − Σ g⊙p).
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some(res.mul(&grad_res.broadcast_sub(&dot)?)?))
    }
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
