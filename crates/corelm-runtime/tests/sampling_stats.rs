//! Sampling, tested statistically: for fixed logits and history, the frequencies of many seeded
//! draws must match the exact distribution each setting defines, by a chi-square goodness-of-fit
//! test. The expected distributions come from tests/fixtures/sampling/reference.json, written by
//! python/make_sampling_reference.py from the reference definitions (transformers' logits
//! processors, OpenAI's frequency and presence penalties), not from the sampler's code.

use std::path::Path;

use corelm_runtime::sampler::{Sampler, SamplingParams};
use serde::Deserialize;

/// Draws per setting: enough that temperature 0.7 is told from 0.8 by a wide margin (see
/// `the_test_tells_nearby_distributions_apart`), few enough to stay well under a second.
const DRAWS: usize = 40_000;
/// Significance level of each goodness-of-fit test. The draws are seeded, so the outcome is fixed;
/// α only sets how far from the reference the frequencies may stray.
const ALPHA: f64 = 1e-4;
/// Cells expected fewer times than this are pooled, as the chi-square approximation asks.
const MIN_EXPECTED: f64 = 5.0;
const SEED: u64 = 0x5A3D_1E5E_ED00;

#[derive(Deserialize)]
struct Reference {
    logits: Vec<f32>,
    history: Vec<u32>,
    settings: Vec<Setting>,
    power_checks: Vec<PowerCheck>,
}

#[derive(Deserialize)]
struct Setting {
    name: String,
    params: Params,
    probabilities: Vec<f64>,
}

#[derive(Deserialize)]
struct Params {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    frequency_penalty: f32,
    presence_penalty: f32,
}

#[derive(Deserialize)]
struct PowerCheck {
    sampled: String,
    expected: String,
}

impl Setting {
    fn sampling(&self, seed: u64) -> SamplingParams {
        let p = &self.params;
        SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            seed,
        }
    }
}

fn reference() -> Reference {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sampling/reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let r: Reference = serde_json::from_str(&text).expect("reference.json");
    for s in &r.settings {
        assert_eq!(s.probabilities.len(), r.logits.len(), "{}", s.name);
        let total: f64 = s.probabilities.iter().sum();
        assert!((total - 1.0).abs() < 1e-9, "{}: probabilities sum to {total}", s.name);
    }
    r
}

fn setting<'a>(r: &'a Reference, name: &str) -> &'a Setting {
    r.settings.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no setting {name:?}"))
}

/// How often each token came out of `DRAWS` draws.
fn draw(r: &Reference, params: SamplingParams) -> Vec<u64> {
    let mut sampler = Sampler::new(params);
    let mut counts = vec![0u64; r.logits.len()];
    for _ in 0..DRAWS {
        counts[sampler.sample(&r.logits, &r.history).unwrap() as usize] += 1;
    }
    counts
}

/// ln Γ(x) for x ≥ 0.5 (Lanczos, g = 7, n = 9; relative error below 1e-14).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let series = C[0] + (1..9).map(|i| C[i] / (x + i as f64)).sum::<f64>();
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + series.ln()
}

/// The regularized upper incomplete gamma function Q(a, x): a power series below x = a + 1, a
/// continued fraction (modified Lentz) above.
fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let prefactor = (-x + a * x.ln() - ln_gamma(a)).exp();
    if x < a + 1.0 {
        let (mut term, mut sum, mut n) = (1.0 / a, 1.0 / a, a);
        while term.abs() > sum.abs() * 1e-16 {
            n += 1.0;
            term *= x / n;
            sum += term;
        }
        1.0 - sum * prefactor
    } else {
        const TINY: f64 = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let step = d * c;
            h *= step;
            if (step - 1.0).abs() < 1e-16 {
                break;
            }
        }
        prefactor * h
    }
}

/// P(X ≥ x) for X chi-square with `df` degrees of freedom.
fn chi2_sf(x: f64, df: usize) -> f64 {
    gamma_q(df as f64 / 2.0, x / 2.0)
}

