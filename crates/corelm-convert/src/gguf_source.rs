//! A GGUF file as a conversion source: its metadata becomes a Hugging Face style `config.json`
//! (so one parser serves both), and its tensors are served under Hugging Face names, with
//! llama.cpp's storage conventions undone (Q/K row permutation, Gemma's and Qwen3.5's `1 + w`
//! norms, GPT-2's Conv1D transpose, Granite 4's gate/up projection split in two, Qwen3.5's
//! value heads tiled, `A_log` stored as `−exp(A_log)` by Qwen3.5 and Granite 4.0-H, whose
//! Mamba-2 `A_log`, `D` and norm gains come reshaped).

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
    ("smollm3", "smollm3"),
    // Granite 4's dense models too, which llama.cpp's converter writes as `granite` and
    // granite_fields tells by the keys only its hybrid class writes.
    ("granite", "granite"),
    // What that class writes for Granite 4's hybrid models (4.0-H): Mamba-2 layers marked by a
    // KV head count of 0 (granite_mamba2_fields); experts refused by granite_refusals. One whose
    // layers all attend (converters before llama.cpp's rename of non-hybrid models wrote dense
    // ones so) converts as the `granite` ones do.
    ("granitehybrid", "granitemoehybrid"),
    // OLMo 3 too, which config_json tells by its sliding window.
    ("olmo2", "olmo2"),
    ("gemma3n", "gemma3n_text"),
    ("gemma4", "gemma4_text"),
    // Hybrids: short-convolution layers marked by a KV head count of 0 (lfm2_fields); Gated
    // DeltaNet layers every `full_attention_interval`-th layer aside (qwen35_fields).
    ("lfm2", "lfm2"),
    ("qwen35", "qwen3_5_text"),
];

pub struct GgufCheckpoint {
    file: GgufFile,
    /// Undo llama.cpp's Q/K row permutation (llama, SmolLM3 and Granite).
    permuted_qk: bool,
    /// Gemma norms are stored as `1 + w`.
    norm_offset: bool,
    /// `post_attention_layernorm` normalizes the attention output (Gemma 2/3's sandwich, OLMo 2's
    /// post norms), rather than the MLP input.
    post_attention_norm: bool,
    /// GPT-2's Conv1D weights: Hugging Face stores them (in, out), llama.cpp (out, in).
    conv1d: bool,
    heads: (usize, usize),
    /// Qwen3.5's Gated DeltaNet heads: llama.cpp tiles their value heads and stores `−exp(A_log)`.
    delta: Option<DeltaHeads>,
    /// Granite 4.0-H's Mamba-2 layers (`granitehybrid`): llama.cpp stores `−exp(A_log)` and
    /// reshapes `A_log` and `D` to (heads, 1), the gated norm's gain to (groups, values / groups).
    mamba2: bool,
    /// Rows of the per-layer embedding table before the zero rows llama.cpp's converter pads it
    /// with (Gemma 3n), when it has any: served without them, as Hugging Face has the table.
    per_layer_rows: Option<usize>,
}

const PER_LAYER_TABLE: &str = "per_layer_token_embd.weight";

/// Qwen3.5's Gated DeltaNet heads. Where there are fewer key heads than value heads, llama.cpp's
/// converter reorders every per-value-head tensor from grouped by key head (k0v0, k0v1, k1v0,
/// k1v1; transformers' order) to tiled (k0v0, k1v0, k0v1, k1v1; ggml's broadcast order):
/// the value rows of `attn_qkv` (in_proj_qkv) and of the conv kernel, the rows of `attn_gate`
/// (in_proj_z), `ssm_beta`, `ssm_alpha`, `ssm_a` and `ssm_dt.bias`, the columns of `ssm_out`.
#[derive(Clone, Copy, Debug)]
struct DeltaHeads {
    key_heads: usize,
    value_heads: usize,
    key_dim: usize,
    value_dim: usize,
}

impl DeltaHeads {
    /// Whether the converter tiled them (it does whenever the counts differ; a value head count
    /// that is not a multiple of the key heads' is refused with the configuration).
    fn tiled(&self) -> bool {
        self.key_heads != self.value_heads && self.key_heads > 0 && self.value_heads.is_multiple_of(self.key_heads)
    }

    /// For a tensor whose rows llama.cpp tiled: the first tiled row and the rows per value head.
    fn tiled_rows(&self, gguf_name: &str) -> Option<(usize, usize)> {
        let values_after_qk = 2 * self.key_heads * self.key_dim;
        let layer_tensor = gguf_name.strip_prefix("blk.")?.split_once('.')?.1;
        match layer_tensor {
            "attn_qkv.weight" | "ssm_conv1d.weight" => Some((values_after_qk, self.value_dim)),
            "attn_gate.weight" => Some((0, self.value_dim)),
            "ssm_beta.weight" | "ssm_alpha.weight" | "ssm_a" | "ssm_dt.bias" => Some((0, 1)),
            _ => None,
        }
        .filter(|_| self.tiled())
    }

    /// Whether llama.cpp tiled this tensor's columns (`ssm_out`, in value-head blocks).
    fn tiled_columns(&self, gguf_name: &str) -> bool {
        self.tiled() && gguf_name.starts_with("blk.") && gguf_name.ends_with(".ssm_out.weight")
    }

    /// Value head `g·r + v` (grouped; r value heads per key head) back from where tiling put it,
    /// `v·key_heads + g`, for each block of `size` elements.
    fn grouped_from_tiled<T: Copy>(&self, tiled: &[T], size: usize) -> Vec<T> {
        let (kh, r) = (self.key_heads, self.value_heads / self.key_heads);
        let mut out = tiled.to_vec();
        for g in 0..kh {
            for v in 0..r {
                let (to, from) = ((g * r + v) * size, (v * kh + g) * size);
                out[to..to + size].copy_from_slice(&tiled[from..from + size]);
            }
        }
        out
    }
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
    if arch == "granite" || arch == "granitehybrid" {
        granite_refusals(g, &arch)?;
    }
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
    let hidden = g.require_usize(&key("embedding_length"))?;
    c.insert("hidden_size".into(), json!(hidden));
    // Gemma 3n and 4 give MLP widths (and Gemma 4 KV head counts) per layer.
    c.insert(
        "intermediate_size".into(),
        usize_or_list(g, &key("feed_forward_length"))?.ok_or_else(|| g.missing(&key("feed_forward_length")))?,
    );
    c.insert("num_hidden_layers".into(), json!(g.require_usize(&key("block_count"))?));
    let heads = g.require_usize(&key("attention.head_count"))?;
    c.insert("num_attention_heads".into(), json!(heads));
    // LFM2's and Granite 4.0-H's per-layer counts hold a 0 for each recurrent layer: lfm2_fields
    // and granite_fields read them.
    let recurrent_marks = arch == "lfm2" || arch == "granitehybrid";
    let kv = if recurrent_marks { None } else { usize_or_list(g, &key("attention.head_count_kv"))? };
    c.insert("num_key_value_heads".into(), kv.unwrap_or(json!(heads)));
    let key_length = g.get_usize(&key("attention.key_length"))?;
    if let Some(hd) = key_length {
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
    let head_dim = key_length.unwrap_or(hidden / heads.max(1));
    rope_fields(g, &arch, head_dim, &mut c)?;
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
    // Phi-3's converter writes a window of 0 for "none" (Phi-4). llama.cpp also runs Phi-3's
    // non-zero windows as full attention, where transformers slides every layer; we follow
    // transformers there.
    if let Some(w) = g.get_usize(&key("attention.sliding_window"))?.filter(|&w| w > 0) {
        c.insert("sliding_window".into(), json!(w));
        if model_type == "qwen2" || model_type == "qwen3" {
            c.insert("use_sliding_window".into(), json!(false));
        }
    }
    family_fields(g, &arch, head_dim, &mut c)?;
    if let Some(name) = g.get_str("general.name")? {
        c.insert("_name_or_path".into(), json!(name));
    }
    Ok(Value::Object(c))
}

/// `rope_theta`, `rope_scaling` and `partial_rotary_factor` (the rope dimension count), and
/// Phi-3's LongRoPE: the `rope_factors_short`/`_long` tensors, an attention factor and the trained
/// context. llama.cpp takes the long factors when its context passes `original_context_length`,
/// as our converter does with the package's context (transformers: with the sequence length).
fn rope_fields(g: &GgufFile, arch: &str, head_dim: usize, c: &mut Map<String, Value>) -> Result<()> {
    let key = |k: &str| format!("{arch}.{k}");
    if arch == "gpt2" {
        return Ok(());
    }
    if arch == "gemma3n" || arch == "gemma4" {
        return gemma_per_layer_fields(g, arch, c);
    }
    // llama.cpp's base when the key is absent, whatever the family's Hugging Face default.
    c.insert("rope_theta".into(), json!(g.get_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0)));
    let rotary_dim = g.get_usize(&key("rope.dimension_count"))?.unwrap_or(head_dim);
    if rotary_dim != head_dim {
        let partial = rotary_dim as f64 / head_dim as f64;
        // Our parser rotates ⌊head_dim × factor⌋ rounded down to even; llama.cpp's NORM-type
        // rope (the archs with permuted Q/K) pairs rows across the whole head, which the
        // unpermutation assumes.
        if rotary_dim > head_dim || (head_dim as f64 * partial) as usize & !1 != rotary_dim || permutes_qk(arch) {
            return Err(Error::malformed(
                g.path(),
                format!("{} {rotary_dim} of head size {head_dim} is not supported", key("rope.dimension_count")),
            ));
        }
        c.insert("partial_rotary_factor".into(), json!(partial));
    }
    if g.tensor("rope_freqs.weight").is_some() {
        return Err(Error::malformed(g.path(), "per-frequency rope factors (rope_freqs.weight, Llama 3.1 style) in GGUF files are not supported; convert the Hugging Face checkpoint instead"));
    }
    let kind = g.get_str(&key("rope.scaling.type"))?;
    let long = rope_factors(g, "rope_factors_long.weight", rotary_dim)?;
    let short = rope_factors(g, "rope_factors_short.weight", rotary_dim)?;
    match (long, short) {
        (Some(long), Some(short)) if matches!(kind, None | Some("longrope")) => {
            let mut s = json!({"rope_type": "longrope", "short_factor": short, "long_factor": long});
            if let Some(a) = g.get_f64(&key("rope.scaling.attn_factor"))? {
                s["attention_factor"] = json!(a);
            }
            c.insert("rope_scaling".into(), s);
            if let Some(orig) = g.get_usize(&key("rope.scaling.original_context_length"))? {
                c.insert("original_max_position_embeddings".into(), json!(orig));
            }
            return Ok(());
        }
        (None, None) => {}
        _ => {
            return Err(Error::malformed(
                g.path(),
                "LongRoPE needs both rope_factors_long.weight and rope_factors_short.weight (and no other rope scaling type)",
            ))
        }
    }
    match (kind, g.get_f64(&key("rope.scaling.factor"))?) {
        (Some("linear"), Some(f)) | (None, Some(f)) if f != 1.0 => {
            c.insert("rope_scaling".into(), json!({"rope_type": "linear", "factor": f}));
        }
        (Some(kind), _) if kind != "none" && kind != "linear" => {
            return Err(Error::malformed(g.path(), format!("rope scaling `{kind}` in GGUF files is not supported")));
        }
        _ => {}
    }
    Ok(())
}

