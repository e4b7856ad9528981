//! Wiring serving into `ledgerlake up`: the base model, adapters registered in the lake,
//! and the accounting of every completion through `ledgerlake-accounting` (its events are
//! made durable in `<state>/spool` before the caller sees the end of its answer, and a
//! forwarder drains the spool into ingest).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ledgerlake_accounting::{Cited, Metered, Spool, SpoolMetrics, TokenIds};
use ledgerlake_ingest::Ingestor;
use ledgerlake_lakehouse::ids::Sha256Hex;
use ledgerlake_lakehouse::{Amount, Price};
use ledgerlake_serving::engine::{Completion, CompletionSink, Engine, EngineConfig, Hold, Source};
use ledgerlake_serving::http::FetchError;
use ledgerlake_serving::metrics::Metrics;
use ledgerlake_serving::roots::{AdapterRoots, Location};
use ledgerlake_serving::checkpoint::{self, Checkpoint};
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

/// Serving's sink: each completion's events go into the spool, then the forwarder wakes.
struct Accounting {
    spool: Spool,
    /// Whether completions' token ids are stored (`record_tokens`).
    record_tokens: bool,
    metrics: SpoolMetrics,
    wake: Arc<Notify>,
}

impl CompletionSink for Accounting {
    fn record(&self, c: &Completion) -> std::result::Result<(), String> {
        let metered = Metered {
            inference_id: c.request_id.clone(),
            model_id: c.model.clone(),
            caller: c.caller.clone(),
            prompt_tokens: c.prompt_tokens as u64,
            completion_tokens: c.completion_tokens as u64,
            output_sha256: Sha256Hex::digest(c.text.as_bytes()),
            latency: c.latency,
            price: c.price,
            at: chrono::Utc::now(),
            token_ids: self
                .record_tokens
                .then(|| TokenIds { prompt: c.prompt_ids.clone(), output: c.output_ids.clone() }),
            citations: c
                .citations
                .iter()
                .map(|c| Cited {
                    contribution_id: c.contribution_id.clone(),
                    datanet_id: c.datanet_id.clone(),
                    chunk: c.chunk,
                    relevance: c.relevance,
                })
                .collect(),
        };
        match self.spool.write(&metered) {
            Ok(()) => {
                self.metrics.written.inc();
                // The real events are durable: a stream's hold has done its work.
                if let Err(e) = self.spool.release(&c.request_id) {
                    tracing::warn!(error = %e, inference = %c.request_id, "a stream's hold could not be removed; it will be a duplicate after a restart");
                }
                self.wake.notify_one();
                Ok(())
            }
            Err(e) => {
                self.metrics.write_failures.inc();
                tracing::error!(error = %e, inference = %c.request_id, "the events of a completion could not be spooled; its answer is withheld");
                Err("the answer was not delivered because its billing could not be recorded; nothing was charged, retry later".into())
            }
        }
    }

    fn release(&self, request_id: &str) {
        if let Err(e) = self.spool.release(request_id) {
            tracing::warn!(error = %e, inference = %request_id, "the hold of a request that failed could not be removed; it will be billed after a restart");
        }
    }

    fn hold(&self, h: &Hold) -> std::result::Result<(), String> {
        // The worst case of a streamed answer: billed as such only if the server dies before
        // the answer ends (how much of it reached the caller is then unknown).
        let metered = Metered {
            inference_id: h.request_id.clone(),
            model_id: h.model.clone(),
            caller: h.caller.clone(),
            prompt_tokens: h.prompt_tokens as u64,
            completion_tokens: h.max_tokens as u64,
            output_sha256: Sha256Hex::digest(b""),
            latency: Duration::ZERO,
            price: h.price,
            at: chrono::Utc::now(),
            token_ids: None,
            citations: Vec::new(),
        };
        self.spool.hold(&metered).map_err(|e| {
            tracing::error!(error = %e, inference = %h.request_id, "a stream's billing hold could not be written; the stream is refused");
            "the answer was not started because its billing could not be recorded; nothing was charged, retry later".to_owned()
        })
    }
}

