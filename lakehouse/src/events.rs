//! The event kinds of the data contract: their JSON form (documented in `docs/events.md`),
//! their Arrow schemas and their Delta tables.
//!
//! Each kind has exactly one append-only Delta table. Its columns are the kind's fields plus
//! the common envelope: `event_id`, `event_time` (when it happened, from the producer),
//! `ingested_at` (when ledgerlake made it durable), and for the high-volume tables the
//! partition column `event_date` (the UTC date of `event_time`).

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema as JsonSchema, Type};
use utoipa::openapi::{Ref, RefOr};

use crate::ids::{
    Address, Amount, Bytes32, ContributionId, DatanetId, EventId, InferenceId, ModelId, Sha256Hex, Signature,
};
use crate::{Error, Result};

macro_rules! kinds {
    ($($variant:ident => $name:literal, $table:literal, $by_date:literal;)*) => {
        /// Every event kind ledgerlake accepts.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventKind { $($variant),* }

        impl EventKind {
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant),*];

            /// The `kind` string of the JSON form, e.g. `datanet.created`.
            pub fn name(self) -> &'static str {
                match self { $(EventKind::$variant => $name),* }
            }
            /// The Delta table this kind is stored in, e.g. `datanet_created`.
            pub fn table(self) -> &'static str {
                match self { $(EventKind::$variant => $table),* }
            }
            /// Whether the table only ever grows (Delta's `delta.appendOnly`). Every table
            /// but `inference_tokens`, whose rows expire.
            pub fn append_only(self) -> bool {
                !matches!(self, EventKind::InferenceTokens)
            }
            /// High-volume tables are partitioned by `event_date`.
            pub fn partitioned_by_date(self) -> bool {
                match self { $(EventKind::$variant => $by_date),* }
            }
        }

        impl FromStr for EventKind {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($name => Ok(EventKind::$variant),)*
                    other => Err(Error::UnknownKind(other.to_owned())),
                }
            }
        }

        /// One validated event of any kind.
        #[derive(Clone, Debug, PartialEq, Serialize)]
        #[serde(untagged)]
        pub enum Event { $($variant($variant)),* }

        impl Event {
            pub fn kind(&self) -> EventKind {
                match self { $(Event::$variant(_) => EventKind::$variant),* }
            }
            pub fn event_id(&self) -> &EventId {
                match self { $(Event::$variant(e) => &e.event_id),* }
            }
            pub fn event_time(&self) -> DateTime<Utc> {
                match self { $(Event::$variant(e) => e.event_time),* }
            }
            /// Parses the fields of `kind` from a JSON object that no longer holds `kind`.
            /// Errors carry the path of the offending field.
            pub fn from_json_fields(kind: EventKind, value: serde_json::Value) -> std::result::Result<Event, FieldError> {
                match kind {
                    $(EventKind::$variant => parse_fields::<$variant>(value).map(Event::$variant),)*
                }
            }
            /// The fast path of [`Event::from_json_fields`]: the fields of `kind` as raw JSON
            /// slices of the request, deserialized without building a `serde_json::Value`.
            /// `None` when they do not parse; [`Event::from_json_fields`] then says why.
            pub fn from_raw_fields(kind: EventKind, fields: Vec<(&str, &serde_json::value::RawValue)>) -> Option<Event> {
                match kind {
                    $(EventKind::$variant => raw_fields::<$variant>(fields).map(Event::$variant),)*
                }
            }
        }

        $(impl From<$variant> for Event {
            fn from(e: $variant) -> Event { Event::$variant(e) }
        })*

        impl utoipa::PartialSchema for EventKind {
            fn schema() -> RefOr<JsonSchema> {
                // The kinds callers may send: the derived ones are written by ledgerlake.
                let names = [$((EventKind::$variant, $name)),*];
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(names.iter().filter(|(k, _)| !k.derived()).map(|(_, n)| *n)))
                    .description(Some("An event kind of the data contract."))
                    .into()
            }
        }
        impl utoipa::ToSchema for EventKind {}

        /// The JSON form of an event: `kind` and that kind's fields (the schemas of the API
        /// document come from the event structs themselves).
        impl utoipa::PartialSchema for Event {
            fn schema() -> RefOr<JsonSchema> {
                let refs = [$((EventKind::$variant, stringify!($variant))),*];
                refs.iter()
                    .filter(|(k, _)| !k.derived())
                    .fold(OneOfBuilder::new(), |b, (_, name)| b.item(Ref::from_schema_name(*name)))
                    .description(Some("One event: `kind` names its kind, the other fields are that kind's (docs/events.md)."))
                    .into()
            }
        }
        impl utoipa::ToSchema for Event {
            fn schemas(schemas: &mut Vec<(String, RefOr<JsonSchema>)>) {
                $(
                    schemas.push((stringify!($variant).to_owned(), with_kind(<$variant as utoipa::PartialSchema>::schema(), $name)));
                    <$variant as utoipa::ToSchema>::schemas(schemas);
                )*
            }
        }
    };
}

/// A kind's schema with its `kind` property added (required, the one name allowed).
fn with_kind(schema: RefOr<JsonSchema>, name: &str) -> RefOr<JsonSchema> {
    match schema {
        RefOr::T(JsonSchema::Object(mut object)) => {
            object.properties.insert("kind".to_owned(), ObjectBuilder::new().schema_type(Type::String).enum_values(Some([name])).into());
            object.required.insert(0, "kind".to_owned());
            RefOr::T(JsonSchema::Object(object))
        }
        other => other,
    }
}

