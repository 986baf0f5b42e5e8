//! OLMo 2 and 3: each block's output normed before the residual add and no norm before it, and
//! q/k norms over the whole projections (all heads together). OLMo 3 slides three layers in
//! four, their RoPE without the full layers' scaling.

use crate::arch::{dims, global_rope, layer_attention, llama_like, rope};
use crate::config::{Attention, BlockNorms, Family, Fields, ModelConfig, Norm, QkNorm, Rope, RopeScaling};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    let base = llama_like(f, family)?;
    let d = dims(f)?;
    let olmo3 = family == Family::Olmo3;
    let theta = if olmo3 { 500_000.0 } else { 10_000.0 };
    let global = global_rope(f, theta, &d)?;
    let (layer_attention, rope_local) = if olmo3 {
        // The sliding layers' own entry of `rope_parameters`. With the older flat fields,
        // transformers gives them no scaling and OLMo 3's default theta, whatever `rope_theta`
        // says (its config hands that to the full layers only).
        let nested = f.opt_object("rope_parameters")?.is_some_and(|p| p.raw("sliding_attention").is_some());
        let local = match rope(f, "sliding_attention", theta, d.head_dim, d.max_position_embeddings)? {
            Some(r) if nested => r,
            _ => Rope { theta, scaling: RopeScaling::None, rotary_dim: global.rotary_dim },
        };
        (layer_attention(f, base.num_layers, |l| (l + 1) % 4 != 0)?, Some(local))
    } else {
        (vec![Attention::Full; base.num_layers], None)
    };
    let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(ModelConfig {
        norm: Norm::Rms { eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-5), add_one: false },
        rope: Some(global),
        rope_local,
        layer_attention,
        qkv_bias: bias,
        o_bias: bias,
        qk_norm: QkNorm::Projection,
        block_norms: BlockNorms::Post,
        ..base
    })
}
