//! Arbitrary bytes as a bundle tar, through `corelm bundle --verify FILE.tar` (`bundle::verify`:
//! bundle.json first, entries listed, plain files, sizes and SHA-256s) and, when it verifies,
//! `corelm fetch`'s install step (`bundle::install` into a scratch cache). Ok or an error, never
//! a panic, and nothing written outside the cache.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use corelm_runtime::bundle;
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| corelm_fuzz::scratch("bundle_tar"))
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    let tar = dir.join("bundle.tar");
    corelm_fuzz::write(&tar, data);
    let Ok(m) = bundle::verify(&tar) else { return };
    let cache = dir.join("cache");
    if let Ok(package) = bundle::install(&tar, &cache, "id") {
        assert_eq!(package, cache.join("id").join(&m.package));
        assert_eq!(bundle::verify(&cache.join("id")).expect("an installed bundle verifies"), m);
    }
    if cache.exists() {
        std::fs::remove_dir_all(&cache).expect("the scratch cache is removed");
    }
    let left: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["bundle.tar"], "install left something beside the cache");
});
