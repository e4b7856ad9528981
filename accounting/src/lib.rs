//! `ledgerlake-accounting`: what a served completion costs and how its charge reaches the
//! lake, exactly once and never lost.
//!
//! - [`charge`]: the two events one completion produces (`inference.completed` and
//!   `fee.charged`), priced by the fee rule of [`ledgerlake_lakehouse::pricing`].
//! - [`spool`]: a local directory where those events are made durable (written, fsynced,
//!   renamed) before the caller sees the end of its answer; files that cannot be read or
//!   that the lake refuses are moved to a quarantine, never deleted.
//! - [`forward`]: the task that drains the spool into the [`ledgerlake_ingest::Ingestor`]
//!   and deletes a file only once its events are durable in the lake.
//!
//! It knows nothing of HTTP or of the model: serving reports a [`charge::Metered`]
//! completion, the binary wires the two together.

pub mod charge;
pub mod forward;
pub mod metrics;
pub mod spool;

pub use charge::{Cited, Metered, TokenIds};
pub use metrics::SpoolMetrics;
pub use spool::Spool;

/// What accounting can fail with, by whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The completion's numbers are outside the contract (too many tokens, a price over
    /// the limit): the server must not have served it. Caller or configuration.
    #[error(transparent)]
    Pricing(#[from] ledgerlake_lakehouse::PricingError),
    /// A field of the completion does not make a valid event (an id that is not an id):
    /// a bug in whoever built the completion.
    #[error("invalid {field} in a completion's events: {message}")]
    InvalidEvent { field: String, message: String },
    /// The spool's disk failed; nothing was made durable. Storage.
    #[error("spool i/o on {path}: {source}")]
    Storage {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The lake did not take the spooled events; they stay in the spool. Storage.
    #[error("the lake did not take spooled events: {0}")]
    Ingest(#[from] ledgerlake_ingest::Error),
    /// An operator named a file the quarantine does not hold. Caller.
    #[error("{0} is not in the quarantine")]
    NotQuarantined(String),
    /// An operator asked to re-drive a file that still cannot be read. Caller.
    #[error("{file} still cannot be read: {reason}")]
    Unreadable { file: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Storage { path: path.display().to_string(), source }
}
