//! Gemma 3n's language model (`gemma3n_text`, or the text part of `gemma3n`): Gemma 3's
//! sandwich-normed layers with plain-gain norms and unscaled attention, wrapped in AltUp streams,
//! a LAuReL branch beside attention, per-layer embeddings fed into every layer, the last layers
//! reusing earlier layers' keys and values, and sparse gate activations in the first layers.
//! Gemma 4 shares the per-layer embeddings, KV sharing and naming (see `gemma4`).

use crate::arch::{hf_decoder_spec, layer_attention, llama_like, rope, unsupported, LayerRole, Role, TensorSpec};
use crate::config::{
    Activation, AltUp, Attention, BlockNorms, Family, Fields, LayerShape, Mixer, ModelConfig, Norm, PerLayerInputs,
    QkNorm,
};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    let base = gemma_base(f, family, 5)?;
    let n = base.num_layers;
    let intermediate = match f.raw("intermediate_size") {
        Some(serde_json::Value::Array(_)) => per_layer_usizes(f, "intermediate_size", n)?,
        _ => vec![base.intermediate_size; n],
    };
    let sparsity = match f.raw("activation_sparsity_pattern") {
        None => (0..n).map(|l| if n > 10 && l < 10 { 0.95 } else { 0.0 }).collect(),
        Some(serde_json::Value::Array(_)) => f.f64_list("activation_sparsity_pattern")?,
        Some(_) => vec![f.opt_f64("activation_sparsity_pattern")?.unwrap_or(0.0); n],
    };
    if sparsity.len() != n || sparsity.iter().any(|s| !(0.0..1.0).contains(s)) {
        return Err(f.error(format!(
            "`activation_sparsity_pattern` needs {n} fractions in [0, 1), one per layer; it has {}",
            sparsity.len()
        )));
    }
    // A GGUF source gives the quantiles themselves (llama.cpp's `activation_sparsity_scale`).
    let quantiles: Option<Vec<Option<f64>>> = match f.raw("_activation_sparsity_quantiles") {
        Some(serde_json::Value::Array(items)) if items.len() == n => {
            Some(items.iter().map(serde_json::Value::as_f64).collect())
        }
        Some(_) => return Err(f.error(format!("`_activation_sparsity_quantiles` needs {n} entries"))),
        None => None,
    };
    let kv_from = kv_sources(f, &base.layer_attention, f.opt_usize("num_kv_shared_layers")?.unwrap_or(15))?;
    let layers = (0..n)
        .map(|l| LayerShape {
            mixer: Mixer::Attention,
            head_dim: base.head_dim,
            kv_heads: base.num_kv_heads,
            intermediate: intermediate[l],
            kv_from: kv_from[l],
            values_are_keys: false,
            // transformers computes the quantile in fp32.
            sparsity_cutoff: match &quantiles {
                Some(q) => q[l],
                None => (sparsity[l] > 0.0).then(|| normal_quantile(sparsity[l]) as f32 as f64),
            },
        })
        .collect();
    let inputs = f.opt_usize("altup_num_inputs")?.unwrap_or(4);
    let active = f.opt_usize("altup_active_idx")?.unwrap_or(0);
    if inputs < 2 || active >= inputs {
        return Err(f.error(format!(
            "AltUp needs at least 2 inputs and an active one among them; it has {inputs} and {active}"
        )));
    }
    Ok(ModelConfig {
        layers,
        per_layer_inputs: per_layer_inputs(f, base.vocab_size)?,
        altup: Some(AltUp { inputs, active, correct_scale: f.opt_bool("altup_correct_scale")?.unwrap_or(true) }),
        laurel_rank: Some(f.opt_usize("laurel_rank")?.unwrap_or(64)),
        final_logit_softcap: f.opt_f64("final_logit_softcapping")?.or(Some(30.0)),
        ..base
    })
}

/// What Gemma 3n and 4 share: Gemma 3's sandwich norms and q/k norms, norms that multiply by
/// their gain (not 1 + gain), values normed without one, attention unscaled, the embedding
/// scaled by √hidden, and local and global RoPE (global layers every `pattern`-th by default).
pub(crate) fn gemma_base(f: &Fields, family: Family, pattern: usize) -> Result<ModelConfig> {
    let base = llama_like(f, family)?;
    match f.opt_str("hidden_activation")?.or(f.opt_str("hidden_act")?).unwrap_or("gelu_pytorch_tanh") {
        "gelu_pytorch_tanh" | "gelu" | "gelu_new" => {}
        other => return Err(unsupported(f, &format!("hidden_activation `{other}`"))),
    }
    let layer_attention = layer_attention(f, base.num_layers, |l| (l + 1) % pattern != 0)?;
    let local = rope(f, "sliding_attention", 10_000.0, base.head_dim, base.max_position_embeddings)?;
    let local = match (local, f.opt_f64("rope_local_base_freq")?) {
        (Some(r), _) if f.raw("rope_parameters").is_some() => r,
        (_, theta) => crate::config::Rope {
            theta: theta.unwrap_or(10_000.0),
            scaling: crate::config::RopeScaling::None,
            rotary_dim: base.head_dim,
        },
    };
    let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(ModelConfig {
        norm: Norm::Rms { eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6), add_one: false },
        activation: Activation::GeluTanh,
        rope_local: Some(local),
        layer_attention,
        qkv_bias: bias,
        o_bias: bias,
        qk_norm: QkNorm::PerHead,
        value_norm: true,
        block_norms: BlockNorms::Sandwich,
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        embedding_scale: Some((base.hidden_size as f64).sqrt()),
        attention_scale: 1.0,
        final_logit_softcap: f.opt_f64("final_logit_softcapping")?,
        ..base
    })
}

