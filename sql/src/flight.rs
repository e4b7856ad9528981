//! Arrow Flight SQL and plain Flight on one gRPC port (`ledgerlake up --flight ADDR`).
//!
//! **Flight SQL**: statement queries, prepared statements with parameters (`?` or `$1`),
//! `GetCatalogs`, `GetDbSchemas`, `GetTables` (with schemas), `GetTableTypes`,
//! `GetSqlInfo`, bulk ingest of events (`CommandStatementIngest`, all or nothing per
//! batch), and cancellation (`CancelFlightInfo`, and the older `CancelQuery`).
//!
//! **Plain Flight**:
//! - `ListFlights`: one `FlightInfo` per table (path descriptor `[table]`) with its row and
//!   byte counts; a non-empty criteria expression keeps tables whose name starts with it.
//! - `GetFlightInfo` / `GetSchema`: a path `[table]` or `[table, version]` (a view by name
//!   too), or a command descriptor holding SQL text.
//! - `DoGet`: the tickets `GetFlightInfo` hands out. A ticket may also be written by hand:
//!   JSON `{"table": "fee_charged", "version": 3}` or `{"sql": "SELECT ..."}`, a bare
//!   table name, or SQL text.
//! - `DoPut`: path `[kind]` (`inference.completed` or the table name `inference_completed`),
//!   `["events"]` when batches carry a `kind` column, and a second element `"atomic"` for
//!   all-or-nothing batches. Each batch goes through the caller's [`EventSink`] (the same
//!   validation, idempotency and durability as `POST /v1/events`) and is answered by one
//!   `PutResult` whose `app_metadata` is its JSON receipt.
//!
//! **Auth**: every call but `Handshake` carries `authorization: Bearer <key>`, where the key
//! is an API key or a token from `Handshake`, which exchanges `Basic base64(user:key)` (the
//! user name is not checked) for a token valid 12 hours, sent back in the `authorization`
//! response header and as the payload. Queries need [`Access::Query`], `DoPut` and bulk
//! ingest [`Access::Ingest`]; what each stored event needs is the [`EventSink`]'s rule, which
//! gets the caller's key.
//!
//! Results stream batch by batch from the query to the socket: nothing is materialised.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_descriptor::DescriptorType;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionCancelQueryRequest, ActionCancelQueryResult, ActionClosePreparedStatementRequest,
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any, CommandGetCatalogs,
    CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandPreparedStatementUpdate, CommandStatementUpdate,
    CommandStatementIngest, CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TableExistsOption, TicketStatementQuery,
};
use arrow_flight::{
    Action, ActionType, CancelFlightInfoRequest, CancelFlightInfoResult, CancelStatus, Criteria, Empty, FlightData,
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage, PollInfo,
    PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use async_trait::async_trait;
use base64::Engine as _;
use datafusion::scalar::ScalarValue;
use futures::stream::AbortHandle;
use futures::{Stream, StreamExt, TryStreamExt};
use ledgerlake_lakehouse::EventKind;
use prost::Message;
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Access, Authorize, Denied, Reader, bearer};
use crate::{Error, SqlEngine, VIEWS};

/// How long a token from `Handshake` is accepted.
const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// Largest Flight data message sent; bigger batches are split (gRPC's usual limit is 4 MiB
/// on the receiving side, so stay under it).
const MAX_FLIGHT_DATA: usize = 3 << 20;
/// Most live handshake tokens, over all clients.
const MAX_TOKENS: usize = 100_000;
/// Most live handshake tokens of one API key (beyond it, its oldest is dropped), so one
/// key cannot fill the table and lock every other client out.
const MAX_TOKENS_PER_KEY: usize = 64;
/// Prepared statements not used for this long are closed for the client.
const PREPARED_TTL: Duration = Duration::from_secs(3600);
/// Most prepared statements open at once, over all clients.
const MAX_PREPARED: usize = 10_000;
/// Most prepared statements one API key holds open.
const MAX_PREPARED_PER_KEY: usize = 256;
/// How long a cancellation of a query that has not started waits for it.
const CANCELLED_TTL: Duration = Duration::from_secs(3600);

/// Where Flight `DoPut` and bulk ingest hand their events: implemented by the binary
/// with the ingest path, so this crate stores nothing itself.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Validates and stores the events of one batch as `POST /v1/events` stores an Arrow
    /// stream, as the caller holding `key` may (what each kind needs is the sink's rule).
    /// `kind` names the event kind of rows without a `kind` column; with `atomic`, one bad
    /// row stores nothing of the batch.
    async fn put(&self, batch: RecordBatch, kind: Option<String>, atomic: bool, key: &str) -> Result<PutReceipt, PutError>;
}

/// What one stored batch came to (serialized as the `PutResult`'s JSON metadata).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PutReceipt {
    /// Events stored by this batch.
    pub accepted: u64,
    /// Events whose `event_id` was stored before: not stored again.
    pub duplicates: u64,
    /// Rows not stored, with why (`index`, `field`, `message`, ...).
    pub errors: Vec<serde_json::Value>,
}

/// Why a batch was not stored at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutError {
    /// The batch as a whole is unreadable or too large (`INVALID_ARGUMENT`).
    Invalid(String),
    /// The ingest queue is full; retry shortly (`RESOURCE_EXHAUSTED`).
    Overloaded(String),
    /// Storage is down; nothing was acknowledged, retrying is safe (`UNAVAILABLE`).
    Unavailable(String),
}

