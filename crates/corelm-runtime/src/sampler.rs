//! Choosing the next token: greedy, or temperature sampling filtered by top-k, top-p and min-p,
//! after repetition, frequency and presence penalties; reproducible from a seed.

use std::collections::HashMap;

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens, and any tied with the k-th (0 = no limit).
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

fn normalize(probs: &mut [(u32, f64)]) {
    let total: f64 = probs.iter().map(|(_, q)| q).sum();
    probs.iter_mut().for_each(|(_, q)| *q /= total);
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
    ///
    /// The steps, their order and their definitions are those of Hugging Face transformers'
    /// `generate` (`_get_logits_processor` in generation/utils.py, which adds the repetition
    /// processor before the warpers and the warpers as temperature, top-k, top-p, min-p; each
    /// defined in generation/logits_process.py), with frequency and presence penalties as OpenAI
    /// defines them and llama.cpp applies them (right after the repetition penalty):
    ///
    /// 1. repetition penalty, once per distinct token in `history`: a negative logit is multiplied
    ///    by it, any other divided (RepetitionPenaltyLogitsProcessor);
    /// 2. `logit -= count × frequency_penalty + (count > 0) × presence_penalty`;
    /// 3. temperature 0: greedy, the lowest id among the largest logits;
    /// 4. `logit / temperature` (TemperatureLogitsWarper);
    /// 5. top-k: drops the logits below the k-th largest, so tokens tied with the k-th all stay
    ///    (TopKLogitsWarper);
    /// 6. top-p over what top-k kept, renormalized: the smallest set of most likely tokens whose
    ///    probability reaches `top_p`, at least one (TopPLogitsWarper); a tie across the cut, which
    ///    transformers leaves to its sort, is cut by token id here;
    /// 7. min-p over what top-p kept: drops tokens less likely than `min_p` × the most likely one
    ///    (MinPLogitsWarper).
    ///
    /// tests/sampling_stats.rs checks the draws against an independent implementation of these
    /// definitions (python/make_sampling_reference.py).
    ///
    /// Nothing sorts the whole vocabulary (262k tokens for Gemma): greedy is one scan, top-k a
    /// selection, top-p sorts a growing prefix until it holds the mass it needs.
    pub fn candidates(&self, logits: &[f32], history: &[u32]) -> Vec<(u32, f64)> {
        let p = &self.params;
        let adjusted = self.penalized(logits, history);
        // Most likely first; among equals, the lowest id.
        let better = |a: &u32, b: &u32| adjusted[*b as usize].total_cmp(&adjusted[*a as usize]).then(a.cmp(b));
        if p.temperature <= 0.0 {
            let best = (0..adjusted.len() as u32).min_by(better).expect("logits are not empty");
            return vec![(best, 1.0)];
        }
        let mut order: Vec<u32> = (0..adjusted.len() as u32).collect();
        if p.top_k > 0 && p.top_k < order.len() {
            sort_best(&mut order, p.top_k, better);
            let kth = adjusted[order[p.top_k - 1] as usize];
            // Tokens tied with the k-th stay too.
            let ties: Vec<u32> = order[p.top_k..].iter().copied().filter(|&i| adjusted[i as usize] >= kth).collect();
            order.truncate(p.top_k);
            order.extend(ties);
        }
        let t = p.temperature as f64;
        let best = order.iter().copied().min_by(better).expect("at least one token");
        let max = adjusted[best as usize];
        let weight = |i: u32| ((adjusted[i as usize] - max) / t).exp();
        let total: f64 = order.iter().map(|&i| weight(i)).sum();
        if p.top_p < 1.0 {
            // Sort a prefix, four times longer each round, until it reaches top_p of the mass.
            let mut k = 64.min(order.len());
            loop {
                sort_best(&mut order, k, better);
                let mut cumulative = 0.0;
                if let Some(cut) = order[..k].iter().position(|&i| {
                    cumulative += weight(i) / total;
                    cumulative >= p.top_p as f64
                }) {
                    order.truncate(cut + 1);
                    break;
                }
                if k == order.len() {
                    break;
                }
                k = (k * 4).min(order.len());
            }
        }
        if p.min_p > 0.0 {
            // Relative to the most likely token, so before or after normalizing alike.
            let floor = p.min_p as f64;
            order.retain(|&i| weight(i) >= floor);
        }
        let k = order.len();
        sort_best(&mut order, k, better);
        let mut probs: Vec<(u32, f64)> = order.iter().map(|&i| (i, weight(i))).collect();
        normalize(&mut probs);
        probs
    }

    /// The logits as f64, after the repetition, frequency and presence penalties.
    fn penalized(&self, logits: &[f32], history: &[u32]) -> Vec<f64> {
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
                *l = if *l < 0.0 { *l * r } else { *l / r };
            }
            *l -= p.frequency_penalty as f64 * n as f64 + p.presence_penalty as f64;
        }
        adjusted
    }

    /// Picks the next token. NaN logits (a model that overflowed fp16, say) are an error, never
    /// a token; so are empty ones.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        if let Some(i) = logits.iter().position(|x| x.is_nan()) {
            return Err(Error::invalid(format!(
                "the model's logits are NaN (first at token {i} of {}): a numeric overflow in the model",
                logits.len()
            )));
        }
        if logits.is_empty() {
            return Err(Error::invalid("the model returned no logits"));
        }
        let probs = self.candidates(logits, history);
        if probs.len() == 1 {
            return Ok(probs[0].0);
        }
        let mut u = self.rng.next_f64();
        for &(t, q) in &probs {
            if u < q {
                return Ok(t);
            }
            u -= q;
        }
        Ok(probs.last().expect("at least one candidate").0)
    }
}

