//! Qwen3.5 (dense): three Gated DeltaNet layers to one of gated attention (`layer_types`, or
//! every `full_attention_interval`-th layer). Attention has per-head q/k norms, a sigmoid gate
//! on its output from a second half of each head's `q_proj` rows, and RoPE on a quarter of the
//! head; every norm is zero-centred (`1 + w`) except the DeltaNet output's gated norm.

use crate::arch::{dims, global_rope, llama_like, LayerRole, Role, Take, TensorSpec};
use crate::config::{Attention, Family, Fields, LayerShape, LinearAttention, Mixer, ModelConfig, Norm, QkNorm};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    let mut base = llama_like(f, family)?;
    let d = dims(f)?;
    let layers = base.num_layers;
    let linear = LinearAttention {
        key_heads: f.usize("linear_num_key_heads")?,
        value_heads: f.usize("linear_num_value_heads")?,
        key_dim: f.usize("linear_key_head_dim")?,
        value_dim: f.usize("linear_value_head_dim")?,
        conv_kernel: f.opt_usize("linear_conv_kernel_dim")?.unwrap_or(4),
        conv_bias: false,
        proj_bias: false,
        time_step_limit: None,
    };
    if linear.key_heads == 0 || linear.value_dim == 0 || linear.key_dim == 0 || linear.conv_kernel < 2 {
        return Err(f.error("linear attention needs positive head counts and sizes and a kernel of 2 or more taps"));
    }
    if !linear.value_heads.is_multiple_of(linear.key_heads) {
        return Err(f.error(format!(
            "linear_num_value_heads ({}) must be a multiple of linear_num_key_heads ({})",
            linear.value_heads, linear.key_heads
        )));
    }
    let attention = attention_layers(f, layers)?;
    base.layers = (0..layers)
        .map(|l| LayerShape::uniform(&base, if attention[l] { Mixer::Attention } else { Mixer::GatedDeltaNet }))
        .collect();
    let mut rope = global_rope(f, 10_000.0, &d)?;
    let partial_given = f.opt_f64("partial_rotary_factor")?.is_some()
        || f.opt_object("rope_parameters")?.is_some_and(|p| p.raw("partial_rotary_factor").is_some());
    if !partial_given {
        // transformers' default for Qwen3.5: a quarter of the head rotates.
        rope.rotary_dim = (d.head_dim / 4) & !1;
    }
    let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(ModelConfig {
        norm: Norm::Rms { eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6), add_one: true },
        rope: Some(rope),
        layer_attention: vec![Attention::Full; layers],
        qkv_bias: bias,
        o_bias: bias,
        qk_norm: QkNorm::PerHead,
        attention_gate: true,
        linear: Some(linear),
        ..base
    })
}

/// Which layers attend: `layer_types`, else every `full_attention_interval`-th (default 4).
fn attention_layers(f: &Fields, layers: usize) -> Result<Vec<bool>> {
    match f.opt_str_list("layer_types")? {
        Some(types) if types.len() != layers => {
            Err(f.error(format!("`layer_types` lists {} layers; the model has {layers}", types.len())))
        }
        Some(types) => types
            .iter()
            .map(|t| match *t {
                "linear_attention" => Ok(false),
                "full_attention" => Ok(true),
                other => {
                    Err(f.error(format!("unknown Qwen3.5 layer type `{other}` (linear_attention, full_attention)")))
                }
            })
            .collect(),
        None => {
            let interval = f.opt_usize("full_attention_interval")?.unwrap_or(4).max(1);
            Ok((0..layers).map(|l| (l + 1) % interval == 0).collect())
        }
    }
}

pub fn tensor_spec(c: &ModelConfig, role: Role) -> Option<TensorSpec> {
    use LayerRole::*;
    let Role::Layer(l, r) = role else { return crate::arch::hf_decoder_spec(c, role) };
    let p = format!("model.layers.{l}");
    let hd = c.layer(l).head_dim;
    // `q_proj` holds, head by head, the query rows then the gate rows.
    let half = |start| TensorSpec {
        name: format!("{p}.self_attn.q_proj.weight"),
        take: Take::EveryRows { start, len: hd, period: 2 * hd },
    };
    let a = format!("{p}.linear_attn");
    let name = match (c.layer(l).mixer, r) {
        (Mixer::Attention, Q) => return Some(half(0)),
        (Mixer::Attention, QGate) => return Some(half(hd)),
        (Mixer::Attention, QBias) if c.qkv_bias => {
            return Some(TensorSpec {
                name: format!("{p}.self_attn.q_proj.bias"),
                take: Take::EveryRows { start: 0, len: hd, period: 2 * hd },
            })
        }
        (Mixer::Attention, _) => return crate::arch::hf_decoder_spec(c, role),
        (_, AttnNorm | MlpNorm | Gate | Up | Down) => return crate::arch::hf_decoder_spec(c, role),
        (_, MixerIn) => format!("{a}.in_proj_qkv.weight"),
        (_, ConvKernel) => format!("{a}.conv1d.weight"),
        (_, DeltaGate) => format!("{a}.in_proj_z.weight"),
        (_, DeltaBeta) => format!("{a}.in_proj_b.weight"),
        (_, DeltaDecay) => format!("{a}.in_proj_a.weight"),
        (_, DtBias) => format!("{a}.dt_bias"),
        (_, ALog) => format!("{a}.A_log"),
        (_, MixerNorm) => format!("{a}.norm.weight"),
        (_, MixerOut) => format!("{a}.out_proj.weight"),
        _ => return None,
    };
    Some(TensorSpec::whole(name))
}