/// The x with P(X ≥ x) = α, by bisection.
fn chi2_critical(df: usize, alpha: f64) -> f64 {
    let mut hi = df as f64 + 10.0;
    while chi2_sf(hi, df) > alpha {
        hi *= 2.0;
    }
    let mut lo = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if chi2_sf(mid, df) > alpha {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

struct Fit {
    statistic: f64,
    df: usize,
    critical: f64,
    p_value: f64,
    /// Draws of tokens the reference gives probability 0.
    impossible: u64,
}

/// Pearson's chi-square of `counts` against `probabilities` over `DRAWS` draws. Tokens of
/// probability 0 are left out (their draws are counted in `impossible`); the others are taken from
/// the least expected up, pooled until each cell is expected at least `MIN_EXPECTED` times.
fn chi_square(counts: &[u64], probabilities: &[f64]) -> Fit {
    let n = DRAWS as f64;
    let mut cells: Vec<(f64, u64)> =
        probabilities.iter().zip(counts).filter(|(&p, _)| p > 0.0).map(|(&p, &c)| (p * n, c)).collect();
    cells.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut pooled: Vec<(f64, u64)> = Vec::new();
    let mut pending = (0.0, 0);
    for (expected, observed) in cells {
        pending = (pending.0 + expected, pending.1 + observed);
        if pending.0 >= MIN_EXPECTED {
            pooled.push(pending);
            pending = (0.0, 0);
        }
    }
    if pending.0 > 0.0 {
        match pooled.last_mut() {
            Some(last) => *last = (last.0 + pending.0, last.1 + pending.1),
            None => pooled.push(pending),
        }
    }
    let statistic = pooled.iter().map(|&(e, o)| (o as f64 - e).powi(2) / e).sum();
    let df = pooled.len().saturating_sub(1);
    let impossible = probabilities.iter().zip(counts).filter(|(&p, _)| p == 0.0).map(|(_, &c)| c).sum();
    let (critical, p_value) =
        if df == 0 { (f64::INFINITY, 1.0) } else { (chi2_critical(df, ALPHA), chi2_sf(statistic, df)) };
    Fit { statistic, df, critical, p_value, impossible }
}

#[test]
fn the_chi_square_tail_matches_known_values() {
    // Even degrees of freedom have a closed form: e^(-x/2) Σ_{j<df/2} (x/2)^j / j!.
    for df in [2usize, 4, 10, 30] {
        for x in [0.5, 3.0, 12.0, 40.0, 90.0] {
            let h: f64 = x / 2.0;
            let (mut term, mut sum) = (1.0, 0.0);
            for j in 0..df / 2 {
                if j > 0 {
                    term *= h / j as f64;
                }
                sum += term;
            }
            let exact = (-h).exp() * sum;
            let got = chi2_sf(x, df);
            assert!((got - exact).abs() <= 1e-12 + 1e-10 * exact, "df {df}, x {x}: {got} vs {exact}");
        }
    }
    // Odd: the 5% points of df 1 (1.959963984540054²), 5 and 11 from standard tables.
    for (x, df) in [(3.841_458_820_694_124, 1), (11.070_497_693_516_351, 5), (19.675_137_572_682_495, 11)] {
        assert!((chi2_sf(x, df) - 0.05).abs() < 1e-9, "df {df}: {}", chi2_sf(x, df));
    }
    let c = chi2_critical(7, ALPHA);
    assert!((chi2_sf(c, 7) - ALPHA).abs() < 1e-12);
}

#[test]
fn sampled_frequencies_match_the_reference_distributions() {
    let r = reference();
    let mut failures = Vec::new();
    for (i, s) in r.settings.iter().enumerate() {
        let counts = draw(&r, s.sampling(SEED + i as u64));
        let fit = chi_square(&counts, &s.probabilities);
        println!(
            "{:60} df {:2}  chi2 {:8.3}  critical {:7.3}  p {:.4}",
            s.name, fit.df, fit.statistic, fit.critical, fit.p_value
        );
        if fit.impossible > 0 {
            failures.push(format!("{}: {} draws of tokens of probability 0: {counts:?}", s.name, fit.impossible));
        }
        if fit.df == 0 {
            // One possible token (greedy): every draw must be it.
            let only = s.probabilities.iter().position(|&p| p > 0.0).unwrap();
            if counts[only] != DRAWS as u64 {
                failures.push(format!("{}: expected only token {only}: {counts:?}", s.name));
            }
        } else if fit.statistic.is_nan() || fit.statistic >= fit.critical {
            failures.push(format!(
                "{}: chi2 {:.3} ≥ {:.3} (df {}, p {:.2e} < {ALPHA:e}): {counts:?}",
                s.name, fit.statistic, fit.critical, fit.df, fit.p_value
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The sampler's own probabilities agree with the reference's to float precision (the sampler
/// takes f32 parameters, the reference the decimal ones).
#[test]
fn candidate_probabilities_match_the_reference() {
    let r = reference();
    for s in &r.settings {
        let mut got = vec![0.0; r.logits.len()];
        for (t, q) in Sampler::new(s.sampling(0)).candidates(&r.logits, &r.history) {
            got[t as usize] = q;
        }
        for (t, (&g, &e)) in got.iter().zip(&s.probabilities).enumerate() {
            assert!((g - e).abs() < 1e-6, "{}: token {t}: {g} vs {e}", s.name);
            assert_eq!(g == 0.0, e == 0.0, "{}: token {t}: {g} vs {e}", s.name);
        }
    }
}

/// The test has power: draws from one setting are rejected against a nearby setting's
/// distribution (temperature 0.7 against 0.8; a repetition penalty against none).
#[test]
fn the_test_tells_nearby_distributions_apart() {
    let r = reference();
    for (i, check) in r.power_checks.iter().enumerate() {
        let sampled = setting(&r, &check.sampled);
        let expected = setting(&r, &check.expected);
        let counts = draw(&r, sampled.sampling(SEED + 1000 + i as u64));
        let fit = chi_square(&counts, &expected.probabilities);
        println!(
            "{} against {}: df {}  chi2 {:.3}  critical {:.3}",
            check.sampled, check.expected, fit.df, fit.statistic, fit.critical
        );
        assert!(
            fit.statistic > fit.critical,
            "{} not told from {}: chi2 {:.3} < {:.3}",
            check.sampled,
            check.expected,
            fit.statistic,
            fit.critical
        );
    }
}
