//! The attribution job: for every inference whose token ids are stored and that has no
//! attribution yet, the `inference.attributed` rows of its methods (spans, and gradient
//! influence where the caller has features), mixed by configuration. Incremental and
//! idempotent: an inference with rows is skipped, and the rows' ids are derived from the
//! inference, the contribution and the method, so running twice, or again after a crash,
//! stores nothing twice. Rules: `docs/attribution.md`.

use std::collections::{HashMap, HashSet};

use arrow::array::{Array, AsArray, ListArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Int32Type, TimeUnit, TimestampMicrosecondType};
use chrono::Utc;
use ledgerlake_lakehouse::events::{AttributionMethod, Event, EventKind, InferenceAttributed, OutputSpan};
use ledgerlake_lakehouse::ids::{Address, ContributionId, DatanetId, EventId, InferenceId, ModelId, Sha256Hex};
use ledgerlake_lakehouse::snapshot::{self, SnapshotRef};
use ledgerlake_lakehouse::Lake;

use crate::combine::{Mix, Part, Weighted, combine};
use crate::span_method::{Evidence, SpanRule, span_scores};
use crate::spans::{DocKey, MAX_SHARD_POSITIONS, SpanIndex};
use crate::Error;

/// Where an approved contribution comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    pub contribution_id: ContributionId,
    pub contributor: Address,
    pub datanet: DatanetId,
}

/// The contribution a span-index key names.
pub fn key_of(id: &ContributionId) -> DocKey {
    let mut key = [0u8; 32];
    // A contribution id is 64 hex digits (checked when it was parsed).
    hex::decode_to_slice(id.as_str(), &mut key).unwrap_or_default();
    key
}

/// Every contribution approved now, across datanets, by key; and the label of what was read
/// (`contribution_reviewed@V`).
pub async fn approved(lake: &Lake) -> Result<(HashMap<DocKey, (Source, String)>, u64), Error> {
    let mut out = HashMap::new();
    let mut version = 0;
    for datanet in snapshot::datanet_ids(lake).await.map_err(lake_error)? {
        let snap = snapshot::snapshot(lake, &SnapshotRef { datanet: datanet.clone(), version: None })
            .await
            .map_err(lake_error)?;
        // Datanets are read one after another: the label is the newest version read.
        version = version.max(snap.version);
        for c in snap.contributions {
            let source = Source { contribution_id: c.contribution_id.clone(), contributor: c.contributor, datanet: datanet.clone() };
            out.insert(key_of(&c.contribution_id), (source, c.content));
        }
    }
    Ok((out, version))
}

/// Adds the approved contributions the index lacks as one new shard (tokenized by
/// `tokenize`, the served model's tokenizer). Returns how many were added.
pub fn index_new(
    index: &mut SpanIndex,
    approved: &HashMap<DocKey, (Source, String)>,
    reviewed_version: u64,
    tokenize: &dyn Fn(&str) -> Result<Vec<u32>, String>,
) -> Result<usize, Error> {
    let have: HashSet<DocKey> =
        index.shards().iter().flat_map(|s| (0..s.docs() as u32).map(move |d| *s.key(d))).collect();
    let mut new: Vec<(DocKey, Vec<u32>)> = Vec::new();
    for (key, (source, content)) in approved {
        if !have.contains(key) {
            let tokens = tokenize(content)
                .map_err(|e| Error::Internal(format!("tokenizing contribution {}: {e}", source.contribution_id)))?;
            new.push((*key, tokens));
        }
    }
    if new.is_empty() {
        return Ok(0);
    }
    new.sort_by(|a, b| a.0.cmp(&b.0));
    // One shard per chunk that fits a shard's positions.
    let mut chunk: Vec<(DocKey, Vec<u32>)> = Vec::new();
    let mut positions = 0usize;
    let count = new.len();
    for doc in new {
        if positions + doc.1.len() + 1 > MAX_SHARD_POSITIONS && !chunk.is_empty() {
            index.add(&chunk, vec![format!("contribution_reviewed@{reviewed_version}")])?;
            chunk.clear();
            positions = 0;
        }
        positions += doc.1.len() + 1;
        chunk.push(doc);
    }
    index.add(&chunk, vec![format!("contribution_reviewed@{reviewed_version}")])?;
    Ok(count)
}

