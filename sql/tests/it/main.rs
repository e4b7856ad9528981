//! The SQL surface, on a real lake in a temp dir: `.slt` files (sqllogictest) for the
//! query behaviour, Rust tests for parameters, limits and freshness.

use std::path::Path;
use std::time::Duration;

use arrow::array::Array;
use arrow::datatypes::DataType;
use async_trait::async_trait;
use chrono::Utc;
use ledgerlake_lakehouse::events::{self, Event, EventKind};
use ledgerlake_lakehouse::lake::TableWriter;
use ledgerlake_lakehouse::{Lake, LakeConfig};
use ledgerlake_sql::{Error, QueryLimits, SqlEngine};
use serde_json::json;
use sqllogictest::{DBOutput, DefaultColumnType};

const ALICE: &str = "0x1111111111111111111111111111111111111111";
const BOB: &str = "0x2222222222222222222222222222222222222222";
const OWNER: &str = "0x3333333333333333333333333333333333333333";

fn event(kind: EventKind, fields: serde_json::Value) -> Event {
    Event::from_json_fields(kind, fields).unwrap()
}

async fn append(lake: &Lake, kind: EventKind, rows: Vec<Event>) -> u64 {
    let mut writer = TableWriter::open(lake, kind).await.unwrap();
    let batch = events::to_record_batch(kind, rows.iter(), Utc::now()).unwrap();
    writer.append(&[batch]).await.unwrap()
}

fn contribution_id(n: u8) -> String {
    format!("{:064x}", n)
}

fn signature() -> String {
    format!("0x{}1b", "ab".repeat(64))
}

fn fee(id: &str, time: &str, model: &str, amount: &str) -> Event {
    event(
        EventKind::FeeCharged,
        json!({"event_id": id, "event_time": time, "inference_id": format!("inf-{id}"), "model_id": model, "payer": "key_1", "amount": amount}),
    )
}

/// A small lake whose every number the `.slt` files can state.
async fn fixture(dir: &Path) -> Lake {
    let lake = Lake::new(LakeConfig::parse(dir.to_str().unwrap()).unwrap());
    let datanet = |id: &str, n: &str| {
        event(EventKind::DatanetCreated, json!({"event_id": id, "event_time": "2026-11-01T00:00:00Z", "datanet_id": n, "owner": OWNER, "name": n, "license": "CC-BY-4.0"}))
    };
    append(&lake, EventKind::DatanetCreated, vec![datanet("d1", "climate"), datanet("d2", "law")]).await;
    let contribution = |n: u8, datanet: &str, who: &str| {
        event(
            EventKind::ContributionSubmitted,
            json!({"event_id": format!("c{n}"), "event_time": format!("2026-11-01T0{n}:00:00Z"), "contribution_id": contribution_id(n),
                   "datanet_id": datanet, "contributor": who, "content": format!("text {n}"), "content_sha256": contribution_id(100 + n),
                   "license": "CC-BY-4.0", "signature": signature()}),
        )
    };
    append(&lake, EventKind::ContributionSubmitted, vec![contribution(1, "climate", ALICE), contribution(2, "climate", ALICE), contribution(3, "law", BOB)]).await;
    let review = |n: u8, verdict: &str| {
        let mut v = json!({"event_id": format!("r{n}"), "event_time": "2026-11-02T00:00:00Z", "contribution_id": contribution_id(n),
                           "datanet_id": if n == 3 { "law" } else { "climate" }, "reviewer": OWNER, "verdict": verdict, "signature": signature()});
        if verdict != "approved" {
            v["reason"] = json!("off topic");
        }
        event(EventKind::ContributionReviewed, v)
    };
    append(&lake, EventKind::ContributionReviewed, vec![review(1, "approved"), review(3, "rejected")]).await;
    // Two commits, so time travel has something to show: version 1 holds two fees.
    append(&lake, EventKind::FeeCharged, vec![
        fee("f1", "2026-11-01T10:00:00Z", "m-a", "1000000000000000000"),
        fee("f2", "2026-11-01T11:00:00Z", "m-a", "500000000000000000"),
    ]).await;
    append(&lake, EventKind::FeeCharged, vec![
        fee("f3", "2026-11-02T10:00:00Z", "m-a", "1000000000000000000000000000"),
        fee("f4", "2026-11-02T12:30:00Z", "m-b", "7"),
    ]).await;
    let inference = |id: &str, time: &str, model: &str, prompt: u32, completion: u32| {
        event(
            EventKind::InferenceCompleted,
            json!({"event_id": id, "event_time": time, "inference_id": id, "model_id": model, "caller": "key_1", "prompt_tokens": prompt,
                   "completion_tokens": completion, "output_sha256": contribution_id(200), "latency_ms": 40}),
        )
    };
    append(&lake, EventKind::InferenceCompleted, vec![
        inference("i1", "2026-11-01T10:05:00Z", "m-a", 10, 20),
        inference("i2", "2026-11-01T10:55:00Z", "m-a", 30, 40),
        inference("i3", "2026-11-01T11:00:00Z", "m-b", 5, 5),
    ]).await;
    lake
}

