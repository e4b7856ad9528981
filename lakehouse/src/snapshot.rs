//! Datanets as of a table version: who owns a datanet and who may train on it
//! ([`datanet`], [`may_train`]), and its **snapshot** `D@V` ([`snapshot`]): the contributions
//! that training, attribution and reward epochs all read.
//!
//! The rules (docs/datanets.md says the same for anyone recomputing them):
//! - `V` is a Delta version of the `contribution_reviewed` table. `D@V` holds the
//!   contributions of datanet `D` whose latest review at that version says `approved`. The
//!   latest review of a contribution is the last in **ingest order**, the greatest by
//!   (`ingested_at`, `event_time`, `event_id`), so a later `rejected` or `flagged` takes a
//!   contribution out and a later `approved` puts it back. A contribution never reviewed is
//!   not in. No client's clock decides: `event_time` only breaks ties within one commit.
//! - A contribution's text and contributor come from `contribution_submitted`, which is
//!   append-only and content-addressed: a review is only accepted for a contribution
//!   already stored, so every version of it at or after `V`'s commit gives the same rows.
//!   Two submissions of the same content to a datanet share one contribution id; ingest
//!   refuses the second, and in a lake written before it did, the first in ingest order
//!   is the contribution, and its contributor earns.
//! - `D` without `@V` means the newest version. A lake with no reviews yet is version 0
//!   (the version a new table is created at), with nothing in it.
//! - A datanet's owner, name and licence are those of its `datanet.created`; its status and
//!   visibility are the latest `datanet.updated` that sets them (same order), else
//!   `active` and the visibility it was created with (`private` when absent).
//! - A builder may train on a datanet that is public, or that it owns, or whose owner
//!   granted it access (`access.granted`) with no later `access.revoked` (same order).
//! - A model id belongs to the builder of its first registration (ingest order); the
//!   registration that counts is that builder's latest ([`LATEST_REGISTRATIONS`]).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::TimestampMicrosecondType;
use deltalake::datafusion::prelude::SessionContext;

use crate::events::{DatanetStatus, EventKind, Verdict, Visibility};
use crate::ids::{Address, ContributionId, DatanetId};
use crate::{Error, Lake, Result};

/// `D` or `D@V`, as a command line or an API names a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRef {
    pub datanet: DatanetId,
    /// A version of `contribution_reviewed`; the newest when `None`.
    pub version: Option<u64>,
}

impl FromStr for SnapshotRef {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: String| Error::BadSnapshot { given: s.to_owned(), reason };
        let (datanet, version) = match s.split_once('@') {
            Some((d, v)) => (d, Some(v.parse::<u64>().map_err(|_| bad(format!("{v:?} is not a table version (0, 1, 2, ...)")))?)),
            None => (s, None),
        };
        let datanet = datanet.parse::<DatanetId>().map_err(|e| bad(e.to_string()))?;
        Ok(Self { datanet, version })
    }
}

impl fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version {
            Some(v) => write!(f, "{}@{v}", self.datanet),
            None => write!(f, "{}", self.datanet),
        }
    }
}

/// A datanet's current state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datanet {
    pub id: DatanetId,
    pub owner: Address,
    pub name: String,
    pub license: String,
    pub status: DatanetStatus,
    pub visibility: Visibility,
}

/// One contribution of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotContribution {
    pub contribution_id: ContributionId,
    pub contributor: Address,
    pub content: String,
    pub license: String,
    pub source: Option<String>,
}

/// `D@V`: the contributions of a datanet that are in at a version (module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatanetSnapshot {
    pub datanet: Datanet,
    /// The version of `contribution_reviewed` it is pinned to.
    pub version: u64,
    /// Sorted by contribution id.
    pub contributions: Vec<SnapshotContribution>,
    /// Contributions reviewed at `version` whose latest verdict is rejected or flagged.
    pub excluded: usize,
}

