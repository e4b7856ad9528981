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
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ledgerlake_lakehouse::events::EventKind;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::auth::{ApiKeys, Role};
use crate::authority::Submitter;
use crate::validate::{BodyFormat, parse_body};
use crate::validate::ItemError;
use crate::writer::{Ingestor, Prepared, Receipt};
use crate::Error;

/// The part of the API document these routes make (the binary merges it with the others).
#[derive(OpenApi)]
#[openapi(
    paths(health, deployment, post_events, create_key),
    components(schemas(
        Receipt, ItemError, IngestError, Health, DeploymentInfo, NewKey, KeyCreated, EventsJson, ArrowStream,
        ledgerlake_lakehouse::events::Event, ledgerlake_lakehouse::events::EventKind,
    )),
    tags((name = "ingest", description = "Events into the lake, and API keys")),
)]
pub struct ApiDoc;

/// An error of a request as a whole; nothing of it was stored.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IngestError {
    pub error: IngestErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IngestErrorDetail {
    /// What went wrong, for programs: `bad_request`, `unsupported_media_type`,
    /// `payload_too_large`, `overloaded`, `unavailable`, `unauthorized`, `forbidden`,
    /// `not_found`, `conflict` or `internal`.
    pub code: String,
    /// What went wrong, for people. It never names the server's internals.
    pub message: String,
}

/// The answer of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the server answers.
    pub status: &'static str,
    pub version: &'static str,
}

/// The answer of `GET /v1/deployment`: what participant signatures name.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentInfo {
    /// This deployment's id (the EIP-712 domain's `salt`): `0x` and 64 hex digits.
    pub deployment_id: String,
    /// The EVM chain configured (the domain's `chainId`), if any.
    pub chain_id: Option<u64>,
    /// The EIP-712 domain every participant signs under, as `eth_signTypedData_v4` takes it.
    #[schema(value_type = Object)]
    pub eip712_domain: serde_json::Value,
    /// How far a participant event's `event_time` may be from this server's clock.
    pub max_event_skew_s: u64,
    /// The staking contract (on `chain_id`) whose stakes this deployment follows, if any:
    /// stake there; no key records stakes here.
    pub staking_contract: Option<String>,
}

/// The body of `POST /v1/keys`.
#[derive(Deserialize, ToSchema)]
pub struct NewKey {
    #[schema(value_type = Role)]
    role: String,
    /// The address the key acts as: required for builder keys (it trains as it), optional for read and ingest keys (they read its private datanets), refused for service and admin keys.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed")]
    address: Option<String>,
}

/// A new API key: `key` is shown this once; only its sha256 is stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyCreated {
    /// The key's public id (recorded as `caller` of what it does).
    pub id: String,
    pub role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub address: Option<ledgerlake_lakehouse::Address>,
    pub key: String,
}

/// The JSON forms of `POST /v1/events`: one event, or an array of them.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // documents the body; the handler parses the raw bytes itself
enum EventsJson {
    One(ledgerlake_lakehouse::events::Event),
    Many(Vec<ledgerlake_lakehouse::events::Event>),
}

