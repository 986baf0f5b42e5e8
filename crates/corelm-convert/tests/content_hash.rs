//! The content hash that keys Core ML's compiled-model cache: two packages that differ only in
//! weight values must not share a key, and a package without corelm's digest record (as
//! coremltools writes them) is hashed from its files.

use std::path::{Path, PathBuf};

use corelm_convert::convert::{convert, open_source};
use corelm_convert::graph::GraphOptions;
use corelm_format::package::WriteOptions;
use corelm_format::Package;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Converts `checkpoint` (a folder) into `out` with default options and a 32-token context.
fn convert_tiny(checkpoint: &Path, out: &Path) -> Package {
    let source = open_source(checkpoint).unwrap();
    let opts = GraphOptions { context: 32, ..GraphOptions::default() };
    convert(&source, out, &opts, &WriteOptions::overwriting(), &mut |_: &str, _: u64| {}).unwrap();
    Package::open(out).unwrap()
}

/// Flips the low bit of the last byte of the package's first weight file (its size is unchanged).
fn nudge_last_weight_byte(pkg: &Path) {
    let file = pkg.join("Data/com.apple.CoreML/weights/weight.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&file, bytes).unwrap();
}

#[test]
fn packages_differing_only_in_weight_values_get_different_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = root().join("tests/fixtures/tiny/llama_rope_linear");
    // The same checkpoint with one weight value changed (same shapes, same file sizes; the same
    // folder name, which becomes the package's source id).
    let edited = tmp.path().join("edited/llama_rope_linear");
    copy_dir(&fixture, &edited);
    let st = edited.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x40; // an fp32 exponent bit of the last tensor's last element
    std::fs::write(&st, bytes).unwrap();

    let a = convert_tiny(&fixture, &tmp.path().join("a.mlpackage"));
    let b = convert_tiny(&edited, &tmp.path().join("b.mlpackage"));
    let size = |p: &Package| p.weight_files().unwrap();
    assert_eq!(size(&a), size(&b), "the two packages must differ in weight values only");
    assert!(std::fs::read(a.model_path()).unwrap() == std::fs::read(b.model_path()).unwrap(), "specs differ");
    assert_ne!(a.content_hash().unwrap(), b.content_hash().unwrap());
    // Identical conversions share a key.
    let again = convert_tiny(&fixture, &tmp.path().join("again.mlpackage"));
    assert_eq!(a.content_hash().unwrap(), again.content_hash().unwrap());
}

#[test]
fn recorded_digests_equal_the_files_and_foreign_packages_are_rehashed() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = root().join("tests/fixtures/tiny/qwen3");
    let out = tmp.path().join("q.mlpackage");
    let pkg = convert_tiny(&fixture, &out);
    let recorded = pkg.recorded_digests().unwrap();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    let file = out.join("Data/com.apple.CoreML/weights").join(&recorded[0].name);
    assert_eq!(recorded[0].bytes, std::fs::metadata(&file).unwrap().len());
    assert_eq!(recorded[0].digest, corelm_format::blob::weight_file_digest(&file).unwrap());
    let with_record = pkg.content_hash().unwrap();

    // The record trusted only for files of the recorded size: editing a value in place keeps the
    // size, so the record is what a package from elsewhere would lack. Without the record the
    // files are hashed, and the edit shows.
    let foreign = tmp.path().join("foreign.mlpackage");
    copy_dir(&out, &foreign);
    let manifest_path = foreign.join("Manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["itemInfoEntries"].as_object_mut().unwrap().retain(|_, v| v["name"] != "weight-digests.json");
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    std::fs::remove_file(foreign.join("Data/ai.corelm/weight-digests.json")).unwrap();
    let f = Package::open(&foreign).unwrap();
    assert!(f.recorded_digests().unwrap().is_empty());
    let unedited = f.content_hash().unwrap();
    nudge_last_weight_byte(&foreign);
    assert_ne!(unedited, Package::open(&foreign).unwrap().content_hash().unwrap());
    assert_ne!(with_record, unedited, "the manifests differ, so the keys do");

    // A package written by coremltools carries no record; its key follows its weight bytes.
    let ct = tmp.path().join("ct.mlpackage");
    copy_dir(&root().join("tests/fixtures/coremltools/stateful_torch.mlpackage"), &ct);
    let before = Package::open(&ct).unwrap().content_hash().unwrap();
    nudge_last_weight_byte(&ct);
    assert_ne!(before, Package::open(&ct).unwrap().content_hash().unwrap());
}