/// What the Flight server needs.
#[derive(Clone)]
pub struct FlightState {
    pub engine: SqlEngine,
    pub auth: Arc<dyn Authorize>,
    pub sink: Arc<dyn EventSink>,
    /// Largest gRPC message accepted (a `DoPut` batch), in bytes.
    pub max_message_bytes: usize,
}

/// Serves Flight SQL and Flight on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: FlightState,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let limit = state.max_message_bytes;
    let service = FlightServiceServer::new(Gateway(Arc::new(Service::new(state)))).max_decoding_message_size(limit);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), shutdown)
        .await
}

fn query_status(e: Error) -> Status {
    let message = e.to_string();
    if e.is_unavailable() {
        return Status::unavailable(message);
    }
    match e {
        Error::BadQuery(_) | Error::NotReadOnly(_) | Error::Execution(_) => Status::invalid_argument(message),
        Error::Timeout(_) => Status::deadline_exceeded(message),
        Error::MemoryLimit(_) | Error::Busy(_) | Error::AnswerTooLarge(_) => Status::resource_exhausted(message),
        Error::Lake(_) | Error::Unavailable(_) => Status::unavailable(message),
    }
}

fn denied(d: Denied) -> Status {
    match d {
        Denied::Unauthenticated(m) => Status::unauthenticated(m),
        Denied::Forbidden(m) => Status::permission_denied(m),
    }
}

fn put_status(e: PutError) -> Status {
    match e {
        PutError::Invalid(m) => Status::invalid_argument(m),
        PutError::Overloaded(m) => Status::resource_exhausted(m),
        PutError::Unavailable(m) => Status::unavailable(m),
    }
}

fn ipc_schema(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: arrow::error::ArrowError| Status::internal(format!("encoding a schema: {e}")))?;
    Ok(bytes)
}

/// What a ticket asks for. Tickets this server writes carry an `id`, which cancellation
/// names; hand-written ones may leave it out.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fetch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sql: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    table: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
}

fn is_table(name: &str) -> bool {
    EventKind::ALL.iter().any(|k| k.table() == name)
}

fn is_relation(name: &str) -> bool {
    is_table(name) || VIEWS.iter().any(|(v, _)| *v == name)
}

impl Fetch {
    fn query(sql: impl Into<String>) -> Self {
        Self { id: Some(new_id()), sql: Some(sql.into()), ..Self::default() }
    }

    fn table(name: &str, version: Option<u64>) -> Result<Self, Status> {
        if !is_relation(name) {
            return Err(Status::not_found(format!("no table or view named {name:?}")));
        }
        if version.is_some() && !is_table(name) {
            return Err(Status::invalid_argument(format!("{name} is a view: only tables have versions")));
        }
        Ok(Self { id: Some(new_id()), table: Some(name.to_owned()), version, ..Self::default() })
    }

    /// A ticket as a client sent it: this server's JSON, a table name or SQL text.
    fn parse(bytes: &[u8]) -> Result<Self, Status> {
        let text = std::str::from_utf8(bytes).map_err(|_| Status::invalid_argument("a ticket is JSON, a table name or SQL text, in UTF-8"))?;
        let trimmed = text.trim();
        if trimmed.starts_with('{') {
            return serde_json::from_str(trimmed).map_err(|e| Status::invalid_argument(format!("ticket: {e}")));
        }
        if is_relation(trimmed) {
            return Self::table(trimmed, None);
        }
        Ok(Self { sql: Some(text.to_owned()), ..Self::default() })
    }

    fn to_bytes(&self) -> bytes::Bytes {
        // Serializing a struct of strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default().into()
    }

    /// The SQL that answers this ticket.
    fn sql(&self) -> Result<String, Status> {
        match (&self.sql, &self.table, self.version) {
            (Some(sql), None, None) => Ok(sql.clone()),
            (None, Some(table), None) if is_relation(table) => Ok(format!("SELECT * FROM \"{table}\"")),
            (None, Some(table), Some(v)) if is_table(table) => Ok(format!("SELECT * FROM at_version('{table}', {v})")),
            (None, Some(table), _) => Err(Status::not_found(format!("no table named {table:?}"))),
            _ => Err(Status::invalid_argument("a ticket names either \"sql\" or \"table\" (with an optional \"version\")")),
        }
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

struct PreparedStatement {
    /// The API key that prepared it: only that key uses or sees it.
    owner: String,
    sql: String,
    params: Vec<ScalarValue>,
    used: Instant,
}

enum Run {
    Running(AbortHandle),
    /// Cancelled before it started: its `DoGet` fails.
    Cancelled(Instant),
}

/// Queries in flight by id, for cancellation.
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<HashMap<String, Run>>>);

impl Runs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Run>> {
        // A poisoned lock means a panic while inserting or removing; the map is whole.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a starting query; `Err` when it was cancelled before it started.
    fn start(&self, id: &str, handle: AbortHandle) -> Result<RunGuard, Status> {
        let mut runs = self.lock();
        if let Some(Run::Cancelled(_)) = runs.remove(id) {
            return Err(Status::cancelled("the query was cancelled"));
        }
        runs.insert(id.to_owned(), Run::Running(handle));
        Ok(RunGuard { runs: self.clone(), id: id.to_owned() })
    }

