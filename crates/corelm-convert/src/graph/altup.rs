//! Gemma 3n's layers: AltUp keeps the hidden state as several streams; each layer predicts
//! them from the active one, computes attention (beside a LAuReL branch) and the MLP on the
//! active prediction, corrects every stream by what the layer added, and adds the per-layer
//! input's branch to all but the first (transformers' `Gemma3nTextDecoderLayer`).

use super::cache::KvCache;
use super::emitter::{Binary, Graph};
use super::layer::{attention_block, mlp, per_layer_branch, LayerContext};
use super::masks::Masks;
use crate::arch::{LayerRole, Role};
use crate::{Error, Result};
use corelm_format::Var;

/// The streams from the token embedding `x`: `x` itself, then its projections rescaled to its
/// root-mean-square magnitude.
pub(super) fn streams(g: &mut Graph, cx: &LayerContext, x: Var) -> Result<Vec<Var>> {
    let n = g.c.altup.map_or(1, |a| a.inputs);
    let target = magnitude(g, &x, "altup_target")?;
    let mut streams = vec![x.clone()];
    for i in 1..n {
        streams.push(rescaled_projection(g, cx, &x, Role::AltUpProjection(i - 1), &target, &format!("altup_in{i}"))?);
    }
    Ok(streams)
}

/// The streams back to one hidden state: each projected back, rescaled to the first's
/// magnitude, and all averaged.
pub(super) fn merge(g: &mut Graph, cx: &LayerContext, streams: &[Var]) -> Result<Var> {
    let target = magnitude(g, &streams[0], "altup_out_target")?;
    let mut sum = streams[0].clone();
    for (i, s) in streams.iter().enumerate().skip(1) {
        let back = rescaled_projection(g, cx, s, Role::AltUpUnembed(i - 1), &target, &format!("altup_out{i}"))?;
        sum = g.binary(Binary::Add, &format!("altup_out_sum{i}"), &sum, &back)?;
    }
    g.mul_s(&sum, 1.0 / streams.len() as f64, "altup_merged")
}

/// Layer `l` over the streams.
pub(super) fn layer(
    g: &mut Graph,
    cx: &LayerContext,
    kv: &mut KvCache,
    masks: &mut Masks,
    l: usize,
    streams: Vec<Var>,
) -> Result<Vec<Var>> {
    use LayerRole::*;
    let p = format!("l{l}");
    let lr = |r| Role::Layer(l, r);
    let altup = g.c.altup.ok_or_else(|| Error::invalid("AltUp layer in a model without AltUp"))?;
    let predictions = predict(g, l, &streams)?;
    let active = predictions[altup.active].clone();
    let normed = g.norm(&active, lr(AttnNorm), None, cx.compute, true, &format!("{p}_attn_norm"))?;
    let laurel = laurel(g, cx, l, &normed)?;
    let o = attention_block(g, cx, kv, masks, l, &normed)?;
    let attn = g.norm(&o, lr(PostAttnNorm), None, cx.residual, false, &format!("{p}_post_attn_norm"))?;
    let gated = g.binary(Binary::Add, &format!("{p}_h"), &active, &attn)?;
    let both = g.binary(Binary::Add, &format!("{p}_laurel_sum"), &gated, &laurel)?;
    let h = g.mul_s(&both, std::f64::consts::FRAC_1_SQRT_2, &format!("{p}_laurel_res"))?;
    let mlp_in = g.norm(&h, lr(MlpNorm), None, cx.compute, true, &format!("{p}_mlp_norm"))?;
    let m = mlp(g, l, &mlp_in)?;
    let m = g.norm(&m, lr(PostMlpNorm), None, cx.residual, false, &format!("{p}_post_mlp_norm"))?;
    let out = g.binary(Binary::Add, &format!("{p}_out"), &h, &m)?;
    let mut corrected = correct(g, l, &predictions, &out)?;
    let mut first = corrected[altup.active].clone();
    if altup.correct_scale {
        let scale = channel_vector(g, lr(AltUpCorrectScale), &format!("{p}_altup_scale"))?;
        first = g.binary(Binary::Mul, &format!("{p}_altup_scaled"), &first, &scale)?;
    }
    if let Some(inputs) = cx.per_layer {
        let branch = per_layer_branch(g, cx, inputs, l, &first)?;
        for (i, s) in corrected.iter_mut().enumerate().skip(1) {
            *s = g.binary(Binary::Add, &format!("{p}_stream{i}"), &*s, &branch)?;
        }
    }
    Ok(corrected)
}

/// Each stream plus a per-token mixture of all of them, the mixture's coefficients predicted
/// from the active stream: pred_j = s_j + Σ_i c_{j·n+i} s_i.
fn predict(g: &mut Graph, l: usize, streams: &[Var]) -> Result<Vec<Var>> {
    let p = format!("l{l}_altup_predict");
    let n = streams.len();
    let active = g.c.altup.map_or(0, |a| a.active);
    let modalities = router(g, l, &streams[active], &p)?;
    let coefs = g.linear(&modalities, Role::Layer(l, LayerRole::AltUpPrediction), None, &format!("{p}_coefs"))?;
    let coefs = g.split_channels(&coefs, n * n, &format!("{p}_coef"))?;
    let mut out = Vec::with_capacity(n);
    for (j, s) in streams.iter().enumerate() {
        let mut acc = s.clone();
        for (i, si) in streams.iter().enumerate() {
            let term = g.binary(Binary::Mul, &format!("{p}{j}_{i}"), &coefs[j * n + i], si)?;
            acc = g.binary(Binary::Add, &format!("{p}{j}_sum{i}"), &acc, &term)?;
        }
        out.push(acc);
    }
    Ok(out)
}

