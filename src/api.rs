//! The OpenAPI 3.1 document of the HTTP API: each library crate documents its own routes
//! from its handlers' types; the binary merges the parts, adds the bearer-key scheme and
//! serves the whole at `GET /openapi.json` (and prints it: `ledgerlake openapi`).

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{InfoBuilder, LicenseBuilder};

/// The route of the document itself.
#[derive(OpenApi)]
#[openapi(paths(openapi_json), tags((name = "meta", description = "About this API")))]
struct MetaDoc;

/// This document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this server", body = Object, content_type = "application/json")),
)]
async fn openapi_json(axum::extract::State(doc): axum::extract::State<Arc<String>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], doc.as_str().to_owned())
}

/// The whole document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = MetaDoc::openapi();
    doc.merge(ledgerlake_ingest::http::ApiDoc::openapi());
    doc.merge(ledgerlake_sql::http::ApiDoc::openapi());
    doc.merge(ledgerlake_serving::http::ApiDoc::openapi());
    doc.merge(ledgerlake_factory::http::ApiDoc::openapi());
    doc.merge(crate::attribution_http::ApiDoc::openapi());
    doc.merge(crate::epoch_http::ApiDoc::openapi());
    doc.info = InfoBuilder::new()
        .title("ledgerlake")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "Events into a Delta Lake lakehouse, read-only SQL over it, OpenAI-compatible serving of a base model and its LoRA adapters, \
             fine-tuning of adapters on datanets, the attribution of every answer to the contributions that shaped it, \
             and reward epochs that split fees exactly, with Merkle proofs to claim them. \
             Errors say whose fault they are: 4xx the caller's (nothing changed), 503 with Retry-After the server's storage or load (retry).",
        ))
        .license(Some(LicenseBuilder::new().name("Apache-2.0").identifier(Some("Apache-2.0")).build()))
        .build();
    doc.components.get_or_insert_with(Default::default).add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some("An API key (`ledgerlake apikey`): read; ingest and builder (bound to an address) include read; admin includes all"))
                .build(),
        ),
    );
    doc
}

/// `GET /openapi.json`.
pub fn router() -> anyhow::Result<Router> {
    let json = Arc::new(document().to_json()?);
    Ok(Router::new().route("/openapi.json", get(openapi_json)).with_state(json))
}
