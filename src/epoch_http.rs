//! `/v1/epochs`: reward epochs over HTTP. Glue: `ledgerlake_attribution::epoch_job` does
//! the work. Closing takes an admin key; everything else any key that may read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ledgerlake_attribution::anchor::LogReport;
use ledgerlake_attribution::epoch_job::{self, Closing, EpochConfig, Proof, Verification};
use ledgerlake_attribution::merkle::{DumpValue, RewardTree, TreeDump};
use ledgerlake_ingest::http::IngestError;
use ledgerlake_ingest::{ApiKeys, Role};
use ledgerlake_lakehouse::events::EpochClosed;
use ledgerlake_lakehouse::{Address, Bytes32, Event, Lake, Sha256Hex};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::attribution_http::{authorize, error};
use crate::epoch_cmd::Anchors;

#[derive(Clone)]
pub struct EpochState {
    pub lake: Lake,
    pub keys: Arc<ApiKeys>,
    pub config: EpochConfig,
    pub anchor: Anchors,
    /// Between anchoring and recording (crash tests only).
    pub pause_after_anchor: std::time::Duration,
    pub ingestor: ledgerlake_ingest::Ingestor,
    /// Trees of closed epochs (their rewards never change), built on first use.
    pub trees: Arc<Mutex<HashMap<u64, Arc<Option<RewardTree>>>>>,
    /// Held while closing: one close at a time in this process (`up`'s and an HTTP one
    /// would otherwise compute twice and race to anchor).
    pub closing: Arc<tokio::sync::Mutex<()>>,
}

impl EpochState {
    /// Closes epoch `n` now, writing through the ingest writer.
    pub async fn close(&self, n: u64, empty: Option<String>) -> Result<Closing, ledgerlake_attribution::Error> {
        let _one_at_a_time = self.closing.lock().await;
        // Each call's future owns its writer handle, so the caller's future is `Send`.
        let ingestor = self.ingestor.clone();
        let send = move |events: Vec<Event>| {
            let publisher = crate::finetune_cmd::LakePublisher(ingestor.clone());
            async move {
                use ledgerlake_factory::Publisher;
                publisher.send(events).await.map_err(ledgerlake_attribution::Error::Lake)
            }
        };
        self.anchor.close(&self.lake, &self.config, n, chrono::Utc::now(), empty, self.pause_after_anchor, send).await
    }