impl DatanetSnapshot {
    /// `D@V` of this snapshot.
    pub fn reference(&self) -> SnapshotRef {
        SnapshotRef { datanet: self.datanet.id.clone(), version: Some(self.version) }
    }

    /// Bytes of text in it.
    pub fn content_bytes(&self) -> usize {
        self.contributions.iter().map(|c| c.content.len()).sum()
    }

    /// Distinct contributors.
    pub fn contributors(&self) -> usize {
        let mut seen: Vec<&Address> = self.contributions.iter().map(|c| &c.contributor).collect();
        seen.sort();
        seen.dedup();
        seen.len()
    }
}

/// Ingest order, in which later events win: (`ingested_at`, `event_time`, `event_id`).
type Order = (i64, i64, String);

/// The rows of `table` (a `model_registered` table, or a subquery of one) that count: the
/// registrations by the builder who owns their model id, the builder of its first
/// registration in ingest order. Ingest refuses any other, so this only matters for a lake
/// written before it did. A subquery for a `FROM` clause.
pub fn owners_registrations(table: &str) -> String {
    format!(
        "(SELECT * FROM (SELECT *, FIRST_VALUE(builder) OVER (PARTITION BY model_id ORDER BY ingested_at, event_time, event_id \
         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS owner__ FROM {table}) AS owned__ WHERE builder = owner__)"
    )
}

/// The rule of which `model_registered` row counts for each model id, as SQL selecting
/// `columns` (a comma-separated list) over `table`: its owner's latest registration in
/// ingest order ([`owners_registrations`]). Serving, the gradient job and reward epochs all
/// read it.
pub fn latest_registrations(table: &str, columns: &str) -> String {
    format!(
        "SELECT {columns} FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY model_id ORDER BY ingested_at DESC, event_time DESC, event_id DESC) AS n__ \
         FROM {} AS regs__) AS ranked__ WHERE n__ = 1",
        owners_registrations(table)
    )
}

/// The price of every registered model as the registration that counts says (not voided,
/// its owner's latest in ingest order: [`latest_registrations`]), with the versions of
/// `model_registered` and `voided_events` read. A price outside the contract (only rows
/// older than ingest's check) is left out.
pub async fn model_prices(lake: &Lake) -> Result<((u64, u64), HashMap<crate::ids::ModelId, crate::pricing::Price>)> {
    let sql = latest_registrations(
        &format!("{} AS r", unvoided("regs", "voids")),
        "model_id, CAST(price_per_1k_input AS VARCHAR) AS pin, CAST(price_per_1k_output AS VARCHAR) AS pout",
    );
    let tables = [("regs", EventKind::ModelRegistered, None), ("voids", EventKind::EventVoided, None)];
    let (versions, batches) = query_tables(lake, &tables, &sql).await?;
    let mut prices = HashMap::new();
    for batch in &batches {
        let (ids, pin, pout) = (strings(batch, "model_id")?, strings(batch, "pin")?, strings(batch, "pout")?);
        for ((id, i), o) in ids.into_iter().zip(pin).zip(pout) {
            let (Some(id), Some(i), Some(o)) = (id, i, o) else { continue };
            let (Ok(id), Ok(i), Ok(o)) = (id.parse(), i.parse(), o.parse()) else { continue };
            if let Ok(price) = crate::pricing::Price::new(i, o) {
                prices.insert(id, price);
            }
        }
    }
    Ok(((versions[0], versions[1]), prices))
}

/// The builder who owns model id `model` (the builder of its first registration in ingest
/// order), if it was ever registered.
pub async fn model_owner(lake: &Lake, model: &crate::ids::ModelId) -> Result<Option<Address>> {
    // The id is a slug (lowercase letters, digits, `_ . -`): nothing to escape.
    let sql = format!("SELECT builder FROM t WHERE model_id = '{model}' ORDER BY ingested_at, event_time, event_id LIMIT 1");
    let (_, batches) = query(lake, EventKind::ModelRegistered, None, &sql).await?;
    for batch in &batches {
        if let Some(b) = strings(batch, "builder")?.into_iter().flatten().next() {
            return Ok(Some(b.parse().map_err(|e| internal(format!("stored builder: {e}")))?));
        }
    }
    Ok(None)
}

