//! `ledgerlake-lakehouse` owns the data contract of ledgerlake: typed ids and amounts, the
//! event kinds with their Arrow schemas, the Delta tables they live in (on a local directory
//! or S3-compatible object storage), and the persistent index that makes ingest exactly-once.
//!
//! It knows nothing about HTTP, authentication or signatures' transport: callers hand it
//! validated [`events::Event`]s.

pub mod authority;
pub mod deployment;
pub mod events;
pub mod ids;
pub mod index;
pub mod lake;
pub mod messages;
pub mod pricing;
pub mod snapshot;

pub use authority::Authority;
pub use deployment::Deployment;
pub use events::{Event, EventKind};
pub use ids::{Address, Amount, Bytes32, ContributionId, DatanetId, EventId, InferenceId, ModelId, Sha256Hex, Signature};
pub use lake::{Lake, LakeConfig, TableInfo};
pub use pricing::{Price, PricingError};

/// Everything that can go wrong in the lakehouse, by whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller named an event kind the contract does not have.
    #[error("unknown event kind {0:?}")]
    UnknownKind(String),
    /// The storage location is not one ledgerlake can use.
    #[error("invalid storage location {url:?}: {reason}")]
    InvalidLocation { url: String, reason: String },
    /// The caller named a datanet that was never created.
    #[error("datanet {0} does not exist")]
    UnknownDatanet(String),
    /// The caller named a snapshot (`D@V`) that is malformed or that the lake does not have.
    #[error("snapshot {given:?}: {reason}")]
    BadSnapshot { given: String, reason: String },
    /// A table on storage does not have the schema this version of ledgerlake writes.
    #[error("table {table} has an unexpected schema: {reason}")]
    SchemaMismatch { table: String, reason: String },
    /// Delta Lake (the log, the object store behind it) failed.
    #[error("delta table {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: deltalake::DeltaTableError,
    },
    /// Another writer committed first; the caller should catch up and retry.
    #[error("table {table}: another writer committed version {version} first")]
    CommitConflict { table: String, version: u64 },
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// The local dedupe index failed.
    #[error("index at {path}: {reason}")]
    Index { path: String, reason: String },
    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A bug: an invariant of this crate did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