    /// `up`'s closing of due epochs (`epoch_auto_close`): every `every`, each epoch whose
    /// window and grace have passed, in order; an error is logged and tried again later.
    pub async fn close_due(self, every: std::time::Duration) {
        loop {
            loop {
                let n = match epoch_job::next_to_close(&self.lake, &self.config, chrono::Utc::now()).await {
                    Ok(Some(n)) => n,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "finding the epoch to close");
                        break;
                    }
                };
                match self.close(n, None).await {
                    Ok(c) => tracing::info!(epoch = n, root = ?c.row().merkle_root, anchor = ?c.row().anchor, "closed a due reward epoch"),
                    Err(e) => {
                        tracing::warn!(epoch = n, error = %e, "closing a due reward epoch");
                        break;
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    paths(list, show, close, compute, verify, proof, tree, verify_anchors),
    components(schemas(EpochList, EpochShown, Computation, EpochVerification, Verification, Proof, TreeDump, DumpValue, LogReport, Closed)),
    tags((name = "epochs", description = "Reward epochs: the split of each epoch's fees, its Merkle root, proofs and anchors (docs/epochs.md)")),
)]
pub struct ApiDoc;

pub fn router(state: EpochState) -> Router {
    Router::new()
        .route("/v1/epochs", get(list))
        .route("/v1/epochs/{n}", get(show))
        .route("/v1/epochs/{n}/close", post(close))
        .route("/v1/epochs/{n}/compute", get(compute))
        .route("/v1/epochs/{n}/verify", get(verify))
        .route("/v1/epochs/{n}/proofs/{account}", get(proof))
        .route("/v1/epochs/{n}/tree", get(tree))
        .route("/v1/anchors/verify", get(verify_anchors))
        .with_state(state)
}

/// An `epochs` row in its JSON form: the event with its `kind`.
#[derive(Clone, Serialize)]
pub struct EpochRow {
    kind: &'static str,
    #[serde(flatten)]
    row: EpochClosed,
}

impl From<EpochClosed> for EpochRow {
    fn from(row: EpochClosed) -> Self {
        EpochRow { kind: "epoch.closed", row }
    }
}

/// Every epoch pinned or closed, each as its latest row.
#[derive(Serialize, ToSchema)]
pub struct EpochList {
    #[schema(value_type = Vec<EpochClosed>)]
    pub epochs: Vec<EpochRow>,
}

/// One epoch: its window, and its rows if it was pinned or closed.
#[derive(Serialize, ToSchema)]
pub struct EpochShown {
    pub epoch: u64,
    /// `open` (nothing recorded), `pinned` or `closed`.
    pub status: String,
    pub window_start: chrono::DateTime<chrono::Utc>,
    pub window_end: chrono::DateTime<chrono::Utc>,
    #[schema(value_type = Option<EpochClosed>)]
    pub pinned: Option<EpochRow>,
    #[schema(value_type = Option<EpochClosed>)]
    pub closed: Option<EpochRow>,
}

/// What closing did.
#[derive(Serialize, ToSchema)]
pub struct Closed {
    /// Whether the epoch was closed before this call (nothing was written).
    pub already_closed: bool,
    #[schema(value_type = EpochClosed)]
    pub epoch: EpochRow,
}

/// An epoch computed again from its pin (or, for one not yet pinned, from the versions
/// closing would pin now: a preview).
#[derive(Serialize, ToSchema)]
pub struct Computation {
    pub epoch: u64,
    /// `preview`, `pinned` or `closed`: what the inputs' versions come from.
    pub basis: String,
    /// The canonical manifest (docs/epochs.md); its bytes hash to `manifest_sha256`.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
    pub manifest_sha256: Sha256Hex,
    pub merkle_root: Bytes32,
}

/// An epoch recomputed and compared with what was recorded, and its anchor checked.
#[derive(Serialize, ToSchema)]
pub struct EpochVerification {
    /// True when nothing below found a problem.
    pub verified: bool,
    pub recompute: Verification,
    /// Problems with the anchor (the log's entry, or the chain's root).
    pub anchor_problems: Vec<String>,
}

/// The request's key checked against `role`, then its epoch number: the answer to send
/// when either fails.
fn allowed_epoch(state: &EpochState, headers: &HeaderMap, role: Role, n: &str) -> Result<u64, Response> {
    authorize(&state.keys, headers, role)?;
    n.parse::<u64>().map_err(|_| error(StatusCode::BAD_REQUEST, "bad_request", format!("{n:?} is not an epoch number")))
}

/// An attribution error as an answer: the caller's (a rule of epochs) is a 409, the rest
/// is storage's (logged, 503).
fn failed(e: ledgerlake_attribution::Error, what: &str) -> Response {
    if e.is_caller() {
        return error(StatusCode::CONFLICT, "conflict", e.to_string());
    }
    tracing::error!(error = %e, "{what}");
    error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("{what} failed; retry (the server's log says why)"))
}

const UNAUTH: &str = "No or unknown API key";

/// Every epoch pinned or closed.
#[utoipa::path(
    get, path = "/v1/epochs", tag = "epochs", operation_id = "list_epochs",
    responses(
        (status = 200, description = "Each epoch's latest row, by number", body = EpochList),
        (status = 401, description = UNAUTH, body = IngestError, headers(("WWW-Authenticate" = String))),
        (status = 503, description = "Storage is unavailable; retry", body = IngestError, headers(("Retry-After" = u32))),
    ),
    security(("bearer" = [])),
)]
async fn list(State(state): State<EpochState>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorize(&state.keys, &headers, Role::Read) {
        return denied;
    }
    match epoch_job::recorded(&state.lake).await {
        Ok(epochs) => axum::Json(EpochList { epochs: epochs.values().filter_map(|r| r.latest().cloned().map(EpochRow::from)).collect() }).into_response(),
        Err(e) => failed(e, "reading the epochs"),
    }
}

