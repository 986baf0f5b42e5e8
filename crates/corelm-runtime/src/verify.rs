//! Agreement of two models over the same tokens: top-1 agreement, logit error, KL divergence
//! and each model's perplexity on the text.

use corelm_contract::driver::{argmax, LanguageModel};
use serde::Serialize;

/// Figures comparing a package's logits with a reference's, position by position.
#[derive(Debug, Default, Serialize)]
pub struct Agreement {
    pub positions: usize,
    pub top1_agreement: f64,
    pub max_abs_logit_error: f64,
    /// Mean KL(reference ‖ package) over positions, in nats.
    pub mean_kl: f64,
    pub perplexity_package: f64,
    pub perplexity_reference: f64,
    /// Positions where the package gave a NaN or infinite logit: a broken package (an fp16
    /// overflow, a fully masked row), never a matter of tolerance.
    pub non_finite_positions: usize,
    /// Each compared position in order (for paired comparisons of two packages against one
    /// reference); not part of the summary JSON.
    #[serde(skip)]
    pub per_position: Vec<PositionScore>,
}

/// One position's figures.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PositionScore {
    /// KL(reference ‖ package), in nats.
    pub kl: f64,
    /// The package's top token is the reference's.
    pub top1: bool,
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// Running sums over windows of text; [`Tally::finish`] turns them into an [`Agreement`].
#[derive(Debug, Default)]
pub struct Tally {
    positions: usize,
    agree: usize,
    max_err: f64,
    kl: f64,
    nll_package: f64,
    nll_reference: f64,
    scored: usize,
    non_finite: usize,
    per_position: Vec<PositionScore>,
}

impl Tally {
    /// Adds the logits rows of one window of `tokens` (row i predicts token i+1); `reference`
    /// may be empty to score the package alone.
    pub fn add(&mut self, tokens: &[u32], package: &[Vec<f32>], reference: &[Vec<f32>]) {
        for (i, p) in package.iter().enumerate() {
            self.non_finite += p.iter().any(|v| !v.is_finite()) as usize;
            let lp = log_softmax(p);
            let r = reference.get(i);
            let lr = r.map(|r| log_softmax(r));
            if let (Some(r), Some(lr)) = (r, &lr) {
                let top1 = argmax(p) == argmax(r);
                let kl = lr.iter().zip(&lp).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
                self.positions += 1;
                self.agree += top1 as usize;
                self.max_err = p.iter().zip(r).map(|(a, b)| (a - b).abs() as f64).fold(self.max_err, f64::max);
                self.kl += kl;
                self.per_position.push(PositionScore { kl, top1 });
            }
            if let Some(&next) = tokens.get(i + 1) {
                self.nll_package -= lp[next as usize];
                if let Some(lr) = &lr {
                    self.nll_reference -= lr[next as usize];
                }
                self.scored += 1;
            }
        }
    }

    /// Tokens scored so far.
    pub fn scored(&self) -> usize {
        self.scored
    }

    pub fn finish(&self) -> Agreement {
        let ppl = |nll: f64| if self.scored == 0 { f64::NAN } else { (nll / self.scored as f64).exp() };
        let per_position = |x: f64| if self.positions == 0 { f64::NAN } else { x / self.positions as f64 };
        Agreement {
            positions: self.positions,
            top1_agreement: per_position(self.agree as f64),
            max_abs_logit_error: self.max_err,
            mean_kl: per_position(self.kl),
            perplexity_package: ppl(self.nll_package),
            perplexity_reference: if self.positions == 0 { f64::NAN } else { ppl(self.nll_reference) },
            non_finite_positions: self.non_finite,
            per_position: self.per_position.clone(),
        }
    }
}

