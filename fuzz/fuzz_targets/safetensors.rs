//! Arbitrary bytes as `model.safetensors` in a model folder, through what `corelm convert` does
//! with one: `Safetensors::open` (header, offsets against the file), every tensor read as f32,
//! then every weight each tiny fixture configuration asks for read as the graph builder reads it
//! (fused slices, transposes, shape checks). Ok or an error, never a panic.
#![no_main]
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use corelm_convert::arch::{read_config, tensor_spec};
use corelm_convert::checkpoint::{load, Checkpoint, Safetensors};
use corelm_convert::config::ModelConfig;
use libfuzzer_sys::fuzz_target;

const CONFIGS: &[&str] = &[
    include_str!("../../tests/fixtures/tiny/gemma/config.json"),
    include_str!("../../tests/fixtures/tiny/gemma2/config.json"),
    include_str!("../../tests/fixtures/tiny/gemma3_text/config.json"),
    include_str!("../../tests/fixtures/tiny/gpt2/config.json"),
    include_str!("../../tests/fixtures/tiny/llama_rope_linear/config.json"),
    include_str!("../../tests/fixtures/tiny/llama_rope_llama3/config.json"),
    include_str!("../../tests/fixtures/tiny/mistral/config.json"),
    include_str!("../../tests/fixtures/tiny/phi3/config.json"),
    include_str!("../../tests/fixtures/tiny/qwen2/config.json"),
    include_str!("../../tests/fixtures/tiny/qwen3/config.json"),
];

struct Setup {
    dir: PathBuf,
    configs: Vec<ModelConfig>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| Setup {
        dir: corelm_fuzz::scratch("safetensors"),
        configs: CONFIGS
            .iter()
            .map(|text| {
                let json = serde_json::from_str(text).expect("fixture config is JSON");
                read_config(Path::new("config.json"), &json).expect("fixture config reads")
            })
            .collect(),
    })
}

/// Tensor names from the header, when it is what `Safetensors::open` accepted.
fn names(data: &[u8]) -> Vec<String> {
    let Some(len) = data.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize) else { return vec![] };
    let Some(header) = data.get(8..8usize.saturating_add(len)) else { return vec![] };
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(header) else { return vec![] };
    map.keys().filter(|k| *k != "__metadata__").cloned().collect()
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    corelm_fuzz::write(&s.dir.join("model.safetensors"), data);
    let Ok(ck) = Safetensors::open(&s.dir) else { return };
    for name in names(data) {
        let shape = ck.shape(&name).expect("a tensor of the header has a shape");
        if let Ok(values) = ck.read_f32(&name) {
            assert_eq!(values.len(), shape.iter().product::<usize>(), "tensor `{name}` holds its shape {shape:?}");
        }
    }
    for c in &s.configs {
        for role in corelm_convert::graph::roles(c) {
            let Some(spec) = tensor_spec(c, role) else { continue };
            if let Ok((shape, values)) = load(&ck, c, role, &spec) {
                assert_eq!(shape.iter().product::<usize>(), values.len(), "{role:?} holds its shape");
            }
        }
    }
});