/// The bytes of an Apache Arrow IPC stream.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)] // documents the body; the handler decodes the raw bytes itself
struct ArrowStream(Vec<u8>);

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
        .route("/v1/deployment", get(deployment))
        .route("/v1/events", post(post_events))
        .route("/v1/keys", post(create_key))
        .with_state(state)
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Error::MalformedBody(_) | Error::BadRequest(_) | Error::Document { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
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
        let body = IngestError { error: IngestErrorDetail { code: code.to_owned(), message } };
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// Whether the server answers (it checks nothing else: no storage, no model).
#[utoipa::path(get, path = "/health", tag = "ingest", responses((status = 200, description = "The server answers", body = Health)))]
async fn health() -> axum::Json<Health> {
    axum::Json(Health { status: "ok", version: env!("CARGO_PKG_VERSION") })
}

/// The deployment participant signatures are bound to (no key needed: signers need it
/// before they have anything else). `docs/events.md` lists the typed structs.
#[utoipa::path(get, path = "/v1/deployment", tag = "ingest", responses((status = 200, description = "The EIP-712 domain of this deployment", body = DeploymentInfo)))]
async fn deployment(State(state): State<IngestState>) -> axum::Json<DeploymentInfo> {
    let d = state.ingestor.deployment();
    axum::Json(DeploymentInfo {
        deployment_id: d.id.to_string(),
        chain_id: d.chain_id,
        eip712_domain: ledgerlake_lakehouse::messages::domain_json(d),
        max_event_skew_s: state.ingestor.max_event_skew().as_secs(),
        staking_contract: state.ingestor.staking().map(str::to_owned),
    })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// All or nothing: one invalid item and nothing of the request is stored.
    #[serde(default)]
    atomic: bool,
    /// Kind of items that carry no `kind` (for Arrow streams of one kind).
    #[param(value_type = Option<ledgerlake_lakehouse::events::EventKind>)]
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

/// Stores events exactly once (by `event_id`); the answer comes once they are durable.
/// Each item is judged on its own unless `atomic`.
#[utoipa::path(
    post, path = "/v1/events", tag = "ingest",
    params(EventsQuery),
    request_body(
        description = "Events as JSON (one object or an array), NDJSON (one object per line) or an Arrow IPC stream (columns named as the fields).",
        content(
            (EventsJson = "application/json"),
            (String = "application/x-ndjson"),
            (ArrowStream = "application/vnd.apache.arrow.stream"),
        ),
    ),
    responses(
        (status = 200, description = "Every item is stored (or was already: `duplicates`)", body = Receipt),
        (status = 422, description = "Some items are invalid and listed in `errors`; the others are stored (`accepted`), none with `atomic`", body = Receipt),
        (status = 400, description = "The body or a parameter cannot be read; nothing was stored", body = IngestError),
        (status = 401, description = "No or unknown API key", body = IngestError, headers(("WWW-Authenticate" = String))),
        (status = 413, description = "The body or the batch is over the limit; nothing was stored", body = IngestError),
        (status = 415, description = "A content type ingest does not read", body = IngestError),
        (status = 503, description = "Overloaded or storage unavailable; nothing was acknowledged, retry", body = IngestError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
async fn post_events(
    State(state): State<IngestState>,
    query: Result<Query<EventsQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    // Any key may send events: what each may cause is the authority of its kind
    // (`crate::authority`), and participant events carry their signers' signatures.
    let principal = state.keys.authorize(auth_header(&headers), Role::Read)?;
    let submitter = Submitter::Key(principal);
    let deployment = state.ingestor.deployment().clone();
    // Checked after the key, and answered in this API's JSON error shape.
    let Query(query) = query.map_err(|e| Error::BadRequest(e.body_text()))?;
    let format = BodyFormat::from_content_type(headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()))?;
    let default_kind = match &query.kind {
        Some(k) => Some(k.parse::<EventKind>().map_err(|e| Error::BadRequest(e.to_string()))?),
        None => None,
    };
    let bytes = read_body(&headers, body, state.max_body_bytes).await?;
    let atomic = query.atomic;
    let (prepared, errors) = tokio::task::spawn_blocking(move || {
        let t = std::time::Instant::now();
        let prepared = parse_body(format, &bytes, default_kind).and_then(|items| Prepared::from_items(items, atomic, &submitter, &deployment));
        tracing::debug!(bytes = bytes.len(), took = ?t.elapsed(), "request parsed");
        prepared
    })
    .await
    .map_err(|e| Error::Unavailable(format!("parser task failed: {e}")))??;
    let receipt = state.ingestor.submit_checked(prepared, errors, atomic).await?;
    let status = if receipt.errors.is_empty() { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
    Ok((status, axum::Json(receipt)).into_response())
}

/// Makes an API key (admin only).
#[utoipa::path(
    post, path = "/v1/keys", tag = "ingest",
    request_body(content = NewKey, content_type = "application/json"),
    responses(
        (status = 201, description = "The key, shown once", body = KeyCreated),
        (status = 400, description = "Not `{\"role\": ...}` with a known role", body = IngestError),
        (status = 401, description = "No or unknown API key", body = IngestError, headers(("WWW-Authenticate" = String))),
        (status = 403, description = "Only an admin key makes keys", body = IngestError),
        (status = 413, description = "The body is over 4 KiB", body = IngestError),
        (status = 503, description = "The key file cannot be written; retry", body = IngestError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
async fn create_key(State(state): State<IngestState>, headers: HeaderMap, body: Body) -> Result<Response, Error> {
    state.keys.authorize(auth_header(&headers), Role::Admin)?;
    let bytes = read_body(&headers, body, 4096).await?;
    let req: NewKey = serde_json::from_slice(&bytes).map_err(|e| Error::BadRequest(format!("expected {{\"role\": ...}}: {e}")))?;
    let role: Role = req.role.parse().map_err(Error::BadRequest)?;
    let address = match &req.address {
        Some(a) => Some(a.parse::<ledgerlake_lakehouse::Address>().map_err(|e| Error::BadRequest(format!("address: {e}")))?),
        None => None,
    };
    let (principal, key) = state.keys.create(role, address)?;
    Ok((StatusCode::CREATED, axum::Json(KeyCreated { id: principal.id, role: principal.role, address: principal.address, key })).into_response())
}
