//! `POST /v1/sql`: `{"sql": "...", "params": [...]}`; the `Accept` header picks the format.
//! JSON answers are collected and capped at a row limit; NDJSON, CSV, Arrow and Parquet
//! stream batch by batch with no limit. Errors are JSON: `{"error": {"code", "message"}}`.
//!
//! Who may query is decided by the caller's [`Authorize`]: this crate knows no keys.

use std::io::Write;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::scalar::ScalarValue;
use futures::StreamExt;

use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::auth::{Access, Authorize, Denied, bearer};
use crate::format::{BatchWriter, Format};
use crate::{Error, SqlEngine};

#[derive(Clone)]
pub struct SqlState {
    pub engine: SqlEngine,
    pub auth: Arc<dyn Authorize>,
    /// Most rows a JSON answer holds; larger results need a streaming format or a LIMIT.
    pub json_row_limit: usize,
    /// Most bytes a JSON answer holds (it is built whole before it is sent).
    pub json_byte_limit: usize,
}

pub fn router(state: SqlState) -> Router {
    Router::new().route("/v1/sql", post(query)).with_state(state)
}

/// The part of the API document this route makes (the binary merges it with the others).
#[derive(OpenApi)]
#[openapi(
    paths(query),
    components(schemas(Request, SqlParam, SqlError, Binary)),
    tags((name = "sql", description = "Read-only SQL over the lake")),
)]
pub struct ApiDoc;

/// An error of a query; nothing was answered.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SqlError {
    pub error: SqlErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SqlErrorDetail {
    /// What went wrong, for programs: `bad_request`, `bad_query`, `read_only`, `execution`,
    /// `too_many_rows`, `too_large`, `too_many_queries`, `not_acceptable`, `unauthorized`, `forbidden`, `timeout`,
    /// `memory_limit` or `lake_unavailable`.
    pub code: String,
    /// What went wrong, for people. It never names the server's internals.
    pub message: String,
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = SqlError { error: SqlErrorDetail { code: code.to_owned(), message: message.into() } };
    (status, axum::Json(body)).into_response()
}

fn query_error(e: Error) -> Response {
    if e.is_unavailable() {
        let mut response = error(StatusCode::SERVICE_UNAVAILABLE, "lake_unavailable", e.to_string());
        response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        return response;
    }
    let (status, code) = match &e {
        Error::BadQuery(_) => (StatusCode::BAD_REQUEST, "bad_query"),
        Error::NotReadOnly(_) => (StatusCode::BAD_REQUEST, "read_only"),
        Error::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        Error::MemoryLimit(_) => (StatusCode::INSUFFICIENT_STORAGE, "memory_limit"),
        Error::Lake(_) | Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "lake_unavailable"),
        Error::Execution(_) => (StatusCode::BAD_REQUEST, "execution"),
        Error::AnswerTooLarge(_) => (StatusCode::BAD_REQUEST, "too_large"),
        Error::Busy(_) => {
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, "too_many_queries", e.to_string());
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
            return response;
        }
    };
    error(status, code, e.to_string())
}

/// A query: one read-only statement, with `$1`, `$2`, ... bound to `params`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Request {
    #[schema(example = "SELECT count(*) AS n FROM datanet_created")]
    sql: String,
    #[serde(default)]
    #[schema(value_type = Vec<Option<SqlParam>>)]
    params: Vec<serde_json::Value>,
}

/// A query parameter: a boolean, a number or a string (or null, `params` allows it).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // documents `params`; the handler binds the JSON values itself
enum SqlParam {
    Boolean(bool),
    Integer(i64),
    Float(f64),
    Text(String),
}

/// The bytes of an answer in a binary format.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)] // documents the body; the handler streams the bytes itself
struct Binary(Vec<u8>);


fn param(i: usize, v: serde_json::Value) -> Result<ScalarValue, String> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => ScalarValue::Null,
        J::Bool(b) => ScalarValue::Boolean(Some(b)),
        J::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => ScalarValue::Int64(Some(i)),
            (None, Some(f)) => ScalarValue::Float64(Some(f)),
            _ => return Err(format!("params[{i}]: {n} is out of range")),
        },
        J::String(s) => ScalarValue::Utf8(Some(s)),
        other => return Err(format!("params[{i}]: {other} is not a scalar (null, boolean, number or string)")),
    })
}

/// The format the `Accept` header asks for (JSON when it names none we write).
fn negotiate(headers: &HeaderMap) -> Result<Format, String> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else { return Ok(Format::Json) };
    for range in accept.split(',') {
        let media = range.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let format = match media.as_str() {
            "application/json" | "*/*" | "application/*" => Format::Json,
            "application/x-ndjson" | "application/jsonl" => Format::Ndjson,
            "text/csv" | "text/*" => Format::Csv,
            "application/vnd.apache.arrow.stream" => Format::Arrow,
            "application/vnd.apache.parquet" | "application/x-parquet" => Format::Parquet,
            _ => continue,
        };
        return Ok(format);
    }
    Err(format!("cannot answer in {accept:?}: use application/json, application/x-ndjson, text/csv, application/vnd.apache.arrow.stream or application/vnd.apache.parquet"))
}

