//! The engine: a fresh DataFusion session per query over the shared lake catalog, with the
//! query's own memory pool and deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, MemoryCatalogProvider, Session, TableProvider};
use datafusion::common::ParamValues;
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder};
use datafusion::physical_plan::{ExecutionPlan, RecordBatchStream};
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use futures::Stream;
use ledgerlake_lakehouse::Lake;

use crate::auth::Reader;
use crate::catalog::{LakeSchema, Scope, ScopedSchema};
use crate::timetravel::{At, TimeTravel};
use crate::{Error, Result};

/// The named views, registered at start-up: `sql/views/<name>.sql`.
pub const VIEWS: &[(&str, &str)] = &[
    ("contributions_by_datanet", include_str!("../views/contributions_by_datanet.sql")),
    ("fees_by_model_day", include_str!("../views/fees_by_model_day.sql")),
    ("inferences_by_adapter_hour", include_str!("../views/inferences_by_adapter_hour.sql")),
];

pub const CATALOG: &str = "ledgerlake";
pub const SCHEMA: &str = "public";

/// What one query may use.
#[derive(Clone, Debug)]
pub struct QueryLimits {
    /// Memory for the query's operators; sorts, joins and aggregations spill to disk
    /// beyond it where DataFusion can, and fail where it cannot.
    pub memory_bytes: usize,
    /// Wall-clock time from planning to the last batch.
    pub timeout: Duration,
    /// Queries one API key may run at once (admins and ledgerlake itself are not held to
    /// it); one more is refused with [`Error::Busy`].
    pub per_key: usize,
    /// Bytes (Arrow in memory, about what goes on the wire) one answer may stream to a
    /// caller's key, over every surface; past it the stream ends with
    /// [`Error::AnswerTooLarge`]. Admins and ledgerlake itself are not held to it.
    pub answer_bytes: u64,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self { memory_bytes: 1 << 30, timeout: Duration::from_secs(60), per_key: 8, answer_bytes: 4 << 30 }
    }
}

/// Read-only SQL over the lake. Cheap to clone.
#[derive(Clone)]
pub struct SqlEngine {
    lake: Lake,
    schema: Arc<LakeSchema>,
    limits: QueryLimits,
    /// Per API key id: the permits of its running queries.
    running: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>>,
}

impl SqlEngine {
    /// Builds the engine and registers the named views (each is checked to plan).
    pub async fn new(lake: Lake, limits: QueryLimits) -> Result<Self> {
        let schema = Arc::new(LakeSchema::new(lake.clone()));
        let engine = Self { lake, schema, limits, running: Default::default() };
        let ctx = engine.session()?;
        for (name, sql) in VIEWS {
            let plan = ctx.state().create_logical_plan(sql).await.map_err(|e| {
                Error::BadQuery(format!("view {name} does not plan: {}", e.strip_backtrace()))
            })?;
            let schema = SchemaRef::new(plan.schema().as_arrow().clone());
            engine.schema.add_view(name, Arc::new(FreshView { sql: sql.to_string(), schema }));
        }
        Ok(engine)
    }

    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    pub fn limits(&self) -> &QueryLimits {
        &self.limits
    }

    /// A session for one query: its own memory pool, the shared catalog (every row).
    pub fn session(&self) -> Result<SessionContext> {
        self.session_for(&Reader::All)
    }

