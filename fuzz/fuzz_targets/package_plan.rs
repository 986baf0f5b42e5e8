//! Arbitrary bytes as the `model.mlmodel` of a package, through what `corelm predict`/`run`
//! do before the first prediction: `Package::open` and `Interpreter::load` (every function
//! planned: constants and constexpr ops decoded against the weight file, constant ops folded,
//! slots assigned), then each function's inputs and fresh state. The input's first byte picks
//! which sample package (and so which weight file) the model goes into. Ok or an error, never a
//! panic, never a hang or unbounded memory (scripts/fuzz.sh sets CORELM_MAX_TENSOR_BYTES below
//! libFuzzer's memory limit, so a declared shape past it must be refused, not allocated).
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use corelm_format::Package;
use corelm_interp::Interpreter;
use libfuzzer_sys::fuzz_target;

fn packages() -> &'static [PathBuf] {
    static PACKAGES: OnceLock<Vec<PathBuf>> = OnceLock::new();
    PACKAGES.get_or_init(|| corelm_fuzz::samples("package_plan").1)
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, model)) = data.split_first() else { return };
    let packages = packages();
    let package = &packages[pick as usize % packages.len()];
    corelm_fuzz::write(&package.join("Data/com.apple.CoreML/model.mlmodel"), model);
    let Ok(pkg) = Package::open(package) else { return };
    let Ok(interp) = Interpreter::load(&pkg) else { return };
    let functions: Vec<String> = interp.functions().map(str::to_string).collect();
    for f in &functions {
        let _ = interp.inputs(Some(f));
        let _ = interp.new_state(Some(f));
    }
});