/// `table` without the events an admin voided (`event.voided` rows of `voids`), as a
/// subquery for a `FROM` clause.
pub fn unvoided(table: &str, voids: &str) -> String {
    format!("(SELECT * FROM {table} WHERE event_id NOT IN (SELECT voided_event_id FROM {voids}))")
}

fn internal(e: impl fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

/// Rows of `kind` at `version` (newest when `None`) where `datanet_id` is `datanet`: the
/// named columns plus the three of [`Order`] last. A table never written has no rows.
async fn rows(lake: &Lake, kind: EventKind, version: Option<u64>, datanet: &DatanetId, columns: &[&str]) -> Result<Vec<RecordBatch>> {
    if !lake.exists(kind).await? {
        return Ok(vec![]);
    }
    let table = lake.unloaded(kind)?;
    let provider = table
        .table_provider()
        .with_table_version(version)
        .await
        .map_err(|e| internal(format!("reading {} at {version:?}: {e}", kind.table())))?;
    let ctx = SessionContext::new();
    ctx.register_table("t", provider).map_err(internal)?;
    let select: Vec<String> = columns.iter().chain(&["event_time", "ingested_at", "event_id"]).map(|c| format!("\"{c}\"")).collect();
    // The id is a slug (lowercase letters, digits, `_ . -`): nothing to escape.
    let sql = format!("SELECT {} FROM t WHERE datanet_id = '{datanet}'", select.join(", "));
    let frame = ctx.sql(&sql).await.map_err(internal)?;
    frame.collect().await.map_err(internal)
}

/// Column `name` of `batch` as strings (`None` for nulls).
fn strings(batch: &RecordBatch, name: &str) -> Result<Vec<Option<String>>> {
    let col = batch.column_by_name(name).ok_or_else(|| internal(format!("no column {name}")))?;
    let col = arrow::compute::cast(col, &arrow::datatypes::DataType::Utf8).map_err(internal)?;
    let col = col.as_string::<i32>();
    Ok((0..col.len()).map(|i| (!col.is_null(i)).then(|| col.value(i).to_owned())).collect())
}

fn orders(batch: &RecordBatch) -> Result<Vec<Order>> {
    let micros = |name: &str| -> Result<Vec<i64>> {
        let col = batch.column_by_name(name).ok_or_else(|| internal(format!("no column {name}")))?;
        let col = arrow::compute::cast(col, &arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None)).map_err(internal)?;
        Ok(col.as_primitive::<TimestampMicrosecondType>().values().to_vec())
    };
    let ids = strings(batch, "event_id")?;
    Ok(micros("ingested_at")?.into_iter().zip(micros("event_time")?).zip(ids).map(|((i, t), id)| (i, t, id.unwrap_or_default())).collect())
}

fn required(v: Option<String>, what: &str) -> Result<String> {
    v.ok_or_else(|| internal(format!("a null {what}")))
}

fn parse<T: FromStr>(v: Option<String>, what: &str) -> Result<T>
where
    T::Err: fmt::Display,
{
    required(v, what)?.parse::<T>().map_err(|e| internal(format!("stored {what}: {e}")))
}

fn parse_enum<T: serde::de::DeserializeOwned>(v: &str, what: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(v.to_owned())).map_err(|e| internal(format!("stored {what} {v:?}: {e}")))
}

/// Runs `sql` over table `kind` registered as `t`, at `version` (the newest when `None`),
/// and returns the version read with the rows. A table never written reads as version 0
/// with no rows. For jobs that must say what they read (attribution, epochs).
pub async fn query(lake: &Lake, kind: EventKind, version: Option<u64>, sql: &str) -> Result<(u64, Vec<RecordBatch>)> {
    let (versions, batches) = query_tables(lake, &[("t", kind, version)], sql).await?;
    Ok((versions[0], batches))
}