    /// A session for one query of `reader`: its own memory pool, the shared catalog with
    /// each table as `reader` may see it (row-level access, time travel included).
    pub fn session_for(&self, reader: &Reader) -> Result<SessionContext> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(self.limits.memory_bytes)))
            .build_arc()?;
        let config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG, SCHEMA)
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(true);
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        let scope = Arc::new(Scope::new(self.lake.clone(), reader.clone()));
        let catalog = MemoryCatalogProvider::new();
        catalog.register_schema(SCHEMA, Arc::new(ScopedSchema { inner: self.schema.clone(), scope: scope.clone() }))?;
        ctx.register_catalog(CATALOG, Arc::new(catalog));
        // Functions whose output size the caller picks are bounded by the memory limit.
        crate::bounded::register(&ctx, self.limits.memory_bytes);
        ctx.register_udtf("at_version", Arc::new(TimeTravel { lake: self.lake.clone(), at: At::Version, scope: scope.clone() }));
        ctx.register_udtf("at_timestamp", Arc::new(TimeTravel { lake: self.lake.clone(), at: At::Timestamp, scope }));
        Ok(ctx)
    }

    /// Plans a read-only query (with `$1, $2, ...` or `?` bound to `params`) and starts it.
    /// The stream yields record batches as they are computed and ends with
    /// [`Error::Timeout`] if the query runs past its deadline.
    pub async fn query(&self, sql: &str, params: Vec<ScalarValue>) -> Result<SendableRecordBatchStream> {
        self.query_as(&Reader::All, sql, params).await
    }

    /// [`SqlEngine::query`] for `reader`: it reads only the rows it may
    /// ([`crate::auth::Reader`]).
    pub async fn query_as(&self, reader: &Reader, sql: &str, params: Vec<ScalarValue>) -> Result<SendableRecordBatchStream> {
        // A caller's key runs at most `per_key` queries at once; the permit lives as long as
        // the result stream, so a slow reader holds it too.
        let permit = match reader {
            Reader::All => None,
            Reader::Caller { key_id, .. } => {
                let semaphore = {
                    let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                    // Keys with nothing running are forgotten, so the map stays as small as the load.
                    running.retain(|_, s| s.available_permits() < self.limits.per_key);
                    running.entry(key_id.clone()).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.limits.per_key))).clone()
                };
                Some(semaphore.try_acquire_owned().map_err(|_| Error::Busy(self.limits.per_key))?)
            }
        };
        let deadline = tokio::time::Instant::now() + self.limits.timeout;
        let plan = async {
            let df = self.plan(reader, sql, params).await?;
            // What `describe` (Flight's FlightInfo) says the answer is: the batches are
            // labelled with it, as the optimizer may fold a nullable expression into a
            // non-null constant, and Flight SQL clients refuse batches whose schema differs.
            let schema = SchemaRef::new(df.schema().as_arrow().clone());
            Ok::<_, Error>((schema, df.execute_stream().await?))
        };
        let (planned, stream) = tokio::time::timeout_at(deadline, plan).await.map_err(|_| Error::Timeout(self.limits.timeout))??;
        let schema = relaxed(&planned, &stream.schema());
        let answer_limit = match reader {
            Reader::All => u64::MAX,
            Reader::Caller { .. } => self.limits.answer_bytes,
        };
        Ok(Box::pin(Deadline {
            schema,
            inner: stream,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            limit: self.limits.timeout,
            _permit: permit,
            bytes: 0,
            answer_limit,
        }))
    }

    /// Plans a read-only query without running it: the schema of its result (with `params`
    /// bound when given) and its parameters in order, with their types where the plan
    /// implies them.
    pub async fn describe(&self, sql: &str, params: Vec<ScalarValue>) -> Result<Described> {
        let plan = async {
            let df = self.plan(&Reader::All, sql, vec![]).await?;
            let mut types: Vec<(String, Option<DataType>)> = df.logical_plan().get_parameter_types()?.into_iter().collect();
            types.sort_by_key(|(name, _)| name.trim_start_matches('$').parse::<usize>().unwrap_or(usize::MAX));
            let df = if params.is_empty() { df } else { df.with_param_values(ParamValues::List(params.into_iter().map(Into::into).collect()))? };
            Ok::<_, Error>(Described { schema: SchemaRef::new(df.schema().as_arrow().clone()), params: types })
        };
        tokio::time::timeout(self.limits.timeout, plan).await.map_err(|_| Error::Timeout(self.limits.timeout))?
    }

    async fn plan(&self, reader: &Reader, sql: &str, params: Vec<ScalarValue>) -> Result<DataFrame> {
        let ctx = self.session_for(reader)?;
        let sql = numbered_placeholders(sql)?;
        let df = classic_types(ctx.sql_with_options(&sql, read_only()).await.map_err(classify)?)?;
        Ok(if params.is_empty() { df } else { df.with_param_values(ParamValues::List(params.into_iter().map(Into::into).collect()))? })
    }

    /// Every (catalog, schema) a query can name, sorted. Loads no table.
    pub fn schema_names(&self) -> Result<Vec<(String, String)>> {
        let ctx = self.session()?;
        let mut out = Vec::new();
        for catalog_name in ctx.catalog_names() {
            let Some(catalog) = ctx.catalog(&catalog_name) else { continue };
            out.extend(catalog.schema_names().into_iter().map(|s| (catalog_name.clone(), s)));
        }
        out.sort();
        Ok(out)
    }

    /// Every table and view a query can name, with its schema, in catalog order.
    pub async fn relations(&self) -> Result<Vec<Relation>> {
        let ctx = self.session()?;
        let mut out = Vec::new();
        for catalog_name in ctx.catalog_names() {
            let Some(catalog) = ctx.catalog(&catalog_name) else { continue };
            for schema_name in catalog.schema_names() {
                let Some(schema) = catalog.schema(&schema_name) else { continue };
                let mut names = schema.table_names();
                names.sort();
                for name in names {
                    let Some(table) = schema.table(&name).await? else { continue };
                    out.push(Relation {
                        catalog: catalog_name.clone(),
                        schema: schema_name.clone(),
                        name,
                        kind: match table.table_type() {
                            TableType::Base => "TABLE",
                            TableType::View => "VIEW",
                            TableType::Temporary => "LOCAL TEMPORARY",
                        },
                        arrow_schema: SchemaRef::new(Schema::new(
                            table.schema().fields().iter().map(|f| f.as_ref().clone().with_data_type(classic(f.data_type()))).collect::<Vec<_>>(),
                        )),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Runs a query to the end and collects its batches (for small results).
    pub async fn collect(&self, sql: &str, params: Vec<ScalarValue>) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        use futures::TryStreamExt;
        let stream = self.query(sql, params).await?;
        let schema = stream.schema();
        let batches = stream.try_collect().await?;
        Ok((schema, batches))
    }
}

/// The type a result column has for clients: string and binary views (what the Delta scan
/// reads, for speed inside the engine) become plain `Utf8` / `Binary`, at any depth. Views
/// share buffers between batches, so sending them as they are would repeat those buffers in
/// every IPC batch, and not every client reads them.
fn classic(data_type: &DataType) -> DataType {
    match data_type {
        DataType::Utf8View => DataType::Utf8,
        DataType::BinaryView => DataType::Binary,
        DataType::List(f) => DataType::List(Arc::new(f.as_ref().clone().with_data_type(classic(f.data_type())))),
        DataType::LargeList(f) => DataType::LargeList(Arc::new(f.as_ref().clone().with_data_type(classic(f.data_type())))),
        DataType::Struct(fields) => {
            DataType::Struct(fields.iter().map(|f| f.as_ref().clone().with_data_type(classic(f.data_type()))).collect())
        }
        other => other.clone(),
    }
}

/// Casts the result's view-typed columns to [`classic`] types, keeping names and qualifiers.
fn classic_types(df: DataFrame) -> Result<DataFrame> {
    let schema = df.schema().clone();
    if schema.fields().iter().all(|f| classic(f.data_type()) == *f.data_type()) {
        return Ok(df);
    }
    let exprs: Vec<Expr> = schema
        .columns()
        .into_iter()
        .zip(schema.fields())
        .map(|(column, field)| {
            let to = classic(field.data_type());
            if to == *field.data_type() {
                Expr::Column(column)
            } else {
                let relation = column.relation.clone();
                datafusion::logical_expr::cast(Expr::Column(column), to).alias_qualified(relation, field.name())
            }
        })
        .collect();
    Ok(df.select(exprs)?)
}

/// Rewrites JDBC/ODBC-style `?` placeholders (what ADBC and most drivers send) to `$1`,
/// `$2`, ... in order, which DataFusion binds. A `?` inside a string or a comment is not a
/// placeholder and stays.
fn numbered_placeholders(sql: &str) -> Result<String> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    if !sql.contains('?') {
        return Ok(sql.to_owned());
    }
    let tokens = Tokenizer::new(&GenericDialect {}, sql).tokenize().map_err(|e| Error::BadQuery(e.to_string()))?;
    let mut n = 0;
    let mut out = String::with_capacity(sql.len() + 8);
    for token in tokens {
        match token {
            Token::Placeholder(p) if p == "?" => {
                n += 1;
                out.push_str(&format!("${n}"));
            }
            other => out.push_str(&other.to_string()),
        }
    }
    Ok(out)
}

/// What [`SqlEngine::describe`] finds.
#[derive(Clone, Debug)]
pub struct Described {
    pub schema: SchemaRef,
    /// `$1`, `$2`, ... in order, with the type the plan implies (`None`: any).
    pub params: Vec<(String, Option<DataType>)>,
}

/// A table or view queries can name.
#[derive(Clone, Debug)]
pub struct Relation {
    pub catalog: String,
    pub schema: String,
    pub name: String,
    /// `TABLE`, `VIEW` or `LOCAL TEMPORARY` (the SQL standard's table types).
    pub kind: &'static str,
    pub arrow_schema: SchemaRef,
}

fn read_only() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}

/// DataFusion reports a disallowed statement as a plan error; name it for what it is.
fn classify(e: DataFusionError) -> Error {
    let message = e.strip_backtrace();
    if message.contains("not supported") && (message.contains("DDL") || message.contains("DML") || message.contains("Statement")) {
        Error::NotReadOnly(message)
    } else {
        e.into()
    }
}

/// The schema batches are labelled with: the executed one, each field nullable where the
/// plan or the execution says so (only relaxing, so every batch fits it); the executed one
/// alone if the two differ in more than nullability.
fn relaxed(planned: &SchemaRef, executed: &SchemaRef) -> SchemaRef {
    let same_shape = planned.fields().len() == executed.fields().len()
        && planned.fields().iter().zip(executed.fields()).all(|(p, e)| p.name() == e.name() && p.data_type() == e.data_type());
    if !same_shape || planned == executed {
        return executed.clone();
    }
    let fields: Vec<_> =
        planned.fields().iter().zip(executed.fields()).map(|(p, e)| e.as_ref().clone().with_nullable(p.is_nullable() || e.is_nullable())).collect();
    SchemaRef::new(Schema::new_with_metadata(fields, executed.metadata().clone()))
}

/// A stream that fails with [`Error::Timeout`] once its deadline passes, and with
/// [`Error::AnswerTooLarge`] once its batches pass `answer_limit` bytes.
struct Deadline {
    bytes: u64,
    answer_limit: u64,
    /// The answer's schema as planned (nullable where the plan says so).
    schema: SchemaRef,
    inner: SendableRecordBatchStream,
    sleep: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    /// The caller's key's permit to run this query, released when the stream is dropped.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Stream for Deadline {
    type Item = datafusion::error::Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.sleep.as_mut().poll(cx).is_ready() {
            let limit = self.limit;
            return Poll::Ready(Some(Err(DataFusionError::External(Box::new(Error::Timeout(limit))))));
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(batch))) => {
                let bytes = self.bytes.saturating_add(batch.get_array_memory_size() as u64);
                self.bytes = bytes;
                if bytes > self.answer_limit {
                    let limit = self.answer_limit;
                    return Poll::Ready(Some(Err(DataFusionError::External(Box::new(Error::AnswerTooLarge(limit))))));
                }
                // Relabelled only where the columns fit the planned schema (a non-null
                // column is a valid nullable one); otherwise the batch goes as it is.
                let batch = match batch.schema() == self.schema {
                    true => batch,
                    false => RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec()).unwrap_or(batch),
                };
                Poll::Ready(Some(Ok(batch)))
            }
            other => other,
        }
    }
}

impl RecordBatchStream for Deadline {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}


/// A named view that plans its SQL again on every scan, so it reads the newest version of
/// its tables like any query (DataFusion's `ViewTable` would keep the plan of start-up).
#[derive(Debug)]
struct FreshView {
    sql: String,
    schema: SchemaRef,
}

#[async_trait]
impl TableProvider for FreshView {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn get_table_definition(&self) -> Option<&str> {
        Some(&self.sql)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let state = state
            .as_any()
            .downcast_ref::<SessionState>()
            .ok_or_else(|| DataFusionError::Internal("views need a SessionState".into()))?;
        let plan = state.create_logical_plan(&self.sql).await?;
        let mut builder = LogicalPlanBuilder::from(plan);
        if let Some(projection) = projection {
            let columns: Vec<Expr> = projection
                .iter()
                .map(|i| datafusion::logical_expr::col(datafusion::common::Column::from_name(self.schema.field(*i).name())))
                .collect();
            builder = builder.project(columns)?;
        }
        if let Some(limit) = limit {
            builder = builder.limit(0, Some(limit))?;
        }
        state.create_physical_plan(&builder.build()?).await
    }
}
