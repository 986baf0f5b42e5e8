//! GPT-2: learned positions, LayerNorm with biases, fused Conv1D attention (stored transposed).

use crate::arch::{token_ids, LayerRole, Role, Take, TensorSpec};
use crate::config::{Activation, Attention, BlockNorms, Family, Fields, ModelConfig, Norm, QkNorm};
use crate::Result;

pub fn config(f: &Fields, family: Family) -> Result<ModelConfig> {
    let hidden = f.usize_any(&["n_embd", "hidden_size"])?;
    let heads = f.usize_any(&["n_head", "num_attention_heads"])?;
    let layers = f.usize_any(&["n_layer", "num_hidden_layers"])?;
    if heads == 0 || hidden % heads != 0 {
        return Err(f.error(format!("n_embd ({hidden}) must be a multiple of n_head ({heads})")));
    }
    let act = f.opt_str("activation_function")?.unwrap_or("gelu_new");
    let activation = match act {
        "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
        "gelu" => Activation::Gelu,
        other => return Err(crate::arch::unsupported(f, &format!("activation_function `{other}`"))),
    };
    let (bos_token_id, eos_token_ids, pad_token_id) = token_ids(f)?;
    let head_dim = hidden / heads;
    Ok(ModelConfig {
        family,
        vocab_size: f.usize("vocab_size")?,
        hidden_size: hidden,
        intermediate_size: f.opt_usize("n_inner")?.unwrap_or(4 * hidden),
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim,
        max_position_embeddings: f.usize_any(&["n_positions", "max_position_embeddings"])?,
        norm: Norm::Layer { eps: f.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5) },
        activation,
        rope: None,
        rope_local: None,
        layer_attention: vec![Attention::Full; layers],
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        qk_norm: QkNorm::None,
        block_norms: BlockNorms::Pre,
        rope_layers: vec![false; layers],
        residual_multiplier: None,
        logit_scale: None,
        gated_mlp: false,
        tie_word_embeddings: true,
        embedding_scale: None,
        attention_scale: (head_dim as f64).powf(-0.5),
        attn_logit_softcap: None,
        final_logit_softcap: None,
        bos_token_id,
        eos_token_ids,
        pad_token_id,
        layers: vec![],
        value_norm: false,
        per_layer_inputs: None,
        altup: None,
        laurel_rank: None,
        layer_scalar: false,
        attention_gate: false,
        linear: None,
    })
}

pub fn tensor_spec(c: &ModelConfig, role: Role) -> Option<TensorSpec> {
    use LayerRole::*;
    let h = c.hidden_size;
    let whole = |n: &str| Some(TensorSpec::whole(format!("transformer.{n}")));
    let Role::Layer(l, r) = role else {
        return match role {
            Role::Embed | Role::LmHead => whole("wte.weight"),
            Role::PositionEmbed => whole("wpe.weight"),
            Role::FinalNorm => whole("ln_f.weight"),
            Role::FinalNormBias => whole("ln_f.bias"),
            _ => None,
        };
    };
    let p = format!("transformer.h.{l}");
    let t = |name: &str, start, len| {
        Some(TensorSpec { name: format!("{p}.{name}"), take: Take::TransposedRows { start, len } })
    };
    let b = |name: &str, start, len| Some(TensorSpec { name: format!("{p}.{name}"), take: Take::Rows { start, len } });
    let w = |name: &str| Some(TensorSpec::whole(format!("{p}.{name}")));
    match r {
        AttnNorm => w("ln_1.weight"),
        AttnNormBias => w("ln_1.bias"),
        Q => t("attn.c_attn.weight", 0, h),
        K => t("attn.c_attn.weight", h, h),
        V => t("attn.c_attn.weight", 2 * h, h),
        QBias => b("attn.c_attn.bias", 0, h),
        KBias => b("attn.c_attn.bias", h, h),
        VBias => b("attn.c_attn.bias", 2 * h, h),
        O => t("attn.c_proj.weight", 0, h),
        OBias => w("attn.c_proj.bias"),
        MlpNorm => w("ln_2.weight"),
        MlpNormBias => w("ln_2.bias"),
        Up => t("mlp.c_fc.weight", 0, c.intermediate_size),
        UpBias => w("mlp.c_fc.bias"),
        Down => t("mlp.c_proj.weight", 0, h),
        DownBias => w("mlp.c_proj.bias"),
        _ => None,
    }
}
