//! Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling
//! from a seeded generator, so the same request with the same seed gives the same text;
//! the penalties of OpenAI (presence, frequency) and vLLM (repetition); and the
//! log-probabilities OpenAI's `logprobs` asks for.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

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
    /// OpenAI's: subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// vLLM's (from the CTRL paper): the logit of every token of the prompt or the output
    /// is divided by it when positive and multiplied by it when negative; 1 is none.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, seed: None, presence_penalty: 0.0, frequency_penalty: 0.0, repetition_penalty: 1.0 }
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
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 2.0) {
            return Err(format!("repetition_penalty must be in (0, 2], got {}", self.repetition_penalty));
        }
        Ok(())
    }

    fn penalized(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }
}

/// The log-probability of a chosen token and of the most likely alternatives, under the
/// model's own distribution (the raw logits, before penalties and temperature: vLLM's
/// default).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The `top` most likely tokens, most likely first (ties by id).
    pub top: Vec<(u32, f32)>,
}

/// `log softmax(logits)[id]` and the `top` most likely tokens with theirs.
pub fn logprobs(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut all: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = top.min(all.len());
        if k < all.len() {
            all.select_nth_unstable_by(k - 1, order);
            all.truncate(k);
        }
        all.sort_unstable_by(order);
        best = all.into_iter().map(|(i, l)| (i, l - lse)).collect();
    }
    let logprob = logits.get(id as usize).map_or(f32::NEG_INFINITY, |l| l - lse);
    TokenLogprob { id, logprob, top: best }
}

/// A request's generator, parameters and the tokens its penalties look at.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Reused for the sorted candidates.
    scratch: Vec<(u32, f32)>,
    /// The prompt's distinct tokens (for the repetition penalty).
    prompt: HashSet<u32>,
    /// How often each token was generated.
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng, scratch: Vec::new(), prompt: HashSet::new(), counts: HashMap::new() }
    }

    /// The same sampler, whose repetition penalty also covers `prompt`.
    pub fn with_prompt(mut self, prompt: &[u32]) -> Self {
        if self.params.repetition_penalty != 1.0 {
            self.prompt = prompt.iter().copied().collect();
        }
        self
    }

    /// The logits after the penalties (the same slice when there are none).
    fn penalize<'a>(&self, logits: &'a [f32]) -> Cow<'a, [f32]> {
        let p = &self.params;
        if !p.penalized() {
            return Cow::Borrowed(logits);
        }
        let mut out = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            for &id in self.prompt.iter().chain(self.counts.keys()) {
                if let Some(l) = out.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        for (&id, &count) in &self.counts {
            if let Some(l) = out.get_mut(id as usize) {
                *l -= p.frequency_penalty * count as f32 + p.presence_penalty;
            }
        }
        Cow::Owned(out)
    }

    /// The next token of one row of logits; it counts as generated for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let id = self.draw(logits);
        *self.counts.entry(id).or_insert(0) += 1;
        id
    }

    fn draw(&mut self, raw: &[f32]) -> u32 {
        let adjusted = self.penalize(raw);
        let logits: &[f32] = &adjusted;
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return crate::model::argmax(logits);
        }
        let c = &mut self.scratch;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)));
        if (p.top_k == 0 || p.top_k >= c.len()) && p.top_p >= 1.0 {
            // The whole distribution: drawn in id order, with no sort (a sort of the
            // vocabulary per token was most of a large batch's sampling time).
            let total = exponentiate(c);
            return pick(c, total, &mut self.rng);
        }
        // Highest first; ties by id keep the order (and the result) deterministic.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit);
            c.truncate(p.top_k);
        }
        if p.top_p >= 1.0 {
            c.sort_unstable_by(by_logit);
            let total = exponentiate(c);
            return pick(c, total, &mut self.rng);
        }
        // Nucleus: the most likely candidates until their mass reaches top_p. Only that
        // head is sorted: the first `k` are selected and sorted, `k` growing fourfold
        // until the head holds the mass (a sort of the whole vocabulary per token was
        // most of a large batch's sampling time).
        let max = c.iter().map(|e| e.1).fold(f32::NEG_INFINITY, f32::max);
        let total: f64 = c.iter().map(|e| (e.1 - max).exp() as f64).sum();
        let mut k = 64.min(c.len());
        let keep = loop {
            if k < c.len() {
                c.select_nth_unstable_by(k - 1, by_logit);
            }
            c[..k].sort_unstable_by(by_logit);
            let mut kept = 0.0f64;
            let reached = c[..k].iter().position(|e| {
                kept += (e.1 - max).exp() as f64 / total;
                kept >= p.top_p as f64
            });
            match reached {
                Some(i) => break i + 1,
                None if k == c.len() => break k,
                None => k = (k * 4).min(c.len()),
            }
        };
        c.truncate(keep);
        let total = exponentiate(c);
        pick(c, total, &mut self.rng)
    }
}

