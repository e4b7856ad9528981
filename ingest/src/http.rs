//! The HTTP edge of ingest: `POST /v1/events`, `POST /v1/keys`, `GET /health`.
//!
//! Batch semantics of `POST /v1/events`:
//! - The answer comes only after every stored event is committed to Delta.
//! - Each item is judged on its own: valid items are stored, invalid ones are listed in
//!   `errors` with their index and field, and the status is 422 if any item failed (200
//!   otherwise). Re-sending the whole batch is always safe: stored events come back as
//!   duplicates.
//! - With `?atomic=true` the batch is all-or-nothing: one invalid item and nothing is
//!   stored (422, `accepted: 0`).
//! - Errors of the request as a whole: 400 (body not parseable), 401/403 (key), 413 (too
//!   large), 415 (content type), 503 + `Retry-After` (queue full or storage down; nothing
//!   of that request was acknowledged).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ledgerlake_lakehouse::events::EventKind;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{ApiKeys, Role};
use crate::validate::{BodyFormat, parse_body};
use crate::writer::{Ingestor, Prepared};
use crate::Error;

/// What the ingest routes share.
#[derive(Clone)]
pub struct IngestState {
    pub ingestor: Ingestor,
    pub keys: Arc<ApiKeys>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
}

pub fn router(state: IngestState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/events", post(post_events))
        .route("/v1/keys", post(create_key))
        .with_state(state)
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Error::MalformedBody(_) | Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Error::PayloadTooLarge { .. } | Error::BatchTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Error::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Error::Unavailable(_) | Error::Lake(_) | Error::Io { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Error::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden"),
        };
        let message = match &self {
            // Storage internals (endpoints, paths, SDK messages) go to the log, not to the client.
            Error::Lake(_) | Error::Io { .. } | Error::Unavailable(_) => {
                tracing::error!(error = %self, "storage error");
                "storage is unavailable; nothing was acknowledged, retry".to_owned()
            }
            other => other.to_string(),
        };
        let mut resp = (status, axum::Json(json!({"error": {"code": code, "message": message}}))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    atomic: bool,
    /// Kind of items that carry no `kind` (for Arrow streams of one kind).
    kind: Option<String>,
}

fn auth_header(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

/// Reads a body up to `limit` bytes, refusing early when `Content-Length` says it is larger.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<bytes::Bytes, Error> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Error::PayloadTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // Only a body over the limit is 413; a body that breaks off or is badly framed is
        // the client's malformed request (400).
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return Error::PayloadTooLarge { limit };
            }
            source = s.source();
        }
        Error::MalformedBody(format!("the request body could not be read: {e}"))
    })
}

async fn post_events(
    State(state): State<IngestState>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    state.keys.authorize(auth_header(&headers), Role::Ingest)?;
    let format = BodyFormat::from_content_type(headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()))?;
    let default_kind = match &query.kind {
        Some(k) => Some(k.parse::<EventKind>().map_err(|e| Error::BadRequest(e.to_string()))?),
        None => None,
    };
    let bytes = read_body(&headers, body, state.max_body_bytes).await?;
    let atomic = query.atomic;
    let (prepared, errors) = tokio::task::spawn_blocking(move || {
        let t = std::time::Instant::now();
        let prepared = parse_body(format, &bytes, default_kind).and_then(|items| Prepared::from_items(items, atomic));
        tracing::debug!(bytes = bytes.len(), took = ?t.elapsed(), "request parsed");
        prepared
    })
    .await
    .map_err(|e| Error::Unavailable(format!("parser task failed: {e}")))??;
    let receipt = state.ingestor.submit_checked(prepared, errors, atomic).await?;
    let status = if receipt.errors.is_empty() { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
    Ok((status, axum::Json(receipt)).into_response())
}

#[derive(Deserialize)]
struct NewKey {
    role: String,
}

async fn create_key(State(state): State<IngestState>, headers: HeaderMap, body: Body) -> Result<Response, Error> {
    state.keys.authorize(auth_header(&headers), Role::Admin)?;
    let bytes = read_body(&headers, body, 4096).await?;
    let req: NewKey = serde_json::from_slice(&bytes).map_err(|e| Error::BadRequest(format!("expected {{\"role\": ...}}: {e}")))?;
    let role: Role = req.role.parse().map_err(Error::BadRequest)?;
    let (principal, key) = state.keys.create(role)?;
    Ok((StatusCode::CREATED, axum::Json(json!({"id": principal.id, "role": principal.role, "key": key}))).into_response())
}
