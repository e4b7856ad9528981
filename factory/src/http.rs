//! The training API: `POST /v1/training/jobs` and what follows a job. Builder keys act as
//! their address and see only their own jobs; admin keys name the builder and see all.
//! Errors have ingest's shape, `{"error": {"code", "message"}}`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::Stream;
use ledgerlake_ingest::http::{IngestError, IngestErrorDetail};
use ledgerlake_ingest::{ApiKeys, Principal, Role};
use ledgerlake_lakehouse::Address;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use utoipa::{OpenApi, ToSchema};

use crate::jobs::{Job, Jobs, Update};
use crate::{Error, FinetuneSpec};

/// The largest request body (a prompt set rides in it).
pub const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Clone)]
pub struct TrainingState {
    pub jobs: Jobs,
    pub keys: Arc<ApiKeys>,
}

pub fn router(state: TrainingState) -> Router {
    Router::new()
        .route("/v1/training/jobs", get(list).post(submit))
        .route("/v1/training/jobs/{id}", get(show).delete(cancel))
        .route("/v1/training/jobs/{id}/events", get(events))
        .with_state(state)
}

/// The part of the API document these routes make.
#[derive(OpenApi)]
#[openapi(
    paths(submit, list, show, events, cancel),
    components(schemas(JobRequest, Job, JobList, crate::jobs::JobStatus, FinetuneSpec, crate::PromptCase, crate::StepReport, Note)),
    tags((name = "training", description = "ModelFactory: LoRA and QLoRA fine-tuning jobs on datanet snapshots, trained one at a time, registered and served when done")),
)]
pub struct ApiDoc;

/// The body of `POST /v1/training/jobs`: a fine-tuning request (the fields of
/// `ledgerlake model finetune`) and, for an admin key, the builder it is for. Unknown
/// fields are refused. (The serde derive gives the schema its shape, the spec's fields
/// beside `builder`; [`JobRequest::parse`] reads it.)
#[derive(Deserialize, ToSchema)]
pub struct JobRequest {
    /// The address the adapter is trained for: required with an admin key; a builder key
    /// trains as the address it is bound to (naming another is refused).
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed")]
    pub builder: Option<Address>,
    #[serde(flatten)]
    pub spec: FinetuneSpec,
}

impl JobRequest {
    /// Parses the body. (serde's `flatten` would let unknown fields of the spec through.)
    pub fn parse(bytes: &[u8]) -> Result<JobRequest, Error> {
        let bad = |e: serde_json::Error| Error::Invalid(format!("expected a training request: {e}"));
        let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(bad)?;
        let builder = match value.as_object_mut().and_then(|o| o.remove("builder")) {
            None | Some(serde_json::Value::Null) => None,
            Some(b) => Some(serde_json::from_value(b).map_err(|e| Error::Invalid(format!("builder: {e}")))?),
        };
        Ok(JobRequest { builder, spec: serde_json::from_value(value).map_err(bad)? })
    }
}

/// Jobs, newest first.
#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub data: Vec<Job>,
}