/// One inference waiting for attribution.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    pub inference_id: InferenceId,
    pub model_id: ModelId,
    /// When it was answered (which registration of its model served it).
    pub event_time: chrono::DateTime<Utc>,
    pub prompt: Vec<u32>,
    pub output: Vec<u32>,
}

/// Inferences with stored token ids and no attribution rows, at most `limit`, and the
/// version of `inference_tokens` read.
pub async fn pending(lake: &Lake, limit: usize) -> Result<(Vec<Pending>, u64), Error> {
    let (_, done) = snapshot::query(lake, EventKind::InferenceAttributed, None, "SELECT DISTINCT inference_id FROM t")
        .await
        .map_err(lake_error)?;
    let mut attributed: HashSet<String> = HashSet::new();
    for batch in &done {
        attributed.extend(strings(batch.column(0))?);
    }
    let (version, rows) = snapshot::query(
        lake,
        EventKind::InferenceTokens,
        None,
        "SELECT inference_id, model_id, output_token_ids, prompt_token_ids, event_time FROM t ORDER BY event_time, inference_id",
    )
    .await
    .map_err(lake_error)?;
    let mut out = Vec::new();
    for batch in &rows {
        let (ids, models) = (strings(batch.column(0))?, strings(batch.column(1))?);
        let outputs = token_lists(batch.column(2))?;
        let prompts = token_lists(batch.column(3))?;
        let times = cast(batch.column(4), &DataType::Timestamp(TimeUnit::Microsecond, None))
            .map_err(|e| Error::Internal(format!("stored event_time: {e}")))?;
        let times = times
            .as_primitive_opt::<TimestampMicrosecondType>()
            .ok_or_else(|| Error::Internal("stored event_time is not a timestamp".into()))?;
        for r in 0..batch.num_rows() {
            if out.len() >= limit {
                break;
            }
            if attributed.contains(&ids[r]) {
                continue;
            }
            out.push(Pending {
                inference_id: ids[r].parse().map_err(|e| Error::Internal(format!("stored inference_id: {e}")))?,
                model_id: models[r].parse().map_err(|e| Error::Internal(format!("stored model_id: {e}")))?,
                event_time: chrono::DateTime::from_timestamp_micros(times.value(r))
                    .ok_or_else(|| Error::Internal("stored event_time is out of range".into()))?,
                prompt: token_ids(&prompts, r)?,
                output: token_ids(&outputs, r)?,
            });
        }
    }
    Ok((out, version))
}

/// The span method's part for one output, and its evidence (for the rows' spans).
pub fn span_part(index: &SpanIndex, approved: &HashMap<DocKey, (Source, String)>, rule: &SpanRule, output: &[u32]) -> (Part, Vec<Evidence>) {
    let (evidence, scores) = span_scores(index, output, rule, |k| approved.contains_key(k));
    (Part { method: AttributionMethod::Spans, scores }, evidence)
}

/// Most contributions the gradient method credits in one inference: the highest scores
/// (an adapter trained on many thousands would otherwise give every answer thousands of
/// rows of a few parts per billion).
pub const GRADIENT_TOP_K: usize = 100;

/// The span-index keys of hex contribution ids (ModelFactory's `contributions.txt`), once
/// per adapter; `None` for a line that is not a contribution id.
pub fn keys_of(ids: &[String]) -> Vec<Option<DocKey>> {
    ids.iter().map(|id| id.parse::<ContributionId>().ok().map(|id| key_of(&id))).collect()
}

/// The gradient method's part: `scores[i]` is the influence on the output of the training
/// contribution `keys[i]` ([`keys_of`]). Only positive scores of contributions approved now
/// count (flagged or rejected since training earn nothing), at most [`GRADIENT_TOP_K`] of
/// them, highest first (ties to the lower id).
pub fn gradient_part(keys: &[Option<DocKey>], scores: &[f32], approved: &HashMap<DocKey, (Source, String)>) -> Part {
    let mut kept: Vec<(DocKey, f64)> = keys
        .iter()
        .zip(scores)
        .filter_map(|(key, &s)| {
            let key = (*key)?;
            (s.is_finite() && s > 0.0 && approved.contains_key(&key)).then_some((key, s as f64))
        })
        .collect();
    kept.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    kept.truncate(GRADIENT_TOP_K);
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    Part { method: AttributionMethod::Gradient, scores: kept }
}

