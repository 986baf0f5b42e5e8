//! Numerical parity with Hugging Face transformers (float32, eager attention) for a tiny
//! random-weight checkpoint of every architecture. The checkpoints and reference outputs are
//! made by python/make_fixtures.py and committed under tests/fixtures/tiny.

use std::path::{Path, PathBuf};

use corelm_contract::driver::{argmax, LanguageModel};
use corelm_convert::convert::{convert, open_source};
use corelm_convert::graph::{AttentionImpl, GraphOptions, Precision};
use corelm_format::package::WriteOptions;
use corelm_format::{Package, Target};
use corelm_interp::Interpreter;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

/// Logit error an fp16 conversion may have, as a fraction of the last position's logit range
/// (measured: at most 7.2e-3, on Gemma 2, whose soft-capped logits magnify rounding).
const FP16_TOLERANCE: f32 = 1e-2;

struct Reference {
    prompt: Vec<u32>,
    argmax: Vec<usize>,
    /// Top-1 minus top-2 logit of the reference at each prompt position.
    top2_gap: Vec<f32>,
    last_logits: Vec<f32>,
    range: f32,
    greedy: Vec<u32>,
    /// At each greedy step: the reference's top-1 minus top-2 logit, and its second choice.
    greedy_gap: Vec<f32>,
    greedy_runner_up: Vec<u32>,
}