/// A `note` server-sent event.
#[derive(Serialize, ToSchema)]
pub struct Note {
    pub message: String,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Error::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::Lake(ledgerlake_lakehouse::Error::BadSnapshot { .. }) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::Lake(ledgerlake_lakehouse::Error::UnknownDatanet(_)) | Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::AccessDenied { .. } | Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Error::Lake(_) | Error::Io { .. } | Error::Report(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Error::Model(_) | Error::Cancelled => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let message = match &self {
            // Storage internals (endpoints, paths) go to the log, not to the client.
            Error::Lake(ledgerlake_lakehouse::Error::BadSnapshot { .. } | ledgerlake_lakehouse::Error::UnknownDatanet(_)) => self.to_string(),
            Error::Lake(_) | Error::Io { .. } | Error::Report(_) => {
                tracing::error!(error = %self, "storage error in the training API");
                "storage is unavailable; nothing was queued, retry".to_owned()
            }
            other => other.to_string(),
        };
        let mut resp = (status, axum::Json(IngestError { error: IngestErrorDetail { code: code.to_owned(), message } })).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// A builder or admin key.
fn authorize(state: &TrainingState, headers: &HeaderMap) -> Result<Principal, Error> {
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    state.keys.authorize(header, Role::Builder).map_err(|e| match e {
        ledgerlake_ingest::Error::Forbidden { have, .. } => Error::Forbidden(format!("this API key has role {have}; training needs a builder or admin key")),
        _ => Error::Unauthorized,
    })
}

/// Whether this caller may see `job`: an admin sees all, a builder its own.
fn may_see(principal: &Principal, job: &Job) -> bool {
    principal.role == Role::Admin || principal.address == Some(job.builder)
}

/// Job `id` if this caller may see it (another builder's is not found).
fn visible(state: &TrainingState, principal: &Principal, id: &str) -> Result<Job, Error> {
    state.jobs.get(id).filter(|j| may_see(principal, j)).ok_or_else(|| Error::NotFound(format!("no training job {id}")))
}

/// Queues a fine-tuning job.
///
/// The request is planned now: every datanet must be public or granted to the builder
/// (403 names the first that is not) and is pinned to its newest snapshot unless `D@V`
/// names one. The job's id is its run id, so the same request again is the same job: a
/// queued, running or succeeded one is returned as it is (200), a failed or cancelled one
/// is queued again and resumes from its checkpoint (202).
#[utoipa::path(
    post, path = "/v1/training/jobs", tag = "training",
    request_body(content = JobRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Queued; `Location` is the job", body = Job, headers(("Location" = String))),
        (status = 200, description = "The same request is a job already", body = Job),
        (status = 400, description = "A bad request: a body that breaks off, an unknown field, a bad value, nothing to train on, QLoRA over a dense base", body = IngestError),
        (status = 401, description = "No or unknown API key", body = IngestError, headers(("WWW-Authenticate" = String))),
        (status = 403, description = "Not a builder or admin key, a builder naming another address, or a datanet the builder may not train on", body = IngestError),
        (status = 404, description = "A datanet that does not exist", body = IngestError),
        (status = 413, description = "The body is over 1 MiB", body = IngestError),
        (status = 503, description = "The queue is full or storage is unavailable; retry", body = IngestError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
async fn submit(State(state): State<TrainingState>, headers: HeaderMap, body: Body) -> Result<Response, Error> {
    let principal = authorize(&state, &headers)?;
    // Ingest's reader: 413 over the limit, 400 for a body that breaks off.
    let bytes = match ledgerlake_ingest::http::read_body(&headers, body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => return Ok(e.into_response()),
    };
    let req = JobRequest::parse(&bytes)?;
    let builder = match (principal.role, principal.address, req.builder) {
        (Role::Admin, _, Some(b)) => b,
        (Role::Admin, _, None) => return Err(Error::Invalid("an admin key names the builder the adapter is for: give `builder`".into())),
        (_, Some(own), None) => own,
        (_, Some(own), Some(b)) if b == own => own,
        (_, Some(own), Some(b)) => return Err(Error::Forbidden(format!("this builder key trains as {own}, not {b}"))),
        (_, None, _) => return Err(Error::Forbidden("this builder key is bound to no address".into())),
    };
    let (job, queued) = state.jobs.submit(builder, &principal.id, req.spec).await?;
    let status = if queued { StatusCode::ACCEPTED } else { StatusCode::OK };
    let mut resp = (status, axum::Json(&job)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/training/jobs/{}", job.id)) {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    Ok(resp)
}

/// The caller's jobs (an admin's: all), newest first.
#[utoipa::path(
    get, path = "/v1/training/jobs", tag = "training",
    responses(
        (status = 200, description = "Jobs", body = JobList),
        (status = 401, description = "No or unknown API key", body = IngestError),
        (status = 403, description = "Not a builder or admin key", body = IngestError),
    ),
    security(("bearer" = [])),
)]
async fn list(State(state): State<TrainingState>, headers: HeaderMap) -> Result<axum::Json<JobList>, Error> {
    let principal = authorize(&state, &headers)?;
    let data = state.jobs.list().into_iter().filter(|j| may_see(&principal, j)).collect();
    Ok(axum::Json(JobList { data }))
}

/// A job: its status, per-step metrics, evaluation and adapter.
#[utoipa::path(
    get, path = "/v1/training/jobs/{id}", tag = "training",
    params(("id" = String, Path, description = "The job (run) id")),
    responses(
        (status = 200, description = "The job", body = Job),
        (status = 401, description = "No or unknown API key", body = IngestError),
        (status = 403, description = "Not a builder or admin key", body = IngestError),
        (status = 404, description = "No such job of this builder", body = IngestError),
    ),
    security(("bearer" = [])),
)]
async fn show(State(state): State<TrainingState>, headers: HeaderMap, Path(id): Path<String>) -> Result<axum::Json<Job>, Error> {
    let principal = authorize(&state, &headers)?;
    Ok(axum::Json(visible(&state, &principal, &id)?))
}

/// Cancels a job: a queued one at once (200), a running one at its next step (202: the job
/// says `cancel_requested`, then `cancelled`; its checkpoint stays, so submitting the same
/// request again resumes it).
#[utoipa::path(
    delete, path = "/v1/training/jobs/{id}", tag = "training",
    params(("id" = String, Path, description = "The job (run) id")),
    responses(
        (status = 200, description = "Cancelled", body = Job),
        (status = 202, description = "Cancelling: the running job stops at its next step", body = Job),
        (status = 401, description = "No or unknown API key", body = IngestError),
        (status = 403, description = "Not a builder or admin key", body = IngestError),
        (status = 404, description = "No such job of this builder", body = IngestError),
        (status = 409, description = "The job is over already", body = IngestError),
    ),
    security(("bearer" = [])),
)]
async fn cancel(State(state): State<TrainingState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, Error> {
    let principal = authorize(&state, &headers)?;
    visible(&state, &principal, &id)?;
    let job = state.jobs.cancel(&id)?;
    let status = if job.status.is_final() { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok((status, axum::Json(job)).into_response())
}

/// A job's progress as server-sent events: `status` (the whole job: first, and at every
/// change of status), `progress` (a step report, after every step) and `note` (`{"message"}`:
/// resumed, evaluating). The stream ends after the status that ends the job.
#[utoipa::path(
    get, path = "/v1/training/jobs/{id}/events", tag = "training",
    params(("id" = String, Path, description = "The job (run) id")),
    responses(
        (status = 200, description = "`text/event-stream` of `status` (Job), `progress` (StepReport) and `note` (Note) events", content_type = "text/event-stream", body = String),
        (status = 401, description = "No or unknown API key", body = IngestError),
        (status = 403, description = "Not a builder or admin key", body = IngestError),
        (status = 404, description = "No such job of this builder", body = IngestError),
    ),
    security(("bearer" = [])),
)]
async fn events(State(state): State<TrainingState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Error> {
    let principal = authorize(&state, &headers)?;
    // Subscribed before the job is read, so nothing between the two is missed.
    let rx = state.jobs.subscribe();
    let job = visible(&state, &principal, &id)?;
    let first = status_event(&job);
    let over = job.status.is_final();
    let stream = futures::stream::unfold((rx, over, Some(first), state.jobs.clone()), move |(mut rx, over, first, jobs)| {
        let id = id.clone();
        async move {
            if let Some(first) = first {
                return Some((Ok(first), (rx, over, None, jobs)));
            }
            if over {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok((job_id, update)) if job_id == id => {
                        let (event, over) = match update {
                            Update::Status(job) => (status_event(&job), job.status.is_final()),
                            Update::Progress(r) => (json_event("progress", &r), false),
                            Update::Note(message) => (json_event("note", &Note { message }), false),
                        };
                        return Some((Ok(event), (rx, over, None, jobs)));
                    }
                    Ok(_) => {}
                    // Too slow a reader skips to the job's current state.
                    Err(RecvError::Lagged(_)) => {
                        let job = jobs.get(&id)?;
                        let over = job.status.is_final();
                        return Some((Ok(status_event(&job)), (rx, over, None, jobs)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn json_event<T: Serialize>(name: &str, data: &T) -> SseEvent {
    SseEvent::default().event(name).data(serde_json::to_string(data).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")))
}

fn status_event(job: &Job) -> SseEvent {
    json_event("status", job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_request_refuses_unknown_fields_and_takes_the_builder_apart() {
        let r = JobRequest::parse(br#"{"datanets": ["d"], "name": "m", "builder": "0x00000000000000000000000000000000000000aa"}"#).unwrap();
        assert_eq!(r.builder, Some("0x00000000000000000000000000000000000000aa".parse().unwrap()));
        assert_eq!(r.spec.name.to_string(), "m");
        assert!(JobRequest::parse(br#"{"datanets": ["d"], "name": "m"}"#).unwrap().builder.is_none());
        for bad in [&br#"{"datanets": ["d"], "name": "m", "ranks": 3}"#[..], br#"{"datanets": ["d"], "name": "m", "builder": "0x12"}"#, b"[]", b"{"] {
            assert!(matches!(JobRequest::parse(bad), Err(Error::Invalid(_))), "{}", String::from_utf8_lossy(bad));
        }
    }
}
