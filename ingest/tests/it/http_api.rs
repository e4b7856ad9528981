use std::sync::Arc;
use std::time::Duration;

use ledgerlake_ingest::validate::event_to_json;
use ledgerlake_ingest::{ApiKeys, Ingestor, WriterConfig, http};
use serde_json::{Value, json};

use crate::common::*;

const ADMIN: &str = "test-admin-key-0123456789";

struct Server {
    url: String,
    client: reqwest::Client,
    deployment: ledgerlake_lakehouse::Deployment,
    _dir: tempfile::TempDir,
}

async fn serve(config: WriterConfig, max_body_bytes: usize) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (keys, _) = ApiKeys::open(&dir.path().join("state"), Some(ADMIN)).unwrap();
    let ingestor = Ingestor::start(lake(dir.path()), dir.path().join("state/index"), config).await.unwrap();
    let deployment = ingestor.deployment().clone();
    let app = http::router(http::IngestState { ingestor, keys: Arc::new(keys), max_body_bytes });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server { url, client: reqwest::Client::new(), deployment, _dir: dir }
}

impl Server {
    async fn post(&self, key: &str, content_type: &str, query: &str, body: Vec<u8>) -> (u16, Value, reqwest::header::HeaderMap) {
        let resp = self
            .client
            .post(format!("{}/v1/events{query}", self.url))
            .bearer_auth(key)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")), headers)
    }

    async fn new_key(&self, role: &str) -> String {
        let resp = self.client.post(format!("{}/v1/keys", self.url)).bearer_auth(ADMIN).json(&json!({"role": role})).send().await.unwrap();
        assert_eq!(resp.status(), 201);
        resp.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_owned()
    }
}

