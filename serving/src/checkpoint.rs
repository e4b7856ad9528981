//! What `--model PATH` names: a GGUF file, or a Hugging Face checkpoint directory
//! (`config.json`, `*.safetensors`, `tokenizer.json`, and the chat template of
//! `tokenizer_config.json` when it has one).

use std::path::Path;

use candle_core::{DType, Device};

use crate::chat::ChatTemplate;
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// A base model ready to serve.
pub struct Checkpoint {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// The name it answers to by default: the file's or directory's name as a model id
    /// (lowercase; other characters become `-`), e.g. `smollm2-135m-instruct.q4_1`.
    pub name: String,
    /// `gguf` or `safetensors`.
    pub format: &'static str,
    /// Bytes of the checkpoint on disk.
    pub file_bytes: u64,
}

/// A model id from a file or directory name.
pub fn model_id(name: &str) -> String {
    let id: String = name
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '-' })
        .collect();
    let id = id.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    if id.is_empty() { "model".to_owned() } else { id.chars().take(128).collect() }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

/// `bos_token` / `eos_token` of a `tokenizer_config.json`: a string or `{"content": ...}`.
fn special_text(config: &serde_json::Value, key: &str) -> String {
    match &config[key] {
        serde_json::Value::String(s) => s.clone(),
        other => other["content"].as_str().unwrap_or("").to_owned(),
    }
}

/// Loads `path`: a `.gguf` file or a checkpoint directory.
pub fn load(path: &Path, device: &Device) -> Result<Checkpoint> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let stem = path.file_stem().or(path.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if meta.is_file() {
        let loaded = crate::gguf::load(path, device)?;
        return Ok(Checkpoint { model: loaded.model, tokenizer: loaded.tokenizer, name: model_id(&stem), format: "gguf", file_bytes: meta.len() });
    }
    let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or(stem);
    let model = Llama::load(path, device, DType::F32)?;
    let mut tokenizer = Tokenizer::load(&path.join("tokenizer.json"), model.config.bos_token_id)?;
    let config_path = path.join("tokenizer_config.json");
    if config_path.is_file() {
        let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Config { path: config_path.display().to_string(), message: e.to_string() })?;
        // One template, or a list of named ones of which `default` is the chat template.
        let source = match &config["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(list) => {
                list.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()).map(str::to_owned)
            }
            _ => None,
        };
        if let Some(source) = source {
            tokenizer = tokenizer.with_chat(ChatTemplate::new(&source, &special_text(&config, "bos_token"), &special_text(&config, "eos_token"))?);
        }
    }
    let mut file_bytes = 0;
    for entry in std::fs::read_dir(path).map_err(io(path))?.flatten() {
        file_bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
    }
    Ok(Checkpoint { model, tokenizer, name: model_id(&name), format: "safetensors", file_bytes })
}