struct Db(SqlEngine);

#[derive(Debug)]
struct SltError(String);
impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for SltError {}

#[async_trait]
impl sqllogictest::AsyncDB for Db {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        let (schema, batches) = self.0.collect(sql, Vec::new()).await.map_err(|e| SltError(e.to_string()))?;
        let types = schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                d if d.is_integer() => DefaultColumnType::Integer,
                DataType::Float16 | DataType::Float32 | DataType::Float64 => DefaultColumnType::FloatingPoint,
                _ => DefaultColumnType::Text,
            })
            .collect();
        let mut rows = Vec::new();
        for batch in &batches {
            for row in 0..batch.num_rows() {
                rows.push(
                    batch
                        .columns()
                        .iter()
                        .map(|c| {
                            if c.is_null(row) {
                                "NULL".to_owned()
                            } else {
                                arrow::util::display::array_value_to_string(c, row).unwrap_or_else(|e| format!("<{e}>"))
                            }
                        })
                        .collect(),
                );
            }
        }
        Ok(DBOutput::Rows { types, rows })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "ledgerlake"
    }

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_files() {
    let dir = tempfile::tempdir().unwrap();
    let lake = fixture(dir.path()).await;
    let engine = SqlEngine::new(lake, QueryLimits::default()).await.unwrap();
    // The runner's CARGO_MANIFEST_DIR first: a test binary reused from a build cache made in
    // another checkout still has that checkout's path compiled in.
    let root = std::env::var_os("CARGO_MANIFEST_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_owned());
    let files = std::fs::read_dir(root.join("tests/slt")).unwrap();
    let mut ran = 0;
    for file in files {
        let path = file.unwrap().path();
        let engine = engine.clone();
        let mut runner = sqllogictest::Runner::new(move || {
            let engine = engine.clone();
            async move { Ok(Db(engine)) }
        });
        runner.run_file_async(&path).await.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        ran += 1;
    }
    assert_eq!(ran, 2, "basics.slt and read_only.slt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_are_bound() {
    let dir = tempfile::tempdir().unwrap();
    let engine = SqlEngine::new(fixture(dir.path()).await, QueryLimits::default()).await.unwrap();
    let (_, batches) = engine
        .collect("SELECT count(*) AS n FROM fee_charged WHERE model_id = $1", vec!["m-a".into()])
        .await
        .unwrap();
    let n = batches[0].column(0).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap().value(0);
    assert_eq!(n, 3);

    // `?` placeholders (what JDBC/ODBC/ADBC drivers send) bind in order; a `?` in a string
    // literal is text.
    let (_, batches) = engine
        .collect("SELECT count(*) AS n, '?' AS q FROM fee_charged WHERE model_id = ? AND amount > ?", vec!["m-a".into(), 600_000_000_000_000_000i64.into()])
        .await
        .unwrap();
    let n = batches[0].column(0).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap().value(0);
    assert_eq!(n, 2);
    assert_eq!(batches[0].column(1).as_any().downcast_ref::<arrow::array::StringArray>().unwrap().value(0), "?");
    let described = engine.describe("SELECT * FROM fee_charged WHERE model_id = ? AND payer = ?", vec![]).await.unwrap();
    assert_eq!(described.params.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["$1", "$2"]);
    assert!(engine.collect("SELECT count(*) FROM fee_charged WHERE model_id = ?", vec![]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_have_plain_string_types() {
    let dir = tempfile::tempdir().unwrap();
    let engine = SqlEngine::new(fixture(dir.path()).await, QueryLimits::default()).await.unwrap();
    // The Delta scan reads strings as views; results and table schemas show them as Utf8,
    // with names and qualifiers kept.
    let (schema, batches) = engine
        .collect("SELECT a.model_id, b.model_id AS other, a.amount FROM fee_charged a JOIN fee_charged b ON a.event_id = b.event_id", vec![])
        .await
        .unwrap();
    assert_eq!(schema.field(0).data_type(), &arrow::datatypes::DataType::Utf8);
    assert_eq!(schema.field(1).name(), "other");
    assert_eq!(batches[0].schema().field(0).data_type(), &arrow::datatypes::DataType::Utf8);
    let relations = engine.relations().await.unwrap();
    let fees = relations.iter().find(|r| r.name == "fee_charged").unwrap();
    assert_eq!(fees.arrow_schema.field_with_name("model_id").unwrap().data_type(), &arrow::datatypes::DataType::Utf8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_see_every_commit_made_before_them() {
    let dir = tempfile::tempdir().unwrap();
    let lake = fixture(dir.path()).await;
    let engine = SqlEngine::new(lake.clone(), QueryLimits::default()).await.unwrap();
    let count = |engine: SqlEngine| async move {
        let (_, b) = engine.collect("SELECT count(*) FROM fee_charged", Vec::new()).await.unwrap();
        b[0].column(0).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap().value(0)
    };
    assert_eq!(count(engine.clone()).await, 4);
    append(&lake, EventKind::FeeCharged, vec![fee("f5", "2026-11-03T00:00:00Z", "m-b", "1")]).await;
    assert_eq!(count(engine.clone()).await, 5, "the engine saw the new commit without a restart");
    // The views read the newest version too.
    let (_, b) = engine.collect("SELECT sum(fees) FROM fees_by_model_day", Vec::new()).await.unwrap();
    assert_eq!(b[0].column(0).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap().value(0), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_query_is_cancelled_and_the_engine_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let limits = QueryLimits { timeout: Duration::from_millis(300), ..QueryLimits::default() };
    let engine = SqlEngine::new(fixture(dir.path()).await, limits).await.unwrap();
    // 10^12 rows: no machine finishes this within the limit.
    let err = engine.collect("SELECT count(*) FROM generate_series(1, 1000000000000)", Vec::new()).await.unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    let (_, b) = engine.collect("SELECT 1", Vec::new()).await.unwrap();
    assert_eq!(b[0].num_rows(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_over_its_memory_limit_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let limits = QueryLimits { memory_bytes: 256 * 1024, ..QueryLimits::default() };
    let engine = SqlEngine::new(fixture(dir.path()).await, limits).await.unwrap();
    // array_agg cannot spill: a million values do not fit in 256 KiB.
    let err = engine.collect("SELECT array_agg(value) FROM generate_series(1, 1000000)", Vec::new()).await.unwrap_err();
    assert!(matches!(err, Error::MemoryLimit(_)), "{err:?}");
}

/// An answer's batches have the schema `describe` gives (what Flight's FlightInfo
/// advertises), also where the optimizer folds a nullable expression into a constant:
/// Flight SQL clients refuse batches whose schema differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_have_the_described_schema() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let engine = SqlEngine::new(fixture(dir.path()).await, QueryLimits::default()).await.unwrap();
    for sql in ["SELECT upper('x') AS r FROM generate_series(1, 3)", "SELECT repeat('ab', 2) AS r, model_id FROM fee_charged"] {
        let described = engine.describe(sql, vec![]).await.unwrap();
        let mut stream = engine.query(sql, vec![]).await.unwrap();
        assert_eq!(stream.schema(), described.schema, "{sql}");
        let mut rows = 0;
        while let Some(batch) = stream.next().await {
            let batch = batch.unwrap();
            assert_eq!(batch.schema(), described.schema, "{sql}");
            rows += batch.num_rows();
        }
        assert!(rows > 0, "{sql}");
    }
}