/// Puts the `k` best of `order` first, sorted, leaving the rest after them in any order: a
/// selection (linear) and a sort of `k`, not a sort of everything.
fn sort_best(order: &mut [u32], k: usize, better: impl Fn(&u32, &u32) -> std::cmp::Ordering + Copy) {
    if k < order.len() {
        order.select_nth_unstable_by(k, better);
    }
    order[..k].sort_unstable_by(better);
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
        assert_eq!(Sampler::new(SamplingParams::default()).sample(&l, &[]).unwrap(), best);
    }

    /// NaN logits (an fp16 overflow on the Neural Engine, say) are an error, never the greedy
    /// token (`total_cmp` ranks NaN above everything).
    #[test]
    fn nan_logits_are_an_error_not_a_token() {
        let mut l = logits();
        l[7] = f32::NAN;
        for temperature in [0.0, 1.0] {
            let mut s = Sampler::new(SamplingParams { temperature, ..Default::default() });
            let e = s.sample(&l, &[]).unwrap_err().to_string();
            assert!(e.contains("NaN (first at token 7 of 50)"), "{e}");
        }
        assert!(Sampler::new(SamplingParams::default()).sample(&[], &[]).is_err());
    }

    /// Selection instead of a full sort changes nothing: on a 20 000-token vocabulary with
    /// ties, the candidates equal the definitions applied to the fully sorted vocabulary.
    #[test]
    fn partial_selection_matches_a_full_sort() {
        let l: Vec<f32> = (0..20_000u64).map(|i| ((i * 2_654_435_761) % 1009) as f32 / 97.0).collect();
        let full = |p: &SamplingParams| -> Vec<(u32, f64)> {
            let mut order: Vec<u32> = (0..l.len() as u32).collect();
            order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
            if p.top_k > 0 {
                let kth = l[order[p.top_k - 1] as usize];
                order.retain(|&i| l[i as usize] >= kth);
            }
            let max = l[order[0] as usize] as f64;
            let mut probs: Vec<(u32, f64)> =
                order.iter().map(|&i| (i, ((l[i as usize] as f64 - max) / p.temperature as f64).exp())).collect();
            normalize(&mut probs);
            let mut cumulative = 0.0;
            if let Some(cut) = probs.iter().position(|&(_, q)| {
                cumulative += q;
                cumulative >= p.top_p as f64
            }) {
                probs.truncate(cut + 1);
            }
            let floor = probs[0].1 * p.min_p as f64;
            probs.retain(|&(_, q)| q >= floor);
            normalize(&mut probs);
            probs
        };
        for (top_k, top_p, min_p, temperature) in
            [(0, 0.9, 0.0, 0.7), (0, 0.999, 0.0, 2.0), (40, 1.0, 0.0, 1.0), (40, 0.5, 0.05, 1.0), (0, 1.0, 0.2, 1.0)]
        {
            let p = SamplingParams { temperature, top_k, top_p, min_p, ..Default::default() };
            let (got, want) = (Sampler::new(p.clone()).candidates(&l, &[]), full(&p));
            assert_eq!(got.len(), want.len(), "{p:?}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.0, w.0, "{p:?}");
                assert!((g.1 - w.1).abs() < 1e-9, "{p:?}: {g:?} vs {w:?}");
            }
        }
    }

    #[test]
    fn a_seed_reproduces_the_sequence() {
        let params = SamplingParams { temperature: 1.0, seed: 42, ..Default::default() };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..200).map(|_| s.sample(&logits(), &[]).unwrap()).collect::<Vec<_>>()
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
            let t = s.sample(&l, &[]).unwrap();
            assert!(allowed(t, &l), "token {t} should have been filtered out");
            seen.insert(t);
        }
        assert!(seen.len() > 1, "sampling collapsed to one token");
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_their_ties() {
        let l = logits();
        let mut sorted = l.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        // The 4th largest value is shared by the 3rd, 4th and 5th tokens: all three stay, as in
        // transformers' TopKLogitsWarper.
        let kth = sorted[3];
        let top: Vec<u32> = (0..l.len() as u32).filter(|&t| l[t as usize] >= kth).collect();
        assert_eq!(top.len(), 5, "the fixture should tie at the k-th value");
        let params = SamplingParams { temperature: 1.5, top_k: 4, seed: 1, ..Default::default() };
        let mut kept: Vec<u32> = Sampler::new(params.clone()).candidates(&l, &[]).iter().map(|c| c.0).collect();
        kept.sort();
        assert_eq!(kept, top);
        only_allowed(params, |t, _| top.contains(&t));
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
    fn top_p_cuts_before_min_p() {
        // Probabilities 0.5, 0.3, 0.1, 0.1. Top-p 0.6 keeps the first two and min-p 0.3 (floor
        // 0.15) keeps both; top-p over what min-p kept, renormalized to 0.625, 0.375, would keep
        // only the first.
        let l: Vec<f32> = [0.5f32, 0.3, 0.1, 0.1].iter().map(|p| p.ln()).collect();
        let params = SamplingParams { temperature: 1.0, top_p: 0.6, min_p: 0.3, ..Default::default() };
        let kept: Vec<u32> = Sampler::new(params).candidates(&l, &[]).iter().map(|c| c.0).collect();
        assert_eq!(kept, [0, 1]);
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
