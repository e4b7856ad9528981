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
use crate::retrieval::{Citation, DEFAULT_TOP_K, RetrievalRequest, RetrieveError, Retrieved, Retriever};
use crate::sampling::{MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob};

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
    /// The adapter is over the configured size cap (nothing of it was fetched).
    #[error("{0}")]
    TooLarge(String),
}


#[derive(Clone)]
pub struct ServingState {
    pub engine: Engine,
    pub keys: Arc<ApiKeys>,
    /// How `lora_path`s that are URIs are fetched; without it only local paths load.
    pub fetch: Option<FetchAdapter>,
    /// Passages for requests with `"ledgerlake": {"datanets": [...]}`; without it such
    /// requests are refused.
    pub retriever: Option<Arc<dyn Retriever>>,
    /// Where a `lora_path` may be (and how large an adapter may be).
    pub roots: Arc<crate::roots::AdapterRoots>,
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
        CompletionLogprobs, ChatLogprobs, ChatTokenLogprob, TopLogprob, RetrievalRequest, Citation,
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
    /// Choices to generate (1 to 16); the prompt is billed once.
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    stop: Stop,
    /// Choice `i` of a request with a seed draws with `seed + i`.
    #[serde(default)]
    seed: Option<u64>,
    /// Completions: the number of alternatives (0 to 20) to report with each token's
    /// log-probability. Chat: `true` to report log-probabilities.
    #[serde(default)]
    logprobs: Option<Value>,
    /// Chat: alternatives (0 to 20) per token, with `logprobs: true`.
    #[serde(default)]
    top_logprobs: Option<usize>,
    /// -2 to 2, subtracted once from the logit of each token already generated.
    #[serde(default)]
    presence_penalty: Option<f32>,
    /// -2 to 2, subtracted from a token's logit per time it was generated.
    #[serde(default)]
    frequency_penalty: Option<f32>,
    /// vLLM's: above 1 discourages tokens of the prompt and the output (logits divided
    /// when positive, multiplied when negative); 1 is none.
    #[serde(default)]
    repetition_penalty: Option<f32>,
    /// ledgerlake's extension: retrieve passages of datanets into the prompt; the answer
    /// carries them as `citations`, and the cited contributions earn from its fee.
    #[serde(default)]
    ledgerlake: Option<RetrievalRequest>,
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

/// Most choices one request may ask for.
const MAX_N: usize = 16;

/// A checked request, ready for the engine.
struct Plan {
    model: String,
    adapter: Option<String>,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    n: usize,
    /// Alternatives per token when log-probabilities are asked for.
    logprobs: Option<usize>,
    retrieval: Option<RetrievalRequest>,
}

/// Which endpoint's meaning of `logprobs` applies.
#[derive(Clone, Copy, PartialEq)]
enum Api {
    Completions,
    Chat,
}

fn plan(state: &ServingState, c: Common, default_max: usize, api: Api) -> Result<Plan, ApiError> {
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::bad(format!("n must be between 1 and {MAX_N}, got {n}"), Some("n")));
    }
    let too_many = |k: usize, param| {
        if k > MAX_TOP_LOGPROBS { Err(ApiError::bad(format!("at most {MAX_TOP_LOGPROBS} alternatives per token, got {k}"), Some(param))) } else { Ok(k) }
    };
    let logprobs = match (api, &c.logprobs) {
        (_, None | Some(Value::Null)) | (Api::Chat, Some(Value::Bool(false))) => None,
        (Api::Completions, Some(Value::Number(k))) => match k.as_u64() {
            Some(k) => Some(too_many(k as usize, "logprobs")?),
            None => return Err(ApiError::bad("logprobs must be a whole number from 0 to 20", Some("logprobs"))),
        },
        (Api::Chat, Some(Value::Bool(true))) => Some(too_many(c.top_logprobs.unwrap_or(0), "top_logprobs")?),
        (Api::Completions, _) => return Err(ApiError::bad("logprobs must be a whole number from 0 to 20", Some("logprobs"))),
        (Api::Chat, _) => return Err(ApiError::bad("logprobs must be true or false", Some("logprobs"))),
    };
    if api == Api::Chat && c.top_logprobs.is_some() && logprobs.is_none() {
        return Err(ApiError::bad("top_logprobs needs logprobs: true", Some("top_logprobs")));
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
    let sampling = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p.unwrap_or(1.0),
        top_k,
        seed: c.seed,
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
    };
    sampling.check().map_err(|m| {
        let param = ["presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p"].into_iter().find(|p| m.starts_with(p));
        ApiError::bad(m, param)
    })?;
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
        n,
        logprobs,
        retrieval: c.ledgerlake,
    })
}

