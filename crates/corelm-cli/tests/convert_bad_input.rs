//! Broken checkpoints: a clear error naming the file and the problem, a non-zero exit, no panic,
//! and no package (or partial package) left behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

const H: usize = 8;
const V: usize = 16;

/// A tiny Llama checkpoint written by hand: config.json and a safetensors file.
fn tiny_llama(dir: &Path) -> PathBuf {
    let model = dir.join("tiny");
    fs::create_dir_all(&model).unwrap();
    let config = json!({
        "model_type": "llama", "hidden_size": H, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": V, "max_position_embeddings": 32,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": true
    });
    fs::write(model.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let kv = H / 2;
    let tensors: Vec<(&str, Vec<usize>)> = vec![
        ("model.embed_tokens.weight", vec![V, H]),
        ("model.layers.0.input_layernorm.weight", vec![H]),
        ("model.layers.0.self_attn.q_proj.weight", vec![H, H]),
        ("model.layers.0.self_attn.k_proj.weight", vec![kv, H]),
        ("model.layers.0.self_attn.v_proj.weight", vec![kv, H]),
        ("model.layers.0.self_attn.o_proj.weight", vec![H, H]),
        ("model.layers.0.post_attention_layernorm.weight", vec![H]),
        ("model.layers.0.mlp.gate_proj.weight", vec![16, H]),
        ("model.layers.0.mlp.up_proj.weight", vec![16, H]),
        ("model.layers.0.mlp.down_proj.weight", vec![H, 16]),
        ("model.norm.weight", vec![H]),
    ];
    write_safetensors(&model.join("model.safetensors"), &tensors);
    model
}

fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape) in tensors {
        let n: usize = shape.iter().product();
        let start = data.len();
        for i in 0..n {
            data.extend_from_slice(&((i % 7) as f32 * 0.1 - 0.3).to_le_bytes());
        }
        header.insert(name.to_string(), json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}));
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    fs::write(path, out).unwrap();
}

/// Rewrites the safetensors header through `edit`, keeping the data bytes.
fn edit_header(model: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = model.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend_from_slice(&bytes[8 + n..]);
    fs::write(path, out).unwrap();
}

fn convert(model: &Path, out: &Path) -> (i32, String) {
    convert_with(model, out, &[])
}

fn convert_with(model: &Path, out: &Path, extra: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_corelm"))
        .args(["convert", model.to_str().unwrap(), "-o", out.to_str().unwrap(), "--context", "16", "--json"])
        .args(extra)
        .output()
        .unwrap();
    (o.status.code().unwrap(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

/// Converts a broken checkpoint and checks the failure is clean and names `file` and `expect`.
fn assert_rejected(dir: &Path, model: &Path, file: &str, expect: &str) {
    let out = dir.join("out.mlpackage");
    let (code, text) = convert(model, &out);
    assert_eq!(code, 2, "expected failure:\n{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert!(text.contains(file), "the message does not name {file}:\n{text}");
    assert!(text.contains(expect), "the message does not say `{expect}`:\n{text}");
    assert!(!out.exists(), "a package was left behind");
    let leftovers: Vec<_> =
        fs::read_dir(dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains("partial")).collect();
    assert!(leftovers.is_empty(), "partial output left behind: {leftovers:?}");
}

#[test]
fn the_tiny_checkpoint_converts() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    let out = dir.path().join("out.mlpackage");
    let (code, text) = convert(&model, &out);
    assert_eq!(code, 0, "{text}");
    let summary: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(summary["architecture"], "llama");
    // An existing output is not replaced without --force.
    let (code, text) = convert(&model, &out);
    assert_eq!(code, 2);
    assert!(text.contains("already exists (pass --force to replace it)"), "{text}");
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    let path = model.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert_rejected(dir.path(), &model, "model.safetensors", "not a valid safetensors file");
}

#[test]
fn header_offsets_past_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    edit_header(&model, |h| h["model.norm.weight"]["data_offsets"] = json!([100000, 100032]));
    assert_rejected(dir.path(), &model, "model.safetensors", "not a valid safetensors file");
}

#[test]
fn header_offsets_overlapping() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    edit_header(&model, |h| h["model.norm.weight"]["data_offsets"] = json!([0, 32]));
    assert_rejected(dir.path(), &model, "model.safetensors", "not a valid safetensors file");
}

#[test]
fn missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    let tensors = vec![("model.embed_tokens.weight", vec![V, H])];
    write_safetensors(&model.join("model.safetensors"), &tensors);
    assert_rejected(dir.path(), &model, "tiny", "tensor `model.layers.0.input_layernorm.weight` is missing");
}

