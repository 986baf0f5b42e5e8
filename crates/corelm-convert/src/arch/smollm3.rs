//! SmolLM3: Llama with RoPE left out of every fourth layer (`no_rope_layers`), and sliding
//! windows, when enabled, on the layers `layer_types` marks.

use crate::arch::{dims, global_rope, layer_attention, llama_like};
use crate::config::{Attention, Family, Fields, ModelConfig};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    let base = llama_like(f, family)?;
    let layers = base.num_layers;
    // A 1 marks a layer that rotates; the list may be longer than the layers.
    let rope_layers = match f.opt_bool_list("no_rope_layers")? {
        Some(flags) if flags.len() >= layers => flags[..layers].to_vec(),
        Some(flags) => {
            return Err(f.error(format!("`no_rope_layers` has {} flags for {layers} layers", flags.len())));
        }
        None => {
            let interval = f.opt_usize("no_rope_layer_interval")?.unwrap_or(4).max(1);
            (0..layers).map(|l| (l + 1) % interval != 0).collect()
        }
    };
    // transformers' default `layer_types` slides the NoPE layers; windows apply only when enabled.
    let layer_attention = if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
        layer_attention(f, layers, |l| !rope_layers[l])?
    } else {
        vec![Attention::Full; layers]
    };
    let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(ModelConfig {
        rope: Some(global_rope(f, 2_000_000.0, &dims(f)?)?),
        rope_layers,
        layer_attention,
        qkv_bias: bias,
        o_bias: bias,
        mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        ..base
    })
}
