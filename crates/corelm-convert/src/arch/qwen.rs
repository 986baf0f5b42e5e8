//! Qwen2 (q/k/v biases) and Qwen3 (q/k norms over the head dimension).

use crate::arch::{dims, global_rope, layer_attention, token_ids};
use crate::config::{Activation, Family, Fields, ModelConfig, Norm};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    let d = dims(f)?;
    let (bos_token_id, eos_token_ids, pad_token_id) = token_ids(f)?;
    // Without `layer_types`, windows apply only when enabled, and then from `max_window_layers` on.
    let enabled = f.opt_bool("use_sliding_window")?.unwrap_or(false);
    let first_sliding = f.opt_usize("max_window_layers")?.unwrap_or(d.num_layers);
    let layer_attention = layer_attention(f, d.num_layers, |l| enabled && l >= first_sliding)?;
    let qwen3 = family == Family::Qwen3;
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
        layer_attention,
        qkv_bias: if qwen3 { f.opt_bool("attention_bias")?.unwrap_or(false) } else { true },
        o_bias: qwen3 && f.opt_bool("attention_bias")?.unwrap_or(false),
        mlp_bias: false,
        qk_norm: qwen3,
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
