//! The lake: one append-only Delta table per event kind under a root URL, on a local
//! directory (`file://`, the default) or S3-compatible object storage (`s3://bucket/prefix`).

use std::collections::HashMap;
use std::sync::Once;
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use deltalake::kernel::transaction::{CommitData, PROTOCOL, TransactionError};
use deltalake::logstore::CommitOrBytes;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::{Action, StructType};
use deltalake::operations::create::CreateBuilder;
use deltalake::operations::optimize::OptimizeType;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError, TableProperty};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use url::Url;
use uuid::Uuid;

use crate::events::{self, EventKind, PARTITION_COLUMN};
use crate::{Error, Result};

/// Commits between two Delta checkpoints. Every reader replays at most this many JSON
/// commits after the newest checkpoint, which keeps loading fast as commits pile up.
pub const CHECKPOINT_INTERVAL: u64 = 100;

/// How every object-store request of ledgerlake is retried (the lake's and an adapter
/// fetch's): 4 retries, backing off from 100 ms to at most 2 s, at most 10 s in all. A
/// bounded budget: transient faults are retried, but an outage reaches the caller as 503
/// within seconds instead of holding requests for minutes.
pub fn storage_retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 4,
        retry_timeout: std::time::Duration::from_secs(10),
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(2),
            base: 2.0,
        },
    }
}

/// [`storage_retry`] as delta-rs storage options.
fn storage_retry_options() -> [(&'static str, String); 4] {
    let retry = storage_retry();
    let ms = |d: std::time::Duration| format!("{}ms", d.as_millis());
    [
        ("max_retries", retry.max_retries.to_string()),
        ("retry_timeout", ms(retry.retry_timeout)),
        ("backoff_config.init_backoff", ms(retry.backoff.init_backoff)),
        ("backoff_config.max_backoff", ms(retry.backoff.max_backoff)),
    ]
}

/// Where the lake lives.
#[derive(Clone, Debug)]
pub struct LakeConfig {
    /// Root of the lake: `file:///abs/dir/` or `s3://bucket/prefix/` (always ends in `/`).
    pub root: Url,
    /// Extra object-store options (for S3 the standard `AWS_*` environment variables are
    /// read as well).
    pub storage_options: HashMap<String, String>,
}

impl LakeConfig {
    /// Parses a location: a local path (created if missing), a `file://` URL or an
    /// `s3://bucket/prefix` URL.
    pub fn parse(location: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidLocation { url: location.to_owned(), reason: reason.to_owned() };
        let mut root = if location.contains("://") {
            Url::parse(location).map_err(|e| invalid(&e.to_string()))?
        } else {
            let path = std::path::Path::new(location);
            std::fs::create_dir_all(path).map_err(|e| invalid(&e.to_string()))?;
            let abs = std::fs::canonicalize(path).map_err(|e| invalid(&e.to_string()))?;
            Url::from_directory_path(&abs).map_err(|_| invalid("not an absolute path"))?
        };
        match root.scheme() {
            "file" => {
                let path = root.to_file_path().map_err(|_| invalid("not a local path"))?;
                std::fs::create_dir_all(&path).map_err(|e| invalid(&e.to_string()))?;
            }
            "s3" | "s3a" => {
                if root.host_str().unwrap_or("").is_empty() {
                    return Err(invalid("an s3 location names a bucket: s3://bucket/prefix"));
                }
                static S3: Once = Once::new();
                S3.call_once(|| deltalake::aws::register_handlers(None));
            }
            "memory" => {}
            other => return Err(invalid(&format!("unsupported scheme {other:?} (use a path, file:// or s3://)"))),
        }
        if !root.path().ends_with('/') {
            root.set_path(&format!("{}/", root.path()));
        }
        let mut storage_options = HashMap::new();
        if root.scheme() != "file" {
            // A bounded retry budget: transient faults are retried, but an outage reaches
            // the caller as 503 within seconds instead of holding requests for minutes.
            for (key, value) in storage_retry_options() {
                storage_options.insert(key.to_owned(), value);
            }
        }
        Ok(Self { root, storage_options })
    }

    /// The local directory of a `file://` lake.
    pub fn local_dir(&self) -> Option<std::path::PathBuf> {
        (self.root.scheme() == "file").then(|| self.root.to_file_path().ok()).flatten()
    }

    pub fn table_url(&self, kind: EventKind) -> Url {
        // The root ends in '/', and table names are plain identifiers, so joining cannot fail.
        self.root.join(&format!("{}/", kind.table())).unwrap_or_else(|_| self.root.clone())
    }
}

/// The shape of one table right now, as `ledgerlake tables` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    pub kind: EventKind,
    /// `None` when the table has not been created yet.
    pub version: Option<u64>,
    pub files: u64,
    pub rows: u64,
    pub bytes: u64,
}

