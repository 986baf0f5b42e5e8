//! Numerical parity with transformers (float32, eager) on real pretrained weights: SmolLM2-135M
//! and Gemma-3-270M, both from their GGUF registry packages (scripts/fetch-models.sh), with
//! references from python/make_fixtures.py. The Gemma prompt (625 tokens) is longer than its
//! 512-token sliding window.

use std::path::{Path, PathBuf};

use corelm_contract::driver::{argmax, LanguageModel};
use corelm_convert::convert::{convert, open_source};
use corelm_convert::graph::{AttentionImpl, GraphOptions, Precision};
use corelm_format::package::WriteOptions;
use corelm_format::{Package, Target};
use corelm_interp::Interpreter;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model(name: &str) -> PathBuf {
    let p = root().join(".cache/models").join(name);
    assert!(p.exists(), "{} missing: run scripts/fetch-models.sh", p.display());
    p
}

fn check(fixture: &str, gguf: &str, context: usize) {
    let dir = root().join("tests/fixtures/real").join(fixture);
    let r: Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let source = open_source(&model(gguf)).unwrap();
    for precision in [Precision::Fp32, Precision::Fp16] {
        let out = tmp.path().join(format!("{fixture}-{precision:?}.mlpackage"));
        let opts = GraphOptions {
            target: Target::Ios18,
            context,
            query_lengths: vec![],
            attention: AttentionImpl::Fused,
            precision,
            compress: Default::default(),
            profile: Default::default(),
            chunks: 1,
        };
        convert(&source, &out, &opts, &WriteOptions::overwriting(), &mut |_: &str, _: u64| {}).unwrap();
        let pkg = Package::open(&out).unwrap();
        for prompt in r["prompts"].as_array().unwrap() {
            let ids: Vec<u32> =
                prompt["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let want_argmax: Vec<usize> =
                prompt["argmax"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let greedy: Vec<u32> =
                prompt["greedy_ids"].as_array().unwrap().iter().take(16).map(|v| v.as_u64().unwrap() as u32).collect();
            let bytes = std::fs::read(dir.join(prompt["last_logits_file"].as_str().unwrap())).unwrap();
            let want_last: Vec<f32> =
                bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let range = want_last.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
                - want_last.iter().cloned().fold(f32::INFINITY, f32::min);

            let mut lm = LanguageModel::open(&pkg, Interpreter::load).unwrap();
            let rows = lm.feed(&ids).unwrap();
            let agree = rows.iter().zip(&want_argmax).filter(|(row, &a)| argmax(row) == a).count();
            let last = rows.last().unwrap();
            let err = last.iter().zip(&want_last).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            let mut next = argmax(last) as u32;
            let mut matched = 0;
            for (i, &want) in greedy.iter().enumerate() {
                if next != want {
                    break;
                }
                matched += 1;
                if i + 1 < greedy.len() {
                    next = argmax(&lm.feed(&[next]).unwrap()[0]) as u32;
                }
            }
            println!(
                "{fixture:<12} {:<6} {precision:?}: {} tokens, argmax {agree}/{}, max|Δ| {err:.3e} ({:.2e} of range {range:.1}), greedy match {matched}/{}",
                prompt["name"].as_str().unwrap(),
                ids.len(),
                rows.len(),
                err / range,
                greedy.len()
            );
            if precision == Precision::Fp32 {
                assert_eq!(agree, rows.len(), "{fixture}: argmax differs at some prompt position");
                assert_eq!(matched, greedy.len(), "{fixture}: greedy continuation differs");
                assert!(err < 1e-3 * range, "{fixture}: last logits off by {err} (range {range})");
            }
        }
    }
}

#[test]
fn smollm2_matches_transformers() {
    check("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 256);
}

#[test]
fn gemma3_270m_matches_transformers_past_its_sliding_window() {
    check("gemma3_270m", "gemma-3-270m-q4_k_m.gguf", 704);
}