kinds! {
    DatanetCreated => "datanet.created", "datanet_created", false;
    DatanetUpdated => "datanet.updated", "datanet_updated", false;
    ContributionSubmitted => "contribution.submitted", "contribution_submitted", false;
    ContributionReviewed => "contribution.reviewed", "contribution_reviewed", false;
    AccessGranted => "access.granted", "access_granted", false;
    ModelRegistered => "model.registered", "model_registered", false;
    InferenceCompleted => "inference.completed", "inference_completed", true;
    FeeCharged => "fee.charged", "fee_charged", true;
    InferenceTokens => "inference.tokens", "inference_tokens", true;
    InferenceAttributed => "inference.attributed", "attributions", true;
    StakeChanged => "stake.changed", "stake_changed", false;
    TrainingRun => "training.run", "training_runs", false;
    TrainingMetric => "training.metric", "training_metrics", false;
    InferenceCited => "inference.cited", "citations", true;
    EpochClosed => "epoch.closed", "epochs", false;
    RewardEarned => "reward.earned", "rewards", true;
    AnchorLogged => "anchor.logged", "anchors", false;
    AccessRevoked => "access.revoked", "access_revoked", false;
    EventVoided => "event.voided", "voided_events", false;
    AccessRequested => "access.requested", "access_requested", false;
}

/// The prefix of the event ids ledgerlake's epoch job writes (`ledgerlake:epoch:7:pinned`,
/// ...): reserved, so no caller's event can take one of them first.
pub const RESERVED_ID_PREFIX: &str = "ledgerlake:";

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A field of an event that did not parse: the dotted path of the field (empty when the
/// whole object is at fault) and what was wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn raw_fields<'a, T: Deserialize<'a>>(fields: Vec<(&'a str, &'a serde_json::value::RawValue)>) -> Option<T> {
    let map = serde::de::value::MapDeserializer::<_, serde_json::Error>::new(fields.into_iter());
    T::deserialize(map).ok()
}

fn parse_fields<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> std::result::Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde names a missing or unknown field in its message but not in the path.
        let field = if path == "." {
            extract_backticked(&inner).unwrap_or_default()
        } else {
            path
        };
        FieldError { field, message: inner }
    })
}

fn extract_backticked(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(msg[start..start + len].to_owned())
}

/// The review outcome of a contribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Approved,
    Rejected,
    Flagged,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Approved => "approved",
            Verdict::Rejected => "rejected",
            Verdict::Flagged => "flagged",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatanetStatus {
    Active,
    Archived,
}

/// Who may train on a datanet: anyone (`public`), or the builders its owner granted access
/// (`private`, the default: a datanet created without a visibility is private).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    #[default]
    Private,
    Public,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StakeAction {
    Stake,
    Unstake,
}

/// A datanet pinned to one Delta version of its contributions, as used to train a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatanetVersion {
    pub datanet_id: DatanetId,
    pub version: u64,
}

/// `datanet.created`: an owner opens a curated data collection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatanetCreated {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub datanet_id: DatanetId,
    pub owner: Address,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// SPDX licence id contributions are accepted under, e.g. `CC-BY-4.0`.
    pub license: String,
    /// Absent means private.
    #[serde(default)]
    pub visibility: Option<Visibility>,
    /// EIP-712 signature by `owner` ([`crate::messages`]).
    #[serde(default)]
    pub signature: Option<Signature>,
}

/// `datanet.updated`: the owner changes a datanet's descriptive fields; absent fields stay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatanetUpdated {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub datanet_id: DatanetId,
    pub updated_by: Address,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub license: Option<String>,
    #[serde(default)]
    pub status: Option<DatanetStatus>,
    #[serde(default)]
    pub visibility: Option<Visibility>,
    /// EIP-712 signature by `updated_by` ([`crate::messages`]).
    #[serde(default)]
    pub signature: Option<Signature>,
}

/// `contribution.submitted`: a contributor adds signed text to a datanet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContributionSubmitted {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    /// Derived from the signed message; optional on input, checked when given.
    #[serde(default)]
    pub contribution_id: Option<ContributionId>,
    pub datanet_id: DatanetId,
    pub contributor: Address,
    pub content: String,
    /// Derived from `content`; optional on input, checked when given.
    #[serde(default)]
    pub content_sha256: Option<Sha256Hex>,
    pub license: String,
    #[serde(default)]
    pub language: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// EIP-712 signature by `contributor` ([`crate::messages`]).
    pub signature: Signature,
}

/// `contribution.reviewed`: the datanet owner approves, rejects or flags a contribution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContributionReviewed {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub contribution_id: ContributionId,
    pub datanet_id: DatanetId,
    pub reviewer: Address,
    pub verdict: Verdict,
    #[serde(default)]
    pub reason: Option<String>,
    /// EIP-712 signature by `reviewer` ([`crate::messages`]).
    pub signature: Signature,
}

/// `access.granted`: a datanet owner lets a builder train on the datanet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessGranted {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub datanet_id: DatanetId,
    pub builder: Address,
    pub granted_by: Address,
    /// EIP-712 signature by `granted_by` ([`crate::messages`]).
    #[serde(default)]
    pub signature: Option<Signature>,
}

