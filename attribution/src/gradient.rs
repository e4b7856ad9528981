//! Gradient influence: which training examples of an adapter an output leans on, from
//! ModelFactory's projected LoRA gradients (`features.safetensors`, one row per trained
//! contribution) and the output's own feature (`docs/attribution.md`, "Gradient
//! influence").
//!
//! Every kernel is a preconditioner `K⁻¹`, and a query's scores are `q · K⁻¹ · φᵢ` for
//! every training row `φᵢ`. The preconditioned rows `P = Φ K⁻¹` are computed once per
//! adapter, so scoring any number of queries is one matrix product `Q Pᵀ` on candle's
//! GEMM:
//! - [`Kernel::GradDot`]: `K = I` (Grad-Dot, TracIn at the final checkpoint): the baseline.
//! - [`Kernel::Trak`]: `K = ΦᵀΦ + λI`, one damped kernel over all features (TRAK's
//!   `X(XᵀX+λI)⁻¹` at the same projection size). Solved in whichever of the `n×n` and
//!   `d×d` forms is smaller, with a Cholesky factor in `f64`.
//! - [`Kernel::DataInf`]: DataInf's closed form, block-diagonal by adapted projection: for
//!   a block `l` with rows `gᵢ`, `K_l⁻¹ = (1/λ_l)(I − (1/n) Σᵢ gᵢgᵢᵀ / (λ_l + |gᵢ|²))`
//!   with `λ_l = damping · mean |gᵢ|²`. The default: the best LDS of the three at the
//!   harness's default settings (`BENCHMARKS.md`).

use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::Error;

/// How the training features are preconditioned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernel {
    GradDot,
    Trak,
    DataInf,
}

impl Kernel {
    pub const ALL: [Kernel; 3] = [Kernel::GradDot, Kernel::Trak, Kernel::DataInf];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::GradDot => "graddot",
            Kernel::Trak => "trak",
            Kernel::DataInf => "datainf",
        }
    }
}

impl FromStr for Kernel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Kernel::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| Error::Invalid(format!("unknown gradient kernel {s:?}: one of graddot, trak, datainf")))
    }
}

/// The damping of [`Kernel::Trak`] and [`Kernel::DataInf`], relative to the features' own
/// scale (the mean squared row norm of a block, or of all features for TRAK's `d` form).
pub const DEFAULT_DAMPING: f64 = 0.1;

/// The training features of one adapter: row `i` is the feature of `ids[i]`.
#[derive(Clone, Debug)]
pub struct TrainFeatures {
    pub ids: Vec<String>,
    /// `[n, d]`, `f32`.
    pub matrix: Tensor,
    /// Numbers per adapted projection: DataInf's blocks.
    pub block: usize,
}

impl TrainFeatures {
    /// Checks shapes: `matrix` is `[ids.len(), d]` and `block` divides `d`.
    pub fn new(ids: Vec<String>, matrix: Tensor, block: usize) -> Result<Self, Error> {
        let (n, d) = matrix.dims2().map_err(|e| Error::Invalid(format!("features: {e}")))?;
        if n != ids.len() {
            return Err(Error::Invalid(format!("{n} feature rows for {} training examples", ids.len())));
        }
        if block == 0 || d % block != 0 {
            return Err(Error::Invalid(format!("feature width {d} is not a whole number of blocks of {block}")));
        }
        let matrix = matrix.to_dtype(DType::F32).map_err(internal)?;
        Ok(Self { ids, matrix, block })
    }

    /// ModelFactory's output in `dir`: `features.safetensors` (tensor `features`), its rows
    /// named by the lines of `contributions.txt`, its block size from `lineage.json`
    /// (`features.per_pair`).
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let path = dir.join("features.safetensors");
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?;
        let matrix = tensors
            .remove("features")
            .ok_or_else(|| Error::Corrupt(format!("{} has no tensor `features`", path.display())))?;
        let list = dir.join("contributions.txt");
        let ids: Vec<String> = std::fs::read_to_string(&list)
            .map_err(|e| Error::io(&list, e))?
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        let lineage = dir.join("lineage.json");
        let text = std::fs::read_to_string(&lineage).map_err(|e| Error::io(&lineage, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Corrupt(format!("{}: {e}", lineage.display())))?;
        let block = value["features"]["per_pair"]
            .as_u64()
            .ok_or_else(|| Error::Corrupt(format!("{} has no features.per_pair", lineage.display())))?;
        Self::new(ids, matrix, block as usize).map_err(|e| Error::Corrupt(format!("{}: {e}", dir.display())))
    }