fn reference(dir: &Path) -> Reference {
    let r: Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let ints = |k: &str| r[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect::<Vec<_>>();
    Reference {
        prompt: ints("prompt_ids").into_iter().map(|v| v as u32).collect(),
        argmax: ints("argmax").into_iter().map(|v| v as usize).collect(),
        top2_gap: r["top2_gap"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect(),
        last_logits: r["last_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect(),
        range: r["logits_range"].as_f64().unwrap() as f32,
        greedy: ints("greedy_ids").into_iter().map(|v| v as u32).collect(),
        greedy_gap: r["greedy_top2_gap"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect(),
        greedy_runner_up: ints("greedy_runner_up").into_iter().map(|v| v as u32).collect(),
    }
}

fn convert_tiny(
    dir: &Path,
    out: &Path,
    precision: Precision,
    attention: AttentionImpl,
    query_lengths: Vec<usize>,
    target: Target,
) -> Package {
    let source = open_source(dir).unwrap();
    let opts = GraphOptions {
        target,
        context: 48,
        query_lengths,
        attention,
        precision,
        compress: Default::default(),
        profile: Default::default(),
        chunks: 1,
    };
    convert(&source, out, &opts, &WriteOptions::overwriting(), &mut |_: &str, _: u64| {}).unwrap();
    Package::open(out).unwrap()
}

struct Figures {
    argmax_agree: usize,
    /// Positions whose argmax differs although the reference's top-2 gap exceeds `margin`.
    argmax_wrong_beyond: Box<dyn Fn(f32) -> usize>,
    positions: usize,
    max_err: f32,
    greedy_match: usize,
    /// Where the continuation parted from the reference's: (step, the reference's top-2 gap
    /// there, whether the package took the reference's second choice).
    parted: Option<(usize, f32, bool)>,
}

fn measure(pkg: &Package, r: &Reference) -> Figures {
    let mut lm = LanguageModel::open(pkg, Interpreter::load).unwrap();
    let rows = lm.feed(&r.prompt).unwrap();
    let argmax_agree = rows.iter().zip(&r.argmax).filter(|(row, &a)| argmax(row) == a).count();
    let disagreeing_gaps: Vec<f32> = rows
        .iter()
        .zip(&r.argmax)
        .zip(&r.top2_gap)
        .filter(|((row, &a), _)| argmax(row) != a)
        .map(|(_, &g)| g)
        .collect();
    let argmax_wrong_beyond = Box::new(move |margin: f32| disagreeing_gaps.iter().filter(|&&g| g > margin).count());
    let last = rows.last().unwrap();
    let max_err = last.iter().zip(&r.last_logits).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    let mut next = argmax(last) as u32;
    let mut greedy_match = 0;
    let mut parted = None;
    for (i, &want) in r.greedy.iter().enumerate() {
        if next != want {
            parted = Some((i, r.greedy_gap[i], next == r.greedy_runner_up[i]));
            break;
        }
        greedy_match += 1;
        if i + 1 < r.greedy.len() {
            next = argmax(&lm.feed(&[next]).unwrap()[0]) as u32;
        }
    }
    Figures { argmax_agree, argmax_wrong_beyond, positions: rows.len(), max_err, greedy_match, parted }
}

/// The fixture as it is (transformers 5's `rope_parameters` layout) and with the committed
/// `config.legacy.json` (transformers 4.x's `rope_theta` + `rope_scaling`, no `layer_types`),
/// which python/make_fixtures.py checked describes the same model; the reference holds for both.
fn layouts(dir: &Path, tmp: &Path) -> Vec<(&'static str, PathBuf)> {
    let name = dir.file_name().unwrap();
    let legacy = tmp.join("legacy").join(name);
    std::fs::create_dir_all(&legacy).unwrap();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let file = entry.file_name();
        if file != "config.json" && file != "config.legacy.json" {
            std::fs::copy(entry.path(), legacy.join(&file)).unwrap();
        }
    }
    std::fs::copy(dir.join("config.legacy.json"), legacy.join("config.json")).unwrap();
    vec![("v5", dir.to_path_buf()), ("v4", legacy)]
}

/// fp32 conversions match transformers to 1e-3 of the logit range, with every argmax and the
/// whole greedy continuation; fp16 ones to [`FP16_TOLERANCE`] of the range, with the argmax
/// wherever the reference's top-2 gap exceeds twice that (a smaller gap is a near-tie fp16
/// rounding may flip) and the whole greedy continuation (where a continuation parts, the
/// report says at what reference gap and whether for the runner-up). Both config layouts.
#[test]
fn every_architecture_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut names: Vec<_> = std::fs::read_dir(fixtures()).unwrap().flatten().map(|e| e.path()).collect();
    names.sort();
    assert!(names.len() >= 9, "fixtures for every architecture expected");
    // CORELM_FIXTURES=a,b: only those (while working on a family).
    if let Ok(only) = std::env::var("CORELM_FIXTURES") {
        let only: Vec<&str> = only.split(',').collect();
        names.retain(|p| only.contains(&p.file_name().unwrap().to_str().unwrap()));
    }
    let mut failures = Vec::new();
    for fixture in names {
        let name = fixture.file_name().unwrap().to_string_lossy().to_string();
        let r = reference(&fixture);
        for (layout, dir) in layouts(&fixture, tmp.path()) {
            for (label, precision, attention) in [
                ("fp32 fused", Precision::Fp32, AttentionImpl::Fused),
                ("fp32 decomposed", Precision::Fp32, AttentionImpl::Decomposed),
                ("fp16 fused", Precision::Fp16, AttentionImpl::Fused),
            ] {
                let out = tmp.path().join(format!("{name}-{layout}-{}.mlpackage", label.replace(' ', "-")));
                let pkg = convert_tiny(&dir, &out, precision, attention, vec![], Target::Ios18);
                let f = measure(&pkg, &r);
                let parted = match f.parted {
                    Some((step, gap, runner_up)) => format!(
                        ", parted at step {step} (reference top-2 gap {gap:.3}, {}the runner-up)",
                        if runner_up { "" } else { "not " }
                    ),
                    None => String::new(),
                };
                println!(
                    "{name:<18} {layout} {label:<16} argmax {}/{}  max|Δ| {:.2e} ({:.2e} of range)  greedy match {}/{}{parted}",
                    f.argmax_agree,
                    f.positions,
                    f.max_err,
                    f.max_err / r.range,
                    f.greedy_match,
                    r.greedy.len()
                );
                let (tolerance, argmax_ok) = match precision {
                    Precision::Fp32 => (1e-3, f.argmax_agree == f.positions),
                    Precision::Fp16 => (FP16_TOLERANCE, (f.argmax_wrong_beyond)(2.0 * FP16_TOLERANCE * r.range) == 0),
                };
                if !argmax_ok || f.max_err >= tolerance * r.range || f.parted.is_some() {
                    failures.push(format!("{name} {layout} {label}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "parity fails for: {failures:?}");
}

/// fp32 conversions of `dir` for every interface corelm writes: a flexible query length, fixed
/// lengths as functions, and caches passed as inputs and outputs (iOS 16), written under `tmp`
/// as `<fixture>-flexible.mlpackage`, ...
fn every_interface(dir: &Path, tmp: &Path) -> Vec<(&'static str, Package)> {
    let name = dir.file_name().unwrap().to_string_lossy();
    [
        ("flexible", vec![], Target::Ios18),
        ("lengths 1,4", vec![1, 4], Target::Ios18),
        ("tensor caches", vec![], Target::Ios16),
    ]
    .into_iter()
    .map(|(label, lengths, target)| {
        let out = tmp.join(format!("{name}-{}.mlpackage", label.replace([' ', ','], "-")));
        (label, convert_tiny(dir, &out, Precision::Fp32, AttentionImpl::Fused, lengths, target))
    })
    .collect()
}

/// The logits of token t+1 after a prefill of t tokens and one decode step equal those of a
/// prefill of t+1 tokens, for every interface corelm writes (flexible, fixed lengths, caches as
/// inputs and outputs).
#[test]
fn prefill_then_decode_equals_full_recompute() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama_rope_llama3", "gemma3_text", "qwen2", "phi3", "gpt2"] {
        let dir = fixtures().join(name);
        let r = reference(&dir);
        for (label, pkg) in every_interface(&dir, tmp.path()) {
            for t in [5, 12, 20] {
                let mut lm = LanguageModel::open(&pkg, Interpreter::load).unwrap();
                lm.feed(&r.prompt[..t]).unwrap();
                let step = lm.feed(&r.prompt[t..t + 1]).unwrap().remove(0);
                let mut full = LanguageModel::open(&pkg, Interpreter::load).unwrap();
                let whole = full.feed(&r.prompt[..t + 1]).unwrap().pop().unwrap();
                let scale = whole.iter().map(|v| v.abs()).fold(0.0, f32::max);
                let err = step.iter().zip(&whole).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                println!("{name:<20} {label:<14} t={t:<3} max|Δ| {err:.2e} ({:.2e} relative)", err / scale);
                assert!(err < 1e-4 * scale, "{name} {label} t={t}: decode differs from recompute by {err}");
            }
        }
    }
}

/// Asking for the last position's logits alone (what generation does) gives that row of the
/// full logits, for every interface; on the interpreter the LM head then computes one row. gemma2
/// ends in a logit soft-cap (div, tanh, mul after the head), which must follow the cut.
#[test]
fn last_position_logits_alone_equal_that_row_of_all() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama_rope_llama3", "gemma2", "gpt2"] {
        let dir = fixtures().join(name);
        let r = reference(&dir);
        for (label, pkg) in every_interface(&dir, tmp.path()) {
            for t in [1, 6, 13] {
                let all =
                    LanguageModel::open(&pkg, Interpreter::load).unwrap().feed(&r.prompt[..t]).unwrap().pop().unwrap();
                let last = LanguageModel::open(&pkg, Interpreter::load).unwrap().feed_last(&r.prompt[..t]).unwrap();
                let scale = all.iter().map(|v| v.abs()).fold(0.0, f32::max);
                let err = last.iter().zip(&all).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert_eq!(last.len(), all.len(), "{name} {label} t={t}");
                assert!(err <= 1e-5 * scale, "{name} {label} t={t}: last row differs by {err}");
            }
        }
        // The flexible package through the interpreter directly: one row of logits comes back.
        let pkg = Package::open(tmp.path().join(format!("{name}-flexible.mlpackage"))).unwrap();
        let interp = Interpreter::load(&pkg).unwrap();
        let mut state = interp.new_state(None).unwrap();
        let n = 7;
        let ids = corelm_interp::value::Value::i32(vec![1, n], r.prompt[..n].iter().map(|&t| t as i32).collect());
        let mask: Vec<f32> = (0..n * n).map(|k| if k % n <= k / n { 0.0 } else { f32::NEG_INFINITY }).collect();
        let mask = corelm_interp::value::Value::f32(corelm_format::DType::Fp32, vec![1, 1, n, n], mask);
        let inputs =
            std::collections::BTreeMap::from([("inputIds".to_string(), ids), ("causalMask".to_string(), mask)]);
        let out = interp.predict_row(None, &inputs, &mut state, n - 1).unwrap();
        let logits = &out["logits"];
        assert_eq!(logits.shape[..2], [1, 1], "{name}: the head computed {:?}", logits.shape);
    }
}

/// Calibration reads every layer's inputs in both layouts: a linear's (…, features) and a 1×1
/// conv's (1, channels, 1, positions) in the Neural Engine profile give the same Σ x xᵀ for
/// each weight, over the same tokens (to fp16 precision: the profiles round differently). So
/// does a package whose KV caches are inputs and outputs (iOS 17), which the calibrating
/// executor carries itself.
#[test]
fn calibration_sees_the_same_inputs_in_both_layouts() {
    use corelm_convert::graph::Profile;
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures().join("llama_rope_llama3");
    let r = reference(&dir);
    let source = open_source(&dir).unwrap();
    let mut grams = Vec::new();
    for (target, profile, lengths) in [
        (Target::Ios18, Profile::Default, vec![]),
        (Target::Ios18, Profile::Ane, vec![1, 8]),
        (Target::Ios17, Profile::Default, vec![]),
    ] {
        let out = tmp.path().join(format!("{target:?}-{profile:?}.mlpackage"));
        let opts = GraphOptions {
            target,
            context: 64,
            query_lengths: lengths,
            attention: AttentionImpl::Fused,
            precision: Precision::Fp16,
            compress: Default::default(),
            profile,
            chunks: 1,
        };
        convert(&source, &out, &opts, &WriteOptions::overwriting(), &mut |_: &str, _: u64| {}).unwrap();
        let pkg = Package::open(&out).unwrap();
        grams.push(corelm_interp::calibrate::input_grams(&pkg, &r.prompt, &mut |_| {}).unwrap());
    }
    let (linear, conv, io_caches) = (&grams[0], &grams[1], &grams[2]);
    // 2 layers × q, k, v, o, gate, up, down.
    let layers: Vec<&String> = linear.keys().filter(|n| n.starts_with("layers_")).collect();
    assert_eq!(layers.len(), 14, "{:?}", linear.keys().collect::<Vec<_>>());
    for name in layers {
        let a = &linear[name];
        for (what, other) in [("a conv", conv), ("an iOS 17 linear", io_caches)] {
            let b = other.get(name).unwrap_or_else(|| panic!("{name} not observed as {what}"));
            assert_eq!(a.len(), b.len(), "{name}");
            let norm = a.iter().map(|v| v * v).sum::<f64>().sqrt();
            let diff = a.iter().zip(b.iter()).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
            assert!(norm > 0.0 && diff < 1e-2 * norm, "{name} as {what}: {diff} of {norm}");
        }
    }
}