/// The passages of the request's retrieval (none without one), numbered from 1.
async fn retrieve(state: &ServingState, plan: &Plan, query: String) -> Result<Vec<Retrieved>, ApiError> {
    let Some(request) = &plan.retrieval else { return Ok(vec![]) };
    let Some(retriever) = state.retriever.clone() else {
        return Err(ApiError::bad("this server does not retrieve: it has no lake to read datanets from", Some("ledgerlake")));
    };
    let datanets = request.datanets.clone();
    let top_k = request.top_k.unwrap_or(DEFAULT_TOP_K);
    // A search reads index files: off the runtime's threads.
    let found = tokio::task::spawn_blocking(move || retriever.retrieve(&datanets, &query, top_k))
        .await
        .map_err(|_| ApiError::unavailable("retrieval failed; retry"))?;
    match found {
        Ok(mut passages) => {
            for (i, p) in passages.iter_mut().enumerate() {
                p.citation.index = i as u32 + 1;
            }
            Ok(passages)
        }
        Err(RetrieveError::Invalid(m)) => Err(ApiError::bad(m, Some("ledgerlake"))),
        // The retriever logs its internals; the caller learns only that it failed.
        Err(RetrieveError::Unavailable(_)) => Err(ApiError::unavailable("retrieval is unavailable; retry")),
    }
}

fn citations_of(passages: &[Retrieved]) -> Option<Vec<Citation>> {
    (!passages.is_empty()).then(|| passages.iter().map(|p| p.citation.clone()).collect())
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
    /// The usage of every choice of one request (the prompt is billed with the first).
    fn of(choices: &[Completion]) -> Self {
        // Both are bounded by the model's context times MAX_N, far below usize::MAX.
        let prompt_tokens = choices.iter().map(|c| c.prompt_tokens).sum();
        let completion_tokens = choices.iter().map(|c| c.completion_tokens).sum();
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// Log-probabilities in the legacy completions shape.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// For each token, its most likely alternatives by text.
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f32>>,
    /// Where each token starts in the choice's text, in characters.
    pub text_offset: Vec<usize>,
}

/// One alternative token of a chat log-probability.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// A token of a chat answer with its log-probability and alternatives.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// Log-probabilities in the chat shape.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    /// Always null.
    pub refusal: Option<String>,
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
    /// The passages retrieval put into the prompt (with `ledgerlake.datanets`), `[n]` in
    /// the prompt being `index` n; on a whole answer and a stream's first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub citations: Option<Vec<Citation>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    pub text: String,
    pub index: u32,
    /// With `logprobs`: each token of `text` (of this chunk, when streamed).
    pub logprobs: Option<CompletionLogprobs>,
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
    /// The passages retrieval put into the prompt (with `ledgerlake.datanets`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub citations: Option<Vec<Citation>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessage,
    /// With `logprobs: true`: each token of the answer.
    pub logprobs: Option<ChatLogprobs>,
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
    /// On the first chunk: the passages retrieval put into the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub citations: Option<Vec<Citation>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
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
        Self { choices: vec![], usage: Some(usage), citations: None, ..self }
    }
}

impl Chunk for ChatChunk {
    fn into_usage(self, usage: Usage) -> Self {
        Self { choices: vec![], usage: Some(usage), citations: None, ..self }
    }
}

fn finish_reason(c: &Completion) -> String {
    c.finish_reason.as_str().to_owned()
}

/// The text of a token as log-probabilities show it (special tokens included).
fn piece(state: &ServingState, id: u32) -> String {
    state.engine.tokenizer.piece(id)
}

fn completion_logprobs(state: &ServingState, tokens: &[TokenLogprob], offset: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut at = offset;
    for t in tokens {
        let text = piece(state, t.id);
        out.text_offset.push(at);
        at += text.chars().count();
        out.tokens.push(text);
        out.token_logprobs.push(t.logprob);
        out.top_logprobs.push(t.top.iter().map(|&(id, lp)| (piece(state, id), lp)).collect());
    }
    out
}