    fn cancel(&self, id: &str) -> CancelStatus {
        let mut runs = self.lock();
        let now = Instant::now();
        runs.retain(|_, r| !matches!(r, Run::Cancelled(at) if now.duration_since(*at) > CANCELLED_TTL));
        match runs.get(id) {
            Some(Run::Running(handle)) => {
                handle.abort();
                CancelStatus::Cancelled
            }
            Some(Run::Cancelled(_)) => CancelStatus::Cancelled,
            None => {
                runs.insert(id.to_owned(), Run::Cancelled(now));
                CancelStatus::Cancelled
            }
        }
    }
}

/// Removes a query from [`Runs`] when its stream ends or is dropped.
struct RunGuard {
    runs: Runs,
    id: String,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let mut runs = self.runs.lock();
        if let Some(Run::Running(_)) = runs.get(&self.id) {
            runs.remove(&self.id);
        }
    }
}

type DoGetStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;
type DoPutStream = Pin<Box<dyn Stream<Item = Result<PutResult, Status>> + Send + 'static>>;
type ActionStream = Pin<Box<dyn Stream<Item = Result<arrow_flight::Result, Status>> + Send + 'static>>;

/// The Flight SQL service proper; [`Gateway`] puts authentication and plain Flight in
/// front of it.
pub struct Service {
    state: FlightState,
    sql_info: SqlInfoData,
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    prepared: Mutex<HashMap<String, PreparedStatement>>,
    runs: Runs,
}