/// A handle on the lake.
#[derive(Clone, Debug)]
pub struct Lake {
    config: LakeConfig,
}

fn delta(kind: EventKind) -> impl Fn(DeltaTableError) -> Error {
    move |source| Error::Delta { table: kind.table().to_owned(), source }
}

impl Lake {
    pub fn new(config: LakeConfig) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &LakeConfig {
        &self.config
    }

    fn builder(&self, kind: EventKind) -> Result<DeltaTableBuilder> {
        Ok(DeltaTableBuilder::from_url(self.config.table_url(kind))
            .map_err(delta(kind))?
            .with_storage_options(self.config.storage_options.clone()))
    }

    fn local_table_dir(&self, kind: EventKind) -> Option<std::path::PathBuf> {
        self.config.local_dir().map(|d| d.join(kind.table()))
    }

    /// The object store at the lake's root (for the lake's own files beside the tables,
    /// under `_ledgerlake/`).
    pub fn root_store(&self) -> Result<std::sync::Arc<dyn object_store::ObjectStore>> {
        let table = DeltaTableBuilder::from_url(self.config.root.clone())
            .and_then(|b| b.with_storage_options(self.config.storage_options.clone()).build())
            .map_err(|source| Error::Delta { table: "(lake root)".into(), source })?;
        Ok(table.object_store())
    }

    /// A handle on a table (whether or not it exists yet) that has loaded nothing: what a
    /// reader needs to build its own snapshot of the table.
    pub fn unloaded(&self, kind: EventKind) -> Result<DeltaTable> {
        self.builder(kind)?.build().map_err(delta(kind))
    }

    /// The version of a table as of a time: the newest commit at or before `at`.
    pub async fn version_at(&self, kind: EventKind, at: chrono::DateTime<chrono::Utc>) -> Result<u64> {
        let table = self.builder(kind)?.with_timestamp(at).load().await.map_err(delta(kind))?;
        Ok(table.version().unwrap_or(0))
    }

    /// Loads a table at its latest version, or `None` if it was never created.
    pub async fn open(&self, kind: EventKind) -> Result<Option<DeltaTable>> {
        if let Some(dir) = self.local_table_dir(kind)
            && !dir.join("_delta_log").is_dir()
        {
            return Ok(None);
        }
        match self.builder(kind)?.load().await {
            Ok(table) => Ok(Some(table)),
            Err(DeltaTableError::NotATable(_)) => Ok(None),
            Err(e) => Err(delta(kind)(e)),
        }
    }

    /// Whether a table has been created (has a Delta log).
    pub async fn exists(&self, kind: EventKind) -> Result<bool> {
        if let Some(dir) = self.local_table_dir(kind) {
            return Ok(dir.join("_delta_log").is_dir());
        }
        let store = self.unloaded(kind)?.log_store().object_store(None);
        let mut listing = store.list(Some(&Path::from("_delta_log")));
        use futures::StreamExt;
        match listing.next().await {
            Some(Ok(_)) => Ok(true),
            None => Ok(false),
            Some(Err(e)) => Err(e.into()),
        }
    }

    /// Loads a table as of a version.
    pub async fn open_at(&self, kind: EventKind, version: u64) -> Result<DeltaTable> {
        let mut table = self.builder(kind)?.build().map_err(delta(kind))?;
        table.load_version(version).await.map_err(delta(kind))?;
        Ok(table)
    }

