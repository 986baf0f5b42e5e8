//! `corelm eval` against transformers' perplexity on the committed evaluation text, and
//! `corelm compress` on our packages and on a coremltools-made one (plus its bad inputs).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn corelm(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_corelm")).args(args).output().unwrap();
    (o.status.code().unwrap(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

fn ok_json(args: &[&str]) -> Value {
    let (code, stdout, stderr) = corelm(args);
    assert_eq!(code, 0, "corelm {args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("corelm {args:?}: {e}: {stdout}"))
}

fn smollm2() -> PathBuf {
    let p = root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} missing: run scripts/fetch-models.sh", p.display());
    p
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Same tokens, same windows (512, each from an empty cache): the float32 conversion's
/// perplexity equals transformers' (python/make_fixtures.py eval); the fp16 one is close.
#[test]
fn eval_matches_transformers_perplexity() {
    let fixture: Value = serde_json::from_slice(
        &std::fs::read(root().join("tests/fixtures/real/smollm2/eval_perplexity.json")).unwrap(),
    )
    .unwrap();
    let text = root().join(fixture["text_file"].as_str().unwrap());
    let window = fixture["window"].as_u64().unwrap().to_string();
    let max_tokens = fixture["max_tokens"].as_u64().unwrap().to_string();
    let want = fixture["perplexity"].as_f64().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (precision, tolerance) in [("fp32", 1e-4), ("fp16", 1e-2)] {
        let pkg = tmp.path().join(format!("{precision}.mlpackage"));
        ok_json(&[
            "convert",
            path(&smollm2()),
            "-o",
            path(&pkg),
            "--context",
            &window,
            "--precision",
            precision,
            // transformers dequantizes the GGUF: compare like for like.
            "--dequantize",
            "--json",
        ]);
        let got = ok_json(&[
            "eval",
            path(&pkg),
            "--text",
            path(&text),
            "--window",
            &window,
            "--max-tokens",
            &max_tokens,
            "--json",
        ]);
        assert_eq!(got["scored"], fixture["scored"], "{precision}: same tokens, same windows");
        let ppl = got["perplexity"].as_f64().unwrap();
        println!("{precision}: perplexity {ppl:.4} vs transformers {want:.4}");
        assert!((ppl - want).abs() <= tolerance * want, "{precision}: {ppl} vs {want}");
    }
}

/// Compressing our fp16 package gives a valid, smaller package that keeps the tokenizer and
/// stays close to the original (int8: top-1 agreement ≥ 95% on the built-in paragraph).
#[test]
fn compress_our_package() {
    let tmp = tempfile::tempdir().unwrap();
    let fp16 = tmp.path().join("fp16.mlpackage");
    ok_json(&["convert", path(&smollm2()), "-o", path(&fp16), "--context", "256", "--dequantize", "--json"]);
    let int8 = tmp.path().join("int8.mlpackage");
    let s = ok_json(&["compress", path(&fp16), "-o", path(&int8), "--quantize", "int8", "--json"]);
    // 30 layers × 7 matrices, and the embedding shared with the tied LM head.
    assert_eq!((s["compressed"].as_u64(), s["kept"].as_u64()), (Some(211), Some(0)));
    assert!(s["output_bytes"].as_f64().unwrap() < 0.55 * s["input_bytes"].as_f64().unwrap(), "{s}");
    let a = ok_json(&["verify", path(&int8), "--against", path(&fp16), "--json"]);
    println!("int8 vs fp16: {a}");
    assert!(a["top1_agreement"].as_f64().unwrap() >= 0.95, "{a}");
    let (code, text, err) =
        corelm(&["run", path(&int8), "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("Paris"), "{text}");

    // The Neural Engine layout: 1×1 convs whose weights pass through expand_dims are found too.
    let ane = tmp.path().join("ane.mlpackage");
    ok_json(&[
        "convert",
        path(&smollm2()),
        "-o",
        path(&ane),
        "--context",
        "256",
        "--profile",
        "ane",
        "--dequantize",
        "--json",
    ]);
    let ane8 = tmp.path().join("ane-int8.mlpackage");
    let s = ok_json(&["compress", path(&ane), "-o", path(&ane8), "--quantize", "int8", "--json"]);
    assert_eq!((s["compressed"].as_u64(), s["kept"].as_u64()), (Some(211), Some(0)), "{s}");
    assert!(s["output_bytes"].as_f64().unwrap() < 0.55 * s["input_bytes"].as_f64().unwrap(), "{s}");
    let (code, _, err) = corelm(&["validate", path(&ane8)]);
    assert_eq!(code, 0, "{err}");

    // Bad input: existing output, --dequantize on a package, nothing to do, an iOS 17 package.
    let (code, _, err) = corelm(&["compress", path(&fp16), "-o", path(&int8), "--quantize", "int8"]);
    assert!(code != 0 && err.contains("exists"), "{err}");
    let other = tmp.path().join("other.mlpackage");
    let (code, _, err) = corelm(&["compress", path(&fp16), "-o", path(&other), "--quantize", "int4", "--dequantize"]);
    assert!(code != 0 && err.contains("--dequantize"), "{err}");
    let (code, _, err) = corelm(&["compress", path(&fp16), "-o", path(&other)]);
    assert!(code != 0 && err.contains("--quantize"), "{err}");
    let ios17 = tmp.path().join("ios17.mlpackage");
    ok_json(&[
        "convert",
        path(&smollm2()),
        "-o",
        path(&ios17),
        "--context",
        "64",
        "--target",
        "ios17",
        "--dequantize",
        "--json",
    ]);
    let (code, _, err) = corelm(&["compress", path(&ios17), "-o", path(&other), "--quantize", "int8"]);
    assert!(code != 0 && err.contains("iOS 18") && err.contains("ios17.mlpackage"), "{err}");
    assert!(!other.exists(), "nothing is left behind");
}

/// Calibrated compression (`--calibrate`): the package reads a text first and rounds each
/// layer's integers to keep its outputs close. On a different text than it calibrated on, the
/// int8 package stays closer to fp16 (KL) than the nearest-integer one, at the same size.
#[test]
fn calibrated_compression_is_closer_to_fp16() {
    let tmp = tempfile::tempdir().unwrap();
    let fp16 = tmp.path().join("fp16.mlpackage");
    ok_json(&["convert", path(&smollm2()), "-o", path(&fp16), "--context", "512", "--dequantize", "--json"]);
    let calibration = root().join("bench/data/calibration.txt");
    let eval = root().join("bench/data/eval.txt");
    let mut scores = Vec::new();
    for calibrate in [false, true] {
        let out = tmp.path().join(format!("int8-{calibrate}.mlpackage"));
        let mut args = vec!["compress", path(&fp16), "-o", path(&out), "--quantize", "int8", "--json"];
        if calibrate {
            args.extend(["--calibrate", path(&calibration), "--calibration-tokens", "2048"]);
        }
        let s = ok_json(&args);
        let a = ok_json(&[
            "verify",
            path(&out),
            "--against",
            path(&fp16),
            "--text",
            path(&eval),
            "--max-tokens",
            "1024",
            "--json",
        ]);
        println!("int8 calibrated {calibrate}: KL {} top-1 {}", a["mean_kl"], a["top1_agreement"]);
        scores.push((s["output_bytes"].as_u64().unwrap(), a["mean_kl"].as_f64().unwrap()));
    }
    let ((size, nearest), (calibrated_size, calibrated)) = (scores[0], scores[1]);
    assert_eq!(size, calibrated_size, "the same scales and integers' width");
    assert!(calibrated < 0.9 * nearest, "KL {calibrated} calibrated vs {nearest}");

    // Bad input: a calibration text that is not there.
    let other = tmp.path().join("other.mlpackage");
    let missing = tmp.path().join("missing.txt");
    let (code, _, err) =
        corelm(&["compress", path(&fp16), "-o", path(&other), "--quantize", "int8", "--calibrate", path(&missing)]);
    assert!(code != 0 && err.contains("missing.txt"), "{err}");
    assert!(!other.exists(), "nothing is left behind");
}

/// A package coremltools made from a traced torch module: its linear weights are found and
/// compressed, and it still computes torch's outputs (to int8 precision).
#[test]
fn compress_a_coremltools_package() {
    let fixtures = root().join("tests/fixtures/coremltools");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("int8.mlpackage");
    let s = ok_json(&[
        "compress",
        path(&fixtures.join("stateful_torch.mlpackage")),
        "-o",
        path(&out),
        "--quantize",
        "int8",
        "--json",
    ]);
    assert!(s["compressed"].as_u64().unwrap() >= 4, "{s}");
    let got = ok_json(&["predict", path(&out), "--calls", path(&fixtures.join("calls.json")), "--json"]);
    let want: Value = serde_json::from_slice(&std::fs::read(fixtures.join("expected.json")).unwrap()).unwrap();
    let floats = |t: &Value| -> Vec<f64> { t["data"].as_array().unwrap().iter().filter_map(|x| x.as_f64()).collect() };
    for (g, w) in got.as_array().unwrap().iter().zip(want.as_array().unwrap()) {
        for (name, want_t) in w.as_object().unwrap() {
            let (a, b) = (floats(&g[name]), floats(want_t));
            let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let err = a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
            println!("`{name}`: max error {err:.3e} of {scale:.3}");
            assert!(err <= 0.05 * scale, "`{name}`: {err} vs scale {scale}");
        }
    }
}
