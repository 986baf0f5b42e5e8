//! Granite 3 (dense): Llama with multipliers on the token embeddings, on each block's output
//! before the residual add, on the attention scores (in place of 1/√head_dim) and, as a divisor,
//! on the logits. Granite 4's dense models (`granitemoehybrid` with attention layers only and no
//! experts) are the same with a fused gate/up projection (`shared_mlp`) and RoPE optional.

use crate::arch::{hf_decoder_spec, llama, LayerRole, Role, Take, TensorSpec};
use crate::config::{Family, Fields, ModelConfig};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    if family == Family::Granite4 {
        return granite4(f);
    }
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

/// Granite 4 dense: refuses what makes a Granite 4 model hybrid or sparse (Mamba-2 layers,
/// experts) by name; the MLP width is `shared_intermediate_size`; without
/// `position_embedding_type: "rope"` no layer rotates.
fn granite4(f: &Fields) -> Result<ModelConfig> {
    let experts = f.opt_usize("num_local_experts")?.unwrap_or(0);
    if experts > 0 {
        return Err(super::unsupported(f, &format!("a Granite 4 mixture of {experts} experts (num_local_experts)")));
    }
    let layers = f.usize("num_hidden_layers")?;
    let types = f.opt_str_list("layer_types")?.or(f.opt_str_list("layers_block_type")?);
    if let Some(other) = types.iter().flatten().find(|t| !matches!(**t, "attention" | "full_attention")) {
        return Err(super::unsupported(
            f,
            &format!("Granite 4 layer type `{other}` (Mamba-2 layers are the hybrid models' part; only attention layers convert)"),
        ));
    }
    let base = config(f, Family::Granite)?;
    let rope = f.opt_str("position_embedding_type")? == Some("rope");
    Ok(ModelConfig {
        family: Family::Granite4,
        intermediate_size: f.usize("shared_intermediate_size")?,
        rope_layers: vec![rope; layers],
        ..base
    })
}

/// Granite 4's fused `shared_mlp.input_linear` (gate rows, then up rows) and `output_linear`.
pub fn tensor_spec(c: &ModelConfig, role: Role) -> Option<TensorSpec> {
    let Role::Layer(l, r) = role else { return hf_decoder_spec(c, role) };
    let (p, i) = (format!("model.layers.{l}.shared_mlp"), c.intermediate_size);
    let rows =
        |start| Some(TensorSpec { name: format!("{p}.input_linear.weight"), take: Take::Rows { start, len: i } });
    match r {
        LayerRole::Gate => rows(0),
        LayerRole::Up => rows(i),
        LayerRole::Down => Some(TensorSpec::whole(format!("{p}.output_linear.weight"))),
        _ => hf_decoder_spec(c, role),
    }
}
