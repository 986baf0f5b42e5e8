//! Arbitrary bytes as a Hugging Face `config.json`, through what `corelm plan` and `corelm
//! convert` do with one: `corelm_deploy::open` on the file (JSON, `read_config`, the model's
//! shape) and a plan for every device, at the default and at int4; then the configuration as the
//! converter uses it (default context, parameter count, every role's tensor name and expected
//! shape). Ok or an error, never a panic.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use corelm_convert::arch::{read_config, tensor_spec};
use corelm_convert::checkpoint::expected_shape;
use corelm_deploy::{Assumptions, Quant, DEVICES};
use libfuzzer_sys::fuzz_target;

fn file() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| corelm_fuzz::scratch("config_json").join("config.json"))
}

fuzz_target!(|data: &[u8]| {
    let path = file();
    corelm_fuzz::write(path, data);
    let Ok(model) = corelm_deploy::open(path) else { return };
    let devices: Vec<_> = DEVICES.iter().collect();
    for scheme in [None, Some(Quant::Int4)] {
        if let Ok(plan) = corelm_deploy::plan(&model, scheme, None, &devices, &Assumptions::default()) {
            let _ = plan.to_text();
            let _ = serde_json::to_string(&plan).expect("a plan serializes");
        }
    }

    let json: serde_json::Value = serde_json::from_slice(data).expect("corelm_deploy::open parsed it");
    let c = read_config(path, &json).expect("corelm_deploy::open read it");
    let _ = corelm_convert::convert::default_context(&c);
    let _ = c.parameter_count();
    for role in corelm_convert::graph::roles(&c) {
        if tensor_spec(&c, role).is_some() {
            let _ = expected_shape(&c, role);
        }
    }
});
