//! Combining methods: each method's evidence for one inference becomes a distribution over
//! contributions, and the methods' configured shares mix them into one set of weights
//! (`docs/attribution.md`, "Combining methods").

use std::collections::BTreeMap;

use ledgerlake_lakehouse::events::AttributionMethod;
use serde::{Deserialize, Serialize};

use crate::spans::DocKey;
use crate::weights::apportion;

/// The relative share of an inference's weight each method gets, where it has evidence.
/// A method with no evidence for an inference (no kept span, no features for the model, no
/// retrieval) drops out and the others share its part; a share of 0 turns a method off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mix {
    pub spans: u32,
    pub gradient: u32,
    pub retrieval: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Mix { spans: 1, gradient: 1, retrieval: 1 }
    }
}

impl Mix {
    pub fn share(&self, method: AttributionMethod) -> u32 {
        match method {
            AttributionMethod::Spans => self.spans,
            AttributionMethod::Gradient => self.gradient,
            AttributionMethod::Retrieval => self.retrieval,
        }
    }
}

/// One method's scores for one inference: raw scores by contribution (only positive, finite
/// scores of eligible contributions count).
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub method: AttributionMethod,
    pub scores: Vec<(DocKey, f64)>,
}

/// One weighted row: a contribution's share of the inference by one method.
#[derive(Clone, Debug, PartialEq)]
pub struct Weighted {
    pub method: AttributionMethod,
    pub key: DocKey,
    pub raw_score: f64,
    pub weight: u64,
}

/// Mixes `parts` by `mix`: within a method, a contribution's part is its score over the
/// method's total; across methods, each active method (a positive share and some positive
/// score) gets its share over the active shares' sum. The mixture is apportioned into
/// integer weights summing to exactly `WEIGHT_SCALE` (rows ordered by method, then key,
/// so ties resolve the same way every time). Empty when no method has evidence.
pub fn combine(mix: &Mix, parts: &[Part]) -> Vec<Weighted> {
    // (method, key) -> raw score, positive and finite only.
    let mut by_method: BTreeMap<AttributionMethod, BTreeMap<DocKey, f64>> = BTreeMap::new();
    for part in parts {
        if mix.share(part.method) == 0 {
            continue;
        }
        for &(key, s) in &part.scores {
            if s.is_finite() && s > 0.0 {
                *by_method.entry(part.method).or_default().entry(key).or_default() += s;
            }
        }
    }
    by_method.retain(|_, scores| {
        let total: f64 = scores.values().sum();
        total.is_finite() && total > 0.0
    });
    let active: f64 = by_method.keys().map(|m| mix.share(*m) as f64).sum();
    if active == 0.0 {
        return Vec::new();
    }
    let mut rows: Vec<(AttributionMethod, DocKey, f64)> = Vec::new();
    let mut mixed: Vec<f64> = Vec::new();
    for (method, scores) in &by_method {
        // Relative to the largest first, so the total cannot overflow.
        let largest = scores.values().copied().fold(0.0, f64::max);
        let total: f64 = scores.values().map(|s| s / largest).sum();
        let share = mix.share(*method) as f64 / active;
        for (key, s) in scores {
            rows.push((*method, *key, *s));
            mixed.push(share * (s / largest) / total);
        }
    }
    apportion(&mixed)
        .into_iter()
        .map(|(i, weight)| Weighted { method: rows[i].0, key: rows[i].1, raw_score: rows[i].2, weight })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WEIGHT_SCALE;

    fn key(b: u8) -> DocKey {
        [b; 32]
    }

    #[test]
    fn one_method_is_its_own_distribution() {
        let parts = [Part { method: AttributionMethod::Spans, scores: vec![(key(1), 3.0), (key(2), 1.0)] }];
        let w = combine(&Mix::default(), &parts);
        assert_eq!(w.iter().map(|r| r.weight).collect::<Vec<_>>(), vec![750_000_000, 250_000_000]);
        assert_eq!(w[0].raw_score, 3.0);
    }

    #[test]
    fn shares_mix_methods_and_a_method_without_evidence_drops_out() {
        let mix = Mix { spans: 1, gradient: 3, retrieval: 1 };
        let parts = [
            Part { method: AttributionMethod::Spans, scores: vec![(key(1), 10.0)] },
            Part { method: AttributionMethod::Gradient, scores: vec![(key(1), 0.5), (key(2), 0.5), (key(3), -2.0)] },
            Part { method: AttributionMethod::Retrieval, scores: vec![] },
        ];
        let w = combine(&mix, &parts);
        // Spans: 1/4 all to key 1; gradient: 3/4 split evenly; the negative score earns nothing.
        let got: Vec<(AttributionMethod, u8, u64)> = w.iter().map(|r| (r.method, r.key[0], r.weight)).collect();
        assert_eq!(
            got,
            vec![
                (AttributionMethod::Spans, 1, 250_000_000),
                (AttributionMethod::Gradient, 1, 375_000_000),
                (AttributionMethod::Gradient, 2, 375_000_000),
            ]
        );
        assert_eq!(w.iter().map(|r| r.weight).sum::<u64>(), WEIGHT_SCALE);
    }

    #[test]
    fn a_zero_share_turns_a_method_off_and_no_evidence_is_empty() {
        let mix = Mix { spans: 0, ..Mix::default() };
        let parts = [Part { method: AttributionMethod::Spans, scores: vec![(key(1), 1.0)] }];
        assert!(combine(&mix, &parts).is_empty());
        assert!(combine(&Mix::default(), &[]).is_empty());
        let tiny = [Part { method: AttributionMethod::Gradient, scores: vec![(key(1), f64::MIN_POSITIVE), (key(2), f64::MAX)] }];
        assert_eq!(combine(&Mix::default(), &tiny).iter().map(|r| r.weight).sum::<u64>(), WEIGHT_SCALE);
    }
}
