//! `ledgerlake bench ingest`: sustained events/s with durable acknowledgement through the
//! real HTTP API, at several client counts, beside two references measured in the same run:
//! plain Parquet writing of the same rows (the ceiling) and the Python `deltalake` package
//! appending the same batches.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arrow::record_batch::RecordBatch;
use chrono::Utc;
use ledgerlake_ingest::demo::Workload;
use ledgerlake_ingest::{ApiKeys, Ingestor, WriterConfig, http};
use ledgerlake_lakehouse::events::{self, Event, EventKind};
use ledgerlake_lakehouse::{Lake, LakeConfig};

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Ingest throughput and ack latency, beside plain Parquet and Python deltalake.
    Ingest {
        /// Events generated for each client-count run (a run stops when they are all sent
        /// or after --seconds).
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Longest duration of one client-count run, in seconds.
        #[arg(long, default_value_t = 15.0)]
        seconds: f64,
        /// Concurrent clients, comma-separated.
        #[arg(long, default_value = "1,16,256", value_delimiter = ',')]
        clients: Vec<usize>,
        /// Events per request.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Python with the `deltalake` package for the reference (default: .venv/bin/python).
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// Time to load a table as commits pile up (checkpoints every 100 commits), beside
    /// the Python deltalake package loading the same table.
    TableLoad {
        #[arg(long, default_value_t = 10_000)]
        commits: u64,
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// The serving engine on the default base model: tokens/s at batch 1/8/32, 32
    /// requests over 1/8/32 adapters, cold adapter loads, adapter switches, and 1,000
    /// registered adapters against 10.
    Serving(crate::bench_serving::Options),
    /// LoRA and QLoRA training throughput and peak memory on the built-in model and
    /// SmolLM2, beside transformers + peft on PyTorch's CPU build, and the machine's f32
    /// GEMM FLOP/s.
    Finetune(crate::bench_finetune::Options),
    /// The span index beside infini-gram on the same token ids: build speed, bytes per
    /// token, n-gram counts and maximal spans.
    Spans(crate::bench_spans::Options),
    /// Gradient influence scoring: kernel fitting and scoring FLOP/s beside this machine's
    /// f32 GEMM measured in the same run.
    Gradient(crate::bench_gradient::Options),
    /// The attribution job end to end on a real lake: 100k answers against 100k approved
    /// contributions, rows written through the ingest writer (target: under 60 s).
    Job(crate::bench_job::Options),
    /// Closing a reward epoch (1M fees, 100k contributions, 100k accounts), proof lookups
    /// over HTTP, and (with --rpc) gas per claim beside Uniswap's merkle-distributor.
    Epoch(crate::bench_epoch::Options),
    /// Flight DoGet of the inference table beside pyarrow reading its Parquet files, and
    /// five analyst queries through `ledgerlake sql` beside DuckDB on the same files.
    Sql {
        /// Rows of the inference table (the fee table gets as many).
        #[arg(long, default_value_t = 10_000_000)]
        rows: usize,
        /// Keep the generated lake here, and reuse it when it is already there.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Runs of each measurement; the best is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Memory limit of one query, in MiB (the joins of 10M rows need a few GiB).
        #[arg(long, default_value_t = 8192)]
        memory_mb: usize,
        /// Python with pyarrow and duckdb for the references (default: .venv/bin/python).
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// Dedupe index: insert rate and lookup latency as the index grows.
    Dedupe {
        /// Ids in the index at the end.
        #[arg(long, default_value_t = 100_000_000)]
        ids: u64,
        /// Ids per flush (one atomic index batch).
        #[arg(long, default_value_t = 100_000)]
        batch: u64,
    },
}

pub async fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Finetune(opts) => crate::bench_finetune::run(opts).await,
        BenchCommand::Spans(opts) => crate::bench_spans::run(opts),
        BenchCommand::Gradient(opts) => crate::bench_gradient::run(opts),
        BenchCommand::Job(opts) => crate::bench_job::run(opts).await,
        BenchCommand::Epoch(opts) => crate::bench_epoch::run(opts).await,
        BenchCommand::Serving(opts) => crate::bench_serving::run(opts, crate::serve::default_model_dir).await,
        BenchCommand::Ingest { events, seconds, clients, batch, python } => ingest(events, seconds, &clients, batch, python).await,
        BenchCommand::TableLoad { commits, python } => table_load(commits, python).await,
        BenchCommand::Sql { rows, data, runs, memory_mb, python } => crate::bench_sql::run(rows, data, runs, memory_mb, python).await,
        BenchCommand::Dedupe { ids, batch } => dedupe(ids, batch),
    }
}

