//! Arbitrary bytes as the calls file of `corelm predict PKG --calls FILE`: JSON, a list of calls,
//! each parsed by `corelm_interp::json::inputs_from_json` (what the CLI calls) and predicted in
//! sequence, sharing one state, on the coremltools fixture package the committed calls.json was
//! written for and on the sample packages. Ok or an error, never a panic; parsed inputs written
//! back with `outputs_to_json` parse to the same tensors.
#![no_main]
use std::path::Path;
use std::sync::OnceLock;

use corelm_format::Package;
use corelm_interp::json::{inputs_from_json, outputs_to_json};
use corelm_interp::Interpreter;
use libfuzzer_sys::fuzz_target;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/coremltools/stateful_torch.mlpackage");

fn interpreters() -> &'static [(Interpreter, Option<&'static str>)] {
    static INTERPRETERS: OnceLock<Vec<(Interpreter, Option<&'static str>)>> = OnceLock::new();
    INTERPRETERS.get_or_init(|| {
        let load = |path: &Path| Interpreter::load(&Package::open(path).expect("package opens")).expect("loads");
        let (_, samples) = corelm_fuzz::samples("predict_calls");
        let sample = |name: &str| samples.iter().find(|p| p.ends_with(name)).expect("sample written");
        vec![
            (load(Path::new(FIXTURE)), None),
            (load(sample("kv_cache.mlpackage")), None),
            (load(sample("palettized.mlpackage")), None),
            (load(sample("multifunction.mlpackage")), None),
            (load(sample("multifunction.mlpackage")), Some("prefill")),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(calls) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Some(list) = calls.as_array() else { return };
    let mut parsed = Vec::new();
    for call in list {
        let Ok(inputs) = inputs_from_json(call) else { return };
        let again = inputs_from_json(&outputs_to_json(&inputs)).expect("written inputs parse");
        assert_eq!(again, inputs);
        parsed.push(inputs);
    }
    for (interp, function) in interpreters() {
        let Ok(mut state) = interp.new_state(*function) else { continue };
        for inputs in &parsed {
            if interp.predict(*function, inputs, &mut state).is_err() {
                break;
            }
        }
    }
});