/// One epoch: open, pinned or closed, with its rows.
#[utoipa::path(
    get, path = "/v1/epochs/{n}", tag = "epochs", operation_id = "show_epoch",
    params(("n" = u64, Path, description = "The epoch number")),
    responses(
        (status = 200, description = "The epoch", body = EpochShown),
        (status = 400, description = "Not an epoch number", body = IngestError),
        (status = 401, description = UNAUTH, body = IngestError, headers(("WWW-Authenticate" = String))),
        (status = 409, description = "Beyond the calendar", body = IngestError),
        (status = 503, description = "Storage is unavailable; retry", body = IngestError, headers(("Retry-After" = u32))),
    ),
    security(("bearer" = [])),
)]
async fn show(State(state): State<EpochState>, headers: HeaderMap, Path(n): Path<String>) -> Response {
    let n = match allowed_epoch(&state, &headers, Role::Read, &n) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match shown(&state.lake, &state.config, n).await {
        Ok(s) => axum::Json(s).into_response(),
        Err(e) => failed(e, "reading an epoch"),
    }
}

pub async fn shown(lake: &Lake, config: &EpochConfig, n: u64) -> Result<EpochShown, ledgerlake_attribution::Error> {
    let mut epochs = epoch_job::recorded(lake).await?;
    let recorded = epochs.remove(&n).unwrap_or_default();
    let (window_start, window_end) = match recorded.latest() {
        Some(r) => (r.window_start, r.window_end),
        None => config.window(n)?,
    };
    let status = match (&recorded.pinned, &recorded.closed) {
        (_, Some(_)) => "closed",
        (Some(_), None) => "pinned",
        (None, None) => "open",
    };
    Ok(EpochShown {
        epoch: n,
        status: status.into(),
        window_start,
        window_end,
        pinned: recorded.pinned.map(EpochRow::from),
        closed: recorded.closed.map(EpochRow::from),
    })
}

/// Closes an epoch: pins its input versions, splits its fees, records the rewards, anchors
/// the root. Idempotent: an epoch closed before is answered as it is.
#[utoipa::path(
    post, path = "/v1/epochs/{n}/close", tag = "epochs", operation_id = "close_epoch",
    params(
        ("n" = u64, Path, description = "The epoch number"),
        ("empty_reason" = Option<String>, Query, description = "Close it paying no one, for this reason (an admin's decision when its fees cannot be split); recorded in the epoch"),
    ),
    responses(
        (status = 200, description = "The epoch's closed row", body = Closed),
        (status = 400, description = "Not an epoch number", body = IngestError),
        (status = 401, description = UNAUTH, body = IngestError, headers(("WWW-Authenticate" = String))),
        (status = 403, description = "Only an admin key closes epochs", body = IngestError),
        (status = 409, description = "It may not close now: its window (plus epoch_grace_s) has not ended, or an earlier epoch is still open", body = IngestError),
        (status = 503, description = "Storage or the anchor is unavailable; nothing is lost, close again", body = IngestError, headers(("Retry-After" = u32))),
    ),
    security(("bearer" = [])),
)]
async fn close(
    State(state): State<EpochState>,
    headers: HeaderMap,
    Path(n): Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let n = match allowed_epoch(&state, &headers, Role::Admin, &n) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let empty = match query.get("empty_reason").map(|r| r.trim()) {
        Some("") => return error(StatusCode::BAD_REQUEST, "bad_request", "empty_reason names why the epoch pays no one".into()),
        Some(r) if r.len() > 4096 => return error(StatusCode::BAD_REQUEST, "bad_request", "empty_reason is at most 4096 bytes".into()),
        other => other.map(str::to_owned),
    };
    match state.close(n, empty).await {
        Ok(Closing::AlreadyClosed(epoch)) => axum::Json(Closed { already_closed: true, epoch: epoch.into() }).into_response(),
        Ok(Closing::Closed(epoch, took)) => {
            let took: Vec<String> = took.iter().map(|t| format!("{} {:.3}s", t.step, t.seconds)).collect();
            tracing::info!(epoch = n, root = ?epoch.merkle_root, anchor = ?epoch.anchor, took = took.join(", "), "closed a reward epoch");
            axum::Json(Closed { already_closed: false, epoch: epoch.into() }).into_response()
        }
        Err(e) => failed(e, "closing an epoch"),
    }
}