impl Service {
    fn new(state: FlightState) -> Self {
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "ledgerlake");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerSql, true);
        info.append(SqlInfo::FlightSqlServerSubstrait, false);
        info.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        info.append(SqlInfo::FlightSqlServerCancel, true);
        info.append(SqlInfo::FlightSqlServerBulkIngestion, true);
        info.append(SqlInfo::FlightSqlServerIngestTransactionsSupported, false);
        let timeout = i32::try_from(state.engine.limits().timeout.as_secs()).unwrap_or(i32::MAX);
        info.append(SqlInfo::FlightSqlServerStatementTimeout, timeout);
        info.append(SqlInfo::SqlDdlCatalog, false);
        info.append(SqlInfo::SqlDdlSchema, false);
        info.append(SqlInfo::SqlDdlTable, false);
        info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        // Every value above has a type the builder takes; building cannot fail.
        let sql_info = info.build().unwrap_or_else(|_| unreachable!("static SqlInfo values build"));
        Self { state, sql_info, tokens: Mutex::default(), prepared: Mutex::default(), runs: Runs::default() }
    }

    fn engine(&self) -> &SqlEngine {
        &self.state.engine
    }

    /// The API key behind a call's `authorization` header (resolving handshake tokens).
    fn key_of<T>(&self, request: &Request<T>) -> Option<String> {
        let value = request.metadata().get("authorization")?.to_str().ok()?;
        let presented = bearer(value)?;
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        match tokens.get(presented) {
            Some((key, expires)) if *expires > Instant::now() => Some(key.clone()),
            _ => Some(presented.to_owned()),
        }
    }

    /// Whether the call's key may do `need`, and whose rows it reads.
    fn check<T>(&self, request: &Request<T>, need: Access) -> Result<Reader, Status> {
        self.state.auth.authorize(self.key_of(request).as_deref(), need).map_err(denied)
    }

    /// Streams the result of `sql`, as `reader` may see it, as Flight data; `id` makes it
    /// cancellable.
    async fn run(&self, reader: &Reader, id: Option<String>, sql: &str, params: Vec<ScalarValue>) -> Result<Response<DoGetStream>, Status> {
        let id = id.unwrap_or_else(new_id);
        let stream = self.engine().query_as(reader, sql, params).await.map_err(query_status)?;
        let schema = stream.schema();
        let (stream, handle) = futures::stream::abortable(stream);
        let guard = self.runs.start(&id, handle.clone())?;
        let batches = stream.map_err(|e| FlightError::Tonic(Box::new(query_status(e.into()))));
        // After the last batch: a cancelled query ends with CANCELLED, not a short result.
        // The guard lives in this tail, so it goes when the stream ends or is dropped.
        let tail = futures::stream::once(async move {
            let _guard = guard;
            handle.is_aborted().then(|| Err(FlightError::Tonic(Box::new(Status::cancelled("the query was cancelled")))))
        })
        .filter_map(futures::future::ready);
        let data = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .with_max_flight_data_size(MAX_FLIGHT_DATA)
            .build(batches.chain(tail))
            .map_err(Status::from);
        Ok(Response::new(Box::pin(data)))
    }

    fn batch_response(batch: RecordBatch) -> Response<DoGetStream> {
        let data = FlightDataEncoderBuilder::new()
            .with_schema(batch.schema())
            .build(futures::stream::once(async { Ok(batch) }))
            .map_err(Status::from);
        Response::new(Box::pin(data))
    }

    fn info(schema: &Schema, descriptor: FlightDescriptor, ticket: impl Into<bytes::Bytes>) -> Result<FlightInfo, Status> {
        Ok(FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(format!("encoding a schema: {e}")))?
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
            .with_descriptor(descriptor)
            .with_ordered(true))
    }

    /// A metadata command's `FlightInfo`: its ticket is the command itself.
    fn command_info(command: &impl ProstMessageExt, schema: &Schema, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(Self::info(schema, request.into_inner(), command.as_any().encode_to_vec())?))
    }

    // ----- plain Flight -----

    async fn list_tables(&self, criteria: Criteria) -> Result<Vec<FlightInfo>, Status> {
        let prefix = String::from_utf8(criteria.expression.to_vec()).map_err(|_| Status::invalid_argument("criteria must be UTF-8"))?;
        let tables = self.engine().lake().tables().await.map_err(|e| query_status(e.into()))?;
        let mut out = Vec::new();
        for t in tables.into_iter().filter(|t| t.kind.table().starts_with(&prefix)) {
            let name = t.kind.table();
            let fetch = Fetch::table(name, None)?;
            let described = self.engine().describe(&fetch.sql()?, vec![]).await.map_err(query_status)?;
            let info = Self::info(&described.schema, FlightDescriptor::new_path(vec![name.to_owned()]), fetch.to_bytes())?
                .with_total_records(i64::try_from(t.rows).unwrap_or(i64::MAX))
                .with_total_bytes(i64::try_from(t.bytes).unwrap_or(i64::MAX));
            out.push(info);
        }
        Ok(out)
    }

    /// The ticket a plain descriptor asks for: a path `[table]` / `[table, version]`, or SQL.
    fn plain_fetch(descriptor: &FlightDescriptor) -> Result<Fetch, Status> {
        match descriptor.r#type() {
            DescriptorType::Path => match descriptor.path.as_slice() {
                [table] => Fetch::table(table, None),
                [table, version] => {
                    let v = version.parse().map_err(|_| Status::invalid_argument(format!("version {version:?} is not a number")))?;
                    Fetch::table(table, Some(v))
                }
                _ => Err(Status::invalid_argument("a path descriptor is [table] or [table, version]")),
            },
            DescriptorType::Cmd => {
                let sql = std::str::from_utf8(&descriptor.cmd).map_err(|_| Status::invalid_argument("a command descriptor holds SQL text in UTF-8"))?;
                Ok(Fetch::query(sql))
            }
            DescriptorType::Unknown => Err(Status::invalid_argument("the descriptor has no type")),
        }
    }

    /// What a plain descriptor asks for, and the schema of its result.
    async fn plain_described(&self, descriptor: &FlightDescriptor) -> Result<(Fetch, Schema), Status> {
        let fetch = Self::plain_fetch(descriptor)?;
        let described = self.engine().describe(&fetch.sql()?, vec![]).await.map_err(query_status)?;
        Ok((fetch, described.schema.as_ref().clone()))
    }

    async fn plain_info(&self, descriptor: FlightDescriptor) -> Result<FlightInfo, Status> {
        let (fetch, schema) = self.plain_described(&descriptor).await?;
        Self::info(&schema, descriptor, fetch.to_bytes())
    }

    async fn plain_schema(&self, descriptor: FlightDescriptor) -> Result<SchemaResult, Status> {
        let (_, schema) = self.plain_described(&descriptor).await?;
        Ok(SchemaResult { schema: ipc_schema(&schema)? })
    }

    async fn plain_get(&self, reader: &Reader, ticket: &[u8]) -> Result<Response<DoGetStream>, Status> {
        let fetch = Fetch::parse(ticket)?;
        self.run(reader, fetch.id.clone(), &fetch.sql()?, vec![]).await
    }

    /// The event kind a `DoPut` path names, and whether its batches are atomic.
    fn put_target(path: &[String]) -> Result<(Option<String>, bool), Status> {
        let (target, atomic) = match path {
            [target] => (target, false),
            [target, flag] if flag == "atomic" => (target, true),
            _ => return Err(Status::invalid_argument("DoPut takes a path [kind], [kind, \"atomic\"], [\"events\"] or [\"events\", \"atomic\"]")),
        };
        if target == "events" {
            return Ok((None, atomic));
        }
        let kind = EventKind::ALL
            .iter()
            .find(|k| k.name() == target || k.table() == target)
            .ok_or_else(|| Status::not_found(format!("no event kind or table named {target:?}")))?;
        Ok((Some(kind.name().to_owned()), atomic))
    }

    /// Stores each batch of a `DoPut` stream as it arrives and answers one receipt per batch.
    fn put_batches(&self, data: PeekableFlightDataStream, kind: Option<String>, atomic: bool, key: String) -> DoPutStream {
        let sink = self.state.sink.clone();
        let batches = FlightRecordBatchStream::new_from_flight_data(data.into_peekable().map_err(FlightError::from));
        let results = futures::stream::try_unfold((batches, sink, 0u64), move |(mut batches, sink, n)| {
            let kind = kind.clone();
            let key = key.clone();
            async move {
                let Some(batch) = batches.try_next().await.map_err(|e| Status::invalid_argument(format!("batch {n}: {e}")))? else {
                    return Ok(None);
                };
                let receipt = sink.put(batch, kind, atomic, &key).await.map_err(put_status)?;
                let mut json = serde_json::to_value(&receipt).unwrap_or_default();
                json["batch"] = n.into();
                let result = PutResult { app_metadata: serde_json::to_vec(&json).unwrap_or_default().into() };
                Ok(Some((result, (batches, sink, n + 1))))
            }
        });
        Box::pin(results)
    }

    fn cancel(&self, info: &FlightInfo) -> Result<CancelStatus, Status> {
        let mut status = CancelStatus::Unspecified;
        for endpoint in &info.endpoint {
            let Some(ticket) = &endpoint.ticket else { continue };
            let id = self.ticket_id(&ticket.ticket).ok_or_else(|| Status::not_found("the FlightInfo names no query of this server"))?;
            status = self.runs.cancel(&id);
        }
        Ok(status)
    }

    /// The id a ticket's query runs under.
    fn ticket_id(&self, ticket: &[u8]) -> Option<String> {
        if let Ok(any) = Any::decode(ticket) {
            if let Ok(Some(t)) = any.unpack::<TicketStatementQuery>() {
                return Fetch::parse(&t.statement_handle).ok()?.id;
            }
            if let Ok(Some(p)) = any.unpack::<CommandPreparedStatementQuery>() {
                return String::from_utf8(p.prepared_statement_handle.to_vec()).ok();
            }
        }
        Fetch::parse(ticket).ok()?.id
    }

    /// The prepared statement `handle` of the call's key (another key's is unknown to it).
    fn prepared<T>(&self, handle: &[u8], request: &Request<T>) -> Result<(String, String, Vec<ScalarValue>), Status> {
        let handle = String::from_utf8(handle.to_vec()).map_err(|_| Status::not_found("unknown prepared statement"))?;
        let key = self.key_of(request).unwrap_or_default();
        let mut prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        let statement = prepared
            .get_mut(&handle)
            .filter(|s| s.owner == key)
            .ok_or_else(|| Status::not_found("unknown or closed prepared statement"))?;
        statement.used = Instant::now();
        Ok((handle, statement.sql.clone(), statement.params.clone()))
    }
}