/// The object store holding `uri` (`s3://bucket/prefix`, with the standard `AWS_*`
/// variables and ledgerlake's retry budget; or anything `object_store` parses, such as
/// `file://`), and the path of `uri` in it.
pub fn object_store_at(uri: &str) -> Result<(Box<dyn object_store::ObjectStore>, object_store::path::Path)> {
    let url = url::Url::parse(uri).with_context(|| format!("{uri} is not a URL"))?;
    if url.scheme() == "s3" {
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_url(uri)
            .with_retry(ledgerlake_lakehouse::lake::storage_retry())
            .build()
            .with_context(|| format!("opening {uri}"))?;
        return Ok((Box::new(store), object_store::path::Path::from_url_path(url.path())?));
    }
    Ok(object_store::parse_url(&url).with_context(|| format!("opening {uri}"))?)
}

/// Copies the files directly under an object-store directory (`s3://bucket/prefix`, the
/// standard `AWS_*` variables apply) into `dest`: a checkpoint or an adapter directory.
/// The files land in a temporary directory renamed into place, so `dest` is whole or
/// absent.
pub async fn fetch_dir(uri: &str, dest: &Path, max_bytes: u64) -> Result<PathBuf, FetchError> {
    use futures::TryStreamExt;
    use object_store::{ObjectStore, ObjectStoreExt};
    let bad = |e: &dyn std::fmt::Display| {
        tracing::warn!(%uri, error = %e, "an object-store URI cannot be opened");
        FetchError::BadUri(uri.to_owned())
    };
    let down = |e: &dyn std::fmt::Display| {
        tracing::warn!(%uri, error = %e, "fetching from the object store failed");
        FetchError::Unavailable(uri.to_owned())
    };
    let (store, prefix) = object_store_at(uri).map_err(|e| bad(&format!("{e:#}")))?;
    let objects: Vec<object_store::ObjectMeta> = store.list(Some(&prefix)).try_collect().await.map_err(|e| down(&e))?;
    // Sized from the listing before anything is read: an adapter over the cap is not fetched.
    let total = objects.iter().fold(0u64, |t, m| t.saturating_add(m.size));
    if total > max_bytes {
        return Err(FetchError::TooLarge(format!("{uri} holds {total} bytes; an adapter may hold at most {max_bytes} (config `adapter_max_bytes`)")));
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| down(&e))?;
    let tmp = tempfile::Builder::new().prefix(".fetch-").tempdir_in(parent).map_err(|e| down(&e))?;
    let mut fetched = 0;
    for meta in objects {
        let Some(mut rest) = meta.location.prefix_match(&prefix) else { continue };
        let (Some(name), None) = (rest.next(), rest.next()) else { continue };
        let bytes = store.get(&meta.location).await.map_err(|e| down(&e))?.bytes().await.map_err(|e| down(&e))?;
        std::fs::write(tmp.path().join(name.as_ref()), &bytes).map_err(|e| down(&e))?;
        fetched += 1;
    }
    if fetched == 0 {
        return Err(FetchError::Empty(uri.to_owned()));
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| down(&e))?;
    }
    std::fs::rename(tmp.keep(), dest).map_err(|e| down(&e))?;
    Ok(dest.to_owned())
}

/// One `model.registered` as serving applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Registration {
    uri: String,
    price: Price,
}

