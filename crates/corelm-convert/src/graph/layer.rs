//! One decoder layer: attention and MLP blocks around the residual stream, with the norms the
//! family puts before (and, for Gemma 2/3, after) each block.

use super::attention::{attend, merge_heads, project_qkv, AttentionForm};
use super::cache::KvCache;
use super::emitter::{Binary, Graph};
use super::inputs::{Positions, RopeRows};
use super::masks::Masks;
use super::per_layer::PerLayerInputs;
use super::recurrent;
use crate::arch::{LayerRole, Role};
use crate::config::{Attention, Mixer};
use crate::Result;
use corelm_format::{DType, Var};

/// What every layer of a function shares.
pub(super) struct LayerContext<'a> {
    /// The dtype of the computation, and of the residual stream.
    pub compute: DType,
    pub residual: DType,
    pub attention: AttentionForm,
    pub positions: &'a Positions,
    pub rope: &'a RopeRows,
    /// The per-layer inputs (Gemma 3n, 4), when the model has them.
    pub per_layer: Option<&'a PerLayerInputs>,
    /// The function's fixed query length (`None`: flexible).
    pub query_len: Option<usize>,
}

/// Layer `l` applied to the residual stream `x`: attention and MLP blocks, then (Gemma 4) the
/// per-layer input's branch and the layer scalar.
pub(super) fn decoder_layer(
    g: &mut Graph,
    cx: &LayerContext,
    kv: &mut KvCache,
    masks: &mut Masks,
    l: usize,
    x: Var,
) -> Result<Var> {
    use LayerRole::*;
    let p = format!("l{l}");
    let lr = |r| Role::Layer(l, r);
    let attn_in = pre_norm(g, cx, &x, lr(AttnNorm), lr(AttnNormBias), &format!("{p}_attn_norm"))?;
    let o = match g.c.layer(l).mixer {
        Mixer::Attention => attention_block(g, cx, kv, masks, l, &attn_in)?,
        _ => recurrent::mixer_block(g, &kv.recurrent, cx.positions, cx.compute, l, &attn_in, cx.query_len)?,
    };
    let names = [format!("{p}_post_attn_norm"), format!("{p}_o_res"), format!("{p}_h")];
    let x = residual_add(g, cx, x, o, lr(PostAttnNorm), &names)?;

    let mlp_in = pre_norm(g, cx, &x, lr(MlpNorm), lr(MlpNormBias), &format!("{p}_mlp_norm"))?;
    let m = mlp(g, l, &mlp_in)?;
    let names = [format!("{p}_post_mlp_norm"), format!("{p}_mlp_res"), format!("{p}_out")];
    let mut x = residual_add(g, cx, x, m, lr(PostMlpNorm), &names)?;
    if let Some(inputs) = cx.per_layer {
        let branch = per_layer_branch(g, cx, inputs, l, &x)?;
        x = g.binary(Binary::Add, &format!("{p}_per_layer_res"), &x, &branch)?;
    }
    if g.c.layer_scalar {
        let s = g.required(lr(LayerScalar))?;
        let s = g.cast(&s, cx.residual, &format!("{p}_scalar_res"))?;
        x = g.binary(Binary::Mul, &format!("{p}_scaled"), &x, &s)?;
    }
    Ok(x)
}

/// Attention of layer `l` over its input `x` (normed), through the output projection: with
/// its own keys and values, written to the cache, or those of the layer it shares them with.
pub(super) fn attention_block(
    g: &mut Graph,
    cx: &LayerContext,
    kv: &mut KvCache,
    masks: &mut Masks,
    l: usize,
    x: &Var,
) -> Result<Var> {
    let p = format!("l{l}");
    let window = match g.c.layer_attention[l] {
        Attention::Sliding(w) => Some(w),
        Attention::Full => None,
    };
    let rope = if g.c.rope_layers[l] { cx.rope.for_layer(window.is_some()) } else { None };
    let (q, own) = project_qkv(g, l, x, cx.compute, rope)?;
    let (keys, values) = match (own, g.c.layer(l).kv_from) {
        (Some((k, v)), _) => kv.write_and_read(g, cx.positions, l, &k, &v)?,
        (None, Some(source)) => kv.reuse(source)?,
        (None, None) => unreachable!("a layer without keys of its own reuses another's"),
    };
    let repeat = g.c.num_heads / g.c.layer(l).kv_heads;
    let mask = masks.for_layer(g, window, repeat, cx.attention.per_head(), &p)?;
    let attn = attend(g, cx.attention, l, q, &keys, &values, &mask, &p)?;
    let mut flat = merge_heads(g, l, &attn, &p)?;
    if g.c.attention_gate {
        let gate = g.linear(x, Role::Layer(l, LayerRole::QGate), None, &format!("{p}_gate"))?;
        let gate = g.op("sigmoid", &format!("{p}_gate_act"), vec![("x", (&gate).into())])?;
        flat = g.binary(Binary::Mul, &format!("{p}_gated"), &flat, &gate)?;
    }
    g.linear(&flat, Role::Layer(l, LayerRole::O), Some(Role::Layer(l, LayerRole::OBias)), &format!("{p}_o"))
}