    /// The same rows scaled to unit length (rows of zeros stay zero): each example's
    /// direction, whatever its remaining loss at the final adapter.
    pub fn normalized(&self) -> Result<Self, Error> {
        let norms = self.matrix.sqr().and_then(|t| t.sum_keepdim(1)).and_then(|t| t.sqrt()).map_err(internal)?;
        let norms = norms.maximum(f32::MIN_POSITIVE).map_err(internal)?;
        let matrix = self.matrix.broadcast_div(&norms).map_err(internal)?;
        Ok(Self { ids: self.ids.clone(), matrix, block: self.block })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.matrix.dims()[1]
    }
}

/// A kernel fitted to one adapter's training features: scores queries by one GEMM.
#[derive(Clone, Debug)]
pub struct Influence {
    pub kernel: Kernel,
    /// `P = Φ K⁻¹`, `[n, d]`.
    preconditioned: Tensor,
}

impl Influence {
    pub fn fit(features: &TrainFeatures, kernel: Kernel, damping: f64) -> Result<Self, Error> {
        if !(damping.is_finite() && damping > 0.0) {
            return Err(Error::Invalid(format!("damping must be a positive number, not {damping}")));
        }
        let phi = &features.matrix;
        let preconditioned = match kernel {
            Kernel::GradDot => phi.clone(),
            Kernel::Trak => trak(phi, damping)?,
            Kernel::DataInf => datainf(phi, features.block, damping)?,
        };
        Ok(Self { kernel, preconditioned })
    }

    /// Scores `[m, n]` of the queries `[m, d]` against every training row.
    pub fn scores(&self, queries: &Tensor) -> Result<Tensor, Error> {
        let (_, d) = queries.dims2().map_err(|e| Error::Invalid(format!("queries: {e}")))?;
        let want = self.preconditioned.dims()[1];
        if d != want {
            return Err(Error::Invalid(format!("a query feature has {d} numbers, the adapter's have {want}")));
        }
        let q = queries.to_dtype(DType::F32).map_err(internal)?;
        q.matmul(&self.preconditioned.t().map_err(internal)?).map_err(internal)
    }

    /// The scores of one query, by training row.
    pub fn score_one(&self, query: &[f32]) -> Result<Vec<f32>, Error> {
        let q = Tensor::from_slice(query, (1, query.len()), &Device::Cpu).map_err(internal)?;
        self.scores(&q)?.flatten_all().and_then(|t| t.to_vec1()).map_err(internal)
    }
}

/// TRAK's `Φ(ΦᵀΦ + λI)⁻¹ = (ΦΦᵀ + λI)⁻¹Φ`, λ = damping × the mean squared row norm
/// (the mean diagonal of the `n×n` Gram matrix).
fn trak(phi: &Tensor, damping: f64) -> Result<Tensor, Error> {
    let (n, d) = phi.dims2().map_err(internal)?;
    if n == 0 {
        return Ok(phi.clone());
    }
    let phi64 = phi.to_dtype(DType::F64).map_err(internal)?;
    let mean_sq = phi64.sqr().and_then(|t| t.sum_all()).and_then(|t| t.to_scalar::<f64>()).map_err(internal)? / n as f64;
    let lambda = (damping * mean_sq).max(f64::MIN_POSITIVE);
    if n <= d {
        // (ΦΦᵀ + λI)⁻¹ Φ
        let gram = phi64.matmul(&phi64.t().map_err(internal)?).map_err(internal)?;
        let inv = inverse_spd(&gram, lambda)?;
        inv.matmul(&phi64).and_then(|t| t.to_dtype(DType::F32)).map_err(internal)
    } else {
        // Φ (ΦᵀΦ + λI)⁻¹; the same λ in the d×d form gives the same P.
        let gram = phi64.t().and_then(|t| t.matmul(&phi64)).map_err(internal)?;
        let inv = inverse_spd(&gram, lambda)?;
        phi64.matmul(&inv).and_then(|t| t.to_dtype(DType::F32)).map_err(internal)
    }
}

/// DataInf's block-diagonal inverse applied to every row: for each block, `Φ_l K_l⁻¹`.
fn datainf(phi: &Tensor, block: usize, damping: f64) -> Result<Tensor, Error> {
    let (n, d) = phi.dims2().map_err(internal)?;
    if n == 0 {
        return Ok(phi.clone());
    }
    let mut parts = Vec::with_capacity(d / block);
    for start in (0..d).step_by(block) {
        let g = phi.narrow(1, start, block).and_then(|t| t.to_dtype(DType::F64)).map_err(internal)?;
        let norms = g.sqr().and_then(|t| t.sum_keepdim(1)).map_err(internal)?; // [n, 1]
        let mean = norms.mean_all().and_then(|t| t.to_scalar::<f64>()).map_err(internal)?;
        if mean <= 0.0 {
            // A block with no gradient anywhere: nothing to precondition.
            parts.push(g);
            continue;
        }
        let lambda = damping * mean;
        // Σᵢ gᵢgᵢᵀ / (λ + |gᵢ|²) = Gᵀ diag(w) G
        let w = (norms + lambda).and_then(|t| t.recip()).map_err(internal)?;
        let weighted = g.broadcast_mul(&w).map_err(internal)?;
        let outer = weighted.t().and_then(|t| t.matmul(&g)).map_err(internal)?;
        let eye = Tensor::eye(block, DType::F64, &Device::Cpu).map_err(internal)?;
        let k_inv = (eye - (outer / n as f64).map_err(internal)?).and_then(|t| t / lambda).map_err(internal)?;
        parts.push(g.matmul(&k_inv).map_err(internal)?);
    }
    Tensor::cat(&parts, 1).and_then(|t| t.to_dtype(DType::F32)).map_err(internal)
}

