//! Turning request bodies into validated events.
//!
//! Validation happens in three steps. [`parse_body`] does everything that needs only the
//! event itself: syntax, kind, field types, ids, amounts, derived hashes. Who may cause it
//! (roles and participant signatures under the deployment's domain) is
//! [`crate::authority::admit`]. What needs the state of the lake (does the datanet exist, is
//! the reviewer its owner, is the model id another builder's) is checked by the writer
//! against the index, see [`crate::writer`].


use arrow::array::RecordBatch;
use arrow::compute::cast;
use arrow::datatypes::DataType;
use ledgerlake_lakehouse::events::{
    ContributionReviewed, ContributionSubmitted, EpochStage, Evaluation, Event, EventKind, Hyperparameters, Verdict, WEIGHT_SCALE,
};
use ledgerlake_lakehouse::ids::{Amount, ContributionId, Sha256Hex};
use ledgerlake_lakehouse::{messages, pricing};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::Error;

/// Largest `content` of a contribution, in bytes.
pub const MAX_CONTENT_BYTES: usize = 256 * 1024;
/// Largest short text field (names, licences, reasons), in bytes.
pub const MAX_TEXT_BYTES: usize = 4096;

/// Why one item of a batch was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ItemError {
    /// Position of the item in the request (0-based).
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The offending field (dotted path), empty when the item as a whole is at fault.
    pub field: String,
    pub message: String,
}

/// The formats `POST /v1/events` accepts, by `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    JsonArray,
    Ndjson,
    ArrowStream,
}

impl BodyFormat {
    pub fn from_content_type(ct: Option<&str>) -> Result<Self, Error> {
        let essence = ct.unwrap_or("application/json").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/json" | "" => Ok(Self::JsonArray),
            "application/x-ndjson" | "application/jsonl" | "application/jsonlines" => Ok(Self::Ndjson),
            "application/vnd.apache.arrow.stream" => Ok(Self::ArrowStream),
            other => Err(Error::UnsupportedMediaType(other.to_owned())),
        }
    }
}

/// One item of a request: its position, and the event or why it is not one.
pub type Item = (usize, Result<Event, ItemError>);

/// Parses and validates a request body. A body that is not parseable as a whole (broken
/// JSON array, broken Arrow stream) is an error; a bad item is an [`ItemError`] in its slot.
pub fn parse_body(format: BodyFormat, body: &[u8], default_kind: Option<EventKind>) -> Result<Vec<Item>, Error> {
    match format {
        BodyFormat::JsonArray => {
            let text = std::str::from_utf8(body).map_err(|e| Error::MalformedBody(format!("body is not UTF-8: {e}")))?;
            let items: Vec<&RawValue> = match serde_json::from_str::<&RawValue>(text) {
                Ok(raw) if raw.get().trim_start().starts_with('[') => serde_json::from_str(raw.get())
                    .map_err(|e| Error::MalformedBody(format!("invalid JSON: {e}")))?,
                Ok(raw) if raw.get().trim_start().starts_with('{') => vec![raw],
                Ok(_) => return Err(Error::MalformedBody("expected a JSON array of event objects".into())),
                Err(e) => return Err(Error::MalformedBody(format!("invalid JSON: {e}"))),
            };
            Ok(items.into_iter().enumerate().map(|(i, raw)| (i, parse_json(i, raw.get(), default_kind))).collect())
        }
        BodyFormat::Ndjson => {
            let text = std::str::from_utf8(body).map_err(|e| Error::MalformedBody(format!("body is not UTF-8: {e}")))?;
            Ok(text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .enumerate()
                .map(|(i, line)| (i, parse_json(i, line, default_kind)))
                .collect())
        }
        BodyFormat::ArrowStream => parse_arrow(body, default_kind),
    }
}

fn item_error(index: usize, event_id: Option<String>, field: &str, message: impl Into<String>) -> ItemError {
    ItemError { index, event_id, field: field.to_owned(), message: message.into() }
}

