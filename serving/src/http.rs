//! The OpenAI-compatible API (the conventions of vLLM and LoRAX): completions and chat
//! completions (streamed as server-sent events with `stream: true`), the model list with
//! each adapter's `parent`, and loading and unloading adapters at run time.
//!
//! `model` names the base model or a registered adapter. Callers authenticate with an API
//! key of the ingest layer (`Authorization: Bearer ...`); its id is who pays. Errors use
//! OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use ledgerlake_ingest::{ApiKeys, Role};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use utoipa::{OpenApi, ToSchema};

use crate::engine::{Completion, Engine, EngineError, Output, Request, Source};
use ledgerlake_lakehouse::{Amount, Price, PricingError};
use crate::lora::AdapterConfig;
use crate::sampling::SamplingParams;

/// Copies the adapter directory at an object-store URI (`s3://bucket/prefix`) to a local
/// directory for the adapter named first, returning that directory. The binary provides
/// it: this crate knows no object store.
pub type FetchAdapter = Arc<dyn Fn(String, String) -> futures::future::BoxFuture<'static, Result<PathBuf, FetchError>> + Send + Sync>;

/// Why an object-store directory could not be copied. The messages are for the caller:
/// they name the URI the caller gave and never the store's internals (the SDK's endpoints
/// and credential chain go to the log only).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0} is not an object-store URL this server can read")]
    BadUri(String),
    #[error("{0} holds no files")]
    Empty(String),
    #[error("the object store holding {0} is unavailable; retry later")]
    Unavailable(String),
}


#[derive(Clone)]
pub struct ServingState {
    pub engine: Engine,
    pub keys: Arc<ApiKeys>,
    /// How `lora_path`s that are URIs are fetched; without it only local paths load.
    pub fetch: Option<FetchAdapter>,
}

pub fn router(state: ServingState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The part of the API document these routes make (the binary merges it with the others).
#[derive(OpenApi)]
#[openapi(
    paths(completions, chat_completions, models, load_adapter, unload_adapter, metrics),
    components(schemas(
        CompletionBody, ChatBody, Common, Message, Content, Part, Prompt, Stop, StreamOptions,
        CompletionResponse, CompletionChoice, ChatResponse, ChatChoice, ChatMessage, ChatChunk, ChatChunkChoice, Delta,
        Usage, ModelList, ModelCard, LoadBody, UnloadBody, StatusMessage, OpenAiError, OpenAiErrorDetail,
    )),
    tags((name = "openai", description = "OpenAI-compatible completions over the base model and its LoRA adapters")),
)]
pub struct ApiDoc;

/// An error in OpenAI's shape.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OpenAiError {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OpenAiErrorDetail {
    /// What went wrong, for people. It never names the server's internals.
    pub message: String,
    /// `invalid_request_error`, `permission_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// `model_not_found`, `invalid_api_key`, `rate_limit_exceeded`, `conflict` or
    /// `service_unavailable`, when one applies.
    pub code: Option<String>,
}

/// An error on its way to the caller.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: String,
}

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: &str = "1";

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, kind: "invalid_request_error", code: None, param, message: message.into() }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, kind: "server_error", code: Some("service_unavailable"), param: None, message: message.into() }
    }

    fn body(&self) -> OpenAiError {
        OpenAiError {
            error: OpenAiErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_owned(),
                param: self.param.map(str::to_owned),
                code: self.code.map(str::to_owned),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        let (status, kind, code, param) = match e {
            EngineError::UnknownModel(_) => (StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found"), Some("model")),
            EngineError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", None, None),
            EngineError::Overloaded(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("rate_limit_exceeded"), None),
            EngineError::Conflict(_) => (StatusCode::CONFLICT, "invalid_request_error", Some("conflict"), Some("lora_name")),
            EngineError::Stopped | EngineError::Accounting(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("service_unavailable"), None),
            EngineError::AdapterLoad { .. } | EngineError::AdapterFailed { .. } | EngineError::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None)
            }
        };
        Self { status, kind, code, param, message }
    }
}