/// Serves every adapter of `model_registered` as the registration that counts says (its
/// owner's latest, `snapshot::latest_registrations`): its path and its prices follow every
/// new registration. Runs every few seconds. An adapter that cannot be fetched or
/// does not fit the base model is not served; the log says why.
async fn watch_registrations(sql: ledgerlake_sql::SqlEngine, engine: Engine, cache: PathBuf, roots: Arc<AdapterRoots>) {
    use arrow::array::{Array, AsArray};
    use std::collections::HashMap;
    // What was last applied (or tried) per model id, so a poll does work only on change.
    let mut applied: HashMap<String, Registration> = HashMap::new();
    loop {
        // The rule of which registration counts lives with the data contract; voided
        // registrations do not count.
        let query = ledgerlake_lakehouse::snapshot::latest_registrations(
            &format!("{} AS r", ledgerlake_lakehouse::snapshot::unvoided("model_registered", "voided_events")),
            "model_id, adapter_uri, CAST(price_per_1k_input AS VARCHAR) AS pin, CAST(price_per_1k_output AS VARCHAR) AS pout",
        );
        // One row per model id.
        let mut by_id: HashMap<String, (String, Result<Price, String>)> = HashMap::new();
        match sql.collect(&query, vec![]).await {
            Ok((_, batches)) => {
                for b in batches {
                    let col = |i: usize| b.column(i).as_string::<i32>().clone();
                    let (ids, uris, pin, pout) = (col(0), col(1), col(2), col(3));
                    for r in 0..b.num_rows() {
                        if ids.is_null(r) || uris.is_null(r) || pin.is_null(r) || pout.is_null(r) {
                            continue;
                        }
                        let amount = |s: &str| s.parse::<Amount>().map_err(|e| e.to_string());
                        let price = amount(pin.value(r))
                            .and_then(|i| amount(pout.value(r)).map(|o| (i, o)))
                            .and_then(|(i, o)| Price::new(i, o).map_err(|e| e.to_string()));
                        by_id.insert(ids.value(r).to_owned(), (uris.value(r).to_owned(), price));
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading model_registered"),
        }
        for (id, (uri, price)) in by_id {
            let price = match price {
                Ok(p) => p,
                Err(e) => {
                    // Ingest refuses such prices; only rows older than that check get here.
                    tracing::warn!(model = %id, error = %e, "a registration's price is outside the contract; not applied");
                    continue;
                }
            };
            let wanted = Registration { uri: uri.clone(), price };
            if applied.get(&id) == Some(&wanted) {
                continue;
            }
            applied.insert(id.clone(), wanted);
            // A registration names any URI its builder likes: only the adapter roots are read.
            let location = match roots.check(&uri) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(model = %id, error = %e, "a registered adapter is outside the adapter roots; not served");
                    continue;
                }
            };
            let path = match location {
                Location::Remote(uri) => {
                    let (dest, _) = adapter_dir(&cache, &id, &uri);
                    if dest.join("adapter_config.json").is_file() {
                        dest
                    } else {
                        match fetch_dir(&uri, &dest, roots.max_bytes).await {
                            Ok(p) => p,
                            Err(e @ FetchError::TooLarge(_)) => {
                                tracing::warn!(model = %id, error = %e, "a registered adapter is too large; not served");
                                continue;
                            }
                            Err(e) => {
                                tracing::warn!(model = %id, error = %e, "fetching a registered adapter");
                                applied.remove(&id); // try again at the next poll
                                continue;
                            }
                        }
                    }
                }
                Location::Local(dir) => {
                    if let Err(e) = roots.check_size(&dir) {
                        tracing::warn!(model = %id, error = %e, "a registered adapter is too large or unreadable; not served");
                        continue;
                    }
                    dir
                }
            };
            let check = engine.clone();
            let checked = path.clone();
            match tokio::task::spawn_blocking(move || check.check_adapter(&checked)).await {
                Ok(Ok(())) => {
                    if let Err(e) = engine.register(&id, path, price, Source::Lake) {
                        tracing::warn!(model = %id, error = %e, "registering an adapter of the lake");
                    }
                }
                Ok(Err(e)) => tracing::warn!(model = %id, error = %e, "a registered adapter cannot be served"),
                Err(e) => tracing::warn!(model = %id, error = %e, "checking a registered adapter"),
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Where the adapter a registration names is read from, and whether it is an object-store
/// URI (then the directory is the copy fetched into `cache/<model>/<digest>`, once per URI);
/// a local path or `file://` URI is read where it is.
pub fn adapter_dir(cache: &Path, model_id: &str, uri: &str) -> (PathBuf, bool) {
    if uri.contains("://") && !uri.starts_with("file://") {
        let digest = Sha256Hex::digest(uri.as_bytes()).to_string();
        (cache.join(model_id).join(&digest[..16]), true)
    } else {
        (PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri)), false)
    }
}

/// The configured base model: where it was loaded from, and the loaded checkpoint.
async fn load_base(config: &Config, state_dir: &Path) -> Result<(PathBuf, Checkpoint)> {
    let dir = match config.model.as_deref().map(|p| p.to_string_lossy().into_owned()) {
        // The operator's own base model: no adapter cap.
        Some(uri) if uri.contains("://") => fetch_dir(&uri, &state_dir.join("models").join("base"), u64::MAX).await?,
        Some(dir) => PathBuf::from(dir),
        None => default_model_dir(),
    };
    let device = ledgerlake_serving::device(&config.device)?;
    let checkpoint =
        checkpoint::load(&dir, &device).with_context(|| format!("loading the base model from {}", dir.display()))?;
    Ok((dir, checkpoint))
}

/// The served base model's tokenizer and the name it answers to (what attribution
/// tokenizes contributions with).
pub async fn load_tokenizer(config: &Config) -> Result<(ledgerlake_serving::tokenizer::Tokenizer, String)> {
    let (_, tokenizer, name) = load_model(config).await?;
    Ok((tokenizer, name))
}

/// The served base model, its tokenizer and the name it answers to (the attribution job
/// computes gradient features over it).
pub async fn load_model(config: &Config) -> Result<(ledgerlake_serving::model::Llama, ledgerlake_serving::tokenizer::Tokenizer, String)> {
    let (_, Checkpoint { model, tokenizer, name, .. }) = load_base(config, &config.state_dir()?).await?;
    Ok((model, tokenizer, config.model_name.clone().unwrap_or(name)))
}

/// What `start` brought up: the engine, where its base came from, and the base itself (the
/// training jobs train over the same weights).
pub struct Served {
    pub engine: Engine,
    pub model_dir: PathBuf,
    pub model: Arc<ledgerlake_serving::model::Llama>,
    pub tokenizer: Arc<ledgerlake_serving::tokenizer::Tokenizer>,
}

/// Loads the base model and starts the engine, the spool forwarder and the registration
/// watcher.
pub async fn start(config: &Config, state_dir: &Path, ingestor: Ingestor, sql: ledgerlake_sql::SqlEngine, roots: Arc<AdapterRoots>) -> Result<Served> {
    let (dir, Checkpoint { model, tokenizer, name, .. }) = load_base(config, state_dir).await?;
    let model_name = config.model_name.clone().unwrap_or(name);
    let parse = |s: &str, key: &str| s.parse::<Amount>().with_context(|| format!("{key} must be an amount in base units"));
    let base_price = Price::new(
        parse(&config.base_price_per_1k_input, "base_price_per_1k_input")?,
        parse(&config.base_price_per_1k_output, "base_price_per_1k_output")?,
    )?;
    let base_id = model_name.parse::<ledgerlake_lakehouse::ids::ModelId>().context("model_name must be a model id (lowercase slug)")?;
    // The base model's id is the deployment's, never a participant's to register; a
    // service key's fees for it are bounded by its price.
    ingestor.reserve_model(base_id, base_price);
    let spool = Spool::open(&state_dir.join("spool"))?;
    // Streams cut off by a crash of the last run are billed by their holds (before any new
    // stream holds anything).
    let recovered = spool.recover_holds()?;
    if recovered > 0 {
        tracing::warn!(streams = recovered, "streams cut off by the last run's end are billed by their holds (their worst case)");
    }
    let wake = Arc::new(Notify::new());
    let spool_metrics = SpoolMetrics::default();
    let mut metrics = Metrics::new();
    spool_metrics.register(metrics.registry_mut());
    let sink = Arc::new(Accounting {
        spool: spool.clone(),
        record_tokens: config.record_tokens,
        metrics: spool_metrics.clone(), wake: wake.clone() });
    let engine_config = EngineConfig {
        max_running: config.max_running.max(1),
        max_loras: config.max_loras.max(1),
        max_cpu_loras: config.max_cpu_loras.max(1),
        max_waiting: config.max_waiting,
        ..EngineConfig::default()
    };
    let (model, tokenizer) = (Arc::new(model), Arc::new(tokenizer));
    let engine = Engine::start(&model_name, base_price, model.clone(), tokenizer.clone(), engine_config, sink, Arc::new(metrics));
    tokio::spawn(ledgerlake_accounting::forward::forward(spool, ingestor, wake, spool_metrics));
    tokio::spawn(watch_registrations(sql, engine.clone(), state_dir.join("adapters"), roots));
    Ok(Served { engine, model_dir: dir, model, tokenizer })
}
