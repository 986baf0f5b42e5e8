//! Granite 3 (dense): Llama with multipliers on the token embeddings, on each block's output
//! before the residual add, on the attention scores (in place of 1/√head_dim) and, as a divisor,
//! on the logits. Granite 4 (`granitemoehybrid` without experts) is the same with a fused
//! gate/up projection (`shared_mlp`), RoPE optional, and in its hybrid models (4.0-H) Mamba-2
//! layers among the attention layers.

use crate::arch::{hf_decoder_spec, llama, LayerRole, Role, Take, TensorSpec};
use crate::config::{Family, Fields, LayerShape, LinearAttention, Mixer, ModelConfig};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    if family == Family::Granite4 {
        return granite4(f);
    }
    let base = llama::config(f, family)?;
    let multiplier = |key: &str| -> Result<f64> {
        let v = f.opt_f64(key)?.unwrap_or(1.0);
        if !v.is_finite() || v == 0.0 {
            return Err(f.error(format!("`{key}` must be a finite, non-zero number; it is {v}")));
        }
        Ok(v)
    };
    let logits_scaling = multiplier("logits_scaling")?;
    Ok(ModelConfig {
        embedding_scale: Some(multiplier("embedding_multiplier")?),
        residual_multiplier: Some(multiplier("residual_multiplier")?),
        attention_scale: multiplier("attention_multiplier")?,
        logit_scale: Some(1.0 / logits_scaling),
        ..base
    })
}

/// Granite 4: experts are refused by name; the MLP width is `shared_intermediate_size`; without
/// `position_embedding_type: "rope"` no layer rotates; `layer_types` (or `layers_block_type`)
/// marks the Mamba-2 layers (`mamba`, transformers 5: `linear_attention`).
fn granite4(f: &Fields) -> Result<ModelConfig> {
    let experts = f.opt_usize("num_local_experts")?.unwrap_or(0);
    if experts > 0 {
        return Err(super::unsupported(f, &format!("a Granite 4 mixture of {experts} experts (num_local_experts)")));
    }
    let layers = f.usize("num_hidden_layers")?;
    let types = f.opt_str_list("layer_types")?.or(f.opt_str_list("layers_block_type")?);
    let mamba: Vec<bool> = match &types {
        // transformers' default: every layer Mamba-2.
        None => vec![true; layers],
        Some(t) if t.len() != layers => {
            return Err(f.error(format!("`layer_types` lists {} layers; the model has {layers}", t.len())))
        }
        Some(t) => t
            .iter()
            .map(|t| match *t {
                "attention" | "full_attention" => Ok(false),
                "mamba" | "linear_attention" => Ok(true),
                other => Err(f.error(format!("unknown Granite 4 layer type `{other}` (attention, mamba)"))),
            })
            .collect::<Result<_>>()?,
    };
    let mut base = config(f, Family::Granite)?;
    let rope = f.opt_str("position_embedding_type")? == Some("rope");
    base.intermediate_size = f.usize("shared_intermediate_size")?;
    let linear = if mamba.contains(&true) { Some(mamba2_sizes(f, base.hidden_size)?) } else { None };
    let layer_shapes = (0..layers)
        .map(|l| LayerShape::uniform(&base, if mamba[l] { Mixer::Mamba2 } else { Mixer::Attention }))
        .collect();
    Ok(ModelConfig { family: Family::Granite4, rope_layers: vec![rope; layers], layers: layer_shapes, linear, ..base })
}

/// Mamba-2's sizes as transformers derives them: `mamba_expand` × hidden values in
/// `mamba_n_heads` heads (`mamba_d_head` "auto" or the quotient), `mamba_n_groups` groups of B
/// and C of `mamba_d_state` each; the time-step limit when finite.
fn mamba2_sizes(f: &Fields, hidden: usize) -> Result<LinearAttention> {
    let heads = f.opt_usize("mamba_n_heads")?.unwrap_or(128);
    let inner = f.opt_usize("mamba_expand")?.unwrap_or(2) * hidden;
    if heads == 0 || !inner.is_multiple_of(heads) {
        return Err(f.error(format!("mamba_n_heads ({heads}) must divide mamba_expand × hidden_size ({inner})")));
    }
    let head_dim = match f.raw("mamba_d_head").and_then(|v| v.as_str()) {
        Some("auto") => inner / heads,
        _ => f.opt_usize("mamba_d_head")?.unwrap_or(inner / heads),
    };
    let groups = f.opt_usize("mamba_n_groups")?.unwrap_or(1);
    if head_dim * heads != inner || groups == 0 || !heads.is_multiple_of(groups) {
        return Err(f.error(format!(
            "Mamba-2 sizes do not fit: {heads} heads of {head_dim} for {inner} values, {groups} groups"
        )));
    }
    // transformers' default, (0, ∞), bounds nothing (and JSON cannot write it).
    let time_step_limit = match f.raw("time_step_limit") {
        None | Some(serde_json::Value::Null) => None,
        Some(_) => match f.f64_list("time_step_limit")?.as_slice() {
            &[lo, hi] if lo <= hi => Some((lo, hi)).filter(|_| hi.is_finite()),
            other => return Err(f.error(format!("`time_step_limit` must be [min, max]; it is {other:?}"))),
        },
    };
    Ok(LinearAttention {
        key_heads: groups,
        value_heads: heads,
        key_dim: f.opt_usize("mamba_d_state")?.unwrap_or(256),
        value_dim: head_dim,
        conv_kernel: f.opt_usize("mamba_d_conv")?.unwrap_or(4).max(2),
        conv_bias: f.opt_bool("mamba_conv_bias")?.unwrap_or(true),
        proj_bias: f.opt_bool("mamba_proj_bias")?.unwrap_or(false),
        time_step_limit,
    })
}

/// Granite 4's fused `shared_mlp.input_linear` (gate rows, then up rows) and `output_linear`;
/// the Mamba-2 layers' `mamba.*`.
pub fn tensor_spec(c: &ModelConfig, role: Role) -> Option<TensorSpec> {
    use LayerRole::*;
    let Role::Layer(l, r) = role else { return hf_decoder_spec(c, role) };
    let (p, i) = (format!("model.layers.{l}.shared_mlp"), c.intermediate_size);
    let rows =
        |start| Some(TensorSpec { name: format!("{p}.input_linear.weight"), take: Take::Rows { start, len: i } });
    let m = format!("model.layers.{l}.mamba");
    let la = c.linear.filter(|_| c.layer(l).mixer == Mixer::Mamba2);
    let name = match (r, la) {
        (Gate, _) => return rows(0),
        (Up, _) => return rows(i),
        (Down, _) => return Some(TensorSpec::whole(format!("{p}.output_linear.weight"))),
        (AttnNorm | MlpNorm, _) | (_, None) => return hf_decoder_spec(c, role),
        (MixerIn, _) => format!("{m}.in_proj.weight"),
        (MixerInBias, Some(la)) if la.proj_bias => format!("{m}.in_proj.bias"),
        (ConvKernel, _) => format!("{m}.conv1d.weight"),
        (ConvBias, Some(la)) if la.conv_bias => format!("{m}.conv1d.bias"),
        (DtBias, _) => format!("{m}.dt_bias"),
        (ALog, _) => format!("{m}.A_log"),
        (SkipScale, _) => format!("{m}.D"),
        (MixerNorm, _) => format!("{m}.norm.weight"),
        (MixerOut, _) => format!("{m}.out_proj.weight"),
        (MixerOutBias, Some(la)) if la.proj_bias => format!("{m}.out_proj.bias"),
        _ => return None,
    };
    Some(TensorSpec::whole(name))
}