/// The passages retrieval cited in each of `pending`'s inferences: (contribution, summed
/// relevance of its cited chunks), by inference; and the version of `citations` read.
/// Read after [`pending`]: ingest commits an inference's citations before its token ids,
/// so every pending inference's citations are here.
pub async fn citations(lake: &Lake, pending: &[Pending]) -> Result<(HashMap<InferenceId, Vec<(DocKey, f64)>>, u64), Error> {
    let wanted: HashSet<&str> = pending.iter().map(|p| p.inference_id.as_str()).collect();
    let mut out: HashMap<InferenceId, Vec<(DocKey, f64)>> = HashMap::new();
    if wanted.is_empty() {
        return Ok((out, 0));
    }
    // A citation has its inference's time, so only the partitions from the oldest
    // pending inference's day on are read.
    let since = pending.iter().map(|p| p.event_time.date_naive()).min().unwrap_or_default();
    let sql = format!("SELECT inference_id, contribution_id, relevance FROM t WHERE event_date >= DATE '{since}'");
    let (version, rows) = snapshot::query(lake, EventKind::InferenceCited, None, &sql).await.map_err(lake_error)?;
    for batch in &rows {
        let (ids, contributions) = (strings(batch.column(0))?, strings(batch.column(1))?);
        let relevance = cast(batch.column(2), &DataType::Float64).map_err(|e| Error::Internal(format!("stored relevance: {e}")))?;
        let relevance = relevance
            .as_primitive_opt::<arrow::datatypes::Float64Type>()
            .ok_or_else(|| Error::Internal("stored relevance is not a number".into()))?;
        for r in 0..batch.num_rows() {
            if !wanted.contains(ids[r].as_str()) {
                continue;
            }
            let inference: InferenceId = ids[r].parse().map_err(|e| Error::Internal(format!("stored inference_id: {e}")))?;
            let contribution: ContributionId =
                contributions[r].parse().map_err(|e| Error::Internal(format!("stored contribution_id: {e}")))?;
            let cited = out.entry(inference).or_default();
            let key = key_of(&contribution);
            match cited.iter_mut().find(|(k, _)| *k == key) {
                Some((_, sum)) => *sum += relevance.value(r),
                None => cited.push((key, relevance.value(r))),
            }
        }
    }
    Ok((out, version))
}

/// The retrieval method's part: each cited contribution scores its summed relevance;
/// only contributions approved now count (one flagged or rejected since it was retrieved
/// earns nothing).
pub fn retrieval_part(cited: &[(DocKey, f64)], approved: &HashMap<DocKey, (Source, String)>) -> Part {
    let mut scores: Vec<(DocKey, f64)> =
        cited.iter().filter(|(key, s)| s.is_finite() && *s > 0.0 && approved.contains_key(key)).copied().collect();
    scores.sort_by(|a, b| a.0.cmp(&b.0));
    Part { method: AttributionMethod::Retrieval, scores }
}

/// The rows of one inference by the span method alone.
pub fn attribute_spans(
    index: &SpanIndex,
    approved: &HashMap<DocKey, (Source, String)>,
    rule: &SpanRule,
    inference: &Pending,
    basis: &str,
) -> Result<Vec<Event>, Error> {
    let (part, evidence) = span_part(index, approved, rule, &inference.output);
    attribute(inference, &Mix::default(), &[part], &evidence, approved, basis)
}

