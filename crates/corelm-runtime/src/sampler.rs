//! Choosing the next token: greedy, or temperature sampling filtered by top-k, top-p and min-p,
//! after repetition, frequency and presence penalties; reproducible from a seed.

use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = no limit).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one (0 = off).
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of tokens already seen (1 = off).
    pub repetition_penalty: f32,
    /// Subtracted per previous occurrence.
    pub frequency_penalty: f32,
    /// Subtracted once for any token already seen.
    pub presence_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

/// SplitMix64: small, fast and reproducible; sampling needs no cryptographic strength.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = Rng(params.seed);
        Sampler { params, rng }
    }

    /// The tokens that survive the filters, with their probabilities (sorted, most likely first).
    pub fn candidates(&self, logits: &[f32], history: &[u32]) -> Vec<(u32, f64)> {
        let p = &self.params;
        let mut adjusted: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for &t in history {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &n) in &counts {
            let Some(l) = adjusted.get_mut(t as usize) else { continue };
            if p.repetition_penalty != 1.0 {
                let r = p.repetition_penalty as f64;
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
            *l -= p.frequency_penalty as f64 * n as f64 + p.presence_penalty as f64;
        }
        let mut order: Vec<u32> = (0..adjusted.len() as u32).collect();
        order.sort_by(|&a, &b| adjusted[b as usize].total_cmp(&adjusted[a as usize]).then(a.cmp(&b)));
        if p.temperature <= 0.0 {
            return vec![(order[0], 1.0)];
        }
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let t = p.temperature as f64;
        let max = adjusted[order[0] as usize];
        let weights: Vec<f64> = order.iter().map(|&i| ((adjusted[i as usize] - max) / t).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut probs: Vec<(u32, f64)> = order.iter().zip(&weights).map(|(&i, &w)| (i, w / total)).collect();
        if p.min_p > 0.0 {
            let floor = probs[0].1 * p.min_p as f64;
            probs.retain(|&(_, q)| q >= floor);
        }
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&(_, q)| {
                    cumulative += q;
                    cumulative >= p.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let kept: f64 = probs.iter().map(|(_, q)| q).sum();
        probs.iter_mut().for_each(|(_, q)| *q /= kept);
        probs
    }

    /// Picks the next token.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let probs = self.candidates(logits, history);
        if probs.len() == 1 {
            return probs[0].0;
        }
        let mut u = self.rng.next_f64();
        for &(t, q) in &probs {
            if u < q {
                return t;
            }
            u -= q;
        }
        probs.last().expect("at least one candidate").0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..50).map(|i| ((i * 7919) % 23) as f32 / 4.0).collect()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let l = logits();
        let best = (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a))).unwrap() as u32;
        assert_eq!(Sampler::new(SamplingParams::default()).sample(&l, &[]), best);
    }

    #[test]
    fn a_seed_reproduces_the_sequence() {
        let params = SamplingParams { temperature: 1.0, seed: 42, ..Default::default() };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..200).map(|_| s.sample(&logits(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
        assert_ne!(draw(&params), draw(&SamplingParams { seed: 43, ..params.clone() }));
    }

    /// Over many draws, filtered samplers only emit allowed tokens, and do emit more than one.
    fn only_allowed(params: SamplingParams, allowed: impl Fn(u32, &[f32]) -> bool) {
        let l = logits();
        let mut s = Sampler::new(params);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..5000 {
            let t = s.sample(&l, &[]);
            assert!(allowed(t, &l), "token {t} should have been filtered out");
            seen.insert(t);
        }
        assert!(seen.len() > 1, "sampling collapsed to one token");
    }

    #[test]
    fn top_k_never_emits_beyond_k() {
        let l = logits();
        let mut sorted = l.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[4];
        // Ties at the k-th value are broken by token id; allow exactly the 5 chosen.
        let mut order: Vec<u32> = (0..l.len() as u32).collect();
        order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        let top: Vec<u32> = order[..5].to_vec();
        assert!(l[top[4] as usize] == kth);
        only_allowed(SamplingParams { temperature: 1.5, top_k: 5, seed: 1, ..Default::default() }, |t, _| {
            top.contains(&t)
        });
    }

    #[test]
    fn top_p_and_min_p_never_emit_unlikely_tokens() {
        let params = SamplingParams { temperature: 1.0, top_p: 0.6, seed: 2, ..Default::default() };
        let allowed: Vec<u32> = Sampler::new(params.clone()).candidates(&logits(), &[]).iter().map(|c| c.0).collect();
        let mass: f64 = {
            let l = logits();
            let m = l.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let z: f64 = l.iter().map(|&x| (x as f64 - m).exp()).sum();
            allowed.iter().map(|&t| (l[t as usize] as f64 - m).exp() / z).sum()
        };
        assert!(mass >= 0.6 && allowed.len() < 50);
        only_allowed(params, |t, _| allowed.contains(&t));
        only_allowed(SamplingParams { temperature: 1.0, min_p: 0.3, seed: 3, ..Default::default() }, |t, l| {
            let m = l.iter().cloned().fold(f32::MIN, f32::max);
            ((l[t as usize] - m) as f64).exp() >= 0.3 - 1e-9
        });
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let l = vec![2.0, 1.9, -1.0];
        let s = Sampler::new(SamplingParams { repetition_penalty: 1.3, ..Default::default() });
        assert_eq!(s.candidates(&l, &[0])[0].0, 1);
        let s = Sampler::new(SamplingParams { frequency_penalty: 0.2, ..Default::default() });
        assert_eq!(s.candidates(&l, &[0])[0].0, 1);
        let s = Sampler::new(SamplingParams { presence_penalty: 0.2, ..Default::default() });
        assert_eq!(s.candidates(&l, &[0])[0].0, 1);
    }
}