/// `access.revoked`: a datanet owner withdraws a builder's access (the latest of a
/// builder's grants and revocations, in ingest order, decides).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessRevoked {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub datanet_id: DatanetId,
    pub builder: Address,
    pub revoked_by: Address,
    /// EIP-712 signature by `revoked_by` ([`crate::messages`]).
    pub signature: Signature,
}

/// `access.requested`: a builder asks a datanet's owner for access (to train on a private
/// datanet); the owner answers with `access.granted`, or not. A request grants nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessRequested {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub datanet_id: DatanetId,
    pub builder: Address,
    /// What the builder wants the data for (at most 2,000 bytes).
    #[serde(default)]
    pub message: Option<String>,
    /// EIP-712 signature by `builder` ([`crate::messages`]).
    pub signature: Signature,
}

/// `event.voided`: an admin's decision that a stored event no longer counts (incident
/// response): reward epochs closed after it ignore the event, and recomputing them agrees.
/// The voided event stays in its table; this row says why it does not count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventVoided {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    /// The event that no longer counts, and its kind.
    pub voided_event_id: EventId,
    pub voided_kind: String,
    pub reason: String,
    /// Who decided (the admin key's id).
    pub voided_by: String,
}

/// `model.registered`: a builder registers an adapter (or a base model) with its lineage
/// and its price.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelRegistered {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub model_id: ModelId,
    pub builder: Address,
    pub base_model: String,
    pub adapter_uri: String,
    #[serde(default)]
    pub datanets: Vec<DatanetVersion>,
    pub price_per_1k_input: Amount,
    pub price_per_1k_output: Amount,
    /// The run of `training_runs` that made the adapter, when ledgerlake trained it.
    #[serde(default)]
    pub training_run_id: Option<String>,
    /// sha256 of `contributions.txt` beside the adapter: the ids of the contributions
    /// trained on, sorted, one per line.
    #[serde(default)]
    pub contributions_sha256: Option<Sha256Hex>,
    #[serde(default)]
    pub hyperparameters: Option<Hyperparameters>,
    #[serde(default)]
    pub evaluation: Option<Evaluation>,
    /// EIP-712 signature by `builder` ([`crate::messages`]); absent only on registrations
    /// ledgerlake's ModelFactory writes for the builder it trained for.
    #[serde(default)]
    pub signature: Option<Signature>,
}

/// How an adapter was trained (`model finetune`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Hyperparameters {
    pub rank: u32,
    pub alpha: f64,
    /// Hugging Face module names, e.g. `q_proj`.
    pub targets: Vec<String>,
    pub learning_rate: f64,
    pub epochs: u32,
    pub batch_size: u32,
    pub max_seq_len: u32,
    /// Trained over the quantized base (QLoRA) rather than a dense one.
    pub qlora: bool,
    pub seed: u64,
    pub warmup_steps: u32,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Per mille of contributions held out for evaluation (by contribution id).
    pub heldout_permille: u32,
}

/// What an adapter scored on held-out contributions and on a prompt set, beside its base.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    pub heldout_examples: u32,
    pub heldout_tokens: u64,
    /// Mean next-token cross-entropy (nats) of the held-out contributions; absent when
    /// none were held out.
    #[serde(default)]
    pub base_loss: Option<f64>,
    #[serde(default)]
    pub loss: Option<f64>,
    #[serde(default)]
    pub base_perplexity: Option<f64>,
    #[serde(default)]
    pub perplexity: Option<f64>,
    /// Prompts of the prompt set, and how many the adapter (and the base) answered exactly
    /// or containing the expected text.
    pub prompts: u32,
    pub exact_match: u32,
    pub contains: u32,
    pub base_exact_match: u32,
    pub base_contains: u32,
}

/// How a training run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Completed,
    Failed,
    Cancelled,
}

/// `training.run`: one row per fine-tuning run, written when it ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingRun {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub run_id: String,
    pub model_id: ModelId,
    pub builder: Address,
    pub base_model: String,
    pub datanets: Vec<DatanetVersion>,
    pub status: RunStatus,
    pub hyperparameters: Hyperparameters,
    #[serde(default)]
    pub evaluation: Option<Evaluation>,
    pub train_examples: u32,
    pub train_tokens: u64,
    pub steps: u32,
    pub started_at: DateTime<Utc>,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Peak resident memory of the training process, in bytes.
    pub peak_memory_bytes: u64,
    #[serde(default)]
    pub final_loss: Option<f64>,
    #[serde(default)]
    pub adapter_uri: Option<String>,
    #[serde(default)]
    pub contributions_sha256: Option<Sha256Hex>,
    #[serde(default)]
    pub error: Option<String>,
}

/// `training.metric`: one optimizer step of a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingMetric {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub run_id: String,
    pub step: u32,
    pub epoch: u32,
    /// Mean next-token cross-entropy of the step's batch.
    pub loss: f64,
    pub learning_rate: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens predicted in the step.
    pub tokens: u64,
    pub tokens_per_second: f64,
}

/// `inference.completed`: one answer served by a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InferenceCompleted {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub inference_id: InferenceId,
    pub model_id: ModelId,
    /// Who called (the API key id the serving layer authenticated).
    pub caller: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub output_sha256: Sha256Hex,
    pub latency_ms: u32,
}

/// `inference.tokens`: the token ids of one answer, which attribution reads. Serving sends
/// it beside `inference.completed` unless the deployment opts out of storing them; rows
/// older than the deployment's retention are deleted (the one table that is not
/// append-only: see [`EventKind::append_only`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InferenceTokens {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub inference_id: InferenceId,
    pub model_id: ModelId,
    /// The prompt as the model read it (chat template applied).
    pub prompt_token_ids: Vec<u32>,
    /// The generated tokens counted in `completion_tokens`.
    pub output_token_ids: Vec<u32>,
}

