//! Qwen2 (q/k/v biases) and Qwen3 (q/k norms over the head dimension).

use crate::arch::{layer_attention, llama_like};
use crate::config::{Family, Fields, ModelConfig, QkNorm};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    let base = llama_like(f, family)?;
    // Without `layer_types`, windows apply only when enabled, and then from `max_window_layers` on.
    let enabled = f.opt_bool("use_sliding_window")?.unwrap_or(false);
    let first_sliding = f.opt_usize("max_window_layers")?.unwrap_or(base.num_layers);
    let qwen3 = family == Family::Qwen3;
    let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(ModelConfig {
        layer_attention: layer_attention(f, base.num_layers, |l| enabled && l >= first_sliding)?,
        qkv_bias: if qwen3 { bias } else { true },
        o_bias: qwen3 && bias,
        qk_norm: if qwen3 { QkNorm::PerHead } else { QkNorm::None },
        ..base
    })
}
