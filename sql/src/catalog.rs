//! The `ledgerlake.public` schema: one table per event kind, resolved at planning time to
//! the newest committed version, plus the named views; each table as the query's reader
//! may see it ([`Scope`], row-level access).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::catalog::{Session, SchemaProvider, TableProvider};
use datafusion::datasource::{MemTable, TableType, ViewTable, provider_as_source};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, TableProviderFilterPushDown, col, lit};
use datafusion::physical_plan::ExecutionPlan;
use ledgerlake_lakehouse::{EventKind, Lake};

use crate::auth::Reader;

/// Builds a provider for `kind` at `version` (newest when `None`). A table that was never
/// created reads as empty, with the contract's schema.
pub(crate) async fn table_provider(lake: &Lake, kind: EventKind, version: Option<u64>) -> Result<Arc<dyn TableProvider>> {
    let external = |e: ledgerlake_lakehouse::Error| DataFusionError::External(Box::new(e));
    let table = lake.unloaded(kind).map_err(external)?;
    match table.table_provider().with_table_version(version.map(|v| v as _)).await {
        Ok(provider) => Ok(provider),
        // Only when loading fails is it worth a second look at storage: a table never
        // written reads as empty, with the contract's schema.
        Err(_) if version.is_none() && !lake.exists(kind).await.map_err(external)? => {
            let schema = ledgerlake_lakehouse::events::schema(kind);
            Ok(Arc::new(MemTable::try_new(schema, vec![vec![]])?))
        }
        Err(e) => Err(e),
    }
}

/// What one query's reader may see (`docs/security.md`, "Who reads what"). Admins and
/// ledgerlake's own components read every row; any other caller reads:
/// - `contribution_submitted` and `contribution_reviewed`: the rows of public datanets and
///   of private ones its key's address owns or was granted (and not since revoked);
/// - `inference_tokens` (prompts and outputs as token ids): the rows of its own inferences
///   (`inference_completed.caller` is its key's id);
/// - every other table whole.
#[derive(Debug)]
pub(crate) struct Scope {
    lake: Lake,
    reader: Reader,
    /// The private datanets hidden from this reader, read once per query on first use.
    hidden: tokio::sync::OnceCell<Vec<String>>,
}

impl Scope {
    pub(crate) fn new(lake: Lake, reader: Reader) -> Self {
        Self { lake, reader, hidden: tokio::sync::OnceCell::new() }
    }

    /// `raw`, a provider of `kind`'s table, as this reader may see it.
    pub(crate) async fn restrict(&self, kind: EventKind, raw: Arc<dyn TableProvider>) -> Result<Arc<dyn TableProvider>> {
        let Reader::Caller { key_id, address } = &self.reader else {
            return Ok(raw);
        };
        let external = |e: ledgerlake_lakehouse::Error| DataFusionError::External(Box::new(e));
        let plan = match kind {
            EventKind::ContributionSubmitted | EventKind::ContributionReviewed => {
                let hidden = self
                    .hidden
                    .get_or_try_init(|| async {
                        let ids = ledgerlake_lakehouse::snapshot::hidden_datanets(&self.lake, address.as_ref()).await?;
                        Ok::<_, ledgerlake_lakehouse::Error>(ids.into_iter().map(|d| d.to_string()).collect())
                    })
                    .await
                    .map_err(external)?;
                if hidden.is_empty() {
                    return Ok(raw);
                }
                let list = hidden.iter().map(|d| lit(d.clone())).collect();
                LogicalPlanBuilder::scan(kind.table(), provider_as_source(raw), None)?.filter(col("datanet_id").in_list(list, true))?.build()?
            }
            EventKind::InferenceTokens => {
                // The caller's inferences, read first: the restriction is then a plain filter
                // (a join planned apart from the caller's query could not be re-optimized).
                let sql = format!("SELECT inference_id FROM t WHERE caller = '{}'", key_id.replace('\'', "''"));
                let (_, batches) = ledgerlake_lakehouse::snapshot::query(&self.lake, EventKind::InferenceCompleted, None, &sql).await.map_err(external)?;
                let mut mine = Vec::new();
                for batch in &batches {
                    let ids = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8)?;
                    mine.extend(arrow::array::AsArray::as_string::<i32>(&ids).iter().flatten().map(|id| lit(id.to_owned())));
                }
                LogicalPlanBuilder::scan(kind.table(), provider_as_source(raw), None)?.filter(col("inference_id").in_list(mine, false))?.build()?
            }
            _ => return Ok(raw),
        };
        Ok(Arc::new(Restricted(ViewTable::new(plan, None))))
    }
}

/// A table with rows filtered for its reader: a view underneath, a table to the catalog.
///
/// Opaque to the caller's plan on purpose: it gives DataFusion no logical plan to inline
/// and takes none of the caller's filters, so the restriction is planned on its own and the
/// caller's conditions run above it, on the rows it let through only. (Merged, a caller's
/// `CAST(content AS BIGINT)` would run on hidden rows and its error would show them.)
#[derive(Debug)]
struct Restricted(ViewTable);

#[async_trait]
impl TableProvider for Restricted {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.0.schema()
    }
    fn table_type(&self) -> TableType {
        TableType::Base
    }
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Unsupported; filters.len()])
    }
    async fn scan(&self, state: &dyn Session, projection: Option<&Vec<usize>>, _filters: &[Expr], limit: Option<usize>) -> Result<Arc<dyn ExecutionPlan>> {
        // Only the projection (and a limit, when the caller has no filter left above it)
        // joins the restriction's own plan.
        self.0.scan(state, projection, &[], limit).await
    }
}

/// The shared schema seen through one query's [`Scope`].
#[derive(Debug)]
pub(crate) struct ScopedSchema {
    pub(crate) inner: Arc<LakeSchema>,
    pub(crate) scope: Arc<Scope>,
}

#[async_trait]
impl SchemaProvider for ScopedSchema {
    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }
    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if let Some(kind) = EventKind::ALL.iter().find(|k| k.table() == name) {
            let raw = table_provider(&self.inner.lake, *kind, None).await?;
            return Ok(Some(self.scope.restrict(*kind, raw).await?));
        }
        // Views plan against this schema when scanned, so they read restricted tables.
        Ok(self.inner.view(name))
    }
    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name)
    }
}

/// What every query's schema shares: the lake and the named views ([`ScopedSchema`] is
/// what a query sees).
#[derive(Debug)]
pub(crate) struct LakeSchema {
    lake: Lake,
    views: RwLock<BTreeMap<String, Arc<dyn TableProvider>>>,
}

impl LakeSchema {
    pub(crate) fn new(lake: Lake) -> Self {
        Self { lake, views: RwLock::new(BTreeMap::new()) }
    }

    pub(crate) fn add_view(&self, name: &str, view: Arc<dyn TableProvider>) {
        // A poisoned lock means a panic while inserting; the map itself is still whole.
        let mut views = self.views.write().unwrap_or_else(|e| e.into_inner());
        views.insert(name.to_owned(), view);
    }

    pub(crate) fn view(&self, name: &str) -> Option<Arc<dyn TableProvider>> {
        self.views.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// Every table and view name.
    pub(crate) fn table_names(&self) -> Vec<String> {
        let mut names: Vec<String> = EventKind::ALL.iter().map(|k| k.table().to_owned()).collect();
        names.extend(self.views.read().unwrap_or_else(|e| e.into_inner()).keys().cloned());
        names
    }

    pub(crate) fn table_exist(&self, name: &str) -> bool {
        EventKind::ALL.iter().any(|k| k.table() == name) || self.view(name).is_some()
    }
}