/// A key holding one integer or one per layer, as JSON.
fn usize_or_list(g: &GgufFile, key: &str) -> Result<Option<Value>> {
    match g.get(key) {
        None => Ok(None),
        Some(gguf::MetaValue::Array(a)) => {
            let v = a.to_i128_vec().filter(|v| v.iter().all(|&x| x > 0 && x <= u32::MAX as i128));
            v.map(|v| Some(json!(v.into_iter().map(|x| x as u64).collect::<Vec<_>>())))
                .ok_or_else(|| Error::malformed(g.path(), format!("metadata key '{key}' must be positive integers")))
        }
        Some(_) => Ok(Some(json!(g.require_usize(key)?))),
    }
}

/// Gemma 3n's and 4's layer layout as their transformers config says it: layer types from the
/// sliding pattern, both RoPE bases (Gemma 4's global layers "proportional": `rope_freqs`
/// factors of 1 for the rotated pairs and ≥ 1e20 for the rest), per-layer embeddings, shared KV;
/// Gemma 4's head sizes (`key_length` global, `key_length_swa` local), per-layer KV heads and
/// k = v layers (no `attn_v`); Gemma 3n's AltUp, LAuReL and sparsity (`activation_sparsity_scale`
/// holds the normal quantiles, −∞ for dense layers).
fn gemma_per_layer_fields(g: &GgufFile, arch: &str, c: &mut Map<String, Value>) -> Result<()> {
    let key = |k: &str| format!("{arch}.{k}");
    let layers = c["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    let bad = |k: &str, what: &str| Error::malformed(g.path(), format!("metadata key '{}' must be {what}", key(k)));
    let sliding = match g.get(&key("attention.sliding_window_pattern")) {
        Some(gguf::MetaValue::Array(gguf::MetaArray::Bool(v))) if v.len() == layers => v.clone(),
        _ => return Err(bad("attention.sliding_window_pattern", &format!("a bool per layer ({layers})"))),
    };
    let types: Vec<&str> = sliding.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
    c.insert("layer_types".into(), json!(types));
    let theta = |k: &str| -> Result<f64> { g.get_f64(&key(k))?.ok_or_else(|| g.missing(&key(k))) };
    let mut full = json!({"rope_type": "default", "rope_theta": theta("rope.freq_base")?});
    if let Some(info) = g.tensor("rope_freqs.weight") {
        let factors = g.dequantize(info)?;
        let rotated = factors.iter().take_while(|&&f| f == 1.0).count();
        if factors[rotated..].iter().any(|&f| f < 1e20) {
            return Err(Error::malformed(
                g.path(),
                "rope_freqs.weight: only factors of 1 (rotated) then ≥ 1e20 (not rotated) are supported",
            ));
        }
        full["rope_type"] = json!("proportional");
        full["partial_rotary_factor"] = json!(rotated as f64 / factors.len().max(1) as f64);
    }
    let local = json!({"rope_type": "default", "rope_theta": theta("rope.freq_base_swa")?});
    c.remove("rope_theta");
    c.insert("rope_parameters".into(), json!({"full_attention": full, "sliding_attention": local}));
    c.insert("num_kv_shared_layers".into(), json!(g.get_usize(&key("attention.shared_kv_layers"))?.unwrap_or(0)));
    if let Some(cap) = g.get_f64(&key("final_logit_softcapping"))? {
        c.insert("final_logit_softcapping".into(), json!(cap));
    }
    let per_layer = g.get_usize(&key("embedding_length_per_layer_input"))?.unwrap_or(0);
    c.insert("hidden_size_per_layer_input".into(), json!(per_layer));
    if let Some(table) = g.tensor(PER_LAYER_TABLE) {
        c.insert("vocab_size_per_layer_input".into(), json!(rows_before_zero_padding(g, table)?));
    }
    if arch == "gemma3n" {
        c.insert("altup_num_inputs".into(), json!(g.get_usize(&key("altup.num_inputs"))?.unwrap_or(4)));
        c.insert("altup_active_idx".into(), json!(g.get_usize(&key("altup.active_idx"))?.unwrap_or(0)));
        c.insert("altup_correct_scale".into(), json!(g.tensor("blk.0.altup_correct_scale.weight").is_some()));
        if let Some(left) = g.tensor("blk.0.laurel_l.weight") {
            c.insert("laurel_rank".into(), json!(left.shape[0]));
        }
        let cutoffs = match g.get(&key("activation_sparsity_scale")) {
            Some(v) => v.as_array().and_then(|a| a.to_f64_vec()).filter(|v| v.len() == layers),
            None => Some(vec![f64::NEG_INFINITY; layers]),
        };
        let cutoffs = cutoffs.ok_or_else(|| bad("activation_sparsity_scale", "a number per layer"))?;
        // Kept as quantiles (the config's fractions would round-trip through Φ).
        c.insert(
            "_activation_sparsity_quantiles".into(),
            json!(cutoffs.iter().map(|z| if z.is_finite() { Some(*z) } else { None }).collect::<Vec<_>>()),
        );
    } else {
        // Gemma 4: the local head size is `key_length_swa`; global layers' come per layer.
        let global = g.get_usize(&key("attention.key_length"))?;
        let local = g.get_usize(&key("attention.key_length_swa"))?.or(global);
        if let Some(hd) = local {
            c.insert("head_dim".into(), json!(hd));
        }
        let kv = c.remove("num_key_value_heads").unwrap_or(json!(1));
        let kv_of = |l: usize| kv.as_array().map_or(kv.clone(), |a| a[l].clone());
        c.insert("num_key_value_heads".into(), kv_of(sliding.iter().position(|&s| s).unwrap_or(0)));
        let mut overrides = Map::new();
        let mut k_eq_v = false;
        for (l, _) in sliding.iter().enumerate().filter(|(_, s)| !**s) {
            overrides.insert(l.to_string(), json!({"head_dim": global, "num_key_value_heads": kv_of(l)}));
            let own_keys = g.tensor(&format!("blk.{l}.attn_k.weight")).is_some();
            k_eq_v |= own_keys && g.tensor(&format!("blk.{l}.attn_v.weight")).is_none();
        }
        c.insert("per_layer_config".into(), Value::Object(overrides));
        c.insert("attention_k_eq_v".into(), json!(k_eq_v));
    }
    Ok(())
}

/// Rows of a per-layer embedding table before the all-zero rows llama.cpp's converter pads it
/// with to the vocabulary (Gemma 3n): ids past them read row 0, as transformers does.
fn rows_before_zero_padding(g: &GgufFile, t: &gguf::TensorInfo) -> Result<usize> {
    let (rows, row_bytes) = (t.n_rows(), t.row_bytes());
    let raw = g.raw(t);
    let mut kept = rows;
    while kept > 1 {
        let row = raw.get((kept - 1) * row_bytes..kept * row_bytes).unwrap_or(&[]);
        let values = gguf::dequantize_bytes(t.dtype, row).map_err(|e| e.context(format!("tensor '{}'", t.name)))?;
        if values.is_empty() || values.iter().any(|&v| v != 0.0) {
            break;
        }
        kept -= 1;
    }
    Ok(kept)
}

/// One LongRoPE factor set: an f32 tensor with a factor per rotated pair.
fn rope_factors(g: &GgufFile, name: &str, rotary_dim: usize) -> Result<Option<Vec<f64>>> {
    let Some(info) = g.tensor(name) else { return Ok(None) };
    let v = g.dequantize(info)?;
    if v.len() != rotary_dim / 2 || v.iter().any(|x| !x.is_finite() || *x <= 0.0) {
        return Err(Error::malformed(
            g.path(),
            format!(
                "tensor `{name}` holds {} rope factors; a rotary dimension of {rotary_dim} needs {} positive ones, one per rotated pair",
                v.len(),
                rotary_dim / 2
            ),
        ));
    }
    Ok(Some(v.into_iter().map(f64::from).collect()))
}

/// What each family keeps outside the common keys, or llama.cpp hard-codes.
fn family_fields(g: &GgufFile, arch: &str, head_dim: usize, c: &mut Map<String, Value>) -> Result<()> {
    let key = |k: &str| format!("{arch}.{k}");
    match arch {
        "gemma2" | "gemma3" => {
            // Not stored in GGUF: llama.cpp hard-codes them per architecture, as do we.
            let hd = c.get("head_dim").cloned().unwrap_or(json!(256));
            c.insert("query_pre_attn_scalar".into(), hd);
            if arch == "gemma3" {
                c.insert("rope_local_base_freq".into(), json!(10_000.0));
                c.insert("sliding_window_pattern".into(), json!(6));
            } else {
                let cap =
                    |k: &str, default: f64| -> Result<Value> { Ok(json!(g.get_f64(&key(k))?.unwrap_or(default))) };
                c.insert("attn_logit_softcapping".into(), cap("attn_logit_softcapping", 50.0)?);
                c.insert("final_logit_softcapping".into(), cap("final_logit_softcapping", 30.0)?);
            }
        }
        // llama.cpp leaves RoPE out of every fourth layer (`n_no_rope_layer_step`, not stored)
        // and runs no sliding window, whatever the Hugging Face config said.
        "smollm3" => {
            c.insert("no_rope_layer_interval".into(), json!(4));
        }
        "granite" | "granitehybrid" => {
            // Absent attention scale: llama.cpp's 1/√head_dim (transformers' default is 1). The
            // others, absent, are skipped (a multiplier of 1); llama.cpp requires logit_scale.
            let attention = g.get_f64(&key("attention.scale"))?.unwrap_or(1.0 / (head_dim as f64).sqrt());
            c.insert("attention_multiplier".into(), json!(attention));
            for (gguf_key, hf) in [
                ("embedding_scale", "embedding_multiplier"),
                ("residual_scale", "residual_multiplier"),
                ("logit_scale", "logits_scaling"),
            ] {
                if let Some(v) = g.get_f64(&key(gguf_key))? {
                    c.insert(hf.into(), json!(v));
                }
            }
            granite_fields(g, arch, c)?;
        }
        "olmo2" => olmo3_fields(g, c)?,
        "lfm2" => lfm2_fields(g, c)?,
        "qwen35" => qwen35_fields(g, head_dim, c)?,
        _ => {}
    }
    Ok(())
}

/// `blk.{layer}.{name}` for each name, or an error naming the first one missing and what the
/// metadata made of the layer.
fn require_layer_tensors(g: &GgufFile, layer: usize, names: &[&str], kind: &str) -> Result<()> {
    match names.iter().map(|n| format!("blk.{layer}.{n}")).find(|t| g.tensor(t).is_none()) {
        Some(t) => Err(Error::malformed(g.path(), format!("tensor `{t}` is missing; layer {layer} is {kind}"))),
        None => Ok(()),
    }
}

/// LFM2 as llama.cpp's converter writes it: a layer is a short-convolution layer where its KV
/// head count is 0 (llama.cpp's `is_recr`) and attends otherwise; `shortconv.l_cache` is the
/// kernel's taps; `feed_forward_length` is the MLP's width, already adjusted (so no
/// `block_auto_adjust_ff_dim`); the final norm is `token_embd_norm`; the epsilon is `norm_eps`.
/// Convolution biases are taken when the file has them (llama.cpp's converter cannot write them,
/// nor its loader read them). A sliding window or non-causal attention (LFM2's audio and encoder
/// variants) is refused.
fn lfm2_fields(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    let kv_key = "lfm2.attention.head_count_kv";
    let kv = recurrent_kv(g, kv_key, c, "short-convolution")?;
    let conv: Vec<bool> = kv.iter().map(|&n| n == 0).collect();
    c.insert(
        "layer_types".into(),
        json!(conv.iter().map(|&s| if s { "conv" } else { "full_attention" }).collect::<Vec<_>>()),
    );
    c.insert("conv_L_cache".into(), json!(g.require_usize("lfm2.shortconv.l_cache")?));
    let eps = c.get("rms_norm_eps").cloned().ok_or_else(|| g.missing("lfm2.attention.layer_norm_rms_epsilon"))?;
    c.insert("norm_eps".into(), eps);
    c.insert("block_auto_adjust_ff_dim".into(), json!(false));
    if let Some(w) = c.get("sliding_window") {
        return Err(Error::malformed(
            g.path(),
            format!("lfm2.attention.sliding_window is {w}: LFM2 with sliding-window attention is not supported"),
        ));
    }
    if g.get_bool("lfm2.attention.causal")? == Some(false) {
        return Err(Error::malformed(
            g.path(),
            "lfm2.attention.causal is false: a bidirectional LFM2 (an encoder) is not supported",
        ));
    }
    let first_conv = conv.iter().position(|&s| s);
    let bias = first_conv.is_some_and(|l| g.tensor(&format!("blk.{l}.shortconv.in_proj.bias")).is_some());
    c.insert("conv_bias".into(), json!(bias));
    for (l, &is_conv) in conv.iter().enumerate() {
        if is_conv {
            let mut names = vec!["shortconv.in_proj.weight", "shortconv.conv.weight", "shortconv.out_proj.weight"];
            if bias {
                names.extend(["shortconv.in_proj.bias", "shortconv.conv.bias", "shortconv.out_proj.bias"]);
            }
            require_layer_tensors(g, l, &names, &format!("a short-convolution layer ({kv_key} is 0 for it)"))?;
        } else {
            let names = ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"];
            require_layer_tensors(g, l, &names, &format!("an attention layer ({kv_key} is {} for it)", kv[l]))?;
        }
    }
    Ok(())
}

/// A hybrid's KV head count per layer, where a 0 marks a recurrent layer (llama.cpp's `is_recr`;
/// `recurrent` names its kind): one per layer, or one for all; the head count when absent.
/// The attention layers' count, which must be one for all of them, becomes
/// `num_key_value_heads` (the head count when no layer attends).
fn recurrent_kv(g: &GgufFile, kv_key: &str, c: &mut Map<String, Value>, recurrent: &str) -> Result<Vec<i128>> {
    let layers = c["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    let heads = c["num_attention_heads"].as_u64().unwrap_or(1) as i128;
    let kv: Vec<i128> = match g.get(kv_key) {
        None => vec![heads; layers],
        Some(gguf::MetaValue::Array(a)) => a
            .to_i128_vec()
            .filter(|v| v.len() == layers && v.iter().all(|&n| (0..=u32::MAX as i128).contains(&n)))
            .ok_or_else(|| {
                Error::malformed(
                    g.path(),
                    format!("metadata key '{kv_key}' must be a count per layer ({layers}), 0 for a {recurrent} layer"),
                )
            })?,
        Some(_) => vec![g.require_usize(kv_key)? as i128; layers],
    };
    let mut attending = kv.iter().filter(|&&n| n > 0);
    let first = attending.next().copied();
    if let Some(other) = attending.find(|&&n| Some(n) != first) {
        return Err(Error::malformed(
            g.path(),
            format!(
                "{kv_key}: attention layers with {} and {other} KV heads; KV head counts that differ between layers are not supported",
                first.unwrap_or(0)
            ),
        ));
    }
    c.insert("num_key_value_heads".into(), json!(first.unwrap_or(heads)));
    Ok(kv)
}

/// Qwen3.5 (dense) as llama.cpp's converter writes it: the Gated DeltaNet sizes as `ssm.*`
/// (`conv_kernel` taps, `state_size` the key head size, `group_count` the key heads,
/// `time_step_rank` the value heads, `inner_size` value heads × value head size); the layers
/// that attend as llama.cpp tells them: `attention.recurrent_layers` (a bool per layer) when
/// present, else every `full_attention_interval`-th (default 4); the rotary share as
/// `rope.dimension_count` (written always: Qwen3.5's own default is a quarter); MTP blocks
/// (`nextn_predict_layers`, appended after the model's layers) left out. The MRoPE sections are
/// not needed: text positions are the same on every section.
fn qwen35_fields(g: &GgufFile, head_dim: usize, c: &mut Map<String, Value>) -> Result<()> {
    let key = |k: &str| format!("qwen35.{k}");
    let blocks = c["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    let nextn = g.get_usize(&key("nextn_predict_layers"))?.unwrap_or(0);
    if nextn >= blocks {
        return Err(Error::malformed(
            g.path(),
            format!("{} is {nextn} of {blocks} blocks: no layers would be left", key("nextn_predict_layers")),
        ));
    }
    let layers = blocks - nextn;
    c.insert("num_hidden_layers".into(), json!(layers));
    let recurrent_key = key("attention.recurrent_layers");
    let mut why = format!("by {recurrent_key}");
    let recurrent: Vec<bool> = match g.get(&recurrent_key) {
        Some(gguf::MetaValue::Array(gguf::MetaArray::Bool(v))) if v.len() >= layers => v[..layers].to_vec(),
        Some(_) => {
            return Err(Error::malformed(
                g.path(),
                format!("metadata key '{recurrent_key}' must be a bool per layer ({layers})"),
            ))
        }
        None => {
            let interval_key = key("full_attention_interval");
            let interval = g.get_usize(&interval_key)?.unwrap_or(4);
            if interval == 0 {
                return Err(Error::malformed(g.path(), format!("metadata key '{interval_key}' is 0")));
            }
            why = format!("{interval_key} being {interval}");
            (0..layers).map(|l| (l + 1) % interval != 0).collect()
        }
    };
    let types: Vec<&str> = recurrent.iter().map(|&r| if r { "linear_attention" } else { "full_attention" }).collect();
    c.insert("layer_types".into(), json!(types));
    let ssm = |k: &str| g.require_usize(&key(k));
    let (value_heads, inner) = (ssm("ssm.time_step_rank")?, ssm("ssm.inner_size")?);
    if value_heads == 0 || !inner.is_multiple_of(value_heads) {
        return Err(Error::malformed(
            g.path(),
            format!(
                "{} ({inner}) is not a multiple of {} ({value_heads})",
                key("ssm.inner_size"),
                key("ssm.time_step_rank")
            ),
        ));
    }
    c.insert("linear_conv_kernel_dim".into(), json!(ssm("ssm.conv_kernel")?));
    c.insert("linear_key_head_dim".into(), json!(ssm("ssm.state_size")?));
    c.insert("linear_num_key_heads".into(), json!(ssm("ssm.group_count")?));
    c.insert("linear_num_value_heads".into(), json!(value_heads));
    c.insert("linear_value_head_dim".into(), json!(inner / value_heads));
    let rotary = g.get_usize(&key("rope.dimension_count"))?.unwrap_or(head_dim);
    c.insert("partial_rotary_factor".into(), json!(rotary as f64 / head_dim.max(1) as f64));
    let delta = [
        "attn_qkv.weight",
        "attn_gate.weight",
        "ssm_conv1d.weight",
        "ssm_dt.bias",
        "ssm_a",
        "ssm_beta.weight",
        "ssm_alpha.weight",
        "ssm_norm.weight",
        "ssm_out.weight",
    ];
    let attention = ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"];
    for (l, &r) in recurrent.iter().enumerate() {
        match r {
            true => require_layer_tensors(g, l, &delta, &format!("a Gated DeltaNet layer, {why}"))?,
            false => require_layer_tensors(g, l, &attention, &format!("an attention layer, {why}"))?,
        }
    }
    Ok(())
}

/// What a Granite file holds that corelm does not convert, refused by its key: experts
/// (`expert_count`: Granite 4 H-Tiny's and H-Small's `granitehybrid` files), and in a `granite`
/// file a KV head count of 0 (llama.cpp's mark of a recurrent layer, which its `granite` graph
/// has no Mamba-2 layer for; the converter writes Granite 4's hybrids as `granitehybrid`).
fn granite_refusals(g: &GgufFile, arch: &str) -> Result<()> {
    let key = |k: &str| format!("{arch}.{k}");
    if let Some(n) = g.get_usize(&key("expert_count"))?.filter(|&n| n > 0) {
        return Err(Error::malformed(
            g.path(),
            format!(
                "{} is {n}: a Granite mixture of experts is not supported (only dense Granite models convert)",
                key("expert_count")
            ),
        ));
    }
    if arch != "granite" {
        return Ok(());
    }
    let kv_key = key("attention.head_count_kv");
    if let Some(gguf::MetaValue::Array(a)) = g.get(&kv_key) {
        let kv = a
            .to_i128_vec()
            .ok_or_else(|| Error::malformed(g.path(), format!("metadata key '{kv_key}' must be integers")))?;
        let recurrent: Vec<String> =
            kv.iter().enumerate().filter(|(_, &n)| n == 0).map(|(l, _)| l.to_string()).collect();
        if !recurrent.is_empty() {
            return Err(Error::malformed(
                g.path(),
                format!(
                    "{kv_key} is 0 for layer(s) {}: Mamba-2 layers in a `granite` file are not supported (llama.cpp's converter writes Granite 4's hybrids as `granitehybrid`, whose graph has them)",
                    recurrent.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Granite 4's dense models (`granitemoehybrid` with attention layers only and no experts) as
/// llama.cpp's converter writes them: as `granite` (it renames a GraniteMoeHybrid without Mamba-2
/// layers), told from Granite 3 by the keys only that class writes: `ssm.*` (unused), the MLP
/// width as `expert_shared_feed_forward_length` (`feed_forward_length` is the config's
/// `intermediate_size`, the experts' width, equal to it in IBM's releases) and
/// `rope.scaling.finetuned`, llama.cpp's RoPE switch for Granite (true when absent; the converter
/// writes true for every model without Mamba-2 layers). `granitehybrid` files whose layers all
/// attend are the same model. The KV head count comes as one per layer: all equal here, but
/// for `granitehybrid`'s 0s, which mark its Mamba-2 layers (granite_mamba2_fields).
fn granite_fields(g: &GgufFile, arch: &str, c: &mut Map<String, Value>) -> Result<()> {
    let key = |k: &str| format!("{arch}.{k}");
    let layers = c["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    let mut mamba = vec![false; layers];
    if arch == "granitehybrid" {
        let kv = recurrent_kv(g, &key("attention.head_count_kv"), c, "Mamba-2")?;
        mamba = kv.iter().map(|&n| n == 0).collect();
        if mamba.contains(&true) {
            granite_mamba2_fields(g, c, &kv)?;
        }
    } else if let Some(Value::Array(kv)) = c.get("num_key_value_heads") {
        match kv.first() {
            Some(first) if kv.iter().all(|n| n == first) => {
                let first = first.clone();
                c.insert("num_key_value_heads".into(), first);
            }
            _ => {
                return Err(Error::malformed(
                    g.path(),
                    format!(
                        "{}: KV head counts that differ between layers are not supported",
                        key("attention.head_count_kv")
                    ),
                ))
            }
        }
    }
    let hybrid_keys = ["ssm.conv_kernel", "ssm.state_size", "ssm.group_count", "ssm.inner_size", "ssm.time_step_rank"];
    let shared = g.get_usize(&key("expert_shared_feed_forward_length"))?;
    let rope = g.get_bool(&key("rope.scaling.finetuned"))?;
    let granite4 = arch == "granitehybrid"
        || shared.is_some()
        || rope.is_some()
        || hybrid_keys.iter().any(|k| g.get(&key(k)).is_some());
    if !granite4 {
        return Ok(());
    }
    let width = match shared {
        Some(w) => json!(w),
        None => c["intermediate_size"].clone(),
    };
    c.insert("model_type".into(), json!("granitemoehybrid"));
    c.insert("shared_intermediate_size".into(), width);
    c.insert("num_local_experts".into(), json!(0));
    let types: Vec<&str> = mamba.iter().map(|&m| if m { "linear_attention" } else { "full_attention" }).collect();
    c.insert("layer_types".into(), json!(types));
    c.insert("position_embedding_type".into(), json!(if rope.unwrap_or(true) { "rope" } else { "nope" }));
    Ok(())
}

/// Granite 4.0-H's Mamba-2 layers as llama.cpp's converter writes them (GraniteHybridModel on
/// Mamba2Model): a KV head count of 0 marks one (`kv`); `ssm.time_step_rank` is the heads,
/// `ssm.inner_size` their values (`mamba_expand` × hidden), `ssm.group_count` the groups of B and
/// C, `ssm.state_size` their size, `ssm.conv_kernel` the taps. The convolution's bias is taken
/// when the file has it (llama.cpp's loader: optional), the projections' biases likewise (the
/// converter writes them; llama.cpp's loader has no place for them). No time-step limit:
/// llama.cpp's scan bounds no time step, whatever transformers' `time_step_limit` said (the
/// converter writes none). Each Mamba-2 layer must hold what llama.cpp's loader requires, each
/// attention layer its projections.
fn granite_mamba2_fields(g: &GgufFile, c: &mut Map<String, Value>, kv: &[i128]) -> Result<()> {
    let key = |k: &str| format!("granitehybrid.{k}");
    let ssm = |k: &str| g.require_usize(&key(k));
    let hidden = c["hidden_size"].as_u64().unwrap_or(0) as usize;
    let (heads, inner) = (ssm("ssm.time_step_rank")?, ssm("ssm.inner_size")?);
    let not_multiple = |of: &str, n: usize| {
        Error::malformed(
            g.path(),
            format!("{} ({inner}) is not a multiple of {} ({n})", key("ssm.inner_size"), key(of)),
        )
    };
    if heads == 0 || !inner.is_multiple_of(heads) {
        return Err(not_multiple("ssm.time_step_rank", heads));
    }
    if hidden == 0 || !inner.is_multiple_of(hidden) {
        return Err(not_multiple("embedding_length", hidden));
    }
    c.insert("mamba_n_heads".into(), json!(heads));
    c.insert("mamba_d_head".into(), json!(inner / heads));
    c.insert("mamba_expand".into(), json!(inner / hidden));
    c.insert("mamba_n_groups".into(), json!(ssm("ssm.group_count")?));
    c.insert("mamba_d_state".into(), json!(ssm("ssm.state_size")?));
    c.insert("mamba_d_conv".into(), json!(ssm("ssm.conv_kernel")?));
    let first = kv.iter().position(|&n| n == 0);
    let has = |t: &str| first.is_some_and(|l| g.tensor(&format!("blk.{l}.{t}")).is_some());
    let (conv_bias, proj_bias) = (has("ssm_conv1d.bias"), has("ssm_in.bias"));
    c.insert("mamba_conv_bias".into(), json!(conv_bias));
    c.insert("mamba_proj_bias".into(), json!(proj_bias));
    let kv_key = key("attention.head_count_kv");
    for (l, &n) in kv.iter().enumerate() {
        if n == 0 {
            let mut names = vec![
                "ssm_in.weight",
                "ssm_conv1d.weight",
                "ssm_dt.bias",
                "ssm_a",
                "ssm_d",
                "ssm_norm.weight",
                "ssm_out.weight",
            ];
            if conv_bias {
                names.push("ssm_conv1d.bias");
            }
            if proj_bias {
                names.extend(["ssm_in.bias", "ssm_out.bias"]);
            }
            require_layer_tensors(g, l, &names, &format!("a Mamba-2 layer ({kv_key} is 0 for it)"))?;
        } else {
            let names = ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"];
            require_layer_tensors(g, l, &names, &format!("an attention layer ({kv_key} is {n} for it)"))?;
        }
    }
    Ok(())
}

/// OLMo 3 is written as `olmo2` with a sliding window: its layers' pattern (a bool per layer,
/// or a period, llama.cpp's default 4) makes it `olmo3`. llama.cpp ropes the sliding layers with
/// the full layers' base and no scaling; it reads `rope.freq_base_swa` but its graph does not
/// use it (transformers would take that theta). A nested `rope_parameters` says so to our parser.
fn olmo3_fields(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    let Some(window) = c.get("sliding_window").and_then(Value::as_u64) else { return Ok(()) };
    let layers = c["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    let pattern_key = "olmo2.attention.sliding_window_pattern";
    let sliding: Vec<bool> = match g.get(pattern_key) {
        Some(gguf::MetaValue::Array(gguf::MetaArray::Bool(v))) if v.len() == layers => v.clone(),
        None => (0..layers).map(|l| (l + 1) % 4 != 0).collect(),
        Some(v) => match v.as_i128().and_then(|p| usize::try_from(p).ok()) {
            // llama.cpp's set_swa_pattern: all but the last layer of each period slide.
            Some(period) => (0..layers).map(|l| period == 0 || l % period < period - 1).collect(),
            None => {
                return Err(Error::malformed(
                    g.path(),
                    format!("metadata key '{pattern_key}' must be a bool per layer ({layers}) or a period"),
                ))
            }
        },
    };
    if !sliding.contains(&true) {
        return Ok(());
    }
    let types: Vec<&str> = sliding.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
    let theta = c.remove("rope_theta").unwrap_or(json!(10_000.0));
    let mut full = c.remove("rope_scaling").unwrap_or(json!({"rope_type": "default"}));
    full["rope_theta"] = theta.clone();
    c.insert("model_type".into(), json!("olmo3"));
    c.insert("sliding_window".into(), json!(window));
    c.insert("layer_types".into(), json!(types));
    c.insert(
        "rope_parameters".into(),
        json!({"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": theta}}),
    );
    Ok(())
}

/// Architectures whose Q/K rows llama.cpp's converter permutes (its LlamaModel subclasses, and
/// GraniteHybridModel's attention layers).
fn permutes_qk(arch: &str) -> bool {
    matches!(arch, "llama" | "smollm3" | "granite" | "granitehybrid")
}

/// Granite 4's fused `shared_mlp.input_linear` (gate rows, then up rows), which llama.cpp's
/// converter splits into `ffn_gate` and `ffn_up`.
const GRANITE4_GATE_UP: &str = ".shared_mlp.input_linear.weight";

impl GgufCheckpoint {
    /// Opens a GGUF file; returns the checkpoint and the config.json equivalent of its metadata.
    pub fn open(path: &Path) -> Result<(GgufCheckpoint, Value)> {
        let file = GgufFile::open(path)?;
        let config = config_json(&file)?;
        let arch = file.architecture()?.to_string();
        let per_layer_rows = config["vocab_size_per_layer_input"]
            .as_u64()
            .map(|r| r as usize)
            .filter(|&r| file.tensor(PER_LAYER_TABLE).is_some_and(|t| t.n_rows() > r));
        let heads = (
            config["num_attention_heads"].as_u64().unwrap_or(1) as usize,
            config["num_key_value_heads"].as_u64().unwrap_or(1) as usize,
        );
        let size = |k: &str| config[k].as_u64().unwrap_or(0) as usize;
        let delta = (arch == "qwen35").then(|| DeltaHeads {
            key_heads: size("linear_num_key_heads"),
            value_heads: size("linear_num_value_heads"),
            key_dim: size("linear_key_head_dim"),
            value_dim: size("linear_value_head_dim"),
        });
        Ok((
            GgufCheckpoint {
                permuted_qk: permutes_qk(&arch),
                // Gemma 3n and 4 norms multiply by their weight as stored; Qwen3.5's are stored as
                // 1 + w like Gemma 1-3's (all but the DeltaNet output norm).
                norm_offset: matches!(arch.as_str(), "gemma" | "gemma2" | "gemma3" | "qwen35"),
                post_attention_norm: matches!(
                    arch.as_str(),
                    "gemma2" | "gemma3" | "gemma3n" | "gemma4" | "olmo2" | "qwen35"
                ),
                conv1d: arch == "gpt2",
                heads,
                delta,
                mamba2: arch == "granitehybrid",
                per_layer_rows,
                file,
            },
            config,
        ))
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The GGUF name of a Hugging Face tensor name, and for one of AltUp's projections (stacked
    /// in one GGUF tensor) its index in the stack.
    fn gguf_name(&self, hf: &str) -> Option<(String, Option<usize>)> {
        let direct = match hf {
            "model.embed_tokens.weight" | "transformer.wte.weight" => Some("token_embd.weight"),
            "model.norm.weight" | "transformer.ln_f.weight" => Some("output_norm.weight"),
            "transformer.ln_f.bias" => Some("output_norm.bias"),
            "transformer.wpe.weight" => Some("position_embd.weight"),
            "lm_head.weight" => Some("output.weight"),
            "model.embed_tokens_per_layer.weight" => Some("per_layer_token_embd.weight"),
            "model.per_layer_model_projection.weight" => Some("per_layer_model_proj.weight"),
            "model.per_layer_projection_norm.weight" => Some("per_layer_proj_norm.weight"),
            // LFM2's final norm
            "model.embedding_norm.weight" => Some("token_embd_norm.weight"),
            _ => None,
        };
        if let Some(d) = direct {
            return Some((d.to_string(), None));
        }
        for (prefix, stacked) in [
            ("model.altup_projections.", "altup_proj.weight"),
            ("model.altup_unembed_projections.", "altup_unembd_proj.weight"),
        ] {
            if let Some(i) = hf.strip_prefix(prefix).and_then(|r| r.strip_suffix(".weight")) {
                return Some((stacked.to_string(), Some(i.parse().ok()?)));
            }
        }
        let rest = hf.strip_prefix("model.layers.").or_else(|| hf.strip_prefix("transformer.h."))?;
        let (layer, tail) = rest.split_once('.')?;
        // Parameters named without `.weight` in Hugging Face.
        let (module, suffix) = match tail {
            "layer_scalar" => ("layer_scalar", "weight"),
            "altup.correct_output_scale" => ("altup.correct_output_scale", "weight"),
            // Qwen3.5's: renamed dt_proj.bias by llama.cpp's converter; A_log keeps no suffix.
            "linear_attn.dt_bias" => ("linear_attn.dt_proj", "bias"),
            "linear_attn.A_log" => return Some((format!("blk.{layer}.ssm_a"), None)),
            // Granite 4.0-H's Mamba-2: the same renaming; D keeps no suffix either.
            "mamba.dt_bias" => ("mamba.dt_proj", "bias"),
            "mamba.A_log" => return Some((format!("blk.{layer}.ssm_a"), None)),
            "mamba.D" => return Some((format!("blk.{layer}.ssm_d"), None)),
            _ => tail.rsplit_once('.')?,
        };
        let name = match module {
            "input_layernorm" => "attn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.qkv_proj" => "attn_qkv",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "post_attention_layernorm" if self.post_attention_norm => "post_attention_norm",
            "post_attention_layernorm" => "ffn_norm",
            "pre_feedforward_layernorm" => "ffn_norm",
            "post_feedforward_layernorm" => "post_ffw_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" | "mlp.gate_up_proj" => "ffn_up",
            "mlp.down_proj" | "shared_mlp.output_linear" => "ffn_down",
            // GPT-2
            "ln_1" => "attn_norm",
            "attn.c_attn" => "attn_qkv",
            "attn.c_proj" => "attn_output",
            "ln_2" => "ffn_norm",
            "mlp.c_fc" => "ffn_up",
            "mlp.c_proj" => "ffn_down",
            // Gemma 3n and 4
            "layer_scalar" => "layer_output_scale",
            "per_layer_input_gate" => "inp_gate",
            "per_layer_projection" => "proj",
            "post_per_layer_input_norm" => "post_norm",
            "laurel.linear_left" => "laurel_l",
            "laurel.linear_right" => "laurel_r",
            "laurel.post_laurel_norm" => "laurel_post_norm",
            "altup.correct_output_scale" => "altup_correct_scale",
            "altup.correction_coefs" => "altup_correct_coef",
            "altup.prediction_coefs" => "altup_predict_coef",
            "altup.modality_router" => "altup_router",
            "altup.router_norm" => "altup_router_norm",
            // LFM2
            "operator_norm" => "attn_norm",
            "ffn_norm" => "ffn_norm",
            "feed_forward.w1" => "ffn_gate",
            "feed_forward.w3" => "ffn_up",
            "feed_forward.w2" => "ffn_down",
            "self_attn.q_layernorm" => "attn_q_norm",
            "self_attn.k_layernorm" => "attn_k_norm",
            "self_attn.out_proj" => "attn_output",
            "conv.in_proj" => "shortconv.in_proj",
            "conv.conv" => "shortconv.conv",
            "conv.out_proj" => "shortconv.out_proj",
            // Qwen3.5's Gated DeltaNet
            "linear_attn.in_proj_qkv" => "attn_qkv",
            "linear_attn.in_proj_z" => "attn_gate",
            "linear_attn.in_proj_b" => "ssm_beta",
            "linear_attn.in_proj_a" => "ssm_alpha",
            "linear_attn.conv1d" => "ssm_conv1d",
            "linear_attn.dt_proj" => "ssm_dt",
            "linear_attn.norm" => "ssm_norm",
            "linear_attn.out_proj" => "ssm_out",
            // Granite 4.0-H's Mamba-2
            "mamba.in_proj" => "ssm_in",
            "mamba.conv1d" => "ssm_conv1d",
            "mamba.dt_proj" => "ssm_dt",
            "mamba.norm" => "ssm_norm",
            "mamba.out_proj" => "ssm_out",
            _ => return None,
        };
        Some((format!("blk.{layer}.{name}.{suffix}"), None))
    }

    fn info(&self, hf: &str) -> Option<&gguf::TensorInfo> {
        self.file.tensor(&self.gguf_name(hf)?.0)
    }

    /// For Granite 4's fused gate/up name, the `ffn_gate` and `ffn_up` it is served from.
    fn gate_up(&self, hf: &str) -> Option<(&gguf::TensorInfo, &gguf::TensorInfo)> {
        let layer = hf.strip_prefix("model.layers.")?.strip_suffix(GRANITE4_GATE_UP)?;
        let part = |p: &str| self.file.tensor(&format!("blk.{layer}.{p}.weight"));
        Some((part("ffn_gate")?, part("ffn_up")?))
    }

    /// For one of a stack's matrices, its index and the stack's (count, rows, cols).
    fn stacked(&self, hf: &str) -> Option<(usize, [usize; 3])> {
        let (_, index) = self.gguf_name(hf)?;
        match (index, self.info(hf)?.shape.as_slice()) {
            (Some(i), &[n, rows, cols]) if i < n => Some((i, [n, rows, cols])),
            _ => None,
        }
    }
}

impl Checkpoint for GgufCheckpoint {
    fn source(&self) -> &Path {
        self.file.path()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        if let Some((gate, up)) = self.gate_up(name) {
            return match (gate.shape.as_slice(), up.shape.as_slice()) {
                (&[g, cols], &[u, _]) => Some(vec![g + u, cols]),
                _ => Some(gate.shape.clone()),
            };
        }
        if let Some((_, [_, rows, cols])) = self.stacked(name) {
            return Some(vec![rows, cols]);
        }
        let info = self.info(name)?;
        if self.gguf_name(name)?.1.is_some() {
            return None;
        }
        let mut shape = info.shape.clone();
        if self.is_conv1d(info) {
            shape.reverse();
        }
        if self.reshaped_mamba2(info) {
            shape = vec![shape.iter().product()];
        }
        if let Some(rows) = self.per_layer_rows.filter(|_| info.name == PER_LAYER_TABLE) {
            shape[0] = rows;
        }
        Some(shape)
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        if let Some((gate, up)) = self.gate_up(name) {
            if gate.shape.len() != 2 || gate.shape.get(1) != up.shape.get(1) || up.shape.len() != 2 {
                return Err(Error::malformed(
                    self.file.path(),
                    format!(
                        "tensors `{}` {:?} and `{}` {:?} are not two matrices of one width",
                        gate.name, gate.shape, up.name, up.shape
                    ),
                ));
            }
            let mut data = self.file.dequantize(gate)?;
            data.extend(self.file.dequantize(up)?);
            return Ok(data);
        }
        let info =
            self.info(name).ok_or_else(|| Error::malformed(self.file.path(), format!("tensor `{name}` is missing")))?;
        let mut data = self.file.dequantize(info)?;
        if let Some((i, [_, rows, cols])) = self.stacked(name) {
            return Ok(data.drain(i * rows * cols..(i + 1) * rows * cols).collect());
        }
        if let Some(rows) = self.per_layer_rows.filter(|_| info.name == PER_LAYER_TABLE) {
            data.truncate(rows * info.row_len());
        }
        // Qwen3.5's DeltaNet output norm is the one norm stored as it is.
        if self.norm_offset && info.name.ends_with("norm.weight") && !info.name.ends_with("ssm_norm.weight") {
            data.iter_mut().for_each(|v| *v -= 1.0);
        }
        if self.is_conv1d(info) {
            let (rows, cols) = (info.shape[0], info.shape[1]);
            return Ok((0..rows * cols).map(|i| data[(i % rows) * cols + i / rows]).collect());
        }
        if info.name.ends_with(".ssm_a") && (self.delta.is_some() || self.mamba2) {
            data = self.a_log(info, data)?;
        }
        if let Some(delta) = self.delta {
            if delta.tiled_columns(&info.name) {
                let (rows, cols) = (info.n_rows(), info.row_len());
                if cols != delta.value_heads * delta.value_dim {
                    return Err(self.not_value_heads(info, cols, "columns"));
                }
                data = data.chunks(cols).flat_map(|row| delta.grouped_from_tiled(row, delta.value_dim)).collect();
                debug_assert_eq!(data.len(), rows * cols);
            }
        }
        self.hf_rows(info, data, info.shape.get(1).copied().unwrap_or(1))
    }

    fn storage(&self, name: &str) -> Option<SourceStorage> {
        if let Some((gate, up)) = self.gate_up(name) {
            let type_name = if gate.dtype == up.dtype {
                gate.dtype.name().to_string()
            } else {
                format!("{}+{}", gate.dtype.name(), up.dtype.name())
            };
            let bytes = (self.file.raw(gate).len() + self.file.raw(up).len()) as u64;
            let quantized = gate.dtype.is_quantized() || up.dtype.is_quantized();
            return Some(SourceStorage { type_name, quantized, bytes });
        }
        self.info(name).map(|i| SourceStorage {
            type_name: i.dtype.name().to_string(),
            quantized: i.dtype.is_quantized(),
            bytes: self.file.raw(i).len() as u64,
        })
    }

    fn read_grid(&self, name: &str, dtype: DType) -> Result<Option<CarriedWeight>> {
        // Tiled value-head columns (Qwen3.5's `ssm_out`) are reordered as values, not as blocks.
        let tiled_columns = |i: &gguf::TensorInfo| self.delta.is_some_and(|d| d.tiled_columns(&i.name));
        let Some(info) =
            self.info(name).filter(|i| !self.is_conv1d(i) && !tiled_columns(i) && !self.reshaped_mamba2(i))
        else {
            return Ok(None);
        };
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
            // The indices expand over the type's one table first (4, 8, 16 or 64 levels for
            // uint2, uint3, uint4 or uint6 indices); the block scales apply after.
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
        let mut compressed = Compressed { op: "constexpr_blockwise_shift_scale", inputs, data_from };
        if let Some(kept) = self.per_layer_rows.filter(|_| info.name == PER_LAYER_TABLE) {
            compressed = compressed.rows(rows, 0, kept)?;
        }
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

    /// A Mamba-2 vector llama.cpp's converter stored as a matrix (Granite 4.0-H's `ssm_a` and
    /// `ssm_d` as (heads, 1), `ssm_norm` as (groups, values / groups)): served flat, its values in
    /// the same order.
    fn reshaped_mamba2(&self, info: &gguf::TensorInfo) -> bool {
        self.mamba2
            && info.shape.len() == 2
            && ["ssm_a", "ssm_d", "ssm_norm.weight"].iter().any(|t| info.name.ends_with(&format!(".{t}")))
    }

    /// Row order as Hugging Face has it: llama's Q and K rows are stored permuted for ggml's rope,
    /// Qwen3.5's value heads tiled.
    fn hf_rows<T: Copy>(&self, info: &gguf::TensorInfo, data: Vec<T>, cols: usize) -> Result<Vec<T>> {
        let q = info.name.ends_with("attn_q.weight");
        if self.permuted_qk && (q || info.name.ends_with("attn_k.weight")) {
            let heads = if q { self.heads.0 } else { self.heads.1 };
            return gguf::unpermute_qk(&data, info.shape[0], cols, heads);
        }
        if let Some((delta, (start, per_head))) = self.delta.and_then(|d| Some((d, d.tiled_rows(&info.name)?))) {
            let rows = info.shape.first().copied().unwrap_or(0);
            let end = start + delta.value_heads * per_head;
            if end != rows || data.len() != rows * cols {
                return Err(self.not_value_heads(info, rows, "rows"));
            }
            let mut data = data;
            let grouped = delta.grouped_from_tiled(&data[start * cols..], per_head * cols);
            data[start * cols..].copy_from_slice(&grouped);
            return Ok(data);
        }
        Ok(data)
    }

    fn not_value_heads(&self, info: &gguf::TensorInfo, got: usize, what: &str) -> Error {
        let d = self.delta.expect("only Qwen3.5's tensors are reordered");
        Error::malformed(
            self.file.path(),
            format!(
                "tensor `{}` {:?} has {got} {what}, which do not hold {} value heads of {} (ssm.time_step_rank, ssm.inner_size) after {} key heads of {} (ssm.group_count, ssm.state_size)",
                info.name, info.shape, d.value_heads, d.value_dim, d.key_heads, d.key_dim
            ),
        )
    }

    /// `A_log` from what llama.cpp's converter stores, `a = −exp(A_log)`: ln(−a), in f64 and
    /// rounded once. The float32 exp before storing rounded, so this gives `A_log` back to
    /// within a rounding (where exp is flatter than its input's spacing, a neighbour of it), and
    /// the graph's exp of it `a` to within a rounding or two.
    fn a_log(&self, info: &gguf::TensorInfo, data: Vec<f32>) -> Result<Vec<f32>> {
        if let Some(bad) = data.iter().find(|&&a| !(a < 0.0 && a.is_finite())) {
            return Err(Error::malformed(
                self.file.path(),
                format!(
                    "tensor `{}` holds {bad}; llama.cpp stores −exp(A_log) there, a finite negative value",
                    info.name
                ),
            ));
        }
        Ok(data.into_iter().map(|a| (-f64::from(a)).ln() as f32).collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// tests/fixtures/tiny/granite4 as llama.cpp's converter writes it (python/gguf_reference.py).
    fn granite4() -> Vec<u8> {
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gguf/tiny_granite4.gguf")).unwrap()
    }

    /// Where `key`'s value starts: past its name and its value type.
    fn value_of(bytes: &[u8], key: &str) -> usize {
        let k = key.as_bytes();
        bytes.windows(k.len()).position(|w| w == k).expect("the key") + k.len() + 4
    }

    fn config(bytes: Vec<u8>) -> Result<Value> {
        config_json(&GgufFile::from_bytes("test.gguf", bytes)?)
    }

    enum Meta {
        U32(u32),
        Bool(bool),
        Str(&'static str),
        I32s(&'static [i32]),
    }

    /// A GGUF v3 file of metadata only.
    fn metadata_only(kvs: &[(&str, Meta)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        for (key, value) in kvs {
            string(&mut b, key);
            match value {
                Meta::U32(v) => {
                    b.extend(4u32.to_le_bytes());
                    b.extend(v.to_le_bytes());
                }
                Meta::Bool(v) => {
                    b.extend(7u32.to_le_bytes());
                    b.push(u8::from(*v));
                }
                Meta::Str(s) => {
                    b.extend(8u32.to_le_bytes());
                    string(&mut b, s);
                }
                Meta::I32s(v) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(5u32.to_le_bytes());
                    b.extend((v.len() as u64).to_le_bytes());
                    v.iter().for_each(|x| b.extend(x.to_le_bytes()));
                }
            }
        }
        b
    }

    /// A `granitehybrid` file of three layers with these KV head counts, without RoPE.
    fn granitehybrid(kv: &'static [i32]) -> Vec<u8> {
        let k = |s: &str| format!("granitehybrid.{s}");
        metadata_only(&[
            ("general.architecture", Meta::Str("granitehybrid")),
            (&k("block_count"), Meta::U32(3)),
            (&k("embedding_length"), Meta::U32(64)),
            (&k("feed_forward_length"), Meta::U32(128)),
            (&k("attention.head_count"), Meta::U32(4)),
            (&k("attention.head_count_kv"), Meta::I32s(kv)),
            (&k("vocab_size"), Meta::U32(128)),
            (&k("expert_shared_feed_forward_length"), Meta::U32(112)),
            (&k("rope.scaling.finetuned"), Meta::Bool(false)),
        ])
    }

    #[test]
    fn a_dense_granite4_written_as_granite_reads_as_granitemoehybrid() {
        let c = config(granite4()).unwrap();
        assert_eq!(c["model_type"], "granitemoehybrid");
        assert_eq!(c["shared_intermediate_size"], 112);
        assert_eq!(c["intermediate_size"], 128);
        assert_eq!(c["num_key_value_heads"], 2);
        assert_eq!(c["layer_types"], json!(["full_attention", "full_attention"]));
        assert_eq!(c["position_embedding_type"], "rope");
        assert!((c["attention_multiplier"].as_f64().unwrap() - 0.1).abs() < 1e-7);
        assert_eq!(c["logits_scaling"], 1.5);
        let m = crate::arch::read_config(Path::new("test.gguf"), &c).unwrap();
        assert_eq!(
            (m.family, m.intermediate_size, m.rope_layers),
            (crate::config::Family::Granite4, 112, vec![true; 2])
        );
    }

    #[test]
    fn granite_mamba2_layers_are_refused_naming_the_key() {
        let mut bytes = granite4();
        // The array's element type and length, then the first layer's count.
        let first = value_of(&bytes, "granite.attention.head_count_kv") + 4 + 8;
        assert_eq!(bytes[first..first + 4], 2i32.to_le_bytes());
        bytes[first..first + 4].copy_from_slice(&0i32.to_le_bytes());
        let err = config(bytes).unwrap_err().to_string();
        assert!(
            err.contains("granite.attention.head_count_kv is 0 for layer(s) 0:") && err.contains("Mamba-2"),
            "{err}"
        );

        // In a `granitehybrid` file the 0s are Mamba-2 layers, which need their sizes.
        let err = config(granitehybrid(&[0, 2, 0])).unwrap_err().to_string();
        assert!(err.contains("granitehybrid.ssm.time_step_rank"), "{err}");
    }

    #[test]
    fn granite4_h_reads_its_mamba2_layers_and_sizes() {
        let c = config(fixture("tiny_granite4_h.gguf")).unwrap();
        assert_eq!(c["model_type"], "granitemoehybrid");
        let types = ["linear_attention", "full_attention", "linear_attention", "linear_attention"];
        assert_eq!(c["layer_types"], json!(types));
        assert_eq!((c["num_key_value_heads"].clone(), c["position_embedding_type"].clone()), (json!(2), json!("nope")));
        let sizes: Vec<_> = ["mamba_n_heads", "mamba_d_head", "mamba_expand", "mamba_n_groups", "mamba_d_state"]
            .into_iter()
            .chain(["mamba_d_conv", "shared_intermediate_size"])
            .map(|k| c[k].as_u64().unwrap())
            .collect();
        assert_eq!(sizes, [4, 32, 2, 2, 16, 4, 112]);
        assert_eq!((c["mamba_conv_bias"].clone(), c["mamba_proj_bias"].clone()), (json!(true), json!(false)));
        // What the converter writes for a model without RoPE; no time-step limit (llama.cpp's scan
        // has none).
        assert_eq!((c["max_position_embeddings"].clone(), c.get("time_step_limit")), (json!(1 << 20), None));
        let m = crate::arch::read_config(Path::new("test.gguf"), &c).unwrap();
        let mixers: Vec<_> = m.layers.iter().map(|l| l.mixer).collect();
        use crate::config::Mixer::{Attention, Mamba2};
        assert_eq!(mixers, [Mamba2, Attention, Mamba2, Mamba2]);
        let la = m.linear.unwrap();
        assert_eq!((la.key_heads, la.value_heads, la.key_dim, la.value_dim, la.conv_kernel), (2, 4, 16, 32, 4));
        assert_eq!((la.conv_bias, la.proj_bias, la.time_step_limit), (true, false, None));
        assert_eq!((m.intermediate_size, m.rope_layers.clone()), (112, vec![false; 4]));
    }

    /// A Mamba-2 layer without what llama.cpp's loader requires of one is refused naming the
    /// tensor; so is an attention layer marked as one (KV heads 0); an `ssm_a` that is not
    /// −exp(A_log) is refused as Qwen3.5's is.
    #[test]
    fn granite4_h_mamba2_layers_without_their_tensors_are_refused() {
        let bytes = renamed(fixture("tiny_granite4_h.gguf"), "blk.2.ssm_conv1d.weight", "blk.2.ssm_conv1x.weight");
        let err = config(bytes).unwrap_err().to_string();
        assert!(
            err.contains("tensor `blk.2.ssm_conv1d.weight` is missing; layer 2 is a Mamba-2 layer (granitehybrid.attention.head_count_kv is 0 for it)"),
            "{err}"
        );
        // The first Mamba-2 layer has the convolution's bias: the others need it too.
        let bytes = renamed(fixture("tiny_granite4_h.gguf"), "blk.3.ssm_conv1d.bias", "blk.3.ssm_conv1x.bias");
        let err = config(bytes).unwrap_err().to_string();
        assert!(err.contains("tensor `blk.3.ssm_conv1d.bias` is missing; layer 3 is a Mamba-2 layer"), "{err}");
        let mut bytes = fixture("tiny_granite4_h.gguf");
        let second = value_of(&bytes, "granitehybrid.attention.head_count_kv") + 4 + 8 + 4;
        assert_eq!(bytes[second..second + 4], 2i32.to_le_bytes());
        bytes[second..second + 4].copy_from_slice(&0i32.to_le_bytes());
        let err = config(bytes).unwrap_err().to_string();
        assert!(err.contains("tensor `blk.1.ssm_in.weight` is missing; layer 1 is a Mamba-2 layer"), "{err}");

        let mut bytes = fixture("tiny_granite4_h.gguf");
        let at = GgufFile::from_bytes("t.gguf", bytes.clone()).unwrap().tensor("blk.3.ssm_a").unwrap().file_offset;
        bytes[at + 4..at + 8].copy_from_slice(&0.0f32.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.gguf");
        std::fs::write(&path, bytes).unwrap();
        let (ck, _) = GgufCheckpoint::open(&path).unwrap();
        let err = ck.read_f32("model.layers.3.mamba.A_log").unwrap_err().to_string();
        assert!(err.contains("tensor `blk.3.ssm_a` holds 0; llama.cpp stores −exp(A_log)"), "{err}");
        // Served flat, as transformers has them: A_log and D (heads), the norm's gain (values).
        let shapes: Vec<_> = ["A_log", "D", "norm.weight", "conv1d.weight", "in_proj.weight"]
            .into_iter()
            .map(|t| ck.shape(&format!("model.layers.0.mamba.{t}")).unwrap())
            .collect();
        assert_eq!(shapes, [vec![4], vec![4], vec![128], vec![192, 4], vec![324, 64]]);
    }

    #[test]
    fn granite_experts_are_refused_naming_the_key() {
        let mut bytes = granite4();
        let at = value_of(&bytes, "granite.expert_count");
        bytes[at..at + 4].copy_from_slice(&8u32.to_le_bytes());
        let err = config(bytes).unwrap_err().to_string();
        assert!(err.contains("granite.expert_count is 8: a Granite mixture of experts"), "{err}");
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/tests/fixtures/gguf/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    /// `bytes` with the tensor info (or key) named `from` renamed `to`, of the same length.
    fn renamed(mut bytes: Vec<u8>, from: &str, to: &str) -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        let at = bytes.windows(from.len()).position(|w| w == from.as_bytes()).expect("the name");
        bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
        bytes
    }

    #[test]
    fn lfm2_reads_its_layer_kinds_from_the_kv_head_counts() {
        let c = config(fixture("tiny_lfm2.gguf")).unwrap();
        assert_eq!(c["model_type"], "lfm2");
        assert_eq!(c["layer_types"], json!(["conv", "full_attention", "conv", "conv"]));
        assert_eq!((c["num_key_value_heads"].clone(), c["conv_L_cache"].clone()), (json!(2), json!(3)));
        assert_eq!((c["conv_bias"].clone(), c["block_auto_adjust_ff_dim"].clone()), (json!(false), json!(false)));
        assert_eq!((c["intermediate_size"].clone(), c["tie_word_embeddings"].clone()), (json!(128), json!(true)));
        assert_eq!(c["norm_eps"].as_f64().unwrap() as f32, 1e-5);
        let m = crate::arch::read_config(Path::new("test.gguf"), &c).unwrap();
        let conv = crate::config::Mixer::ShortConv { kernel: 3, bias: false };
        let mixers: Vec<_> = m.layers.iter().map(|l| l.mixer).collect();
        assert_eq!(mixers, [conv, crate::config::Mixer::Attention, conv, conv]);
    }

    #[test]
    fn qwen35_reads_its_delta_net_sizes_and_layer_kinds() {
        let c = config(fixture("tiny_qwen3_5_text.gguf")).unwrap();
        assert_eq!(c["model_type"], "qwen3_5_text");
        let types = ["linear_attention", "linear_attention", "linear_attention", "full_attention"];
        assert_eq!(c["layer_types"], json!(types));
        let sizes: Vec<_> = ["linear_conv_kernel_dim", "linear_key_head_dim", "linear_num_key_heads"]
            .into_iter()
            .chain(["linear_num_value_heads", "linear_value_head_dim", "head_dim", "num_hidden_layers"])
            .map(|k| c[k].as_u64().unwrap())
            .collect();
        assert_eq!(sizes, [4, 16, 2, 4, 16, 16, 4]);
        assert_eq!((c["partial_rotary_factor"].clone(), c["tie_word_embeddings"].clone()), (json!(0.25), json!(false)));
        let m = crate::arch::read_config(Path::new("test.gguf"), &c).unwrap();
        assert_eq!(m.rope.unwrap().rotary_dim, 4);

        // An MTP block (here a fifth block, `nextn_predict_layers` 1 in place of key_length) is
        // left out.
        let mut bytes =
            renamed(fixture("tiny_qwen3_5_text.gguf"), "qwen35.attention.key_length", "qwen35.nextn_predict_layers");
        let at = value_of(&bytes, "qwen35.block_count");
        bytes[at..at + 4].copy_from_slice(&5u32.to_le_bytes());
        let at = value_of(&bytes, "qwen35.nextn_predict_layers");
        bytes[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
        let c = config(bytes).unwrap();
        assert_eq!((c["num_hidden_layers"].clone(), c["layer_types"].clone()), (json!(4), json!(types)));
    }

    /// A layer the metadata makes recurrent but whose tensors are not there is refused naming
    /// the first tensor missing and why the layer is what it is.
    #[test]
    fn a_recurrent_layer_without_its_tensors_is_refused_naming_the_tensor() {
        let lfm2 = renamed(fixture("tiny_lfm2.gguf"), "blk.2.shortconv.conv.weight", "blk.2.shortconv.cnv_.weight");
        let err = config(lfm2).unwrap_err().to_string();
        assert!(
            err.contains("tensor `blk.2.shortconv.conv.weight` is missing; layer 2 is a short-convolution layer (lfm2.attention.head_count_kv is 0 for it)"),
            "{err}"
        );
        let qwen = renamed(fixture("tiny_qwen3_5_text.gguf"), "blk.1.ssm_conv1d.weight", "blk.1.ssm_conv1x.weight");
        let err = config(qwen).unwrap_err().to_string();
        assert!(
            err.contains("tensor `blk.1.ssm_conv1d.weight` is missing; layer 1 is a Gated DeltaNet layer, qwen35.full_attention_interval being 4"),
            "{err}"
        );
        // Layer 1 marked recurrent (KV heads 0) holds attention tensors, not a convolution.
        let mut bytes = fixture("tiny_lfm2.gguf");
        let second = value_of(&bytes, "lfm2.attention.head_count_kv") + 4 + 8 + 4;
        assert_eq!(bytes[second..second + 4], 2i32.to_le_bytes());
        bytes[second..second + 4].copy_from_slice(&0i32.to_le_bytes());
        let err = config(bytes).unwrap_err().to_string();
        assert!(
            err.contains("tensor `blk.1.shortconv.in_proj.weight` is missing; layer 1 is a short-convolution"),
            "{err}"
        );
    }

    #[test]
    fn lfm2_attention_layers_with_different_kv_head_counts_are_refused() {
        let mut bytes = fixture("tiny_lfm2.gguf");
        let kv = value_of(&bytes, "lfm2.attention.head_count_kv") + 4 + 8;
        // Layer 0 attending with 4 heads beside layer 1's 2.
        bytes[kv..kv + 4].copy_from_slice(&4i32.to_le_bytes());
        let err = config(bytes).unwrap_err().to_string();
        assert!(err.contains("attention layers with 4 and 2 KV heads"), "{err}");
    }

    /// `ssm_a` must hold −exp(A_log): a positive value is refused naming the tensor.
    #[test]
    fn qwen35_ssm_a_must_be_negative() {
        let mut bytes = fixture("tiny_qwen3_5_text.gguf");
        let at = GgufFile::from_bytes("t.gguf", bytes.clone()).unwrap().tensor("blk.0.ssm_a").unwrap().file_offset;
        bytes[at..at + 4].copy_from_slice(&0.5f32.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.gguf");
        std::fs::write(&path, bytes).unwrap();
        let (ck, _) = GgufCheckpoint::open(&path).unwrap();
        let err = ck.read_f32("model.layers.0.linear_attn.A_log").unwrap_err().to_string();
        assert!(err.contains("tensor `blk.0.ssm_a` holds 0.5; llama.cpp stores −exp(A_log)"), "{err}");
        let back = ck.read_f32("model.layers.1.linear_attn.A_log").unwrap();
        assert!(back.iter().all(|v| v.is_finite()), "{back:?}");
    }

    #[test]
    fn a_granitehybrid_file_whose_layers_all_attend_is_granite4_dense() {
        let c = config(granitehybrid(&[2, 2, 2])).unwrap();
        assert_eq!(c["model_type"], "granitemoehybrid");
        assert_eq!(c["num_key_value_heads"], 2);
        assert_eq!(c["shared_intermediate_size"], 112);
        // rope.scaling.finetuned false: llama.cpp rotates no layer.
        assert_eq!(c["position_embedding_type"], "nope");
        let m = crate::arch::read_config(Path::new("test.gguf"), &c).unwrap();
        assert_eq!((m.intermediate_size, m.rope_layers), (112, vec![false; 3]));
    }
}
