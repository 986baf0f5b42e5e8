//! Phi-3: fused q/k/v and gate/up projections, split into the common layout at load time.

use crate::arch::{dims, global_rope, layer_attention, token_ids, LayerRole, Role, Take, TensorSpec};
use crate::config::{Activation, Family, Fields, ModelConfig, Norm};
use crate::Result;

pub fn config(f: &Fields) -> Result<ModelConfig> {
    let d = dims(f)?;
    let (bos_token_id, eos_token_ids, pad_token_id) = token_ids(f)?;
    if let Some(s) = f.opt_object("rope_scaling")? {
        let kind = s.opt_str("type")?.or(s.opt_str("rope_type")?).unwrap_or("unknown");
        return Err(crate::arch::unsupported(f, &format!("Phi-3 rope_scaling `{kind}` (long-context variants)")));
    }
    Ok(ModelConfig {
        family: Family::Phi3,
        vocab_size: d.vocab_size,
        hidden_size: d.hidden_size,
        intermediate_size: d.intermediate_size,
        num_layers: d.num_layers,
        num_heads: d.num_heads,
        num_kv_heads: d.num_kv_heads,
        head_dim: d.head_dim,
        max_position_embeddings: d.max_position_embeddings,
        norm: Norm::Rms { eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-5), add_one: false },
        activation: Activation::Silu,
        rope: Some(global_rope(f, 10_000.0, &d)?),
        rope_local: None,
        layer_attention: layer_attention(f, d.num_layers, |_| true)?,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        sandwich_norms: false,
        gated_mlp: true,
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        embedding_scale: None,
        attention_scale: (d.head_dim as f64).powf(-0.5),
        attn_logit_softcap: None,
        final_logit_softcap: None,
        bos_token_id,
        eos_token_ids,
        pad_token_id,
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