/// The fixed-point scale of attribution weights: an inference's weights sum to exactly
/// this (10^9, parts per billion).
pub const WEIGHT_SCALE: u64 = 1_000_000_000;

/// How an attribution was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AttributionMethod {
    /// Verbatim spans of the output found in the contribution.
    Spans,
    /// Gradient influence of the contribution on the adapter that answered.
    Gradient,
    /// The contribution was retrieved into the prompt and cited.
    Retrieval,
}

/// A span of an output (in output tokens) that attribution found in a contribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputSpan {
    pub start: u32,
    pub len: u32,
}

/// `inference.attributed`: one contribution's share of one inference (or, with no
/// contribution, the record that the inference was attributed to none). An inference's
/// rows are written together, and their weights sum to exactly [`WEIGHT_SCALE`] (or are
/// one row of weight 0 with no contribution). Rules: `docs/attribution.md`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InferenceAttributed {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub inference_id: InferenceId,
    pub model_id: ModelId,
    #[serde(default)]
    pub contribution_id: Option<ContributionId>,
    #[serde(default)]
    pub contributor: Option<Address>,
    #[serde(default)]
    pub datanet_id: Option<DatanetId>,
    pub method: AttributionMethod,
    /// The method's score before weighting (spans: nats of information).
    pub raw_score: f64,
    /// The share, in units of [`WEIGHT_SCALE`].
    pub weight: u64,
    /// The spans of the output found in the contribution (span method).
    #[serde(default)]
    pub spans: Vec<OutputSpan>,
    /// What the job read: table versions and index coverage, so the result can be redone.
    pub basis: String,
}

/// `inference.cited`: one passage retrieval put into an inference's prompt (a request with
/// `"ledgerlake": {"datanets": [...]}`), the contribution it came from and its BM25
/// relevance. Serving sends one per citation beside `inference.completed`; attribution's
/// retrieval method reads them (`docs/attribution.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InferenceCited {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub inference_id: InferenceId,
    pub model_id: ModelId,
    pub contribution_id: ContributionId,
    pub datanet_id: DatanetId,
    /// The passage's place among the retrieved ones, from 0 (most relevant).
    pub rank: u32,
    /// Which chunk of the contribution the passage is, from 0.
    pub chunk: u32,
    /// The passage's BM25 score for the query (not negative).
    pub relevance: f64,
}

/// `fee.charged`: the fee of one inference, in base units.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeeCharged {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub inference_id: InferenceId,
    pub model_id: ModelId,
    pub payer: String,
    pub amount: Amount,
}

/// `stake.changed`: OPEN staked on or unstaked from a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StakeChanged {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub staker: Address,
    pub model_id: ModelId,
    pub action: StakeAction,
    pub amount: Amount,
}

/// How far closing a reward epoch got: `pinned` records the window, the input table
/// versions and the policy before anything is computed; `closed` adds the totals, the
/// Merkle root, the manifest hash and the anchor (`docs/epochs.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EpochStage {
    Pinned,
    Closed,
}

/// `epoch.closed`: one stage of closing reward epoch `epoch` (ids `ledgerlake:epoch:<N>:pinned` and
/// `ledgerlake:epoch:<N>:closed`). Written only by ledgerlake's epoch job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EpochClosed {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub epoch: u64,
    pub stage: EpochStage,
    /// The window of event time, `[window_start, window_end)`.
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    /// The versions of the input tables the epoch reads (0: a table not yet written).
    pub fee_version: u64,
    pub attribution_version: u64,
    pub stake_version: u64,
    pub registration_version: u64,
    /// The `fee_version` of the epoch closed before this one (absent for the first): fees
    /// added after it with an earlier event time are this epoch's late fees.
    #[serde(default)]
    pub previous_fee_version: Option<u64>,
    /// The policy: where what has no recipient goes, and each role's share in basis points.
    pub treasury: Address,
    pub treasury_bps: u32,
    pub builder_bps: u32,
    pub stakers_bps: u32,
    pub contributors_bps: u32,
    /// Closed stage: the epoch's fees (their sum and count), the accounts paid, the Merkle
    /// root of `(account, amount)`, the sha256 of the manifest, and where the root is anchored.
    #[serde(default)]
    pub fees: Option<Amount>,
    #[serde(default)]
    pub fee_count: Option<u64>,
    #[serde(default)]
    pub accounts: Option<u64>,
    #[serde(default)]
    pub merkle_root: Option<Bytes32>,
    #[serde(default)]
    pub manifest_sha256: Option<Sha256Hex>,
    #[serde(default)]
    pub anchor: Option<String>,
    /// The version of `voided_events` read: events voided at it do not count (absent in
    /// epochs pinned before voiding existed, which read none).
    #[serde(default)]
    pub void_version: Option<u64>,
    /// Set when an admin closed the epoch empty (its fees pay no one): why.
    #[serde(default)]
    pub empty_reason: Option<String>,
}

/// Why an account is paid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RewardRole {
    // Alphabetical: the order ties are broken in (`docs/epochs.md`).
    Builder,
    Contributor,
    Staker,
    Treasury,
}