    /// Loads a table, creating it with the contract's schema if it does not exist. Safe to
    /// race with another process doing the same.
    pub async fn open_or_create(&self, kind: EventKind) -> Result<DeltaTable> {
        if let Some(table) = self.open(kind).await? {
            return self.migrate(kind, table).await;
        }
        if let Some(dir) = self.local_table_dir(kind) {
            std::fs::create_dir_all(&dir).map_err(|source| Error::Io { path: dir.display().to_string(), source })?;
        }
        let schema = events::schema(kind);
        let delta_schema: StructType = schema
            .as_ref()
            .try_into_kernel()
            .map_err(|e| Error::SchemaMismatch { table: kind.table().to_owned(), reason: e.to_string() })?;
        let partitions: Vec<String> =
            if kind.partitioned_by_date() { vec![PARTITION_COLUMN.to_owned()] } else { vec![] };
        let created = CreateBuilder::new()
            .with_location(self.config.table_url(kind).as_str())
            .with_storage_options(self.config.storage_options.clone())
            .with_table_name(kind.table())
        .with_comment(format!(
            "ledgerlake {} events ({})",
            kind.name(),
            if kind.append_only() { "append-only" } else { "rows expire" }
        ))
        .with_columns(delta_schema.fields().cloned())
        .with_partition_columns(partitions)
        .with_configuration_property(TableProperty::AppendOnly, Some(if kind.append_only() { "true" } else { "false" }))
        .with_configuration_property(TableProperty::CheckpointInterval, Some(CHECKPOINT_INTERVAL.to_string()))
        .with_save_mode(SaveMode::Ignore)
        .await;
        match created {
            Ok(table) => Ok(table),
            // Another process created it between our load and our create.
            Err(_) => match self.open(kind).await? {
                Some(table) => Ok(table),
                None => Err(Error::Internal(format!("table {} could not be created", kind.table()))),
            },
        }
    }

    /// Brings a table written by an earlier ledgerlake up to the contract: the nullable
    /// columns added to its kind since then are added (one Delta commit; rows written before
    /// read them as null). Racing another process doing the same is harmless: the loser
    /// reloads and finds the columns there.
    async fn migrate(&self, kind: EventKind, table: DeltaTable) -> Result<DeltaTable> {
        let missing = missing_columns(kind, &table)?;
        if missing.is_empty() {
            return Ok(table);
        }
        let fields: StructType = (&arrow::datatypes::Schema::new(missing.clone()))
            .try_into_kernel()
            .map_err(|e| Error::SchemaMismatch { table: kind.table().to_owned(), reason: e.to_string() })?;
        let names: Vec<&str> = missing.iter().map(|f| f.name().as_str()).collect();
        match table.add_columns().with_fields(fields.fields().cloned().collect::<Vec<_>>()).await {
            Ok(table) => {
                tracing::info!(table = kind.table(), columns = ?names, "added the contract's new columns");
                Ok(table)
            }
            Err(e) => match self.open(kind).await? {
                Some(table) if missing_columns(kind, &table)?.is_empty() => Ok(table),
                _ => Err(delta(kind)(e)),
            },
        }
    }

    /// The version, file count, row count and size of every table.
    pub async fn tables(&self) -> Result<Vec<TableInfo>> {
        let mut out = Vec::new();
        for kind in EventKind::ALL {
            let info = match self.open(*kind).await? {
                None => TableInfo { kind: *kind, version: None, files: 0, rows: 0, bytes: 0 },
                Some(table) => {
                    let state = table.snapshot().map_err(delta(*kind))?;
                    let (mut files, mut rows, mut bytes) = (0u64, 0u64, 0u64);
                    for f in state.log_data().iter() {
                        files += 1;
                        rows += f.num_records().unwrap_or(0) as u64;
                        bytes += f.size() as u64;
                    }
                    TableInfo { kind: *kind, version: Some(state.version()), files, rows, bytes }
                }
            };
            out.push(info);
        }
        Ok(out)
    }

    /// Rewrites small files into large ones (Delta `OPTIMIZE`, bin-packing).
    /// Returns (files removed, files added).
    pub async fn compact(&self, kind: EventKind) -> Result<(u64, u64)> {
        let Some(table) = self.open(kind).await? else { return Ok((0, 0)) };
        let (table, metrics) = table
            .optimize()
            .with_type(OptimizeType::Compact)
            .await
            .map_err(delta(kind))?;
        // Readers should not replay the removal of every small file: checkpoint the result.
        if metrics.num_files_removed > 0
            && let Some(version) = table.version()
        {
            tokio::task::spawn_blocking(move || write_checkpoint(kind, &table, version))
                .await
                .map_err(|e| Error::Internal(format!("checkpoint task: {e}")))?;
        }
        Ok((metrics.num_files_removed, metrics.num_files_added))
    }