/// Validates one event given as the text of a JSON object.
///
/// Well-formed events take a fast path: the object is split into raw field slices and the
/// kind's fields are deserialized from them directly. Anything that path cannot take
/// (an unknown kind, a bad field, escapes in keys) goes through [`parse_value`], which
/// names the offending field; both accept exactly the same events.
fn parse_json(index: usize, text: &str, default_kind: Option<EventKind>) -> Result<Event, ItemError> {
    if let Some(event) = parse_fast(text, default_kind) {
        let event_id = event.event_id().to_string();
        return check_event(event).map_err(|(field, msg)| item_error(index, Some(event_id), field, msg));
    }
    serde_json::from_str(text)
        .map_err(|e| item_error(index, None, "", format!("invalid JSON: {e}")))
        .and_then(|v| parse_value(index, v, default_kind))
}

fn parse_fast(text: &str, default_kind: Option<EventKind>) -> Option<Event> {
    let RawFields(mut fields) = serde_json::from_str(text).ok()?;
    let kind = match fields.iter().position(|(k, _)| *k == "kind") {
        Some(at) => serde_json::from_str::<&str>(fields.swap_remove(at).1.get()).ok()?.parse().ok()?,
        None => default_kind?,
    };
    Event::from_raw_fields(kind, fields)
}

/// The members of a JSON object as (key, raw value) slices of the input.
struct RawFields<'a>(Vec<(&'a str, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for RawFields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = RawFields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(12));
                while let Some(member) = map.next_entry::<&str, &RawValue>()? {
                    fields.push(member);
                }
                Ok(RawFields(fields))
            }
        }
        d.deserialize_map(Members)
    }
}

/// Validates one JSON event object.
pub fn parse_value(index: usize, value: serde_json::Value, default_kind: Option<EventKind>) -> Result<Event, ItemError> {
    let serde_json::Value::Object(mut obj) = value else {
        return Err(item_error(index, None, "", "an event is a JSON object"));
    };
    let event_id = obj.get("event_id").and_then(|v| v.as_str()).map(str::to_owned);
    let kind = match obj.remove("kind") {
        Some(serde_json::Value::String(k)) => {
            k.parse::<EventKind>().map_err(|e| item_error(index, event_id.clone(), "kind", e.to_string()))?
        }
        Some(_) => return Err(item_error(index, event_id, "kind", "kind must be a string")),
        None => default_kind.ok_or_else(|| item_error(index, event_id.clone(), "kind", "missing field `kind`"))?,
    };
    let event = Event::from_json_fields(kind, serde_json::Value::Object(obj))
        .map_err(|e| item_error(index, event_id.clone(), &e.field, e.message))?;
    check_event(event).map_err(|(field, msg)| item_error(index, event_id, field, msg))
}

/// The checks [`parse_body`] makes of an event built in code rather than parsed (item
/// `index` of a batch): the same lengths, limits, hashes and signatures.
pub fn check(index: usize, event: Event) -> Result<Event, ItemError> {
    let event_id = event.event_id().to_string();
    check_event(event).map_err(|(field, msg)| item_error(index, Some(event_id), field, msg))
}

