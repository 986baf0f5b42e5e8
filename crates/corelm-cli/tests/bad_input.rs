//! Broken packages: each gives a clear error that names the file and the problem, a non-zero
//! exit code, and never a panic.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Outcome {
    code: i32,
    text: String,
}

fn corelm(args: &[&str]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_corelm")).args(args).output().expect("corelm runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Outcome { code: out.status.code().expect("exited, not killed by a signal"), text }
}

/// A fresh copy of the KV-cache sample to break.
fn sample(dir: &Path) -> PathBuf {
    corelm_format::samples::kv_cache(&dir.join("m.mlpackage")).unwrap()
}

fn weight_bin(pkg: &Path) -> PathBuf {
    pkg.join("Data/com.apple.CoreML/weights/weight.bin")
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut data = fs::read(path).unwrap();
    data[at..at + bytes.len()].copy_from_slice(bytes);
    fs::write(path, data).unwrap();
}

/// Runs both commands that read packages and checks each fails cleanly with `expect` in its output.
fn assert_rejected(pkg: &Path, file: &str, expect: &str) {
    for cmd in ["inspect", "validate"] {
        let out = corelm(&[cmd, pkg.to_str().unwrap()]);
        assert_ne!(out.code, 0, "{cmd} accepted a broken package:\n{}", out.text);
        assert!(!out.text.contains("panicked"), "{cmd} panicked:\n{}", out.text);
        assert!(out.text.contains(file), "{cmd}: the message does not name {file}:\n{}", out.text);
        assert!(out.text.contains(expect), "{cmd}: the message does not say `{expect}`:\n{}", out.text);
    }
}

#[test]
fn sound_package_passes() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    for cmd in ["inspect", "validate"] {
        let out = corelm(&[cmd, pkg.to_str().unwrap()]);
        assert_eq!(out.code, 0, "{}", out.text);
    }
}

#[test]
fn truncated_weight_file() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    let bin = weight_bin(&pkg);
    let data = fs::read(&bin).unwrap();
    fs::write(&bin, &data[..100]).unwrap();
    assert_rejected(&pkg, "weight.bin", "past the end of the file");
}

#[test]
fn weight_file_shorter_than_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    fs::write(weight_bin(&pkg), [0u8; 10]).unwrap();
    assert_rejected(&pkg, "weight.bin", "shorter than its 64-byte header");
}

#[test]
fn wrong_sentinel() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    patch(&weight_bin(&pkg), 64, &[0, 0, 0, 0]);
    assert_rejected(&pkg, "weight.bin", "sentinel 0x00000000, expected 0xdeadbeef");
}

#[test]
fn wrong_storage_version() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    patch(&weight_bin(&pkg), 4, &[1, 0, 0, 0]);
    assert_rejected(&pkg, "weight.bin", "blob storage version 1, expected 2");
}

#[test]
fn data_offset_past_end_of_file() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    patch(&weight_bin(&pkg), 64 + 16, &(1u64 << 40).to_le_bytes());
    assert_rejected(&pkg, "weight.bin", "run past the end of the file");
}

#[test]
fn size_that_overflows() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    patch(&weight_bin(&pkg), 64 + 8, &u64::MAX.to_le_bytes());
    assert_rejected(&pkg, "weight.bin", "run past the end of the file");
}

#[test]
fn blob_of_the_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    patch(&weight_bin(&pkg), 64 + 4, &1u32.to_le_bytes()); // int4 record relabelled fp16
    assert_rejected(&pkg, "weight.bin", "the program expects");
}

fn edit_manifest(pkg: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = pkg.join("Manifest.json");
    let mut json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut json);
    fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
}

fn set_all_paths(pkg: &Path, path: &str) {
    edit_manifest(pkg, |m| {
        for entry in m["itemInfoEntries"].as_object_mut().unwrap().values_mut() {
            entry["path"] = path.into();
        }
    });
}

#[test]
fn manifest_path_with_parent_component() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    set_all_paths(&pkg, "../../etc/passwd");
    assert_rejected(&pkg, "Manifest.json", "must be relative and stay inside Data/");
}

#[test]
fn manifest_absolute_path() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    set_all_paths(&pkg, "/etc/passwd");
    assert_rejected(&pkg, "Manifest.json", "must be relative and stay inside Data/");
}