impl RewardRole {
    pub fn name(self) -> &'static str {
        match self {
            RewardRole::Treasury => "treasury",
            RewardRole::Builder => "builder",
            RewardRole::Staker => "staker",
            RewardRole::Contributor => "contributor",
        }
    }
}

/// The part of a reward earned through one model (and, for a contributor, one datanet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardPart {
    pub model_id: ModelId,
    #[serde(default)]
    pub datanet_id: Option<DatanetId>,
    pub amount: Amount,
}

/// `reward.earned`: what one account earned in one role in one epoch (id
/// `ledgerlake:reward:<N>:<account>:<role>`; `event_time` is the epoch's start). Written only by
/// ledgerlake's epoch job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardEarned {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub epoch: u64,
    pub account: Address,
    pub role: RewardRole,
    pub amount: Amount,
    /// `amount` by model and datanet, summing to it.
    pub breakdown: Vec<RewardPart>,
}

/// `anchor.logged`: one entry of the hash-chained anchor log (id `ledgerlake:anchor:<N>`). Written
/// only by ledgerlake's epoch job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AnchorLogged {
    pub event_id: EventId,
    pub event_time: DateTime<Utc>,
    pub epoch: u64,
    pub merkle_root: Bytes32,
    pub manifest_sha256: Sha256Hex,
    /// The previous entry's `entry_sha256` (64 zeros for the first entry).
    pub previous_sha256: Sha256Hex,
    /// sha256 of this entry's epoch, root, manifest hash and previous hash
    /// (`docs/epochs.md`).
    pub entry_sha256: Sha256Hex,
}

// ---- Arrow schemas ---------------------------------------------------------------------

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}
fn amount() -> DataType {
    DataType::Decimal128(38, 0)
}
fn utf8(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}
fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, true)))
}

fn datanets_type() -> DataType {
    list_of(DataType::Struct(Fields::from(vec![utf8("datanet_id", false), Field::new("version", DataType::Int64, false)])))
}
fn hyperparameters_type() -> DataType {
    let int = |name: &str| Field::new(name, DataType::Int64, false);
    let float = |name: &str| Field::new(name, DataType::Float64, false);
    DataType::Struct(Fields::from(vec![
        int("rank"),
        float("alpha"),
        Field::new("targets", list_of(DataType::Utf8), false),
        float("learning_rate"),
        int("epochs"),
        int("batch_size"),
        int("max_seq_len"),
        Field::new("qlora", DataType::Boolean, false),
        int("seed"),
        int("warmup_steps"),
        float("weight_decay"),
        float("max_grad_norm"),
        int("heldout_permille"),
    ]))
}
fn evaluation_type() -> DataType {
    let int = |name: &str| Field::new(name, DataType::Int64, false);
    let float = |name: &str| Field::new(name, DataType::Float64, true);
    DataType::Struct(Fields::from(vec![
        int("heldout_examples"),
        int("heldout_tokens"),
        float("base_loss"),
        float("loss"),
        float("base_perplexity"),
        float("perplexity"),
        int("prompts"),
        int("exact_match"),
        int("contains"),
        int("base_exact_match"),
        int("base_contains"),
    ]))
}

/// The Arrow schema of a kind's table, partition column last.
pub fn schema(kind: EventKind) -> SchemaRef {
    static SCHEMAS: LazyLock<Vec<SchemaRef>> =
        LazyLock::new(|| EventKind::ALL.iter().map(|k| Arc::new(build_schema(*k))).collect());
    // `ALL` lists the kinds in declaration order, so the discriminant is the index.
    SCHEMAS[kind as usize].clone()
}

