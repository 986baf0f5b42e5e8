//! Conformance both ways against coremltools 9, the external reference:
//! packages we write load in its milproto loader and pass `prog.validate()`; packages it writes
//! are read by us and reported as its own spec describes them; blob files are byte-identical.
//!
//! Needs the venv `scripts/setup-python.sh` creates (or `CORELM_PYTHON`). Without it these tests
//! fail, naming the command to run: a conformance test that silently skips proves nothing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use corelm_format::blob::{BlobFile, BlobWriter};
use corelm_format::inspect::Report;
use corelm_format::{samples, DType, Package, Tensor};
use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CORELM_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = workspace().join(".cache/venv/bin/python");
    assert!(venv.exists(), "coremltools venv missing: run scripts/setup-python.sh (or set CORELM_PYTHON)");
    venv
}

/// Runs the oracle script; returns its stdout parsed as JSON (when `json`) and the exit code.
fn oracle(args: &[&str], stdin: Option<&str>) -> (Option<Value>, i32, String) {
    let script = workspace().join("python/coremltools_oracle.py");
    let mut child = Command::new(python())
        .arg(&script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python starts");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (serde_json::from_str(&stdout).ok(), out.status.code().unwrap_or(-1), format!("{stdout}\n{stderr}"))
}

#[test]
fn our_packages_load_and_validate_in_coremltools() {
    let dir = tempfile::tempdir().unwrap();
    let packages = samples::write_all(dir.path()).unwrap();
    let args: Vec<&str> = std::iter::once("validate").chain(packages.iter().map(|p| p.to_str().unwrap())).collect();
    let (json, code, text) = oracle(&args, None);
    let json = json.unwrap_or_else(|| panic!("oracle printed no JSON:\n{text}"));
    for (p, result) in packages.iter().zip(json["packages"].as_array().unwrap()) {
        assert_eq!(result["ok"], true, "coremltools rejects {}: {}", p.display(), result["error"]);
        // Every function we wrote was loaded and validated.
        let ours = Package::open(p).unwrap();
        let theirs: Vec<&String> = result["functions"].as_object().unwrap().keys().collect();
        let mine: Vec<&String> = ours.model().program.functions.keys().collect();
        assert_eq!(theirs, mine, "{}", p.display());
    }
    assert_eq!(code, 0, "{text}");
}

#[test]
fn coremltools_rejects_what_we_break() {
    // The oracle is not a rubber stamp: a package with a corrupted blob fails there too.
    let dir = tempfile::tempdir().unwrap();
    let pkg = samples::kv_cache(&dir.path().join("k.mlpackage")).unwrap();
    let bin = pkg.join("Data/com.apple.CoreML/weights/weight.bin");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[64] = 0;
    std::fs::write(&bin, bytes).unwrap();
    let (json, code, text) = oracle(&["validate", pkg.to_str().unwrap()], None);
    assert_eq!(code, 1, "{text}");
    assert_eq!(json.unwrap()["packages"][0]["ok"], false);
}

fn features(v: &Value) -> Vec<(String, String, Vec<u64>, Value)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let shape = f["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
            (f["name"].as_str().unwrap().into(), f["dtype"].as_str().unwrap().into(), shape, f["flexibility"].clone())
        })
        .collect()
}

