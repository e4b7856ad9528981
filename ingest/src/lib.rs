//! `ledgerlake-ingest` takes events from the outside world into the lakehouse: it parses
//! and validates them (types, signatures, state rules), authenticates callers by API key,
//! applies backpressure, and writes them exactly once through group commit.
//!
//! It knows nothing about SQL, serving or attribution; it knows the lake only through
//! `ledgerlake-lakehouse`.

pub mod auth;
pub mod authority;
pub mod demo;
pub mod documents;
pub mod http;
pub mod sign;
pub mod validate;
pub mod writer;

pub use auth::{ApiKeys, Principal, Role};
pub use authority::Submitter;
pub use writer::{Ingestor, Receipt, WriterConfig};

/// What can go wrong while ingesting, by whose fault it is. Each variant maps to one HTTP
/// status in [`http`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The body is not parseable as a whole (400).
    #[error("malformed body: {0}")]
    MalformedBody(String),
    /// The `Content-Type` is not one ingest reads (415).
    #[error("unsupported content type {0:?}: send application/json, application/x-ndjson or application/vnd.apache.arrow.stream")]
    UnsupportedMediaType(String),
    /// The body is larger than the configured limit (413).
    #[error("payload larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// More events in one request than the queue holds (413).
    #[error("{events} events in one request; the limit is {limit}")]
    BatchTooLarge { events: usize, limit: usize },
    /// The queue is full; retry later (503 with Retry-After).
    #[error("ingest queue is full, retry shortly")]
    Overloaded,
    /// Nothing was acknowledged because storage or the writer failed; retrying is safe (503).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// No or unknown API key (401).
    #[error("missing or unknown API key: send Authorization: Bearer <key>")]
    Unauthorized,
    /// The key's role does not allow this (403).
    #[error("this API key has role {have}, this needs {need}")]
    Forbidden { have: Role, need: Role },
    /// A bad request parameter (400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A document the caller gave cannot be read as text (unsupported type, broken file).
    #[error("{path}: {reason}")]
    Document { path: String, reason: String },
    #[error(transparent)]
    Lake(#[from] ledgerlake_lakehouse::Error),
    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