fn build_schema(kind: EventKind) -> Schema {
    let mut fields = vec![
        utf8("event_id", false),
        Field::new("event_time", ts(), false),
        Field::new("ingested_at", ts(), false),
    ];
    let own: Vec<Field> = match kind {
        EventKind::DatanetCreated => vec![
            utf8("datanet_id", false),
            utf8("owner", false),
            utf8("name", false),
            utf8("description", false),
            utf8("license", false),
            // Added after the first release: nullable, appended (see `Lake::migrate`).
            utf8("visibility", true),
            utf8("signature", true),
        ],
        EventKind::DatanetUpdated => vec![
            utf8("datanet_id", false),
            utf8("updated_by", false),
            utf8("name", true),
            utf8("description", true),
            utf8("license", true),
            utf8("status", true),
            utf8("visibility", true),
            utf8("signature", true),
        ],
        EventKind::ContributionSubmitted => vec![
            utf8("contribution_id", false),
            utf8("datanet_id", false),
            utf8("contributor", false),
            utf8("content", false),
            utf8("content_sha256", false),
            utf8("license", false),
            utf8("language", true),
            utf8("source", true),
            Field::new("tags", list_of(DataType::Utf8), false),
            utf8("signature", false),
        ],
        EventKind::ContributionReviewed => vec![
            utf8("contribution_id", false),
            utf8("datanet_id", false),
            utf8("reviewer", false),
            utf8("verdict", false),
            utf8("reason", true),
            utf8("signature", false),
        ],
        EventKind::AccessGranted => {
            vec![utf8("datanet_id", false), utf8("builder", false), utf8("granted_by", false), utf8("signature", true)]
        }
        EventKind::AccessRevoked => {
            vec![utf8("datanet_id", false), utf8("builder", false), utf8("revoked_by", false), utf8("signature", false)]
        }
        EventKind::AccessRequested => {
            vec![utf8("datanet_id", false), utf8("builder", false), utf8("message", true), utf8("signature", false)]
        }
        EventKind::EventVoided => {
            vec![utf8("voided_event_id", false), utf8("voided_kind", false), utf8("reason", false), utf8("voided_by", false)]
        }
        EventKind::ModelRegistered => vec![
            utf8("model_id", false),
            utf8("builder", false),
            utf8("base_model", false),
            utf8("adapter_uri", false),
            Field::new("datanets", datanets_type(), false),
            Field::new("price_per_1k_input", amount(), false),
            Field::new("price_per_1k_output", amount(), false),
            // Lineage of trained adapters: added after the first release (nullable, appended).
            utf8("training_run_id", true),
            utf8("contributions_sha256", true),
            Field::new("hyperparameters", hyperparameters_type(), true),
            Field::new("evaluation", evaluation_type(), true),
            utf8("signature", true),
        ],
        EventKind::InferenceCompleted => vec![
            utf8("inference_id", false),
            utf8("model_id", false),
            utf8("caller", false),
            Field::new("prompt_tokens", DataType::Int64, false),
            Field::new("completion_tokens", DataType::Int64, false),
            utf8("output_sha256", false),
            Field::new("latency_ms", DataType::Int64, false),
        ],
        EventKind::FeeCharged => vec![
            utf8("inference_id", false),
            utf8("model_id", false),
            utf8("payer", false),
            Field::new("amount", amount(), false),
        ],
        EventKind::InferenceTokens => vec![
            utf8("inference_id", false),
            utf8("model_id", false),
            // Delta has no unsigned types; token ids are below 2^31 (checked at ingest).
            Field::new("prompt_token_ids", list_of(DataType::Int32), false),
            Field::new("output_token_ids", list_of(DataType::Int32), false),
        ],
        EventKind::InferenceAttributed => vec![
            utf8("inference_id", false),
            utf8("model_id", false),
            utf8("contribution_id", true),
            utf8("contributor", true),
            utf8("datanet_id", true),
            utf8("method", false),
            Field::new("raw_score", DataType::Float64, false),
            Field::new("weight", DataType::Int64, false),
            Field::new(
                "spans",
                list_of(DataType::Struct(Fields::from(vec![
                    Field::new("start", DataType::Int64, false),
                    Field::new("len", DataType::Int64, false),
                ]))),
                false,
            ),
            utf8("basis", false),
        ],
        EventKind::InferenceCited => vec![
            utf8("inference_id", false),
            utf8("model_id", false),
            utf8("contribution_id", false),
            utf8("datanet_id", false),
            Field::new("rank", DataType::Int64, false),
            Field::new("chunk", DataType::Int64, false),
            Field::new("relevance", DataType::Float64, false),
        ],
        EventKind::StakeChanged => vec![
            utf8("staker", false),
            utf8("model_id", false),
            utf8("action", false),
            Field::new("amount", amount(), false),
        ],
        EventKind::TrainingRun => vec![
            utf8("run_id", false),
            utf8("model_id", false),
            utf8("builder", false),
            utf8("base_model", false),
            Field::new("datanets", datanets_type(), false),
            utf8("status", false),
            Field::new("hyperparameters", hyperparameters_type(), false),
            Field::new("evaluation", evaluation_type(), true),
            Field::new("train_examples", DataType::Int64, false),
            Field::new("train_tokens", DataType::Int64, false),
            Field::new("steps", DataType::Int64, false),
            Field::new("started_at", ts(), false),
            Field::new("seconds", DataType::Float64, false),
            Field::new("tokens_per_second", DataType::Float64, false),
            Field::new("peak_memory_bytes", DataType::Int64, false),
            Field::new("final_loss", DataType::Float64, true),
            utf8("adapter_uri", true),
            utf8("contributions_sha256", true),
            utf8("error", true),
        ],
        EventKind::TrainingMetric => vec![
            utf8("run_id", false),
            Field::new("step", DataType::Int64, false),
            Field::new("epoch", DataType::Int64, false),
            Field::new("loss", DataType::Float64, false),
            Field::new("learning_rate", DataType::Float64, false),
            Field::new("grad_norm", DataType::Float64, false),
            Field::new("tokens", DataType::Int64, false),
            Field::new("tokens_per_second", DataType::Float64, false),
        ],
        EventKind::EpochClosed => vec![
            Field::new("epoch", DataType::Int64, false),
            utf8("stage", false),
            Field::new("window_start", ts(), false),
            Field::new("window_end", ts(), false),
            Field::new("fee_version", DataType::Int64, false),
            Field::new("attribution_version", DataType::Int64, false),
            Field::new("stake_version", DataType::Int64, false),
            Field::new("registration_version", DataType::Int64, false),
            Field::new("previous_fee_version", DataType::Int64, true),
            utf8("treasury", false),
            Field::new("treasury_bps", DataType::Int64, false),
            Field::new("builder_bps", DataType::Int64, false),
            Field::new("stakers_bps", DataType::Int64, false),
            Field::new("contributors_bps", DataType::Int64, false),
            Field::new("fees", amount(), true),
            Field::new("fee_count", DataType::Int64, true),
            Field::new("accounts", DataType::Int64, true),
            utf8("merkle_root", true),
            utf8("manifest_sha256", true),
            utf8("anchor", true),
            // Added with incident response (issue 27): nullable, appended.
            Field::new("void_version", DataType::Int64, true),
            utf8("empty_reason", true),
        ],
        EventKind::RewardEarned => vec![
            Field::new("epoch", DataType::Int64, false),
            utf8("account", false),
            utf8("role", false),
            Field::new("amount", amount(), false),
            Field::new(
                "breakdown",
                list_of(DataType::Struct(Fields::from(vec![
                    utf8("model_id", false),
                    utf8("datanet_id", true),
                    Field::new("amount", amount(), false),
                ]))),
                false,
            ),
        ],
        EventKind::AnchorLogged => vec![
            Field::new("epoch", DataType::Int64, false),
            utf8("merkle_root", false),
            utf8("manifest_sha256", false),
            utf8("previous_sha256", false),
            utf8("entry_sha256", false),
        ],
    };
    fields.extend(own);
    if kind.partitioned_by_date() {
        fields.push(Field::new(PARTITION_COLUMN, DataType::Date32, false));
    }
    Schema::new(fields)
}

