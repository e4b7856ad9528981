//! The arithmetic of llama.cpp's CPU backend (ggml on x86-64 with AVX2 and FMA) for the
//! operations of a Llama block, so a GGUF model served here computes what llama.cpp
//! computes, down to the rounding. A 135M-parameter model at 4 bits is chaotic enough
//! that llama.cpp itself changes its greedy text on most prompts when only its KV cache
//! goes from f16 to f32; matching its answers token for token needs its exact steps:
//!
//! - RMS norm: squares summed in f64, `scale = 1 / sqrt(mean + eps)` in f32, `x · scale`,
//!   then `· w`.
//! - RoPE (llama.cpp's "normal" mode, adjacent pairs): `theta_scale = base^(-2/dims)`, the
//!   angle multiplied by it pair after pair in f32, `cos`/`sin` of that.
//! - SwiGLU and softmax use ggml's vectorised `exp` ([`v_expf`]), not libm's.
//! - Attention with an f16 KV cache: queries, keys, values and the softmax weights are
//!   rounded to f16; `K·Q` and `weights·V` sum in f32 lanes in the order of the kernel
//!   llama.cpp picks (tinyBLAS for a prompt of two or more tokens, `ggml_vec_dot_f16` for
//!   one); the softmax scales before masking and sums its exponentials eight at a time
//!   into an f64.
//!
//! Every function here is a plain loop over f32 values: what must be exact is the order
//! of operations, and the tests pin the known values. The loops run inside [`fast`], which
//! compiles them for AVX2 and FMA when the CPU has them (chosen at run time; without it,
//! `mul_add` is a library call), with the same results either way.

use rayon::prelude::*;

use crate::ops::{HostSeq, round_f16, row_owners};

/// Runs `op` compiled for AVX2 and FMA when this CPU has them. Its `with_simd` must be
/// `#[inline(always)]` and call only `#[inline(always)]` functions: a closure's body
/// would be a function of its own, which the compiler need not inline into the AVX2
/// context (it did not, and `mul_add` became a library call).
#[inline(always)]
pub(crate) fn fast<Op: pulp::WithSimd>(op: Op) -> Op::Output {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        return pulp::Simd::vectorize(simd, op);
    }
    op.with_simd(pulp::Scalar)
}

/// Declares a struct holding the arguments of a loop and runs the loop as its
/// `WithSimd::with_simd`, for [`fast`].
macro_rules! simd_op {
    ($name:ident<$lt:lifetime> { $($field:ident: $ty:ty),* $(,)? } -> $out:ty $body:block) => {
        pub(crate) struct $name<$lt> { $(pub(crate) $field: $ty),* }
        impl<$lt> pulp::WithSimd for $name<$lt> {
            type Output = $out;
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _simd: S) -> $out {
                let Self { $($field),* } = self;
                $body
            }
        }
    };
}
pub(crate) use simd_op;

/// ggml's AVX2 `ggml_v_expf` for one lane (a polynomial after range reduction; within a
/// few ulps of `exp`, and exactly what llama.cpp uses in softmax and SiLU).
#[inline(always)]
pub fn v_expf(x: f32) -> f32 {
    let c = |bits: u32| f32::from_bits(bits);
    let r = c(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(c(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
    let u = b * b;
    let j = c(0x3c07_2010).mul_add(b, c(0x3d2b_9f17)).mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb))).mul_add(u, c(0x3f7f_fff6) * b);
    if n.abs() <= 126.0 {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 { s1 * s1 } else { s2.mul_add(j, s2) * s1 }
}

/// `silu(gate) · up`, as ggml's fused SwiGLU computes it.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; gate.len()];
    // At least 4096 values a task: a one-token step's 1536 stay on the calling thread.
    out.par_chunks_mut(1024).zip(gate.par_chunks(1024).zip(up.par_chunks(1024))).with_min_len(4).for_each(|(out, (gate, up))| {
        fast(SwigluChunk { out, gate, up })
    });
    out
}

simd_op!(SwigluChunk<'a> { out: &'a mut [f32], gate: &'a [f32], up: &'a [f32] } -> () {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + v_expf(0.0 - g)) * u;
    }
});