/// Checks that need only the event: lengths, derived hashes, signatures. Fills in the
/// derived fields of a contribution.
fn check_event(event: Event) -> Result<Event, (&'static str, String)> {
    let text = |field: &'static str, s: &str, required: bool| -> Result<(), (&'static str, String)> {
        if required && s.trim().is_empty() {
            return Err((field, format!("{field} must not be empty")));
        }
        if s.len() > MAX_TEXT_BYTES {
            return Err((field, format!("{field} is longer than {MAX_TEXT_BYTES} bytes")));
        }
        Ok(())
    };
    match event {
        Event::ContributionSubmitted(c) => check_contribution(c).map(Event::from),
        Event::ContributionReviewed(r) => check_review(r).map(Event::from),
        Event::DatanetCreated(ref d) => {
            text("name", &d.name, true)?;
            text("description", &d.description, false)?;
            text("license", &d.license, true)?;
            Ok(event)
        }
        Event::DatanetUpdated(ref d) => {
            if let Some(n) = &d.name {
                text("name", n, true)?;
            }
            if let Some(n) = &d.description {
                text("description", n, false)?;
            }
            if let Some(n) = &d.license {
                text("license", n, true)?;
            }
            Ok(event)
        }
        Event::ModelRegistered(ref m) => {
            text("base_model", &m.base_model, true)?;
            text("adapter_uri", &m.adapter_uri, true)?;
            // A `..` (or `.`) step could name another model's adapter by a path that looks
            // like one's own (`docs/security.md`, adapters).
            if m.adapter_uri.split(['/', '\\']).any(|s| s == ".." || s == ".") {
                return Err(("adapter_uri", "adapter_uri may not have `.` or `..` steps".into()));
            }
            // A price that could overflow the fee of the longest inference is refused here,
            // so no registration in the lake can make a fee overflow.
            for (field, price) in [("price_per_1k_input", m.price_per_1k_input), ("price_per_1k_output", m.price_per_1k_output)] {
                pricing::check_price(field, price).map_err(|e| (field, e.to_string()))?;
            }
            if let Some(run) = &m.training_run_id {
                text("training_run_id", run, true)?;
            }
            if let Some(h) = &m.hyperparameters {
                check_hyperparameters(h)?;
            }
            if let Some(e) = &m.evaluation {
                check_evaluation(e)?;
            }
            Ok(event)
        }
        Event::TrainingRun(ref r) => {
            text("run_id", &r.run_id, true)?;
            text("base_model", &r.base_model, true)?;
            check_hyperparameters(&r.hyperparameters)?;
            if let Some(e) = &r.evaluation {
                check_evaluation(e)?;
            }
            int64("train_tokens", r.train_tokens)?;
            int64("peak_memory_bytes", r.peak_memory_bytes)?;
            finite("seconds", r.seconds)?;
            finite("tokens_per_second", r.tokens_per_second)?;
            if let Some(l) = r.final_loss {
                finite("final_loss", l)?;
            }
            if let Some(u) = &r.adapter_uri {
                text("adapter_uri", u, true)?;
            }
            if let Some(e) = &r.error {
                text("error", e, false)?;
            }
            Ok(event)
        }
        Event::TrainingMetric(ref m) => {
            text("run_id", &m.run_id, true)?;
            for (field, v) in [("loss", m.loss), ("learning_rate", m.learning_rate), ("grad_norm", m.grad_norm), ("tokens_per_second", m.tokens_per_second)] {
                finite(field, v)?;
            }
            int64("tokens", m.tokens)?;
            Ok(event)
        }
        Event::InferenceCompleted(ref i) => {
            text("caller", &i.caller, true)?;
            let tokens = u64::from(i.prompt_tokens) + u64::from(i.completion_tokens);
            if tokens > pricing::MAX_INFERENCE_TOKENS {
                let max = pricing::MAX_INFERENCE_TOKENS;
                return Err(("completion_tokens", format!("{tokens} tokens in one inference; the most is {max}")));
            }
            Ok(event)
        }
        Event::FeeCharged(ref f) => {
            text("payer", &f.payer, true)?;
            Ok(event)
        }
        Event::InferenceAttributed(ref a) => {
            finite("raw_score", a.raw_score)?;
            text("basis", &a.basis, true)?;
            if a.weight > WEIGHT_SCALE {
                return Err(("weight", format!("{} is above the whole, {WEIGHT_SCALE}", a.weight)));
            }
            let named = [a.contribution_id.is_some(), a.contributor.is_some(), a.datanet_id.is_some()];
            if named.iter().any(|&n| n != named[0]) {
                return Err(("contribution_id", "contribution_id, contributor and datanet_id come together".into()));
            }
            if a.contribution_id.is_none() && a.weight != 0 {
                return Err(("weight", "an inference attributed to no contribution has weight 0".into()));
            }
            Ok(event)
        }
        Event::InferenceTokens(ref t) => {
            let tokens = t.prompt_token_ids.len() as u64 + t.output_token_ids.len() as u64;
            if tokens > pricing::MAX_INFERENCE_TOKENS {
                let max = pricing::MAX_INFERENCE_TOKENS;
                return Err(("output_token_ids", format!("{tokens} tokens in one inference; the most is {max}")));
            }
            // The table stores ids as Delta's signed 32-bit integers.
            for (name, ids) in [("prompt_token_ids", &t.prompt_token_ids), ("output_token_ids", &t.output_token_ids)] {
                if let Some(id) = ids.iter().find(|&&id| id > i32::MAX as u32) {
                    return Err((name, format!("token id {id} is above {}", i32::MAX)));
                }
            }
            Ok(event)
        }
        Event::InferenceCited(ref c) => {
            finite("relevance", c.relevance)?;
            if c.relevance < 0.0 {
                return Err(("relevance", format!("relevance is a BM25 score, never negative; got {}", c.relevance)));
            }
            if c.rank >= MAX_CITATIONS {
                return Err(("rank", format!("rank {} is past the most citations of one inference, {MAX_CITATIONS}", c.rank)));
            }
            Ok(event)
        }
        Event::EpochClosed(ref e) => {
            for (field, v) in [
                ("epoch", e.epoch),
                ("fee_version", e.fee_version),
                ("attribution_version", e.attribution_version),
                ("stake_version", e.stake_version),
                ("registration_version", e.registration_version),
            ] {
                int64(field, v)?;
            }
            for (field, v) in [("previous_fee_version", e.previous_fee_version), ("void_version", e.void_version)] {
                if let Some(v) = v {
                    int64(field, v)?;
                }
            }
            if let Some(r) = &e.empty_reason {
                text("empty_reason", r, true)?;
            }
            if e.window_end <= e.window_start {
                return Err(("window_end", "an epoch's window ends after it starts".into()));
            }
            let bps = [e.treasury_bps, e.builder_bps, e.stakers_bps, e.contributors_bps];
            if bps.iter().map(|&b| u64::from(b)).sum::<u64>() != 10_000 {
                return Err(("treasury_bps", format!("the four shares sum to 10000 basis points, not {bps:?}")));
            }
            let closed = [e.fees.is_some(), e.fee_count.is_some(), e.accounts.is_some(), e.merkle_root.is_some(), e.manifest_sha256.is_some()];
            let want = e.stage == EpochStage::Closed;
            if closed.iter().any(|&c| c != want) {
                return Err(("stage", "fees, fee_count, accounts, merkle_root and manifest_sha256 come with the closed stage, and only with it".into()));
            }
            if let Some(n) = e.fee_count {
                int64("fee_count", n)?;
            }
            if let Some(n) = e.accounts {
                int64("accounts", n)?;
            }
            if let Some(a) = &e.anchor {
                text("anchor", a, true)?;
            }
            Ok(event)
        }
        Event::RewardEarned(ref r) => {
            int64("epoch", r.epoch)?;
            let mut sum = Amount::ZERO;
            for part in &r.breakdown {
                sum = sum.checked_add(part.amount).ok_or(("breakdown", "the breakdown overflows".to_owned()))?;
            }
            if sum != r.amount {
                return Err(("breakdown", format!("the breakdown sums to {sum}, not the amount {}", r.amount)));
            }
            Ok(event)
        }
        Event::AnchorLogged(ref a) => {
            int64("epoch", a.epoch)?;
            Ok(event)
        }
        Event::EventVoided(ref v) => {
            text("reason", &v.reason, true)?;
            text("voided_by", &v.voided_by, true)?;
            match v.voided_kind.parse::<EventKind>() {
                Ok(k) if k.derived() || k == EventKind::EventVoided => {
                    Err(("voided_kind", format!("{k} events cannot be voided: an epoch is corrected by voiding its inputs")))
                }
                Ok(_) => Ok(event),
                Err(e) => Err(("voided_kind", e.to_string())),
            }
        }
        Event::AccessRequested(ref a) => {
            if let Some(m) = &a.message {
                text("message", m, false)?;
                if m.len() > MAX_REQUEST_MESSAGE_BYTES {
                    return Err(("message", format!("{} bytes; at most {MAX_REQUEST_MESSAGE_BYTES}", m.len())));
                }
            }
            Ok(event)
        }
        Event::AccessGranted(_) | Event::AccessRevoked(_) | Event::StakeChanged(_) => Ok(event),
    }
}

