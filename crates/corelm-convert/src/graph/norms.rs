//! Norms: RMSNorm and LayerNorm in fp32, and their all-fp16 Neural Engine forms.

use half::f16;

use super::emitter::{i32s, scalar_i32, Binary, Graph};
use crate::arch::{LayerRole, Role};
use crate::config::{Norm, QkNorm};
use crate::{Error, Result};
use corelm_format::mil::builder::Arg;
use corelm_format::{DType, Tensor, Var};

impl Graph<'_, '_> {
    /// A norm over the last axis, computed in fp32 (in fp16 for the Neural Engine); the result
    /// is cast to `out`. `of_residual`: `x` is the residual stream, divided by the profile's
    /// divisor, which the epsilon follows.
    pub(super) fn norm(
        &mut self,
        x: &Var,
        weight: Role,
        bias: Option<Role>,
        out: DType,
        of_residual: bool,
        name: &str,
    ) -> Result<Var> {
        if self.ane {
            return self.ane_norm(x, weight, bias, of_residual, name);
        }
        let w = self.required(weight)?;
        let x32 = self.cast(x, DType::Fp32, &format!("{name}_in"))?;
        let y = match self.c.norm {
            Norm::Rms { eps, .. } => {
                let n = self.rms(&x32, eps, name)?;
                self.binary(Binary::Mul, &format!("{name}_w"), &n, &w)?
            }
            Norm::Layer { eps } => self.layer_norm(&x32, -1, Some((weight, bias)), eps, &format!("{name}_ln"))?,
        };
        self.cast(&y, out, name)
    }

    /// An RMSNorm without a gain (Gemma 3n's and 4's value norm), over the last axis when
    /// `last`, else over the channels; `x` is not the residual stream.
    pub(super) fn plain_rms(&mut self, x: &Var, last: bool, out: DType, name: &str) -> Result<Var> {
        let Norm::Rms { eps, .. } = self.c.norm else {
            return Err(Error::invalid("an RMSNorm without a gain in a LayerNorm family"));
        };
        if self.ane {
            let (normed, n) = self.ane_rms(x, if last { -1 } else { 1 }, eps, name)?;
            return self.mul_s(&normed, (n as f64 / (n as f64 + 1.0)).sqrt(), name);
        }
        let x32 = self.cast(x, DType::Fp32, &format!("{name}_in"))?;
        let y = self.rms(&x32, eps, &format!("{name}_n"))?;
        self.cast(&y, out, name)
    }

    /// x / √(mean(x²) + eps) over the last axis, in x's dtype.
    fn rms(&mut self, x: &Var, eps: f64, name: &str) -> Result<Var> {
        let sq = self.binary(Binary::Mul, &format!("{name}_sq"), x, x)?;
        let ms = self.op(
            "reduce_mean",
            &format!("{name}_ms"),
            vec![("x", (&sq).into()), ("axes", i32s(&[-1])), ("keep_dims", Arg::Tensor(Tensor::scalar_bool(true)))],
        )?;
        let eps = self.float(x.dtype(), eps);
        let r = self.op("rsqrt", &format!("{name}_r"), vec![("x", (&ms).into()), ("epsilon", eps)])?;
        self.binary(Binary::Mul, &format!("{name}_n"), x, &r)
    }

    /// The Neural Engine form of a norm, all fp16. RMSNorm is a layer_norm over `[x, −x]`
    /// (mean zero by construction, so its variance is mean(x²)): the sum of squares happens
    /// inside one op, where fp16 squares cannot overflow (the form ANEMLL uses).
    ///
    /// The epsilon travels as data, not as layer_norm's fp16 `epsilon`: the norms of Gemma's
    /// residual stream, divided by 8, need eps/64 = 1.6e-8 for eps 1e-6, which fp16 (smallest
    /// subnormal 6e-8) rounds to 0, and a row of zeros (a pad token's zero embedding; the
    /// runtime pads every partial chunk with id 0) then normalizes to 0/0 = NaN, which the
    /// cache hands to every later query. Two more entries, +c and −c with c = √(n·eps) for n
    /// entries of x, make layer_norm's variance (Σx² + n·eps)/(n + 1): that of RMSNorm times
    /// n/(n + 1), which the stored gain undoes ([`ane_rms_width`]). c is an fp16 normal
    /// (≥ 6.1e-5) whenever n·eps ≥ 3.8e-9: Gemma-3-270M's residual norms have
    /// c = √(640 · 1e-6/64) = 3.2e-3, the tiny fixtures' 1e-3.
    ///
    /// Hidden states are channels-first, (1, C, 1, S), so those norms run over axis 1; the
    /// q/k norms over the head dimension of (1, heads, S, head_dim), the last.
    pub(super) fn ane_norm(
        &mut self,
        x: &Var,
        weight: Role,
        bias: Option<Role>,
        of_residual: bool,
        name: &str,
    ) -> Result<Var> {
        let per_head =
            matches!(weight, Role::Layer(_, LayerRole::QNorm | LayerRole::KNorm)) && self.c.qk_norm == QkNorm::PerHead;
        let axis = if per_head { -1 } else { 1 };
        let scale = if of_residual { self.residual_divisor.powi(2) } else { 1.0 };
        match self.c.norm {
            Norm::Rms { eps, .. } => {
                let mut w = self.required(weight)?;
                if !per_head {
                    // (C,) → (C, 1, 1), to scale the channels of (1, C, 1, S).
                    w = self.expand_dims(&format!("{name}_w"), &w, &[1, 2])?;
                }
                let (normed, _) = self.ane_rms(x, axis, eps / scale, name)?;
                self.binary(Binary::Mul, name, &normed, &w)
            }
            Norm::Layer { eps } => self.layer_norm(x, axis, Some((weight, bias)), eps / scale, name),
        }
    }

