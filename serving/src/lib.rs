//! `ledgerlake-serving`: one base model answering for many LoRA adapters.
//!
//! This first part holds the adapters: PEFT's on-disk format (`adapter_config.json` plus
//! `adapter_model.safetensors`) and the batched low-rank update that lets one batch mix
//! rows of different adapters (and of the bare base model) around a single base matmul,
//! the shrink/expand of Punica's SGMV, with no merge or unmerge of weights per switch.
//! The model, the scheduler and the API build on it.
//!
//! Inference and fee events leave through the engine's `CompletionSink`; the binary
//! connects that to ingest. CPU by default; `--features cuda` adds the CUDA backend.

pub mod chat;
pub mod checkpoint;
pub mod engine;
mod exact;
pub mod finetune;
pub mod gguf;
pub mod http;
pub mod kernels;
pub mod llamacpp;
pub mod lora;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod pretrain;
pub mod quant;
pub mod retrieval;
pub mod roots;
pub mod sampling;
pub mod tokenizer;

/// The compute device named by `cpu`, `cuda` or `cuda:N`. A CUDA device needs a build
/// with `--features cuda` and a GPU; without either the error says which is missing.
pub fn device(spec: &str) -> Result<candle_core::Device> {
    let bad = |message: String| Error::Device { spec: spec.to_owned(), message };
    match spec.trim() {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => cuda(0).map_err(bad),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal).map_err(bad),
            _ => Err(bad("expected cpu, cuda or cuda:N".into())),
        },
    }
}

fn cuda(ordinal: usize) -> std::result::Result<candle_core::Device, String> {
    if !candle_core::utils::cuda_is_available() {
        return Err("this build has no CUDA backend: build with `--features cuda`".into());
    }
    candle_core::Device::new_cuda(ordinal).map_err(|e| format!("no usable GPU {ordinal}: {e}"))
}

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
    /// A conversation the chat template refuses or cannot render (the caller's messages).
    #[error("{0}")]
    Chat(String),
    /// A GGUF file this server cannot serve (the message names what is missing or
    /// unsupported).
    #[error("GGUF {path}: {message}")]
    Gguf { path: String, message: String },
    /// A device name that this build or machine cannot provide.
    #[error("device {spec:?}: {message}")]
    Device { spec: String, message: String },
    /// A tensor operation failed (shapes, devices, dtypes).
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
