//! Quantized matrix products on the CPU for GGML's block formats, computed the way
//! llama.cpp's CPU backend computes them, so a GGUF model gives llama.cpp's numbers:
//!
//! - activations are quantized per block of 32 to 8 bits (`Q8_1` for `Q4_1` weights, with
//!   the block's sum; `Q8_0` for `Q8_0` weights): `d = max|x| / 127`, `q = round(x · 127 /
//!   max|x|)` with ties to even, `d` (and `s = d · Σq`) stored as f16;
//! - a dot product multiplies 4-bit or 8-bit weights by the 8-bit activations in integers,
//!   four products at a time into eight lanes, scales each block's lanes by `d_w · d_x`
//!   with a fused multiply-add into eight f32 accumulators, and sums the lanes in
//!   llama.cpp's order (`Q4_1` adds `Σ m_w · s_x` at the end).
//!
//! Each kernel has a scalar version, which is the reference, and an AVX2+FMA version
//! chosen at run time (`pulp`, no `unsafe`) that gives bit-identical results; the tests
//! check both. Weights stay in the file's blocks (`Q4_1`: 20 bytes per 32 values).

use std::sync::OnceLock;

use rayon::prelude::*;

/// Values per block in every supported format.
pub const BLOCK: usize = 32;

/// A supported block format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `d: f16, m: f16, 16 bytes of nibbles`: `x = d · q + m`, `q` in 0..16. Element `j`
    /// is the low nibble of byte `j`, element `j + 16` its high nibble.
    Q4_1,
    /// `d: f16, 32 × i8`: `x = d · q`.
    Q8_0,
}

impl Format {
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// A `[rows, cols]` matrix in a block format, each row `cols / 32` blocks.
#[derive(Clone, Debug)]
pub struct QMatrix {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    data: Vec<u8>,
}

/// A block of 8-bit activations. `d` and `s` hold f16 values (widened), as llama.cpp
/// stores them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Q8Block {
    pub d: f32,
    /// `d · Σq` (used by `Q4_1`).
    pub s: f32,
    pub qs: [i8; BLOCK],
}

/// f16 bits to f32, through a table built once (what llama.cpp's CPU backend does
/// without F16C in the inner loop).
fn f16_table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(|b| half::f16::from_bits(b).to_f32()).collect())
}

#[inline(always)]
fn f16_at(table: &[f32], bytes: &[u8], at: usize) -> f32 {
    table[u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize]
}

fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// llama.cpp's `hsum_float_8`: `(l0+l4 + l2+l6) + (l1+l5 + l3+l7)`.
#[inline(always)]
fn hsum8(l: [f32; 8]) -> f32 {
    let r = [l[4] + l[0], l[5] + l[1], l[6] + l[2], l[7] + l[3]];
    let t = [r[0] + r[2], r[1] + r[3]];
    t[0] + t[1]
}

impl QMatrix {
    /// Raw blocks as a GGUF file stores them; `cols` must be a multiple of 32.
    pub fn new(format: Format, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        if cols % BLOCK != 0 {
            return Err(format!("{cols} columns is not a multiple of the block size {BLOCK}"));
        }
        let want = rows.checked_mul(cols / BLOCK).and_then(|b| b.checked_mul(format.block_bytes()));
        if want != Some(data.len()) {
            return Err(format!("{} bytes for a [{rows}, {cols}] {format:?} matrix", data.len()));
        }
        Ok(Self { format, rows, cols, data })
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }

    #[inline(always)]
    fn row_data(&self, r: usize) -> &[u8] {
        let w = self.row_bytes();
        &self.data[r * w..(r + 1) * w]
    }

    /// Row `r` in f32 (an embedding lookup); `None` past the last row.
    pub fn dequantize_row(&self, r: usize) -> Option<Vec<f32>> {
        if r >= self.rows {
            return None;
        }
        let table = f16_table();
        let mut out = Vec::with_capacity(self.cols);
        for b in self.row_data(r).chunks_exact(self.format.block_bytes()) {
            let d = f16_at(table, b, 0);
            match self.format {
                Format::Q8_0 => out.extend(b[2..].iter().map(|&q| q as i8 as f32 * d)),
                Format::Q4_1 => {
                    let m = f16_at(table, b, 2);
                    let qs = &b[4..];
                    out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                    out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
                }
            }
        }
        Some(out)
    }