/// Runs `sql` over several tables at once, each registered under its name at its version
/// (the newest when `None`; a table never written reads as version 0 with no rows, the
/// version a new table is created at), and returns the versions read with the rows. One
/// table may appear twice, at two versions.
pub async fn query_tables(lake: &Lake, tables: &[(&str, EventKind, Option<u64>)], sql: &str) -> Result<(Vec<u64>, Vec<RecordBatch>)> {
    let ctx = SessionContext::new();
    let mut versions = Vec::with_capacity(tables.len());
    for &(name, kind, version) in tables {
        let newest = lake.open(kind).await?.and_then(|t| t.version());
        let Some(newest) = newest else {
            let empty = deltalake::datafusion::datasource::MemTable::try_new(crate::events::schema(kind), vec![vec![]]).map_err(internal)?;
            ctx.register_table(name, std::sync::Arc::new(empty)).map_err(internal)?;
            versions.push(0);
            continue;
        };
        let version = version.unwrap_or(newest);
        let provider = lake
            .unloaded(kind)?
            .table_provider()
            .with_table_version(Some(version))
            .await
            .map_err(|e| internal(format!("reading {} at {version}: {e}", kind.table())))?;
        ctx.register_table(name, provider).map_err(internal)?;
        versions.push(version);
    }
    let frame = ctx.sql(sql).await.map_err(internal)?;
    Ok((versions, frame.collect().await.map_err(internal)?))
}

/// The events of `kind` stored at `version` (the newest when `None`) whose rows match
/// `filter` (a SQL condition over the table's columns), read back into events, and the
/// version read.
pub async fn read_events(lake: &Lake, kind: EventKind, version: Option<u64>, filter: &str) -> Result<(u64, Vec<crate::Event>)> {
    use arrow::datatypes::{DataType, Field, Fields};
    // Amounts and times as strings (as the JSON form writes them), strings as plain UTF-8.
    fn stringly(t: &DataType) -> DataType {
        match t {
            DataType::Decimal128(..) | DataType::Timestamp(..) | DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
            DataType::List(f) | DataType::LargeList(f) | DataType::ListView(f) => {
                DataType::List(std::sync::Arc::new(Field::new(f.name(), stringly(f.data_type()), true)))
            }
            DataType::Struct(fields) => {
                DataType::Struct(Fields::from(fields.iter().map(|f| Field::new(f.name(), stringly(f.data_type()), true)).collect::<Vec<_>>()))
            }
            other => other.clone(),
        }
    }
    let schema = crate::events::schema(kind);
    let columns: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .filter(|n| *n != "ingested_at" && *n != crate::events::PARTITION_COLUMN)
        .map(|n| format!("\"{n}\""))
        .collect();
    let sql = format!("SELECT {} FROM t WHERE {filter}", columns.join(", "));
    let (version, batches) = query(lake, kind, version, &sql).await?;
    let mut events = Vec::new();
    for batch in batches {
        let mut fields = Vec::new();
        let mut arrays = Vec::new();
        for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
            let to = stringly(field.data_type());
            arrays.push(arrow::compute::cast(column, &to).map_err(internal)?);
            fields.push(Field::new(field.name(), to, true));
        }
        let batch = RecordBatch::try_new(std::sync::Arc::new(arrow::datatypes::Schema::new(fields)), arrays).map_err(internal)?;
        let mut writer = arrow_json::ArrayWriter::new(Vec::new());
        writer.write(&batch).map_err(internal)?;
        writer.finish().map_err(internal)?;
        let bytes = writer.into_inner();
        if bytes.is_empty() {
            continue;
        }
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&bytes).map_err(internal)?;
        for row in rows {
            let event = crate::Event::from_json_fields(kind, row)
                .map_err(|e| internal(format!("a stored {kind} row does not read back: {}: {}", e.field, e.message)))?;
            events.push(event);
        }
    }
    Ok((version, events))
}

