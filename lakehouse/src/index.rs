//! The persistent index that makes ingest exactly-once without scanning tables: every
//! committed `event_id`, the owner of every datanet, the datanet of every contribution
//! (which ingest needs to check reviews and refuse copies) and the owner of every model id
//! (its first registrant), and per table the Delta version up to
//! which all of that has been recorded (the watermark).
//!
//! The Delta tables are the truth and the index is derived from them. It is an LSM tree
//! (fjall) with bloom filters, so a lookup of a new id costs a few bloom probes, not a table
//! scan, at 100M ids as at 100. Entries of a commit and the watermark that covers them are
//! written in one atomic batch *after* the Delta commit. A crash between the two leaves the
//! watermark behind the table, and [`Index::catch_up`] re-reads exactly the commits the index
//! has not seen. The same catch-up folds in commits of other writers of the same tables.

use std::path::{Path as FsPath, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::events::EventKind;
use crate::ids::{Address, ContributionId, DatanetId};
use crate::lake::TableWriter;
use crate::{Error, Result};

/// Block cache of the index.
pub const INDEX_CACHE_BYTES: u64 = 256 * 1024 * 1024;

pub struct Index {
    path: PathBuf,
    db: Database,
    events: Keyspace,
    datanets: Keyspace,
    contributions: Keyspace,
    models: Keyspace,
    watermarks: Keyspace,
}

/// What the index learns from rows committed to one table.
#[derive(Debug, Default)]
pub struct Learned {
    pub event_ids: Vec<String>,
    pub datanets: Vec<(String, String)>,
    pub contributions: Vec<(String, String)>,
    /// `((ingested_at, event_time, event_id), model_id, builder)`: the first of a model id in
    /// ingest order is its owner, whatever order the files were read in.
    pub models: Vec<((i64, i64, String), String, String)>,
}

impl Index {
    pub fn open(dir: &FsPath) -> Result<Self> {
        let err = |e: fjall::Error| Error::Index { path: dir.display().to_string(), reason: e.to_string() };
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.display().to_string(), source })?;
        // A block cache large enough that looking up an id that *is* stored (a retried
        // duplicate) rarely goes to disk; new ids are answered by the bloom filters.
        let db = Database::builder(dir).cache_size(INDEX_CACHE_BYTES).open().map_err(err)?;
        let ks = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default).map_err(err);
        let meta = ks("meta")?;
        let index = Self {
            events: ks("event_ids")?,
            datanets: ks("datanet_owner")?,
            contributions: ks("contribution_datanet")?,
            models: ks("model_owner")?,
            watermarks: ks("watermark")?,
            path: dir.to_owned(),
            db,
        };
        // An index made before it learned model owners re-reads `model_registered` once.
        if meta.get("model_owner").map_err(|e| index.err(e))?.is_none() {
            index.watermarks.remove(EventKind::ModelRegistered.table()).map_err(|e| index.err(e))?;
            meta.insert("model_owner", [1u8]).map_err(|e| index.err(e))?;
        }
        Ok(index)
    }

    fn err(&self, e: fjall::Error) -> Error {
        Error::Index { path: self.path.display().to_string(), reason: e.to_string() }
    }

    pub fn contains_event(&self, event_id: &str) -> Result<bool> {
        self.events.contains_key(event_id).map_err(|e| self.err(e))
    }

    pub fn datanet_owner(&self, datanet: &DatanetId) -> Result<Option<Address>> {
        let Some(v) = self.datanets.get(datanet.as_str()).map_err(|e| self.err(e))? else { return Ok(None) };
        let s = std::str::from_utf8(&v).map_err(|e| Error::Internal(format!("index owner not utf-8: {e}")))?;
        s.parse().map(Some).map_err(|e| Error::Internal(format!("index owner {s:?}: {e}")))
    }

    pub fn contribution_datanet(&self, contribution: &ContributionId) -> Result<Option<DatanetId>> {
        let Some(v) = self.contributions.get(contribution.as_str()).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let s = std::str::from_utf8(&v).map_err(|e| Error::Internal(format!("index datanet not utf-8: {e}")))?;
        s.parse().map(Some).map_err(|e| Error::Internal(format!("index datanet {s:?}: {e}")))
    }

    /// The builder who first registered `model` (its owner), if anyone did.
    pub fn model_owner(&self, model: &crate::ids::ModelId) -> Result<Option<Address>> {
        let Some(v) = self.models.get(model.as_str()).map_err(|e| self.err(e))? else { return Ok(None) };
        let s = std::str::from_utf8(&v).map_err(|e| Error::Internal(format!("index model owner not utf-8: {e}")))?;
        s.parse().map(Some).map_err(|e| Error::Internal(format!("index model owner {s:?}: {e}")))
    }

    /// The table version up to which every commit of `kind` is recorded.
    pub fn watermark(&self, kind: EventKind) -> Result<Option<u64>> {
        let Some(v) = self.watermarks.get(kind.table()).map_err(|e| self.err(e))? else { return Ok(None) };
        let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| Error::Internal("watermark is not 8 bytes".into()))?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }

    /// Records what commits up to `version` of `kind` added, atomically with the watermark.
    pub fn record(&self, kind: EventKind, version: u64, learned: &Learned) -> Result<()> {
        let mut batch = self.db.batch();
        for id in &learned.event_ids {
            batch.insert(&self.events, id.as_str(), []);
        }
        for (datanet, owner) in &learned.datanets {
            batch.insert(&self.datanets, datanet.as_str(), owner.as_str());
        }
        for (contribution, datanet) in &learned.contributions {
            batch.insert(&self.contributions, contribution.as_str(), datanet.as_str());
        }
        // The first registrant in ingest order owns a model id: a later row never replaces it.
        let mut models: Vec<&((i64, i64, String), String, String)> = learned.models.iter().collect();
        models.sort_by(|a, b| a.0.cmp(&b.0));
        let mut owners: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
        for (_, model, builder) in models {
            if !owners.contains_key(model.as_str()) && !self.models.contains_key(model.as_str()).map_err(|e| self.err(e))? {
                owners.insert(model, builder);
            }
        }
        for (model, builder) in owners {
            batch.insert(&self.models, model, builder);
        }
        batch.insert(&self.watermarks, kind.table(), version.to_be_bytes());
        batch.commit().map_err(|e| self.err(e))
    }

    /// Forces everything recorded so far to disk.
    pub fn sync(&self) -> Result<()> {
        self.db.persist(PersistMode::SyncAll).map_err(|e| self.err(e))
    }

    /// Brings the index up to the version `writer` has seen, reading only the commits it has
    /// not recorded yet (or every file, if it never saw the table or the log was cleaned up
    /// since). Returns the number of rows read.
    pub async fn catch_up(&self, writer: &mut TableWriter) -> Result<u64> {
        let kind = writer.kind();
        let target = writer.version();
        let files = match self.watermark(kind)? {
            Some(w) if w >= target => return Ok(0),
            Some(w) => match writer.files_added_between(w, target).await? {
                Some(files) => files,
                None => writer.all_files().await?,
            },
            None => writer.all_files().await?,
        };
        let mut learned = Learned::default();
        let mut rows = 0;
        for file in files {
            for batch in writer.read_columns(&file, index_columns(kind)).await? {
                rows += batch.num_rows() as u64;
                learn(kind, &batch, &mut learned)?;
            }
        }
        self.record(kind, target, &learned)?;
        Ok(rows)
    }
}