    /// The whole matrix in f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_rows(0..self.rows)
    }

    /// Rows `rows` in f32, row-major, dequantized in parallel (a stripe of a frozen
    /// weight for a training product); rows past the end are left out.
    pub fn dequantize_rows(&self, rows: std::ops::Range<usize>) -> Vec<f32> {
        let rows = rows.start.min(self.rows)..rows.end.min(self.rows);
        let mut out = vec![0f32; rows.len() * self.cols];
        out.par_chunks_mut(self.cols.max(1)).zip(rows.into_par_iter()).for_each(|(dst, r)| {
            if let Some(row) = self.dequantize_row(r) {
                dst.copy_from_slice(&row);
            }
        });
        out
    }

    /// `x Wᵀ` for `n` rows `x` (`[n, cols]`, row-major): `[n, rows]`.
    pub fn matmul(&self, x: &[f32], n: usize) -> Result<Vec<f32>, String> {
        let mut out = Self::matmul_many(&[self], x, n)?;
        out.pop().ok_or_else(|| "no product".to_string())
    }

    /// `x Wᵀ` for each `W` of `matrices` (all with the same columns): the inputs are
    /// quantized once and every matrix's rows are shared out to the threads in one
    /// parallel loop (the query, key and value projections of a layer, say).
    pub fn matmul_many(matrices: &[&QMatrix], x: &[f32], n: usize) -> Result<Vec<Vec<f32>>, String> {
        let Some(cols) = matrices.first().map(|m| m.cols) else {
            return Ok(Vec::new());
        };
        if let Some(m) = matrices.iter().find(|m| m.cols != cols) {
            return Err(format!("a [{}, {}] matrix among matrices of {cols} columns", m.rows, m.cols));
        }
        if x.len() != n * cols {
            return Err(format!("{} inputs for {n} rows of {cols}", x.len()));
        }
        let acts = Activations::new(x, cols, n);
        // Each task takes a stripe of a matrix's rows and every input row, so a weight
        // row is read from memory once per step however many sequences the step has. The
        // stripe's results are written transposed (`[rows, n]`, contiguous per stripe) and
        // turned into `[n, rows]` at the end.
        const STRIPE: usize = 16;
        let mut outs: Vec<Vec<f32>> = matrices.iter().map(|m| vec![0f32; m.rows * n]).collect();
        let tasks: Vec<(&QMatrix, usize, &mut [f32])> = matrices
            .iter()
            .zip(outs.iter_mut())
            .flat_map(|(m, out)| out.chunks_mut(STRIPE * n.max(1)).enumerate().map(move |(s, part)| (*m, s * STRIPE, part)))
            .collect();
        tasks.into_par_iter().for_each(|(matrix, start, part)| {
            let rows = start..start + part.len() / n.max(1);
            #[cfg(target_arch = "x86_64")]
            if let Some(simd) = pulp::x86::V3::try_new() {
                let op = x86::Stripe { simd, table: f16_table(), matrix, rows, acts: &acts, part };
                return pulp::Simd::vectorize(simd, op);
            }
            for (k, r) in rows.enumerate() {
                for (i, a) in acts.rows.iter().enumerate() {
                    part[k * n + i] = dot_scalar(matrix.format, matrix.row_data(r), a);
                }
            }
        });
        if n > 1 {
            for (m, out) in matrices.iter().zip(outs.iter_mut()) {
                let mut t = vec![0f32; out.len()];
                for (r, row) in out.chunks_exact(n).enumerate() {
                    for (i, &v) in row.iter().enumerate() {
                        t[i * m.rows + r] = v;
                    }
                }
                *out = t;
            }
        }
        Ok(outs)
    }
}

/// The quantized input rows of a product: each row's blocks, and the rows in groups of
/// eight interleaved block by block for the eight-row kernel.
struct Activations {
    rows: Vec<Vec<Q8Block>>,
    /// `groups[g][i]`: block `i` of rows `8g..8g + 8`.
    groups: Vec<Vec<Group8>>,
}