/// The per-layer embeddings' sizes; `None` when `hidden_size_per_layer_input` is 0.
pub(crate) fn per_layer_inputs(f: &Fields, vocab: usize) -> Result<Option<PerLayerInputs>> {
    let width = f.opt_usize("hidden_size_per_layer_input")?.unwrap_or(256);
    let rows = f.opt_usize("vocab_size_per_layer_input")?.unwrap_or(262_144);
    if width == 0 {
        return Ok(None);
    }
    if rows == 0 {
        return Err(f.error("`vocab_size_per_layer_input` must be positive"));
    }
    Ok(Some(PerLayerInputs { width, vocab: rows.min(vocab) }))
}

/// Each layer's KV source under transformers' `kv_sharing_modes`: the last
/// `num_kv_shared_layers` layers reuse the keys and values of the last earlier layer of their
/// own type.
pub(crate) fn kv_sources(f: &Fields, attention: &[Attention], shared: usize) -> Result<Vec<Option<usize>>> {
    let n = attention.len();
    if shared == 0 {
        return Ok(vec![None; n]);
    }
    if shared >= n {
        return Err(f.error(format!(
            "`num_kv_shared_layers` is {shared} of {n} layers; at least one layer must compute keys and values"
        )));
    }
    let first = n - shared;
    (0..n)
        .map(|l| {
            if l < first {
                return Ok(None);
            }
            let same = |a: &Attention, b: &Attention| std::mem::discriminant(a) == std::mem::discriminant(b);
            (0..first).rev().find(|&s| same(&attention[s], &attention[l])).map(Some).ok_or_else(|| {
                f.error(format!("layer {l} shares keys and values, but no earlier layer of its type computes them"))
            })
        })
        .collect()
}

pub(crate) fn per_layer_usizes(f: &Fields, key: &str, n: usize) -> Result<Vec<usize>> {
    let values = f.f64_list(key)?;
    if values.len() != n || values.iter().any(|v| v.fract() != 0.0 || *v <= 0.0 || *v > (1u64 << 20) as f64) {
        return Err(f.error(format!("`{key}` needs {n} positive integers, one per layer")));
    }
    Ok(values.into_iter().map(|v| v as usize).collect())
}

/// Gemma 3n's and 4's tensor names (under `model.language_model.` in multimodal checkpoints,
/// which `checkpoint::resolve` finds).
pub fn tensor_spec(c: &ModelConfig, role: Role) -> Option<TensorSpec> {
    use LayerRole::*;
    let name = match role {
        Role::PerLayerEmbed if c.per_layer_inputs.is_some() => "model.embed_tokens_per_layer.weight".to_string(),
        Role::PerLayerProjection if c.per_layer_inputs.is_some() => {
            "model.per_layer_model_projection.weight".to_string()
        }
        Role::PerLayerProjectionNorm if c.per_layer_inputs.is_some() => {
            "model.per_layer_projection_norm.weight".to_string()
        }
        Role::AltUpProjection(i) if c.altup.is_some() => format!("model.altup_projections.{i}.weight"),
        Role::AltUpUnembed(i) if c.altup.is_some() => format!("model.altup_unembed_projections.{i}.weight"),
        Role::Layer(l, r) => {
            let p = format!("model.layers.{l}");
            let shape = c.layer(l);
            match r {
                // Shared layers' K/V weights, where a checkpoint has them, are never read.
                K | KNorm | KBias if shape.kv_from.is_some() => return None,
                V | VBias if shape.kv_from.is_some() || shape.values_are_keys => return None,
                LayerScalar if c.layer_scalar => format!("{p}.layer_scalar"),
                PerLayerGate if c.per_layer_inputs.is_some() => format!("{p}.per_layer_input_gate.weight"),
                PerLayerProj if c.per_layer_inputs.is_some() => format!("{p}.per_layer_projection.weight"),
                PostPerLayerNorm if c.per_layer_inputs.is_some() => format!("{p}.post_per_layer_input_norm.weight"),
                LaurelLeft if c.laurel_rank.is_some() => format!("{p}.laurel.linear_left.weight"),
                LaurelRight if c.laurel_rank.is_some() => format!("{p}.laurel.linear_right.weight"),
                LaurelNorm if c.laurel_rank.is_some() => format!("{p}.laurel.post_laurel_norm.weight"),
                AltUpCorrectScale if c.altup.is_some_and(|a| a.correct_scale) => {
                    format!("{p}.altup.correct_output_scale")
                }
                AltUpCorrection if c.altup.is_some() => format!("{p}.altup.correction_coefs.weight"),
                AltUpPrediction if c.altup.is_some() => format!("{p}.altup.prediction_coefs.weight"),
                AltUpRouter if c.altup.is_some() => format!("{p}.altup.modality_router.weight"),
                AltUpRouterNorm if c.altup.is_some() => format!("{p}.altup.router_norm.weight"),
                _ => return hf_decoder_spec(c, role),
            }
        }
        _ => return hf_decoder_spec(c, role),
    };
    Some(TensorSpec::whole(name))
}

/// The standard normal quantile Φ⁻¹(p), 0 < p < 1 (Acklam's rational approximation, relative
/// error below 1.2e-9, far inside fp32's rounding of the result).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] =
        [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn normal_quantile_matches_published_values() {
        // Φ⁻¹(0.95) and Φ⁻¹(0.5), Φ⁻¹(0.01) (scipy.stats.norm.ppf).
        for (p, z) in [(0.95, 1.6448536269514722), (0.5, 0.0), (0.01, -2.3263478740408408)] {
            assert!((super::normal_quantile(p) - z).abs() < 1e-8, "{p}");
        }
    }
}
