//! Architecture families: each module reads its `config.json` fields into a [`ModelConfig`] and
//! says where each weight of the common decoder lives in its checkpoints.

pub mod gemma;
pub mod gemma3n;
pub mod gemma4;
pub mod gpt2;
pub mod granite;
pub mod lfm2;
pub mod llama;
pub mod olmo;
pub mod phi3;
pub mod qwen;
pub mod qwen35;
pub mod smollm3;

use std::path::Path;

use serde_json::Value;

use crate::config::{
    Activation, Attention, BlockNorms, Family, Fields, LayerShape, Mixer, ModelConfig, Norm, QkNorm, Rope, RopeScaling,
};
use crate::{Error, Result};

/// A weight of the common decoder graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Embed,
    /// Learned absolute position embeddings (GPT-2).
    PositionEmbed,
    FinalNorm,
    FinalNormBias,
    LmHead,
    /// The per-layer embedding table (Gemma 3n, 4), the projection of the token embedding into
    /// per-layer inputs, and that projection's norm.
    PerLayerEmbed,
    PerLayerProjection,
    PerLayerProjectionNorm,
    /// AltUp's projections of the embedding into stream i + 1, and of stream i + 1 back.
    AltUpProjection(usize),
    AltUpUnembed(usize),
    Layer(usize, LayerRole),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerRole {
    AttnNorm,
    AttnNormBias,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    OBias,
    QNorm,
    KNorm,
    /// Norm of the attention output before the residual add (Gemma 2/3).
    PostAttnNorm,
    /// Norm before the MLP.
    MlpNorm,
    MlpNormBias,
    /// Norm of the MLP output before the residual add (Gemma 2/3).
    PostMlpNorm,
    Gate,
    Up,
    Down,
    UpBias,
    DownBias,
    /// Gemma 4: the layer output's multiplier.
    LayerScalar,
    /// The per-layer input's gate (hidden → width), projection back, and its norm.
    PerLayerGate,
    PerLayerProj,
    PostPerLayerNorm,
    /// LAuReL's low-rank pair and norm.
    LaurelLeft,
    LaurelRight,
    LaurelNorm,
    /// AltUp's per-layer weights.
    AltUpCorrectScale,
    AltUpCorrection,
    AltUpPrediction,
    AltUpRouter,
    AltUpRouterNorm,
    /// Qwen3.5's attention gate: the second half of each head's rows of `q_proj`.
    QGate,
    /// A recurrent layer's input projection (LFM2: B, C, x; Gated DeltaNet: queries, keys,
    /// values), its depthwise convolution (channels × taps), and its output projection.
    MixerIn,
    MixerInBias,
    ConvKernel,
    ConvBias,
    MixerOut,
    MixerOutBias,
    /// Gated DeltaNet: the output gate (z), the write strength (b → β), the decay input (a).
    DeltaGate,
    DeltaBeta,
    DeltaDecay,
    /// Chunked linear attention (Gated DeltaNet, Mamba-2): the time step's bias and the log decay
    /// rate per head, the gated output norm, and Mamba-2's skip connection per head (D).
    DtBias,
    ALog,
    MixerNorm,
    SkipScale,
}

/// Which part of a stored tensor a role takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    Whole,
    /// Rows `start..start + len` of a fused matrix (or elements of a fused bias).
    Rows {
        start: usize,
        len: usize,
    },
    /// The tensor is stored transposed (GPT-2's Conv1D); transpose, then take rows.
    TransposedRows {
        start: usize,
        len: usize,
    },
    /// Rows `start..start + len` of every block of `period` rows (per-head interleaving:
    /// Qwen3.5's `q_proj` holds each head's query rows, then its gate rows).
    EveryRows {
        start: usize,
        len: usize,
        period: usize,
    },
}

/// Where a role's weight comes from, in Hugging Face naming.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub take: Take,
}

impl TensorSpec {
    pub fn whole(name: impl Into<String>) -> TensorSpec {
        TensorSpec { name: name.into(), take: Take::Whole }
    }
}

