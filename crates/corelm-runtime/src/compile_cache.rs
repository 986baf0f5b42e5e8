//! The compiled-model cache behind the Core ML backend, kept apart from Core ML so its races and
//! failures are tested on any machine with the compiler injected. Core ML compiles a package
//! into a temporary folder that the caller must move (`compileModelAtURL`); this moves it into
//! `cache_dir/<key>.mlmodelc` under a name no other thread or process uses, so a half-written
//! model is never picked up, two that race both succeed, and a failure leaves nothing behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// Returns `cache_dir/<key>.mlmodelc`, compiling with `compile` unless it is there. `compile`
/// returns the folder it wrote, which is then the cache's to move or delete.
pub fn cached_compile(cache_dir: &Path, key: &str, compile: impl FnOnce() -> Result<PathBuf>) -> Result<PathBuf> {
    let target = cache_dir.join(format!("{key}.mlmodelc"));
    if target.is_dir() {
        return Ok(target);
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
    let compiled = compile()?;
    let staging = unique_staging(cache_dir, key);
    let placed = move_dir(&compiled, &staging).and_then(|()| match std::fs::rename(&staging, &target) {
        Ok(()) => Ok(()),
        // Another thread or process put the same model there first: theirs serves.
        Err(_) if target.is_dir() => Ok(()),
        Err(e) => Err(Error::io(&target, e)),
    });
    // Whatever happened, neither the compiler's folder nor ours stays behind.
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_dir_all(&compiled);
    placed.map(|()| target)
}

/// A staging name in `cache_dir` that no other thread (counter) or process (pid) picks.
fn unique_staging(cache_dir: &Path, key: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    cache_dir.join(format!(".{key}.{}.{n}.partial", std::process::id()))
}

/// Moves a folder: a rename, or across volumes (the compiler's temporary folder may be on
/// another one) a copy and a delete.
fn move_dir(from: &Path, to: &Path) -> Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            copy_dir(from, to)?;
            std::fs::remove_dir_all(from).map_err(|e| Error::io(from, e))
        }
        Err(e) => Err(Error::io(from, e)),
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(|e| Error::io(&src, e))?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    /// What a compiler leaves: a folder of a few files, in `scratch`.
    fn fake_compile(scratch: &Path, tag: &str) -> Result<PathBuf> {
        let out = scratch.join(format!("compiled-{tag}"));
        std::fs::create_dir_all(out.join("weights")).unwrap();
        std::fs::write(out.join("model.mil"), b"program").unwrap();
        std::fs::write(out.join("weights/weight.bin"), vec![7u8; 4096]).unwrap();
        Ok(out)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Eight threads open the same package at once: every one gets the model, one copy is kept,
    /// and neither staging folders nor the compiler's outputs are left.
    #[test]
    fn racing_opens_all_succeed_and_leave_one_model() {
        let tmp = tempfile::tempdir().unwrap();
        let (cache, scratch) = (tmp.path().join("cache"), tmp.path().join("scratch"));
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (cache, scratch, barrier) = (cache.clone(), scratch.clone(), barrier.clone());
                std::thread::spawn(move || {
                    cached_compile(&cache, "abc", || {
                        let out = fake_compile(&scratch, &i.to_string());
                        barrier.wait();
                        out
                    })
                })
            })
            .collect();
        for h in handles {
            let got = h.join().unwrap().unwrap();
            assert_eq!(got, cache.join("abc.mlmodelc"));
        }
        assert_eq!(names(&cache), ["abc.mlmodelc"]);
        assert_eq!(names(&cache.join("abc.mlmodelc")), ["model.mil", "weights"]);
        assert!(names(&scratch).is_empty(), "compiler outputs left: {:?}", names(&scratch));
        // Cached: the compiler is not called again.
        cached_compile(&cache, "abc", || panic!("compiled twice")).unwrap();
    }

    /// A failed compile or move leaves nothing behind, and the next open compiles again.
    #[test]
    fn a_failure_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let (cache, scratch) = (tmp.path().join("cache"), tmp.path().join("scratch"));
        let err = cached_compile(&cache, "k", || Err(Error::invalid("the compiler refused"))).unwrap_err();
        assert!(err.to_string().contains("refused"));
        let err = cached_compile(&cache, "k", || Ok(scratch.join("vanished"))).unwrap_err();
        assert!(err.to_string().contains("vanished"), "{err}");
        assert!(names(&cache).is_empty(), "{:?}", names(&cache));
        cached_compile(&cache, "k", || fake_compile(&scratch, "again")).unwrap();
        assert_eq!(names(&cache), ["k.mlmodelc"]);
    }

    /// The compiler's folder on another volume (here /dev/shm, when it is one) is copied over
    /// and deleted.
    #[test]
    fn a_compiled_model_on_another_volume_is_moved() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let Ok(other) = tempfile::tempdir_in("/dev/shm") else { return };
        if std::fs::metadata(other.path()).unwrap().dev() == std::fs::metadata(tmp.path()).unwrap().dev() {
            return;
        }
        let cache = tmp.path().join("cache");
        let got = cached_compile(&cache, "x", || fake_compile(other.path(), "shm")).unwrap();
        assert_eq!(std::fs::read(got.join("weights/weight.bin")).unwrap(), vec![7u8; 4096]);
        assert!(names(other.path()).is_empty());
    }
}
