//! `ledgerlake bench sql`: the analyst side at 10M rows, in one run beside its references.
//!
//! - Flight `DoGet` of the whole inference table over loopback (client: `pyarrow.flight`)
//!   against `pyarrow` reading the same Parquet files from local disk (the ceiling).
//! - Five analyst queries through `ledgerlake sql` (the CLI process, and the engine it runs
//!   measured in-process) against DuckDB (Python package) over the same Parquet files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use ledgerlake_ingest::demo::Workload;
use ledgerlake_lakehouse::events::{Event, EventKind};
use ledgerlake_lakehouse::lake::TableWriter;
use ledgerlake_lakehouse::{Lake, LakeConfig};
use ledgerlake_sql::auth::{Access, Authorize, Denied};
use ledgerlake_sql::flight::{EventSink, FlightState, PutError, PutReceipt};
use ledgerlake_sql::{QueryLimits, SqlEngine};

/// The five queries: aggregations and joins over contributions, inferences and fees. The
/// same text runs on both engines.
const QUERIES: &[(&str, &str)] = &[
    (
        "fees_by_model",
        "SELECT model_id, count(*) AS n, sum(amount) AS total FROM fee_charged GROUP BY model_id ORDER BY total DESC, model_id",
    ),
    (
        "inferences_by_model_hour",
        "SELECT model_id, date_trunc('hour', event_time) AS hour, count(*) AS n, sum(prompt_tokens + completion_tokens) AS tokens, \
         avg(latency_ms) AS latency FROM inference_completed GROUP BY 1, 2 ORDER BY 1, 2",
    ),
    (
        "spend_by_caller_join",
        "SELECT i.caller, count(*) AS n, sum(f.amount) AS spent, sum(i.completion_tokens) AS completion_tokens \
         FROM inference_completed i JOIN fee_charged f ON f.inference_id = i.inference_id GROUP BY i.caller ORDER BY spent DESC, i.caller",
    ),
    (
        "contributions_by_datanet_join",
        "SELECT c.datanet_id, count(DISTINCT c.contributor) AS contributors, count(*) AS contributions, \
         sum(CASE WHEN r.verdict = 'approved' THEN 1 ELSE 0 END) AS approved \
         FROM contribution_submitted c LEFT JOIN contribution_reviewed r ON r.contribution_id = c.contribution_id \
         GROUP BY c.datanet_id ORDER BY contributions DESC, c.datanet_id",
    ),
    (
        "revenue_by_builder_join",
        "SELECT m.builder, count(DISTINCT f.payer) AS payers, sum(f.amount) AS revenue \
         FROM fee_charged f JOIN model_registered m ON m.model_id = f.model_id \
         WHERE f.event_time >= '2026-11-02T00:00:00Z' GROUP BY m.builder ORDER BY revenue DESC, m.builder",
    ),
];

const TABLES: &[EventKind] = &[
    EventKind::InferenceCompleted,
    EventKind::FeeCharged,
    EventKind::ContributionSubmitted,
    EventKind::ContributionReviewed,
    EventKind::ModelRegistered,
];

const KEY: &str = "bench-key";

struct BenchAuth;

impl Authorize for BenchAuth {
    fn authorize(&self, key: Option<&str>, _need: Access) -> Result<ledgerlake_sql::auth::Reader, Denied> {
        if key == Some(KEY) { Ok(ledgerlake_sql::auth::Reader::All) } else { Err(Denied::Unauthenticated("bench key only".into())) }
    }
}

struct NoSink;

#[async_trait::async_trait]
impl EventSink for NoSink {
    async fn put(&self, _: arrow::array::RecordBatch, _: Option<String>, _: bool, _: &str) -> Result<PutReceipt, PutError> {
        Err(PutError::Invalid("the benchmark server stores nothing".into()))
    }
}