impl From<ledgerlake_ingest::Error> for ApiError {
    fn from(e: ledgerlake_ingest::Error) -> Self {
        let message = e.to_string();
        match e {
            ledgerlake_ingest::Error::Forbidden { .. } => {
                Self { status: StatusCode::FORBIDDEN, kind: "permission_error", code: None, param: None, message }
            }
            _ => Self {
                status: StatusCode::UNAUTHORIZED,
                kind: "invalid_request_error",
                code: Some("invalid_api_key"),
                param: None,
                message: "Incorrect or missing API key: send `Authorization: Bearer <key>`".into(),
            },
        }
    }
}

fn authorize(state: &ServingState, headers: &HeaderMap, need: Role) -> Result<String, ApiError> {
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    Ok(state.keys.authorize(header, need)?.id)
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}"), None))
}

/// `stop`: one string or a list of up to four.
#[derive(Deserialize, Default, ToSchema)]
#[serde(untagged)]
enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

/// One prompt: text, a list holding one text, or token ids.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Deserialize, Default, ToSchema)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields both endpoints share (others OpenAI defines are accepted and ignored when
/// they do not change the answer).
#[derive(Deserialize, ToSchema)]
struct Common {
    /// The base model or a registered adapter.
    #[schema(example = "ledgerlake-base")]
    model: String,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    stop: Stop,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
}

#[derive(Deserialize, ToSchema)]
struct CompletionBody {
    #[serde(flatten)]
    common: Common,
    prompt: Prompt,
    #[serde(default)]
    echo: bool,
}

#[derive(Deserialize, ToSchema)]
struct Message {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    role: String,
    /// Text, text parts, or null (as an assistant's turn that only called tools).
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, ToSchema)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize, ToSchema)]
struct ChatBody {
    #[serde(flatten)]
    common: Common,
    messages: Vec<Message>,
}

/// A checked request, ready for the engine.
struct Plan {
    model: String,
    adapter: Option<String>,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn plan(state: &ServingState, c: Common, default_max: usize) -> Result<Plan, ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("only n = 1 is supported", Some("n")));
    }
    if c.logprobs.as_ref().is_some_and(|v| !v.is_null() && *v != Value::Bool(false)) {
        return Err(ApiError::bad("logprobs are not supported", Some("logprobs")));
    }
    if c.presence_penalty.is_some_and(|p| p != 0.0) || c.frequency_penalty.is_some_and(|p| p != 0.0) {
        return Err(ApiError::bad("presence and frequency penalties are not supported", Some("presence_penalty")));
    }
    let max_tokens = c.max_completion_tokens.or(c.max_tokens).unwrap_or(default_max);
    if max_tokens == 0 {
        return Err(ApiError::bad("max_tokens must be at least 1", Some("max_tokens")));
    }
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::bad(format!("top_k must be -1 or positive, got {k}"), Some("top_k"))),
    };
    let stop = match c.stop {
        Stop::None => vec![],
        Stop::One(s) => vec![s],
        Stop::Many(v) => v,
    };
    if stop.len() > 4 {
        return Err(ApiError::bad("at most 4 stop sequences", Some("stop")));
    }
    let sampling = SamplingParams { temperature: c.temperature.unwrap_or(1.0), top_p: c.top_p.unwrap_or(1.0), top_k, seed: c.seed };
    sampling.check().map_err(|m| ApiError::bad(m, None))?;
    let adapter = if c.model == state.engine.base_name() {
        None
    } else if state.engine.is_registered(&c.model) {
        Some(c.model.clone())
    } else {
        return Err(EngineError::UnknownModel(c.model).into());
    };
    Ok(Plan {
        model: c.model,
        adapter,
        max_tokens,
        sampling,
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
    })
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Tokens of one request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    fn of(c: &Completion) -> Self {
        // Both are bounded by the model's context, far below usize::MAX.
        Self { prompt_tokens: c.prompt_tokens, completion_tokens: c.completion_tokens, total_tokens: c.prompt_tokens + c.completion_tokens }
    }
}

/// A completion (`object: text_completion`), whole or one streamed chunk of it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// On a whole answer, and on the last chunk of a stream with `include_usage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    pub text: String,
    pub index: u32,
    /// Always null: log-probabilities are not computed.
    pub logprobs: Option<Value>,
    /// `stop`, `length` or `cancelled`; null on a chunk that does not end the answer.
    pub finish_reason: Option<String>,
}