/// A family as corelm knows it: the `model_type`s that name it in `config.json` (the first is
/// the one corelm writes), how its config is read, and where each weight lives. Adding a
/// family is a module with these two functions and a row in [`FAMILIES`].
pub struct Registration {
    pub family: Family,
    pub model_types: &'static [&'static str],
    config: fn(&Fields, Family) -> Result<ModelConfig>,
    tensor_spec: fn(&ModelConfig, Role) -> Option<TensorSpec>,
}

const FAMILIES: &[Registration] = &[
    Registration {
        family: Family::Llama,
        model_types: &["llama"],
        config: llama::config,
        tensor_spec: hf_decoder_spec,
    },
    Registration {
        family: Family::Mistral,
        model_types: &["mistral"],
        config: llama::config,
        tensor_spec: hf_decoder_spec,
    },
    Registration { family: Family::Qwen2, model_types: &["qwen2"], config: qwen::config, tensor_spec: hf_decoder_spec },
    Registration { family: Family::Qwen3, model_types: &["qwen3"], config: qwen::config, tensor_spec: hf_decoder_spec },
    Registration {
        family: Family::Gemma,
        model_types: &["gemma"],
        config: gemma::config,
        tensor_spec: hf_decoder_spec,
    },
    Registration {
        family: Family::Gemma2,
        model_types: &["gemma2"],
        config: gemma::config,
        tensor_spec: hf_decoder_spec,
    },
    // Multimodal Gemma 3 (`gemma3`) keeps the language model's settings under `text_config`.
    Registration {
        family: Family::Gemma3,
        model_types: &["gemma3_text", "gemma3"],
        config: gemma::config,
        tensor_spec: hf_decoder_spec,
    },
    Registration { family: Family::Phi3, model_types: &["phi3"], config: phi3::config, tensor_spec: phi3::tensor_spec },
    Registration { family: Family::Gpt2, model_types: &["gpt2"], config: gpt2::config, tensor_spec: gpt2::tensor_spec },
    Registration {
        family: Family::SmolLm3,
        model_types: &["smollm3"],
        config: smollm3::config,
        tensor_spec: hf_decoder_spec,
    },
    Registration {
        family: Family::Granite,
        model_types: &["granite"],
        config: granite::config,
        tensor_spec: hf_decoder_spec,
    },
    Registration {
        family: Family::Granite4,
        model_types: &["granitemoehybrid"],
        config: granite::config,
        tensor_spec: granite::tensor_spec,
    },
    Registration { family: Family::Olmo2, model_types: &["olmo2"], config: olmo::config, tensor_spec: hf_decoder_spec },
    Registration { family: Family::Olmo3, model_types: &["olmo3"], config: olmo::config, tensor_spec: hf_decoder_spec },
    Registration {
        family: Family::Gemma3n,
        model_types: &["gemma3n_text", "gemma3n"],
        config: gemma3n::config,
        tensor_spec: gemma3n::tensor_spec,
    },
    Registration {
        family: Family::Gemma4,
        model_types: &["gemma4_text", "gemma4"],
        config: gemma4::config,
        tensor_spec: gemma3n::tensor_spec,
    },
    Registration { family: Family::Lfm2, model_types: &["lfm2"], config: lfm2::config, tensor_spec: lfm2::tensor_spec },
    // The text part of the multimodal `qwen3_5` keeps its settings under `text_config`.
    Registration {
        family: Family::Qwen35,
        model_types: &["qwen3_5_text", "qwen3_5"],
        config: qwen35::config,
        tensor_spec: qwen35::tensor_spec,
    },
];

/// The registration of `family`.
pub fn registration(family: Family) -> &'static Registration {
    FAMILIES.iter().find(|r| r.family == family).expect("every family is registered")
}

/// Every `model_type` corelm converts.
pub fn supported_model_types() -> Vec<&'static str> {
    FAMILIES.iter().flat_map(|r| r.model_types.iter().copied()).collect()
}