struct Run {
    clients: usize,
    events: usize,
    events_per_s: f64,
    mb_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

async fn ingest(n: usize, seconds: f64, clients: &[usize], batch: usize, python: Option<PathBuf>) -> Result<()> {
    // Governance events (datanets, contributions, models...) are what the high-volume
    // events refer to; they are loaded first, untimed. The timed load is inferences and fees.
    let n_all = n;
    let (setup, events): (Vec<Event>, Vec<Event>) = Workload::new(7)
        .events(n)
        .into_iter()
        .partition(|e| !matches!(e.kind(), EventKind::InferenceCompleted | EventKind::FeeCharged));
    let n = events.len();
    // The setup's participant events are signed for each run's own lake (its deployment)
    // and timed now: `http_run` signs them again; here they only size the workload.
    drop(setup);
    let bodies = crate::client::ndjson_bodies(&events, batch)?;
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    println!(
        "workload: {n} inference.completed + fee.charged events, {:.0} bytes/event as NDJSON, {batch} events/request",
        bytes as f64 / n as f64
    );
    let flush = WriterConfig::default().max_delay;
    println!("flush interval {} ms; target: >= 100k events/s, p99 <= {} ms", flush.as_millis(), 2 * flush.as_millis());

    let mut runs = Vec::new();
    // Each run's lake lives until the end: its index may still be compacting in the background.
    let mut lakes = Vec::new();
    for &c in clients {
        let (r, dir) = http_run(n_all, batch, &bodies, c, seconds).await?;
        lakes.push(dir);
        println!(
            "ledgerlake HTTP, {:>3} clients: {:>9.0} events/s {:>7.1} MB/s  ack p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms  ({} events)",
            r.clients, r.events_per_s, r.mb_per_s, r.p50_ms, r.p99_ms, r.max_ms, r.events
        );
        runs.push(r);
    }

    let by_kind = batches_by_kind(&events)?;
    let parquet_rate = plain_parquet(&by_kind)?;
    println!("plain Parquet (ceiling, same rows, snappy, 50k rows/file): {parquet_rate:>9.0} events/s");
    let best = runs.iter().map(|r| r.events_per_s).fold(0.0, f64::max);
    println!("best ledgerlake / Parquet ceiling: {:.2}x of ceiling", best / parquet_rate);

    let python = python.unwrap_or_else(|| PathBuf::from(".venv/bin/python"));
    match python_deltalake(&python, &by_kind, batch, seconds) {
        Ok(lines) => {
            for line in lines {
                println!("python deltalake: {line}");
            }
        }
        Err(e) => println!("python deltalake reference not run: {e:#}"),
    }
    Ok(())
}

/// One run: `clients` tasks post the bodies in turn until all are sent or `seconds` pass.
async fn http_run(n_all: usize, batch: usize, bodies: &[Vec<u8>], clients: usize, seconds: f64) -> Result<(Run, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let lake = Lake::new(LakeConfig::parse(dir.path().join("lake").to_str().context("temp path is not UTF-8")?)?);
    let state = dir.path().join("state");
    let admin = "bench-admin-key-0123456789";
    let (keys, _) = ApiKeys::open(&state, Some(admin))?;
    let ingestor = Ingestor::start(lake, state.join("index"), WriterConfig::default()).await?;
    let setup: Vec<Event> = Workload::for_deployment(7, ingestor.deployment().clone(), Utc::now())
        .events(n_all)
        .into_iter()
        .filter(|e| !matches!(e.kind(), EventKind::InferenceCompleted | EventKind::FeeCharged))
        .collect();
    let setup = crate::client::ndjson_bodies(&setup, batch)?;
    let app = http::router(http::IngestState { ingestor, keys: Arc::new(keys), max_body_bytes: 64 << 20 });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let client = reqwest::Client::builder().pool_max_idle_per_host(clients).build()?;
    for body in &setup {
        let r = crate::client::post_events(&client, &url, admin, "application/x-ndjson", "", body.clone()).await?;
        if let Some(e) = r.errors.first() {
            bail!("benchmark setup event rejected: {e}");
        }
    }
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(bodies.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + std::time::Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, bodies, next, url) = (client.clone(), bodies.clone(), next.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = hdrhistogram::Histogram::<u64>::new(3)?;
            let (mut accepted, mut bytes) = (0usize, 0usize);
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let t = Instant::now();
                let resp = crate::client::post_events(&client, &url, admin, "application/x-ndjson", "", body.clone()).await?;
                lat.record(t.elapsed().as_micros() as u64)?;
                let sent = body.iter().filter(|b| **b == b'\n').count();
                if !resp.errors.is_empty() || resp.accepted != sent {
                    bail!("{} of {sent} events accepted: {:?}", resp.accepted, resp.errors.first());
                }
                accepted += resp.accepted;
                bytes += body.len();
            }
            anyhow::Ok((lat, accepted, bytes))
        }));
    }
    let mut lat = hdrhistogram::Histogram::<u64>::new(3)?;
    let (mut accepted, mut bytes) = (0, 0);
    for t in tasks {
        let (h, a, b) = t.await??;
        lat.add(h)?;
        accepted += a;
        bytes += b;
    }
    let secs = start.elapsed().as_secs_f64();
    server.abort();
    let run = Run {
        clients,
        events: accepted,
        events_per_s: accepted as f64 / secs,
        mb_per_s: bytes as f64 / secs / 1e6,
        p50_ms: lat.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: lat.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: lat.max() as f64 / 1000.0,
    };
    Ok((run, dir))
}