/// RMS norm of each row of `x` (rows of `w.len()` values), times `w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let width = w.len();
    let mut out = x.to_vec();
    // Small steps stay on the calling thread: a row is a few hundred multiplications.
    out.par_chunks_mut(width).with_min_len(16).for_each(|row| fast(RmsRow { row, w, eps }));
    out
}

simd_op!(RmsRow<'a> { row: &'a mut [f32], w: &'a [f32], eps: f32 } -> () {
    let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / w.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &wi) in row.iter_mut().zip(w) {
        *v = *v * scale * wi;
    }
});

/// `cos` and `sin` of every pair of one position: `[dims / 2]` each.
pub fn rope_angles(pos: u32, dims: usize, base: f32) -> (Vec<f32>, Vec<f32>) {
    let theta_scale = base.powf(-2.0 / dims as f32);
    let mut theta = pos as f32;
    let (mut cos, mut sin) = (Vec::with_capacity(dims / 2), Vec::with_capacity(dims / 2));
    for _ in 0..dims / 2 {
        cos.push(theta.cos());
        sin.push(theta.sin());
        theta *= theta_scale;
    }
    (cos, sin)
}

/// Rotates adjacent pairs of `x` (`[rows, heads, dims]`), row `i` at `positions[i]`.
pub fn rope(x: &mut [f32], positions: &[u32], heads: usize, dims: usize, base: f32) {
    x.par_chunks_mut(heads * dims).zip(positions.par_iter()).with_min_len(16).for_each(|(row, &pos)| {
        let (cos, sin) = rope_angles(pos, dims, base);
        fast(RopeRow { row, dims, cos: &cos, sin: &sin })
    });
}

simd_op!(RopeRow<'a> { row: &'a mut [f32], dims: usize, cos: &'a [f32], sin: &'a [f32] } -> () {
    for head in row.chunks_mut(dims) {
        for (i, pair) in head.chunks_mut(2).enumerate() {
            let (x0, x1) = (pair[0], pair[1]);
            // GCC contracts `x0*c - x1*s` into one fused multiply-add.
            pair[0] = x0.mul_add(cos[i], -(x1 * sin[i]));
            pair[1] = x0.mul_add(sin[i], x1 * cos[i]);
        }
    }
});

/// llama.cpp's `hsum_float_8` of eight lanes.
#[inline(always)]
fn hsum8(l: &[f32; 8]) -> f32 {
    let r = [l[4] + l[0], l[5] + l[1], l[6] + l[2], l[7] + l[3]];
    (r[0] + r[2]) + (r[1] + r[3])
}

/// A dot product of two slices as tinyBLAS sums it (a prompt of two or more tokens): one
/// fused multiply-add per lane over chunks of eight, then the lanes.
#[inline(always)]
fn dot_tinyblas(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xs, x_rest) = x.as_chunks::<8>();
    let (ys, y_rest) = y.as_chunks::<8>();
    for (xc, yc) in xs.iter().zip(ys) {
        for l in 0..8 {
            acc[l] = xc[l].mul_add(yc[l], acc[l]);
        }
    }
    for (xc, yc) in x_rest.chunks(8).zip(y_rest.chunks(8)) {
        for ((a, &xi), &yi) in acc.iter_mut().zip(xc).zip(yc) {
            *a = xi.mul_add(yi, *a);
        }
    }
    hsum8(&acc)
}

/// Folds `ggml_vec_dot_f16`'s four accumulators of eight lanes (`sum[j][l]`) as it does:
/// pairwise, then the lanes.
#[inline(always)]
fn reduce_vec_f16(sum: &[[f32; 8]; 4]) -> f32 {
    let mut x0 = [0f32; 8];
    for l in 0..8 {
        x0[l] = (sum[0][l] + sum[2][l]) + (sum[1][l] + sum[3][l]);
    }
    let t0 = [x0[0] + x0[4], x0[1] + x0[5], x0[2] + x0[6], x0[3] + x0[7]];
    (t0[0] + t0[1]) + (t0[2] + t0[3])
}