/// Reads `config.json` (already parsed) into a model configuration for a supported family.
pub fn read_config(path: &Path, json: &Value) -> Result<ModelConfig> {
    let f = Fields::new(path, json)?;
    let supported = || supported_model_types().join(", ");
    let model_type = f
        .opt_str("model_type")?
        .ok_or_else(|| f.error(format!("no `model_type` field; supported model types: {}", supported())))?;
    let registration = FAMILIES.iter().find(|r| r.model_types.contains(&model_type)).ok_or_else(|| {
        f.error(format!("unsupported architecture `{model_type}`; supported model types: {}", supported()))
    })?;
    // Multimodal Gemma 3, 3n, 4 and Qwen3.5 keep the language model's settings under `text_config`.
    let text;
    let f = if MULTIMODAL.contains(&model_type) {
        text = f
            .opt_object("text_config")?
            .ok_or_else(|| f.error(format!("{model_type} config without `text_config`")))?;
        text
    } else {
        f
    };
    let mut config = (registration.config)(&f, registration.family)?;
    if config.layers.is_empty() {
        config.layers = vec![LayerShape::uniform(&config, Mixer::Attention); config.num_layers];
    }
    check_config(&f, &config)?;
    Ok(config)
}

/// The `model_type`s of multimodal checkpoints whose language model corelm converts; their
/// weights are named `model.language_model.*` and their vision and audio towers are left out.
pub const MULTIMODAL: &[&str] = &["gemma3", "gemma3n", "gemma4", "qwen3_5"];

/// The parts of a multimodal checkpoint corelm leaves out, one note each (its vision and audio
/// towers and their embedders: only the language model converts).
pub fn left_out(json: &Value) -> Vec<String> {
    let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or_default();
    if !MULTIMODAL.contains(&model_type) {
        return vec![];
    }
    ["vision", "audio"]
        .iter()
        .filter(|part| json.get(format!("{part}_config")).is_some_and(|v| !v.is_null()))
        .map(|part| {
            format!("the {part} tower (`{part}_config`) of this {model_type} checkpoint is left out: only its language model converts, so the package reads text only")
        })
        .collect()
}

/// Where each role's tensor lives for this family; `None` when the family has no such weight.
pub fn tensor_spec(config: &ModelConfig, role: Role) -> Option<TensorSpec> {
    (registration(config.family).tensor_spec)(config, role)
}

/// The `model.layers.N.self_attn.q_proj.weight` naming shared by most families.
pub(crate) fn hf_decoder_spec(config: &ModelConfig, role: Role) -> Option<TensorSpec> {
    use LayerRole::*;
    let name = match role {
        Role::Embed => "model.embed_tokens.weight".to_string(),
        Role::FinalNorm => "model.norm.weight".to_string(),
        Role::LmHead if config.tie_word_embeddings => "model.embed_tokens.weight".to_string(),
        Role::LmHead => "lm_head.weight".to_string(),
        Role::PositionEmbed
        | Role::FinalNormBias
        | Role::PerLayerEmbed
        | Role::PerLayerProjection
        | Role::PerLayerProjectionNorm
        | Role::AltUpProjection(_)
        | Role::AltUpUnembed(_) => return None,
        Role::Layer(l, r) => {
            let p = format!("model.layers.{l}");
            match r {
                AttnNorm if config.block_norms.pre() => format!("{p}.input_layernorm.weight"),
                Q => format!("{p}.self_attn.q_proj.weight"),
                K => format!("{p}.self_attn.k_proj.weight"),
                V => format!("{p}.self_attn.v_proj.weight"),
                O => format!("{p}.self_attn.o_proj.weight"),
                QBias if config.qkv_bias => format!("{p}.self_attn.q_proj.bias"),
                KBias if config.qkv_bias => format!("{p}.self_attn.k_proj.bias"),
                VBias if config.qkv_bias => format!("{p}.self_attn.v_proj.bias"),
                OBias if config.o_bias => format!("{p}.self_attn.o_proj.bias"),
                QNorm if config.qk_norm != QkNorm::None => format!("{p}.self_attn.q_norm.weight"),
                KNorm if config.qk_norm != QkNorm::None => format!("{p}.self_attn.k_norm.weight"),
                PostAttnNorm if config.block_norms.post() => format!("{p}.post_attention_layernorm.weight"),
                MlpNorm if config.block_norms == BlockNorms::Sandwich => {
                    format!("{p}.pre_feedforward_layernorm.weight")
                }
                MlpNorm if config.block_norms == BlockNorms::Pre => format!("{p}.post_attention_layernorm.weight"),
                PostMlpNorm if config.block_norms.post() => format!("{p}.post_feedforward_layernorm.weight"),
                Gate => format!("{p}.mlp.gate_proj.weight"),
                Up => format!("{p}.mlp.up_proj.weight"),
                Down => format!("{p}.mlp.down_proj.weight"),
                UpBias | DownBias if config.mlp_bias => {
                    format!("{p}.mlp.{}_proj.bias", if r == UpBias { "up" } else { "down" })
                }
                _ => return None,
            }
        }
    };
    Some(TensorSpec::whole(name))
}