/// Every datanet ever created, by id.
pub async fn datanet_ids(lake: &Lake) -> Result<Vec<DatanetId>> {
    if !lake.exists(EventKind::DatanetCreated).await? {
        return Ok(vec![]);
    }
    let provider = lake
        .unloaded(EventKind::DatanetCreated)?
        .table_provider()
        .await
        .map_err(|e| internal(format!("reading datanet_created: {e}")))?;
    let ctx = SessionContext::new();
    ctx.register_table("t", provider).map_err(internal)?;
    let frame = ctx.sql("SELECT DISTINCT datanet_id FROM t ORDER BY datanet_id").await.map_err(internal)?;
    let mut ids = Vec::new();
    for batch in frame.collect().await.map_err(internal)? {
        for id in strings(&batch, "datanet_id")? {
            ids.push(parse(id, "datanet_id")?);
        }
    }
    Ok(ids)
}

/// A datanet's current state, or [`Error::UnknownDatanet`].
pub async fn datanet(lake: &Lake, id: &DatanetId) -> Result<Datanet> {
    let created = rows(lake, EventKind::DatanetCreated, None, id, &["owner", "name", "license", "visibility"]).await?;
    let mut first: Option<(Order, Datanet)> = None;
    for batch in &created {
        let (owner, name, license, vis) = (strings(batch, "owner")?, strings(batch, "name")?, strings(batch, "license")?, strings(batch, "visibility")?);
        for (i, order) in orders(batch)?.into_iter().enumerate() {
            let visibility = match &vis[i] {
                Some(v) => parse_enum(v, "visibility")?,
                None => Visibility::Private,
            };
            let d = Datanet {
                id: id.clone(),
                owner: parse(owner[i].clone(), "owner")?,
                name: required(name[i].clone(), "name")?,
                license: required(license[i].clone(), "license")?,
                status: DatanetStatus::Active,
                visibility,
            };
            if first.as_ref().is_none_or(|(o, _)| order < *o) {
                first = Some((order, d));
            }
        }
    }
    let Some((_, mut datanet)) = first else {
        return Err(Error::UnknownDatanet(id.to_string()));
    };
    let updates = rows(lake, EventKind::DatanetUpdated, None, id, &["name", "license", "status", "visibility"]).await?;
    let mut latest: Vec<(Order, &str, String)> = vec![];
    for batch in &updates {
        let fields = [("name", strings(batch, "name")?), ("license", strings(batch, "license")?), ("status", strings(batch, "status")?), ("visibility", strings(batch, "visibility")?)];
        for (i, order) in orders(batch)?.into_iter().enumerate() {
            for (field, values) in &fields {
                if let Some(v) = &values[i] {
                    latest.push((order.clone(), field, v.clone()));
                }
            }
        }
    }
    latest.sort();
    for (_, field, value) in latest {
        match field {
            "name" => datanet.name = value,
            "license" => datanet.license = value,
            "status" => datanet.status = parse_enum(&value, "status")?,
            _ => datanet.visibility = parse_enum(&value, "visibility")?,
        }
    }
    Ok(datanet)
}

/// Whether `builder` may train on the datanet: it is public, `builder` owns it, or its
/// owner granted `builder` access. Errors with [`Error::UnknownDatanet`].
pub async fn may_train(lake: &Lake, id: &DatanetId, builder: &Address) -> Result<bool> {
    let d = datanet(lake, id).await?;
    let grants = rows(lake, EventKind::AccessGranted, None, id, &["datanet_id", "builder"]).await?;
    let revocations = rows(lake, EventKind::AccessRevoked, None, id, &["datanet_id", "builder"]).await?;
    let access = latest_access(&grants, &revocations, builder)?;
    Ok(may_use(d.visibility == Visibility::Public, d.owner == *builder, &access, id.as_str()))
}

/// The one rule of who may use a private datanet's contents (train on them, read them): a
/// public datanet anyone, else its owner and whoever's latest grant or revocation (in
/// ingest order, [`latest_access`]) is a grant.
fn may_use(public: bool, owns: bool, access: &HashMap<String, (Order, bool)>, datanet: &str) -> bool {
    public || owns || access.get(datanet).is_some_and(|(_, granted)| *granted)
}

