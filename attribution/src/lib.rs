//! `ledgerlake-attribution`: Proof of Attribution and what it pays. Which contributions
//! shaped an inference, by three methods: verbatim spans of the output found in the
//! contributions ([`spans`], an infini-gram-style suffix-array index), gradient influence
//! for adapters with a known training set, and the citations of retrieval. Then reward
//! epochs: each epoch's fees split exactly ([`epochs`]), recorded and anchored
//! ([`epoch_job`], [`anchor`]) under an OpenZeppelin-compatible Merkle root ([`merkle`]).
//!
//! It knows the lake only through `lakehouse`; nothing of HTTP, of models or of tokenizers
//! (callers hand it token ids and features).

pub mod anchor;
pub mod combine;
pub mod epoch_job;
pub mod epochs;
pub mod explain;
pub mod gradient;
pub mod retrieval;
pub mod job;
pub mod merkle;
pub mod span_method;
pub mod spans;
pub mod weights;

pub use span_method::{Evidence, SpanRule, span_scores};
pub use spans::{DocKey, Hit, Shard, Span, SpanIndex, parse_tokenized};
pub use combine::{Mix, Part, combine};
pub use gradient::{Influence, Kernel, TrainFeatures};
pub use retrieval::{Passage, RetrievalIndex};
pub use weights::{WEIGHT_SCALE, apportion};

/// What attribution can fail with, by whose fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller asked for something that cannot be done (its input).
    #[error("{0}")]
    Invalid(String),
    /// Local files could not be read or written (storage).
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading the lake failed (storage).
    #[error("reading the lake: {0}")]
    Lake(String),
    /// Stored index files are damaged or from another format (storage).
    #[error("corrupt attribution index: {0}")]
    Corrupt(String),
    /// A bug or a library failure (ours).
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// Whether the caller is at fault.
    pub fn is_caller(&self) -> bool {
        matches!(self, Error::Invalid(_))
    }
}
