//! `corelm bundle`: a folder or tar with every file's size and SHA-256; `--verify` passes on
//! what was written and fails (exit 1, file named) after one byte changes.

use std::path::Path;
use std::process::Command;

fn corelm(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_corelm")).args(args).output().unwrap();
    (o.status.code().unwrap(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn bundle_and_verify() {
    let pkg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/coremltools/stateful_torch.mlpackage");
    let tmp = tempfile::tempdir().unwrap();
    let (tar, dir) = (tmp.path().join("model.tar"), tmp.path().join("bundle"));
    for out in [&tar, &dir] {
        let (code, stdout, err) = corelm(&["bundle", pkg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json"]);
        assert_eq!(code, 0, "{err}");
        let manifest: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(manifest["package"], "stateful_torch.mlpackage");
        assert!(manifest["files"].as_array().unwrap().iter().all(|f| f["sha256"].as_str().unwrap().len() == 64));
        let (code, _, err) = corelm(&["bundle", "--verify", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
    }
    let (code, _, err) = corelm(&["bundle", pkg.to_str().unwrap(), "-o", tar.to_str().unwrap()]);
    assert!(code != 0 && err.contains("exists"), "{err}");
    let model = dir.join("stateful_torch.mlpackage/Data/com.apple.CoreML/model.mlmodel");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&model, bytes).unwrap();
    let (code, _, err) = corelm(&["bundle", "--verify", dir.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("model.mlmodel") && err.contains("SHA-256"), "{err}");
}
