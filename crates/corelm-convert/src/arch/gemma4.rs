//! Gemma 4's dense language models (`gemma4_text`, or the text part of `gemma4`): Gemma 3n's
//! norms, per-layer embeddings and KV sharing without AltUp or LAuReL; global layers with wider
//! heads (`global_head_dim`), their own KV head count and, with `attention_k_eq_v`, values taken
//! from the key projection; proportional RoPE on global layers; each layer's output scaled by a
//! stored `layer_scalar`; on the E models, the MLPs of KV-sharing layers twice as wide.

use crate::arch::gemma3n::{gemma_base, kv_sources, per_layer_inputs, per_layer_usizes};
use crate::arch::{rope, unsupported};
use crate::config::{Attention, Family, Fields, LayerShape, Mixer, ModelConfig, Rope, RopeScaling};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    if f.opt_bool("enable_moe_block")?.unwrap_or(false) {
        return Err(unsupported(f, "Gemma 4's mixture-of-experts blocks (enable_moe_block)"));
    }
    if f.opt_str("use_bidirectional_attention")? == Some("all") {
        return Err(unsupported(f, "bidirectional attention (use_bidirectional_attention: all)"));
    }
    let mut base = gemma_base(f, family, 6)?;
    // transformers makes the last layer global whatever the config lists.
    if let Some(last) = base.layer_attention.last_mut() {
        *last = Attention::Full;
    }
    let n = base.num_layers;
    let global_head_dim = f.opt_usize("global_head_dim")?.unwrap_or(512);
    let k_eq_v = f.opt_bool("attention_k_eq_v")?.unwrap_or(false);
    let global_kv_heads = match f.opt_usize("num_global_key_value_heads")? {
        Some(h) if k_eq_v => h,
        _ => base.num_kv_heads,
    };
    let kv_from = kv_sources(f, &base.layer_attention, f.opt_usize("num_kv_shared_layers")?.unwrap_or(0))?;
    let double_wide = f.opt_bool("use_double_wide_mlp")?.unwrap_or(false);
    // A GGUF source lists each layer's MLP width instead.
    let widths = match f.raw("intermediate_size") {
        Some(serde_json::Value::Array(_)) => Some(per_layer_usizes(f, "intermediate_size", n)?),
        _ => None,
    };
    // transformers 5 writes the global layers' sizes as `per_layer_config` overrides, by layer
    // index; published configs give `global_head_dim` and `num_global_key_value_heads`.
    let overrides = f.opt_object("per_layer_config")?;
    let mut layers = Vec::with_capacity(n);
    for (l, &source) in kv_from.iter().enumerate() {
        let global = base.layer_attention[l] == Attention::Full;
        let mut shape = LayerShape {
            mixer: Mixer::Attention,
            head_dim: if global { global_head_dim } else { base.head_dim },
            kv_heads: if global { global_kv_heads } else { base.num_kv_heads },
            intermediate: match &widths {
                Some(w) => w[l],
                None => base.intermediate_size * if double_wide && source.is_some() { 2 } else { 1 },
            },
            kv_from: source,
            values_are_keys: global && k_eq_v,
            sparsity_cutoff: None,
        };
        if let Some(o) = &overrides {
            shape.head_dim = base.head_dim;
            shape.kv_heads = base.num_kv_heads;
            if let Some(layer) = o.opt_object(&l.to_string())? {
                shape.head_dim = layer.opt_usize("head_dim")?.unwrap_or(base.head_dim);
                shape.kv_heads = layer.opt_usize("num_key_value_heads")?.unwrap_or(base.num_kv_heads);
            }
        }
        if shape.head_dim == 0 || shape.kv_heads == 0 || base.num_heads % shape.kv_heads != 0 {
            return Err(f.error(format!(
                "layer {l} needs a positive head size and a KV head count dividing {} heads; it has {} and {}",
                base.num_heads, shape.head_dim, shape.kv_heads
            )));
        }
        layers.push(shape);
    }
    let global_head_dim = layers
        .iter()
        .zip(&base.layer_attention)
        .find(|(_, a)| **a == Attention::Full)
        .map_or(global_head_dim, |(s, _)| s.head_dim);
    let global_rope = global_rope(f, global_head_dim, base.max_position_embeddings)?;
    Ok(ModelConfig {
        layers,
        rope: Some(global_rope),
        per_layer_inputs: per_layer_inputs(f, base.vocab_size)?,
        layer_scalar: true,
        ..base
    })
}

/// The global layers' RoPE: by default transformers' "proportional" kind with a quarter of the
/// pairs rotated and base 1 000 000, over the global head size.
fn global_rope(f: &Fields, head_dim: usize, max_positions: usize) -> Result<Rope> {
    let r = rope(f, "full_attention", 1_000_000.0, head_dim, max_positions)?;
    Ok(match r {
        Some(r) => r,
        None => Rope {
            theta: 1_000_000.0,
            scaling: RopeScaling::Proportional { rotated_pairs: head_dim / 8, factor: 1.0 },
            rotary_dim: head_dim,
        },
    })
}
