//! What the fuzz targets share: a scratch folder per target and process for the readers that
//! take a path (scripts/fuzz.sh points `CORELM_FUZZ_TMP` at one it removes afterwards), and the
//! sample packages of corelm-format written into one.

use std::path::{Path, PathBuf};

/// `<CORELM_FUZZ_TMP or the temp dir>/corelm-fuzz-<name>-<pid>`, created empty on first use.
pub fn scratch(name: &str) -> PathBuf {
    let root = std::env::var_os("CORELM_FUZZ_TMP").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = root.join(format!("corelm-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create scratch folder {}: {e}", dir.display()));
    dir
}

/// Writes `bytes` to `path` (a scratch file; failing to write it is the harness's fault).
pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// A scratch folder holding the sample packages (`kv_cache`, `palettized`, `multifunction`,
/// `op_zoo` `.mlpackage`) as `cargo run -p corelm-format --example write_samples` writes them:
/// byte for byte the packages scripts/fuzz.sh seeds from. Returns the folder and the packages.
pub fn samples(name: &str) -> (PathBuf, Vec<PathBuf>) {
    let dir = scratch(name);
    let packages = corelm_format::samples::write_all(&dir).expect("the sample packages are written");
    (dir, packages)
}

/// What [`tolerating`] accepts right now: process-wide, because readers may panic on a worker
/// thread (the interpreter runs predictions on rayon's pool) while libFuzzer runs one input at a
/// time.
static TOLERATED: std::sync::Mutex<Option<Known>> = std::sync::Mutex::new(None);

fn tolerated() -> std::sync::MutexGuard<'static, Option<Known>> {
    TOLERATED.lock().unwrap_or_else(|e| e.into_inner())
}

/// A known panic, reported and awaiting a fix: raised from a source file whose path contains
/// `file`, and (when given) with a stack through a function whose path contains `frame`.
#[derive(Clone, Copy)]
pub struct Known {
    pub file: &'static str,
    pub frame: Option<&'static str>,
}

/// Runs `f`; the `known` panic makes it return `None` instead of failing the run, so the target
/// keeps fuzzing everything else. Any other panic still aborts, as libFuzzer's panic hook has it.
/// Stays right once the reader catches the panic itself (which libFuzzer's hook alone would
/// still report as a crash).
pub fn tolerating<R>(known: Known, f: impl FnOnce() -> R) -> Option<R> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let known = *tolerated();
            let tolerated = known.is_some_and(|k| {
                info.location().is_some_and(|l| l.file().contains(k.file))
                    && k.frame
                        .is_none_or(|frame| std::backtrace::Backtrace::force_capture().to_string().contains(frame))
            });
            if !tolerated {
                fuzzer_hook(info);
            }
        }));
    });
    let previous = tolerated().replace(known);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    *tolerated() = previous;
    result.ok()
}