/// RoPE settings of the layers of `layer_type` (`full_attention`, `sliding_attention`), from
/// `rope_parameters` (transformers 5: flat, or keyed by layer type) or from the older
/// `rope_theta` + `rope_scaling` fields. `None` when the config gives nothing for that type.
pub fn rope(
    f: &Fields,
    layer_type: &str,
    default_theta: f64,
    head_dim: usize,
    max_positions: usize,
) -> Result<Option<Rope>> {
    let (theta, scaling) = match f.opt_object("rope_parameters")? {
        Some(p) => {
            let p = match p.opt_object(layer_type)? {
                Some(per_type) => per_type,
                None if p.raw("rope_theta").is_some() || p.raw("rope_type").is_some() => p,
                None => return Ok(None),
            };
            (p.opt_f64("rope_theta")?, Some(p))
        }
        None => (f.opt_f64("rope_theta")?, f.opt_object("rope_scaling")?),
    };
    let partial = match scaling.as_ref().map(|s| s.opt_f64("partial_rotary_factor")).transpose()?.flatten() {
        Some(p) => Some(p),
        None => f.opt_f64("partial_rotary_factor")?,
    };
    let mut rotary_dim = match partial {
        Some(p) => ((head_dim as f64 * p) as usize) & !1,
        None => head_dim,
    };
    let scaling = match scaling {
        None => RopeScaling::None,
        Some(s) => {
            let kind = match s.opt_str("rope_type")? {
                Some(k) => k,
                None => s.opt_str("type")?.unwrap_or("default"),
            };
            let factor = || s.opt_f64("factor")?.ok_or_else(|| s.error("rope scaling needs `factor`"));
            // transformers gives a top-level `original_max_position_embeddings` (Phi-3's place
            // for it) priority over the one among the rope parameters.
            let original = || -> Result<usize> {
                Ok(f.opt_usize("original_max_position_embeddings")?
                    .or(s.opt_usize("original_max_position_embeddings")?)
                    .unwrap_or(max_positions))
            };
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear(factor()?),
                "dynamic" => RopeScaling::Dynamic { factor: factor()?, original_max_position: original()? },
                "llama3" => RopeScaling::Llama3 {
                    factor: factor()?,
                    low_freq_factor: s.opt_f64("low_freq_factor")?.unwrap_or(1.0),
                    high_freq_factor: s.opt_f64("high_freq_factor")?.unwrap_or(4.0),
                    original_max_position: original()?,
                },
                // Early Phi-3 long-context configs call it `su`.
                "longrope" | "su" => long_rope(&s, original()?, max_positions, rotary_dim)?,
                // Gemma 4: the whole head rotates, the pairs past the partial factor's share at
                // frequency 0 (transformers' `_compute_proportional_rope_parameters`).
                "proportional" => {
                    let rotated_pairs = (head_dim as f64 * partial.unwrap_or(1.0)) as usize / 2;
                    rotary_dim = head_dim;
                    RopeScaling::Proportional { rotated_pairs, factor: s.opt_f64("factor")?.unwrap_or(1.0) }
                }
                other => {
                    return Err(s.error(format!(
                        "unsupported rope scaling type `{other}`; supported: default, linear, dynamic, llama3, longrope, proportional"
                    )))
                }
            }
        }
    };
    Ok(Some(Rope { theta: theta.unwrap_or(default_theta), scaling, rotary_dim }))
}