/// Token ids that exercise a package on a few positions: the pad id first (the driver pads
/// partial chunks with it, so a bad row of it reaches every chunk), then ids spread over the
/// whole vocabulary.
pub fn probe_ids(vocab: usize, pad: Option<u32>, len: usize) -> Vec<u32> {
    let vocab = vocab.max(1) as u64;
    let spread = (0..len as u64).map(|k| ((k * 7919 + 1) % vocab) as u32);
    pad.into_iter().chain(spread).take(len).collect()
}

/// The first row holding a NaN or an infinite logit.
pub fn first_non_finite(rows: &[Vec<f32>]) -> Option<usize> {
    rows.iter().position(|r| r.iter().any(|v| !v.is_finite()))
}

/// Compares logits rows for `tokens` (row i predicts token i+1).
pub fn compare(tokens: &[u32], package: &[Vec<f32>], reference: &[Vec<f32>]) -> Agreement {
    let n = package.len().min(reference.len());
    let mut t = Tally::default();
    t.add(tokens, &package[..n], &reference[..n]);
    t.finish()
}

/// Scores `tokens` in consecutive windows of at most `window` tokens, each from an empty
/// cache (perplexity at that context, as is usual for fixed-context models), through `package`
/// and, when given, `reference`. `progress` hears the tokens done after each window.
pub fn score_windows(
    tokens: &[u32],
    window: usize,
    package: &mut LanguageModel,
    mut reference: Option<&mut LanguageModel>,
    progress: &mut dyn FnMut(usize),
) -> crate::Result<Tally> {
    let mut tally = Tally::default();
    let mut done = 0;
    for chunk in tokens.chunks(window.max(2)) {
        if chunk.len() < 2 {
            break;
        }
        package.reset()?;
        let got = package.feed(chunk)?;
        let want = match reference.as_deref_mut() {
            Some(r) => {
                r.reset()?;
                r.feed(chunk)?
            }
            None => Vec::new(),
        };
        tally.add(chunk, &got, &want);
        done += chunk.len();
        progress(done);
    }
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_logits_agree_fully() {
        let rows = vec![vec![1.0, 2.0, 0.5], vec![0.1, 0.2, 3.0]];
        let a = compare(&[0, 1, 2], &rows, &rows);
        assert_eq!(a.top1_agreement, 1.0);
        assert_eq!(a.max_abs_logit_error, 0.0);
        assert!(a.mean_kl.abs() < 1e-12);
        // Row 0 predicts token 1 with p = e^2 / (e + e^2 + e^0.5).
        let p1 = 2f64.exp() / (1f64.exp() + 2f64.exp() + 0.5f64.exp());
        let p2 = 3f64.exp() / (0.1f64.exp() + 0.2f64.exp() + 3f64.exp());
        assert!((a.perplexity_package - (-(p1.ln() + p2.ln()) / 2.0).exp()).abs() < 1e-9);
    }

    #[test]
    fn windows_add_up_like_one_pass() {
        let rows: Vec<Vec<f32>> = (0..6).map(|i| vec![i as f32, 1.0, -(i as f32)]).collect();
        let tokens = [0, 1, 2, 0, 1, 2];
        let whole = compare(&tokens, &rows, &rows);
        let mut t = Tally::default();
        t.add(&tokens[..3], &rows[..3], &rows[..3]);
        t.add(&tokens[3..], &rows[3..], &rows[3..]);
        let split = t.finish();
        // Row 2 has no next token inside its window: one position fewer is scored.
        assert_eq!((whole.positions, split.positions, t.scored()), (6, 6, 4));
        let mut alone = Tally::default();
        alone.add(&tokens[..3], &rows[..3], &[]);
        assert!(alone.finish().perplexity_reference.is_nan() && alone.finish().perplexity_package > 1.0);
    }

    #[test]
    fn disagreement_is_counted() {
        let a = compare(&[0, 0], &[vec![0.0, 1.0]], &[vec![1.0, 0.0]]);
        assert_eq!(a.top1_agreement, 0.0);
        assert_eq!(a.max_abs_logit_error, 1.0);
        assert!(a.mean_kl > 0.0);
    }
}
