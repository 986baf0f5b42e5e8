//! One decoder layer: attention and MLP blocks around the residual stream, with the norms the
//! family puts before (and, for Gemma 2/3, after) each block.

use super::attention::{attend, merge_heads, project_qkv, AttentionForm};
use super::cache::KvCache;
use super::emitter::{Binary, Graph};
use super::inputs::{Positions, RopeRows};
use super::masks::Masks;
use crate::arch::{LayerRole, Role};
use crate::config::Attention;
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
}

/// Layer `l` applied to the residual stream `x`.
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
    let window = match g.c.layer_attention[l] {
        Attention::Sliding(w) => Some(w),
        Attention::Full => None,
    };
    let attn_in = pre_norm(g, cx, &x, lr(AttnNorm), lr(AttnNormBias), &format!("{p}_attn_norm"))?;
    let rope = if g.c.rope_layers[l] { cx.rope.for_layer(window.is_some()) } else { None };
    let (q, k, v) = project_qkv(g, l, &attn_in, cx.compute, rope)?;
    let (keys, values) = kv.write_and_read(g, cx.positions, l, &k, &v)?;
    let mask = masks.for_layer(g, window, cx.attention.per_head(), &p)?;
    let attn = attend(g, cx.attention, q, &keys, &values, &mask, &p)?;
    let flat = merge_heads(g, &attn, &p)?;
    let o = g.linear(&flat, lr(O), Some(lr(OBias)), &format!("{p}_o"))?;
    let names = [format!("{p}_post_attn_norm"), format!("{p}_o_res"), format!("{p}_h")];
    let x = residual_add(g, cx, x, o, lr(PostAttnNorm), &names)?;

    let mlp_in = pre_norm(g, cx, &x, lr(MlpNorm), lr(MlpNormBias), &format!("{p}_mlp_norm"))?;
    let m = mlp(g, l, &mlp_in)?;
    let names = [format!("{p}_post_mlp_norm"), format!("{p}_mlp_res"), format!("{p}_out")];
    residual_add(g, cx, x, m, lr(PostMlpNorm), &names)
}

/// A block's input: the residual stream normed where the family norms before blocks, else the
/// stream itself in the compute dtype.
fn pre_norm(g: &mut Graph, cx: &LayerContext, x: &Var, weight: Role, bias: Role, name: &str) -> Result<Var> {
    if g.c.block_norms.pre() {
        g.norm(x, weight, Some(bias), cx.compute, true, name)
    } else {
        g.cast(x, cx.compute, name)
    }
}

/// `x + block`: the block normed by `post_norm` first where the family norms block outputs,
/// and scaled by its residual multiplier; `names`: the norm's, the cast's and the sum's.
fn residual_add(
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
fn mlp(g: &mut Graph, l: usize, x: &Var) -> Result<Var> {
    use LayerRole::*;
    let p = format!("l{l}");
    let lr = |r| Role::Layer(l, r);
    if g.c.gated_mlp {
        let gate = g.linear(x, lr(Gate), None, &format!("{p}_gate"))?;
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