/// LongRoPE's parameters as transformers reads them (`_compute_longrope_parameters`): a factor
/// per rotated pair in each set, and an attention factor that defaults to
/// √(1 + ln(factor) / ln(original)), `factor` being max_position_embeddings / original.
fn long_rope(s: &Fields, original: usize, max_positions: usize, rotary_dim: usize) -> Result<RopeScaling> {
    let set = |key: &str| -> Result<std::sync::Arc<[f64]>> {
        let v = s.f64_list(key)?;
        if v.len() != rotary_dim / 2 || v.iter().any(|x| !x.is_finite() || *x <= 0.0) {
            return Err(s.error(format!(
                "`{key}` needs {} positive factors, one per rotated pair; it has {}",
                rotary_dim / 2,
                v.len()
            )));
        }
        Ok(v.into())
    };
    let factor = match s.opt_f64("factor")? {
        Some(f) => f,
        None => max_positions as f64 / original as f64,
    };
    let attention_factor = match s.opt_f64("attention_factor")? {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(RopeScaling::LongRope {
        short_factor: set("short_factor")?,
        long_factor: set("long_factor")?,
        original_max_position: original,
        attention_factor,
    })
}

/// The global RoPE of a family that always has one.
pub fn global_rope(f: &Fields, default_theta: f64, d: &Dims) -> Result<Rope> {
    Ok(rope(f, "full_attention", default_theta, d.head_dim, d.max_position_embeddings)?.unwrap_or(Rope {
        theta: default_theta,
        scaling: RopeScaling::None,
        rotary_dim: d.head_dim,
    }))
}

/// Each layer's attention: from `layer_types` when the config lists them, else `fallback(layer)`
/// (which says whether the layer slides).
pub fn layer_attention(f: &Fields, num_layers: usize, fallback: impl Fn(usize) -> bool) -> Result<Vec<Attention>> {
    let window = f.opt_usize("sliding_window")?;
    let sliding = |is: bool| match (is, window) {
        (true, Some(w)) => Ok(Attention::Sliding(w)),
        (true, None) => Err(f.error("sliding layers need `sliding_window`")),
        (false, _) => Ok(Attention::Full),
    };
    match f.opt_str_list("layer_types")? {
        Some(types) => types
            .iter()
            .map(|t| match *t {
                "sliding_attention" => sliding(true),
                // Granite 4's older name; and the recurrent kinds of hybrid models, whose entry no
                // attention reads (their family marks them in the layers' mixers).
                "full_attention" | "attention" | "linear_attention" | "mamba" | "conv" => sliding(false),
                other => Err(f.error(format!("unknown layer type `{other}`"))),
            })
            .collect(),
        None => (0..num_layers).map(|l| sliding(window.is_some() && fallback(l))).collect(),
    }
}

/// The common head/size fields of Llama-like configs.
pub struct Dims {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
}

pub fn dims(f: &Fields) -> Result<Dims> {
    let hidden_size = f.usize("hidden_size")?;
    let num_heads = f.usize("num_attention_heads")?;
    if num_heads == 0 || hidden_size == 0 {
        return Err(f.error("hidden_size and num_attention_heads must be positive"));
    }
    let head_dim = f.opt_usize("head_dim")?.unwrap_or(hidden_size / num_heads);
    Ok(Dims {
        vocab_size: f.usize("vocab_size")?,
        hidden_size,
        // Gemma 3n may list one per layer (its module reads them); the first stands for all here.
        intermediate_size: match f.raw("intermediate_size") {
            Some(Value::Array(items)) => items
                .first()
                .and_then(Value::as_u64)
                .filter(|&n| n <= crate::config::config_limit("intermediate_size"))
                .ok_or_else(|| f.error("`intermediate_size` must be a positive integer or a list of them"))?
                as usize,
            // LFM2's published configs call it `block_ff_dim`.
            None if f.raw("block_ff_dim").is_some() => f.usize("block_ff_dim")?,
            _ => f.usize("intermediate_size")?,
        },
        num_layers: f.usize("num_hidden_layers")?,
        num_heads,
        num_kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads),
        head_dim,
        max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(2048),
    })
}