/// Runs one read-only query; `Accept` picks the answer's format. JSON answers are capped at
/// a row limit; the other formats stream without one.
#[utoipa::path(
    post, path = "/v1/sql", tag = "sql",
    params(("Accept" = Option<String>, Header, description = "application/json (default), application/x-ndjson, text/csv, application/vnd.apache.arrow.stream or application/vnd.apache.parquet")),
    request_body(content = Request, content_type = "application/json"),
    responses(
        (status = 200, description = "The rows, in the format asked for", content(
            (Vec<BTreeMap<String, serde_json::Value>> = "application/json"),
            (String = "application/x-ndjson"),
            (String = "text/csv"),
            (Binary = "application/vnd.apache.arrow.stream"),
            (Binary = "application/vnd.apache.parquet"),
        )),
        (status = 400, description = "Not a query this server runs: unparseable, not read-only, failing, or too many rows for JSON", body = SqlError),
        (status = 401, description = "No or unknown API key", body = SqlError),
        (status = 403, description = "The key may not query", body = SqlError),
        (status = 406, description = "`Accept` names no format this server writes", body = SqlError),
        (status = 503, description = "The lake's storage is unavailable; retry", body = SqlError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
        (status = 504, description = "The query ran past the server's time limit", body = SqlError),
        (status = 507, description = "The query needed more memory than the server's limit", body = SqlError),
        (status = 429, description = "This key already runs as many queries as one key may (`sql_queries_per_key`); retry", body = SqlError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
async fn query(State(state): State<SqlState>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer);
    let reader = match state.auth.authorize(key, Access::Query) {
        Ok(reader) => reader,
        Err(Denied::Unauthenticated(m)) => return error(StatusCode::UNAUTHORIZED, "unauthorized", m),
        Err(Denied::Forbidden(m)) => return error(StatusCode::FORBIDDEN, "forbidden", m),
    };
    let format = match negotiate(&headers) {
        Ok(f) => f,
        Err(m) => return error(StatusCode::NOT_ACCEPTABLE, "not_acceptable", m),
    };
    let request: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", format!("expected {{\"sql\": \"...\", \"params\": [...]}}: {e}")),
    };
    let params = match request.params.into_iter().enumerate().map(|(i, v)| param(i, v)).collect::<Result<Vec<_>, _>>() {
        Ok(p) => p,
        Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
    };
    let mut stream = match state.engine.query_as(&reader, &request.sql, params).await {
        Ok(s) => s,
        Err(e) => return query_error(e),
    };
    if format == Format::Json {
        return json_answer(stream, state.json_row_limit, state.json_byte_limit).await;
    }
    // Streaming formats: each batch is encoded and sent as it comes. The first is awaited
    // before the status, so a query that fails at once gets its own status, not a 200
    // whose body breaks off.
    let first = match stream.next().await {
        Some(Err(e)) => return query_error(e.into()),
        first => first,
    };
    let schema = stream.schema();
    let stream = Box::pin(RecordBatchStreamAdapter::new(schema, futures::stream::iter(first).chain(stream)));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::spawn(stream_out(format, stream, tx));
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    ([(header::CONTENT_TYPE, format.media_type())], body).into_response()
}

/// Encodes the stream batch by batch into `tx`. An error after the first bytes ends the
/// body with that error (the status is sent already).
async fn stream_out(
    format: Format,
    mut stream: datafusion::execution::SendableRecordBatchStream,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let buf = SharedBuf::default();
    let result = async {
        let mut writer = BatchWriter::new(format, &stream.schema(), buf.clone())?;
        while let Some(batch) = stream.next().await {
            writer.write(&batch?)?;
            let chunk = buf.take();
            if !chunk.is_empty() && tx.send(Ok(chunk)).await.is_err() {
                return Ok(()); // the client went away
            }
        }
        writer.finish()
    }
    .await;
    let last = buf.take();
    if !last.is_empty() {
        let _ = tx.send(Ok(last)).await;
    }
    if let Err(e) = result {
        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
    }
}

async fn json_answer(mut stream: datafusion::execution::SendableRecordBatchStream, limit: usize, byte_limit: usize) -> Response {
    let schema = stream.schema();
    let mut out = Vec::new();
    let mut writer = match BatchWriter::new(Format::Json, &schema, &mut out) {
        Ok(w) => w,
        Err(e) => return query_error(e),
    };
    let mut rows = 0usize;
    let mut bytes = 0usize;
    while let Some(batch) = stream.next().await {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => return query_error(e.into()),
        };
        rows += batch.num_rows();
        if rows > limit {
            return error(
                StatusCode::BAD_REQUEST,
                "too_many_rows",
                format!("the result has more than {limit} rows: add a LIMIT, or ask for application/x-ndjson, text/csv, Arrow or Parquet, which stream"),
            );
        }
        // The rows' size in memory, a floor of their JSON: checked before they are written.
        bytes = bytes.saturating_add(batch.get_array_memory_size());
        if bytes > byte_limit {
            return error(
                StatusCode::BAD_REQUEST,
                "too_large",
                format!("the result is over {byte_limit} bytes as JSON: select less, add a LIMIT, or ask for a streaming format"),
            );
        }
        if let Err(e) = writer.write(&batch) {
            return query_error(e);
        }
    }
    if let Err(e) = writer.finish() {
        return query_error(e);
    }
    if out.is_empty() {
        out = b"[]".to_vec();
    }
    ([(header::CONTENT_TYPE, "application/json")], out).into_response()
}

/// The bytes a format writer produced since they were last taken.
#[derive(Clone, Default)]
struct SharedBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl SharedBuf {
    fn take(&self) -> Bytes {
        // A poisoned lock means a panic while appending; the bytes are still whole.
        Bytes::from(std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner())))
    }
}

impl Write for SharedBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