/// The longest message an access request may carry.
pub const MAX_REQUEST_MESSAGE_BYTES: usize = 2000;

/// The most passages one inference may cite (ranks 0 to this minus one); serving retrieves
/// at most 32.
pub const MAX_CITATIONS: u32 = 1024;

/// JSON cannot carry NaN or infinities, but events built in code can.
fn finite(field: &'static str, v: f64) -> Result<(), (&'static str, String)> {
    if v.is_finite() { Ok(()) } else { Err((field, format!("{field} must be a finite number, not {v}"))) }
}

/// Counts are stored as Delta `long`s.
fn int64(field: &'static str, v: u64) -> Result<(), (&'static str, String)> {
    if i64::try_from(v).is_ok() { Ok(()) } else { Err((field, format!("{field} is at most {}", i64::MAX))) }
}

fn check_hyperparameters(h: &Hyperparameters) -> Result<(), (&'static str, String)> {
    if h.rank == 0 {
        return Err(("hyperparameters.rank", "rank must be at least 1".into()));
    }
    for (field, v) in [
        ("hyperparameters.alpha", h.alpha),
        ("hyperparameters.learning_rate", h.learning_rate),
        ("hyperparameters.weight_decay", h.weight_decay),
        ("hyperparameters.max_grad_norm", h.max_grad_norm),
    ] {
        finite(field, v)?;
    }
    int64("hyperparameters.seed", h.seed)?;
    if h.targets.len() > 64 || h.targets.iter().any(|t| t.trim().is_empty() || t.len() > 128) {
        return Err(("hyperparameters.targets", "targets are at most 64 module names of 1 to 128 bytes".into()));
    }
    if h.heldout_permille > 1000 {
        return Err(("hyperparameters.heldout_permille", "heldout_permille is at most 1000".into()));
    }
    Ok(())
}

