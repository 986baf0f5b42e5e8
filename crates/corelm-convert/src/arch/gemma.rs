//! Gemma (1), Gemma 2 (soft-capping, alternating sliding windows, sandwich norms) and Gemma 3
//! text (five local layers per global one, two RoPE bases, q/k norms).

use crate::arch::{layer_attention, llama_like, rope};
use crate::config::{Activation, BlockNorms, Family, Fields, ModelConfig, Norm, QkNorm, Rope, RopeScaling};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    let base = llama_like(f, family)?;
    let act = match f.opt_str("hidden_activation")?.or(f.opt_str("hidden_act")?).unwrap_or("gelu_pytorch_tanh") {
        // Gemma checkpoints that say "gelu" were trained with the tanh approximation.
        "gelu_pytorch_tanh" | "gelu" | "gelu_new" => Activation::GeluTanh,
        other => return Err(crate::arch::unsupported(f, &format!("hidden_activation `{other}`"))),
    };
    let later = family != Family::Gemma;
    let scalar = if later { f.opt_f64("query_pre_attn_scalar")? } else { None };
    // Gemma 3's local layers use their own base (`rope_local_base_freq`, or the
    // `sliding_attention` entry of `rope_parameters`).
    let rope_local = if family == Family::Gemma3 {
        match rope(f, "sliding_attention", 10_000.0, base.head_dim, base.max_position_embeddings)? {
            Some(r) if f.raw("rope_parameters").is_some() => Some(r),
            _ => Some(Rope {
                theta: f.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0),
                scaling: RopeScaling::None,
                rotary_dim: base.head_dim,
            }),
        }
    } else {
        None
    };
    let pattern =
        f.opt_usize("sliding_window_pattern")?.or(f.opt_usize("_sliding_window_pattern")?).unwrap_or(6).max(1);
    let layer_attention = layer_attention(f, base.num_layers, |l| match family {
        Family::Gemma => false,
        // Gemma 2: even layers slide.
        Family::Gemma2 => l % 2 == 0,
        // Gemma 3: every `pattern`-th layer is global.
        _ => (l + 1) % pattern != 0,
    })?;
    let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(ModelConfig {
        norm: Norm::Rms { eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6), add_one: true },
        activation: act,
        rope_local,
        layer_attention,
        qkv_bias: bias,
        o_bias: bias,
        qk_norm: if family == Family::Gemma3 { QkNorm::PerHead } else { QkNorm::None },
        block_norms: if later { BlockNorms::Sandwich } else { BlockNorms::Pre },
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        embedding_scale: Some((base.hidden_size as f64).sqrt()),
        attention_scale: scalar.unwrap_or(base.head_dim as f64).powf(-0.5),
        attn_logit_softcap: if later { f.opt_f64("attn_logit_softcapping")? } else { None },
        final_logit_softcap: if later { f.opt_f64("final_logit_softcapping")? } else { None },
        ..base
    })
}
