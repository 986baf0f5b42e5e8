//! LFM2 (Liquid AI): gated short-convolution layers with a few attention layers between them,
//! q/k norms per head, a SwiGLU MLP (`w1`, `w3`, `w2`) and the final norm named
//! `embedding_norm`.

use crate::arch::{dims, global_rope, llama_like, LayerRole, Role, TensorSpec};
use crate::config::{Attention, Family, Fields, LayerShape, Mixer, ModelConfig, Norm, QkNorm};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    let mut base = llama_like(f, family)?;
    let d = dims(f)?;
    let layers = base.num_layers;
    let kernel = f.opt_usize("conv_L_cache")?.unwrap_or(3);
    if kernel < 2 {
        return Err(f.error(format!("`conv_L_cache` is {kernel}; a causal convolution needs at least 2 taps")));
    }
    let bias = f.opt_bool("conv_bias")?.unwrap_or(false);
    let attention = attention_layers(f, layers)?;
    let intermediate = mlp_width(f)?;

    base.intermediate_size = intermediate;
    let conv = Mixer::ShortConv { kernel, bias };
    base.layers =
        (0..layers).map(|l| LayerShape::uniform(&base, if attention[l] { Mixer::Attention } else { conv })).collect();
    Ok(ModelConfig {
        intermediate_size: intermediate,
        norm: Norm::Rms { eps: f.opt_f64("norm_eps")?.unwrap_or(1e-5), add_one: false },
        rope: Some(global_rope(f, 1_000_000.0, &d)?),
        layer_attention: vec![Attention::Full; layers],
        qk_norm: QkNorm::PerHead,
        tie_word_embeddings: match f.opt_bool("tie_word_embeddings")? {
            Some(t) => t,
            None => f.opt_bool("tie_embedding")?.unwrap_or(true),
        },
        ..base
    })
}

/// Which layers attend: `layer_types` ("conv" / "full_attention"), else the published
/// configs' `full_attn_idxs`.
fn attention_layers(f: &Fields, layers: usize) -> Result<Vec<bool>> {
    if let Some(types) = f.opt_str_list("layer_types")? {
        if types.len() != layers {
            return Err(f.error(format!("`layer_types` lists {} layers; the model has {layers}", types.len())));
        }
        return types
            .iter()
            .map(|t| match *t {
                "conv" => Ok(false),
                "full_attention" => Ok(true),
                other => Err(f.error(format!("unknown LFM2 layer type `{other}` (conv, full_attention)"))),
            })
            .collect();
    }
    let idxs = f
        .raw("full_attn_idxs")
        .and_then(|v| v.as_array())
        .ok_or_else(|| f.error("neither `layer_types` nor `full_attn_idxs` says which layers attend"))?;
    let mut attention = vec![false; layers];
    for v in idxs {
        match v.as_u64().map(|i| i as usize).filter(|&i| i < layers) {
            Some(i) => attention[i] = true,
            None => return Err(f.error(format!("`full_attn_idxs` holds {v}, not a layer below {layers}"))),
        }
    }
    Ok(attention)
}

/// The MLP width as transformers derives it: `intermediate_size` (or the published
/// `block_ff_dim`), and with `block_auto_adjust_ff_dim` two thirds of it, times
/// `block_ffn_dim_multiplier`, rounded up to a multiple of `block_multiple_of`.
fn mlp_width(f: &Fields) -> Result<usize> {
    let width = dims(f)?.intermediate_size;
    if !f.opt_bool("block_auto_adjust_ff_dim")?.unwrap_or(true) {
        return Ok(width);
    }
    let width = 2 * width / 3;
    // transformers skips the multiplier and the rounding when the field is null.
    let multiplier = match f.raw("block_ffn_dim_multiplier") {
        Some(serde_json::Value::Null) => return Ok(width),
        _ => f.opt_f64("block_ffn_dim_multiplier")?.unwrap_or(1.0),
    };
    let multiple = f.opt_usize("block_multiple_of")?.unwrap_or(256).max(1);
    Ok(((multiplier * width as f64) as usize).next_multiple_of(multiple))
}

pub fn tensor_spec(c: &ModelConfig, role: Role) -> Option<TensorSpec> {
    use LayerRole::*;
    let name = match role {
        Role::Embed => "model.embed_tokens.weight".to_string(),
        Role::FinalNorm => "model.embedding_norm.weight".to_string(),
        Role::LmHead if c.tie_word_embeddings => "model.embed_tokens.weight".to_string(),
        Role::LmHead => "lm_head.weight".to_string(),
        Role::Layer(l, r) => {
            let p = format!("model.layers.{l}");
            let bias = matches!(c.layer(l).mixer, Mixer::ShortConv { bias: true, .. });
            match (c.layer(l).mixer, r) {
                (_, AttnNorm) => format!("{p}.operator_norm.weight"),
                (_, MlpNorm) => format!("{p}.ffn_norm.weight"),
                (_, Gate) => format!("{p}.feed_forward.w1.weight"),
                (_, Up) => format!("{p}.feed_forward.w3.weight"),
                (_, Down) => format!("{p}.feed_forward.w2.weight"),
                (Mixer::Attention, Q | K | V) => {
                    format!("{p}.self_attn.{}_proj.weight", ["q", "k", "v"][[Q, K, V].iter().position(|&x| x == r)?])
                }
                (Mixer::Attention, O) => format!("{p}.self_attn.out_proj.weight"),
                (Mixer::Attention, QNorm) => format!("{p}.self_attn.q_layernorm.weight"),
                (Mixer::Attention, KNorm) => format!("{p}.self_attn.k_layernorm.weight"),
                (Mixer::ShortConv { .. }, MixerIn) => format!("{p}.conv.in_proj.weight"),
                (Mixer::ShortConv { .. }, ConvKernel) => format!("{p}.conv.conv.weight"),
                (Mixer::ShortConv { .. }, MixerOut) => format!("{p}.conv.out_proj.weight"),
                (Mixer::ShortConv { .. }, MixerInBias) if bias => format!("{p}.conv.in_proj.bias"),
                (Mixer::ShortConv { .. }, ConvBias) if bias => format!("{p}.conv.conv.bias"),
                (Mixer::ShortConv { .. }, MixerOutBias) if bias => format!("{p}.conv.out_proj.bias"),
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(TensorSpec::whole(name))
}