/// Computes an epoch again from its pinned versions (a preview from today's versions when
/// it is not pinned yet) and returns its manifest and root. Writes nothing.
#[utoipa::path(
    get, path = "/v1/epochs/{n}/compute", tag = "epochs", operation_id = "compute_epoch",
    params(("n" = u64, Path, description = "The epoch number")),
    responses(
        (status = 200, description = "The manifest and root", body = Computation),
        (status = 400, description = "Not an epoch number", body = IngestError),
        (status = 401, description = UNAUTH, body = IngestError, headers(("WWW-Authenticate" = String))),
        (status = 403, description = "Only an admin key recomputes an epoch (a whole epoch's work; anyone may recompute from the lake itself)", body = IngestError),
        (status = 409, description = "It cannot be computed: an earlier epoch is not closed, or it is beyond the calendar", body = IngestError),
        (status = 503, description = "Storage is unavailable; retry", body = IngestError, headers(("Retry-After" = u32))),
    ),
    security(("bearer" = [])),
)]
async fn compute(State(state): State<EpochState>, headers: HeaderMap, Path(n): Path<String>) -> Response {
    // A whole epoch's recompute: admin only, so no read key can keep the server busy.
    let n = match allowed_epoch(&state, &headers, Role::Admin, &n) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match computation(&state.lake, &state.config, n).await {
        Ok(c) => axum::Json(c).into_response(),
        Err(e) => failed(e, "computing an epoch"),
    }
}

pub async fn computation(lake: &Lake, config: &EpochConfig, n: u64) -> Result<Computation, ledgerlake_attribution::Error> {
    let recorded = epoch_job::recorded(lake).await?;
    let pin = epoch_job::preview_pin(lake, config, &recorded, n).await?;
    let basis = match recorded.get(&n) {
        Some(r) if r.closed.is_some() => "closed",
        Some(_) => "pinned",
        None => "preview",
    };
    let c = epoch_job::compute(lake, &pin).await?;
    let manifest = serde_json::from_slice(&c.manifest).map_err(|e| ledgerlake_attribution::Error::Internal(e.to_string()))?;
    Ok(Computation { epoch: n, basis: basis.into(), manifest, manifest_sha256: c.manifest_sha256, merkle_root: c.root })
}

/// Recomputes a closed epoch and compares root, manifest and every rewards row with what
/// was recorded; checks its anchor.
#[utoipa::path(
    get, path = "/v1/epochs/{n}/verify", tag = "epochs", operation_id = "verify_epoch",
    params(("n" = u64, Path, description = "The epoch number")),
    responses(
        (status = 200, description = "What was compared, and every difference", body = EpochVerification),
        (status = 400, description = "Not an epoch number", body = IngestError),
        (status = 401, description = UNAUTH, body = IngestError, headers(("WWW-Authenticate" = String))),
        (status = 403, description = "Only an admin key recomputes an epoch (a whole epoch's work; anyone may recompute from the lake itself)", body = IngestError),
        (status = 409, description = "The epoch is not closed", body = IngestError),
        (status = 503, description = "Storage or the anchor is unavailable; retry", body = IngestError, headers(("Retry-After" = u32))),
    ),
    security(("bearer" = [])),
)]
async fn verify(State(state): State<EpochState>, headers: HeaderMap, Path(n): Path<String>) -> Response {
    // A whole epoch's recompute: admin only, so no read key can keep the server busy.
    let n = match allowed_epoch(&state, &headers, Role::Admin, &n) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match verification(&state.lake, &state.anchor, n).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => failed(e, "verifying an epoch"),
    }
}

pub async fn verification(lake: &Lake, anchor: &Anchors, n: u64) -> Result<EpochVerification, ledgerlake_attribution::Error> {
    let recompute = epoch_job::verify(lake, n).await?;
    let closed = epoch_job::recorded(lake).await?.remove(&n).and_then(|r| r.closed);
    let anchor_problems = match closed {
        Some(row) => anchor.check(lake, &row).await?,
        None => vec![format!("epoch {n} has no closed row")],
    };
    Ok(EpochVerification { verified: recompute.problems.is_empty() && anchor_problems.is_empty(), recompute, anchor_problems })
}

