//! Gemma (1), Gemma 2 (soft-capping, alternating sliding windows, sandwich norms) and Gemma 3
//! text (five local layers per global one, two RoPE bases, q/k norms).

use crate::arch::{dims, global_rope, layer_attention, rope, token_ids};
use crate::config::{Activation, Family, Fields, ModelConfig, Norm, Rope, RopeScaling};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    let d = dims(f)?;
    let (bos_token_id, eos_token_ids, pad_token_id) = token_ids(f)?;
    let act = match f.opt_str("hidden_activation")?.or(f.opt_str("hidden_act")?).unwrap_or("gelu_pytorch_tanh") {
        // Gemma checkpoints that say "gelu" were trained with the tanh approximation.
        "gelu_pytorch_tanh" | "gelu" | "gelu_new" => Activation::GeluTanh,
        other => return Err(crate::arch::unsupported(f, &format!("hidden_activation `{other}`"))),
    };
    let later = family != Family::Gemma;
    let scalar = if later { f.opt_f64("query_pre_attn_scalar")? } else { None };
    let global = global_rope(f, 10_000.0, &d)?;
    // Gemma 3's local layers use their own base (`rope_local_base_freq`, or the
    // `sliding_attention` entry of `rope_parameters`).
    let rope_local = if family == Family::Gemma3 {
        match rope(f, "sliding_attention", 10_000.0, d.head_dim, d.max_position_embeddings)? {
            Some(r) if f.raw("rope_parameters").is_some() => Some(r),
            _ => Some(Rope {
                theta: f.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0),
                scaling: RopeScaling::None,
                rotary_dim: d.head_dim,
            }),
        }
    } else {
        None
    };
    let pattern =
        f.opt_usize("sliding_window_pattern")?.or(f.opt_usize("_sliding_window_pattern")?).unwrap_or(6).max(1);
    let layer_attention = layer_attention(f, d.num_layers, |l| match family {
        Family::Gemma => false,
        // Gemma 2: even layers slide.
        Family::Gemma2 => l % 2 == 0,
        // Gemma 3: every `pattern`-th layer is global.
        _ => (l + 1) % pattern != 0,
    })?;
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
        norm: Norm::Rms { eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6), add_one: true },
        activation: act,
        rope: Some(global),
        rope_local,
        layer_attention,
        qkv_bias: f.opt_bool("attention_bias")?.unwrap_or(false),
        o_bias: f.opt_bool("attention_bias")?.unwrap_or(false),
        mlp_bias: false,
        qk_norm: family == Family::Gemma3,
        sandwich_norms: later,
        gated_mlp: true,
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        embedding_scale: Some((d.hidden_size as f64).sqrt()),
        attention_scale: scalar.unwrap_or(d.head_dim as f64).powf(-0.5),
        attn_logit_softcap: if later { f.opt_f64("attn_logit_softcapping")? } else { None },
        final_logit_softcap: if later { f.opt_f64("final_logit_softcapping")? } else { None },
        bos_token_id,
        eos_token_ids,
        pad_token_id,
    })
}
