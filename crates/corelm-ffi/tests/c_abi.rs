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
    // cargo test puts target/<profile> ahead of deps/ in LD_LIBRARY_PATH, where an older build of
    // the library may lie: load the one the program was linked against (its rpath).
    let out = Command::new(&exe)
        .env_remove("LD_LIBRARY_PATH")
        .arg(&pkg)
        .arg("What is the capital of France?")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    assert!(text.contains("Paris"), "{text}");
    // The reply after corelm_reset is the first reply again.
    let (first, again) = text.split_once("after reset: ").expect("the program chats again after reset");
    assert_eq!(first.trim(), again.trim());
    for (what, message) in [
        ("null user_message", "user_message is null"),
        ("system not UTF-8", "system is not UTF-8"),
        ("null model", "model is null"),
        ("reset of a null model", "model is null"),
        ("missing package", "such.mlpackage"),
        ("unknown backend", "unknown backend 7"),
        ("null path", "package_path is null"),
    ] {
        let line = err
            .lines()
            .find(|l| l.starts_with(&format!("expected error: {what}: ")))
            .unwrap_or_else(|| panic!("{what}: {err}"));
        assert!(line.contains(message), "{what}: {line}");
    }
}

/// A failed call leaves the conversation as it was: a null user message after a first exchange
/// must not drop the assistant's reply (it used to pop it).
#[test]
fn a_failed_chat_keeps_the_conversation() {
    use corelm_ffi::*;
    use std::ffi::CString;
    let dir = tempfile::tempdir().unwrap();
    let gguf = root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let pkg = dir.path().join("smollm2.mlpackage");
    assert!(corelm_convert_for_test(&gguf, &pkg), "conversion failed");
    let path = CString::new(pkg.to_str().unwrap()).unwrap();
    let mut error = std::ptr::null_mut();
    let model = corelm_model_open(path.as_ptr(), CORELM_BACKEND_REFERENCE, std::ptr::null(), &mut error);
    assert!(!model.is_null());
    let hi = CString::new("Say hello.").unwrap();
    // SAFETY: a live model, valid strings, no callback.
    unsafe {
        let n = corelm_chat(
            model,
            std::ptr::null(),
            hi.as_ptr(),
            corelm_sampling_default(),
            4,
            None,
            std::ptr::null_mut(),
            &mut error,
        );
        assert!(n > 0);
        let roles = |m: *mut CorelmModel| (*m).messages().iter().map(|m| m.role.clone()).collect::<Vec<_>>();
        assert_eq!(roles(model), ["user", "assistant"]);
        let n = corelm_chat(
            model,
            std::ptr::null(),
            std::ptr::null(),
            corelm_sampling_default(),
            4,
            None,
            std::ptr::null_mut(),
            &mut error,
        );
        assert_eq!(n, -1);
        corelm_string_free(error);
        assert_eq!(roles(model), ["user", "assistant"]);
        corelm_model_free(model);
    }
}

fn corelm_convert_for_test(gguf: &Path, out: &Path) -> bool {
    let corelm = profile_dir().join("corelm");
    Command::new(corelm)
        .args(["convert", gguf.to_str().unwrap(), "-o", out.to_str().unwrap(), "--context", "256"])
        .status()
        .is_ok_and(|s| s.success())
}