/// A chat completion (`object: chat.completion`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatResponse {
    pub id: String,
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessage,
    /// Always null: log-probabilities are not computed.
    pub logprobs: Option<Value>,
    /// `stop`, `length` or `cancelled`.
    pub finish_reason: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// One streamed chunk of a chat completion (`object: chat.completion.chunk`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
}

/// What a chunk adds to the message.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A streamed chunk, which can also become the usage chunk OpenAI sends last: the same
/// head, no choices.
trait Chunk: Serialize + Send + 'static {
    fn into_usage(self, usage: Usage) -> Self;
}

impl Chunk for CompletionResponse {
    fn into_usage(self, usage: Usage) -> Self {
        Self { choices: vec![], usage: Some(usage), ..self }
    }
}

impl Chunk for ChatChunk {
    fn into_usage(self, usage: Usage) -> Self {
        Self { choices: vec![], usage: Some(usage), ..self }
    }
}

fn finish_reason(c: &Completion) -> String {
    c.finish_reason.as_str().to_owned()
}

/// One server-sent event holding `value` as JSON.
fn json_event(value: &impl Serialize) -> Event {
    // These types have plain fields and string keys only, so they always serialize; the
    // fallback keeps the stream well-formed regardless.
    let internal = r#"{"error": {"message": "internal error", "type": "server_error", "param": null, "code": null}}"#;
    Event::default().data(serde_json::to_string(value).unwrap_or_else(|_| internal.to_owned()))
}

fn submit(state: &ServingState, plan: &Plan, id: &str, prompt: Vec<u32>, caller: String) -> Result<mpsc::UnboundedReceiver<Output>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    state.engine.submit(Request {
        id: id.to_owned(),
        adapter: plan.adapter.clone(),
        prompt,
        max_tokens: plan.max_tokens,
        sampling: plan.sampling.clone(),
        stop: plan.stop.clone(),
        caller,
        output: tx,
    })?;
    Ok(rx)
}

/// Waits for the whole answer.
async fn finish(mut rx: mpsc::UnboundedReceiver<Output>) -> Result<Completion, ApiError> {
    while let Some(out) = rx.recv().await {
        match out {
            Output::Text(_) => {}
            Output::Finished(c) => return Ok(c),
            Output::Failed(e) => return Err(e.into()),
        }
    }
    Err(EngineError::Stopped.into())
}