#[test]
fn tensor_with_the_wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    let mut config: serde_json::Value = serde_json::from_slice(&fs::read(model.join("config.json")).unwrap()).unwrap();
    config["intermediate_size"] = json!(12);
    fs::write(model.join("config.json"), config.to_string()).unwrap();
    assert_rejected(dir.path(), &model, "model.layers.0.mlp.gate_proj.weight", "has shape [16, 8]; [12, 8] expected");
}

#[test]
fn config_field_of_the_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    fs::write(model.join("config.json"), r#"{"model_type": "llama", "hidden_size": "eight"}"#).unwrap();
    assert_rejected(
        dir.path(),
        &model,
        "config.json",
        "field `hidden_size` must be a non-negative integer, but it is a string",
    );
}

#[test]
fn unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    fs::write(model.join("config.json"), r#"{"model_type": "mamba"}"#).unwrap();
    assert_rejected(
        dir.path(),
        &model,
        "config.json",
        "unsupported architecture `mamba`; supported model types: llama, mistral",
    );
}

/// Configs that ask for what a family's converter does not do are refused by name: Granite 4's
/// Mamba-2 layers and experts, SmolLM3 RoPE flags for fewer layers than it has, LongRoPE factors
/// that do not cover the rotated pairs.
#[test]
fn family_features_beyond_the_converter_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny");
    let cases: [(&str, serde_json::Value, &str); 13] = [
        (
            "granite4",
            serde_json::json!({"layer_types": ["attention", "bogus"]}),
            "unknown Granite 4 layer type `bogus`",
        ),
        (
            "granite4_h",
            serde_json::json!({"mamba_n_heads": 3}),
            "mamba_n_heads (3) must divide mamba_expand × hidden_size (128)",
        ),
        (
            "lfm2",
            serde_json::json!({"layer_types": ["conv", "full_attention", "conv", "mystery"]}),
            "unknown LFM2 layer type `mystery`",
        ),
        (
            "qwen3_5_text",
            serde_json::json!({"linear_num_value_heads": 3}),
            "linear_num_value_heads (3) must be a multiple of linear_num_key_heads (2)",
        ),
        ("granite4", serde_json::json!({"num_local_experts": 8}), "a Granite 4 mixture of 8 experts"),
        ("smollm3", serde_json::json!({"no_rope_layers": [1, 0]}), "`no_rope_layers` has 2 flags for 4 layers"),
        (
            "phi3_longrope",
            serde_json::json!({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                "short_factor": [1.0], "long_factor": [1.0], "partial_rotary_factor": 0.75}}),
            "`short_factor` needs 6 positive factors, one per rotated pair; it has 1",
        ),
        ("gemma4_text", serde_json::json!({"enable_moe_block": true}), "Gemma 4's mixture-of-experts blocks"),
        ("gemma4_text", serde_json::json!({"use_bidirectional_attention": "all"}), "bidirectional attention"),
        (
            "gemma4_text",
            serde_json::json!({"num_kv_shared_layers": 6}),
            "`num_kv_shared_layers` is 6 of 6 layers; at least one layer must compute keys and values",
        ),
        (
            "gemma4_text",
            serde_json::json!({"per_layer_config": {"2": {"head_dim": 32, "num_key_value_heads": 3}}}),
            "layer 2 needs a positive head size and a KV head count dividing 4 heads; it has 32 and 3",
        ),
        (
            "gemma3n_text",
            serde_json::json!({"activation_sparsity_pattern": [0.95]}),
            "`activation_sparsity_pattern` needs 6 fractions in [0, 1), one per layer; it has 1",
        ),
        (
            "gemma3n_text",
            serde_json::json!({"altup_active_idx": 4}),
            "AltUp needs at least 2 inputs and an active one among them; it has 4 and 4",
        ),
    ];
    for (fixture, patch, expect) in cases {
        let model = dir.path().join(fixture);
        fs::create_dir_all(&model).unwrap();
        for entry in fs::read_dir(src.join(fixture)).unwrap().flatten() {
            fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
        }
        let mut config: serde_json::Value =
            serde_json::from_slice(&fs::read(model.join("config.json")).unwrap()).unwrap();
        for (k, v) in patch.as_object().unwrap() {
            config[k] = v.clone();
        }
        fs::write(model.join("config.json"), config.to_string()).unwrap();
        assert_rejected(dir.path(), &model, "config.json", expect);
    }
}