/// `(A + λI)⁻¹` of a symmetric positive semi-definite `A` (`f64`, `[k, k]`), by a Cholesky
/// factor `L` (row-oriented, contiguous dot products), `W = L⁻¹` by forward substitution,
/// and `WᵀW` on the GEMM.
fn inverse_spd(a: &Tensor, lambda: f64) -> Result<Tensor, Error> {
    let k = a.dims()[0];
    let mut l: Vec<f64> = a.flatten_all().and_then(|t| t.to_vec1()).map_err(internal)?;
    for i in 0..k {
        l[i * k + i] += lambda;
    }
    // In place: the lower triangle becomes L.
    for j in 0..k {
        let lj: Vec<f64> = l[j * k..j * k + j].to_vec();
        let diag = l[j * k + j] - lj.iter().map(|x| x * x).sum::<f64>();
        if diag.is_nan() || diag <= 0.0 {
            return Err(Error::Internal(format!("the damped kernel is not positive definite at row {j}")));
        }
        let ljj = diag.sqrt();
        l[j * k + j] = ljj;
        for i in j + 1..k {
            let row_i = &mut l[i * k..i * k + j + 1];
            let dot: f64 = row_i[..j].iter().zip(&lj).map(|(a, b)| a * b).sum();
            row_i[j] = (row_i[j] - dot) / ljj;
        }
    }
    // W = L⁻¹ (lower triangular), row by row: W_i = (e_i − Σ_{m<i} L_im W_m) / L_ii, each
    // term a contiguous row update.
    let mut w = vec![0f64; k * k];
    for i in 0..k {
        let (done, rest) = w.split_at_mut(i * k);
        let row = &mut rest[..k];
        row[i] = 1.0;
        for m in 0..i {
            let f = l[i * k + m];
            if f != 0.0 {
                for (x, y) in row[..=m].iter_mut().zip(&done[m * k..m * k + m + 1]) {
                    *x -= f * y;
                }
            }
        }
        let lii = l[i * k + i];
        for x in &mut row[..=i] {
            *x /= lii;
        }
    }
    let w = Tensor::from_vec(w, (k, k), &Device::Cpu).map_err(internal)?;
    w.t().and_then(|t| t.matmul(&w)).map_err(internal)
}

