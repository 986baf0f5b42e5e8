//! Packages whose program types but whose constants lie: the interpreter refuses them at load
//! with an error naming the op, instead of indexing past a decoded buffer.

use corelm_format::Package;
use corelm_interp::Interpreter;

/// A fuzzer-found program (package_plan target): the palettized sample's
/// `constexpr_lut_to_dense` declares a [42, 16] output for [32, 16] indices.
#[test]
fn lut_output_larger_than_its_indices_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let package = corelm_format::samples::palettized(&dir.path().join("palettized.mlpackage")).unwrap();
    let model = include_bytes!("fixtures/fuzz/lut-output-larger-than-indices.mlmodel");
    std::fs::write(package.join("Data/com.apple.CoreML/model.mlmodel"), model).unwrap();
    let pkg = Package::open(&package).unwrap();
    let err = Interpreter::load(&pkg).err().expect("the lying lut is refused").to_string();
    assert!(err.contains("constexpr_lut_to_dense"), "{err}");
    assert!(err.contains("`indices` is [32, 16] but the output is declared [42, 16]"), "{err}");
}