fn check_evaluation(e: &Evaluation) -> Result<(), (&'static str, String)> {
    int64("evaluation.heldout_tokens", e.heldout_tokens)?;
    for (field, v) in [
        ("evaluation.base_loss", e.base_loss),
        ("evaluation.loss", e.loss),
        ("evaluation.base_perplexity", e.base_perplexity),
        ("evaluation.perplexity", e.perplexity),
    ] {
        if let Some(v) = v {
            finite(field, v)?;
        }
    }
    if [e.exact_match, e.contains, e.base_exact_match, e.base_contains].iter().any(|&n| n > e.prompts) {
        return Err(("evaluation", "a prompt count is larger than the number of prompts".into()));
    }
    Ok(())
}

fn check_contribution(mut c: ContributionSubmitted) -> Result<ContributionSubmitted, (&'static str, String)> {
    if c.content.is_empty() {
        return Err(("content", "content must not be empty".into()));
    }
    if c.content.len() > MAX_CONTENT_BYTES {
        return Err(("content", format!("content is longer than {MAX_CONTENT_BYTES} bytes")));
    }
    if c.license.trim().is_empty() || c.license.len() > MAX_TEXT_BYTES {
        return Err(("license", "license must be a non-empty SPDX id".into()));
    }
    let digest = Sha256Hex::digest(c.content.as_bytes());
    if let Some(given) = &c.content_sha256
        && *given != digest
    {
        return Err(("content_sha256", format!("content_sha256 is {given} but the content hashes to {digest}")));
    }
    let message = messages::contribution(&c.datanet_id, &digest);
    let id = ContributionId::for_message(&message);
    if let Some(given) = &c.contribution_id
        && *given != id
    {
        return Err(("contribution_id", format!("contribution_id is {given} but the signed message hashes to {id}")));
    }
    // The signature is checked against the deployment's EIP-712 domain by
    // `crate::authority::admit`, with every other participant signature.
    c.content_sha256 = Some(digest);
    c.contribution_id = Some(id);
    Ok(c)
}