/// The per-layer input's branch of layer `l` (Gemma 3n, 4), from the stream `x`:
/// norm(projection(act(gate(x)) · input_l)), in the residual dtype.
pub(super) fn per_layer_branch(
    g: &mut Graph,
    cx: &LayerContext,
    inputs: &PerLayerInputs,
    l: usize,
    x: &Var,
) -> Result<Var> {
    use LayerRole::*;
    let p = format!("l{l}_per_layer");
    let lr = |r| Role::Layer(l, r);
    let input = inputs.for_layer(g, l)?;
    let xc = g.cast(x, cx.compute, &format!("{p}_in"))?;
    let gate = g.linear(&xc, lr(PerLayerGate), None, &format!("{p}_gate"))?;
    let act = g.activation(&gate, &format!("{p}_act"))?;
    let gated = g.binary(Binary::Mul, &format!("{p}_gated"), &act, &input)?;
    let projected = g.linear(&gated, lr(PerLayerProj), None, &format!("{p}_proj"))?;
    g.norm(&projected, lr(PostPerLayerNorm), None, cx.residual, false, &format!("{p}_norm"))
}

/// A block's input: the residual stream normed where the family norms before blocks, else the
/// stream itself in the compute dtype.
pub(super) fn pre_norm(g: &mut Graph, cx: &LayerContext, x: &Var, weight: Role, bias: Role, name: &str) -> Result<Var> {
    if g.c.block_norms.pre() {
        g.norm(x, weight, Some(bias), cx.compute, true, name)
    } else {
        g.cast(x, cx.compute, name)
    }
}

/// `x + block`: the block normed by `post_norm` first where the family norms block outputs,
/// and scaled by its residual multiplier; `names`: the norm's, the cast's and the sum's.
pub(super) fn residual_add(
    g: &mut Graph,
    cx: &LayerContext,
    x: Var,
    block: Var,
    post_norm: Role,
    names: &[String; 3],
) -> Result<Var> {
    let [norm_name, cast_name, name] = names;
    let block =
        if g.c.block_norms.post() { g.norm(&block, post_norm, None, cx.residual, false, norm_name)? } else { block };
    let block = match g.c.residual_multiplier {
        Some(m) => g.mul_s(&block, m, &format!("{name}_scaled"))?,
        None => block,
    };
    let block = g.cast(&block, cx.residual, cast_name)?;
    g.binary(Binary::Add, name, &x, &block)
}

/// The MLP: gated (gate · act, times up, then down) or plain (up, act, down).
pub(super) fn mlp(g: &mut Graph, l: usize, x: &Var) -> Result<Var> {
    use LayerRole::*;
    let p = format!("l{l}");
    let lr = |r| Role::Layer(l, r);
    if g.c.gated_mlp {
        let mut gate = g.linear(x, lr(Gate), None, &format!("{p}_gate"))?;
        if let Some(z) = g.c.layer(l).sparsity_cutoff {
            gate = sparse_gate(g, &gate, z, &p)?;
        }
        let act = g.activation(&gate, &format!("{p}_act"))?;
        let up = g.linear(x, lr(Up), None, &format!("{p}_up"))?;
        let prod = g.binary(Binary::Mul, &format!("{p}_gated"), &act, &up)?;
        g.linear(&prod, lr(Down), Some(lr(DownBias)), &format!("{p}_down"))
    } else {
        let up = g.linear(x, lr(Up), Some(lr(UpBias)), &format!("{p}_up"))?;
        let act = g.activation(&up, &format!("{p}_act"))?;
        g.linear(&act, lr(Down), Some(lr(DownBias)), &format!("{p}_down"))
    }
}

/// Gemma 3n's activation sparsity (transformers' `_gaussian_topk`): relu(gate − (mean + z·std))
/// over each token's gate values; the statistics in fp32 outside the Neural Engine.
fn sparse_gate(g: &mut Graph, gate: &Var, z: f64, p: &str) -> Result<Var> {
    let dtype = gate.dtype();
    let x = if g.ane { gate.clone() } else { g.cast(gate, DType::Fp32, &format!("{p}_gate_f32"))? };
    let mean = g.mean_channels(&x, &format!("{p}_gate_mean"))?;
    let centered = g.binary(Binary::Sub, &format!("{p}_gate_centered"), &x, &mean)?;
    let sq = g.binary(Binary::Mul, &format!("{p}_gate_sq"), &centered, &centered)?;
    let var = g.mean_channels(&sq, &format!("{p}_gate_var"))?;
    let std = g.op("sqrt", &format!("{p}_gate_std"), vec![("x", (&var).into())])?;
    // transformers rounds the multiplier to the activations' dtype.
    let z = if dtype == DType::Fp16 { half::f16::from_f64(z).to_f64() } else { z as f32 as f64 };
    let spread = g.mul_s(&std, z, &format!("{p}_gate_spread"))?;
    let cutoff = g.binary(Binary::Add, &format!("{p}_gate_cutoff"), &mean, &spread)?;
    let shifted = g.binary(Binary::Sub, &format!("{p}_gate_shifted"), &x, &cutoff)?;
    let kept = g.op("relu", &format!("{p}_gate_kept"), vec![("x", (&shifted).into())])?;
    g.cast(&kept, dtype, &format!("{p}_gate_sparse"))
}