/// Server-sent events: one chunk per piece of text, the last with the finish reason,
/// then `[DONE]`. `chunk(text, finish)` builds each chunk's JSON.
fn sse<C: Chunk>(
    mut rx: mpsc::UnboundedReceiver<Output>,
    first: Option<C>,
    include_usage: bool,
    chunk: impl Fn(Option<&str>, Option<&Completion>) -> C + Send + 'static,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = async_stream(move |tx: mpsc::Sender<Event>| async move {
        if let Some(first) = first {
            let _ = tx.send(json_event(&first)).await;
        }
        while let Some(out) = rx.recv().await {
            let event = match out {
                Output::Text(text) => json_event(&chunk(Some(&text), None)),
                Output::Finished(c) => {
                    let last = chunk(None, Some(&c));
                    let _ = tx.send(json_event(&last)).await;
                    if include_usage {
                        let _ = tx.send(json_event(&last.into_usage(Usage::of(&c)))).await;
                    }
                    break;
                }
                Output::Failed(e) => json_event(&ApiError::from(e).body()),
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A stream fed by a task (dropping the stream stops the task at its next send, which
/// drops the engine's receiver, which cancels the request).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(f(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) })
}

/// OpenAI's legacy completions: text in, text out (`stream: true` for server-sent events).
#[utoipa::path(
    post, path = "/v1/completions", tag = "openai",
    request_body(content = CompletionBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The completion; with `stream: true`, server-sent events of chunks of this shape, then `data: [DONE]`", content(
            (CompletionResponse = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 400, description = "A field is invalid (`param` names it)", body = OpenAiError),
        (status = 401, description = "No or unknown API key", body = OpenAiError),
        (status = 404, description = "`model` names neither the base model nor a loaded adapter", body = OpenAiError),
        (status = 429, description = "The queue is full; retry shortly", body = OpenAiError),
        (status = 500, description = "The adapter failed while serving; only its requests fail", body = OpenAiError),
        (status = 503, description = "The server is stopping, or the request's billing could not be recorded (nothing was charged); retry", body = OpenAiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
async fn completions(State(state): State<ServingState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, Role::Read)?;
    let body: CompletionBody = parse(&body)?;
    let prompt_text = match body.prompt {
        Prompt::Text(t) => t,
        Prompt::Texts(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Texts(_) => return Err(ApiError::bad("send one prompt per request", Some("prompt"))),
        Prompt::Tokens(ids) => state.engine.tokenizer.decode(&ids).map_err(|e| ApiError::bad(e.to_string(), Some("prompt")))?,
    };
    let echo = body.echo;
    let plan = plan(&state, body.common, 16)?;
    let prompt = state.engine.tokenizer.encode_prompt(&prompt_text).map_err(|e| ApiError::bad(e.to_string(), Some("prompt")))?;
    let id = new_id("cmpl");
    let rx = submit(&state, &plan, &id, prompt, caller)?;
    let created = now();
    let model = plan.model.clone();
    let response = move |id: String, model: String, text: String, finish_reason: Option<String>, usage: Option<Usage>| CompletionResponse {
        id,
        object: "text_completion".into(),
        created,
        model,
        choices: vec![CompletionChoice { text, index: 0, logprobs: None, finish_reason }],
        usage,
    };
    if plan.stream {
        let first = echo.then(|| response(new_id("cmpl"), plan.model.clone(), prompt_text, None, None));
        let chunk = move |text: Option<&str>, done: Option<&Completion>| {
            response(id.clone(), model.clone(), text.unwrap_or("").to_owned(), done.map(finish_reason), None)
        };
        return Ok(sse(rx, first, plan.include_usage, chunk).into_response());
    }
    let c = finish(rx).await?;
    let text = if echo { format!("{prompt_text}{}", c.text) } else { c.text.clone() };
    Ok(axum::Json(response(id, model, text, Some(finish_reason(&c)), Some(Usage::of(&c)))).into_response())
}

/// The chat template of the default model: one `Role: content` line per message, then
/// `Assistant:`. Generation stops before the next `User:` line.
pub fn chat_prompt(messages: &[(String, String)]) -> String {
    let mut out = String::new();
    for (role, content) in messages {
        let name = match role.as_str() {
            "system" | "developer" => "System",
            "assistant" => "Assistant",
            "tool" => "Tool",
            _ => "User",
        };
        out.push_str(&format!("{name}: {}\n", content.trim()));
    }
    out.push_str("Assistant:");
    out
}

/// OpenAI's chat completions over the model's chat template (`stream: true` for
/// server-sent events of `chat.completion.chunk`s).
#[utoipa::path(
    post, path = "/v1/chat/completions", tag = "openai",
    request_body(content = ChatBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The answer; with `stream: true`, server-sent events of `ChatChunk`s, then `data: [DONE]`", content(
            (ChatResponse = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 400, description = "A field is invalid (`param` names it)", body = OpenAiError),
        (status = 401, description = "No or unknown API key", body = OpenAiError),
        (status = 404, description = "`model` names neither the base model nor a loaded adapter", body = OpenAiError),
        (status = 429, description = "The queue is full; retry shortly", body = OpenAiError),
        (status = 500, description = "The adapter failed while serving; only its requests fail", body = OpenAiError),
        (status = 503, description = "The server is stopping, or the request's billing could not be recorded (nothing was charged); retry", body = OpenAiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
async fn chat_completions(State(state): State<ServingState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, Role::Read)?;
    let body: ChatBody = parse(&body)?;
    if body.messages.is_empty() {
        return Err(ApiError::bad("messages must not be empty", Some("messages")));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for m in body.messages {
        if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(ApiError::bad(format!("unknown role {:?}", m.role), Some("messages")));
        }
        let text = match m.content {
            Some(Content::Text(t)) => t,
            None => String::new(),
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::bad(format!("content parts of type {:?} are not supported", p.kind), Some("messages")));
                    }
                    t.push_str(p.text.as_deref().unwrap_or(""));
                }
                t
            }
        };
        messages.push((m.role, text));
    }
    let mut plan = plan(&state, body.common, 64)?;
    plan.stop.push("\nUser:".into());
    let prompt = state.engine.tokenizer.encode_prompt(&chat_prompt(&messages)).map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
    let id = new_id("chatcmpl");
    let rx = submit(&state, &plan, &id, prompt, caller)?;
    let created = now();
    let model = plan.model.clone();
    if plan.stream {
        let chunk = move |delta: Delta, finish_reason: Option<String>| ChatChunk {
            id: id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: model.clone(),
            choices: vec![ChatChunkChoice { index: 0, delta, logprobs: None, finish_reason }],
            usage: None,
        };
        let first = chunk(Delta { role: Some("assistant".into()), content: Some(String::new()) }, None);
        let next = move |text: Option<&str>, done: Option<&Completion>| {
            chunk(Delta { role: None, content: text.map(str::to_owned) }, done.map(finish_reason))
        };
        return Ok(sse(rx, Some(first), plan.include_usage, next).into_response());
    }
    let c = finish(rx).await?;
    Ok(axum::Json(ChatResponse {
        id,
        object: "chat.completion".into(),
        created,
        model,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatMessage { role: "assistant".into(), content: c.text.trim_start().to_owned() },
            logprobs: None,
            finish_reason: finish_reason(&c),
        }],
        usage: Usage::of(&c),
    })
    .into_response())
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The served models (`object: list`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// A served model: the base model, or an adapter with the base as `parent` (vLLM's form).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    pub owned_by: String,
    /// The base model's name, or the adapter's directory.
    pub root: String,
    /// The base model of an adapter; null for the base model.
    pub parent: Option<String>,
}

/// The answer of loading or unloading an adapter.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusMessage {
    pub status: String,
    pub message: String,
}