/// The partition column of the date-partitioned tables.
pub const PARTITION_COLUMN: &str = "event_date";

/// The row written to a table: the event's own fields plus what ingest adds.
#[derive(Serialize)]
struct Row<'a> {
    #[serde(flatten)]
    event: &'a Event,
    ingested_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_date: Option<NaiveDate>,
}

/// Converts events of one kind to a record batch of that kind's schema.
pub fn to_record_batch<'a>(
    kind: EventKind,
    events: impl IntoIterator<Item = &'a Event>,
    ingested_at: DateTime<Utc>,
) -> Result<RecordBatch> {
    let events: Vec<&Event> = events.into_iter().collect();
    if let Some(wrong) = events.iter().find(|e| e.kind() != kind) {
        return Err(Error::Internal(format!("a {} event in a batch of {kind}", wrong.kind())));
    }
    if let Some(batch) = direct_batch(kind, &events, ingested_at) {
        return batch;
    }
    generic_batch(kind, &events, ingested_at)
}

/// Any kind, through its JSON form (arrow-json's serde path): one definition, the schema.
fn generic_batch(kind: EventKind, events: &[&Event], ingested_at: DateTime<Utc>) -> Result<RecordBatch> {
    let schema = schema(kind);
    let rows: Vec<Row<'_>> = events
        .iter()
        .map(|event| {
            let event_date = kind.partitioned_by_date().then(|| event.event_time().date_naive());
            Row { event, ingested_at, event_date }
        })
        .collect();
    let mut decoder = arrow_json::ReaderBuilder::new(schema.clone())
        .with_batch_size(rows.len().max(1))
        .build_decoder()?;
    decoder.serialize(&rows)?;
    Ok(decoder.flush()?.unwrap_or_else(|| RecordBatch::new_empty(schema)))
}

