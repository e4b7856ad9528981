//! `ledgerlake bench gradient`: the gradient method's kernels on synthetic features of
//! SmolLM2's shape at the first projection size (q, k, v, o and the MLP adapted in 30
//! layers at 16 numbers per pair: 3,360 numbers per example; 13,440 at today's 64, `--dim`):
//! the time to fit each kernel, and scoring FLOP/s (`2·m·n·d` for `m` queries against `n`
//! training rows) as a fraction of this machine's f32 GEMM measured in the same run (candle's
//! square product, and numpy's `sgemm` through OpenBLAS when a Python is given).

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use ledgerlake_attribution::gradient::{DEFAULT_DAMPING, Influence, Kernel, TrainFeatures};

#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Training examples (feature rows).
    #[arg(long, default_value_t = 20_000)]
    pub train: usize,
    /// Numbers per feature.
    #[arg(long, default_value_t = 3360)]
    pub dim: usize,
    /// Queries scored at once (one attribution pass's inferences of one adapter).
    #[arg(long, default_value_t = 512)]
    pub queries: usize,
    /// Numbers per adapted projection (DataInf's blocks).
    #[arg(long, default_value_t = ledgerlake_serving::finetune::FEATURE_PER_PAIR)]
    pub block: usize,
    /// Kernels measured, comma-separated (TRAK's fit is a Cholesky of the `dim²` Gram form,
    /// minutes at 13,440).
    #[arg(long, value_delimiter = ',', default_value = "graddot,trak,datainf")]
    pub kernels: Vec<String>,
    /// A Python with numpy for the OpenBLAS reference; empty skips it.
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: String,
}

pub fn run(opts: Options) -> Result<()> {
    let (n, d, m) = (opts.train, opts.dim, opts.queries);
    let features = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu)?;
    let ids = (0..n).map(|i| format!("{i:064x}")).collect();
    let features = TrainFeatures::new(ids, features, opts.block)?;
    let queries = Tensor::randn(0f32, 1.0, (m, d), &Device::Cpu)?;
    let gemm = crate::bench_finetune::gemm_flops()?;
    println!("f32 GEMM (candle, 1024³, best of 6): {:.1} GFLOP/s", gemm / 1e9);
    if !opts.python.is_empty() {
        let code = r#"
import numpy as np, time
a = np.random.rand(1024, 1024).astype(np.float32)
b = np.random.rand(1024, 1024).astype(np.float32)
best = 1e9
for _ in range(6):
    t = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t)
print(f"{2 * 1024**3 / best / 1e9:.1f}")
"#;
        match std::process::Command::new(&opts.python).arg("-c").arg(code).output() {
            Ok(out) if out.status.success() => {
                println!("f32 GEMM (numpy/OpenBLAS, 1024³, best of 6): {} GFLOP/s", String::from_utf8_lossy(&out.stdout).trim());
            }
            Ok(out) => println!("numpy reference failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
            Err(e) => println!("numpy reference not run: {e}"),
        }
    }
    println!("features: {n} training rows × {d} numbers (blocks of {}), {m} queries", opts.block);
    let kernels = opts.kernels.iter().map(|k| k.parse::<Kernel>()).collect::<Result<Vec<_>, _>>()?;
    for kernel in kernels {
        let started = Instant::now();
        let influence = Influence::fit(&features, kernel, DEFAULT_DAMPING).with_context(|| format!("fitting {}", kernel.name()))?;
        let fit_s = started.elapsed().as_secs_f64();
        influence.scores(&queries)?; // warm-up
        let mut best = f64::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            let s = influence.scores(&queries)?;
            s.sum_all()?.to_scalar::<f32>()?;
            best = best.min(started.elapsed().as_secs_f64());
        }
        let flops = 2.0 * m as f64 * n as f64 * d as f64 / best;
        println!(
            "{:8} fit {:>7.2} s; scoring {m} queries {:>7.1} ms = {:>6.1} GFLOP/s = {:>5.1}% of candle's GEMM ({:.3} ms per query)",
            kernel.name(),
            fit_s,
            best * 1e3,
            flops / 1e9,
            100.0 * flops / gemm,
            best * 1e3 / m as f64
        );
    }
    Ok(())
}