/// A dot product of two slices as `ggml_vec_dot_f16` sums it (one token): four
/// accumulators of eight lanes over chunks of 32, folded pairwise, then the lanes.
#[inline(always)]
fn dot_vec_f16(x: &[f32], y: &[f32]) -> f32 {
    let mut sum = [[0f32; 8]; 4];
    // Whole chunks of 32 as arrays (so the loop compiles to vector multiply-adds), then
    // a partial chunk the same way, lane by lane.
    let (xs, x_rest) = x.as_chunks::<32>();
    let (ys, y_rest) = y.as_chunks::<32>();
    for (xc, yc) in xs.iter().zip(ys) {
        for k in 0..4 {
            for l in 0..8 {
                sum[k][l] = xc[8 * k + l].mul_add(yc[8 * k + l], sum[k][l]);
            }
        }
    }
    for (xc, yc) in x_rest.chunks(32).zip(y_rest.chunks(32)) {
        for (k, (x8, y8)) in xc.chunks(8).zip(yc.chunks(8)).enumerate() {
            for ((a, &xi), &yi) in sum[k].iter_mut().zip(x8).zip(y8) {
                *a = xi.mul_add(yi, *a);
            }
        }
    }
    reduce_vec_f16(&sum)
}

/// `out[d] = Σ_j w[j] · v_j[d]` over the rows `v_j` (`value(j)`, `head_dim` long), summed
/// per output as `dot_tinyblas` (`prompt`) or `dot_vec_f16` sum over `j`. The
/// accumulators are kept lane-major (`acc[lane][d]`), so each row `v_j` is one
/// contiguous multiply-add into one lane's `head_dim` values.
#[inline(always)]
fn weigh_values<'a>(w: &[f32], value: impl Fn(usize) -> &'a [f32], head_dim: usize, prompt: bool, out: &mut [f32]) {
    // Position j goes to lane j % 8 (tinyBLAS), or to lane j % 8 of accumulator
    // (j / 8) % 4 (`ggml_vec_dot_f16`), which is lane j % 32 of 32.
    let lanes = if prompt { 8 } else { 32 };
    let mut acc = vec![0f32; lanes * head_dim];
    for (j, &wj) in w.iter().enumerate() {
        let lane = &mut acc[(j % lanes) * head_dim..][..head_dim];
        for (a, &v) in lane.iter_mut().zip(value(j)) {
            *a = v.mul_add(wj, *a);
        }
    }
    for (d, o) in out.iter_mut().enumerate() {
        let at = |lane: usize| acc[lane * head_dim + d];
        *o = if prompt { hsum8(&std::array::from_fn(at)) } else { reduce_vec_f16(&std::array::from_fn(|k| std::array::from_fn(|l| at(8 * k + l)))) };
    }
}

/// Causal grouped-query attention of a serving step with llama.cpp's f16 KV cache: `q`
/// is `[n, heads, head_dim]`, already rounded to f16, as are the cached keys and values
/// (time-major `[len, kv_heads, head_dim]`). Returns `[n, heads · head_dim]`. Each
/// (row, head) pair is a task of its own, so even a one-token step splits over threads.
pub fn attention(q: &[f32], n: usize, heads: usize, kv_heads: usize, head_dim: usize, seqs: &[HostSeq<'_>]) -> Vec<f32> {
    let owner = row_owners(n, seqs);
    let mut out = vec![0f32; n * heads * head_dim];
    out.par_chunks_mut(head_dim).zip(q.par_chunks(head_dim)).enumerate().for_each(|(at, (out, q))| {
        let (row, h) = (at / heads, at % heads);
        let (s, i) = owner[row];
        let seq = &seqs[s];
        let shape = Shape { heads, kv_heads, head_dim };
        fast(AttentionHead { q, h, i, seq, shape, out })
    });
    out
}

simd_op!(AttentionHead<'a> { q: &'a [f32], h: usize, i: usize, seq: &'a HostSeq<'a>, shape: Shape, out: &'a mut [f32] } -> () {
    attention_head(q, h, i, seq, shape, out)
});

