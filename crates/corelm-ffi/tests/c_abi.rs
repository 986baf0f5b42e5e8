//! The C ABI from C: compile tests/chat.c against the generated header and the built library,
//! then ask the default model a question through it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The profile directory (target/<profile>) above this test binary.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// The directory holding libcorelm_ffi.so: `cargo test` leaves it in deps/, `cargo build` one up.
fn library_dir() -> PathBuf {
    let profile = profile_dir();
    [profile.join("deps"), profile.clone()]
        .into_iter()
        .find(|d| d.join("libcorelm_ffi.so").exists())
        .unwrap_or_else(|| panic!("libcorelm_ffi.so is neither in {0}/deps nor in {0}", profile.display()))
}

#[test]
fn c_program_streams_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("chat");
    let lib = library_dir();
    let status = Command::new("cc")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chat.c"))
        .arg("-I")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("include"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lcorelm_ffi", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .status()
        .unwrap();
    assert!(status.success(), "the C example does not compile against include/corelm.h");
    let gguf = root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.exists(), "run scripts/fetch-models.sh");
    let pkg = dir.path().join("smollm2.mlpackage");
    let source = corelm_convert_for_test(&gguf, &pkg);
    assert!(source, "conversion failed");
    let out = Command::new(&exe).arg(&pkg).arg("What is the capital of France?").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    assert!(text.contains("Paris"), "{text}");
    assert!(err.contains("expected error:") && err.contains("such.mlpackage"), "{err}");
}

fn corelm_convert_for_test(gguf: &Path, out: &Path) -> bool {
    let corelm = profile_dir().join("corelm");
    Command::new(corelm)
        .args(["convert", gguf.to_str().unwrap(), "-o", out.to_str().unwrap(), "--context", "256"])
        .status()
        .is_ok_and(|s| s.success())
}