    /// Deletes the rows of a table that is not append-only whose `event_date` is before
    /// `before`: whole date partitions, so the commit only removes files (nothing is
    /// rewritten). The files stay readable by time travel until a vacuum. Returns the number
    /// of files removed.
    pub async fn expire(&self, kind: EventKind, before: chrono::NaiveDate) -> Result<u64> {
        if kind.append_only() || !kind.partitioned_by_date() {
            return Err(Error::Internal(format!("{} is append-only: its rows never expire", kind.table())));
        }
        let Some(table) = self.open(kind).await? else { return Ok(0) };
        let predicate = format!("{PARTITION_COLUMN} < '{}'", before.format("%Y-%m-%d"));
        let (_, metrics) = table.delete().with_predicate(predicate.as_str()).await.map_err(delta(kind))?;
        Ok(metrics.num_removed_files as u64)
    }

    /// Deletes files no longer referenced by the table and older than `retention`.
    /// Returns the number of files deleted.
    pub async fn vacuum(&self, kind: EventKind, retention: Duration) -> Result<u64> {
        let Some(table) = self.open(kind).await? else { return Ok(0) };
        let retention = chrono::Duration::from_std(retention)
            .map_err(|e| Error::Internal(format!("retention out of range: {e}")))?;
        let (_, metrics) = table
            .vacuum()
            .with_retention_period(retention)
            .with_enforce_retention_duration(false)
            .await
            .map_err(delta(kind))?;
        Ok(metrics.files_deleted.len() as u64)
    }
}

/// The contract's columns a table lacks: empty when its columns are the contract's. A table
/// whose columns are a prefix of the contract's (written before later fields were added;
/// such fields are always nullable) gets the rest; any other difference is refused.
fn missing_columns(kind: EventKind, table: &DeltaTable) -> Result<Vec<arrow::datatypes::FieldRef>> {
    let want = events::schema(kind);
    let have = table.snapshot().map_err(delta(kind))?.schema();
    let have: Vec<&str> = have.fields().map(|f| f.name().as_str()).collect();
    let want_names: Vec<&str> = want.fields().iter().map(|f| f.name().as_str()).collect();
    let mismatch = || Error::SchemaMismatch {
        table: kind.table().to_owned(),
        reason: format!("columns are {have:?}, this ledgerlake writes {want_names:?}"),
    };
    if have.len() > want_names.len() || want_names[..have.len()] != have[..] {
        return Err(mismatch());
    }
    let missing: Vec<_> = want.fields()[have.len()..].to_vec();
    if missing.iter().any(|f| !f.is_nullable()) {
        return Err(mismatch());
    }
    Ok(missing)
}

/// Writes a Delta checkpoint of `version` with the kernel, which replays the log from the
/// previous checkpoint (delta-rs would first build its own file list, then the kernel's).
/// Blocking. A failure is logged, not returned: checkpoints only speed up loading.
fn write_checkpoint(kind: EventKind, table: &DeltaTable, version: u64) {
    let started = std::time::Instant::now();
    let engine = table.log_store().engine(None);
    let written = delta_kernel::Snapshot::builder_for(table.table_url().clone())
        .at_version(version as _)
        .build(engine.as_ref())
        .and_then(|snapshot| snapshot.checkpoint(engine.as_ref(), None));
    match written {
        Ok(_) => tracing::debug!(table = kind.table(), version, took = ?started.elapsed(), "checkpoint written"),
        Err(e) => tracing::warn!(table = kind.table(), version, error = %e, "checkpoint failed; the next one covers it"),
    }
}

/// Appends to one table. Each [`TableWriter::append`] is exactly one Delta commit.
///
/// The writer commits through the log store directly, as a blind append: it writes
/// `NNN.json` for the version after the one it has seen, and nothing else. It does not
/// rebuild the table's file list after each commit (delta-rs does, which makes a commit cost
/// grow with the number of files); the file list is only replayed when a checkpoint is due
/// (every [`CHECKPOINT_INTERVAL`] commits) or after a lost race.
pub struct TableWriter {
    kind: EventKind,
    /// Loaded at `checkpointed` or later; gives the schema, the table configuration and the
    /// log store. Its file list is only brought up to date when one is needed.
    table: DeltaTable,
    /// The newest version this writer knows of (its own commits included).
    version: u64,
    /// The checkpoint being written in the background, if any.
    checkpointing: Option<tokio::task::JoinHandle<()>>,
    /// A checkpoint fell due while the previous one was still being written.
    checkpoint_due: bool,
}