pub(crate) fn batches_by_kind(events: &[Event]) -> Result<Vec<(EventKind, RecordBatch)>> {
    let now = Utc::now();
    let mut out = Vec::new();
    for kind in EventKind::ALL {
        let rows: Vec<&Event> = events.iter().filter(|e| e.kind() == *kind).collect();
        if !rows.is_empty() {
            out.push((*kind, events::to_record_batch(*kind, rows, now)?));
        }
    }
    Ok(out)
}

fn plain_parquet(by_kind: &[(EventKind, RecordBatch)]) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let rows: usize = by_kind.iter().map(|(_, b)| b.num_rows()).sum();
    let start = Instant::now();
    let mut file_no = 0;
    for (_, batch) in by_kind {
        let mut offset = 0;
        while offset < batch.num_rows() {
            let len = (batch.num_rows() - offset).min(50_000);
            let path = dir.path().join(format!("part-{file_no}.parquet"));
            file_no += 1;
            let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path)?, batch.schema(), Some(props.clone()))?;
            w.write(&batch.slice(offset, len))?;
            w.close()?;
            offset += len;
        }
    }
    Ok(rows as f64 / start.elapsed().as_secs_f64())
}

/// Writes the rows as Arrow IPC files and times `write_deltalake(mode="append")` over them.
fn python_deltalake(python: &std::path::Path, by_kind: &[(EventKind, RecordBatch)], batch: usize, seconds: f64) -> Result<Vec<String>> {
    if !python.exists() {
        bail!("{} not found (scripts/test makes the venv)", python.display());
    }
    let dir = tempfile::tempdir()?;
    for (kind, b) in by_kind {
        let path = dir.path().join(format!("{}.arrow", kind.table()));
        let mut w = arrow::ipc::writer::FileWriter::try_new(std::fs::File::create(&path)?, &b.schema())?;
        w.write(b)?;
        w.finish()?;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/python_deltalake_append.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(dir.path())
        .arg(batch.to_string())
        .arg(seconds.to_string())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
}

async fn table_load(commits: u64, python: Option<PathBuf>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let lake = Lake::new(LakeConfig::parse(dir.path().to_str().context("temp path is not UTF-8")?)?);
    let kind = EventKind::StakeChanged;
    let mut writer = ledgerlake_lakehouse::lake::TableWriter::open(&lake, kind).await?;
    let events = Workload::new(3).events(2_000);
    let stakes: Vec<&Event> = events.iter().filter(|e| e.kind() == kind).collect();
    let batch = events::to_record_batch(kind, stakes.iter().copied().take(1), Utc::now())?;
    let python = python.unwrap_or_else(|| PathBuf::from(".venv/bin/python"));
    let table_dir = dir.path().join(kind.table());
    let mut version = 0;
    let mut milestone = 10;
    let mut since = (Instant::now(), 0u64);
    println!("one commit of one row at a time; load = open the newest version with its file list");
    while version < commits {
        // The same row again and again: the benchmark measures the log, not the data.
        version = writer.append(std::slice::from_ref(&batch)).await?;
        if version == milestone || version == commits {
            milestone *= 10;
            let per_commit = since.0.elapsed().as_secs_f64() * 1000.0 / (version - since.1) as f64;
            // Measure the steady state: the checkpoint due at this point is written.
            writer.finish_checkpoint().await;
            let (ours, py) = measure_load(&lake, kind, version, &python, &table_dir).await?;
            println!(
                "{version:>6} commits: ledgerlake load {ours:>6.1} ms | python deltalake load {py} | append {per_commit:.1} ms/commit since the last line"
            );
            since = (Instant::now(), version);
        }
    }
    let (removed, added) = lake.compact(kind).await?;
    let version = lake.open(kind).await?.context("table vanished")?.version().unwrap_or(0);
    let (ours, py) = measure_load(&lake, kind, version, &python, &table_dir).await?;
    println!(
        "after compact ({removed} files -> {added}): ledgerlake load {ours:>6.1} ms | python deltalake load {py}"
    );
    Ok(())
}

/// Median of five loads of the newest version, by ledgerlake and by Python deltalake.
async fn measure_load(lake: &Lake, kind: EventKind, version: u64, python: &Path, table_dir: &Path) -> Result<(f64, String)> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let table = lake.open(kind).await?.context("table vanished")?;
        let files = table.snapshot()?.log_data().num_files();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        if table.version() != Some(version) || files == 0 {
            bail!("loaded version {:?} with {files} files, expected version {version}", table.version());
        }
    }
    times.sort_by(f64::total_cmp);
    let py = if python.exists() {
        let script = "import sys,time\nfrom deltalake import DeltaTable\nts=[]\nfor _ in range(5):\n    t=time.perf_counter(); d=DeltaTable(sys.argv[1]); d.file_uris(); ts.append((time.perf_counter()-t)*1000)\nprint(f'{sorted(ts)[2]:.1f}')";
        let out = std::process::Command::new(python).arg("-c").arg(script).arg(table_dir).output()?;
        if out.status.success() {
            format!("{} ms", String::from_utf8_lossy(&out.stdout).trim())
        } else {
            format!("failed: {}", String::from_utf8_lossy(&out.stderr).trim())
        }
    } else {
        "not run (no .venv)".to_owned()
    };
    Ok((times[2], py))
}

