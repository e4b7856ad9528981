//! Explaining one inference: its attribution rows, heaviest first, with the output's
//! matched text marked.

use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type};
use ledgerlake_lakehouse::events::{EventKind, WEIGHT_SCALE};
use ledgerlake_lakehouse::ids::InferenceId;
use ledgerlake_lakehouse::snapshot;
use ledgerlake_lakehouse::Lake;
use serde::Serialize;

use crate::Error;
use crate::job::{strings, token_ids, token_lists};

/// What attribution says of one inference.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Explanation {
    pub inference_id: String,
    pub model_id: Option<String>,
    /// `attributed`, `unattributed` (no contribution shaped it), or `pending` (its tokens
    /// are stored and the job has not run on it yet).
    pub status: String,
    /// The output's text, when its token ids are kept.
    pub output: Option<String>,
    /// The contributions, heaviest first.
    pub contributions: Vec<Contribution>,
}

/// One contribution's share of an inference.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Contribution {
    pub contribution_id: String,
    pub contributor: String,
    pub datanet_id: String,
    pub method: String,
    /// Parts per billion of the inference.
    pub weight: u64,
    /// The weight as a decimal fraction, for people ("0.25").
    pub share: String,
    pub raw_score: f64,
    /// The output with the spans found in this contribution marked «like this» (span
    /// method).
    pub highlighted: Option<String>,
}

/// The explanation of `inference`, or `None` when ledgerlake has neither its token ids
/// nor an attribution of it. `decode` turns output token ids into text.
pub async fn explain(
    lake: &Lake,
    inference: &InferenceId,
    decode: &(dyn Fn(&[u32]) -> String + Sync),
) -> Result<Option<Explanation>, Error> {
    let lake_error = |e: ledgerlake_lakehouse::Error| Error::Lake(e.to_string());
    // An inference id is letters, digits and `_ . : -`: nothing to escape.
    let (_, token_rows) = snapshot::query(
        lake,
        EventKind::InferenceTokens,
        None,
        &format!("SELECT model_id, output_token_ids FROM t WHERE inference_id = '{inference}' LIMIT 1"),
    )
    .await
    .map_err(lake_error)?;
    let mut model_id = None;
    let mut output: Option<Vec<u32>> = None;
    if let Some(batch) = token_rows.iter().find(|b| b.num_rows() > 0) {
        model_id = strings(batch.column(0))?.into_iter().next();
        output = Some(token_ids(&token_lists(batch.column(1))?, 0)?);
    }
    let (_, rows) = snapshot::query(
        lake,
        EventKind::InferenceAttributed,
        None,
        &format!(
            "SELECT model_id, contribution_id, contributor, datanet_id, method, weight, raw_score, spans \
             FROM t WHERE inference_id = '{inference}' ORDER BY weight DESC, contribution_id"
        ),
    )
    .await
    .map_err(lake_error)?;
    let mut contributions = Vec::new();
    let mut any_row = false;
    for batch in &rows {
        let spans = batch.column(7).as_list_opt::<i32>().ok_or_else(|| Error::Internal("spans".into()))?;
        let weights = cast(batch.column(5), &DataType::Int64).map_err(internal)?;
        let weights = weights.as_primitive::<Int64Type>();
        let scores = cast(batch.column(6), &DataType::Float64).map_err(internal)?;
        let scores = scores.as_primitive::<arrow::datatypes::Float64Type>();
        let [models, ids, contributors, datanets, methods] = [0, 1, 2, 3, 4].map(|c| strings(batch.column(c)));
        let (models, ids, contributors, datanets, methods) = (models?, ids?, contributors?, datanets?, methods?);
        for r in 0..batch.num_rows() {
            any_row = true;
            model_id.get_or_insert_with(|| models[r].clone());
            if batch.column(1).is_null(r) {
                continue;
            }
            let weight = u64::try_from(weights.value(r)).map_err(internal)?;
            let marked = spans_of(spans.value(r).as_ref())?;
            contributions.push(Contribution {
                contribution_id: ids[r].clone(),
                contributor: contributors[r].clone(),
                datanet_id: datanets[r].clone(),
                method: methods[r].clone(),
                weight,
                share: share(weight),
                raw_score: scores.value(r),
                highlighted: output.as_deref().filter(|_| methods[r] == "spans").map(|o| highlight(o, &marked, decode)),
            });
        }
    }
    if !any_row && output.is_none() {
        return Ok(None);
    }
    let status = match (any_row, contributions.is_empty()) {
        (false, _) => "pending",
        (true, true) => "unattributed",
        (true, false) => "attributed",
    };
    Ok(Some(Explanation {
        inference_id: inference.to_string(),
        model_id,
        status: status.to_owned(),
        output: output.as_deref().map(decode),
        contributions,
    }))
}

/// `weight` parts per billion as a decimal fraction without trailing zeros.
fn share(weight: u64) -> String {
    let (whole, frac) = (weight / WEIGHT_SCALE, weight % WEIGHT_SCALE);
    if frac == 0 {
        return whole.to_string();
    }
    format!("{whole}.{}", format!("{frac:09}").trim_end_matches('0'))
}

/// The output's text with each span (start, len in tokens) between « and ».
pub fn highlight(output: &[u32], spans: &[(usize, usize)], decode: &dyn Fn(&[u32]) -> String) -> String {
    let mut spans: Vec<(usize, usize)> =
        spans.iter().map(|&(s, l)| (s.min(output.len()), (s + l).min(output.len()))).filter(|(s, e)| s < e).collect();
    spans.sort_unstable();
    let mut text = String::new();
    let mut at = 0;
    for (start, end) in spans {
        let start = start.max(at);
        if start >= end {
            continue;
        }
        text.push_str(&decode(&output[at..start]));
        text.push('«');
        text.push_str(&decode(&output[start..end]));
        text.push('»');
        at = end;
    }
    text.push_str(&decode(&output[at..]));
    text
}

fn spans_of(list: &dyn Array) -> Result<Vec<(usize, usize)>, Error> {
    let structs = list.as_struct_opt().ok_or_else(|| Error::Internal("spans are not structs".into()))?;
    let field = |name: &str| -> Result<Vec<i64>, Error> {
        let column = structs.column_by_name(name).ok_or_else(|| Error::Internal(format!("spans.{name}")))?;
        let column = cast(column, &DataType::Int64).map_err(internal)?;
        Ok(column.as_primitive::<Int64Type>().values().to_vec())
    };
    let (starts, lens) = (field("start")?, field("len")?);
    Ok(starts.into_iter().zip(lens).map(|(s, l)| (s.max(0) as usize, l.max(0) as usize)).collect())
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_print_exactly() {
        assert_eq!(share(WEIGHT_SCALE), "1");
        assert_eq!(share(250_000_000), "0.25");
        assert_eq!(share(333_333_334), "0.333333334");
        assert_eq!(share(1), "0.000000001");
    }

    #[test]
    fn spans_are_marked_once_even_when_they_overlap() {
        let decode = |ids: &[u32]| ids.iter().map(|i| format!("w{i} ")).collect::<String>();
        let out = [0, 1, 2, 3, 4, 5];
        assert_eq!(highlight(&out, &[(1, 2), (2, 2), (5, 9)], &decode), "w0 «w1 w2 »«w3 »w4 «w5 »");
        assert_eq!(highlight(&out, &[], &decode), "w0 w1 w2 w3 w4 w5 ");
    }
}