pub async fn run(rows: usize, data: Option<PathBuf>, runs: usize, memory_mb: usize, python: Option<PathBuf>) -> Result<()> {
    let python = python.unwrap_or_else(|| PathBuf::from(".venv/bin/python"));
    if !python.exists() {
        bail!("{} not found (scripts/test makes the venv with pyarrow and duckdb)", python.display());
    }
    let temp;
    let root = match data {
        Some(d) => d,
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_owned()
        }
    };
    std::fs::create_dir_all(&root)?;
    let lake = Lake::new(LakeConfig::parse(root.to_str().context("lake path is not UTF-8")?)?);
    if lake.exists(EventKind::InferenceCompleted).await? {
        println!("reusing the lake in {}", root.display());
    } else {
        generate(&lake, rows).await?;
    }
    let mut files = serde_json::Map::new();
    for kind in TABLES {
        let table = lake.open(*kind).await?.context("a benchmark table is missing")?;
        let dir = root.join(kind.table());
        let paths: Vec<String> = table.snapshot()?.log_data().iter().map(|f| dir.join(f.path().as_ref()).display().to_string()).collect();
        files.insert(kind.table().into(), serde_json::json!({"dir": dir.display().to_string(), "files": paths}));
    }

    // The server, in this process, as `ledgerlake up` runs it.
    let limits = QueryLimits { memory_bytes: memory_mb << 20, timeout: Duration::from_secs(3600), ..QueryLimits::default() };
    let engine = SqlEngine::new(lake.clone(), limits).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let state = FlightState { engine: engine.clone(), auth: Arc::new(BenchAuth), sink: Arc::new(NoSink), max_message_bytes: 64 << 20 };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ledgerlake_sql::flight::serve(listener, state, async {
        let _ = stopped.await;
    }));

    let spec = serde_json::json!({
        "flight": format!("grpc://{addr}"),
        "key": KEY,
        "files": files,
        "queries": QUERIES,
        "runs": runs,
    });
    let spec_file = tempfile::NamedTempFile::new()?;
    std::fs::write(spec_file.path(), serde_json::to_vec(&spec)?)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/flight_sql_reference.py");
    let (py, spec_path) = (python.clone(), spec_file.path().to_owned());
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(py).arg(&script).arg(spec_path).output()).await??;
    if !out.status.success() {
        bail!("the reference script failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let reference: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading the reference results")?;
    let _ = stop.send(());
    server.await?.context("the Flight server")?;

    let mb = |v: &serde_json::Value| v["bytes"].as_f64().unwrap_or(0.0) / 1e6;
    let secs = |v: &serde_json::Value| v["seconds"].as_f64().unwrap_or(f64::NAN);
    let (flight, local) = (&reference["flight_doget"], &reference["pyarrow_parquet"]);
    println!("\nFlight DoGet of inference_completed over loopback (client pyarrow.flight), best of {runs}:");
    for (name, v) in [("ledgerlake Flight DoGet", flight), ("pyarrow local Parquet (ceiling)", local)] {
        println!(
            "  {name:<32} {:>10} rows {:>8.0} MB (Arrow) in {:>6.2} s = {:>7.0} MB/s, {:>6.2} M rows/s",
            v["rows"],
            mb(v),
            secs(v),
            mb(v) / secs(v),
            v["rows"].as_f64().unwrap_or(0.0) / secs(v) / 1e6
        );
    }
    println!("  DoGet / ceiling: {:.2} (rows/s)", secs(local) / secs(flight));

    println!("\nAnalyst queries, best of {runs} (ledgerlake: query memory {memory_mb} MiB):");
    println!("  {:<30} {:>12} {:>12} {:>10} {:>14} {:>8}", "query", "sql CLI s", "engine s", "duckdb s", "CLI / duckdb", "rows");
    for (name, sql) in QUERIES {
        let mut engine_best = f64::INFINITY;
        let mut rows = 0usize;
        for _ in 0..runs {
            let t = Instant::now();
            let stream = engine.query(sql, vec![]).await?;
            rows = stream.try_fold(0usize, |n, b| async move { Ok(n + b.num_rows()) }).await?;
            engine_best = engine_best.min(t.elapsed().as_secs_f64());
        }
        let cli_best = cli_query(&root, sql, runs, memory_mb).await?;
        let duck = &reference["duckdb"][name];
        let duck_rows = duck["rows"].as_u64().unwrap_or(0) as usize;
        if duck_rows != rows {
            bail!("{name}: ledgerlake returned {rows} rows, DuckDB {duck_rows}");
        }
        println!(
            "  {name:<30} {cli_best:>12.3} {engine_best:>12.3} {:>10.3} {:>14.2} {rows:>8}",
            secs(duck),
            cli_best / secs(duck)
        );
    }
    Ok(())
}

/// Best wall time of `ledgerlake sql` (a new process each time, CSV to /dev/null).
async fn cli_query(root: &Path, sql: &str, runs: usize, memory_mb: usize) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let (root, sql) = (root.to_owned(), sql.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut best = f64::INFINITY;
        for _ in 0..runs {
            let t = Instant::now();
            let status = std::process::Command::new(&exe)
                .args(["sql", &sql, "--format", "csv", "--data"])
                .arg(&root)
                .env("LEDGERLAKE_QUERY_MEMORY_MB", memory_mb.to_string())
                .env("LEDGERLAKE_QUERY_TIMEOUT_S", "3600")
                .stdout(std::process::Stdio::null())
                .status()?;
            if !status.success() {
                bail!("ledgerlake sql failed on {sql}");
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    })
    .await?
}

/// Writes the benchmark lake: the governance a workload needs, then inferences and their
/// fees in chunks, straight to the tables (the ingest path has its own benchmark).
async fn generate(lake: &Lake, rows: usize) -> Result<()> {
    let start = Instant::now();
    let mut workload = Workload::new(17);
    let setup = workload.events(400_000);
    let mut done = setup.iter().filter(|e| e.kind() == EventKind::InferenceCompleted).count();
    write(lake, &setup).await?;
    while done < rows {
        let n = (rows - done).min(500_000);
        write(lake, &workload.inferences(n)).await?;
        done += n;
        println!("generated {done} inferences and their fees ({:.0} s)", start.elapsed().as_secs_f64());
    }
    Ok(())
}

async fn write(lake: &Lake, events: &[Event]) -> Result<()> {
    for (kind, batch) in crate::bench::batches_by_kind(events)? {
        let mut writer = TableWriter::open(lake, kind).await?;
        writer.append(&[batch]).await?;
        writer.finish_checkpoint().await;
    }
    Ok(())
}