/// Each prediction moved by the layer's innovation (its output minus the active prediction),
/// by a per-token coefficient (1 + a mixture predicted from the output).
fn correct(g: &mut Graph, l: usize, predictions: &[Var], activated: &Var) -> Result<Vec<Var>> {
    let p = format!("l{l}_altup_correct");
    let active = g.c.altup.map_or(0, |a| a.active);
    let modalities = router(g, l, activated, &p)?;
    let innovation = g.binary(Binary::Sub, &format!("{p}_innovation"), activated, &predictions[active])?;
    let coefs = g.linear(&modalities, Role::Layer(l, LayerRole::AltUpCorrection), None, &format!("{p}_coefs"))?;
    let one = g.float(coefs.dtype(), 1.0);
    let coefs = g.binary(Binary::Add, &format!("{p}_coefs1"), &coefs, one)?;
    let coefs = g.split_channels(&coefs, predictions.len(), &format!("{p}_coef"))?;
    let mut out = Vec::with_capacity(predictions.len());
    for (i, pred) in predictions.iter().enumerate() {
        let moved = g.binary(Binary::Mul, &format!("{p}{i}_moved"), &coefs[i], &innovation)?;
        out.push(g.binary(Binary::Add, &format!("{p}{i}"), pred, &moved)?);
    }
    Ok(out)
}

/// tanh(router(norm(x) / hidden)): the per-token mixture weights, one per stream.
fn router(g: &mut Graph, l: usize, x: &Var, p: &str) -> Result<Var> {
    let normed = g.norm(x, Role::Layer(l, LayerRole::AltUpRouterNorm), None, x.dtype(), true, &format!("{p}_norm"))?;
    let scaled = g.mul_s(&normed, 1.0 / g.c.hidden_size as f64, &format!("{p}_scaled"))?;
    let routed = g.linear(&scaled, Role::Layer(l, LayerRole::AltUpRouter), None, &format!("{p}_routed"))?;
    g.op("tanh", &format!("{p}_modalities"), vec![("x", (&routed).into())])
}

/// LAuReL: the normed input plus the norm of its low-rank image, in the residual dtype (and
/// scale).
fn laurel(g: &mut Graph, cx: &LayerContext, l: usize, normed: &Var) -> Result<Var> {
    use LayerRole::*;
    let p = format!("l{l}_laurel");
    let lr = |r| Role::Layer(l, r);
    let left = g.linear(normed, lr(LaurelLeft), None, &format!("{p}_left"))?;
    let right = g.linear(&left, lr(LaurelRight), None, &format!("{p}_right"))?;
    let branch = g.norm(&right, lr(LaurelNorm), None, cx.residual, false, &format!("{p}_norm"))?;
    let x = g.cast(normed, cx.residual, &format!("{p}_in"))?;
    let sum = g.binary(Binary::Add, &format!("{p}_sum"), &x, &branch)?;
    if g.residual_divisor == 1.0 {
        return Ok(sum);
    }
    g.mul_s(&sum, 1.0 / g.residual_divisor, &p)
}

/// `x`'s projection by `role`, rescaled to the magnitude `target`.
fn rescaled_projection(g: &mut Graph, cx: &LayerContext, x: &Var, role: Role, target: &Var, p: &str) -> Result<Var> {
    let xc = g.cast(x, cx.compute, &format!("{p}_in"))?;
    let projected = g.linear(&xc, role, None, &format!("{p}_proj"))?;
    let projected = g.cast(&projected, x.dtype(), &format!("{p}_proj_res"))?;
    let sq = g.binary(Binary::Mul, &format!("{p}_sq"), &projected, &projected)?;
    let ms = g.mean_channels(&sq, &format!("{p}_ms"))?;
    // transformers clamps the mean square at 1e-5, in the stream's unscaled units.
    let floor = g.float(ms.dtype(), 1e-5 / (g.residual_divisor * g.residual_divisor));
    let ms = g.binary(Binary::Maximum, &format!("{p}_ms_floor"), &ms, floor)?;
    let magnitude = g.op("sqrt", &format!("{p}_magnitude"), vec![("x", (&ms).into())])?;
    let scaled = g.binary(Binary::Mul, &format!("{p}_scaled"), &projected, target)?;
    g.op("real_div", p, vec![("x", (&scaled).into()), ("y", (&magnitude).into())])
}

/// √mean(x²) over the channels.
fn magnitude(g: &mut Graph, x: &Var, name: &str) -> Result<Var> {
    let sq = g.binary(Binary::Mul, &format!("{name}_sq"), x, x)?;
    let ms = g.mean_channels(&sq, &format!("{name}_ms"))?;
    g.op("sqrt", name, vec![("x", (&ms).into())])
}

/// A per-channel vector weight shaped to scale hidden states: (C,), or (C, 1, 1) channels-first.
fn channel_vector(g: &mut Graph, role: Role, name: &str) -> Result<Var> {
    let w = g.required(role)?;
    if g.ane {
        g.expand_dims(name, &w, &[1, 2])
    } else {
        Ok(w)
    }
}
