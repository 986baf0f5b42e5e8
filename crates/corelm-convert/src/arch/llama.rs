//! Llama (1, 2, 3.x with rope scaling) and Mistral (optional sliding window).

use crate::arch::{layer_attention, llama_like};
use crate::config::{Family, Fields, ModelConfig};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    let act = f.opt_str("hidden_act")?.unwrap_or("silu");
    if act != "silu" {
        return Err(crate::arch::unsupported(f, &format!("hidden_act `{act}` (llama uses silu)")));
    }
    let base = llama_like(f, family)?;
    let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(ModelConfig {
        // Mistral slides every layer when a window is set; Llama never does.
        layer_attention: layer_attention(f, base.num_layers, |_| family == Family::Mistral)?,
        qkv_bias: bias,
        o_bias: bias,
        mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
        ..base
    })
}