/// Base64 as clients send Basic credentials: standard or URL-safe alphabet, padded or not
/// (the Go Flight client, under ADBC, sends it unpadded).
fn decode_base64(text: &str) -> Option<String> {
    use base64::alphabet::{STANDARD, URL_SAFE};
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let config = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    [GeneralPurpose::new(&STANDARD, config), GeneralPurpose::new(&URL_SAFE, config)]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

/// One row of bound parameters -> scalars.
fn bound_params(batches: &[RecordBatch]) -> Result<Vec<ScalarValue>, Status> {
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let Some(batch) = batches.iter().find(|b| b.num_rows() > 0) else { return Ok(vec![]) };
    if rows > 1 {
        return Err(Status::invalid_argument(format!("bind one row of parameters to a query, not {rows}")));
    }
    batch
        .columns()
        .iter()
        .map(|col| ScalarValue::try_from_array(col, 0).map_err(|e| Status::invalid_argument(format!("parameter: {e}"))))
        .collect()
}

#[tonic::async_trait]
impl FlightSqlService for Service {
    type FlightService = Service;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>, Status> {
        let value = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("send authorization: Basic base64(user:api key)"))?;
        let key = if let Some(encoded) = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic ")) {
            let decoded = decode_base64(encoded.trim())
                .ok_or_else(|| Status::unauthenticated("the Basic credentials are not base64 of user:key"))?;
            decoded.split_once(':').map(|(_, key)| key.to_owned()).unwrap_or(decoded)
        } else {
            bearer(value).ok_or_else(|| Status::unauthenticated("send authorization: Basic base64(user:api key)"))?.to_owned()
        };
        self.state.auth.authorize(Some(&key), Access::Query).map_err(denied)?;
        let token = format!("llt_{}{}", new_id(), new_id());
        {
            let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            tokens.retain(|_, (_, expires)| *expires > now);
            // One key's tokens beyond its share: its oldest goes (it can handshake again).
            let mut mine: Vec<(String, Instant)> = tokens.iter().filter(|(_, (k, _))| *k == key).map(|(t, (_, e))| (t.clone(), *e)).collect();
            if mine.len() >= MAX_TOKENS_PER_KEY {
                mine.sort_by_key(|(_, e)| *e);
                for (t, _) in mine.iter().take(mine.len() + 1 - MAX_TOKENS_PER_KEY) {
                    tokens.remove(t);
                }
            }
            if tokens.len() >= MAX_TOKENS {
                return Err(Status::resource_exhausted(format!("{MAX_TOKENS} handshake tokens are live: send the API key as a bearer header")));
            }
            tokens.insert(token.clone(), (key, now + TOKEN_TTL));
        }
        let header = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| Status::internal("token is not a header value"))?;
        let reply = HandshakeResponse { protocol_version: 0, payload: token.into_bytes().into() };
        let mut response: Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>> =
            Response::new(Box::pin(futures::stream::iter([Ok(reply)])));
        response.metadata_mut().insert("authorization", header);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let described = self.engine().describe(&query.query, vec![]).await.map_err(query_status)?;
        let ticket = TicketStatementQuery { statement_handle: Fetch::query(query.query).to_bytes() };
        Ok(Response::new(Self::info(&described.schema, request.into_inner(), ticket.as_any().encode_to_vec())?))
    }

    async fn do_get_statement(&self, ticket: TicketStatementQuery, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let reader = self.check(&request, Access::Query)?;
        let fetch = Fetch::parse(&ticket.statement_handle)?;
        self.run(&reader, fetch.id.clone(), &fetch.sql()?, vec![]).await
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let (_, sql, params) = self.prepared(&cmd.prepared_statement_handle, &request)?;
        let described = self.engine().describe(&sql, params).await.map_err(query_status)?;
        Ok(Response::new(Self::info(&described.schema, request.into_inner(), cmd.as_any().encode_to_vec())?))
    }

    async fn do_get_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let reader = self.check(&request, Access::Query)?;
        let (handle, sql, params) = self.prepared(&cmd.prepared_statement_handle, &request)?;
        self.run(&reader, Some(handle), &sql, params).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let owner = self.key_of(&request).unwrap_or_default();
        let described = self.engine().describe(&query.query, vec![]).await.map_err(query_status)?;
        let params = Schema::new(
            described
                .params
                .iter()
                .map(|(name, t)| Field::new(name, t.clone().unwrap_or(DataType::Null), true))
                .collect::<Vec<_>>(),
        );
        let handle = new_id();
        {
            let mut prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            prepared.retain(|_, s| now.duration_since(s.used) < PREPARED_TTL);
            if prepared.values().filter(|s| s.owner == owner).count() >= MAX_PREPARED_PER_KEY {
                return Err(Status::resource_exhausted(format!("this key holds {MAX_PREPARED_PER_KEY} open prepared statements: close some")));
            }
            if prepared.len() >= MAX_PREPARED {
                return Err(Status::resource_exhausted(format!("{MAX_PREPARED} prepared statements are open: close some")));
            }
            prepared.insert(handle.clone(), PreparedStatement { owner, sql: query.query, params: vec![], used: now });
        }
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into_bytes().into(),
            dataset_schema: ipc_schema(&described.schema)?,
            parameter_schema: ipc_schema(&params)?,
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let (handle, sql, _) = self.prepared(&query.prepared_statement_handle, &request)?;
        let batches: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(request.into_inner().into_peekable().map_err(FlightError::from))
            .try_collect()
            .await
            .map_err(|e| Status::invalid_argument(format!("parameters: {e}")))?;
        let params = bound_params(&batches)?;
        // Bind now so a wrong count or type is reported here, not at execution.
        self.engine().describe(&sql, params.clone()).await.map_err(query_status)?;
        let mut prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        let statement = prepared.get_mut(&handle).ok_or_else(|| Status::not_found("the prepared statement was closed"))?;
        statement.params = params;
        Ok(DoPutPreparedStatementResult { prepared_statement_handle: Some(handle.into_bytes().into()) })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        let handle = String::from_utf8_lossy(&query.prepared_statement_handle).into_owned();
        let key = self.key_of(&request).unwrap_or_default();
        let mut prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        // Only its own: another key's handle is left alone.
        if prepared.get(&handle).is_some_and(|s| s.owner == key) {
            prepared.remove(&handle);
        }
        Ok(())
    }

    async fn get_flight_info_catalogs(&self, query: CommandGetCatalogs, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Self::command_info(&query, &schema, request)
    }

    async fn do_get_catalogs(&self, query: CommandGetCatalogs, _request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let mut builder = query.into_builder();
        let mut catalogs: Vec<String> = self.engine().schema_names().map_err(query_status)?.into_iter().map(|(c, _)| c).collect();
        catalogs.dedup();
        for c in catalogs {
            builder.append(c);
        }
        Ok(Self::batch_response(builder.build().map_err(|e| Status::internal(e.to_string()))?))
    }

    async fn get_flight_info_schemas(&self, query: CommandGetDbSchemas, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Self::command_info(&query, &schema, request)
    }

    async fn do_get_schemas(&self, query: CommandGetDbSchemas, _request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let mut builder = query.into_builder();
        for (c, s) in self.engine().schema_names().map_err(query_status)? {
            builder.append(c, s);
        }
        Ok(Self::batch_response(builder.build().map_err(|e| Status::internal(e.to_string()))?))
    }

    async fn get_flight_info_tables(&self, query: CommandGetTables, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Self::command_info(&query, &schema, request)
    }

    async fn do_get_tables(&self, query: CommandGetTables, _request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let mut builder = query.into_builder();
        for r in self.engine().relations().await.map_err(query_status)? {
            builder
                .append(&r.catalog, &r.schema, &r.name, r.kind, &r.arrow_schema)
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(Self::batch_response(builder.build().map_err(|e| Status::internal(e.to_string()))?))
    }

    async fn get_flight_info_table_types(&self, query: CommandGetTableTypes, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Self::command_info(&query, &schema, request)
    }

    async fn do_get_table_types(&self, query: CommandGetTableTypes, _request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let mut builder = query.into_builder();
        for t in ["TABLE", "VIEW"] {
            builder.append(t);
        }
        Ok(Self::batch_response(builder.build().map_err(|e| Status::internal(e.to_string()))?))
    }

    async fn get_flight_info_sql_info(&self, query: CommandGetSqlInfo, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.sql_info).schema();
        Self::command_info(&query, &schema, request)
    }

    async fn do_get_sql_info(&self, query: CommandGetSqlInfo, _request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let batch = query.into_builder(&self.sql_info).build().map_err(|e| Status::internal(e.to_string()))?;
        Ok(Self::batch_response(batch))
    }

    async fn do_put_statement_ingest(&self, command: CommandStatementIngest, request: Request<PeekableFlightDataStream>) -> Result<i64, Status> {
        self.check(&request, Access::Ingest)?;
        let key = self.key_of(&request).unwrap_or_default();
        let exists = command.table_definition_options.as_ref().map(|o| o.if_exists()).unwrap_or(TableExistsOption::Unspecified);
        if matches!(exists, TableExistsOption::Fail | TableExistsOption::Replace) {
            return Err(Status::already_exists(format!(
                "{} exists and is append-only: ingest with mode \"append\"",
                command.table
            )));
        }
        let (kind, _) = Self::put_target(std::slice::from_ref(&command.table))?;
        let mut receipts = self.put_batches(request.into_inner(), kind, true, key);
        let mut stored = 0i64;
        while let Some(result) = receipts.next().await {
            let receipt: PutReceipt = serde_json::from_slice(&result?.app_metadata).map_err(|e| Status::internal(e.to_string()))?;
            if !receipt.errors.is_empty() {
                let errors = serde_json::to_string(&receipt.errors).unwrap_or_default();
                return Err(Status::invalid_argument(format!("{stored} rows stored before a batch with invalid rows, which stored nothing: {errors}")));
            }
            stored += i64::try_from(receipt.accepted).unwrap_or(i64::MAX);
        }
        Ok(stored)
    }

    async fn do_put_statement_update(&self, command: CommandStatementUpdate, _request: Request<PeekableFlightDataStream>) -> Result<i64, Status> {
        // Only queries run here: a write is refused with the engine's reason, a query is
        // sent back to the query path.
        self.engine().describe(&command.query, vec![]).await.map_err(query_status)?;
        Err(Status::invalid_argument("this is a query: execute it as one (only read-only queries run here)"))
    }

    async fn do_put_prepared_statement_update(
        &self,
        _command: CommandPreparedStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        // Preparing refuses writes, so every prepared statement is a query.
        Err(Status::invalid_argument("prepared statements here are queries: execute it as one (only read-only queries run here)"))
    }

    async fn do_put_fallback(&self, mut request: Request<PeekableFlightDataStream>, _message: Any) -> Result<Response<DoPutStream>, Status> {
        self.check(&request, Access::Ingest)?;
        let key = self.key_of(&request).unwrap_or_default();
        let path = match request.get_mut().peek().await {
            Some(Ok(FlightData { flight_descriptor: Some(d), .. })) if d.r#type() == DescriptorType::Path => d.path.clone(),
            _ => return Err(Status::invalid_argument("DoPut of events takes a path descriptor: [kind] or [\"events\"]")),
        };
        let (kind, atomic) = Self::put_target(&path)?;
        Ok(Response::new(self.put_batches(request.into_inner(), kind, atomic, key)))
    }

    async fn do_action_cancel_query(&self, query: ActionCancelQueryRequest, _request: Request<Action>) -> Result<ActionCancelQueryResult, Status> {
        let info = FlightInfo::decode(query.info).map_err(|e| Status::invalid_argument(format!("info: {e}")))?;
        // CancelResult (Flight SQL) numbers its values as CancelStatus (Flight) does.
        Ok(ActionCancelQueryResult { result: self.cancel(&info)? as i32 })
    }

    async fn list_custom_actions(&self) -> Option<Vec<Result<ActionType, Status>>> {
        Some(vec![Ok(ActionType {
            r#type: "CancelFlightInfo".into(),
            description: "Cancels the query of a FlightInfo.\nRequest: CancelFlightInfoRequest\nResponse: CancelFlightInfoResult".into(),
        })])
    }

    async fn do_action_fallback(&self, request: Request<Action>) -> Result<Response<ActionStream>, Status> {
        let action = request.into_inner();
        if action.r#type != "CancelFlightInfo" {
            return Err(Status::invalid_argument(format!("unknown action {:?}", action.r#type)));
        }
        let cancel = CancelFlightInfoRequest::decode(action.body).map_err(|e| Status::invalid_argument(format!("CancelFlightInfoRequest: {e}")))?;
        let info = cancel.info.ok_or_else(|| Status::invalid_argument("CancelFlightInfoRequest has no info"))?;
        let result = CancelFlightInfoResult { status: self.cancel(&info)? as i32 };
        let body = arrow_flight::Result { body: result.encode_to_vec().into() };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(body)]))))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// What the gRPC server runs: authenticates every call but `Handshake`, answers plain
