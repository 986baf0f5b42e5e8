//! Llama (1, 2, 3.x with rope scaling) and Mistral (optional sliding window).

use crate::arch::{dims, global_rope, layer_attention, token_ids};
use crate::config::{Activation, Family, Fields, ModelConfig, Norm};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    let d = dims(f)?;
    let (bos_token_id, eos_token_ids, pad_token_id) = token_ids(f)?;
    let act = f.opt_str("hidden_act")?.unwrap_or("silu");
    if act != "silu" {
        return Err(crate::arch::unsupported(f, &format!("hidden_act `{act}` (llama uses silu)")));
    }
    let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
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
        // Mistral slides every layer when a window is set; Llama never does.
        layer_attention: layer_attention(f, d.num_layers, |_| family == Family::Mistral)?,
        qkv_bias: bias,
        o_bias: bias,
        mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
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
