//! `ledgerlake-sql`: one read-only SQL engine (DataFusion) over every Delta table of the
//! lakehouse.
//!
//! - Every query plans against the newest committed version of each table it names, so it
//!   sees every acknowledged write; within one query each table is one snapshot.
//! - Time travel: `at_version('table', N)` and `at_timestamp('table', '2026-11-24T10:00:00Z')`
//!   are table functions.
//! - Named views (`sql/views/*.sql`) are registered at start-up.
//! - Only queries run: DDL, DML, `COPY` and statements are rejected; each query runs under
//!   a memory limit (spilling where DataFusion can) and a timeout.
//!
//! The engine knows the lake through `ledgerlake-lakehouse` only. `http` serves
//! `POST /v1/sql`; `flight` serves Arrow Flight SQL and plain Flight. Both ask the
//! caller's [`auth::Authorize`] who may do what (this crate knows no API keys), and
//! Flight `DoPut` hands events to the caller's [`flight::EventSink`] (this crate does not
//! store events).

pub mod auth;
mod bounded;
mod catalog;
mod engine;
pub mod flight;
pub mod format;
pub mod http;
mod timetravel;

pub use engine::{Described, QueryLimits, Relation, SqlEngine, VIEWS};
pub use format::Format;

/// Everything a query can fail with, by whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The query is not valid SQL, names something that does not exist, or is not allowed.
    #[error("{0}")]
    BadQuery(String),
    /// The statement would change something: only queries run here.
    #[error("only read-only queries are allowed: {0}")]
    NotReadOnly(String),
    /// The query ran past its time limit and was cancelled.
    #[error("query cancelled after the {0:?} time limit")]
    Timeout(std::time::Duration),
    /// The query needed more memory than its limit, even spilling.
    #[error("query exceeded its memory limit: {0}")]
    MemoryLimit(String),
    /// The lake could not be read (its log or its files). Retrying may work. The message
    /// names no storage internals; the source goes to the server's log.
    #[error("the lake could not be read; retry later")]
    Lake(#[from] ledgerlake_lakehouse::Error),
    /// The object store failed while the query ran (an outage, a timeout). Retrying may
    /// work. The detail is for the log, not the caller.
    #[error("the lake's storage is unavailable; retry later")]
    Unavailable(String),
    /// Anything else DataFusion reports while executing.
    #[error("query failed: {0}")]
    Execution(String),
    /// The caller's key already runs as many queries as one key may at once: retry when
    /// one ends (HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED).
    #[error("this key already runs {0} queries at once, the most one key may: retry when one ends")]
    Busy(usize),
    /// The answer grew past the bytes one answer may hold (`sql_answer_byte_limit`): the
    /// caller's fault; select less or page with LIMIT/OFFSET.
    #[error("the answer is over {0} bytes, the most one answer may hold: select less, or page with LIMIT and OFFSET")]
    AnswerTooLarge(u64),
}

impl From<datafusion::error::DataFusionError> for Error {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        use datafusion::error::DataFusionError as D;
        if storage_fault(&e) {
            return Error::Unavailable(e.strip_backtrace());
        }
        match e.find_root() {
            D::ResourcesExhausted(m) => Error::MemoryLimit(m.clone()),
            // The engine's own deadline, raised from inside the result stream.
            D::External(inner) => match inner.downcast_ref::<Error>() {
                Some(Error::Timeout(limit)) => Error::Timeout(*limit),
                Some(Error::AnswerTooLarge(limit)) => Error::AnswerTooLarge(*limit),
                _ => Error::Execution(e.strip_backtrace()),
            },
            D::SQL(..) | D::Plan(..) | D::SchemaError(..) | D::NotImplemented(..) => Error::BadQuery(e.strip_backtrace()),
            _ => Error::Execution(e.strip_backtrace()),
        }
    }
}

impl Error {
    /// Whether the fault is the storage's (503 / UNAVAILABLE: retry) rather than the
    /// query's. Logs the detail the caller does not see.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Lake(e) => {
                tracing::warn!(error = %e, "the lake could not be read for a query");
                true
            }
            Error::Unavailable(detail) => {
                tracing::warn!(error = %detail, "storage failed during a query");
                true
            }
            _ => false,
        }
    }
}

/// Whether a DataFusion error comes from storage: the object store, I/O, or the Delta log
/// under a table, anywhere in its chain of causes.
fn storage_fault(e: &datafusion::error::DataFusionError) -> bool {
    use datafusion::error::DataFusionError as D;
    match e {
        D::ObjectStore(_) | D::IoError(_) => true,
        D::External(inner) => chain_has_storage(inner.as_ref()),
        D::ParquetError(p) => chain_has_storage(p.as_ref()),
        D::ArrowError(a, _) => chain_has_storage(a.as_ref()),
        D::Context(_, inner) => storage_fault(inner),
        D::Shared(inner) => storage_fault(inner),
        _ => false,
    }
}

fn chain_has_storage(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if err.is::<object_store::Error>()
            || err.is::<std::io::Error>()
            || err.is::<deltalake::DeltaTableError>()
            || err.is::<ledgerlake_lakehouse::Error>()
            || err.downcast_ref::<datafusion::error::DataFusionError>().is_some_and(storage_fault)
        {
            return true;
        }
        current = err.source();
    }
    false
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