/// Block `i` of eight activation rows: their values, scales and sums side by side, so the
/// kernel loads each row's scale and sum as one lane of a vector.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Group8 {
    qs: [[i8; BLOCK]; 8],
    d: [f32; 8],
    s: [f32; 8],
}

impl Activations {
    fn new(x: &[f32], cols: usize, n: usize) -> Self {
        // The sums are what `Q4_1` needs; `Q8_0` ignores them (the values and scales are
        // the same either way).
        let rows: Vec<Vec<Q8Block>> = if n >= 8 {
            x.par_chunks(cols).map(|row| crate::llamacpp::fast(Quantize { row, with_sum: true })).collect()
        } else {
            x.chunks(cols).map(|row| crate::llamacpp::fast(Quantize { row, with_sum: true })).collect()
        };
        let groups = rows
            .chunks_exact(8)
            .map(|eight| {
                (0..cols / BLOCK)
                    .map(|i| {
                        let mut g = Group8 { qs: [[0; BLOCK]; 8], d: [0.0; 8], s: [0.0; 8] };
                        for (j, row) in eight.iter().enumerate() {
                            g.qs[j] = row[i].qs;
                            g.d[j] = row[i].d;
                            g.s[j] = row[i].s;
                        }
                        g
                    })
                    .collect()
            })
            .collect();
        Self { rows, groups }
    }
}

crate::llamacpp::simd_op!(Quantize<'a> { row: &'a [f32], with_sum: bool } -> Vec<Q8Block> {
    quantize_row(row, with_sum)
});

/// One row of activations as 8-bit blocks (with the sums when `with_sum`).
#[inline(always)]
pub fn quantize_row(x: &[f32], with_sum: bool) -> Vec<Q8Block> {
    x.chunks_exact(BLOCK)
        .map(|c| {
            let amax = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut qs = [0i8; BLOCK];
            let mut sum = 0i32;
            for (q, &v) in qs.iter_mut().zip(c) {
                // |v · id| ≤ 127 up to rounding, so the cast does not saturate.
                *q = round_ties_even(v * id) as i8;
                sum += *q as i32;
            }
            let s = if with_sum { round_f16(d * sum as f32) } else { 0.0 };
            Q8Block { d: round_f16(d), s, qs }
        })
        .collect()
}

/// `x` rounded to the nearest integer, ties to even, for `|x| < 2^22`: adding and
/// subtracting `1.5 · 2^23` leaves no fraction bits, so the addition rounds in the default
/// mode (nearest, ties to even). `f32::round_ties_even` compiled to a call into a
/// software `rint` here, 6 % of a batched step.
#[inline(always)]
fn round_ties_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// The dot product of one weight row with one row of activations.
pub fn dot(format: Format, w: &[u8], a: &[Q8Block]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        return match format {
            Format::Q4_1 => simd.vectorize(|| x86::dot_q4_1(simd, f16_table(), w, a)),
            Format::Q8_0 => simd.vectorize(|| x86::dot_q8_0(simd, f16_table(), w, a)),
        };
    }
    dot_scalar(format, w, a)
}