/// The base model and every loaded adapter.
#[utoipa::path(
    get, path = "/v1/models", tag = "openai",
    responses(
        (status = 200, description = "The served models", body = ModelList),
        (status = 401, description = "No or unknown API key", body = OpenAiError),
    ),
    security(("bearer" = [])),
)]
async fn models(State(state): State<ServingState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Read)?;
    let base = state.engine.base_name().to_owned();
    let card = |id: String, created: u64, root: String, parent: Option<String>| ModelCard {
        id,
        object: "model".into(),
        created,
        owned_by: "ledgerlake".into(),
        root,
        parent,
    };
    let mut data = vec![card(base.clone(), state.engine.created, base.clone(), None)];
    for a in state.engine.adapters() {
        data.push(card(a.name, a.created, a.path.display().to_string(), Some(base.clone())));
    }
    Ok(axum::Json(ModelList { object: "list".into(), data }).into_response())
}

#[derive(Deserialize, ToSchema)]
struct LoadBody {
    /// The adapter's model id (a slug), which requests then name as `model`.
    lora_name: String,
    /// A local directory, or an object-store URI (`s3://bucket/prefix`), holding a PEFT
    /// adapter (`adapter_config.json`, `adapter_model.safetensors`).
    lora_path: String,
    /// ledgerlake's extension: the adapter's price in base units per 1,000 tokens (a
    /// string of digits or a number); the base model's price when absent.
    #[serde(default)]
    price_per_1k_input: Option<Amount>,
    #[serde(default)]
    price_per_1k_output: Option<Amount>,
}

#[derive(Deserialize, ToSchema)]
struct UnloadBody {
    lora_name: String,
}