fn check_review(r: ContributionReviewed) -> Result<ContributionReviewed, (&'static str, String)> {
    match (&r.reason, r.verdict) {
        (None, Verdict::Rejected | Verdict::Flagged) => {
            return Err(("reason", format!("a {} review needs a reason", r.verdict.as_str())));
        }
        (Some(reason), _) if reason.len() > MAX_TEXT_BYTES => {
            return Err(("reason", format!("reason is longer than {MAX_TEXT_BYTES} bytes")));
        }
        _ => {}
    }
    Ok(r)
}

/// Arrow IPC stream: every batch holds events of one kind, named by a `kind` column or by
/// the `kind` query parameter; columns are the fields of that kind's JSON form. Rows go
/// through exactly the same validation as JSON.
fn parse_arrow(body: &[u8], default_kind: Option<EventKind>) -> Result<Vec<Item>, Error> {
    let batches = decode_ipc(body)?;
    let mut items = Vec::new();
    for batch in batches {
        items.extend(parse_batch(&batch, items.len(), default_kind)?);
    }
    Ok(items)
}

/// The record batches of an Arrow IPC stream, fully validated.
///
/// Two findings of the fuzz tests in `tests/it/fuzz.rs` shape this. arrow-rs's
/// `StreamReader` allocates whatever length a message header declares before reading it
/// (eight bytes of garbage made it zero 2 GB), so the push decoder is used instead: it
/// only ever holds bytes the body really has. And building a batch panics on some
/// malformed buffer offsets; that panic is contained here, on the request's own thread,
/// and becomes the same 400 as any other invalid stream.
fn decode_ipc(body: &[u8]) -> Result<Vec<RecordBatch>, Error> {
    let invalid = |e: &dyn std::fmt::Display| Error::MalformedBody(format!("invalid Arrow IPC stream: {e}"));
    let decoded = std::panic::catch_unwind(|| -> Result<Vec<RecordBatch>, Error> {
        let mut decoder = arrow::ipc::reader::StreamDecoder::new();
        let mut buffer = arrow::buffer::Buffer::from(body);
        let mut batches = Vec::new();
        while !buffer.is_empty() {
            if let Some(batch) = decoder.decode(&mut buffer).map_err(|e| invalid(&e))? {
                batches.push(batch);
            }
        }
        decoder.finish().map_err(|e| invalid(&e))?;
        for batch in &batches {
            for column in batch.columns() {
                column.to_data().validate_full().map_err(|e| invalid(&e))?;
            }
        }
        Ok(batches)
    });
    decoded.unwrap_or_else(|_| Err(invalid(&"its buffers do not match its metadata")))
}

/// The events of one Arrow record batch (see [`parse_arrow`]), numbered from `first_index`.
pub fn parse_batch(batch: &RecordBatch, first_index: usize, default_kind: Option<EventKind>) -> Result<Vec<Item>, Error> {
    let rows = arrow_rows_as_json(batch)?;
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(i, row)| (first_index + i, parse_value(first_index + i, serde_json::Value::Object(row), default_kind)))
        .collect())
}