fn dedupe(ids: u64, batch: u64) -> Result<()> {
    use ledgerlake_lakehouse::index::{Index, Learned};
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir()?;
    let index = Index::open(&dir.path().join("index"))?;
    let id = |n: u64| format!("{:08x}-{:04x}-7{:03x}-8{:03x}-{:012x}", n >> 32, (n >> 16) & 0xffff, n & 0xfff, n.wrapping_mul(7919) & 0xfff, n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let started = Instant::now();
    let mut inserted = 0u64;
    let mut milestone = 1_000_000u64.min(ids);
    let mut version = 0;
    while inserted < ids {
        let n = batch.min(ids - inserted);
        let learned = Learned { event_ids: (inserted..inserted + n).map(id).collect(), ..Learned::default() };
        version += 1;
        index.record(EventKind::FeeCharged, version, &learned)?;
        inserted += n;
        if inserted >= milestone {
            let insert_rate = inserted as f64 / started.elapsed().as_secs_f64();
            let probes = 200_000;
            let existing_probes = 20_000;
            let t = Instant::now();
            let mut found = 0;
            for _ in 0..existing_probes {
                found += index.contains_event(&id(rng.random_range(0..inserted)))? as u64;
            }
            let hit_us = t.elapsed().as_secs_f64() * 1e6 / existing_probes as f64;
            let t = Instant::now();
            let mut false_hits = 0;
            for i in 0..probes {
                false_hits += index.contains_event(&id(u64::MAX / 2 + i))? as u64;
            }
            let miss_us = t.elapsed().as_secs_f64() * 1e6 / probes as f64;
            if found != existing_probes || false_hits != 0 {
                bail!("index lost ids: {found}/{existing_probes} found, {false_hits} false hits");
            }
            let size = dir_size(&dir.path().join("index"));
            println!(
                "{inserted:>11} ids: insert {insert_rate:>9.0} ids/s overall | lookup existing {hit_us:>5.2} us, new {miss_us:>5.2} us | index {:.2} GB",
                size as f64 / 1e9
            );
            milestone = (milestone * 10).min(ids);
            if milestone == inserted {
                milestone = u64::MAX;
            }
        }
    }
    Ok(())
}

fn dir_size(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