#[test]
fn manifest_not_json() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    fs::write(pkg.join("Manifest.json"), "{ not json").unwrap();
    assert_rejected(&pkg, "Manifest.json", "not valid JSON");
}

#[test]
fn manifest_newer_format() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    edit_manifest(&pkg, |m| m["fileFormatVersion"] = "2.0.0".into());
    assert_rejected(&pkg, "Manifest.json", "newer than 1.0.0");
}

#[test]
fn missing_root_model() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    fs::remove_file(pkg.join("Data/com.apple.CoreML/model.mlmodel")).unwrap();
    assert_rejected(&pkg, "Manifest.json", "does not exist");
}

#[test]
fn root_identifier_names_no_item() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    edit_manifest(&pkg, |m| m["rootModelIdentifier"] = "no-such-item".into());
    assert_rejected(&pkg, "Manifest.json", "root model identifier no-such-item names no item");
}

#[test]
fn no_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    fs::remove_file(pkg.join("Manifest.json")).unwrap();
    assert_rejected(&pkg, "m.mlpackage", "no Manifest.json");
}

#[test]
fn garbage_protobuf() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    fs::write(pkg.join("Data/com.apple.CoreML/model.mlmodel"), b"\xff\xff\xff\xff garbage \x00\x01").unwrap();
    assert_rejected(&pkg, "model.mlmodel", "not a valid Core ML model protobuf");
}

#[test]
fn program_version_other_than_one() {
    use corelm_format::proto;
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let pkg = sample(dir.path());
    let path = pkg.join("Data/com.apple.CoreML/model.mlmodel");
    let mut model = proto::Model::decode(fs::read(&path).unwrap().as_slice()).unwrap();
    if let Some(proto::model::Type::MlProgram(p)) = &mut model.r#type {
        p.version = 7;
    }
    fs::write(&path, model.encode_to_vec()).unwrap();
    assert_rejected(&pkg, "model.mlmodel", "program version 7");
}

#[test]
fn not_a_package_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.mlpackage");
    fs::write(&file, "plain file").unwrap();
    assert_rejected(&file, "x.mlpackage", "not a directory");
    assert_rejected(&dir.path().join("missing.mlpackage"), "missing.mlpackage", "No such file");
}

/// `--backend coreml` off Apple platforms is an error, for `run --ids` as for `run --prompt`:
/// never a silent run on the reference interpreter (which would make a Core ML check pass).
#[cfg(not(target_vendor = "apple"))]
#[test]
fn the_core_ml_backend_is_never_silently_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("tiny.mlpackage");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/qwen3");
    let out = corelm(&["convert", src.to_str().unwrap(), "-o", pkg.to_str().unwrap(), "--context", "16"]);
    assert_eq!(out.code, 0, "{}", out.text);
    let out = corelm(&["run", pkg.to_str().unwrap(), "--ids", "1,2", "--backend", "coreml"]);
    assert!(out.code == 1 || out.code == 2, "{}", out.text);
    assert!(out.text.contains("runs on Apple platforms only"), "{}", out.text);
}

/// A tools file that is missing, not JSON, or not a list of schemas, and a template variable
/// that is not KEY=VALUE: each a clear error naming it, before any model loads.
#[test]
fn bad_template_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("absent.mlpackage");
    let (not_json, object) = (dir.path().join("tools.txt"), dir.path().join("tools.json"));
    fs::write(&not_json, "get_weather(city)").unwrap();
    fs::write(&object, r#"{"type": "function"}"#).unwrap();
    let missing = dir.path().join("missing.json");
    for (tools, expect) in [
        (&missing, "cannot read tools file"),
        (&not_json, "is not valid JSON"),
        (&object, "must hold a JSON list of tool schemas"),
    ] {
        let out = corelm(&["run", pkg.to_str().unwrap(), "--prompt", "hi", "--tools", tools.to_str().unwrap()]);
        assert!(out.code == 1 || out.code == 2, "{}", out.text);
        assert!(!out.text.contains("panicked"), "{}", out.text);
        assert!(out.text.contains(expect) && out.text.contains(tools.to_str().unwrap()), "{}", out.text);
    }
    let out = corelm(&["run", pkg.to_str().unwrap(), "--prompt", "hi", "--template-var", "enable_thinking"]);
    assert_eq!(out.code, 2, "{}", out.text);
    assert!(out.text.contains("`enable_thinking` is not KEY=VALUE"), "{}", out.text);
}
