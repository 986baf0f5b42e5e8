//! Arbitrary bytes as a `.gguf` file, through what `corelm convert`/`plan` do with one: the
//! header, metadata and tensor table (`GgufFile`), the tokenizer and chat template rebuilt from
//! the metadata, every tensor dequantized and taken as the grid Core ML carries, then `open_source` on
//! the file (config.json equivalent, model configuration, tokenizer files) and every weight the
//! configuration asks for read as the graph builder reads it. Ok or an error, never a panic.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use corelm_convert::arch::tensor_spec;
use corelm_convert::checkpoint::{load, load_grid};
use corelm_convert::gguf::{self, GgufFile};
use corelm_format::DType;
use libfuzzer_sys::fuzz_target;

fn file() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| corelm_fuzz::scratch("gguf").join("model.gguf"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else { return };
    for v in f.metadata().values() {
        let _ = v.display_truncated(100);
    }
    let _ = gguf::special_token_ids(&f);
    let _ = gguf::chat_template(&f);
    if let Ok(t) = gguf::tokenizer_json(&f) {
        let _ = serde_json::to_vec(&t).expect("a tokenizer.json value serializes");
    }
    let _ = gguf::tokenizer_config_json(&f);
    for t in f.tensors() {
        if let Ok(values) = f.dequantize(t) {
            assert_eq!(values.len(), t.n_elements(), "tensor `{}` dequantizes to its element count", t.name);
        }
        if let Some(g) = gguf::carried_grid(t.dtype, f.raw(t), DType::Fp16) {
            assert_eq!(g.values.len(), t.n_elements(), "tensor `{}`'s grid holds its element count", t.name);
        }
    }
    drop(f);

    // The same bytes as a file, as the CLI opens it.
    let path = file();
    corelm_fuzz::write(path, data);
    let Ok(source) = corelm_convert::convert::open_source(path) else { return };
    let c = &source.config;
    let _ = corelm_convert::convert::default_context(c);
    let _ = c.parameter_count();
    for role in corelm_convert::graph::roles(c) {
        let Some(spec) = tensor_spec(c, role) else { continue };
        let _ = load_grid(source.checkpoint.as_ref(), c, role, &spec, DType::Fp16);
        if let Ok((shape, values)) = load(source.checkpoint.as_ref(), c, role, &spec) {
            assert_eq!(shape.iter().product::<usize>(), values.len(), "{role:?} holds its shape");
        }
    }
});
