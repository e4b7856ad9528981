//! The `ledgerlake.public` schema: one table per event kind, resolved at planning time to
//! the newest committed version, plus the named views.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use ledgerlake_lakehouse::{EventKind, Lake};

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

    fn view(&self, name: &str) -> Option<Arc<dyn TableProvider>> {
        self.views.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }
}

#[async_trait]
impl SchemaProvider for LakeSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names: Vec<String> = EventKind::ALL.iter().map(|k| k.table().to_owned()).collect();
        names.extend(self.views.read().unwrap_or_else(|e| e.into_inner()).keys().cloned());
        names
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if let Some(kind) = EventKind::ALL.iter().find(|k| k.table() == name) {
            return Ok(Some(table_provider(&self.lake, *kind, None).await?));
        }
        Ok(self.view(name))
    }

    fn table_exist(&self, name: &str) -> bool {
        EventKind::ALL.iter().any(|k| k.table() == name) || self.view(name).is_some()
    }
}