/// The columns of a table that the index needs.
pub fn index_columns(kind: EventKind) -> &'static [&'static str] {
    match kind {
        EventKind::DatanetCreated => &["event_id", "datanet_id", "owner"],
        EventKind::ContributionSubmitted => &["event_id", "contribution_id", "datanet_id"],
        EventKind::ModelRegistered => &["event_id", "model_id", "builder", "ingested_at", "event_time"],
        _ => &["event_id"],
    }
}

/// A string column as `Utf8`, whatever string encoding the file used (files rewritten by
/// compaction hold `Utf8View`).
fn string_column(batch: &RecordBatch, name: &str) -> Result<arrow::array::StringArray> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| Error::Internal(format!("index column {name} missing from batch")))?;
    let col = arrow::compute::cast(col, &arrow::datatypes::DataType::Utf8)?;
    col.as_string_opt::<i32>()
        .cloned()
        .ok_or_else(|| Error::Internal(format!("index column {name} is not a string column")))
}

/// Adds what a batch of `kind` rows (holding at least [`index_columns`]) teaches the index.
pub fn learn(kind: EventKind, batch: &RecordBatch, into: &mut Learned) -> Result<()> {
    let ids = string_column(batch, "event_id")?;
    into.event_ids.extend(ids.iter().flatten().map(str::to_owned));
    let pairs = |a: &str, b: &str| -> Result<Vec<(String, String)>> {
        let (a, b) = (string_column(batch, a)?, string_column(batch, b)?);
        Ok((0..a.len())
            .filter(|i| !a.is_null(*i) && !b.is_null(*i))
            .map(|i| (a.value(i).to_owned(), b.value(i).to_owned()))
            .collect())
    };
    match kind {
        EventKind::DatanetCreated => into.datanets.extend(pairs("datanet_id", "owner")?),
        EventKind::ContributionSubmitted => into.contributions.extend(pairs("contribution_id", "datanet_id")?),
        EventKind::ModelRegistered => {
            let (models, builders) = (string_column(batch, "model_id")?, string_column(batch, "builder")?);
            let micros = |name: &str| -> Result<Vec<i64>> {
                let col = batch.column_by_name(name).ok_or_else(|| Error::Internal(format!("index column {name} missing from batch")))?;
                let col = arrow::compute::cast(col, &arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None))?;
                Ok(col.as_primitive::<arrow::datatypes::TimestampMicrosecondType>().values().to_vec())
            };
            let (ingested, times) = (micros("ingested_at")?, micros("event_time")?);
            for i in 0..models.len() {
                if models.is_null(i) || builders.is_null(i) {
                    continue;
                }
                let order = (ingested[i], times[i], ids.value(i).to_owned());
                into.models.push((order, models.value(i).to_owned(), builders.value(i).to_owned()));
            }
        }
        _ => {}
    }
    Ok(())
}
