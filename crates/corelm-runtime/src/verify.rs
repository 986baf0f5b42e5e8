//! Agreement of two models over the same tokens: top-1 agreement, logit error, KL divergence
//! and each model's perplexity on the text.

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
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&x| x as f64 - lse).collect()
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) }).0
}

/// Compares logits rows for `tokens` (row i predicts token i+1).
pub fn compare(tokens: &[u32], package: &[Vec<f32>], reference: &[Vec<f32>]) -> Agreement {
    let n = package.len().min(reference.len());
    if n == 0 {
        return Agreement::default();
    }
    let (mut agree, mut max_err, mut kl, mut nll_p, mut nll_r, mut scored) = (0usize, 0f64, 0f64, 0f64, 0f64, 0usize);
    for i in 0..n {
        let (p, r) = (&package[i], &reference[i]);
        agree += (argmax(p) == argmax(r)) as usize;
        max_err = p.iter().zip(r).map(|(a, b)| (a - b).abs() as f64).fold(max_err, f64::max);
        let (lp, lr) = (log_softmax(p), log_softmax(r));
        kl += lr.iter().zip(&lp).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
        if let Some(&next) = tokens.get(i + 1) {
            nll_p -= lp[next as usize];
            nll_r -= lr[next as usize];
            scored += 1;
        }
    }
    let ppl = |nll: f64| if scored == 0 { f64::NAN } else { (nll / scored as f64).exp() };
    Agreement {
        positions: n,
        top1_agreement: agree as f64 / n as f64,
        max_abs_logit_error: max_err,
        mean_kl: kl / n as f64,
        perplexity_package: ppl(nll_p),
        perplexity_reference: ppl(nll_r),
    }
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
    fn disagreement_is_counted() {
        let a = compare(&[0, 0], &[vec![0.0, 1.0]], &[vec![1.0, 0.0]]);
        assert_eq!(a.top1_agreement, 0.0);
        assert_eq!(a.max_abs_logit_error, 1.0);
        assert!(a.mean_kl > 0.0);
    }
}