#[test]
fn we_read_coremltools_packages_as_its_spec_describes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_, code, text) = oracle(&["make-packages", dir.path().to_str().unwrap()], None);
    assert_eq!(code, 0, "{text}");
    let expected: Value = serde_json::from_slice(&std::fs::read(dir.path().join("expected.json")).unwrap()).unwrap();
    let expected = expected.as_object().unwrap();
    assert!(expected.len() >= 4, "stateful, int4 per-block, 4-bit LUT and multifunction expected");
    for (name, want) in expected {
        let pkg = Package::open(dir.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let issues = pkg.validate();
        assert!(issues.is_empty(), "{name}: our validator objects to a coremltools package: {issues:#?}");
        let report = Report::new(&pkg).unwrap();
        let got = serde_json::to_value(&report).unwrap();
        assert_eq!(report.spec_version as u64, want["spec_version"].as_u64().unwrap(), "{name}");
        assert_eq!(report.default_function.as_deref().unwrap_or("main"), want["default_function"], "{name}");
        assert_eq!(got["metadata"]["user_defined"], want["metadata_user_defined"], "{name}");
        let files: BTreeMap<String, u64> = report.weights.files.iter().map(|f| (f.path.clone(), f.bytes)).collect();
        let want_files: BTreeMap<String, u64> =
            want["weight_files"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
        assert_eq!(files, want_files, "{name}");
        let want_functions = want["functions"].as_object().unwrap();
        assert_eq!(report.functions.len(), want_functions.len(), "{name}");
        for (fname, wf) in want_functions {
            let gf = &got["functions"][fname];
            for key in ["inputs", "outputs", "states"] {
                assert_eq!(features(&gf[key]), features(&wf[key]), "{name} {fname} {key}");
            }
            assert_eq!(gf["op_histogram"], wf["op_histogram"], "{name} {fname}");
            let dtypes: Vec<String> = report.weights.bytes_by_dtype.keys().cloned().collect();
            let want_dtypes: Vec<String> =
                wf["weight_dtypes"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
            assert_eq!(dtypes, want_dtypes, "{name} {fname}");
        }
    }
}

/// The tensor a reference blob entry describes.
fn tensor_of(entry: &Value) -> Tensor {
    let dtype = DType::from_name(entry["dtype"].as_str().unwrap()).unwrap();
    if dtype == DType::Fp16 {
        let bits: Vec<u8> =
            entry["bits"].as_array().unwrap().iter().flat_map(|b| (b.as_u64().unwrap() as u16).to_le_bytes()).collect();
        return Tensor::from_bytes(dtype, vec![bits.len() / 2], bits).unwrap();
    }
    let values = entry["values"].as_array().unwrap();
    if dtype == DType::Fp32 {
        let v: Vec<f32> = values.iter().map(|x| x.as_f64().unwrap() as f32).collect();
        return Tensor::from_f32(vec![v.len()], &v).unwrap();
    }
    let v: Vec<i64> = values.iter().map(|x| x.as_i64().unwrap()).collect();
    Tensor::from_ints(dtype, vec![v.len()], &v).unwrap()
}

#[test]
fn blob_files_are_byte_identical_to_coremltools_and_each_side_reads_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs");
    let (_, code, text) = oracle(&["blobs", theirs.to_str().unwrap()], None);
    assert_eq!(code, 0, "{text}");
    let index: Value = serde_json::from_slice(&std::fs::read(theirs.join("blobs.json")).unwrap()).unwrap();
    let mut dtypes_seen = std::collections::BTreeSet::new();
    for (file, entries) in index["files"].as_object().unwrap() {
        let entries = entries.as_array().unwrap();
        // Our writer, same arrays, same order: same bytes.
        let ours = dir.path().join(format!("ours-{file}"));
        let mut w = BlobWriter::create(&ours).unwrap();
        for e in entries {
            let t = tensor_of(e);
            dtypes_seen.insert(t.dtype());
            assert_eq!(w.append(&t).unwrap(), e["offset"].as_u64().unwrap(), "{file}: offsets differ");
        }
        w.finish().unwrap();
        let (a, b) = (std::fs::read(&ours).unwrap(), std::fs::read(theirs.join(file)).unwrap());
        assert_eq!(a.len(), b.len(), "{file}: sizes differ");
        let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
        assert_eq!(first_diff, None, "{file}: first differing byte");
        // Our reader reads their file.
        let reader = BlobFile::open(theirs.join(file)).unwrap();
        for e in entries {
            let t = tensor_of(e);
            let read = reader.read(e["offset"].as_u64().unwrap(), t.dtype(), t.shape()).unwrap();
            assert_eq!(read, t, "{file} @{}", e["offset"]);
        }
        // Their reader reads our file.
        let request: Vec<Value> =
            entries.iter().map(|e| serde_json::json!({"dtype": e["dtype"], "offset": e["offset"]})).collect();
        let (json, code, text) =
            oracle(&["read-blob", ours.to_str().unwrap()], Some(&Value::from(request).to_string()));
        assert_eq!(code, 0, "{text}");
        for (e, values) in entries.iter().zip(json.unwrap().as_array().unwrap()) {
            let key = if e["dtype"] == "fp16" { "bits" } else { "values" };
            assert_eq!(values, &e[key], "{file} @{}: coremltools reads our blob differently", e["offset"]);
        }
    }
    let expected: Vec<DType> = [
        "fp16", "fp32", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int4", "uint1", "uint2", "uint3",
        "uint4", "uint6",
    ]
    .iter()
    .map(|n| DType::from_name(n).unwrap())
    .collect();
    assert_eq!(dtypes_seen, expected.into_iter().collect(), "every dtype both writers share is covered");
}
