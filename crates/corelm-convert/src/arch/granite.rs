//! Granite 3 (dense): Llama with multipliers on the token embeddings, on each block's output
//! before the residual add, on the attention scores (in place of 1/√head_dim) and, as a divisor,
//! on the logits.

use crate::arch::llama;
use crate::config::{Family, Fields, ModelConfig};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
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