/// Turns scaled logits into unnormalised probabilities `exp(l - max)`; returns their sum.
fn exponentiate(c: &mut [(u32, f32)]) -> f64 {
    let max = c.iter().map(|e| e.1).fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f64;
    for e in c.iter_mut() {
        e.1 = (e.1 - max).exp();
        total += e.1 as f64;
    }
    total
}

/// Draws one id from candidates holding unnormalised probabilities that sum to `total`.
fn pick(c: &[(u32, f32)], total: f64, rng: &mut StdRng) -> u32 {
    let mut at = rng.random::<f64>() * total;
    for e in c {
        at -= e.1 as f64;
        if at <= 0.0 {
            return e.0;
        }
    }
    // Rounding left a sliver past the last candidate (the caller guarantees one).
    c[c.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nucleus by sorting the whole vocabulary, as a reference for the head-only sort.
    fn nucleus_by_full_sort(logits: &[f32], temperature: f32, top_p: f32, rng: &mut StdRng) -> u32 {
        let mut c: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / temperature)).collect();
        let max = c.iter().map(|e| e.1).fold(f32::NEG_INFINITY, f32::max);
        let total: f64 = c.iter().map(|e| (e.1 - max).exp() as f64).sum();
        c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0.0;
        let keep = c.iter().position(|e| {
            kept += (e.1 - max).exp() as f64 / total;
            kept >= top_p as f64
        });
        c.truncate(keep.map_or(c.len(), |i| i + 1));
        let total = exponentiate(&mut c);
        pick(&c, total, rng)
    }

    #[test]
    fn nucleus_sampling_sorts_only_the_head_and_draws_what_a_full_sort_draws() {
        let mut rng = StdRng::seed_from_u64(11);
        // Peaked (the head is a few tokens), flat (it grows past 64 candidates several
        // times) and with ties.
        let shapes: [Box<dyn Fn(&mut StdRng, usize) -> f32>; 3] = [
            Box::new(|r, i| if i < 3 { 8.0 } else { r.random_range(-4.0f32..0.0) }),
            Box::new(|r, _| r.random_range(-0.5f32..0.5)),
            Box::new(|_, i| (i % 7) as f32),
        ];
        for shape in &shapes {
            let logits: Vec<f32> = (0..5000).map(|i| shape(&mut rng, i)).collect();
            for top_p in [0.1f32, 0.5, 0.9, 0.95, 0.999] {
                let params = SamplingParams { temperature: 0.7, top_p, seed: Some(3), ..SamplingParams::default() };
                let mut ours = Sampler::new(params);
                let mut reference = StdRng::seed_from_u64(3);
                for _ in 0..50 {
                    assert_eq!(ours.draw(&logits), nucleus_by_full_sort(&logits, 0.7, top_p, &mut reference), "top_p {top_p}");
                }
            }
        }
    }

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
        assert!(SamplingParams { presence_penalty: 2.5, ..Default::default() }.check().is_err());
        assert!(SamplingParams { repetition_penalty: 0.0, ..Default::default() }.check().is_err());
    }

    #[test]
    fn penalties_follow_openai_and_vllm() {
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        // Without penalties greedy repeats its favourite token.
        let logits = [1.0, 3.0, 2.5, -1.0];
        let mut s = Sampler::new(greedy.clone());
        assert_eq!((0..3).map(|_| s.sample(&logits)).collect::<Vec<_>>(), vec![1, 1, 1]);
        // Presence: 3.0 - 1 < 2.5 after the first time; then 2.5 - 1 < 3.0 - 1.
        let mut s = Sampler::new(SamplingParams { presence_penalty: 1.0, ..greedy.clone() });
        assert_eq!((0..3).map(|_| s.sample(&logits)).collect::<Vec<_>>(), vec![1, 2, 1]);
        // Frequency grows with each use: 3 - 0.3k against 2.5 - 0.3j.
        let mut s = Sampler::new(SamplingParams { frequency_penalty: 0.3, ..greedy.clone() });
        assert_eq!((0..4).map(|_| s.sample(&logits)).collect::<Vec<_>>(), vec![1, 1, 2, 1]);
        // Repetition covers the prompt: 3 / 2 = 1.5 < 2.5; a negative logit is multiplied.
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..greedy.clone() }).with_prompt(&[1, 3]);
        assert_eq!(s.penalize(&logits).as_ref(), &[1.0, 1.5, 2.5, -2.0]);
        assert_eq!(s.sample(&logits), 2);
        // No penalty, no copy.
        assert!(matches!(Sampler::new(greedy).penalize(&logits), Cow::Borrowed(_)));
    }

    #[test]
    fn logprobs_are_log_softmax_with_the_top_alternatives() {
        let logits = [0.0f32, 2.0, 1.0, 2.0];
        let lp = logprobs(&logits, 2, 3);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((lp.logprob - (1f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!((lp.top[0].1 - (2f32.exp() / z).ln()).abs() < 1e-6);
        let total: f32 = (0..4).map(|i| logprobs(&logits, i, 0).logprob.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(logprobs(&logits, 2, 0).top.is_empty());
    }
}