/// Row objects of a batch. Decimals and timestamps become strings first, so amounts keep
/// every digit and times keep their zone.
pub fn arrow_rows_as_json(batch: &RecordBatch) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, Error> {
    let mut columns = Vec::with_capacity(batch.num_columns());
    let mut fields = Vec::with_capacity(batch.num_columns());
    for (field, col) in batch.schema().fields().iter().zip(batch.columns()) {
        let stringly = matches!(field.data_type(), DataType::Decimal128(..) | DataType::Decimal256(..))
            || matches!(field.data_type(), DataType::Timestamp(_, Some(_)));
        let col = if stringly {
            cast(col, &DataType::Utf8).map_err(|e| Error::MalformedBody(format!("column {}: {e}", field.name())))?
        } else {
            col.clone()
        };
        fields.push(arrow::datatypes::Field::new(field.name(), col.data_type().clone(), true));
        columns.push(col);
    }
    let batch = RecordBatch::try_new(std::sync::Arc::new(arrow::datatypes::Schema::new(fields)), columns)
        .map_err(|e| Error::MalformedBody(e.to_string()))?;
    let mut writer = arrow_json::ArrayWriter::new(Vec::new());
    writer.write(&batch).map_err(|e| Error::MalformedBody(format!("arrow rows: {e}")))?;
    writer.finish().map_err(|e| Error::MalformedBody(format!("arrow rows: {e}")))?;
    let bytes = writer.into_inner();
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&bytes).map_err(|e| Error::MalformedBody(format!("arrow rows: {e}")))
}

