//! `corelm predict` on packages made by coremltools from a traced PyTorch module with a stateful
//! KV cache (python/make_coremltools_fixture.py): a sequence of calls sharing the state must
//! reproduce torch's logits. Also: bad calls files and unsupported ops give clear errors (exit
//! code 2, no panic).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/coremltools")
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn corelm(args: &[&str]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_corelm")).args(args).output().expect("corelm runs");
    Outcome {
        code: out.status.code().expect("exited, not killed by a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

fn predict(pkg: &Path, calls: &Path, extra: &[&str]) -> Outcome {
    let mut args = vec!["predict", pkg.to_str().unwrap(), "--calls", calls.to_str().unwrap(), "--json"];
    args.extend(extra);
    corelm(&args)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn floats(t: &Value) -> Vec<f64> {
    t["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| match x {
            Value::String(s) if s == "inf" => f64::INFINITY,
            Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
            _ => x.as_f64().expect("a number"),
        })
        .collect()
}

/// Runs `calls` through `pkg` and checks every output of every call against `expected`:
/// max |got − want| ≤ `rel` · max |want| (per output tensor). Returns the largest relative error.
fn check_against_torch(pkg: &str, calls: &str, rel: f64) -> f64 {
    let out = predict(&fixtures().join(pkg), &fixtures().join(calls), &[]);
    assert_eq!(out.code, 0, "predict failed:\n{}", out.stderr);
    let got: Value = serde_json::from_str(&out.stdout).unwrap();
    let want = read_json(&fixtures().join("expected.json"));
    let (got, want) = (got.as_array().unwrap(), want.as_array().unwrap());
    assert_eq!(got.len(), want.len(), "number of calls");
    let mut worst = 0.0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let w = w.as_object().unwrap();
        assert_eq!(g.as_object().unwrap().len(), w.len(), "call {i}: outputs {g} vs {w:?}");
        for (name, want_t) in w {
            let got_t = &g[name];
            assert_eq!(got_t["shape"], want_t["shape"], "call {i}, `{name}`: shape");
            let (a, b) = (floats(got_t), floats(want_t));
            let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let err = a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
            println!(
                "{pkg} call {i} `{name}`: max abs error {err:.3e}, max |torch| {scale:.3}, relative {:.3e}",
                err / scale
            );
            assert!(err <= rel * scale, "{pkg} call {i} `{name}`: max error {err:.3e} exceeds {rel:.0e} · {scale:.3}");
            worst = worst.max(err / scale);
        }
    }
    worst
}

/// FLOAT16 compute: every intermediate is rounded to fp16 (unit roundoff 2^-11 ≈ 4.9e-4), through
/// two layers, and the logits themselves are fp16. Observed ≈ 7e-4 of the logits' magnitude; the
/// bound, 5e-3 (about ten fp16 ulps at the output's scale), leaves room for accumulation-order
/// differences, while a wrong cache history moves logits by ~20% (see `the_state_matters`).
#[test]
fn fp16_package_matches_torch() {
    let worst = check_against_torch("stateful_torch.mlpackage", "calls.json", 5e-3);
    println!("worst relative error {worst:.3e}");
}

/// FLOAT32 compute (the caches stay fp16, as in torch): only summation order differs from torch.
/// Observed ≈ 2e-7 of the logits' magnitude.
#[test]
fn fp32_package_matches_torch() {
    let worst = check_against_torch("stateful_torch_fp32.mlpackage", "calls_fp32.json", 1e-5);
    println!("worst relative error {worst:.3e}");
}

/// The second call (one decode step at position 4) depends on the cache the prefill wrote: run
/// alone, on an empty cache, it must not match torch.
#[test]
fn the_state_matters() {
    let dir = tempfile::tempdir().unwrap();
    let calls = read_json(&fixtures().join("calls.json"));
    let alone = dir.path().join("alone.json");
    fs::write(&alone, json!([calls[1]]).to_string()).unwrap();
    let out = predict(&fixtures().join("stateful_torch.mlpackage"), &alone, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let got: Value = serde_json::from_str(&out.stdout).unwrap();
    let want = &read_json(&fixtures().join("expected.json"))[1]["logits"];
    let (a, b) = (floats(&got[0]["logits"]), floats(want));
    let err = a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    println!("decode step without its prefill: max abs error {err:.3}");
    assert!(err > 0.1, "the output does not depend on the cache (error {err})");
}

/// Runs predict on the fp16 fixture with `calls` (raw text) and checks a clean failure that
/// mentions every string in `expect`.
fn assert_bad_calls(calls: &str, extra: &[&str], expect: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calls.json");
    fs::write(&path, calls).unwrap();
    let out = predict(&fixtures().join("stateful_torch.mlpackage"), &path, extra);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.code, 2, "expected exit code 2:\n{text}");
    assert!(!text.contains("panicked"), "panicked:\n{text}");
    for e in expect {
        assert!(text.contains(e), "the message does not say `{e}`:\n{text}");
    }
}

/// One call with the given `input_ids` and `causal_mask` tensors.
fn call(ids: Value, mask: Value) -> String {
    json!([{ "input_ids": ids, "causal_mask": mask }]).to_string()
}

fn ids() -> Value {
    json!({"shape": [1, 1], "dtype": "int32", "data": [3]})
}

fn mask() -> Value {
    json!({"shape": [1, 1, 1, 1], "dtype": "fp16", "data": [0]})
}

#[test]
fn a_sound_single_call_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calls.json");
    fs::write(&path, call(ids(), mask())).unwrap();
    let out = predict(&fixtures().join("stateful_torch.mlpackage"), &path, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

#[test]
fn calls_not_json() {
    assert_bad_calls("[{not json", &[], &["calls.json", "not valid JSON"]);
}

#[test]
fn calls_not_a_list() {
    assert_bad_calls(r#"{"input_ids": {}}"#, &[], &["calls.json", "expected a JSON list of calls"]);
}

#[test]
fn input_the_model_lacks() {
    let calls = json!([{"input_ids": ids(), "causal_mask": mask(), "tokens": ids()}]).to_string();
    assert_bad_calls(&calls, &[], &["call 0", "no input `tokens`", "input_ids", "causal_mask"]);
}

#[test]
fn missing_input() {
    let calls = json!([{ "input_ids": ids() }]).to_string();
    assert_bad_calls(&calls, &[], &["call 0", "`causal_mask`", "missing"]);
}

#[test]
fn wrong_dtype() {
    let ids = json!({"shape": [1, 1], "dtype": "fp32", "data": [3.0]});
    assert_bad_calls(&call(ids, mask()), &[], &["input `input_ids` must be int32, got fp32"]);
}

#[test]
fn unknown_dtype() {
    let ids = json!({"shape": [1, 1], "dtype": "int64", "data": [3]});
    assert_bad_calls(&call(ids, mask()), &[], &["input `input_ids`", "int64", "not one of"]);
}

#[test]
fn wrong_rank() {
    let ids = json!({"shape": [1, 1, 1], "dtype": "int32", "data": [3]});
    assert_bad_calls(&call(ids, mask()), &[], &["input `input_ids` has shape [1, 1, 1]", "[1, ?]"]);
}

#[test]
fn shape_outside_the_flexible_range() {
    // The mask's key length may be 1..=16 (the cache length).
    let mask = json!({"shape": [1, 1, 1, 17], "dtype": "fp16", "data": vec![0; 17]});
    assert_bad_calls(&call(ids(), mask), &[], &["input `causal_mask` has shape [1, 1, 1, 17]", "ranges"]);
}

#[test]
fn data_length_not_matching_shape() {
    let ids = json!({"shape": [1, 2], "dtype": "int32", "data": [3]});
    assert_bad_calls(&call(ids, mask()), &[], &["call 0", "input `input_ids`", "1 elements for shape [1, 2]"]);
}

#[test]
fn no_such_function() {
    assert_bad_calls(&call(ids(), mask()), &["--function", "decode"], &["no function `decode`", "main"]);
}

/// Copies a package folder.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

#[test]
fn unsupported_op_is_named() {
    use corelm_format::proto;
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("m.mlpackage");
    copy_dir(&fixtures().join("stateful_torch.mlpackage"), &pkg);
    let path = pkg.join("Data/com.apple.CoreML/model.mlmodel");
    let mut model = proto::Model::decode(fs::read(&path).unwrap().as_slice()).unwrap();
    let mut renamed = 0;
    if let Some(proto::model::Type::MlProgram(p)) = &mut model.r#type {
        for f in p.functions.values_mut() {
            for block in f.block_specializations.values_mut() {
                for op in block.operations.iter_mut().filter(|op| op.r#type == "silu") {
                    op.r#type = "fancy_op".into();
                    renamed += 1;
                }
            }
        }
    }
    assert_eq!(renamed, 1, "the fixture has one silu");
    fs::write(&path, model.encode_to_vec()).unwrap();
    let calls = dir.path().join("calls.json");
    fs::write(&calls, call(ids(), mask())).unwrap();
    let out = predict(&pkg, &calls, &[]);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.code, 2, "{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert!(text.contains("does not support op `fancy_op`"), "{text}");
}

#[test]
fn coremltools_packages_pass_our_validator() {
    for pkg in ["stateful_torch.mlpackage", "stateful_torch_fp32.mlpackage"] {
        let out = corelm(&["validate", fixtures().join(pkg).to_str().unwrap()]);
        assert_eq!(out.code, 0, "{pkg}: {}{}", out.stdout, out.stderr);
    }
}

/// The package declares `logits` without a shape (it is flexible); inspect shows it from the
/// program at the inputs' range ends: torch's logits are (1, query length, 64), the query 1..16.
#[test]
fn inspect_shows_the_flexible_output_shape() {
    let pkg = fixtures().join("stateful_torch.mlpackage");
    let o = corelm(&["inspect", pkg.to_str().unwrap()]);
    assert!(
        o.stdout.contains("output logits fp16 [1, 1, 64]  range (1, 1..16, 64)  (from the program)"),
        "{}",
        o.stdout
    );
    let torch_vocab = read_json(&fixtures().join("expected.json"))[0]["logits"]["shape"][2].as_u64().unwrap();
    assert_eq!(torch_vocab, 64);
    let o = corelm(&["inspect", "--json", pkg.to_str().unwrap()]);
    let report: Value = serde_json::from_str(&o.stdout).unwrap();
    let logits = &report["functions"]["main"]["outputs"][0];
    assert_eq!(logits["shape"], serde_json::json!([]), "the description's own shape stays as declared");
    let derived = &logits["from_program"];
    assert_eq!(derived["shape"], serde_json::json!([1, 1, 64]));
    assert_eq!(derived["flexibility"]["ranges"], serde_json::json!([[1, 1], [1, 16], [64, 64]]));
}
