//! The gradient method's part of the attribution job (glue): for an inference answered by
//! an adapter that ModelFactory trained (its directory holds `features.safetensors`), the
//! output's projected gradient on that adapter, scored against the training features by
//! `ledgerlake_attribution::gradient`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use ledgerlake_attribution::gradient::{DEFAULT_DAMPING, Influence, Kernel, TrainFeatures};
use ledgerlake_attribution::job;
use ledgerlake_attribution::spans::DocKey;
use ledgerlake_lakehouse::events::EventKind;
use ledgerlake_lakehouse::{Lake, snapshot};
use ledgerlake_serving::finetune::{self, Projector, TrainableLora};
use ledgerlake_serving::model::Llama;

/// One adapter, ready to score: its pairs, the projection its features were made with, and
/// the fitted kernel over its training features.
struct Fitted {
    model: Arc<Llama>,
    lora: TrainableLora,
    projector: Projector,
    influence: Influence,
    /// The training rows' contributions (`job::keys_of`).
    keys: Arc<[Option<DocKey>]>,
}

pub struct GradientMethod {
    base: Arc<Llama>,
    /// Where adapters may be read from, as serving reads them.
    roots: Arc<ledgerlake_serving::roots::AdapterRoots>,
    /// Where `up` fetches object-store adapters (`<state>/adapters`).
    cache: PathBuf,
    /// The model LoRA (not QLoRA) adapters trained over: a dense copy of a quantized base,
    /// made once when first needed.
    dense: Option<Arc<Llama>>,
    kernel: Kernel,
    /// Model id -> its registrations' adapter directories, oldest first.
    dirs: HashMap<String, Vec<(DateTime<Utc>, PathBuf)>>,
    /// (adapter directory, modification time of its features) -> fitted (None: they do not
    /// load; tried again once the file changes).
    fitted: HashMap<(PathBuf, SystemTime), Option<Arc<Fitted>>>,
}

impl GradientMethod {
    pub fn new(base: Arc<Llama>, kernel: Kernel, state_dir: &Path, roots: Arc<ledgerlake_serving::roots::AdapterRoots>) -> Self {
        Self { base, roots, cache: state_dir.join("adapters"), dense: None, kernel, dirs: HashMap::new(), fitted: HashMap::new() }
    }

    /// Reads which directory each registration of an adapter named (`model.registered`),
    /// where serving reads it (`serve::adapter_dir`).
    pub async fn refresh(&mut self, lake: &Lake) -> Result<()> {
        // The owner's registrations, each in effect from when it was ingested (when serving
        // picked it up), in ingest order.
        let sql = format!(
            "SELECT model_id, adapter_uri, ingested_at FROM {} AS r ORDER BY ingested_at, event_time, event_id",
            snapshot::owners_registrations("t")
        );
        let (_, batches) = snapshot::query(lake, EventKind::ModelRegistered, None, &sql).await?;
        use arrow::array::{Array, AsArray};
        use arrow::datatypes::{DataType, TimeUnit, TimestampMicrosecondType};
        self.dirs.clear();
        for b in &batches {
            let times = arrow::compute::cast(b.column(2), &DataType::Timestamp(TimeUnit::Microsecond, None))?;
            let times = times.as_primitive::<TimestampMicrosecondType>();
            // Delta strings may read as Utf8View.
            let (ids, uris) = (arrow::compute::cast(b.column(0), &DataType::Utf8)?, arrow::compute::cast(b.column(1), &DataType::Utf8)?);
            let (ids, uris) = (ids.as_string::<i32>(), uris.as_string::<i32>());
            for r in 0..b.num_rows() {
                if ids.is_null(r) || uris.is_null(r) || times.is_null(r) {
                    continue;
                }
                let Some(at) = DateTime::from_timestamp_micros(times.value(r)) else {
                    continue;
                };
                // Only what serving would read: a registration outside the roots, or over
                // the size cap, is skipped; a local one is read where the check resolved it.
                let dir = match self.roots.check(uris.value(r)) {
                    Ok(ledgerlake_serving::roots::Location::Local(dir)) if self.roots.check_size(&dir).is_ok() => dir,
                    Ok(ledgerlake_serving::roots::Location::Remote(uri)) => crate::serve::adapter_dir(&self.cache, ids.value(r), &uri).0,
                    _ => continue,
                };
                self.dirs.entry(ids.value(r).to_owned()).or_default().push((at, dir));
            }
        }
        Ok(())
    }

    /// The influence of each training contribution ([`job::keys_of`]) on `output` after `prompt`,
    /// under the adapter the model's registration at `answered` named, or `None` when that
    /// is not an adapter with training features (or the sequence is longer than the model
    /// reads).
    pub fn scores(&mut self, model_id: &str, answered: DateTime<Utc>, prompt: &[u32], output: &[u32]) -> Result<Option<(Arc<[Option<DocKey>]>, Vec<f32>)>> {
        let Some(registrations) = self.dirs.get(model_id) else {
            return Ok(None);
        };
        // The registration in effect when it answered (the earliest if it predates all).
        let Some((_, dir)) = registrations.iter().rev().find(|(at, _)| *at <= answered).or(registrations.first()) else {
            return Ok(None);
        };
        let dir = dir.clone();
        if prompt.is_empty() || output.is_empty() || prompt.len() + output.len() > self.base.config.max_position_embeddings {
            return Ok(None);
        }
        let Ok(modified) = std::fs::metadata(dir.join("features.safetensors")).and_then(|m| m.modified()) else {
            return Ok(None);
        };
        let key = (dir.clone(), modified);
        let fitted = match self.fitted.get(&key) {
            Some(f) => f.clone(),
            None => {
                let f = match self.fit(&dir) {
                    Ok(f) => Some(Arc::new(f)),
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = format!("{e:#}"), "an adapter's training features do not load; no gradient attribution for it until they change");
                        None
                    }
                };
                // Only the current version of a directory's features is kept.
                self.fitted.retain(|(d, _), _| *d != dir);
                self.fitted.insert(key, f.clone());
                f
            }
        };
        let Some(f) = fitted else {
            return Ok(None);
        };
        let tokens: Vec<u32> = prompt.iter().chain(output).copied().collect();
        let query = finetune::gradient_feature(&f.model, &f.lora, &tokens, prompt.len(), &f.projector)?;
        Ok(Some((f.keys.clone(), f.influence.score_one(&query)?)))
    }

    fn fit(&mut self, dir: &Path) -> Result<Fitted> {
        let lineage: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("lineage.json"))?)?;
        let seed = lineage["features"]["seed"].as_u64().context("lineage.json has no features.seed")?;
        let qlora = lineage["hyperparameters"]["qlora"].as_bool().unwrap_or(false);
        // The features were computed over the model the adapter trained on (factory's
        // rule); the dense copy LoRA needs is made once.
        let model = match &self.dense {
            Some(d) if !qlora => d.clone(),
            _ => {
                let m = ledgerlake_factory::base_for(self.base.clone(), qlora)?;
                if !qlora {
                    self.dense = Some(m.clone());
                }
                m
            }
        };
        let lora = TrainableLora::load(&model, dir)?;
        let projector = Projector::new(&lora, seed)?;
        let features = TrainFeatures::load(dir)?;
        if features.dim() != projector.dim() {
            anyhow::bail!("features have {} numbers per row, the adapter's projection {}", features.dim(), projector.dim());
        }
        let influence = Influence::fit(&features, self.kernel, DEFAULT_DAMPING)?;
        Ok(Fitted { model, lora, projector, influence, keys: job::keys_of(&features.ids).into() })
    }
}