/// Loads a PEFT LoRA adapter at run time (admin only; vLLM's route). It is checked against
/// the base model now, and priced at the base model's price unless `price_per_1k_*` say.
#[utoipa::path(
    post, path = "/v1/load_lora_adapter", tag = "openai",
    request_body(content = LoadBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The adapter is served under `lora_name`", body = StatusMessage),
        (status = 400, description = "A bad name, price or path, or an adapter that does not fit the base model (the message names the tensor)", body = OpenAiError),
        (status = 401, description = "No or unknown API key", body = OpenAiError),
        (status = 403, description = "Only an admin key loads adapters", body = OpenAiError),
        (status = 503, description = "The object store holding the adapter is unavailable; retry", body = OpenAiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = [])),
)]
async fn load_adapter(State(state): State<ServingState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Admin)?;
    let body: LoadBody = parse(&body)?;
    if body.lora_name == state.engine.base_name() {
        return Err(ApiError::bad(format!("`{}` is the base model", body.lora_name), Some("lora_name")));
    }
    // Adapters are model ids in the lake (inference and fee events name them).
    if let Err(e) = body.lora_name.parse::<ledgerlake_lakehouse::ids::ModelId>() {
        return Err(ApiError::bad(e.to_string(), Some("lora_name")));
    }
    if state.engine.is_registered(&body.lora_name) {
        return Err(ApiError::bad(format!("The lora adapter '{}' has already been loaded.", body.lora_name), Some("lora_name")));
    }
    let base = state.engine.base_price();
    let price = Price::new(
        body.price_per_1k_input.unwrap_or(base.per_1k_input()),
        body.price_per_1k_output.unwrap_or(base.per_1k_output()),
    )
    .map_err(|e| {
        let param = match &e {
            PricingError::PriceTooHigh { field: "price_per_1k_input", .. } => "price_per_1k_input",
            _ => "price_per_1k_output",
        };
        ApiError::bad(e.to_string(), Some(param))
    })?;
    // The weights load on first use; the config is checked now so a wrong path fails here.
    let path = if body.lora_path.contains("://") {
        let fetch = state.fetch.as_ref().ok_or_else(|| ApiError::bad(String::from("only local lora_paths load here"), Some("lora_path")))?;
        fetch(body.lora_name.clone(), body.lora_path.clone()).await.map_err(|e| match e {
            FetchError::Unavailable(_) => ApiError::unavailable(e.to_string()),
            FetchError::BadUri(_) | FetchError::Empty(_) => ApiError::bad(e.to_string(), Some("lora_path")),
        })?
    } else {
        PathBuf::from(&body.lora_path)
    };
    let config_path = path.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| ApiError::bad(format!("cannot read {}: {e}", config_path.display()), Some("lora_path")))?;
    let config: AdapterConfig =
        serde_json::from_str(&text).map_err(|e| ApiError::bad(format!("{}: {e}", config_path.display()), Some("lora_path")))?;
    config.targets().map_err(|m| ApiError::bad(m, Some("lora_path")))?;
    if !path.join("adapter_model.safetensors").is_file() {
        return Err(ApiError::bad(format!("{} has no adapter_model.safetensors", path.display()), Some("lora_path")));
    }
    // The weights are read and checked against the base model now, so a wrong-shaped
    // adapter is refused here (naming the tensor) rather than failing its requests.
    let engine = state.engine.clone();
    let checked = path.clone();
    tokio::task::spawn_blocking(move || engine.check_adapter(&checked))
        .await
        .map_err(|_| ApiError::from(EngineError::Stopped))?
        .map_err(|m| ApiError::bad(format!("the adapter does not fit the base model: {m}"), Some("lora_path")))?;
    state.engine.register(&body.lora_name, path, price, Source::Admin)?;
    let message = format!("Success: LoRA adapter '{}' added successfully.", body.lora_name);
    Ok(axum::Json(StatusMessage { status: "ok".into(), message }).into_response())
}

/// Unloads an adapter loaded through `load_lora_adapter` (admin only). Adapters registered
/// in the lake follow the lake and are refused (409).
#[utoipa::path(
    post, path = "/v1/unload_lora_adapter", tag = "openai",
    request_body(content = UnloadBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The adapter is no longer served", body = StatusMessage),
        (status = 400, description = "Not `{\"lora_name\": ...}`", body = OpenAiError),
        (status = 401, description = "No or unknown API key", body = OpenAiError),
        (status = 403, description = "Only an admin key unloads adapters", body = OpenAiError),
        (status = 404, description = "No adapter of that name is loaded", body = OpenAiError),
        (status = 409, description = "The adapter is registered in the lake; a new `model.registered` changes it", body = OpenAiError),
    ),
    security(("bearer" = [])),
)]
async fn unload_adapter(State(state): State<ServingState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Admin)?;
    let body: UnloadBody = parse(&body)?;
    if !state.engine.unregister(&body.lora_name)? {
        return Err(EngineError::UnknownModel(body.lora_name).into());
    }
    let message = format!("Success: LoRA adapter '{}' removed successfully.", body.lora_name);
    Ok(axum::Json(StatusMessage { status: "ok".into(), message }).into_response())
}

/// Prometheus metrics of serving and accounting, in the OpenMetrics text format.
#[utoipa::path(
    get, path = "/metrics", tag = "openai",
    responses((status = 200, description = "The metrics", content_type = "application/openmetrics-text", body = String)),
)]
async fn metrics(State(state): State<ServingState>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.engine.metrics.encode()).into_response()
}