/// The tree of a closed epoch, from the cache or built from its rewards rows.
async fn cached_tree(state: &EpochState, n: u64) -> Result<Arc<Option<RewardTree>>, ledgerlake_attribution::Error> {
    if let Some(t) = state.trees.lock().ok().and_then(|m| m.get(&n).cloned()) {
        return Ok(t);
    }
    let tree = Arc::new(epoch_job::tree(&state.lake, n).await?);
    if let Ok(mut m) = state.trees.lock() {
        m.insert(n, tree.clone());
    }
    Ok(tree)
}

/// An account's amount in a closed epoch and its Merkle proof, as the distributor's
/// `claim(epoch, account, amount, proof)` takes them.
#[utoipa::path(
    get, path = "/v1/epochs/{n}/proofs/{account}", tag = "epochs", operation_id = "epoch_proof",
    params(("n" = u64, Path, description = "The epoch number"), ("account" = String, Path, description = "An address")),
    responses(
        (status = 200, description = "The amount and the proof", body = Proof),
        (status = 400, description = "Not an epoch number or not an address", body = IngestError),
        (status = 401, description = UNAUTH, body = IngestError, headers(("WWW-Authenticate" = String))),
        (status = 404, description = "The account earned nothing in the epoch", body = IngestError),
        (status = 409, description = "The epoch is not closed", body = IngestError),
        (status = 503, description = "Storage is unavailable; retry", body = IngestError, headers(("Retry-After" = u32))),
    ),
    security(("bearer" = [])),
)]
async fn proof(State(state): State<EpochState>, headers: HeaderMap, Path((n, account)): Path<(String, String)>) -> Response {
    let n = match allowed_epoch(&state, &headers, Role::Read, &n) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let account: Address = match account.parse() {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", format!("{account:?}: {e}")),
    };
    let tree = match cached_tree(&state, n).await {
        Ok(t) => t,
        Err(e) => return failed(e, "building an epoch's tree"),
    };
    match tree.as_ref().as_ref().and_then(|t| epoch_job::proof_in(t, n, &account)) {
        Some(p) => axum::Json(p).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", format!("{account} earned nothing in epoch {n}")),
    }
}

/// A closed epoch's Merkle tree in OpenZeppelin's `StandardMerkleTree` dump format
/// (`StandardMerkleTree.load` reads it).
#[utoipa::path(
    get, path = "/v1/epochs/{n}/tree", tag = "epochs", operation_id = "epoch_tree",
    params(("n" = u64, Path, description = "The epoch number")),
    responses(
        (status = 200, description = "The dump", body = TreeDump),
        (status = 400, description = "Not an epoch number", body = IngestError),
        (status = 401, description = UNAUTH, body = IngestError, headers(("WWW-Authenticate" = String))),
        (status = 404, description = "The epoch paid no one: it has no tree (its root is zero)", body = IngestError),
        (status = 409, description = "The epoch is not closed", body = IngestError),
        (status = 503, description = "Storage is unavailable; retry", body = IngestError, headers(("Retry-After" = u32))),
    ),
    security(("bearer" = [])),
)]
async fn tree(State(state): State<EpochState>, headers: HeaderMap, Path(n): Path<String>) -> Response {
    let n = match allowed_epoch(&state, &headers, Role::Read, &n) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match cached_tree(&state, n).await {
        Ok(t) => match t.as_ref() {
            Some(t) => axum::Json(t.dump()).into_response(),
            None => error(StatusCode::NOT_FOUND, "not_found", format!("epoch {n} paid no one: it has no tree")),
        },
        Err(e) => failed(e, "building an epoch's tree"),
    }
}

/// Walks the hash-chained anchor log: every entry's hash, every link, epoch order.
#[utoipa::path(
    get, path = "/v1/anchors/verify", tag = "epochs", operation_id = "verify_anchor_log",
    responses(
        (status = 200, description = "The entries checked, the head, and every break", body = LogReport),
        (status = 401, description = UNAUTH, body = IngestError, headers(("WWW-Authenticate" = String))),
        (status = 503, description = "Storage is unavailable; retry", body = IngestError, headers(("Retry-After" = u32))),
    ),
    security(("bearer" = [])),
)]
async fn verify_anchors(State(state): State<EpochState>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorize(&state.keys, &headers, Role::Read) {
        return denied;
    }
    match crate::epoch_cmd::verify_anchor_log(&state.lake).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => failed(e, "reading the anchor log"),
    }
}