/// The rows of one inference from its methods' parts mixed by `mix`: one per
/// (contribution, method) with a positive weight (weights summing to exactly
/// `WEIGHT_SCALE`), or one unattributed row when no method has evidence.
pub fn attribute(
    inference: &Pending,
    mix: &Mix,
    parts: &[Part],
    evidence: &[Evidence],
    approved: &HashMap<DocKey, (Source, String)>,
    basis: &str,
) -> Result<Vec<Event>, Error> {
    let now = Utc::now();
    let row = |w: Option<&Weighted>| -> Result<Event, Error> {
        let source = w.and_then(|w| approved.get(&w.key)).map(|(s, _)| s.clone());
        let spans = match w {
            Some(w) if w.method == AttributionMethod::Spans => evidence
                .iter()
                .filter(|e| e.docs.contains(&w.key))
                .map(|e| OutputSpan { start: e.start as u32, len: e.len as u32 })
                .collect(),
            _ => Vec::new(),
        };
        let which = source.as_ref().map_or("none", |s| s.contribution_id.as_str());
        Ok(Event::InferenceAttributed(InferenceAttributed {
            event_id: attribution_event_id(&inference.inference_id, which, w.map(|w| w.method))?,
            event_time: now,
            inference_id: inference.inference_id.clone(),
            model_id: inference.model_id.clone(),
            contribution_id: source.as_ref().map(|s| s.contribution_id.clone()),
            contributor: source.as_ref().map(|s| s.contributor),
            datanet_id: source.map(|s| s.datanet),
            method: w.map_or(AttributionMethod::Spans, |w| w.method),
            raw_score: w.map_or(0.0, |w| w.raw_score),
            weight: w.map_or(0, |w| w.weight),
            spans,
            basis: basis.to_owned(),
        }))
    };
    let weighted = combine(mix, parts);
    if weighted.is_empty() {
        return Ok(vec![row(None)?]);
    }
    weighted.iter().map(|w| row(Some(w))).collect()
}

/// `attr-` and the sha256 of the inference, the contribution (or `none`) and, for a method
/// other than spans, the method: fits the 128 characters of an event id whatever the
/// inference id's length.
fn attribution_event_id(inference: &InferenceId, contribution: &str, method: Option<AttributionMethod>) -> Result<EventId, Error> {
    let text = match method {
        Some(AttributionMethod::Gradient) => format!("{inference}\n{contribution}\ngradient"),
        Some(AttributionMethod::Retrieval) => format!("{inference}\n{contribution}\nretrieval"),
        Some(AttributionMethod::Spans) | None => format!("{inference}\n{contribution}"),
    };
    let digest = Sha256Hex::digest(text.as_bytes());
    format!("attr-{digest}").parse().map_err(|e| Error::Internal(format!("attribution event id: {e}")))
}

/// A string column's values (Delta strings may read as `Utf8View`); a null reads as "".
pub(crate) fn strings(column: &dyn Array) -> Result<Vec<String>, Error> {
    let column = cast(column, &DataType::Utf8).map_err(|e| Error::Internal(format!("a string column: {e}")))?;
    let column = column.as_string_opt::<i32>().ok_or_else(|| Error::Internal("not a string column".into()))?;
    Ok((0..column.len()).map(|i| if column.is_null(i) { String::new() } else { column.value(i).to_owned() }).collect())
}

/// A token-id column (`array<int>`) as one list array, whatever list type it read as.
pub(crate) fn token_lists(column: &dyn Array) -> Result<ListArray, Error> {
    let list = DataType::List(std::sync::Arc::new(Field::new("item", DataType::Int32, true)));
    let column = cast(column, &list).map_err(|e| Error::Internal(format!("a token-id column: {e}")))?;
    column.as_list_opt::<i32>().cloned().ok_or_else(|| Error::Internal("a token-id column is not a list".into()))
}

/// Row `row` of [`token_lists`]' array, as token ids (stored ids are below 2^31, checked
/// at ingest).
pub(crate) fn token_ids(lists: &ListArray, row: usize) -> Result<Vec<u32>, Error> {
    let ids = lists.value(row);
    let ids = ids.as_primitive_opt::<Int32Type>().ok_or_else(|| Error::Internal("token ids are not 32-bit integers".into()))?;
    Ok(ids.values().iter().map(|&t| t as u32).collect())
}

pub(crate) fn lake_error(e: ledgerlake_lakehouse::Error) -> Error {
    Error::Lake(e.to_string())
}
