//! Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling
//! from a seeded generator, so the same request with the same seed gives the same text.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The sampling parameters of one request (OpenAI's names and meanings).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus: the smallest set of tokens whose probability adds up to `top_p`.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, seed: None }
    }
}

impl SamplingParams {
    /// What is out of range, in words.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=2.0).contains(&self.temperature) || self.temperature.is_nan() {
            return Err(format!("temperature must be between 0 and 2, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// A request's generator and parameters.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Reused for the sorted candidates.
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng, scratch: Vec::new() }
    }

    /// The next token of one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return crate::model::argmax(logits);
        }
        let c = &mut self.scratch;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)));
        // Highest first; ties by id keep the order (and the result) deterministic.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit);
        let max = c[0].1;
        let mut total = 0.0f64;
        for e in c.iter_mut() {
            e.1 = (e.1 - max).exp();
            total += e.1 as f64;
        }
        if p.top_p < 1.0 {
            let mut kept = 0.0f64;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                kept += e.1 as f64 / total;
                if kept >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            total = c.iter().map(|e| e.1 as f64).sum();
        }
        let mut at = self.rng.random::<f64>() * total;
        for e in c.iter() {
            at -= e.1 as f64;
            if at <= 0.0 {
                return e.0;
            }
        }
        c[c.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_top_p_and_seeds() {
        let logits = [0.0, 3.0, 1.0, 2.9, -5.0];
        let mut g = Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() });
        assert_eq!(g.sample(&logits), 1);
        // top_k = 2 only ever picks 1 or 3.
        let mut s = Sampler::new(SamplingParams { top_k: 2, seed: Some(7), ..Default::default() });
        let picks: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(picks.iter().all(|&t| t == 1 || t == 3));
        assert!(picks.contains(&1) && picks.contains(&3));
        // A small top_p keeps only the most likely token.
        let mut s = Sampler::new(SamplingParams { top_p: 0.3, seed: Some(7), ..Default::default() });
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        // Same seed, same draws; another seed, other draws.
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.5, seed: Some(seed), ..Default::default() });
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
        assert!(SamplingParams { temperature: 3.0, ..Default::default() }.check().is_err());
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.check().is_err());
    }
}
