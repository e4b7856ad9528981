//! The span method: from an output's maximal spans to contribution scores
//! (`docs/attribution.md`, "Scoring spans").

use std::collections::{BTreeMap, HashMap};

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
    /// Its information (nats): `-ln` of the unigram probability of the output tokens it
    /// owns (each token counts once, for the longest kept span holding it).
    pub information: f64,
    /// The eligible documents holding it, by key.
    pub docs: Vec<DocKey>,
}

/// The evidence in `output` and each document's score: every kept span's information,
/// split evenly among the eligible documents holding it. A span counts when it is a
/// maximal span of at least `min_len` tokens occurring at most `max_count` times, and at
/// least one document holding it is `eligible` (approved now). Maximal spans may overlap;
/// an output token's information counts once, for the longest kept span holding it (ties:
/// the earlier), so a short span sharing most of its tokens with a long one adds only its
/// own. Scores come sorted by key.
pub fn span_scores(
    index: &SpanIndex,
    output: &[u32],
    rule: &SpanRule,
    eligible: impl Fn(&DocKey) -> bool,
) -> (Vec<Evidence>, Vec<(DocKey, f64)>) {
    let mut kept: Vec<(usize, usize, Vec<DocKey>)> = Vec::new();
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
        if !docs.is_empty() {
            kept.push((span.start, span.len, docs));
        }
    }
    // Token ownership: longest spans first.
    let mut order: Vec<usize> = (0..kept.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(kept[i].1), kept[i].0));
    let total = index.tokens().max(1) as f64;
    let mut unigram: HashMap<u32, f64> = HashMap::new();
    let mut owned = vec![false; output.len()];
    let mut information = vec![0f64; kept.len()];
    for &i in &order {
        let (start, len, _) = kept[i];
        for t in start..start + len {
            if !owned[t] {
                owned[t] = true;
                let token = output[t];
                information[i] += *unigram.entry(token).or_insert_with(|| -(index.count(&[token]).max(1) as f64 / total).ln());
            }
        }
    }
    let mut evidence = Vec::new();
    let mut scores: BTreeMap<DocKey, f64> = BTreeMap::new();
    for ((start, len, docs), information) in kept.into_iter().zip(information) {
        if information <= 0.0 {
            continue;
        }
        let share = information / docs.len() as f64;
        for d in &docs {
            *scores.entry(*d).or_default() += share;
        }
        evidence.push(Evidence { start, len, information, docs });
    }
    (evidence, scores.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_spans_count_each_output_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = SpanIndex::open(dir.path()).unwrap();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let long: Vec<u32> = (1..=20).collect();
        let short: Vec<u32> = [50, 51, 1, 2, 3, 4, 5, 6, 7].to_vec();
        index.add(&[(a, long), (b, short)], vec!["t".into()]).unwrap();
        // Maximal spans: [51 1..7] (in b) and [1..20] (in a) overlap on 1..7.
        let output: Vec<u32> = std::iter::once(51).chain(1..=20).collect();
        let (evidence, scores) = span_scores(&index, &output, &SpanRule { min_len: 6, max_count: 10 }, |_| true);
        assert_eq!(evidence.iter().map(|e| (e.start, e.len)).collect::<Vec<_>>(), vec![(0, 8), (1, 20)]);
        let n = index.tokens() as f64;
        let info = |t: u32| -(index.count(&[t]) as f64 / n).ln();
        // b owns only token 51; a owns all of 1..=20.
        let want_b = info(51);
        let want_a: f64 = (1..=20).map(info).sum();
        assert_eq!(scores.len(), 2);
        assert!((scores[0].1 - want_a).abs() < 1e-9 && scores[0].0 == a, "{scores:?}");
        assert!((scores[1].1 - want_b).abs() < 1e-9 && scores[1].0 == b, "{scores:?}");
    }
}