/// Flight (`ListFlights`, path and SQL-text descriptors, hand-written tickets) and hands
/// Flight SQL commands to [`Service`].
#[derive(Clone)]
pub struct Gateway(Arc<Service>);

/// Is this `Any` a Flight SQL message (as opposed to a plain ticket or descriptor)?
fn flight_sql_message(bytes: &[u8]) -> bool {
    Any::decode(bytes).is_ok_and(|any| any.type_url.starts_with("type.googleapis.com/arrow.flight.protocol.sql."))
}

#[tonic::async_trait]
impl FlightService for Gateway {
    type HandshakeStream = <Service as FlightService>::HandshakeStream;
    type ListFlightsStream = <Service as FlightService>::ListFlightsStream;
    type DoGetStream = <Service as FlightService>::DoGetStream;
    type DoPutStream = <Service as FlightService>::DoPutStream;
    type DoActionStream = <Service as FlightService>::DoActionStream;
    type ListActionsStream = <Service as FlightService>::ListActionsStream;
    type DoExchangeStream = <Service as FlightService>::DoExchangeStream;

    async fn handshake(&self, request: Request<Streaming<HandshakeRequest>>) -> Result<Response<Self::HandshakeStream>, Status> {
        FlightService::handshake(&*self.0, request).await
    }

