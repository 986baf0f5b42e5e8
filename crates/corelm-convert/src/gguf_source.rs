//! A GGUF file as a conversion source: its metadata becomes a Hugging Face style `config.json`
//! (so one parser serves both), and its tensors are served under Hugging Face names, with
//! llama.cpp's storage conventions undone (Q/K row permutation, Gemma's `1 + w` norms).

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::checkpoint::{CarriedWeight, Checkpoint, SourceStorage};
use crate::compress::Compressed;
use crate::gguf::{self, GgufFile};
use crate::{Error, Result};
use corelm_format::{DType, Tensor};

/// GGUF architectures corelm converts, with the `model_type` they map to.
pub const SUPPORTED_GGUF_ARCHITECTURES: &[(&str, &str)] = &[
    ("llama", "llama"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("gemma", "gemma"),
    ("gemma2", "gemma2"),
    ("gemma3", "gemma3_text"),
    ("phi3", "phi3"),
    ("gpt2", "gpt2"),
];

pub struct GgufCheckpoint {
    file: GgufFile,
    /// Undo llama.cpp's Q/K row permutation (llama only, as transformers does).
    permuted_qk: bool,
    /// Gemma norms are stored as `1 + w`.
    norm_offset: bool,
    sandwich_norms: bool,
    /// GPT-2's Conv1D weights: Hugging Face stores them (in, out), llama.cpp (out, in).
    conv1d: bool,
    heads: (usize, usize),
}

/// The config.json a Hugging Face checkpoint of this GGUF would carry.
fn config_json(g: &GgufFile) -> Result<Value> {
    let arch = g.architecture()?.to_string();
    let model_type =
        SUPPORTED_GGUF_ARCHITECTURES.iter().find(|(a, _)| *a == arch).map(|(_, m)| *m).ok_or_else(|| {
            let names: Vec<&str> = SUPPORTED_GGUF_ARCHITECTURES.iter().map(|(a, _)| *a).collect();
            Error::malformed(
                g.path(),
                format!("unsupported GGUF architecture `{arch}`; supported: {}", names.join(", ")),
            )
        })?;
    let key = |k: &str| format!("{arch}.{k}");
    let vocab = match g.get_usize(&key("vocab_size"))? {
        Some(v) => v,
        None => g
            .get_str_array("tokenizer.ggml.tokens")?
            .map(|t| t.len())
            .ok_or_else(|| g.missing("tokenizer.ggml.tokens"))?,
    };
    let mut c = Map::new();
    c.insert("model_type".into(), json!(model_type));
    c.insert("vocab_size".into(), json!(vocab));
    c.insert("hidden_size".into(), json!(g.require_usize(&key("embedding_length"))?));
    c.insert("intermediate_size".into(), json!(g.require_usize(&key("feed_forward_length"))?));
    c.insert("num_hidden_layers".into(), json!(g.require_usize(&key("block_count"))?));
    let heads = g.require_usize(&key("attention.head_count"))?;
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert("num_key_value_heads".into(), json!(g.get_usize(&key("attention.head_count_kv"))?.unwrap_or(heads)));
    if let Some(hd) = g.get_usize(&key("attention.key_length"))? {
        c.insert("head_dim".into(), json!(hd));
    }
    if let Some(ctx) = g.get_usize(&key("context_length"))? {
        c.insert("max_position_embeddings".into(), json!(ctx));
    }
    if let Some(eps) = g.get_f64(&key("attention.layer_norm_rms_epsilon"))? {
        c.insert("rms_norm_eps".into(), json!(eps));
    }
    if model_type == "gpt2" {
        c.insert("n_inner".into(), c["intermediate_size"].clone());
        if let Some(eps) = g.get_f64(&key("attention.layer_norm_epsilon"))? {
            c.insert("layer_norm_epsilon".into(), json!(eps));
        }
    }
    if let Some(theta) = g.get_f64(&key("rope.freq_base"))? {
        c.insert("rope_theta".into(), json!(theta));
    }
    if g.tensor("rope_freqs.weight").is_some() {
        return Err(Error::malformed(g.path(), "per-frequency rope factors (rope_freqs.weight, Llama 3.1 style) in GGUF files are not supported; convert the Hugging Face checkpoint instead"));
    }
    match (g.get_str(&key("rope.scaling.type"))?, g.get_f64(&key("rope.scaling.factor"))?) {
        (Some("linear"), Some(f)) | (None, Some(f)) if f != 1.0 => {
            c.insert("rope_scaling".into(), json!({"rope_type": "linear", "factor": f}));
        }
        (Some(kind), _) if kind != "none" && kind != "linear" => {
            return Err(Error::malformed(g.path(), format!("rope scaling `{kind}` in GGUF files is not supported")));
        }
        _ => {}
    }
    c.insert("tie_word_embeddings".into(), json!(g.tensor("output.weight").is_none()));
    let specials = gguf::special_token_ids(g)?;
    if let Some(b) = specials.bos {
        c.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = specials.eos {
        c.insert("eos_token_id".into(), json!(e));
    }
    if let Some(p) = specials.pad {
        c.insert("pad_token_id".into(), json!(p));
    }
    if let Some(w) = g.get_usize(&key("attention.sliding_window"))? {
        c.insert("sliding_window".into(), json!(w));
        if model_type == "qwen2" || model_type == "qwen3" {
            c.insert("use_sliding_window".into(), json!(false));
        }
    }
    if model_type == "gemma3_text" || model_type == "gemma2" {
        // Not stored in GGUF: llama.cpp hard-codes them per architecture, as do we.
        let hd = c.get("head_dim").cloned().unwrap_or(json!(256));
        c.insert("query_pre_attn_scalar".into(), hd);
        if model_type == "gemma3_text" {
            c.insert("rope_local_base_freq".into(), json!(10_000.0));
            c.insert("sliding_window_pattern".into(), json!(6));
        } else {
            c.insert(
                "attn_logit_softcapping".into(),
                json!(g.get_f64(&key("attn_logit_softcapping"))?.unwrap_or(50.0)),
            );
            c.insert(
                "final_logit_softcapping".into(),
                json!(g.get_f64(&key("final_logit_softcapping"))?.unwrap_or(30.0)),
            );
        }
    }
    if let Some(name) = g.get_str("general.name")? {
        c.insert("_name_or_path".into(), json!(name));
    }
    Ok(Value::Object(c))
}

impl GgufCheckpoint {
    /// Opens a GGUF file; returns the checkpoint and the config.json equivalent of its metadata.
    pub fn open(path: &Path) -> Result<(GgufCheckpoint, Value)> {
        let file = GgufFile::open(path)?;
        let config = config_json(&file)?;
        let arch = file.architecture()?.to_string();
        let heads = (
            config["num_attention_heads"].as_u64().unwrap_or(1) as usize,
            config["num_key_value_heads"].as_u64().unwrap_or(1) as usize,
        );
        let sandwich = matches!(arch.as_str(), "gemma2" | "gemma3");
        Ok((
            GgufCheckpoint {
                permuted_qk: arch == "llama",
                norm_offset: arch.starts_with("gemma"),
                sandwich_norms: sandwich,
                conv1d: arch == "gpt2",
                heads,
                file,
            },
            config,
        ))
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The GGUF name of a Hugging Face tensor name.
    fn gguf_name(&self, hf: &str) -> Option<String> {
        let direct = match hf {
            "model.embed_tokens.weight" | "transformer.wte.weight" => Some("token_embd.weight"),
            "model.norm.weight" | "transformer.ln_f.weight" => Some("output_norm.weight"),
            "transformer.ln_f.bias" => Some("output_norm.bias"),
            "transformer.wpe.weight" => Some("position_embd.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        };
        if let Some(d) = direct {
            return Some(d.to_string());
        }
        let rest = hf.strip_prefix("model.layers.").or_else(|| hf.strip_prefix("transformer.h."))?;
        let (layer, tail) = rest.split_once('.')?;
        let (module, suffix) = tail.rsplit_once('.')?;
        let name = match module {
            "input_layernorm" => "attn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.qkv_proj" => "attn_qkv",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "post_attention_layernorm" if self.sandwich_norms => "post_attention_norm",
            "post_attention_layernorm" => "ffn_norm",
            "pre_feedforward_layernorm" => "ffn_norm",
            "post_feedforward_layernorm" => "post_ffw_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" | "mlp.gate_up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            // GPT-2
            "ln_1" => "attn_norm",
            "attn.c_attn" => "attn_qkv",
            "attn.c_proj" => "attn_output",
            "ln_2" => "ffn_norm",
            "mlp.c_fc" => "ffn_up",
            "mlp.c_proj" => "ffn_down",
            _ => return None,
        };
        Some(format!("blk.{layer}.{name}.{suffix}"))
    }

    fn info(&self, hf: &str) -> Option<&gguf::TensorInfo> {
        self.file.tensor(&self.gguf_name(hf)?)
    }
}

impl Checkpoint for GgufCheckpoint {
    fn source(&self) -> &Path {
        self.file.path()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let info = self.info(name)?;
        let mut shape = info.shape.clone();
        if self.is_conv1d(info) {
            shape.reverse();
        }
        Some(shape)
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info =
            self.info(name).ok_or_else(|| Error::malformed(self.file.path(), format!("tensor `{name}` is missing")))?;
        let mut data = self.file.dequantize(info)?;
        if self.norm_offset && info.name.ends_with("norm.weight") {
            data.iter_mut().for_each(|v| *v -= 1.0);
        }
        if self.is_conv1d(info) {
            let (rows, cols) = (info.shape[0], info.shape[1]);
            return Ok((0..rows * cols).map(|i| data[(i % rows) * cols + i / rows]).collect());
        }
        self.hf_rows(info, data, info.shape.get(1).copied().unwrap_or(1))
    }

    fn storage(&self, name: &str) -> Option<SourceStorage> {
        self.info(name).map(|i| SourceStorage {
            type_name: i.dtype.name().to_string(),
            quantized: i.dtype.is_quantized(),
            bytes: self.file.raw(i).len() as u64,
        })
    }

    fn read_grid(&self, name: &str, dtype: DType) -> Result<Option<CarriedWeight>> {
        let Some(info) = self.info(name).filter(|i| !self.is_conv1d(i)) else { return Ok(None) };
        let &[rows, cols] = info.shape.as_slice() else { return Ok(None) };
        let Some(form) = info.dtype.grid_form() else { return Ok(None) };
        if cols % form.run != 0 {
            return Ok(None);
        }
        let Some(g) = gguf::carried_grid(info.dtype, self.file.raw(info), dtype) else { return Ok(None) };
        if g.values.len() != rows * cols {
            return Err(Error::malformed(
                self.file.path(),
                format!("tensor `{}` holds the wrong number of blocks", info.name),
            ));
        }
        let runs = cols / form.run;
        let floats = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
        let values = Tensor::from_ints(form.container, vec![rows, cols], &self.hf_rows(info, g.values, cols)?)?;
        let scale = Tensor::from_floats(dtype, vec![rows, runs], &floats(self.hf_rows(info, g.scales, runs)?))?;
        let mut inputs = vec![("scale", scale)];
        if let Some(offsets) = g.offsets {
            inputs.push((
                "offset",
                Tensor::from_floats(dtype, vec![rows, runs], &floats(self.hf_rows(info, offsets, runs)?))?,
            ));
        }
        let data_from = match form.lut {
            // The indices expand over the type's one table first (4, 8 or 16 levels for uint2,
            // uint3 or uint4 indices); the block scales apply after.
            Some(lut) => {
                let levels: Vec<f64> = lut.iter().map(|&v| f64::from(v)).collect();
                let lut = Tensor::from_floats(dtype, vec![1, 1, lut.len(), 1], &levels)?;
                Some(Box::new(Compressed {
                    op: "constexpr_lut_to_dense",
                    inputs: vec![("indices", values), ("lut", lut)],
                    data_from: None,
                }))
            }
            None => {
                inputs.insert(0, ("data", values));
                None
            }
        };
        let compressed = Compressed { op: "constexpr_blockwise_shift_scale", inputs, data_from };
        let table = form.lut.map(|lut| format!(" index into the {}-level {} table", lut.len(), info.dtype));
        let description = format!(
            "{}{} × {dtype} scale{} per {}",
            form.container.name(),
            table.unwrap_or_default(),
            if form.min { " − offset" } else { "" },
            form.run
        );
        Ok(Some(CarriedWeight { compressed, max_error: g.max_error, description }))
    }
}

impl GgufCheckpoint {
    /// A GPT-2 Conv1D weight, which Hugging Face names hold transposed.
    fn is_conv1d(&self, info: &gguf::TensorInfo) -> bool {
        let matrices = ["attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"];
        self.conv1d && info.shape.len() == 2 && matrices.iter().any(|m| info.name.ends_with(m))
    }

    /// Row order as Hugging Face has it: llama's Q and K rows are stored permuted for ggml's rope.
    fn hf_rows<T: Copy>(&self, info: &gguf::TensorInfo, data: Vec<T>, cols: usize) -> Result<Vec<T>> {
        let q = info.name.ends_with("attn_q.weight");
        if self.permuted_qk && (q || info.name.ends_with("attn_k.weight")) {
            let heads = if q { self.heads.0 } else { self.heads.1 };
            return gguf::unpermute_qk(&data, info.shape[0], cols, heads);
        }
        Ok(data)
    }
}

/// The files a runtime needs, rebuilt from GGUF metadata.
pub fn extras(g: &GgufFile) -> Result<Vec<(String, Vec<u8>)>> {
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON values serialize");
    Ok(vec![
        ("tokenizer.json".to_string(), pretty(&gguf::tokenizer_json(g)?)),
        ("tokenizer_config.json".to_string(), pretty(&gguf::tokenizer_config_json(g)?)),
    ])
}
