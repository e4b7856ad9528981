//! `GET /v1/attributions/{inference_id}`: the explanation of one inference over HTTP. Glue:
//! `ledgerlake_attribution::explain` does the work; any key that may read may ask.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ledgerlake_attribution::explain::{self, Explanation};
use ledgerlake_ingest::http::{IngestError, IngestErrorDetail};
use ledgerlake_ingest::{ApiKeys, Role};
use ledgerlake_lakehouse::{InferenceId, Lake};
use ledgerlake_serving::tokenizer::Tokenizer;
use utoipa::OpenApi;

#[derive(Clone)]
pub struct AttributionState {
    pub lake: Lake,
    pub keys: Arc<ApiKeys>,
    pub tokenizer: Arc<Tokenizer>,
}

#[derive(OpenApi)]
#[openapi(paths(show), components(schemas(Explanation, explain::Contribution)))]
pub struct ApiDoc;

pub fn router(state: AttributionState) -> Router {
    Router::new().route("/v1/attributions/{inference_id}", get(show)).with_state(state)
}

/// An error answer in ingest's JSON shape.
pub(crate) fn error(status: StatusCode, code: &str, message: String) -> Response {
    let mut resp = (status, axum::Json(IngestError { error: IngestErrorDetail { code: code.to_owned(), message } })).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    resp
}

/// Checks the request's key against `role`: the answer to send when it fails.
pub(crate) fn authorize(keys: &ApiKeys, headers: &HeaderMap, role: Role) -> Result<(), Response> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    keys.authorize(authorization, role).map(|_| ()).map_err(|e| match e {
        ledgerlake_ingest::Error::Forbidden { .. } => error(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
        _ => error(StatusCode::UNAUTHORIZED, "unauthorized", "missing or unknown API key: send Authorization: Bearer <key>".into()),
    })
}

/// The contributions one inference is attributed to, heaviest first, with their shares and
/// the output's matched text marked «like this» (`docs/attribution.md`).
#[utoipa::path(
    get, path = "/v1/attributions/{inference_id}", tag = "attribution", operation_id = "show_attribution",
    params(("inference_id" = String, Path, description = "The id of a completion (`cmpl-...`)")),
    responses(
        (status = 200, description = "What attribution says of it: attributed, unattributed or pending", body = Explanation),
        (status = 400, description = "Not an inference id", body = IngestError),
        (status = 401, description = "No or unknown API key", body = IngestError, headers(("WWW-Authenticate" = String))),
        (status = 404, description = "Neither its token ids nor an attribution are stored", body = IngestError),
        (status = 503, description = "Storage is unavailable; retry", body = IngestError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
async fn show(State(state): State<AttributionState>, headers: HeaderMap, Path(inference_id): Path<String>) -> Response {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let principal = match state.keys.authorize(authorization, Role::Read) {
        Ok(p) => p,
        Err(_) => return error(StatusCode::UNAUTHORIZED, "unauthorized", "missing or unknown API key: send Authorization: Bearer <key>".into()),
    };
    let id: InferenceId = match inference_id.parse() {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", format!("{e}")),
    };
    // An answer's text is its caller's (and an admin's): anyone else is told it is not
    // there, as for an id never served (docs/security.md).
    if principal.role != Role::Admin {
        // An inference id is letters, digits and `_ . : -`: nothing to escape.
        let filter = format!("inference_id = '{id}'");
        match ledgerlake_lakehouse::snapshot::read_events(&state.lake, ledgerlake_lakehouse::EventKind::InferenceCompleted, None, &filter).await {
            Ok((_, events)) => {
                let theirs = events.iter().any(|e| matches!(e, ledgerlake_lakehouse::Event::InferenceCompleted(i) if i.caller == principal.id));
                if !theirs {
                    return error(StatusCode::NOT_FOUND, "not_found", format!("ledgerlake has neither the token ids nor an attribution of {id} for this key"));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, inference = %id, "reading an inference's caller");
                return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "storage is unavailable; retry".into());
            }
        }
    }
    let decode = |ids: &[u32]| state.tokenizer.decode(ids).unwrap_or_default();
    match explain::explain(&state.lake, &id, &decode).await {
        Ok(Some(e)) => axum::Json(e).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", format!("ledgerlake has neither the token ids nor an attribution of {id}")),
        Err(e) => {
            tracing::error!(error = %e, inference = %id, "explaining an attribution");
            error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "storage is unavailable; retry".into())
        }
    }
}