/// Per datanet, `builder`'s latest grant (`true`) or revocation (`false`) in ingest order,
/// from rows of `access_granted` and `access_revoked` holding `datanet_id` and `builder`.
fn latest_access(grants: &[RecordBatch], revocations: &[RecordBatch], builder: &Address) -> Result<HashMap<String, (Order, bool)>> {
    let mut access: HashMap<String, (Order, bool)> = HashMap::new();
    for (batches, granted) in [(grants, true), (revocations, false)] {
        for batch in batches {
            let (ids, builders) = (strings(batch, "datanet_id")?, strings(batch, "builder")?);
            for (i, order) in orders(batch)?.into_iter().enumerate() {
                let theirs = builders[i].as_deref().is_some_and(|b| b.parse::<Address>().is_ok_and(|b| b == *builder));
                let Some(id) = ids[i].clone().filter(|_| theirs) else { continue };
                if access.get(&id).is_none_or(|(o, _)| order > *o) {
                    access.insert(id, (order, granted));
                }
            }
        }
    }
    Ok(access)
}

/// The private datanets whose contents `reader` may not read: every private datanet but
/// those it owns or was granted (and not since revoked) access to; every private one for a
/// reader with no address. The rule of [`may_train`], for all datanets in one pass.
pub async fn hidden_datanets(lake: &Lake, reader: Option<&Address>) -> Result<Vec<DatanetId>> {
    let all = |kind: EventKind, columns: &str| {
        let sql = format!("SELECT {columns}, ingested_at, event_time, event_id FROM t");
        async move { query(lake, kind, None, &sql).await.map(|(_, b)| b) }
    };
    // Owner and visibility at creation, then the visibility of the latest update setting it.
    let mut state: HashMap<String, (Order, String, bool)> = HashMap::new();
    for batch in all(EventKind::DatanetCreated, "datanet_id, owner, visibility").await? {
        let (ids, owners, vis) = (strings(&batch, "datanet_id")?, strings(&batch, "owner")?, strings(&batch, "visibility")?);
        for (i, order) in orders(&batch)?.into_iter().enumerate() {
            let id = required(ids[i].clone(), "datanet_id")?;
            if state.get(&id).is_some_and(|(o, _, _)| *o <= order) {
                continue;
            }
            let public = vis[i].as_deref() == Some("public");
            state.insert(id, (order, required(owners[i].clone(), "owner")?, public));
        }
    }
    let mut visibility: HashMap<String, (Order, bool)> = HashMap::new();
    for batch in all(EventKind::DatanetUpdated, "datanet_id, visibility").await? {
        let (ids, vis) = (strings(&batch, "datanet_id")?, strings(&batch, "visibility")?);
        for (i, order) in orders(&batch)?.into_iter().enumerate() {
            let (Some(id), Some(v)) = (ids[i].clone(), vis[i].clone()) else { continue };
            if visibility.get(&id).is_none_or(|(o, _)| order > *o) {
                visibility.insert(id, (order, v == "public"));
            }
        }
    }
    // This reader's latest grant or revocation per datanet.
    let access = match reader {
        Some(reader) => {
            let grants = all(EventKind::AccessGranted, "datanet_id, builder").await?;
            let revocations = all(EventKind::AccessRevoked, "datanet_id, builder").await?;
            latest_access(&grants, &revocations, reader)?
        }
        None => HashMap::new(),
    };
    let mut hidden = Vec::new();
    for (id, (_, owner, created_public)) in state {
        let public = visibility.get(&id).map_or(created_public, |(_, v)| *v);
        let owns = reader.is_some_and(|r| owner.parse::<Address>().is_ok_and(|o| o == *r));
        if !may_use(public, owns, &access, &id) {
            hidden.push(parse(Some(id), "datanet_id")?);
        }
    }
    hidden.sort();
    Ok(hidden)
}

