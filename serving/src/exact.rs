//! The serving step of a GGUF model on the CPU: llama.cpp's arithmetic
//! ([`crate::llamacpp`], [`crate::kernels`]) on plain `f32` slices, with no tensor in
//! between. A decode step is a few hundred small operations, so what matters besides the
//! kernels is how often the threads meet: the query, key and value projections are one
//! parallel loop over their rows (the input quantized once), so are the gate and up
//! projections, and the element-wise operations of a small step run on the calling
//! thread.

use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::kernels::QMatrix;
use crate::llamacpp;
use crate::lora::{Adapter, Projection};
use crate::model::{Llama, StepSeq, append_host, host_vec};
use crate::ops::round_f16;
use crate::quant::Weight;
use crate::{Error, Result};

/// The flattened rows of one step, as [`Llama::step`] laid them out.
pub(crate) struct Rows<'a> {
    pub ids: &'a [u32],
    pub positions: &'a [u32],
    /// Each sequence's rows.
    pub rows: &'a [Range<usize>],
    /// Consecutive rows sharing an adapter.
    pub segments: &'a [(Range<usize>, Option<&'a Adapter>)],
}

impl Llama {
    /// [`Llama::step`] for a model with an f16 KV cache on the CPU: the logits of each
    /// sequence's last row, `[sequences, vocab]`.
    pub(crate) fn step_exact(&self, seqs: &mut [StepSeq<'_>], batch: Rows<'_>) -> Result<Tensor> {
        let cfg = &self.config;
        let n = batch.ids.len();
        let hidden = cfg.hidden_size;
        let (h, kv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let eps = cfg.rms_norm_eps as f32;
        let theta = cfg.rope_theta as f32;
        let mut x = host_vec(&self.embed.lookup(batch.ids, &Device::Cpu)?)?;
        for (li, (input_norm, post_norm)) in self.host_norms.iter().enumerate() {
            let normed = llamacpp::rms_norm(&x, input_norm, eps);
            let [mut q, mut k, mut v] = self.project(li, &normed, n, [Projection::Q, Projection::K, Projection::V], &batch)?;
            // llama.cpp's rotation and its f16 cache: queries, keys and values rounded to
            // half precision.
            llamacpp::rope(&mut q, batch.positions, h, hd, theta);
            llamacpp::rope(&mut k, batch.positions, kv, hd, theta);
            for value in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                *value = round_f16(*value);
            }
            let views = append_host(seqs, batch.rows, li, &k, &v, kv * hd);
            let attn = llamacpp::attention(&q, n, h, kv, hd, &views);
            let [o] = self.project(li, &attn, n, [Projection::O], &batch)?;
            add(&mut x, &o);
            let normed = llamacpp::rms_norm(&x, post_norm, eps);
            let [gate, up] = self.project(li, &normed, n, [Projection::Gate, Projection::Up], &batch)?;
            let act = llamacpp::swiglu(&gate, &up);
            let [down] = self.project(li, &act, n, [Projection::Down], &batch)?;
            add(&mut x, &down);
        }
        let mut last = Vec::with_capacity(batch.rows.len() * hidden);
        for r in batch.rows {
            // Every sequence has at least one row (checked by `step`).
            last.extend_from_slice(&x[(r.end - 1) * hidden..r.end * hidden]);
        }
        let normed = llamacpp::rms_norm(&last, &self.host_norm, eps);
        let logits = matmul(&self.lm_head, &normed, batch.rows.len())?;
        Ok(Tensor::from_vec(logits, (batch.rows.len(), cfg.vocab_size), &Device::Cpu)?)
    }

    /// The projections `ps` of layer `li` of the same input rows, each with its adapters'
    /// low-rank updates.
    fn project<const P: usize>(&self, li: usize, x: &[f32], n: usize, ps: [Projection; P], batch: &Rows<'_>) -> Result<[Vec<f32>; P]> {
        let layer = &self.layers[li];
        let blocks: Option<Vec<&QMatrix>> = ps
            .iter()
            .map(|&p| match &layer.proj[p as usize] {
                Weight::Blocks(m) => Some(&**m),
                Weight::Dense(_) | Weight::Quant { .. } => None,
            })
            .collect();
        let outs: Vec<Vec<f32>> = match blocks {
            Some(ms) => QMatrix::matmul_many(&ms, x, n).map_err(Error::Weights)?,
            None => ps.iter().map(|&p| matmul(&layer.proj[p as usize], x, n)).collect::<Result<_>>()?,
        };
        let mut outs: [Vec<f32>; P] = outs.try_into().map_err(|_| Error::Weights("a product went missing".into()))?;
        let cols = x.len() / n.max(1);
        for (out, &p) in outs.iter_mut().zip(&ps) {
            let width = out.len() / n.max(1);
            for (rows, adapter) in batch.segments {
                let Some(lora) = adapter.and_then(|a| a.get(li, p)) else { continue };
                let input = Tensor::from_slice(&x[rows.start * cols..rows.end * cols], (rows.len(), cols), &Device::Cpu)?;
                let delta = host_vec(&lora.delta(&input)?)?;
                add(&mut out[rows.start * width..rows.end * width], &delta);
            }
        }
        Ok(outs)
    }
}

/// `x Wᵀ` for `n` rows on the host, whatever the weight's storage.
fn matmul(w: &Weight, x: &[f32], n: usize) -> Result<Vec<f32>> {
    match w {
        Weight::Blocks(m) => m.matmul(x, n).map_err(Error::Weights),
        Weight::Dense(_) | Weight::Quant { .. } => {
            let cols = x.len() / n.max(1);
            host_vec(&w.forward(&Tensor::from_slice(x, (n, cols), &Device::Cpu)?)?)
        }
    }
}

/// `x += y`, element by element (the residual connections).
fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
