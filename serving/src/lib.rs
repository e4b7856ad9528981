//! `ledgerlake-serving`: one base model answering for many LoRA adapters.
//!
//! This first part holds the adapters: PEFT's on-disk format (`adapter_config.json` plus
//! `adapter_model.safetensors`) and the batched low-rank update that lets one batch mix
//! rows of different adapters (and of the bare base model) around a single base matmul,
//! the shrink/expand of Punica's SGMV, with no merge or unmerge of weights per switch.
//! The model, the scheduler and the API build on it.
//!
//! It knows nothing of the lake yet; inference and fee events will reach ingest through
//! the binary.

pub mod engine;
pub mod http;
pub mod lora;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod pretrain;
pub mod sampling;
pub mod tokenizer;

/// What loading or applying an adapter can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `adapter_config.json` is missing a field we need or holds a value we cannot use.
    #[error("adapter config {path}: {message}")]
    Config { path: String, message: String },
    /// The weights do not match the config or each other.
    #[error("adapter weights: {0}")]
    Weights(String),
    /// `tokenizer.json` could not be loaded, trained or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tensor operation failed (shapes, devices, dtypes).
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
