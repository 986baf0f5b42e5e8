//! Hybrid models (recurrent state beside attention: LFM2's short convolutions, Qwen3.5's Gated
//! DeltaNet) against transformers on prompts longer than the delta rule's chunks, and the
//! driver's handling of state that cannot be rewound: snapshots, no padding, fp16 state over
//! thousands of steps. Fixtures from python/make_fixtures.py (`long_check` in reference.json).

use std::path::{Path, PathBuf};

use corelm_contract::driver::{argmax, LanguageModel};
use corelm_convert::convert::{convert, open_source};
use corelm_convert::graph::{AttentionImpl, GraphOptions, Precision};
use corelm_format::package::WriteOptions;
use corelm_format::{Package, Target};
use corelm_interp::Interpreter;
use serde_json::Value;

const HYBRIDS: [&str; 5] = ["lfm2", "lfm2_adjusted", "qwen3_5_text", "qwen3_5", "granite4_h"];

/// As in parity_tiny: an fp16 conversion's logit error as a fraction of the range.
const FP16_TOLERANCE: f32 = 1e-2;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny").join(name)
}

struct LongCheck {
    prompt: Vec<u32>,
    argmax: Vec<usize>,
    top2_gap: Vec<f32>,
    last_logits: Vec<f32>,
    range: f32,
}

