//! Wiring serving into `ledgerlake up`: the base model, adapters registered in the lake,
//! and the accounting of every completion as `inference.completed` + `fee.charged`
//! events through a durable local spool into ingest.
//!
//! A completion's two events are written to `<state>/spool/<inference_id>.json` (written,
//! fsynced, renamed) by the engine before the caller gets its final answer; a forwarder
//! task hands spooled files to the ingestor and deletes them once they are durable in
//! the lake. If the lake is unavailable they wait and are retried; their event ids are
//! derived from the inference id, so a retry after a crash is a duplicate, not a second
//! charge.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::DType;
use ledgerlake_ingest::Ingestor;
use ledgerlake_ingest::validate::{BodyFormat, parse_body};
use ledgerlake_ingest::writer::Prepared;
use ledgerlake_lakehouse::ids::{Amount, Sha256Hex};
use ledgerlake_serving::engine::{Completion, CompletionSink, Engine, EngineConfig};
use ledgerlake_serving::metrics::Metrics;
use ledgerlake_serving::model::Llama;
use ledgerlake_serving::tokenizer::Tokenizer;
use serde_json::json;
use tokio::sync::Notify;

use crate::config::Config;

/// The shipped default model, found beside the binary's sources when the configured
/// path is not set.
pub fn default_model_dir() -> PathBuf {
    let relative = PathBuf::from("models/ledgerlake-base");
    if relative.join("config.json").exists() {
        return relative;
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/ledgerlake-base"))
}

/// Prices per 1,000 input and output tokens, by model id.
pub type Prices = Arc<RwLock<HashMap<String, (u128, u128)>>>;

/// Writes each completion's events into the spool and wakes the forwarder.
pub struct Accounting {
    spool: PathBuf,
    prices: Prices,
    base: (String, u128, u128),
    wake: Arc<Notify>,
}

/// The fee of `tokens` at `per_1k` base units per 1,000 tokens, rounded down.
pub fn fee(prompt: usize, completion: usize, per_1k_in: u128, per_1k_out: u128) -> u128 {
    (prompt as u128 * per_1k_in + completion as u128 * per_1k_out) / 1000
}

impl Accounting {
    fn events(&self, c: &Completion) -> serde_json::Value {
        let (per_in, per_out) = if c.model == self.base.0 {
            (self.base.1, self.base.2)
        } else {
            self.prices.read().map(|p| p.get(&c.model).copied().unwrap_or((0, 0))).unwrap_or((0, 0))
        };
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let amount = fee(c.prompt_tokens, c.completion_tokens, per_in, per_out);
        json!([
            {"kind": "inference.completed", "event_id": format!("{}:inference", c.request_id), "event_time": now,
             "inference_id": c.request_id, "model_id": c.model, "caller": c.caller,
             "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
             "output_sha256": Sha256Hex::digest(c.text.as_bytes()).to_string(),
             "latency_ms": u32::try_from(c.latency.as_millis()).unwrap_or(u32::MAX)},
            {"kind": "fee.charged", "event_id": format!("{}:fee", c.request_id), "event_time": now,
             "inference_id": c.request_id, "model_id": c.model, "payer": c.caller, "amount": Amount::new(amount).map(|a| a.to_string()).unwrap_or_else(|_| "0".into())},
        ])
    }

    fn write(&self, c: &Completion) -> std::io::Result<()> {
        use std::io::Write;
        let body = serde_json::to_vec(&self.events(c))?;
        let name = format!("{}.json", c.request_id);
        let tmp = self.spool.join(format!(".{name}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.spool.join(&name))?;
        std::fs::File::open(&self.spool)?.sync_all()
    }
}

impl CompletionSink for Accounting {
    fn completed(&self, c: &Completion) {
        if let Err(e) = self.write(c) {
            tracing::error!(error = %e, inference = %c.request_id, "spooling the events of a completion");
        }
        self.wake.notify_one();
    }
}

/// Moves spooled events into the lake: batches of files, deleted once durable.
async fn forward(spool: PathBuf, ingestor: Ingestor, wake: Arc<Notify>) {
    let rejected = spool.join("rejected");
    let mut backoff = Duration::from_millis(200);
    loop {
        match forward_once(&spool, &rejected, &ingestor).await {
            Ok(0) => {
                backoff = Duration::from_millis(200);
                let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
            }
            Ok(_) => backoff = Duration::from_millis(200),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "the lake did not take spooled inference events; they wait in the spool");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One batch: returns how many files were settled.
async fn forward_once(spool: &Path, rejected: &Path, ingestor: &Ingestor) -> Result<usize> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(spool)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json") && p.is_file())
        .collect();
    files.sort();
    files.truncate(500);
    if files.is_empty() {
        return Ok(0);
    }
    let mut events = Vec::new();
    let mut owner = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let parsed: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(f)?).unwrap_or_default();
        owner.extend(std::iter::repeat_n(i, parsed.len()));
        events.extend(parsed);
    }
    let body = serde_json::to_vec(&events)?;
    let items = parse_body(BodyFormat::JsonArray, &body, None)?;
    let (prepared, errors) = Prepared::from_items(items, false)?;
    let receipt = ingestor.submit_checked(prepared, errors, false).await?;
    let bad: std::collections::HashSet<usize> = receipt.errors.iter().filter_map(|e| owner.get(e.index).copied()).collect();
    for (i, f) in files.iter().enumerate() {
        if bad.contains(&i) {
            std::fs::create_dir_all(rejected)?;
            tracing::error!(file = %f.display(), "spooled inference events were rejected by validation; kept in spool/rejected");
            std::fs::rename(f, rejected.join(f.file_name().unwrap_or_default()))?;
        } else {
            std::fs::remove_file(f)?;
        }
    }
    Ok(files.len())
}

/// Copies the files directly under an object-store directory (`s3://bucket/prefix`, the
/// standard `AWS_*` variables apply) into `dest`: a checkpoint or an adapter directory.
pub async fn fetch_dir(uri: &str, dest: &Path) -> Result<PathBuf> {
    use futures::TryStreamExt;
    use object_store::{ObjectStore, ObjectStoreExt};
    let url = url::Url::parse(uri).with_context(|| format!("{uri} is not a URL"))?;
    let (store, prefix): (Box<dyn ObjectStore>, object_store::path::Path) = if url.scheme() == "s3" {
        let store = object_store::aws::AmazonS3Builder::from_env().with_url(uri).build().with_context(|| format!("opening {uri}"))?;
        (Box::new(store), object_store::path::Path::from_url_path(url.path())?)
    } else {
        object_store::parse_url(&url).with_context(|| format!("opening {uri}"))?
    };
    let objects: Vec<object_store::ObjectMeta> = store.list(Some(&prefix)).try_collect().await.with_context(|| format!("listing {uri}"))?;
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut fetched = 0;
    for meta in objects {
        let Some(mut rest) = meta.location.prefix_match(&prefix) else { continue };
        let (Some(name), None) = (rest.next(), rest.next()) else { continue };
        let name = name.as_ref().to_owned();
        let bytes = store.get(&meta.location).await?.bytes().await.with_context(|| format!("reading {}", meta.location))?;
        let tmp = dest.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, dest.join(&name))?;
        fetched += 1;
    }
    if fetched == 0 {
        anyhow::bail!("{uri} holds no files");
    }
    Ok(dest.to_owned())
}

/// Registers every adapter of `model_registered` (latest registration per model id) and
/// keeps their prices; runs again every few seconds to pick up new registrations.
async fn watch_registrations(sql: ledgerlake_sql::SqlEngine, engine: Engine, prices: Prices, cache: PathBuf) {
    use arrow::array::{Array, AsArray};
    loop {
        let query = "SELECT model_id, adapter_uri, CAST(price_per_1k_input AS VARCHAR) AS pin, CAST(price_per_1k_output AS VARCHAR) AS pout \
                     FROM model_registered ORDER BY event_time";
        match sql.collect(query, vec![]).await {
            Ok((_, batches)) => {
                for b in batches {
                    let col = |i: usize| b.column(i).as_string::<i32>().clone();
                    let (ids, uris, pin, pout) = (col(0), col(1), col(2), col(3));
                    for r in 0..b.num_rows() {
                        if ids.is_null(r) {
                            continue;
                        }
                        let id = ids.value(r).to_owned();
                        let uri = uris.value(r);
                        let path = PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri));
                        let price = |s: &str| s.parse::<u128>().unwrap_or(0);
                        if let Ok(mut p) = prices.write() {
                            p.insert(id.clone(), (price(pin.value(r)), price(pout.value(r))));
                        }
                        if engine.is_registered(&id) {
                            continue;
                        }
                        let path = if uri.contains("://") && !uri.starts_with("file://") {
                            // An object-store adapter is copied into the state directory once.
                            match fetch_dir(uri, &cache.join(&id)).await {
                                Ok(p) => p,
                                Err(e) => {
                                    tracing::warn!(model = %id, error = %e, "fetching a registered adapter");
                                    continue;
                                }
                            }
                        } else {
                            path
                        };
                        if path.join("adapter_config.json").is_file() {
                            let _ = engine.register(&id, path);
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading model_registered"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Loads the base model and starts the engine, the spool forwarder and the registration
/// watcher.
pub async fn start(config: &Config, state_dir: &Path, ingestor: Ingestor, sql: ledgerlake_sql::SqlEngine) -> Result<(Engine, PathBuf)> {
    let dir = match config.model.as_deref().map(|p| p.to_string_lossy().into_owned()) {
        Some(uri) if uri.contains("://") => fetch_dir(&uri, &state_dir.join("models").join("base")).await?,
        Some(dir) => PathBuf::from(dir),
        None => default_model_dir(),
    };
    let device = ledgerlake_serving::device(&config.device)?;
    let model = Llama::load(&dir, &device, DType::F32).with_context(|| format!("loading the base model from {}", dir.display()))?;
    let tokenizer = Tokenizer::load(&dir.join("tokenizer.json"), model.config.bos_token_id)?;
    let parse = |s: &str, key: &str| s.parse::<Amount>().map(|a| a.base_units()).with_context(|| format!("{key} must be an amount in base units"));
    let base = (
        config.model_name.clone(),
        parse(&config.base_price_per_1k_input, "base_price_per_1k_input")?,
        parse(&config.base_price_per_1k_output, "base_price_per_1k_output")?,
    );
    config.model_name.parse::<ledgerlake_lakehouse::ids::ModelId>().context("model_name must be a model id (lowercase slug)")?;
    let spool = state_dir.join("spool");
    std::fs::create_dir_all(&spool).with_context(|| format!("creating {}", spool.display()))?;
    let wake = Arc::new(Notify::new());
    let prices: Prices = Arc::default();
    let sink = Arc::new(Accounting { spool: spool.clone(), prices: prices.clone(), base, wake: wake.clone() });
    let engine_config = EngineConfig {
        max_running: config.max_running.max(1),
        max_loras: config.max_loras.max(1),
        max_cpu_loras: config.max_cpu_loras.max(1),
        max_waiting: config.max_waiting,
        ..EngineConfig::default()
    };
    let engine = Engine::start(&config.model_name, Arc::new(model), Arc::new(tokenizer), engine_config, sink, Arc::new(Metrics::new()));
    tokio::spawn(forward(spool, ingestor, wake));
    tokio::spawn(watch_registrations(sql, engine.clone(), prices, state_dir.join("adapters")));
    Ok((engine, dir))
}

#[cfg(test)]
mod tests {
    use super::fee;

    #[test]
    fn fees_are_integer_base_units_rounded_down() {
        let open = 10u128.pow(18);
        assert_eq!(fee(1000, 1000, open, 2 * open), 3 * open);
        assert_eq!(fee(1, 0, 999, 0), 0);
        assert_eq!(fee(3, 7, 1000, 1000), 10);
        assert_eq!(fee(0, 0, open, open), 0);
    }
}
