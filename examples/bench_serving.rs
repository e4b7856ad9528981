//! `ledgerlake bench serving` as a small program of its own: the same source
//! (`src/bench_serving.rs`) without the lakehouse, SQL and HTTP stacks, so a build with
//! `--features cuda` is small enough to carry to a GPU host that has no Rust toolchain
//! (see BENCHMARKS.md). Arguments are those of `ledgerlake bench serving`.

#[path = "../src/bench_serving.rs"]
mod bench_serving;

use clap::Parser;

#[derive(Parser)]
#[command(name = "bench_serving", about = "The serving benchmark of `ledgerlake bench serving`")]
struct Cli {
    #[command(flatten)]
    options: bench_serving::Options,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    bench_serving::run(Cli::parse().options, || std::path::PathBuf::from("models/ledgerlake-base")).await
}