#[test]
fn config_not_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    fs::write(model.join("config.json"), "{").unwrap();
    assert_rejected(dir.path(), &model, "config.json", "not valid JSON");
}

#[test]
fn unsupported_tensor_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    edit_header(&model, |h| {
        h["model.norm.weight"]["dtype"] = json!("I32");
    });
    assert_rejected(
        dir.path(),
        &model,
        "model.safetensors",
        "tensor `model.norm.weight` is I32; corelm reads F32, F16 and BF16",
    );
}

/// A minimal GGUF v3 file: one string key (the architecture) and one tensor of type `ty`.
fn tiny_gguf(path: &Path, ty: u32) {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string value
    string(&mut b, "llama");
    string(&mut b, "token_embd.weight");
    b.extend(1u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend([0u8; 128]);
    fs::write(path, b).unwrap();
}

#[test]
fn gguf_with_an_unknown_quant_type() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("odd.gguf");
    tiny_gguf(&gguf, 99);
    assert_rejected(dir.path(), &gguf, "odd.gguf", "tensor 'token_embd.weight' has unknown ggml type id 99");
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("cut.gguf");
    tiny_gguf(&gguf, 0);
    let bytes = fs::read(&gguf).unwrap();
    fs::write(&gguf, &bytes[..40]).unwrap();
    assert_rejected(dir.path(), &gguf, "cut.gguf", "cannot fit in the 16 bytes left in the file");
}

#[test]
fn gguf_of_an_unsupported_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("m.gguf");
    tiny_gguf(&gguf, 0);
    let mut patched = fs::read(&gguf).unwrap();
    let at = patched.windows(5).position(|w| w == b"llama").unwrap();
    patched[at..at + 5].copy_from_slice(b"mamba");
    fs::write(&gguf, patched).unwrap();
    assert_rejected(dir.path(), &gguf, "m.gguf", "unsupported GGUF architecture `mamba`; supported: llama, qwen2");
}

/// Options the model or the profile cannot take: a clear error, nothing written.
#[test]
fn impossible_profile_and_chunk_options() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    let out = dir.path().join("out.mlpackage");
    for (extra, expect) in [
        (&["--chunks", "2"][..], "--chunks must lie in 1..=1"),
        (&["--chunks", "0"][..], "--chunks must lie in 1..=1"),
        (&["--profile", "ane", "--precision", "fp32"][..], "the ane profile computes in fp16"),
        (&["--profile", "ane", "--target", "ios17"][..], "the ane profile keeps the KV cache as states"),
    ] {
        let (code, text) = convert_with(&model, &out, extra);
        assert_eq!(code, 2, "{extra:?}: {text}");
        assert!(text.contains(expect), "{extra:?}: {text}");
        assert!(!text.contains("panicked"), "{text}");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, ["tiny"], "{extra:?} left files behind");
    }
}