/// The high-volume kinds (inferences and fees), column by column: several times cheaper
/// than the generic path, which stays the reference (a test checks they agree).
fn direct_batch(kind: EventKind, events: &[&Event], ingested_at: DateTime<Utc>) -> Option<Result<RecordBatch>> {
    use arrow::array::{ArrayRef, Date32Array, Decimal128Array, Int64Array, StringArray, TimestampMicrosecondArray};
    fn strings<'a, T: 'a>(rows: &[&'a T], f: impl Fn(&'a T) -> &'a str) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| f(r))))
    }
    fn ints<T>(rows: &[&T], f: impl Fn(&T) -> i64) -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| f(r))))
    }
    fn amounts<T>(rows: &[&T], f: impl Fn(&T) -> Amount) -> Result<ArrayRef> {
        // Amounts are at most 10^38 - 1, so they fit an i128 and Decimal128(38, 0).
        let values = Decimal128Array::from_iter_values(rows.iter().map(|r| f(r).base_units() as i128));
        Ok(Arc::new(values.with_precision_and_scale(38, 0)?))
    }
    fn times<T>(rows: &[&T], f: impl Fn(&T) -> DateTime<Utc>) -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| f(r).timestamp_micros())).with_timezone("UTC"))
    }
    fn envelope<T>(rows: &[&T], id: impl Fn(&T) -> &EventId, time: impl Fn(&T) -> DateTime<Utc> + Copy, ingested_at: DateTime<Utc>) -> Vec<ArrayRef> {
        let ingested = TimestampMicrosecondArray::from_value(ingested_at.timestamp_micros(), rows.len()).with_timezone("UTC");
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| id(r).as_str()))),
            times(rows, time),
            Arc::new(ingested),
        ]
    }
    fn dates<T>(rows: &[&T], time: impl Fn(&T) -> DateTime<Utc>) -> ArrayRef {
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
        Arc::new(Date32Array::from_iter_values(rows.iter().map(|r| (time(r).date_naive() - epoch).num_days() as i32)))
    }
    let columns: Result<Vec<ArrayRef>> = match kind {
        EventKind::InferenceCompleted => {
            let rows: Vec<&InferenceCompleted> =
                events.iter().filter_map(|e| if let Event::InferenceCompleted(i) = e { Some(i) } else { None }).collect();
            let mut c = envelope(&rows, |r| &r.event_id, |r| r.event_time, ingested_at);
            c.extend([
                strings(&rows, |r| r.inference_id.as_str()),
                strings(&rows, |r| r.model_id.as_str()),
                strings(&rows, |r| r.caller.as_str()),
                ints(&rows, |r| r.prompt_tokens.into()),
                ints(&rows, |r| r.completion_tokens.into()),
                strings(&rows, |r| r.output_sha256.as_str()),
                ints(&rows, |r| r.latency_ms.into()),
                dates(&rows, |r| r.event_time),
            ]);
            Ok(c)
        }
        EventKind::FeeCharged => {
            let rows: Vec<&FeeCharged> =
                events.iter().filter_map(|e| if let Event::FeeCharged(f) = e { Some(f) } else { None }).collect();
            let mut c = envelope(&rows, |r| &r.event_id, |r| r.event_time, ingested_at);
            c.extend([
                strings(&rows, |r| r.inference_id.as_str()),
                strings(&rows, |r| r.model_id.as_str()),
                strings(&rows, |r| r.payer.as_str()),
            ]);
            amounts(&rows, |r| r.amount).map(|a| {
                c.push(a);
                c.push(dates(&rows, |r| r.event_time));
                c
            })
        }
        _ => return None,
    };
    Some(columns.and_then(|c| Ok(RecordBatch::try_new(schema(kind), c)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_and_generic_batches_agree() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let inference = InferenceCompleted {
            event_id: "e-1".parse().unwrap(),
            event_time: t("2026-03-01T23:59:59.123456Z"),
            inference_id: "inf-1".parse().unwrap(),
            model_id: "m-1".parse().unwrap(),
            caller: "key_abc".into(),
            prompt_tokens: 12,
            completion_tokens: u32::MAX,
            output_sha256: Sha256Hex::digest(b"out"),
            latency_ms: 7,
        };
        let fee = FeeCharged {
            event_id: "e-2".parse().unwrap(),
            event_time: t("1999-12-31T00:00:00Z"),
            inference_id: "inf-1".parse().unwrap(),
            model_id: "m-1".parse().unwrap(),
            payer: "key_abc".into(),
            amount: "99999999999999999999999999999999999999".parse().unwrap(),
        };
        let now = t("2026-11-24T10:00:00Z");
        for event in [Event::from(inference), Event::from(fee)] {
            let rows = [&event, &event];
            let direct = direct_batch(event.kind(), &rows, now).unwrap().unwrap();
            assert_eq!(direct, generic_batch(event.kind(), &rows, now).unwrap(), "{}", event.kind());
        }
        assert!(direct_batch(EventKind::StakeChanged, &[], now).is_none());
    }

    #[test]
    fn kinds_round_trip_their_names() {
        for k in EventKind::ALL {
            assert_eq!(k.name().parse::<EventKind>().unwrap(), *k);
            // A kind's table is its name with `_` for `.`, but for the two training tables,
            // which are named for what a row is (one run, one step).
            let expected = match k {
                EventKind::TrainingRun => "training_runs".to_owned(),
                EventKind::TrainingMetric => "training_metrics".to_owned(),
                EventKind::InferenceAttributed => "attributions".to_owned(),
                EventKind::InferenceCited => "citations".to_owned(),
                EventKind::EpochClosed => "epochs".to_owned(),
                EventKind::RewardEarned => "rewards".to_owned(),
                EventKind::AnchorLogged => "anchors".to_owned(),
                EventKind::EventVoided => "voided_events".to_owned(),
                _ => k.name().replace('.', "_"),
            };
            assert_eq!(k.table(), expected);
        }
        assert!(matches!("nope.x".parse::<EventKind>(), Err(Error::UnknownKind(_))));
    }

    #[test]
    fn field_errors_name_the_field() {
        let v = serde_json::json!({
            "event_id": "e1", "event_time": "2026-01-01T00:00:00Z", "staker": "0x12",
            "model_id": "m", "action": "stake", "amount": "5"
        });
        let e = Event::from_json_fields(EventKind::StakeChanged, v).unwrap_err();
        assert_eq!(e.field, "staker");
        let v = serde_json::json!({"event_id": "e1", "event_time": "2026-01-01T00:00:00Z"});
        let e = Event::from_json_fields(EventKind::FeeCharged, v).unwrap_err();
        assert_eq!(e.field, "inference_id", "{e:?}");
        let v = serde_json::json!({
            "event_id": "e1", "event_time": "2026-01-01T00:00:00Z", "staker": "0x0000000000000000000000000000000000000001",
            "model_id": "m", "action": "stake", "amount": "5", "extra": 1
        });
        let e = Event::from_json_fields(EventKind::StakeChanged, v).unwrap_err();
        assert_eq!(e.field, "extra", "{e:?}");
    }

    #[test]
    fn record_batch_has_the_table_schema() {
        let v = serde_json::json!({
            "event_id": "e1", "event_time": "2026-03-04T05:06:07.123456Z", "inference_id": "i1",
            "model_id": "m", "payer": "k1", "amount": "99999999999999999999999999999999999999"
        });
        let e = Event::from_json_fields(EventKind::FeeCharged, v).unwrap();
        let batch = to_record_batch(EventKind::FeeCharged, [&e], Utc::now()).unwrap();
        assert_eq!(batch.schema(), schema(EventKind::FeeCharged));
        assert_eq!(batch.num_rows(), 1);
        let amount = batch.column_by_name("amount").unwrap();
        let amount = amount.as_any().downcast_ref::<arrow::array::Decimal128Array>().unwrap();
        assert_eq!(amount.value(0), Amount::MAX.as_decimal128());
        let date = batch.column_by_name(PARTITION_COLUMN).unwrap();
        let date = date.as_any().downcast_ref::<arrow::array::Date32Array>().unwrap();
        assert_eq!(date.value_as_date(0).unwrap().to_string(), "2026-03-04");
    }
}