impl TableWriter {
    pub async fn open(lake: &Lake, kind: EventKind) -> Result<Self> {
        let table = lake.open_or_create(kind).await?;
        let version = table.version().unwrap_or(0).max(0) as u64;
        Ok(Self { kind, table, version, checkpointing: None, checkpoint_due: false })
    }

    pub fn kind(&self) -> EventKind {
        self.kind
    }

    /// The version this writer has seen last (its own commits included).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Moves to the newest version on storage (other writers' commits included).
    pub async fn refresh(&mut self) -> Result<()> {
        self.table.update_state().await.map_err(delta(self.kind))?;
        self.version = self.version.max(self.table.version().unwrap_or(0).max(0) as u64);
        Ok(())
    }

    /// Whether another writer committed after the version this writer has seen: one
    /// existence check of the next commit file, cheap enough to run before every flush
    /// that checks state rules. [`TableWriter::refresh`] then moves to the newest.
    pub async fn has_newer(&self) -> Result<bool> {
        let store = self.table.log_store().object_store(None);
        let next = Path::from(format!("_delta_log/{:020}.json", self.version + 1));
        match store.head(&next).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `batches` as new data files and commits them as one version, on top of the
    /// version this writer has seen. If another writer committed since, nothing is committed
    /// and [`Error::CommitConflict`] is returned: the caller catches up (refresh), re-checks
    /// what it writes against what the others wrote, and appends again. The data files of a
    /// failed attempt stay unreferenced until `vacuum` removes them.
    pub async fn append(&mut self, batches: &[RecordBatch]) -> Result<u64> {
        let kind = self.kind;
        let mut writer = RecordBatchWriter::for_table(&self.table).map_err(delta(kind))?;
        for batch in batches {
            writer.write(batch.clone()).await.map_err(delta(kind))?;
        }
        let t = std::time::Instant::now();
        let adds: Vec<Action> = writer.flush().await.map_err(delta(kind))?.into_iter().map(Action::Add).collect();
        tracing::debug!(table = kind.table(), files = adds.len(), parquet = ?t.elapsed(), "data files written");
        let partition_by = kind.partitioned_by_date().then(|| vec![PARTITION_COLUMN.to_owned()]);
        let operation = DeltaOperation::Write { mode: SaveMode::Append, partition_by, predicate: None };
        // Protocol and append-only checks: the table may have been upgraded by someone else.
        PROTOCOL
            .can_commit(self.table.snapshot().map_err(delta(kind))?, &adds, &operation)
            .map_err(|e| delta(kind)(e.into()))?;
        let data = CommitData::new(adds, operation, HashMap::new(), Vec::new());
        let bytes = data.get_bytes().map_err(|e| delta(kind)(e.into()))?;
        let log_store = self.table.log_store();
        let operation_id = Uuid::new_v4();
        // Stores with conditional PUT take the bytes; the others rename a temporary file.
        let entry = if ["DefaultLogStore", "LakeFSLogStore"].contains(&log_store.name().as_str()) {
            CommitOrBytes::LogBytes(bytes)
        } else {
            let tmp = Path::from_iter(["_delta_log", &format!("_commit_{operation_id}.json.tmp")]);
            log_store.object_store(Some(operation_id)).put(&tmp, bytes.into()).await?;
            CommitOrBytes::TmpCommit(tmp)
        };
        let version = self.version + 1;
        match log_store.write_commit_entry(version as _, entry.clone(), operation_id).await {
            Ok(()) => {}
            Err(TransactionError::VersionAlreadyExists(_)) => {
                if let CommitOrBytes::TmpCommit(_) = entry {
                    // Best effort: a leftover temporary file is harmless.
                    let _ = log_store.abort_commit_entry(version as _, entry, operation_id).await;
                }
                return Err(Error::CommitConflict { table: kind.table().to_owned(), version });
            }
            Err(e) => {
                let _ = log_store.abort_commit_entry(version as _, entry, operation_id).await;
                return Err(delta(kind)(e.into()));
            }
        }
        self.version = version;
        if self.checkpoint_due || (version + 1).is_multiple_of(self.checkpoint_interval()) {
            self.start_checkpoint();
        }
        Ok(version)
    }

    fn checkpoint_interval(&self) -> u64 {
        self.table
            .snapshot()
            .ok()
            .and_then(|s| s.table_config().checkpoint_interval)
            .map_or(CHECKPOINT_INTERVAL, |n| n.get())
    }

    /// Writes a checkpoint of the version this writer committed last, in the background:
    /// it replays the whole file list, which must not hold up the next commit. The commit
    /// is already durable, so a failure is only logged and the next one covers it. If the
    /// previous checkpoint is still being written, this one is written when it is done
    /// (at the newest version then).
    fn start_checkpoint(&mut self) {
        if self.checkpointing.as_ref().is_some_and(|task| !task.is_finished()) {
            self.checkpoint_due = true;
            return;
        }
        self.checkpoint_due = false;
        let (kind, version) = (self.kind, self.version);
        let table = self.table.clone();
        self.checkpointing = Some(tokio::task::spawn_blocking(move || write_checkpoint(kind, &table, version)));
    }

    /// Waits for the checkpoint being written in the background, and writes the one that
    /// fell due meanwhile, if any.
    pub async fn finish_checkpoint(&mut self) {
        for _ in 0..2 {
            if let Some(task) = self.checkpointing.take()
                && let Err(e) = task.await
            {
                tracing::warn!(table = self.kind.table(), error = %e, "checkpoint task failed");
            }
            if !self.checkpoint_due {
                break;
            }
            self.start_checkpoint();
        }
    }

    /// The data files that commits `(after, upto]` added with `dataChange = true`, i.e. the
    /// new rows of those versions (compaction rewrites are not new rows). `None` if one of
    /// those commits is no longer in the log (cleaned up after its retention): the caller
    /// must then rebuild from [`TableWriter::all_files`].
    pub async fn files_added_between(&self, after: u64, upto: u64) -> Result<Option<Vec<Path>>> {
        let store = self.table.log_store().object_store(None);
        let mut files = Vec::new();
        for version in after + 1..=upto {
            let log = Path::from(format!("_delta_log/{version:020}.json"));
            let bytes = match store.get(&log).await {
                Ok(r) => r.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let action: serde_json::Value = serde_json::from_slice(line)
                    .map_err(|e| Error::Internal(format!("{}: commit {version} is not JSON lines: {e}", self.kind.table())))?;
                if let Some(add) = action.get("add")
                    && add.get("dataChange").and_then(|v| v.as_bool()).unwrap_or(true)
                    && let Some(path) = add.get("path").and_then(|v| v.as_str())
                {
                    files.push(Path::from_url_path(path).map_err(|e| Error::Internal(format!("commit {version} adds a bad path {path:?}: {e}")))?);
                }
            }
        }
        Ok(Some(files))
    }

    /// Every data file of the version this writer has seen.
    pub async fn all_files(&mut self) -> Result<Vec<Path>> {
        if self.table.version().unwrap_or(0).max(0) as u64 != self.version {
            self.table.load_version(self.version as _).await.map_err(delta(self.kind))?;
        }
        let state = self.table.snapshot().map_err(delta(self.kind))?;
        Ok(state.log_data().iter().map(|f| f.object_store_path()).collect())
    }

    /// Reads the named columns of one data file of this table.
    /// Data files hold one flush each (megabytes), so the file is fetched whole.
    pub async fn read_columns(&self, file: &Path, columns: &[&str]) -> Result<Vec<RecordBatch>> {
        let store = self.table.log_store().object_store(None);
        let bytes = store.get(file).await?.bytes().await?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
        let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
        let reader = builder.with_projection(mask).with_batch_size(64 * 1024).build()?;
        Ok(reader.collect::<Result<Vec<_>, _>>()?)
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    /// The lake's storage options say exactly what `storage_retry` says (delta-rs parses
    /// them back into the same retry budget an adapter fetch uses).
    #[test]
    fn the_lake_retries_as_storage_retry_says() {
        let parsed = deltalake::logstore::StorageConfig::parse_options(storage_retry_options()).unwrap();
        let want = storage_retry();
        assert_eq!(parsed.retry.max_retries, want.max_retries);
        assert_eq!(parsed.retry.retry_timeout, want.retry_timeout);
        assert_eq!(parsed.retry.backoff.init_backoff, want.backoff.init_backoff);
        assert_eq!(parsed.retry.backoff.max_backoff, want.backoff.max_backoff);
        let s3 = LakeConfig::parse("s3://bucket/prefix").unwrap();
        assert_eq!(s3.storage_options.get("max_retries").map(String::as_str), Some("4"));
    }
}