fn chat_logprobs(state: &ServingState, tokens: &[TokenLogprob]) -> ChatLogprobs {
    let top = |id: u32, logprob: f32| {
        let token = piece(state, id);
        TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob }
    };
    let content = tokens
        .iter()
        .map(|t| {
            let TopLogprob { token, logprob, bytes } = top(t.id, t.logprob);
            ChatTokenLogprob { token, logprob, bytes, top_logprobs: t.top.iter().map(|&(id, lp)| top(id, lp)).collect() }
        })
        .collect();
    ChatLogprobs { content, refusal: None }
}

/// One server-sent event holding `value` as JSON.
fn json_event(value: &impl Serialize) -> Event {
    // These types have plain fields and string keys only, so they always serialize; the
    // fallback keeps the stream well-formed regardless.
    let internal = r#"{"error": {"message": "internal error", "type": "server_error", "param": null, "code": null}}"#;
    Event::default().data(serde_json::to_string(value).unwrap_or_else(|_| internal.to_owned()))
}

/// Submits the `n` choices of a request; choice `i` answers on the `i`th receiver. The
/// first choice carries the request id and the prompt's bill; choice `i > 0` is
/// `<id>-<i>` and draws with `seed + i` when the request has a seed.
async fn submit(
    state: &ServingState,
    plan: &Plan,
    id: &str,
    prompt: Vec<u32>,
    caller: String,
    citations: &[Retrieved],
) -> Result<Vec<mpsc::UnboundedReceiver<Output>>, ApiError> {
    let mut receivers = Vec::with_capacity(plan.n);
    for i in 0..plan.n {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut sampling = plan.sampling.clone();
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
        let request = Request {
            id: if i == 0 { id.to_owned() } else { format!("{id}-{i}") },
            adapter: plan.adapter.clone(),
            prompt: prompt.clone(),
            max_tokens: plan.max_tokens,
            sampling,
            stop: plan.stop.clone(),
            caller: caller.clone(),
            logprobs: plan.logprobs,
            bill_prompt: i == 0,
            citations: citations.iter().map(|p| p.citation.clone()).collect(),
            output: tx,
        };
        // A stream's text goes out before its end is billed: its worst case is held first,
        // durably, so no streamed answer goes out unbilled, even if the server dies.
        let held = plan.stream;
        if held {
            state.engine.hold(&request).await?;
        }
        let request_id = request.id.clone();
        if let Err(e) = state.engine.submit(request) {
            if held {
                state.engine.release(&request_id);
            }
            return Err(e.into());
        }
        receivers.push(rx);
    }
    Ok(receivers)
}

/// Waits for every choice's whole answer (the first failure is the request's).
async fn finish(receivers: Vec<mpsc::UnboundedReceiver<Output>>) -> Result<Vec<Completion>, ApiError> {
    let mut done = Vec::with_capacity(receivers.len());
    for mut rx in receivers {
        let completion = loop {
            match rx.recv().await {
                Some(Output::Text(_) | Output::Logprobs(_)) => {}
                Some(Output::Finished(c)) => break c,
                Some(Output::Failed(e)) => return Err(e.into()),
                None => return Err(EngineError::Stopped.into()),
            }
        };
        done.push(completion);
    }
    Ok(done)
}

/// What a stream's chunk builder is given for one choice.
enum Piece<'a> {
    Text(&'a str, &'a [TokenLogprob]),
    Done(&'a Completion),
}

