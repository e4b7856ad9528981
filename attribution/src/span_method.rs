//! The span method: from an output's maximal spans to contribution scores
//! (`docs/attribution.md`, "Scoring spans").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spans::{DocKey, SpanIndex};

/// Which spans count as evidence, and how much.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpanRule {
    /// Shortest span that counts, in tokens: shorter matches happen by chance.
    pub min_len: usize,
    /// A span occurring more often than this is common phrasing, not evidence of a source.
    pub max_count: u64,
}

impl Default for SpanRule {
    fn default() -> Self {
        SpanRule {
            min_len: 6,
            max_count: 10,
        }
    }
}

/// A span kept as evidence: where it is in the output and the documents holding it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evidence {
    pub start: usize,
    pub len: usize,
    /// Its information, `-ln` of its unigram probability (nats): longer and rarer is more.
    pub information: f64,
    /// The eligible documents holding it, by key.
    pub docs: Vec<DocKey>,
}

/// The evidence in `output` and each document's score: every kept span's information,
/// split evenly among the eligible documents holding it. A span counts when it is a
/// maximal span of at least `min_len` tokens occurring at most `max_count` times, and at
/// least one document holding it is `eligible` (approved now). Scores come sorted by key.
pub fn span_scores(
    index: &SpanIndex,
    output: &[u32],
    rule: &SpanRule,
    eligible: impl Fn(&DocKey) -> bool,
) -> (Vec<Evidence>, Vec<(DocKey, f64)>) {
    let mut evidence = Vec::new();
    let mut scores: BTreeMap<DocKey, f64> = BTreeMap::new();
    for span in index.maximal_spans(output, rule.min_len.max(1)) {
        if span.count == 0 || span.count > rule.max_count {
            continue;
        }
        let limit = usize::try_from(rule.max_count).unwrap_or(usize::MAX);
        let mut docs: Vec<DocKey> = index
            .hits(&output[span.start..span.start + span.len], limit)
            .into_iter()
            .map(|(shard, hit)| *index.shards()[shard].key(hit.doc))
            .filter(|k| eligible(k))
            .collect();
        docs.sort_unstable();
        docs.dedup();
        if docs.is_empty() {
            continue;
        }
        let information = -span.unigram_logprob;
        let share = information / docs.len() as f64;
        for d in &docs {
            *scores.entry(*d).or_default() += share;
        }
        evidence.push(Evidence {
            start: span.start,
            len: span.len,
            information,
            docs,
        });
    }
    (evidence, scores.into_iter().collect())
}
