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
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

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

/// An error in OpenAI's shape.
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

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
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
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields both endpoints share (others OpenAI defines are accepted and ignored when
/// they do not change the answer).
#[derive(Deserialize)]
struct Common {
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

#[derive(Deserialize)]
struct CompletionBody {
    #[serde(flatten)]
    common: Common,
    prompt: Prompt,
    #[serde(default)]
    echo: bool,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Content,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
    Null(()),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
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

fn usage(c: &Completion) -> Value {
    json!({"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "total_tokens": c.prompt_tokens + c.completion_tokens})
}

fn finish_reason(c: &Completion) -> &'static str {
    c.finish_reason.as_str()
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
fn sse(
    mut rx: mpsc::UnboundedReceiver<Output>,
    first: Option<Value>,
    include_usage: bool,
    chunk: impl Fn(Option<&str>, Option<&Completion>) -> Value + Send + 'static,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = async_stream(move |tx: mpsc::Sender<Event>| async move {
        if let Some(first) = first {
            let _ = tx.send(Event::default().data(first.to_string())).await;
        }
        while let Some(out) = rx.recv().await {
            let event = match out {
                Output::Text(text) => chunk(Some(&text), None),
                Output::Finished(c) => {
                    let mut last = chunk(None, Some(&c));
                    let _ = tx.send(Event::default().data(last.to_string())).await;
                    if include_usage {
                        // OpenAI's usage chunk: the same head, no choices.
                        last["choices"] = json!([]);
                        last["usage"] = usage(&c);
                        let _ = tx.send(Event::default().data(last.to_string())).await;
                    }
                    break;
                }
                Output::Failed(e) => ApiError::from(e).body(),
            };
            if tx.send(Event::default().data(event.to_string())).await.is_err() {
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
    if plan.stream {
        let chunk = move |text: Option<&str>, done: Option<&Completion>| {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"text": text.unwrap_or(""), "index": 0, "logprobs": null, "finish_reason": done.map(finish_reason)}]})
        };
        let first = echo.then(|| {
            json!({"id": new_id("cmpl"), "object": "text_completion", "created": created, "model": plan.model,
                   "choices": [{"text": prompt_text, "index": 0, "logprobs": null, "finish_reason": null}]})
        });
        return Ok(sse(rx, first, plan.include_usage, chunk).into_response());
    }
    let c = finish(rx).await?;
    let text = if echo { format!("{prompt_text}{}", c.text) } else { c.text.clone() };
    Ok(axum::Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason(&c)}],
        "usage": usage(&c),
    }))
    .into_response())
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
            Content::Text(t) => t,
            Content::Null(()) => String::new(),
            Content::Parts(parts) => {
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
        let first = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]});
        let chunk = move |text: Option<&str>, done: Option<&Completion>| {
            let delta = match text {
                Some(t) => json!({"content": t}),
                None => json!({}),
            };
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": done.map(finish_reason)}]})
        };
        return Ok(sse(rx, Some(first), plan.include_usage, chunk).into_response());
    }
    let c = finish(rx).await?;
    Ok(axum::Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text.trim_start()}, "logprobs": null, "finish_reason": finish_reason(&c)}],
        "usage": usage(&c),
    }))
    .into_response())
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn models(State(state): State<ServingState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Read)?;
    let base = state.engine.base_name().to_owned();
    let mut data = vec![json!({"id": base, "object": "model", "created": state.engine.created, "owned_by": "ledgerlake", "root": base, "parent": null})];
    for a in state.engine.adapters() {
        data.push(json!({"id": a.name, "object": "model", "created": a.created, "owned_by": "ledgerlake", "root": a.path.display().to_string(), "parent": base}));
    }
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

#[derive(Deserialize)]
struct LoadBody {
    lora_name: String,
    lora_path: String,
    /// ledgerlake's extension: the adapter's price in base units per 1,000 tokens (a
    /// string of digits or a number); the base model's price when absent.
    #[serde(default)]
    price_per_1k_input: Option<Amount>,
    #[serde(default)]
    price_per_1k_output: Option<Amount>,
}

#[derive(Deserialize)]
struct UnloadBody {
    lora_name: String,
}

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
    Ok(axum::Json(json!({"status": "ok", "message": format!("Success: LoRA adapter '{}' added successfully.", body.lora_name)})).into_response())
}

async fn unload_adapter(State(state): State<ServingState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Admin)?;
    let body: UnloadBody = parse(&body)?;
    if !state.engine.unregister(&body.lora_name)? {
        return Err(EngineError::UnknownModel(body.lora_name).into());
    }
    Ok(axum::Json(json!({"status": "ok", "message": format!("Success: LoRA adapter '{}' removed successfully.", body.lora_name)})).into_response())
}

async fn metrics(State(state): State<ServingState>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.engine.metrics.encode()).into_response()
}