/// Server-sent events: for each choice one chunk per piece of text, the last with the
/// finish reason; after every choice ended, the usage chunk (with `include_usage`) and
/// `[DONE]`. `chunk(index, piece)` builds each chunk's JSON.
fn sse<C: Chunk>(
    receivers: Vec<mpsc::UnboundedReceiver<Output>>,
    first: Vec<C>,
    include_usage: bool,
    chunk: impl Fn(u32, Piece<'_>) -> C + Send + 'static,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    // One channel for every choice's output, tagged with its index.
    let (merged_tx, mut merged) = mpsc::unbounded_channel::<(u32, Output)>();
    let choices = receivers.len();
    for (i, mut rx) in receivers.into_iter().enumerate() {
        let tx = merged_tx.clone();
        tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                if tx.send((i as u32, out)).is_err() {
                    return;
                }
            }
        });
    }
    drop(merged_tx);
    let stream = async_stream(move |tx: mpsc::Sender<Event>| async move {
        for first in first {
            let _ = tx.send(json_event(&first)).await;
        }
        let mut pending: Vec<Vec<TokenLogprob>> = (0..choices).map(|_| Vec::new()).collect();
        let mut finished = Vec::with_capacity(choices);
        let mut ended = 0;
        let mut last = None;
        while let Some((i, out)) = merged.recv().await {
            let event = match out {
                Output::Logprobs(l) => {
                    pending[i as usize].extend(l);
                    continue;
                }
                Output::Text(text) => {
                    let logprobs = std::mem::take(&mut pending[i as usize]);
                    json_event(&chunk(i, Piece::Text(&text, &logprobs)))
                }
                Output::Finished(c) => {
                    ended += 1;
                    let end = chunk(i, Piece::Done(&c));
                    let event = json_event(&end);
                    finished.push(c);
                    last = Some(end);
                    event
                }
                Output::Failed(e) => {
                    ended += 1;
                    json_event(&ApiError::from(e).body())
                }
            };
            if tx.send(event).await.is_err() {
                return;
            }
            if ended == choices {
                break;
            }
        }
        if include_usage && let Some(last) = last {
            let _ = tx.send(json_event(&last.into_usage(Usage::of(&finished)))).await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A stream fed by a task (dropping the stream stops the task at its next send, which
/// drops the engine's receivers, which cancels the requests).
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
    let plan = plan(&state, body.common, 16, Api::Completions)?;
    let passages = retrieve(&state, &plan, prompt_text.clone()).await?;
    // The model reads the passages before the prompt; `echo` shows the prompt as sent.
    let read = if passages.is_empty() { prompt_text.clone() } else { format!("{}\n{prompt_text}", crate::retrieval::context(&passages)) };
    let prompt = state.engine.tokenizer.encode_prompt(&read).map_err(|e| ApiError::bad(e.to_string(), Some("prompt")))?;
    let id = new_id("cmpl");
    let receivers = submit(&state, &plan, &id, prompt, caller, &passages).await?;
    let citations = citations_of(&passages);
    let created = now();
    let model = plan.model.clone();
    let response = move |id: String, model: String, choices: Vec<CompletionChoice>, usage: Option<Usage>| CompletionResponse {
        id,
        object: "text_completion".into(),
        created,
        model,
        choices,
        usage,
        citations: None,
    };
    let with_logprobs = plan.logprobs.is_some();
    // With echo, the text starts with the prompt (and token offsets after it).
    let offset = if echo { prompt_text.chars().count() } else { 0 };
    if plan.stream {
        // With echo, each choice first streams the prompt; with citations, a first chunk
        // carries them.
        let mut first: Vec<CompletionResponse> = if echo || citations.is_some() {
            let text = if echo { prompt_text.clone() } else { String::new() };
            (0..plan.n as u32)
                .map(|index| {
                    let choice = CompletionChoice { text: text.clone(), index, logprobs: None, finish_reason: None };
                    response(id.clone(), model.clone(), vec![choice], None)
                })
                .collect()
        } else {
            Vec::new()
        };
        if let Some(f) = first.first_mut() {
            f.citations = citations;
        }
        let streamed = state.clone();
        let offsets = std::sync::Mutex::new(vec![offset; plan.n]);
        let chunk = move |index: u32, piece: Piece<'_>| {
            let choice = match piece {
                Piece::Text(text, logprobs) => {
                    let logprobs = with_logprobs.then(|| {
                        let mut offsets = offsets.lock().unwrap_or_else(|e| e.into_inner());
                        let lp = completion_logprobs(&streamed, logprobs, offsets[index as usize]);
                        offsets[index as usize] += text.chars().count();
                        lp
                    });
                    CompletionChoice { text: text.to_owned(), index, logprobs, finish_reason: None }
                }
                Piece::Done(c) => CompletionChoice { text: String::new(), index, logprobs: None, finish_reason: Some(finish_reason(c)) },
            };
            response(id.clone(), model.clone(), vec![choice], None)
        };
        return Ok(sse(receivers, first, plan.include_usage, chunk).into_response());
    }
    let done = finish(receivers).await?;
    let choices = done
        .iter()
        .enumerate()
        .map(|(i, c)| CompletionChoice {
            text: if echo { format!("{prompt_text}{}", c.text) } else { c.text.clone() },
            index: i as u32,
            logprobs: with_logprobs.then(|| completion_logprobs(&state, &c.logprobs, offset)),
            finish_reason: Some(finish_reason(c)),
        })
        .collect();
    let whole = CompletionResponse { citations, ..response(id, model, choices, Some(Usage::of(&done))) };
    Ok(axum::Json(whole).into_response())
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
        (status = 400, description = "A field is invalid (`param` names it), or the model's chat template refuses the conversation", body = OpenAiError),
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
        messages.push(crate::chat::ChatMessage { role: m.role, content: text });
    }
    let mut plan = plan(&state, body.common, 64, Api::Chat)?;
    // Retrieval searches with the last user turn, and its passages open the conversation
    // as (or at the end of) the system message.
    let query = messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone()).unwrap_or_default();
    let passages = retrieve(&state, &plan, query).await?;
    if !passages.is_empty() {
        let context = crate::retrieval::context(&passages);
        match messages.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{context}", m.content),
            _ => messages.insert(0, crate::chat::ChatMessage { role: "system".into(), content: context }),
        }
    }
    let citations = citations_of(&passages);
    let chat = &state.engine.tokenizer.chat;
    plan.stop.extend(chat.stop.iter().cloned());
    let rendered = chat.render(&messages, true).map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
    let prompt = state.engine.tokenizer.encode_prompt(&rendered).map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
    let id = new_id("chatcmpl");
    let receivers = submit(&state, &plan, &id, prompt, caller, &passages).await?;
    let created = now();
    let model = plan.model.clone();
    let with_logprobs = plan.logprobs.is_some();
    if plan.stream {
        let chunk = move |index: u32, delta: Delta, logprobs: Option<ChatLogprobs>, finish_reason: Option<String>| ChatChunk {
            id: id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: model.clone(),
            choices: vec![ChatChunkChoice { index, delta, logprobs, finish_reason }],
            usage: None,
            citations: None,
        };
        let mut first: Vec<ChatChunk> =
            (0..plan.n as u32).map(|i| chunk(i, Delta { role: Some("assistant".into()), content: Some(String::new()) }, None, None)).collect();
        if let Some(f) = first.first_mut() {
            f.citations = citations;
        }
        let streamed = state.clone();
        let next = move |index: u32, piece: Piece<'_>| match piece {
            Piece::Text(text, logprobs) => {
                let logprobs = with_logprobs.then(|| chat_logprobs(&streamed, logprobs));
                chunk(index, Delta { role: None, content: Some(text.to_owned()) }, logprobs, None)
            }
            Piece::Done(c) => chunk(index, Delta::default(), None, Some(finish_reason(c))),
        };
        return Ok(sse(receivers, first, plan.include_usage, next).into_response());
    }
    let done = finish(receivers).await?;
    let choices = done
        .iter()
        .enumerate()
        .map(|(i, c)| ChatChoice {
            index: i as u32,
            message: ChatMessage { role: "assistant".into(), content: c.text.trim_start().to_owned() },
            logprobs: with_logprobs.then(|| chat_logprobs(&state, &c.logprobs)),
            finish_reason: finish_reason(c),
        })
        .collect();
    Ok(axum::Json(ChatResponse { id, object: "chat.completion".into(), created, model, choices, usage: Usage::of(&done), citations }).into_response())
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
    /// The base model's name, or the adapter's own id (never a path on the server).
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
    // An adapter's root is its own id: where its files are is the server's business.
    for a in state.engine.adapters() {
        data.push(card(a.name.clone(), a.created, a.name, Some(base.clone())));
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
    // Only from the adapter roots, and no larger than the cap (checked before reading).
    let location = state.roots.check(&body.lora_path).map_err(|m| ApiError::bad(m, Some("lora_path")))?;
    // The weights load on first use; the config is checked now so a wrong path fails here.
    let path = match location {
        crate::roots::Location::Remote(uri) => {
            let fetch = state.fetch.as_ref().ok_or_else(|| ApiError::bad(String::from("only local lora_paths load here"), Some("lora_path")))?;
            fetch(body.lora_name.clone(), uri).await.map_err(|e| match e {
                FetchError::Unavailable(_) => ApiError::unavailable(e.to_string()),
                FetchError::BadUri(_) | FetchError::Empty(_) | FetchError::TooLarge(_) => ApiError::bad(e.to_string(), Some("lora_path")),
            })?
        }
        crate::roots::Location::Local(dir) => {
            state.roots.check_size(&dir).map_err(|m| ApiError::bad(m, Some("lora_path")))?;
            dir
        }
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