fn long_check(name: &str) -> LongCheck {
    let r: Value = serde_json::from_slice(&std::fs::read(fixture(name).join("reference.json")).unwrap()).unwrap();
    let l = &r["long_check"];
    let floats = |k: &str| l[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect::<Vec<_>>();
    let ints = |k: &str| l[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect::<Vec<_>>();
    LongCheck {
        prompt: ints("prompt_ids").into_iter().map(|v| v as u32).collect(),
        argmax: ints("argmax").into_iter().map(|v| v as usize).collect(),
        top2_gap: floats("top2_gap"),
        last_logits: floats("last_logits"),
        range: l["logits_range"].as_f64().unwrap() as f32,
    }
}

fn convert_to(name: &str, out: &Path, precision: Precision, context: usize, query_lengths: Vec<usize>) -> Package {
    let source = open_source(&fixture(name)).unwrap();
    let opts = GraphOptions {
        target: Target::Ios18,
        context,
        query_lengths,
        attention: AttentionImpl::Fused,
        precision,
        compress: Default::default(),
        profile: Default::default(),
        chunks: 1,
    };
    convert(&source, out, &opts, &WriteOptions::overwriting(), &mut |_: &str, _: u64| {}).unwrap();
    Package::open(out).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// 150 tokens (past two 64-token chunks, and for the default lengths through calls of 64, 16,
/// 4 and 1; with lengths 1 and 128, through one call holding two chunks): every argmax and the
/// last logits as transformers computes them in one pass, fp32 to 1e-3 of the range, fp16 to
/// [`FP16_TOLERANCE`] with the argmax wherever the reference's top-2 gap exceeds twice that.
#[test]
fn long_prompts_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for name in HYBRIDS {
        let r = long_check(name);
        for (label, precision, lengths) in [
            ("fp32", Precision::Fp32, vec![]),
            ("fp32 lengths 1,128", Precision::Fp32, vec![1, 128]),
            ("fp16", Precision::Fp16, vec![]),
        ] {
            let out = tmp.path().join(format!("{name}-{}.mlpackage", label.replace([' ', ','], "-")));
            let pkg = convert_to(name, &out, precision, 256, lengths);
            let rows = LanguageModel::open(&pkg, Interpreter::load).unwrap().feed(&r.prompt).unwrap();
            let wrong: Vec<(usize, f32)> = rows
                .iter()
                .zip(&r.argmax)
                .zip(&r.top2_gap)
                .enumerate()
                .filter(|(_, ((row, &a), _))| argmax(row) != a)
                .map(|(i, (_, &gap))| (i, gap))
                .collect();
            let err = max_abs_diff(rows.last().unwrap(), &r.last_logits) / r.range;
            println!(
                "{name:<14} {label:<18} argmax {}/{}  last max|Δ| {err:.2e} of range",
                rows.len() - wrong.len(),
                rows.len()
            );
            let (tolerance, margin) = match precision {
                Precision::Fp32 => (1e-3, 0.0),
                Precision::Fp16 => (FP16_TOLERANCE, 2.0 * FP16_TOLERANCE * r.range),
            };
            if err >= tolerance || wrong.iter().any(|&(_, gap)| gap > margin) {
                failures.push(format!("{name} {label}: {wrong:?}, error {err:.2e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// Feeding t tokens then one gives the logits a fresh prefill of t + 1 gives: the state handed
/// between calls (and, for Qwen3.5, between chunk lengths) is the state one call would reach.
#[test]
fn prefill_then_decode_equals_full_recompute() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["lfm2", "qwen3_5_text", "granite4_h"] {
        let r = long_check(name);
        let pkg = convert_to(name, &tmp.path().join(format!("{name}.mlpackage")), Precision::Fp32, 256, vec![]);
        // Lengths where t + 1 is one call of its own and t is several (Qwen3.5's 4, 16, 64, 128 = 2 × 64).
        for t in [3, 15, 63, 127] {
            let mut lm = LanguageModel::open(&pkg, Interpreter::load).unwrap();
            lm.feed(&r.prompt[..t]).unwrap();
            let step = lm.feed(&r.prompt[t..t + 1]).unwrap().remove(0);
            let whole = LanguageModel::open(&pkg, Interpreter::load).unwrap().feed(&r.prompt[..t + 1]).unwrap();
            let whole = whole.last().unwrap();
            let err = max_abs_diff(&step, whole) / r.range;
            println!("{name:<14} t={t:<4} max|Δ| {err:.2e} of range");
            assert!(err < 1e-5, "{name} t={t}: decode differs from recompute by {err} of the range");
        }
    }
}

/// A recurrent model cannot be rewound by moving the write position: `rewind` refuses, and a
/// snapshot taken before a detour brings back exactly the state before it. An attention-only
/// model rewinds, and continues as if the detour never happened.
#[test]
fn snapshots_restore_what_rewinding_cannot() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["lfm2", "qwen3_5_text", "llama_rope_llama3"] {
        let prompt: Vec<u32> = (0..40u32).map(|i| 3 + (i * 37 + 11) % 120).collect();
        let pkg = convert_to(name, &tmp.path().join(format!("{name}.mlpackage")), Precision::Fp32, 64, vec![]);
        let want = LanguageModel::open(&pkg, Interpreter::load).unwrap().feed(&prompt[..21]).unwrap().pop().unwrap();
        let mut lm = LanguageModel::open(&pkg, Interpreter::load).unwrap();
        lm.feed(&prompt[..20]).unwrap();
        let snapshot = lm.snapshot().unwrap();
        assert_eq!(snapshot.position(), 20);
        lm.feed(&prompt[20..35]).unwrap();
        let rewound = lm.rewind(20);
        assert_eq!(rewound.is_err(), lm.is_recurrent(), "{name}: {rewound:?}");
        if let Err(e) = rewound {
            assert!(e.to_string().contains("cannot be rewound"), "{name}: {e}");
            assert_eq!(lm.position(), 35, "{name}: a refused rewind moves nothing");
            lm.restore(snapshot).unwrap();
        }
        assert_eq!(lm.position(), 20);
        let got = lm.feed(&prompt[20..21]).unwrap().pop().unwrap();
        assert!(max_abs_diff(&got, &want) <= 1e-5 * want.iter().map(|v| v.abs()).fold(0.0, f32::max), "{name}");
        assert!(lm.rewind(50).is_err(), "{name}: rewinding forward");
    }
    let recurrent = ["lfm2", "qwen3_5_text"].map(|n| {
        let pkg = Package::open(tmp.path().join(format!("{n}.mlpackage"))).unwrap();
        LanguageModel::open(&pkg, Interpreter::load).unwrap().is_recurrent()
    });
    assert_eq!(recurrent, [true, true], "the packages say their state is recurrent");
}

/// fp16 state over a long generation: each of 2,000 tokens fed alone, so the fp16 states are
/// rounded after every token (the worst case: prefill keeps a call's state in fp32), against an
/// fp32 package fed the same way. The error (|Δ logit| over that step's range) is reported for
/// windows of steps: it must not grow along the run (steps 1,001 to 2,000 within 1.5 times the
/// worst of the first 1,000) and stay within a few times the fp16 tolerance; every logit stays
/// finite.
#[test]
fn fp16_state_drift_over_2000_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 2000;
    let windows = [(0, 100), (100, 500), (500, 1000), (1000, 2000)];
    for name in ["lfm2", "qwen3_5_text", "granite4_h"] {
        let r = long_check(name);
        let tokens: Vec<u32> = (0..steps).map(|i| r.prompt[i % r.prompt.len()]).collect();
        let mut runs = Vec::new();
        for precision in [Precision::Fp32, Precision::Fp16] {
            let out = tmp.path().join(format!("{name}-{precision:?}.mlpackage"));
            let pkg = convert_to(name, &out, precision, 2048, vec![]);
            let mut lm = LanguageModel::open(&pkg, Interpreter::load).unwrap();
            runs.push(tokens.iter().map(|&t| lm.feed(&[t]).unwrap().remove(0)).collect::<Vec<_>>());
        }
        let errors: Vec<f32> = runs[0]
            .iter()
            .zip(&runs[1])
            .enumerate()
            .map(|(i, (a, b))| {
                assert!(b.iter().all(|v| v.is_finite()), "{name}: non-finite fp16 logits at step {i}");
                let range = a.iter().fold(f32::MIN, |m, &v| m.max(v)) - a.iter().fold(f32::MAX, |m, &v| m.min(v));
                max_abs_diff(a, b) / range
            })
            .collect();
        let worst: Vec<f32> = windows.iter().map(|&(a, b)| errors[a..b].iter().copied().fold(0.0, f32::max)).collect();
        let report: Vec<String> =
            windows.iter().zip(&worst).map(|((a, b), w)| format!("steps {}..{b}: {w:.2e}", a + 1)).collect();
        println!("{name:<14} fp16 vs fp32, worst |Δ logit| / range: {}", report.join(", "));
        // It may settle over the first steps (the state fills); after 1,000 it must not grow.
        let first_half = worst[..3].iter().copied().fold(0.0, f32::max);
        assert!(worst[3] <= 1.5 * first_half, "{name}: the fp16 state's error grows along the run: {report:?}");
        assert!(worst.iter().all(|&w| w < 3.0 * FP16_TOLERANCE), "{name}: {report:?}");
    }
}

/// Calibration reads every linear layer of a hybrid model, the recurrent layers' projections
/// included, through the functions the driver picks (Qwen3.5's fixed lengths). (Qwen3.5's β and
/// decay projections, 4 rows here, are below the size compression takes.)
#[test]
fn calibration_sees_every_layer_of_hybrid_models() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, per_recurrent_layer) in [
        ("lfm2", &["mixerin", "mixerout"][..]),
        ("qwen3_5_text", &["mixerin", "deltagate", "mixerout"]),
        ("granite4_h", &["mixerin", "mixerout"]),
    ] {
        let r = long_check(name);
        let pkg = convert_to(name, &tmp.path().join(format!("{name}.mlpackage")), Precision::Fp16, 256, vec![]);
        let grams = corelm_interp::calibrate::input_grams(&pkg, &r.prompt, &mut |_| {}).unwrap();
        let config: Value = serde_json::from_slice(&std::fs::read(fixture(name).join("config.json")).unwrap()).unwrap();
        for (l, kind) in config["layer_types"].as_array().unwrap().iter().enumerate() {
            let attention: &[&str] =
                if name == "qwen3_5_text" { &["q", "qgate", "k", "v", "o"] } else { &["q", "k", "v", "o"] };
            let roles = if kind == "full_attention" { attention } else { per_recurrent_layer };
            for role in roles.iter().chain(&["gate", "up", "down"]) {
                let key = format!("layers_{l}_{role}");
                assert!(grams.contains_key(&key), "{name}: no calibration inputs for {key}: {:?}", grams.keys());
            }
        }
    }
}