    async fn list_flights(&self, request: Request<Criteria>) -> Result<Response<Self::ListFlightsStream>, Status> {
        self.0.check(&request, Access::Query)?;
        let infos = self.0.list_tables(request.into_inner()).await?;
        Ok(Response::new(Box::pin(futures::stream::iter(infos.into_iter().map(Ok)))))
    }

    async fn get_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.0.check(&request, Access::Query)?;
        let descriptor = request.get_ref();
        if descriptor.r#type() == DescriptorType::Cmd && flight_sql_message(&descriptor.cmd) {
            return FlightService::get_flight_info(&*self.0, request).await;
        }
        Ok(Response::new(self.0.plain_info(request.into_inner()).await?))
    }

    async fn poll_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<PollInfo>, Status> {
        self.0.check(&request, Access::Query)?;
        FlightService::poll_flight_info(&*self.0, request).await
    }

    async fn get_schema(&self, request: Request<FlightDescriptor>) -> Result<Response<SchemaResult>, Status> {
        self.0.check(&request, Access::Query)?;
        let descriptor = request.into_inner();
        if descriptor.r#type() == DescriptorType::Cmd && flight_sql_message(&descriptor.cmd) {
            let any = Any::decode(&*descriptor.cmd).map_err(|e| Status::invalid_argument(e.to_string()))?;
            let Ok(Some(query)) = any.unpack::<CommandStatementQuery>() else {
                return Err(Status::unimplemented("GetSchema takes a path, SQL text or CommandStatementQuery"));
            };
            let described = self.0.engine().describe(&query.query, vec![]).await.map_err(query_status)?;
            return Ok(Response::new(SchemaResult { schema: ipc_schema(&described.schema)? }));
        }
        Ok(Response::new(self.0.plain_schema(descriptor).await?))
    }

    async fn do_get(&self, request: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        let reader = self.0.check(&request, Access::Query)?;
        if flight_sql_message(&request.get_ref().ticket) {
            return FlightService::do_get(&*self.0, request).await;
        }
        self.0.plain_get(&reader, &request.get_ref().ticket).await
    }

    async fn do_put(&self, request: Request<Streaming<FlightData>>) -> Result<Response<Self::DoPutStream>, Status> {
        // Ingest (plain DoPut, bulk ingest) checks for Access::Ingest itself.
        self.0.check(&request, Access::Query)?;
        FlightService::do_put(&*self.0, request).await
    }

    async fn do_exchange(&self, request: Request<Streaming<FlightData>>) -> Result<Response<Self::DoExchangeStream>, Status> {
        self.0.check(&request, Access::Query)?;
        FlightService::do_exchange(&*self.0, request).await
    }

    async fn do_action(&self, request: Request<Action>) -> Result<Response<Self::DoActionStream>, Status> {
        self.0.check(&request, Access::Query)?;
        FlightService::do_action(&*self.0, request).await
    }

    async fn list_actions(&self, request: Request<Empty>) -> Result<Response<Self::ListActionsStream>, Status> {
        self.0.check(&request, Access::Query)?;
        FlightService::list_actions(&*self.0, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_parse_as_json_table_or_sql() {
        let t = Fetch::parse(br#"{"table": "fee_charged", "version": 3}"#).unwrap();
        assert_eq!(t.sql().unwrap(), "SELECT * FROM at_version('fee_charged', 3)");
        let t = Fetch::parse(b"fee_charged").unwrap();
        assert_eq!(t.sql().unwrap(), "SELECT * FROM \"fee_charged\"");
        let t = Fetch::parse(b"SELECT 1").unwrap();
        assert_eq!(t.sql().unwrap(), "SELECT 1");
        assert_eq!(Fetch::parse(br#"{"table": "nope"}"#).unwrap().sql().unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(Fetch::parse(br#"{"table": "fees_by_model_day", "version": 1}"#).unwrap().sql().unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(Fetch::parse(br#"{"sql": "SELECT 1", "table": "fee_charged"}"#).unwrap().sql().unwrap_err().code(), tonic::Code::InvalidArgument);
        assert!(Fetch::parse(br#"{"bogus": 1}"#).is_err());
        // A ticket this server wrote is not mistaken for a Flight SQL command.
        assert!(!flight_sql_message(&Fetch::query("SELECT 1").to_bytes()));
        assert!(flight_sql_message(&TicketStatementQuery { statement_handle: Fetch::query("SELECT 1").to_bytes() }.as_any().encode_to_vec()));
    }

    #[test]
    fn basic_credentials_padded_or_not() {
        assert_eq!(decode_base64("dTprZXk=").as_deref(), Some("u:key"));
        assert_eq!(decode_base64("dTprZXk").as_deref(), Some("u:key"));
        assert_eq!(decode_base64("not base64!"), None);
    }

    #[test]
    fn put_targets() {
        assert_eq!(Service::put_target(&["events".into()]).unwrap(), (None, false));
        assert_eq!(Service::put_target(&["fee_charged".into(), "atomic".into()]).unwrap(), (Some("fee.charged".into()), true));
        assert_eq!(Service::put_target(&["fee.charged".into()]).unwrap(), (Some("fee.charged".into()), false));
        assert_eq!(Service::put_target(&["nope".into()]).unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(Service::put_target(&["events".into(), "maybe".into()]).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