/// The snapshot `D@V` (module docs). Errors: [`Error::UnknownDatanet`], and
/// [`Error::BadSnapshot`] for a version the reviews table does not have.
pub async fn snapshot(lake: &Lake, at: &SnapshotRef) -> Result<DatanetSnapshot> {
    let datanet = datanet(lake, &at.datanet).await?;
    let newest = lake.open(EventKind::ContributionReviewed).await?.and_then(|t| t.version()).unwrap_or(0);
    let version = match at.version {
        None => newest,
        Some(v) if v <= newest => v,
        Some(v) => {
            return Err(Error::BadSnapshot {
                given: at.to_string(),
                reason: format!("contribution_reviewed has no version {v}; the newest is {newest}"),
            });
        }
    };
    let reviews = rows(lake, EventKind::ContributionReviewed, Some(version), &at.datanet, &["contribution_id", "verdict"]).await?;
    let mut verdicts: HashMap<String, (Order, Verdict)> = HashMap::new();
    for batch in &reviews {
        let (ids, verdict) = (strings(batch, "contribution_id")?, strings(batch, "verdict")?);
        for (i, order) in orders(batch)?.into_iter().enumerate() {
            let id = required(ids[i].clone(), "contribution_id")?;
            let v: Verdict = parse_enum(&required(verdict[i].clone(), "verdict")?, "verdict")?;
            match verdicts.get(&id) {
                Some((o, _)) if *o >= order => {}
                _ => {
                    verdicts.insert(id, (order, v));
                }
            }
        }
    }
    let excluded = verdicts.values().filter(|(_, v)| *v != Verdict::Approved).count();
    let approved: HashSet<&str> = verdicts.iter().filter(|(_, (_, v))| *v == Verdict::Approved).map(|(k, _)| k.as_str()).collect();
    let mut chosen: HashMap<String, (Order, SnapshotContribution)> = HashMap::new();
    if !approved.is_empty() {
        let cols = ["contribution_id", "contributor", "content", "license", "source"];
        for batch in rows(lake, EventKind::ContributionSubmitted, None, &at.datanet, &cols).await? {
            let [ids, who, content, license, source] = cols.map(|c| strings(&batch, c));
            let (ids, who, content, license, source) = (ids?, who?, content?, license?, source?);
            for (i, order) in orders(&batch)?.into_iter().enumerate() {
                let id = required(ids[i].clone(), "contribution_id")?;
                if !approved.contains(id.as_str()) || chosen.get(&id).is_some_and(|(o, _)| *o <= order) {
                    continue;
                }
                let c = SnapshotContribution {
                    contribution_id: id.parse().map_err(|e| internal(format!("stored contribution_id: {e}")))?,
                    contributor: parse(who[i].clone(), "contributor")?,
                    content: required(content[i].clone(), "content")?,
                    license: required(license[i].clone(), "license")?,
                    source: source[i].clone(),
                };
                chosen.insert(id, (order, c));
            }
        }
    }
    if chosen.len() != approved.len() {
        return Err(internal(format!("{} approved contributions of {} have no submission", approved.len() - chosen.len(), at.datanet)));
    }
    let mut contributions: Vec<SnapshotContribution> = chosen.into_values().map(|(_, c)| c).collect();
    contributions.sort_by(|a, b| a.contribution_id.cmp(&b.contribution_id));
    Ok(DatanetSnapshot { datanet, version, contributions, excluded })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_print() {
        let r: SnapshotRef = "climate-papers@12".parse().unwrap();
        assert_eq!(r.version, Some(12));
        assert_eq!(r.to_string(), "climate-papers@12");
        let r: SnapshotRef = "climate-papers".parse().unwrap();
        assert_eq!(r.version, None);
        for bad in ["climate@", "climate@-1", "climate@x", "Bad Name@1", "@3"] {
            assert!(matches!(bad.parse::<SnapshotRef>(), Err(Error::BadSnapshot { .. })), "{bad}");
        }
    }
}