    /// The Neural Engine RMSNorm before its gain: x / rms(x) · √((n + 1)/n) for the n entries
    /// along `axis` (see [`Graph::ane_norm`]); and n.
    fn ane_rms(&mut self, x: &Var, axis: i32, eps: f64, name: &str) -> Result<(Var, usize)> {
        let (pair, n) = self.epsilon_pair(x, axis, eps)?;
        let neg = self.mul_s(x, -1.0, &format!("{name}_neg"))?;
        let both = self.concat(&format!("{name}_pm"), vec![x, &neg, &pair], axis)?;
        let ln = self.layer_norm(&both, axis, None, 0.0, &format!("{name}_ln"))?;
        let halves = self.f.op(
            "split",
            &format!("{name}_half"),
            vec![("x", (&ln).into()), ("split_sizes", i32s(&[n as i32, n as i32 + 2])), ("axis", scalar_i32(axis))],
        )?;
        Ok((halves[0].clone(), n))
    }

    /// The constant `[c, −c]` along `axis`, shaped like `x` along the other axes, where
    /// c = √(n·eps) for the n entries of `x` along `axis` (see [`Graph::ane_norm`]); and n. One
    /// constant per shape and value in a function.
    pub(super) fn epsilon_pair(&mut self, x: &Var, axis: i32, eps: f64) -> Result<(Var, usize)> {
        let name = x.name().to_string();
        let mut shape =
            x.ty().shape().ok_or_else(|| Error::invalid(format!("{name}: the ane profile needs fixed shapes")))?;
        let ax = if axis < 0 { shape.len() as i32 + axis } else { axis } as usize;
        let n = shape[ax];
        let c = f16::from_f64((n as f64 * eps).sqrt());
        shape[ax] = 2;
        let key = (shape.clone(), ax, c.to_bits() as u64);
        if let Some(v) = self.epsilon_pairs.get(&key) {
            return Ok((v.clone(), n));
        }
        let (outer, inner): (usize, usize) = (shape[..ax].iter().product(), shape[ax + 1..].iter().product());
        let mut data = Vec::with_capacity(outer * 2 * inner);
        for _ in 0..outer {
            data.extend(std::iter::repeat_n(c.to_f64(), inner));
            data.extend(std::iter::repeat_n(-c.to_f64(), inner));
        }
        let v = self.f.constant(
            &format!("norm_eps_{}", self.epsilon_pairs.len()),
            Tensor::from_floats(DType::Fp16, shape, &data)?,
        )?;
        self.epsilon_pairs.insert(key, v.clone());
        Ok((v, n))
    }

    /// `layer_norm` over `axis`, scaled and shifted by the (weight, bias) roles when given
    /// (they keep the normalized axis's (C,) shape).
    pub(super) fn layer_norm(
        &mut self,
        x: &Var,
        axis: i32,
        affine: Option<(Role, Option<Role>)>,
        eps: f64,
        name: &str,
    ) -> Result<Var> {
        let eps = self.float(x.dtype(), eps);
        let mut args = vec![("x", Arg::Var(x)), ("axes", i32s(&[axis]))];
        let (gamma, beta);
        if let Some((weight, bias)) = affine {
            gamma = self.required(weight)?;
            beta = self.required(bias.ok_or_else(|| Error::invalid("layer norm without a bias weight"))?)?;
            args.extend([("gamma", Arg::Var(&gamma)), ("beta", Arg::Var(&beta))]);
        }
        args.push(("epsilon", eps));
        self.op("layer_norm", name, args)
    }
}