/// The Llama-like defaults every RMSNorm family starts from (SwiGLU MLP, RoPE, no biases, full
/// attention); each family module overrides what differs.
pub fn llama_like(f: &Fields, family: Family) -> Result<ModelConfig> {
    let d = dims(f)?;
    let (bos_token_id, eos_token_ids, pad_token_id) = token_ids(f)?;
    Ok(ModelConfig {
        family,
        vocab_size: d.vocab_size,
        hidden_size: d.hidden_size,
        intermediate_size: d.intermediate_size,
        num_layers: d.num_layers,
        num_heads: d.num_heads,
        num_kv_heads: d.num_kv_heads,
        head_dim: d.head_dim,
        max_position_embeddings: d.max_position_embeddings,
        norm: Norm::Rms { eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6), add_one: false },
        activation: Activation::Silu,
        rope: Some(global_rope(f, 10_000.0, &d)?),
        rope_local: None,
        layer_attention: vec![Attention::Full; d.num_layers],
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: QkNorm::None,
        block_norms: BlockNorms::Pre,
        rope_layers: vec![true; d.num_layers],
        residual_multiplier: None,
        logit_scale: None,
        gated_mlp: true,
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        embedding_scale: None,
        attention_scale: (d.head_dim as f64).powf(-0.5),
        attn_logit_softcap: None,
        final_logit_softcap: None,
        bos_token_id,
        eos_token_ids,
        pad_token_id,
        // Filled by `read_config` when the family leaves it empty: every layer alike.
        layers: vec![],
        value_norm: false,
        per_layer_inputs: None,
        altup: None,
        laurel_rank: None,
        layer_scalar: false,
        attention_gate: false,
        linear: None,
    })
}

/// Token ids from config.json.
pub fn token_ids(f: &Fields) -> Result<(Option<u32>, Vec<u32>, Option<u32>)> {
    Ok((
        f.token_ids("bos_token_id")?.first().copied(),
        f.token_ids("eos_token_id")?,
        f.token_ids("pad_token_id")?.first().copied(),
    ))
}

fn check_config(f: &Fields, c: &ModelConfig) -> Result<()> {
    let bad = |m: String| Err(f.error(m));
    if c.num_layers == 0 || c.vocab_size == 0 || c.head_dim == 0 || c.num_kv_heads == 0 {
        return bad("num_hidden_layers, vocab_size, head_dim and num_key_value_heads must be positive".into());
    }
    if !c.num_heads.is_multiple_of(c.num_kv_heads) {
        return bad(format!(
            "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
            c.num_heads, c.num_kv_heads
        ));
    }
    if c.layer_attention.len() != c.num_layers {
        return bad(format!("{} layer types for {} layers", c.layer_attention.len(), c.num_layers));
    }
    for (l, shape) in c.layers.iter().enumerate().filter(|(l, _)| c.rope_layers.get(*l) == Some(&true)) {
        let sliding = matches!(c.layer_attention[l], Attention::Sliding(_));
        let rope = if sliding && c.rope_local.is_some() { &c.rope_local } else { &c.rope };
        if let Some(r) = rope {
            if r.rotary_dim == 0 || r.rotary_dim > shape.head_dim || r.rotary_dim % 2 != 0 {
                return bad(format!("rotary dimension {} does not fit head_dim {}", r.rotary_dim, shape.head_dim));
            }
        }
    }
    if c.rope_layers.len() != c.num_layers {
        return bad(format!("{} RoPE flags for {} layers", c.rope_layers.len(), c.num_layers));
    }
    Ok(())
}

/// Fails with the list of families when a config needs what corelm does not do.
pub fn unsupported(f: &Fields, what: &str) -> Error {
    f.error(format!("{what} is not supported"))
}
