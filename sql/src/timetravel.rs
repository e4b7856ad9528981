//! Time travel as table functions: `at_version('fee_charged', 12)` and
//! `at_timestamp('fee_charged', '2026-11-24T10:00:00Z')`.
//!
//! DataFusion calls table functions synchronously while planning; loading a snapshot is
//! async, so the call blocks its (multi-threaded) runtime worker for that load.

use std::sync::Arc;

use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{ScalarValue, plan_err};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::Expr;
use ledgerlake_lakehouse::{EventKind, Lake};

use crate::catalog::table_provider;

#[derive(Debug, Clone, Copy)]
pub(crate) enum At {
    Version,
    Timestamp,
}

#[derive(Debug)]
pub(crate) struct TimeTravel {
    pub(crate) lake: Lake,
    pub(crate) at: At,
    /// Who reads: an old version is filtered as the newest is.
    pub(crate) scope: Arc<crate::catalog::Scope>,
}

fn literal(e: &Expr) -> Option<&ScalarValue> {
    match e {
        Expr::Literal(v, _) => Some(v),
        _ => None,
    }
}

impl TimeTravel {
    fn name(&self) -> &'static str {
        match self.at {
            At::Version => "at_version",
            At::Timestamp => "at_timestamp",
        }
    }
}

impl TableFunctionImpl for TimeTravel {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let name = self.name();
        let usage = match self.at {
            At::Version => "at_version('table', version)",
            At::Timestamp => "at_timestamp('table', 'RFC 3339 time')",
        };
        let [table, when] = args.exprs() else {
            return plan_err!("{name} takes two arguments: {usage}");
        };
        let table = match literal(table) {
            Some(ScalarValue::Utf8(Some(t)) | ScalarValue::Utf8View(Some(t)) | ScalarValue::LargeUtf8(Some(t))) => t.clone(),
            _ => return plan_err!("{name}: the first argument is a table name in quotes: {usage}"),
        };
        let Some(kind) = EventKind::ALL.iter().copied().find(|k| k.table() == table) else {
            let tables: Vec<&str> = EventKind::ALL.iter().map(|k| k.table()).collect();
            return plan_err!("{name}: no table {table:?}; the tables are {}", tables.join(", "));
        };
        let lake = self.lake.clone();
        let scope = self.scope.clone();
        let load = match (self.at, literal(when)) {
            (At::Version, Some(v)) => match v.cast_to(&arrow::datatypes::DataType::Int64) {
                Ok(ScalarValue::Int64(Some(v))) if v >= 0 => Load::Version(v as u64),
                _ => return plan_err!("{name}: the version is a non-negative integer: {usage}"),
            },
            (At::Timestamp, Some(ScalarValue::Utf8(Some(t)) | ScalarValue::Utf8View(Some(t)))) => {
                match chrono::DateTime::parse_from_rfc3339(t) {
                    Ok(t) => Load::Time(t.with_timezone(&chrono::Utc)),
                    Err(e) => return plan_err!("{name}: {t:?} is not an RFC 3339 time ({e}): {usage}"),
                }
            }
            _ => return plan_err!("{name}: the second argument must be a literal: {usage}"),
        };
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| DataFusionError::Internal(format!("{name} needs a Tokio runtime")))?;
        tokio::task::block_in_place(|| {
            handle.block_on(async move {
                let version = match load {
                    Load::Version(v) => v,
                    Load::Time(t) => lake
                        .version_at(kind, t)
                        .await
                        .map_err(|e| DataFusionError::Plan(format!("{name}: {e}")))?,
                };
                let raw = table_provider(&lake, kind, Some(version))
                    .await
                    .map_err(|e| DataFusionError::Plan(format!("{name}('{table}', {version}): {}", e.strip_backtrace())))?;
                scope.restrict(kind, raw).await
            })
        })
    }
}

enum Load {
    Version(u64),
    Time(chrono::DateTime<chrono::Utc>),
}