/// The demo workload as NDJSON, signed for `s`'s deployment and timed now.
fn ndjson(s: &Server, n: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for e in ledgerlake_ingest::demo::Workload::for_deployment(seed, s.deployment.clone(), chrono::Utc::now()).events(n) {
        serde_json::to_writer(&mut out, &event_to_json(&e)).unwrap();
        out.push(b'\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_open_and_everything_else_needs_a_key() {
    let s = serve(fast(), 1 << 20).await;
    let health = s.client.get(format!("{}/health", s.url)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let (status, body, headers) = s.post("", "application/json", "", b"[]".to_vec()).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(s.post("wrong-key", "application/json", "", b"[]".to_vec()).await.0, 401);
    // Any key may send events: what each may cause is decided per event (a read key's
    // fee is refused as an item, not the request).
    let reader = s.new_key("read").await;
    let (status, body, _) = s.post(&reader, "application/json", "", b"[]".to_vec()).await;
    assert_eq!(status, 200, "{body}");
    let fee = json!([{"kind": "fee.charged", "event_id": "r1", "event_time": "2026-11-24T10:00:00Z", "inference_id": "i", "model_id": "m", "payer": "p", "amount": "7"}]);
    let (status, body, _) = s.post(&reader, "application/json", "", serde_json::to_vec(&fee).unwrap()).await;
    assert_eq!((status, body["accepted"].as_u64(), body["errors"][0]["field"].as_str()), (422, Some(0), Some("kind")), "{body}");
    let ingest = s.new_key("ingest").await;
    assert_eq!(s.post(&ingest, "application/json", "", b"[]".to_vec()).await.0, 200);
    // The deployment signers sign for needs no key.
    let d: Value = s.client.get(format!("{}/v1/deployment", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(d["eip712_domain"]["name"], "ledgerlake");
    assert_eq!(d["eip712_domain"]["salt"], d["deployment_id"]);
    // Only the admin makes keys.
    let resp = s.client.post(format!("{}/v1/keys", s.url)).bearer_auth(&ingest).json(&json!({"role": "admin"})).send().await.unwrap();
    assert_eq!(resp.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_ndjson_and_duplicates() {
    let s = serve(fast(), 8 << 20).await;
    let body = ndjson(&s, 400, 5);
    let (status, r, _) = s.post(ADMIN, "application/x-ndjson", "", body.clone()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!((r["accepted"].as_u64(), r["duplicates"].as_u64()), (Some(400), Some(0)));
    let (status, r, _) = s.post(ADMIN, "application/x-ndjson", "", body).await;
    assert_eq!(status, 200);
    assert_eq!((r["accepted"].as_u64(), r["duplicates"].as_u64()), (Some(0), Some(400)));

    let arr = json!([
        {"kind": "fee.charged", "event_id": "x1", "event_time": "2026-11-24T10:00:00Z", "inference_id": "i", "model_id": "m", "payer": "p", "amount": "7"},
        {"kind": "fee.charged", "event_id": "x2", "event_time": "2026-11-24T10:00:00Z", "inference_id": "i", "model_id": "m", "payer": "p", "amount": "-7"}
    ]);
    let (status, r, _) = s.post(ADMIN, "application/json", "", serde_json::to_vec(&arr).unwrap()).await;
    assert_eq!(status, 422);
    assert_eq!(r["accepted"], 1);
    assert_eq!(r["errors"][0]["index"], 1);
    assert_eq!(r["errors"][0]["field"], "amount");
    assert_eq!(r["errors"][0]["event_id"], "x2");
    // Atomic: one bad item, nothing written (x3 stays new).
    let arr = json!([
        {"kind": "fee.charged", "event_id": "x3", "event_time": "2026-11-24T10:00:00Z", "inference_id": "i", "model_id": "m", "payer": "p", "amount": "7"},
        {"kind": "fee.charged", "event_id": "x4", "event_time": "2026-11-24T10:00:00Z", "inference_id": "i", "model_id": "m", "payer": "p", "amount": "1e3"}
    ]);
    let (status, r, _) = s.post(ADMIN, "application/json", "?atomic=true", serde_json::to_vec(&arr).unwrap()).await;
    assert_eq!((status, r["accepted"].as_u64()), (422, Some(0)));
    let (status, r, _) = s.post(ADMIN, "application/json", "", serde_json::to_vec(&arr[0]).unwrap()).await;
    assert_eq!((status, r["accepted"].as_u64()), (200, Some(1)), "x3 was written by the atomic batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses() {
    let s = serve(fast(), 4096).await;
    let (status, r, _) = s.post(ADMIN, "application/json", "", b"[{\"kind\":".to_vec()).await;
    assert_eq!(status, 400);
    assert!(r["error"]["message"].as_str().unwrap().contains("invalid JSON"), "{r}");
    let (status, _, _) = s.post(ADMIN, "text/plain", "", b"[]".to_vec()).await;
    assert_eq!(status, 415);
    let (status, r, _) = s.post(ADMIN, "application/x-ndjson", "", vec![b' '; 10_000]).await;
    assert_eq!(status, 413, "{r}");
    let (status, _, _) = s.post(ADMIN, "application/vnd.apache.arrow.stream", "", b"not arrow".to_vec()).await;
    assert_eq!(status, 400);
    let (status, _, _) = s.post(ADMIN, "application/vnd.apache.arrow.stream", "?kind=nope", vec![]).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrow_ipc_streams_are_ingested() {
    use arrow::array::{ArrayRef, Decimal128Array, StringArray, TimestampMicrosecondArray};
    let s = serve(fast(), 1 << 20).await;
    let n = 50;
    let col = |f: &dyn Fn(usize) -> String| -> ArrayRef { Arc::new(StringArray::from((0..n).map(f).collect::<Vec<_>>())) };
    let big = 10i128.pow(30);
    let batch = arrow::record_batch::RecordBatch::try_from_iter(vec![
        ("event_id", col(&|i| format!("arrow-{i}"))),
        ("event_time", Arc::new(TimestampMicrosecondArray::from(vec![1_790_000_000_000_000i64; n]).with_timezone("UTC")) as ArrayRef),
        ("inference_id", col(&|i| format!("inf-{i}"))),
        ("model_id", col(&|_| "m1".into())),
        ("payer", col(&|_| "key_1".into())),
        ("amount", Arc::new(Decimal128Array::from(vec![big + 1; n]).with_precision_and_scale(38, 0).unwrap()) as ArrayRef),
    ])
    .unwrap();
    let mut ipc = Vec::new();
    {
        let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut ipc, &batch.schema()).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
    }
    let (status, r, _) = s.post(ADMIN, "application/vnd.apache.arrow.stream", "?kind=fee.charged", ipc).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["accepted"], n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let config = WriterConfig { max_delay: Duration::from_secs(2), max_queued_rows: 10, ..WriterConfig::default() };
    let s = serve(config, 1 << 20).await;
    let fees = |prefix: &str, n: usize| {
        let v: Vec<Value> = (0..n)
            .map(|i| json!({"kind": "fee.charged", "event_id": format!("{prefix}{i}"), "event_time": "2026-11-24T10:00:00Z",
                "inference_id": "i", "model_id": "m", "payer": "p", "amount": "1"}))
            .collect();
        serde_json::to_vec(&v).unwrap()
    };
    let (status, _, _) = s.post(ADMIN, "application/json", "", fees("big", 11)).await;
    assert_eq!(status, 413, "more events than the queue holds");
    let first = {
        let (client, url) = (s.client.clone(), s.url.clone());
        let body = fees("a", 8);
        tokio::spawn(async move {
            client.post(format!("{url}/v1/events")).bearer_auth(ADMIN).header("content-type", "application/json").body(body).send().await.unwrap().status()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, r, headers) = s.post(ADMIN, "application/json", "", fees("b", 8)).await;
    assert_eq!(status, 503, "{r}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(first.await.unwrap(), 200);
    let (status, _, _) = s.post(ADMIN, "application/json", "", fees("b", 8)).await;
    assert_eq!(status, 200, "the queue drained");
}