/// The JSON object of an event, as `POST /v1/events` takes it (with `kind`).
pub fn event_to_json(event: &Event) -> serde_json::Value {
    let mut v = serde_json::to_value(event).unwrap_or(serde_json::Value::Null);
    if let serde_json::Value::Object(obj) = &mut v {
        obj.insert("kind".into(), event.kind().name().into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kinds only the epoch job writes parse on both paths too, and their own checks hold.
    #[test]
    fn derived_kinds_parse_on_both_paths_and_are_checked() {
        let text = [
            r#"{"kind":"epoch.closed","event_id":"ledgerlake:epoch:3:closed","event_time":"2026-11-27T00:00:05Z","epoch":3,"stage":"closed","window_start":"2026-11-26T00:00:00Z","window_end":"2026-11-27T00:00:00Z","fee_version":7,"attribution_version":4,"stake_version":0,"registration_version":2,"previous_fee_version":5,"treasury":"0x0000000000000000000000000000000000000001","treasury_bps":1000,"builder_bps":3000,"stakers_bps":1000,"contributors_bps":5000,"fees":"1000","fee_count":2,"accounts":3,"merkle_root":"0x00000000000000000000000000000000000000000000000000000000000000ab","manifest_sha256":"00000000000000000000000000000000000000000000000000000000000000cd","anchor":"log:00"}"#,
            r#"{"kind":"reward.earned","event_id":"ledgerlake:reward:3:x","event_time":"2026-11-26T00:00:00Z","epoch":3,"account":"0x0000000000000000000000000000000000000002","role":"contributor","amount":"7","breakdown":[{"model_id":"m","datanet_id":"d","amount":"5"},{"model_id":"m2","amount":"2"}]}"#,
            r#"{"kind":"anchor.logged","event_id":"ledgerlake:anchor:3","event_time":"2026-11-27T00:00:05Z","epoch":3,"merkle_root":"0x00000000000000000000000000000000000000000000000000000000000000ab","manifest_sha256":"00000000000000000000000000000000000000000000000000000000000000cd","previous_sha256":"0000000000000000000000000000000000000000000000000000000000000000","entry_sha256":"00000000000000000000000000000000000000000000000000000000000000ef"}"#,
        ];
        for (i, t) in text.iter().enumerate() {
            let fast = parse_fast(t, None).unwrap_or_else(|| panic!("fast path refused {t}"));
            let careful = parse_value(i, serde_json::from_str(t).unwrap(), None).unwrap();
            assert_eq!(check_event(fast).unwrap(), careful);
            assert!(careful.kind().derived());
        }
        let bad = text[1].replace(r#""amount":"2""#, r#""amount":"3""#);
        let e = parse_value(0, serde_json::from_str(&bad).unwrap(), None).unwrap_err();
        assert_eq!(e.field, "breakdown", "{e:?}");
        let bad = text[0].replace(r#""builder_bps":3000"#, r#""builder_bps":3001"#);
        assert_eq!(parse_value(0, serde_json::from_str(&bad).unwrap(), None).unwrap_err().field, "treasury_bps");
        let bad = text[0].replace(r#""stage":"closed""#, r#""stage":"pinned""#);
        assert_eq!(parse_value(0, serde_json::from_str(&bad).unwrap(), None).unwrap_err().field, "stage");
        // From outside, every one is refused, naming the kind, even from an admin key, and an
        // atomic request writes nothing.
        let admin = crate::Submitter::Key(crate::Principal { id: "key_admin".into(), role: crate::Role::Admin, address: None });
        let deployment = ledgerlake_lakehouse::Deployment { id: ledgerlake_lakehouse::Bytes32::from_bytes([0; 32]), chain_id: None };
        let items: Vec<Item> = text.iter().enumerate().map(|(i, t)| (i, parse_value(i, serde_json::from_str(t).unwrap(), None))).collect();
        let (kept, errors) = crate::writer::Prepared::from_items(items, false, &admin, &deployment).unwrap();
        assert!(kept.is_none_or(|p| p.is_empty()));
        assert_eq!(errors.len(), 3);
        assert!(errors.iter().all(|e| e.field == "kind" && e.message.contains("epoch job")), "{errors:?}");
        // Nor may a caller's event of another kind take one of the job's ids first.
        let squatter = r#"{"kind":"stake.changed","event_id":"ledgerlake:epoch:3:pinned","event_time":"2026-11-27T00:00:00Z","staker":"0x0000000000000000000000000000000000000002","model_id":"m","action":"stake","amount":"1"}"#;
        let items = vec![(0, parse_value(0, serde_json::from_str(squatter).unwrap(), None))];
        let (kept, errors) = crate::writer::Prepared::from_items(items, false, &admin, &deployment).unwrap();
        assert!(kept.is_none_or(|p| p.is_empty()));
        assert_eq!(errors[0].field, "event_id", "{errors:?}");
    }

    /// The fast path and the field-naming path accept the same events, every kind.
    #[test]
    fn fast_and_careful_paths_agree() {
        let events = crate::demo::Workload::new(5).events(3000);
        let mut kinds = std::collections::BTreeSet::new();
        for (i, event) in events.iter().enumerate() {
            let text = event_to_json(event).to_string();
            let fast = parse_fast(&text, None).unwrap_or_else(|| panic!("fast path refused {text}"));
            let careful = parse_value(i, serde_json::from_str(&text).unwrap(), None).unwrap();
            assert_eq!(check_event(fast).unwrap(), careful);
            kinds.insert(event.kind());
        }
        // Voids are an admin's decision about stored events, never part of a workload.
        let external = EventKind::ALL.iter().filter(|k| !k.derived() && **k != EventKind::EventVoided).count();
        assert_eq!(kinds.len(), external, "the workload covers every kind callers may send");
        // The kind can also come from the request, and keys in any order.
        let fee = events.iter().find(|e| e.kind() == EventKind::FeeCharged).unwrap();
        let mut obj = serde_json::to_value(fee).unwrap();
        let text = obj.to_string();
        assert_eq!(parse_fast(&text, Some(EventKind::FeeCharged)).as_ref(), Some(fee));
        assert!(parse_fast(&text, None).is_none(), "no kind, no default: the careful path explains");
        // What the fast path refuses, the careful path names.
        obj["amount"] = serde_json::json!("-5");
        obj["kind"] = serde_json::json!("fee.charged");
        let text = obj.to_string();
        assert!(parse_fast(&text, None).is_none());
        assert_eq!(parse_json(3, &text, None).unwrap_err().field, "amount");
    }
}
