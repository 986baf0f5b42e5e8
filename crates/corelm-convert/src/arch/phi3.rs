//! Phi-3 and Phi-4-mini: fused q/k/v and gate/up projections, split into the common layout at
//! load time; the long-context variants' LongRoPE and Phi-4-mini's partial rotary come with the
//! common RoPE reading.

use crate::arch::{layer_attention, llama_like, LayerRole, Role, Take, TensorSpec};
use crate::config::{Family, Fields, ModelConfig, Norm};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    let base = llama_like(f, family)?;
    Ok(ModelConfig {
        norm: Norm::Rms { eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-5), add_one: false },
        // transformers applies `sliding_window` to every Phi-3 layer.
        layer_attention: layer_attention(f, base.num_layers, |_| true)?,
        ..base
    })
}

pub fn tensor_spec(c: &ModelConfig, role: Role) -> Option<TensorSpec> {
    use LayerRole::*;
    let Role::Layer(l, r) = role else { return super::hf_decoder_spec(c, role) };
    let p = format!("model.layers.{l}");
    let (q, kv, i) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let rows = |name: String, start, len| Some(TensorSpec { name, take: Take::Rows { start, len } });
    match r {
        Q => rows(format!("{p}.self_attn.qkv_proj.weight"), 0, q),
        K => rows(format!("{p}.self_attn.qkv_proj.weight"), q, kv),
        V => rows(format!("{p}.self_attn.qkv_proj.weight"), q + kv, kv),
        Gate => rows(format!("{p}.mlp.gate_up_proj.weight"), 0, i),
        Up => rows(format!("{p}.mlp.gate_up_proj.weight"), i, i),
        _ => super::hf_decoder_spec(c, role),
    }
}
