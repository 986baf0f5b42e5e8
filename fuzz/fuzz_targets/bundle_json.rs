//! Arbitrary bytes as the `bundle.json` of a bundle folder holding the sample packages, through
//! `corelm bundle --verify DIR` (`bundle::verify`: manifest, paths kept inside the bundle, every
//! file's size and SHA-256, nothing unlisted). Ok or an error, never a panic; a manifest that
//! verifies serializes to one that verifies the same.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use corelm_runtime::bundle::{self, BundleManifest, MANIFEST};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| corelm_fuzz::samples("bundle_json").0)
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    corelm_fuzz::write(&dir.join(MANIFEST), data);
    let Ok(m) = bundle::verify(dir) else { return };
    let parsed: BundleManifest = serde_json::from_slice(data).expect("a verified manifest is a manifest");
    assert_eq!(parsed, m);
    corelm_fuzz::write(&dir.join(MANIFEST), &serde_json::to_vec_pretty(&m).expect("a manifest serializes"));
    let again = bundle::verify(dir).expect("a verified manifest, written again, verifies");
    assert_eq!(again, m);
});