/// The scalar reference of [`dot`] (same lanes, same order, same fused multiply-adds).
pub fn dot_scalar(format: Format, w: &[u8], a: &[Q8Block]) -> f32 {
    let table = f16_table();
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (b, y) in w.chunks_exact(format.block_bytes()).zip(a) {
        let d0 = f16_at(table, b, 0);
        let mut q = [0i32; BLOCK];
        match format {
            Format::Q4_1 => {
                summs += f16_at(table, b, 2) * y.s;
                for j in 0..16 {
                    q[j] = (b[4 + j] & 0x0f) as i32;
                    q[j + 16] = (b[4 + j] >> 4) as i32;
                }
            }
            Format::Q8_0 => {
                for j in 0..BLOCK {
                    q[j] = b[2 + j] as i8 as i32;
                }
            }
        }
        let dd = d0 * y.d;
        for (lane, acc) in acc.iter_mut().enumerate() {
            let xy: i32 = (4 * lane..4 * lane + 4).map(|e| q[e] * y.qs[e] as i32).sum();
            *acc = dd.mul_add(xy as f32, *acc);
        }
    }
    hsum8(acc) + summs
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::{__m128, __m128i, __m256, __m256i};

    use pulp::x86::V3;

    use super::{BLOCK, Group8, Q8Block, f16_at};

    #[inline(always)]
    fn hsum(simd: V3, x: __m256) -> f32 {
        let res: __m128 = simd.avx._mm256_extractf128_ps::<1>(x);
        let res = simd.sse._mm_add_ps(res, simd.avx._mm256_castps256_ps128(x));
        let res = simd.sse._mm_add_ps(res, simd.sse._mm_movehl_ps(res, res));
        let res = simd.sse._mm_add_ss(res, simd.sse3._mm_movehdup_ps(res));
        simd.sse._mm_cvtss_f32(res)
    }

    #[inline(always)]
    pub fn dot_q4_1(simd: V3, table: &[f32], w: &[u8], a: &[Q8Block]) -> f32 {
        let mut acc = simd.avx._mm256_setzero_ps();
        let mut summs = 0f32;
        for (b, y) in w.chunks_exact(20).zip(a) {
            let d0 = f16_at(table, b, 0);
            summs += f16_at(table, b, 2) * y.s;
            let dd = simd.avx._mm256_set1_ps(d0 * y.d);
            let qx = unpack_q4_1(simd, b);
            let qy: __m256i = pulp::cast(y.qs);
            let xy = lane_sums(simd, qx, qy);
            acc = simd.fma._mm256_fmadd_ps(dd, xy, acc);
        }
        hsum(simd, acc) + summs
    }

    /// A `Q4_1` block's 32 weights as bytes: element `j` is the low nibble of byte `j`,
    /// element `j + 16` its high nibble.
    #[inline(always)]
    fn unpack_q4_1(simd: V3, block: &[u8]) -> __m256i {
        let mut nibbles = [0u8; 16];
        nibbles.copy_from_slice(&block[4..20]);
        let packed: __m128i = pulp::cast(nibbles);
        let high = simd.sse2._mm_srli_epi16::<4>(packed);
        simd.avx2._mm256_and_si256(simd.avx._mm256_set_m128i(high, packed), simd.avx._mm256_set1_epi8(0x0f))
    }

    /// Unsigned bytes `u` times signed bytes `s`, four products summed per lane in
    /// integers, the eight lanes as f32 (llama.cpp's `mul_sum_us8_pairs_float`).
    #[inline(always)]
    fn lane_sums(simd: V3, u: __m256i, s: __m256i) -> __m256 {
        let pairs = simd.avx2._mm256_maddubs_epi16(u, s);
        simd.avx._mm256_cvtepi32_ps(simd.avx2._mm256_madd_epi16(simd.avx._mm256_set1_epi16(1), pairs))
    }

    /// The f16 values at `at` of four blocks, as one vector.
    #[inline(always)]
    fn f16x4(simd: V3, table: &[f32], b: [&[u8]; 4], at: usize) -> __m128 {
        simd.sse._mm_setr_ps(f16_at(table, b[0], at), f16_at(table, b[1], at), f16_at(table, b[2], at), f16_at(table, b[3], at))
    }

    /// [`dot_q4_1`] of four weight rows against one row of activations: the
    /// activations are loaded once per block, the four `d_w · d_x` and `m_w · s_x` are
    /// one vector multiply each, and the four rows' chains of multiply-adds interleave.
    /// Each row's lanes and sums are what [`dot_q4_1`] computes alone.
    #[inline(always)]
    pub fn dot_rows4_q4_1(simd: V3, table: &[f32], w: [&[u8]; 4], a: &[Q8Block]) -> [f32; 4] {
        let mut acc = [simd.avx._mm256_setzero_ps(); 4];
        let mut summs = simd.sse._mm_setzero_ps();
        for (i, y) in a.iter().enumerate() {
            let b: [&[u8]; 4] = std::array::from_fn(|r| &w[r][i * 20..(i + 1) * 20]);
            let m = f16x4(simd, table, b, 2);
            summs = simd.sse._mm_add_ps(summs, simd.sse._mm_mul_ps(m, simd.sse._mm_set1_ps(y.s)));
            let dd: [f32; 4] = pulp::cast(simd.sse._mm_mul_ps(f16x4(simd, table, b, 0), simd.sse._mm_set1_ps(y.d)));
            let qy: __m256i = pulp::cast(y.qs);
            for r in 0..4 {
                let qx = unpack_q4_1(simd, b[r]);
                let xy = lane_sums(simd, qx, qy);
                acc[r] = simd.fma._mm256_fmadd_ps(simd.avx._mm256_broadcast_ss(&dd[r]), xy, acc[r]);
            }
        }
        let summs: [f32; 4] = pulp::cast(summs);
        std::array::from_fn(|r| hsum(simd, acc[r]) + summs[r])
    }

    /// [`dot_q8_0`] of four weight rows against one row of activations.
    #[inline(always)]
    pub fn dot_rows4_q8_0(simd: V3, table: &[f32], w: [&[u8]; 4], a: &[Q8Block]) -> [f32; 4] {
        let mut acc = [simd.avx._mm256_setzero_ps(); 4];
        for (i, y) in a.iter().enumerate() {
            let b: [&[u8]; 4] = std::array::from_fn(|r| &w[r][i * 34..(i + 1) * 34]);
            let dd: [f32; 4] = pulp::cast(simd.sse._mm_mul_ps(f16x4(simd, table, b, 0), simd.sse._mm_set1_ps(y.d)));
            let qy: __m256i = pulp::cast(y.qs);
            for r in 0..4 {
                let mut bytes = [0u8; BLOCK];
                bytes.copy_from_slice(&b[r][2..34]);
                let qx: __m256i = pulp::cast(bytes);
                let xy = lane_sums(simd, simd.avx2._mm256_abs_epi8(qx), simd.avx2._mm256_sign_epi8(qy, qx));
                acc[r] = simd.fma._mm256_fmadd_ps(simd.avx._mm256_broadcast_ss(&dd[r]), xy, acc[r]);
            }
        }
        std::array::from_fn(|r| hsum(simd, acc[r]))
    }

    /// [`dot_q4_1`] of one weight row against eight rows of activations: the nibbles
    /// are unpacked once per block, the eight `d_w · d_x` and `m_w · s_x` are one vector
    /// multiply each; every row's lanes and sums are what [`dot_q4_1`] computes alone.
    #[inline(always)]
    pub fn dot8_q4_1(simd: V3, table: &[f32], w: &[u8], g: &[Group8]) -> [f32; 8] {
        let mut acc = [simd.avx._mm256_setzero_ps(); 8];
        let mut summs = simd.avx._mm256_setzero_ps();
        for (b, y) in w.chunks_exact(20).zip(g) {
            let d0 = simd.avx._mm256_set1_ps(f16_at(table, b, 0));
            let m = simd.avx._mm256_set1_ps(f16_at(table, b, 2));
            summs = simd.avx._mm256_add_ps(summs, simd.avx._mm256_mul_ps(m, pulp::cast(y.s)));
            let dd: [f32; 8] = pulp::cast(simd.avx._mm256_mul_ps(d0, pulp::cast(y.d)));
            let qx = unpack_q4_1(simd, b);
            for j in 0..8 {
                let xy = lane_sums(simd, qx, pulp::cast(y.qs[j]));
                acc[j] = simd.fma._mm256_fmadd_ps(simd.avx._mm256_broadcast_ss(&dd[j]), xy, acc[j]);
            }
        }
        let summs: [f32; 8] = pulp::cast(summs);
        std::array::from_fn(|j| hsum(simd, acc[j]) + summs[j])
    }

    /// [`dot_q8_0`] of one weight row against eight rows of activations.
    #[inline(always)]
    pub fn dot8_q8_0(simd: V3, table: &[f32], w: &[u8], g: &[Group8]) -> [f32; 8] {
        let mut acc = [simd.avx._mm256_setzero_ps(); 8];
        for (b, y) in w.chunks_exact(34).zip(g) {
            let d0 = simd.avx._mm256_set1_ps(f16_at(table, b, 0));
            let dd: [f32; 8] = pulp::cast(simd.avx._mm256_mul_ps(d0, pulp::cast(y.d)));
            let mut bytes = [0u8; BLOCK];
            bytes.copy_from_slice(&b[2..34]);
            let qx: __m256i = pulp::cast(bytes);
            let ax = simd.avx2._mm256_abs_epi8(qx);
            for j in 0..8 {
                let xy = lane_sums(simd, ax, simd.avx2._mm256_sign_epi8(pulp::cast(y.qs[j]), qx));
                acc[j] = simd.fma._mm256_fmadd_ps(simd.avx._mm256_broadcast_ss(&dd[j]), xy, acc[j]);
            }
        }
        std::array::from_fn(|j| hsum(simd, acc[j]))
    }

    /// One stripe of weight rows against every input row: eight input rows at a time,
    /// then each remaining input against four weight rows at a time. `part` is
    /// `[rows, n]`.
    pub struct Stripe<'a> {
        pub simd: V3,
        pub table: &'a [f32],
        pub matrix: &'a super::QMatrix,
        pub rows: std::ops::Range<usize>,
        pub acts: &'a super::Activations,
        pub part: &'a mut [f32],
    }

    impl pulp::WithSimd for Stripe<'_> {
        type Output = ();

        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            let Stripe { simd, table, matrix, rows, acts, part } = self;
            let n = acts.rows.len();
            let q4 = matrix.format == super::Format::Q4_1;
            for (gi, group) in acts.groups.iter().enumerate() {
                for (k, r) in rows.clone().enumerate() {
                    let w = matrix.row_data(r);
                    let got = if q4 { dot8_q4_1(simd, table, w, group) } else { dot8_q8_0(simd, table, w, group) };
                    part[k * n + 8 * gi..][..8].copy_from_slice(&got);
                }
            }
            // The inputs left over from the groups of eight, one at a time, against four
            // weight rows at a time.
            let whole = rows.start + (rows.len() / 4) * 4;
            for (i, a) in acts.rows.iter().enumerate().skip(8 * acts.groups.len()) {
                for r in (rows.start..whole).step_by(4) {
                    let w = std::array::from_fn(|j| matrix.row_data(r + j));
                    let got = if q4 { dot_rows4_q4_1(simd, table, w, a) } else { dot_rows4_q8_0(simd, table, w, a) };
                    for (j, v) in got.into_iter().enumerate() {
                        part[(r - rows.start + j) * n + i] = v;
                    }
                }
                for r in whole..rows.end {
                    let w = matrix.row_data(r);
                    part[(r - rows.start) * n + i] = if q4 { dot_q4_1(simd, table, w, a) } else { dot_q8_0(simd, table, w, a) };
                }
            }
        }
    }

    #[inline(always)]
    pub fn dot_q8_0(simd: V3, table: &[f32], w: &[u8], a: &[Q8Block]) -> f32 {
        let mut acc = simd.avx._mm256_setzero_ps();
        for (b, y) in w.chunks_exact(34).zip(a) {
            let dd = simd.avx._mm256_set1_ps(f16_at(table, b, 0) * y.d);
            let mut bytes = [0u8; BLOCK];
            bytes.copy_from_slice(&b[2..34]);
            let qx: __m256i = pulp::cast(bytes);
            let qy: __m256i = pulp::cast(y.qs);
            // |x| times y with x's sign: maddubs needs an unsigned left side.
            let xy = lane_sums(simd, simd.avx2._mm256_abs_epi8(qx), simd.avx2._mm256_sign_epi8(qy, qx));
            acc = simd.fma._mm256_fmadd_ps(dd, xy, acc);
        }
        hsum(simd, acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_matrix(format: Format, rows: usize, cols: usize, seed: u64) -> QMatrix {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut data = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = half::f16::from_f32(rng.random_range(0.001f32..0.05)).to_bits().to_le_bytes();
            data.extend_from_slice(&d);
            match format {
                Format::Q4_1 => {
                    data.extend_from_slice(&half::f16::from_f32(rng.random_range(-0.2f32..0.0)).to_bits().to_le_bytes());
                    data.extend((0..16).map(|_| rng.random::<u8>()));
                }
                Format::Q8_0 => data.extend((0..32).map(|_| rng.random_range(-127i8..=127) as u8)),
            }
        }
        QMatrix::new(format, rows, cols, data).unwrap()
    }

    #[test]
    fn simd_dots_equal_the_scalar_reference_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for format in [Format::Q4_1, Format::Q8_0] {
            let m = random_matrix(format, 19, 576, 9);
            for _ in 0..20 {
                let x: Vec<f32> = (0..576).map(|_| rng.random_range(-3.0f32..3.0)).collect();
                let a = quantize_row(&x, format == Format::Q4_1);
                for r in 0..m.rows {
                    assert_eq!(dot(format, m.row_data(r), &a).to_bits(), dot_scalar(format, m.row_data(r), &a).to_bits());
                }
            }
            // A matmul of 13 input rows (eight at a time, then five one by one against
            // four weight rows at a time and the last weight rows alone) gives the same
            // bits.
            let n = 13;
            let x: Vec<f32> = (0..n * 576).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let got = m.matmul(&x, n).unwrap();
            for i in 0..n {
                let a = quantize_row(&x[i * 576..(i + 1) * 576], format == Format::Q4_1);
                for r in 0..m.rows {
                    assert_eq!(got[i * m.rows + r].to_bits(), dot_scalar(format, m.row_data(r), &a).to_bits(), "{format:?} input {i} row {r}");
                }
            }
        }
    }

    #[test]
    fn one_product_of_many_matrices_equals_each_alone() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let (a, b) = (random_matrix(Format::Q4_1, 40, 64, 2), random_matrix(Format::Q8_0, 17, 64, 3));
        for n in [1, 9] {
            let x: Vec<f32> = (0..n * 64).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let both = QMatrix::matmul_many(&[&a, &b], &x, n).unwrap();
            assert_eq!(both, vec![a.matmul(&x, n).unwrap(), b.matmul(&x, n).unwrap()]);
        }
        let wide = random_matrix(Format::Q8_0, 2, 96, 4);
        assert!(QMatrix::matmul_many(&[&a, &wide], &[0.0; 64], 1).unwrap_err().contains("96"));
        assert!(QMatrix::matmul_many(&[], &[], 0).unwrap().is_empty());
    }

    #[test]
    fn quantized_products_are_close_to_f32_products() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        for format in [Format::Q4_1, Format::Q8_0] {
            let (rows, cols, n) = (37, 256, 5);
            let m = random_matrix(format, rows, cols, 1);
            let w = m.dequantize();
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let got = m.matmul(&x, n).unwrap();
            for i in 0..n {
                for r in 0..rows {
                    let exact: f32 = (0..cols).map(|c| x[i * cols + c] * w[r * cols + c]).sum();
                    let scale: f32 = (0..cols).map(|c| (x[i * cols + c] * w[r * cols + c]).abs()).sum();
                    // 8-bit activations: each product is off by at most half a step of
                    // the block's activation scale, about 0.4 % of the largest input.
                    assert!((got[i * rows + r] - exact).abs() <= 0.01 * scale, "{format:?} row {r}: {} vs {exact}", got[i * rows + r]);
                }
            }
            assert!(m.matmul(&x[1..], n).is_err());
        }
        assert!(QMatrix::new(Format::Q8_0, 2, 33, vec![]).is_err());
        assert!(QMatrix::new(Format::Q8_0, 2, 32, vec![0; 67]).is_err());
    }

    #[test]
    fn the_rounding_trick_equals_round_ties_even() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let halves = (-300..=300).map(|i| i as f32 * 0.5);
        let random = (0..100_000).map(|_| rng.random_range(-200.0f32..200.0));
        for x in halves.chain(random).chain([0.0, -0.0, 127.0, -127.0, 126.5, -126.5]) {
            assert_eq!(round_ties_even(x), x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn activations_round_half_to_even_and_keep_f16_scales() {
        let mut x = [0f32; BLOCK];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -3.5;
        x[3] = 0.5;
        let b = quantize_row(&x, true)[0];
        assert_eq!(&b.qs[..4], &[127, 2, -4, 0]);
        assert_eq!(b.d, 1.0);
        assert_eq!(b.s, 125.0);
        let zero = quantize_row(&[0.0; BLOCK], false)[0];
        assert_eq!((zero.d, zero.qs), (0.0, [0; BLOCK]));
    }
}