#[derive(Clone, Copy)]
pub(crate) struct Shape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// Head `h` of one row of [`attention`], the `i`th new row of `seq`: `q` is the head's
/// query, `out` its output.
#[inline(always)]
fn attention_head(q: &[f32], h: usize, i: usize, seq: &HostSeq<'_>, shape: Shape, out: &mut [f32]) {
    let Shape { heads, kv_heads, head_dim } = shape;
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let prompt = seq.rows.len() >= 2;
    let len = seq.k.len() / (kv_heads * head_dim);
    let visible = len - seq.rows.len() + i + 1;
    // The key/value head this query head reads.
    let g = h / group;
    let key = |j: usize| &seq.k[(j * kv_heads + g) * head_dim..][..head_dim];
    let value = |j: usize| &seq.v[(j * kv_heads + g) * head_dim..][..head_dim];
    let mut w = vec![0f32; visible];
    for (j, wj) in w.iter_mut().enumerate() {
        *wj = if prompt { dot_tinyblas(key(j), q) } else { dot_vec_f16(key(j), q) } * scale;
    }
    let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for chunk in w.chunks_mut(8) {
        let mut lanes = [0f32; 8];
        for (l, v) in chunk.iter_mut().enumerate() {
            *v = v_expf(*v - max);
            lanes[l] = *v;
        }
        sum += hsum8(&lanes) as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in w.iter_mut() {
        *v = round_f16(*v * inv);
    }
    weigh_values(&w, value, head_dim, prompt, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v_expf_is_close_to_exp_and_handles_the_extremes() {
        for i in -2000..=800 {
            let x = i as f32 * 0.1;
            let (got, want) = (v_expf(x), x.exp());
            assert!((got - want).abs() <= want * 4e-7 + f32::MIN_POSITIVE, "{x}: {got} vs {want}");
        }
        assert_eq!(v_expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(v_expf(-1000.0), 0.0);
        assert_eq!(v_expf(0.0), 1.0);
        assert!(v_expf(100.0).is_infinite());
    }

    #[test]
    fn norm_rope_and_swiglu_are_what_they_claim() {
        let x = [3.0f32, 4.0, 0.0, 0.0];
        let y = rms_norm(&x, &[1.0, 2.0, 1.0, 1.0], 0.0);
        // rms = sqrt(25 / 4) = 2.5
        assert_eq!(y, vec![1.2, 3.2, 0.0, 0.0]);
        let (cos, sin) = rope_angles(3, 4, 10_000.0);
        assert_eq!((cos[0], sin[0]), (3f32.cos(), 3f32.sin()));
        assert_eq!(cos[1], (3.0 * 10_000f32.powf(-0.5)).cos());
        let mut v = [1.0f32, 0.0, 0.0, 1.0];
        rope(&mut v, &[0], 1, 4, 10_000.0);
        assert_eq!(v, [1.0, 0.0, 0.0, 1.0]);
        let s = swiglu(&[0.0, 2.0], &[5.0, 3.0]);
        assert_eq!(s[0], 0.0);
        assert!((s[1] - 3.0 * 2.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn both_dot_orders_agree_with_a_plain_sum() {
        let x: Vec<f32> = (0..70).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..70).map(|i| (i as f32 * 0.11).cos()).collect();
        let plain: f64 = x.iter().zip(&y).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
        for got in [dot_tinyblas(&x, &y), dot_vec_f16(&x, &y)] {
            assert!((got as f64 - plain).abs() < 1e-5, "{got} vs {plain}");
        }
        // Weighing values sums each output in the same order as the dot products do.
        let values: Vec<Vec<f32>> = x.iter().map(|&a| vec![a, 2.0 * a]).collect();
        for prompt in [true, false] {
            let mut out = [0f32; 2];
            weigh_values(&y, |j| &values[j], 2, prompt, &mut out);
            let expect = if prompt { dot_tinyblas(&x, &y) } else { dot_vec_f16(&x, &y) };
            assert_eq!(out[0], expect);
            assert_eq!(out[1], if prompt { dot_tinyblas(&x.iter().map(|a| 2.0 * a).collect::<Vec<_>>(), &y) } else { dot_vec_f16(&x.iter().map(|a| 2.0 * a).collect::<Vec<_>>(), &y) });
        }
    }
}