fn internal(e: candle_core::Error) -> Error {
    Error::Internal(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        // A small LCG: deterministic, no dependency.
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..rows * cols)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    fn features(n: usize, d: usize, block: usize) -> TrainFeatures {
        let m = Tensor::from_vec(rand_matrix(n, d, 7), (n, d), &Device::Cpu).unwrap();
        TrainFeatures::new((0..n).map(|i| format!("c{i}")).collect(), m, block).unwrap()
    }

    /// Naive reference: `q · (ΦᵀΦ + λI)⁻¹ · φᵢ` by solving `(ΦᵀΦ + λI) x = q` with
    /// Gauss-Jordan elimination in f64.
    fn trak_reference(phi: &[f32], n: usize, d: usize, q: &[f32], damping: f64) -> Vec<f64> {
        let mean_sq: f64 = phi.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / n as f64;
        let lambda = damping * mean_sq;
        let mut a = vec![0f64; d * (d + 1)];
        for r in 0..d {
            for c in 0..d {
                a[r * (d + 1) + c] = (0..n).map(|i| phi[i * d + r] as f64 * phi[i * d + c] as f64).sum::<f64>() + if r == c { lambda } else { 0.0 };
            }
            a[r * (d + 1) + d] = q[r] as f64;
        }
        for col in 0..d {
            let p = a[col * (d + 1) + col];
            for c in 0..=d {
                a[col * (d + 1) + c] /= p;
            }
            for r in 0..d {
                if r != col {
                    let f = a[r * (d + 1) + col];
                    for c in 0..=d {
                        a[r * (d + 1) + c] -= f * a[col * (d + 1) + c];
                    }
                }
            }
        }
        let x: Vec<f64> = (0..d).map(|r| a[r * (d + 1) + d]).collect();
        (0..n).map(|i| (0..d).map(|c| x[c] * phi[i * d + c] as f64).sum()).collect()
    }

    fn close(got: &[f32], want: &[f64]) {
        let scale = want.iter().map(|x| x.abs()).fold(0.0, f64::max).max(1e-12);
        for (g, w) in got.iter().zip(want) {
            assert!(((*g as f64) - w).abs() / scale < 1e-4, "got {g}, want {w}");
        }
    }

    #[test]
    fn trak_matches_a_direct_solve_in_both_forms() {
        // n < d (the n×n form) and n > d (the d×d form).
        for (n, d) in [(12, 32), (40, 16)] {
            let f = features(n, d, 16);
            let q = rand_matrix(1, d, 99);
            let got = Influence::fit(&f, Kernel::Trak, 0.1).unwrap().score_one(&q).unwrap();
            let phi: Vec<f32> = f.matrix.flatten_all().unwrap().to_vec1().unwrap();
            close(&got, &trak_reference(&phi, n, d, &q, 0.1));
        }
    }

    #[test]
    fn datainf_matches_its_per_block_sherman_morrison_sum() {
        let (n, d, block) = (20, 32, 16);
        let f = features(n, d, block);
        let phi: Vec<f32> = f.matrix.flatten_all().unwrap().to_vec1().unwrap();
        let q = rand_matrix(1, d, 5);
        let got = Influence::fit(&f, Kernel::DataInf, 0.1).unwrap().score_one(&q).unwrap();
        let mut want = vec![0f64; n];
        for b in (0..d).step_by(block) {
            let g = |i: usize| -> Vec<f64> { (b..b + block).map(|c| phi[i * d + c] as f64).collect() };
            let v: Vec<f64> = (b..b + block).map(|c| q[c] as f64).collect();
            let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
            let lambda = 0.1 * (0..n).map(|i| dot(&g(i), &g(i))).sum::<f64>() / n as f64;
            for (k, slot) in want.iter_mut().enumerate() {
                let gk = g(k);
                let mut s = dot(&v, &gk);
                for i in 0..n {
                    let gi = g(i);
                    s -= dot(&v, &gi) * dot(&gi, &gk) / (lambda + dot(&gi, &gi)) / n as f64;
                }
                *slot += s / lambda;
            }
        }
        close(&got, &want);
    }

    #[test]
    fn graddot_is_the_plain_dot_product() {
        let f = features(5, 16, 16);
        let q = rand_matrix(1, 16, 3);
        let got = Influence::fit(&f, Kernel::GradDot, 0.1).unwrap().score_one(&q).unwrap();
        let phi: Vec<f32> = f.matrix.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f64> = (0..5).map(|i| (0..16).map(|c| q[c] as f64 * phi[i * 16 + c] as f64).sum()).collect();
        close(&got, &want);
    }

    #[test]
    fn normalized_rows_have_unit_length_and_zero_rows_stay_zero() {
        let mut data = rand_matrix(3, 16, 11);
        data[16..32].fill(0.0);
        let m = Tensor::from_vec(data, (3, 16), &Device::Cpu).unwrap();
        let f = TrainFeatures::new(vec!["a".into(), "b".into(), "c".into()], m, 16).unwrap().normalized().unwrap();
        let norms: Vec<f32> = f.matrix.sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
        assert!((norms[0] - 1.0).abs() < 1e-5 && norms[1] == 0.0 && (norms[2] - 1.0).abs() < 1e-5, "{norms:?}");
    }

    #[test]
    fn bad_shapes_and_damping_are_refused() {
        let m = Tensor::zeros((3, 16), DType::F32, &Device::Cpu).unwrap();
        assert!(TrainFeatures::new(vec!["a".into(), "b".into()], m.clone(), 16).is_err());
        assert!(TrainFeatures::new(vec!["a".into(), "b".into(), "c".into()], m.clone(), 5).is_err());
        let f = TrainFeatures::new(vec!["a".into(), "b".into(), "c".into()], m, 16).unwrap();
        assert!(Influence::fit(&f, Kernel::Trak, 0.0).is_err());
        let inf = Influence::fit(&f, Kernel::DataInf, 0.1).unwrap();
        assert!(inf.score_one(&[0.0; 8]).is_err());
        // All-zero features: DataInf leaves them as they are, scores are zero.
        assert_eq!(inf.score_one(&[1.0; 16]).unwrap(), vec![0.0; 3]);
        assert!("nope".parse::<Kernel>().is_err());
        assert_eq!("datainf".parse::<Kernel>().unwrap(), Kernel::DataInf);
    }
}
