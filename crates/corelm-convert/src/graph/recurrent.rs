//! Recurrent layers of hybrid models and the states they carry between calls: LFM2's gated
//! short convolution (a window of the last inputs), Qwen3.5's Gated DeltaNet and Granite 4.0-H's
//! Mamba-2 (that window and a matrix per head, updated by the delta rule or plainly decayed and
//! added to). Both are iOS 18 states in fp16, as Core ML requires; fp32 packages keep each as an
//! fp16 pair (value, residual) as the KV cache does, so the state adds no error beyond fp32
//! arithmetic.
//!
//! A call of N tokens runs the recurrence in its chunked parallel form (the reference's
//! `torch_chunk_gated_delta_rule`, and Mamba-2's state-space dual): within a chunk, matrix
//! products and, for the delta rule, one unit lower-triangular inverse; across chunks, the state
//! handed on.

use std::collections::HashMap;

use super::emitter::{i32s, scalar_i32, Binary, Graph};
use super::inputs::Positions;
use super::{GraphOptions, Stage};
use crate::arch::{LayerRole, Role};
use crate::config::{LinearAttention, Mixer, ModelConfig, Norm};
use crate::{Error, Result};
use corelm_contract::names;
use corelm_format::mil::builder::Arg;
use corelm_format::{DType, Tensor, Var};

/// The longest chunk of the chunked form (transformers' `chunk_size`).
pub const DELTA_CHUNK: usize = 64;

/// One kind of state: a variable per part (two for a pair), the shape of one layer's slice,
/// and which slice each layer of the stage owns.
struct States {
    vars: Vec<Var>,
    layer_shape: Vec<usize>,
    place: HashMap<usize, usize>,
}

impl States {
    /// The begin and end of layer `l`'s slice of the state.
    fn bounds(&self, l: usize) -> (Vec<i32>, Vec<i32>) {
        let slot = self.place[&l] as i32;
        let begin = std::iter::once(slot).chain(self.layer_shape.iter().map(|_| 0)).collect();
        let end = std::iter::once(slot + 1).chain(self.layer_shape.iter().map(|&d| d as i32)).collect();
        (begin, end)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Conv,
    Delta,
}

/// The recurrent states of a stage's layers: `convState` (layers, 1, channels, 1, taps − 1, or
/// 32 on the Neural Engine), channels-first like the convolution that reads it, and for Gated
/// DeltaNet and Mamba-2 `recurrentState` (layers, 1, value heads, key dim, value dim).
pub(super) struct RecurrentStates {
    conv: Option<States>,
    delta: Option<States>,
    /// The convolution's taps.
    taps: usize,
}

impl RecurrentStates {
    /// No recurrent layers.
    pub fn empty() -> RecurrentStates {
        RecurrentStates { conv: None, delta: None, taps: 0 }
    }

    pub fn declare(g: &mut Graph, c: &ModelConfig, opts: &GraphOptions, stage: &Stage) -> Result<RecurrentStates> {
        let layers: Vec<usize> = stage.layers.clone().filter(|&l| c.layer(l).mixer.is_recurrent()).collect();
        if layers.is_empty() {
            return Ok(RecurrentStates::empty());
        }
        if !opts.target.supports_states() {
            return Err(Error::invalid(format!(
                "{} keeps recurrent state between calls, which only Core ML states hold: use --target ios18",
                c.family.name()
            )));
        }
        let pair = opts.precision.dtype() == DType::Fp32;
        let (channels, kernel) = match c.layer(layers[0]).mixer {
            Mixer::ShortConv { kernel, .. } => (c.hidden_size, kernel),
            _ => {
                let la =
                    c.linear.ok_or_else(|| Error::invalid("chunked linear-attention layers without their sizes"))?;
                (la.conv_channels(), la.conv_kernel)
            }
        };
        let declare = |g: &mut Graph, name: &str, layer_shape: Vec<usize>, of: &[usize]| -> Result<States> {
            let mut shape = vec![of.len()];
            shape.extend(&layer_shape);
            let mut vars = vec![g.f.state(name, &shape)?];
            if pair {
                vars.push(g.f.state(&format!("{name}Residual"), &shape)?);
            }
            let place = of.iter().enumerate().map(|(i, &l)| (l, i)).collect();
            Ok(States { vars, layer_shape, place })
        };
        // The Neural Engine aligns a state's rows to 32 fp16 values (rule ane-state-width-unaligned):
        // there the window keeps that many inputs, of which the convolution reads the last taps − 1.
        let width = if opts.profile == super::Profile::Ane { (kernel - 1).next_multiple_of(32) } else { kernel - 1 };
        let conv = declare(g, names::CONV_STATE, vec![1, channels, 1, width], &layers)?;
        let delta_layers: Vec<usize> = layers.iter().copied().filter(|&l| c.layer(l).mixer.is_chunked()).collect();
        let delta = match c.linear.filter(|_| !delta_layers.is_empty()) {
            Some(la) => Some(declare(
                g,
                names::RECURRENT_STATE,
                vec![1, la.value_heads, la.key_dim, la.value_dim],
                &delta_layers,
            )?),
            None => None,
        };
        Ok(RecurrentStates { conv: Some(conv), delta, taps: kernel })
    }

    fn states(&self, kind: Kind) -> Result<&States> {
        match kind {
            Kind::Conv => self.conv.as_ref(),
            Kind::Delta => self.delta.as_ref(),
        }
        .ok_or_else(|| Error::invalid("a recurrent layer without its state"))
    }

    /// Layer `l`'s state, (1, ...) in fp32 (fp16 on the Neural Engine, which has no fp32).
    fn read(&self, g: &mut Graph, kind: Kind, l: usize, p: &str) -> Result<Var> {
        let dtype = if g.ane { DType::Fp16 } else { DType::Fp32 };
        let s = self.states(kind)?;
        let (begin, end) = s.bounds(l);
        let mut parts = Vec::new();
        for (i, var) in s.vars.iter().enumerate() {
            let all = g.op("read_state", &format!("{p}_state{i}_all"), vec![("input", var.into())])?;
            let mine = g.slice_by_index(&format!("{p}_state{i}_5d"), &all, i32s(&begin), i32s(&end))?;
            let mine = g.squeeze(&format!("{p}_state{i}_16"), &mine, &[0])?;
            parts.push(g.cast(&mine, dtype, &format!("{p}_state{i}"))?);
        }
        match parts.as_slice() {
            [one] => Ok(one.clone()),
            [hi, lo] => g.binary(Binary::Add, &format!("{p}_state"), hi, lo),
            _ => unreachable!("one or two state parts"),
        }
    }

    /// Stores layer `l`'s new state `value` (fp32, or fp16 on the Neural Engine; the layer's
    /// slice shape).
    fn write(&self, g: &mut Graph, kind: Kind, l: usize, value: &Var, p: &str) -> Result<()> {
        let s = self.states(kind)?;
        let hi = g.cast(value, DType::Fp16, &format!("{p}_new_hi"))?;
        let mut parts = vec![hi.clone()];
        if s.vars.len() == 2 {
            let back = g.cast(&hi, DType::Fp32, &format!("{p}_new_hi32"))?;
            let rest = g.binary(Binary::Sub, &format!("{p}_new_rest"), value, &back)?;
            parts.push(g.cast(&rest, DType::Fp16, &format!("{p}_new_lo"))?);
        }
        let (begin, end) = s.bounds(l);
        for (i, (var, part)) in s.vars.iter().zip(&parts).enumerate() {
            let update = g.expand_dims(&format!("{p}_upd{i}"), part, &[0])?;
            let old = g.op("read_state", &format!("{p}_old{i}"), vec![("input", var.into())])?;
            let new = g.op(
                "slice_update",
                &format!("{p}_stored{i}"),
                vec![("x", (&old).into()), ("update", (&update).into()), ("begin", i32s(&begin)), ("end", i32s(&end))],
            )?;
            g.f.op("write_state", &format!("{p}_store{i}"), vec![("input", var.into()), ("data", (&new).into())])?;
        }
        Ok(())
    }

    /// The depthwise causal convolution of layer `l` over `x`, continuing the window its state
    /// holds, which it then advances by N; through SiLU when `silu`. `x` is (1, N, channels), the
    /// result fp32; on the Neural Engine both are channels-first (1, channels, 1, N) fp16, the
    /// convolution's own layout.
    fn causal_conv(&self, g: &mut Graph, at: &Positions, l: usize, x: &Var, silu: bool, p: &str) -> Result<Var> {
        use LayerRole::*;
        let s = self.states(Kind::Conv)?;
        let (channels, width, taps) = (s.layer_shape[1] as i32, s.layer_shape[3] as i32, self.taps as i32);
        let dtype = if g.ane { DType::Fp16 } else { DType::Fp32 };
        let xc = if g.ane {
            x.clone()
        } else {
            let x32 = g.cast(x, DType::Fp32, &format!("{p}_x32"))?;
            let xt = g.transpose(&format!("{p}_xt"), &x32, &[0, 2, 1])?;
            g.expand_dims(&format!("{p}_xc"), &xt, &[2])?
        };
        let state = self.read(g, Kind::Conv, l, &format!("{p}_window"))?;
        let window = g.concat(&format!("{p}_window_all"), vec![&state, &xc], 3)?;
        // The last `width` inputs, which start at N.
        let n = g.binary(Binary::Sub, &format!("{p}_n"), &at.end, &at.start)?;
        let zeros = g.ints(&format!("{p}_b0"), &[0, 0, 0])?;
        let begin = g.concat(&format!("{p}_tail_begin"), vec![&zeros, &n], 0)?;
        let tail = g.op(
            "slice_by_size",
            &format!("{p}_tail"),
            vec![("x", (&window).into()), ("begin", (&begin).into()), ("size", i32s(&[1, channels, 1, width]))],
        )?;
        self.write(g, Kind::Conv, l, &tail, &format!("{p}_window"))?;
        // A window wider than the kernel needs (the Neural Engine's aligned one) is read from its
        // last taps − 1 inputs on.
        let window = match width - (taps - 1) {
            0 => window,
            skip => g.op(
                "slice_by_index",
                &format!("{p}_window_read"),
                vec![
                    ("x", (&window).into()),
                    ("begin", i32s(&[0, 0, 0, skip])),
                    ("end", i32s(&[0, 0, 0, 0])),
                    ("end_mask", Arg::Tensor(Tensor::from_bools(vec![4], &[true; 4])?)),
                ],
            )?,
        };
        let kernel = g.required(Role::Layer(l, ConvKernel))?;
        let kernel = g.cast(&kernel, dtype, &format!("{p}_kernel_c"))?;
        let kernel = g.expand_dims(&format!("{p}_kernel"), &kernel, &[1, 2])?;
        let mut args = vec![
            ("x", Arg::Var(&window)),
            ("weight", Arg::Var(&kernel)),
            ("groups", scalar_i32(channels)),
            ("pad_type", Arg::Tensor(Tensor::scalar_string("valid"))),
            ("strides", i32s(&[1, 1])),
            ("dilations", i32s(&[1, 1])),
        ];
        let bias = match g.weight(Role::Layer(l, ConvBias))? {
            Some(b) => Some(g.cast(&b, dtype, &format!("{p}_bias_c"))?),
            None => None,
        };
        if let Some(b) = &bias {
            args.push(("bias", Arg::Var(b)));
        }
        let mut y = g.f.op1("conv", &format!("{p}_conv"), args)?;
        if silu {
            y = g.op("silu", &format!("{p}_act"), vec![("x", (&y).into())])?;
        }
        if g.ane {
            return Ok(y);
        }
        let y = g.squeeze(&format!("{p}_sq"), &y, &[2])?;
        g.transpose(&format!("{p}_out"), &y, &[0, 2, 1])
    }
}

/// Layer `l`'s recurrent mixer over its normed input `x` (1, N, hidden), through its output
/// projection. `query_len`: the function's fixed length (Gated DeltaNet's chunks are static).
pub(super) fn mixer_block(
    g: &mut Graph,
    states: &RecurrentStates,
    at: &Positions,
    compute: DType,
    l: usize,
    x: &Var,
    query_len: Option<usize>,
) -> Result<Var> {
    match g.c.layer(l).mixer {
        Mixer::ShortConv { .. } => short_conv(g, states, at, compute, l, x),
        chunked => {
            let n =
                query_len.ok_or_else(|| Error::invalid("chunked linear-attention layers need fixed query lengths"))?;
            match chunked {
                Mixer::GatedDeltaNet => gated_delta_net(g, states, at, compute, l, x, n),
                Mixer::Mamba2 => mamba2(g, states, at, compute, l, x, n),
                _ => unreachable!("attention layers are not recurrent"),
            }
        }
    }
}

/// LFM2: B, C, x = in_proj(x); out_proj(C · conv(B · x)).
fn short_conv(
    g: &mut Graph,
    states: &RecurrentStates,
    at: &Positions,
    compute: DType,
    l: usize,
    x: &Var,
) -> Result<Var> {
    use LayerRole::*;
    let p = format!("l{l}_conv");
    let lr = |r| Role::Layer(l, r);
    let bcx = g.linear(x, lr(MixerIn), Some(lr(MixerInBias)), &format!("{p}_in"))?;
    let parts = g.split_channels(&bcx, 3, &format!("{p}_bcx"))?;
    let bx = g.binary(Binary::Mul, &format!("{p}_bx"), &parts[0], &parts[2])?;
    let conv = states.causal_conv(g, at, l, &bx, false, &p)?;
    let conv = g.cast(&conv, compute, &format!("{p}_conv_out"))?;
    let y = g.binary(Binary::Mul, &format!("{p}_gated"), &parts[1], &conv)?;
    g.linear(&y, lr(MixerOut), Some(lr(MixerOutBias)), &format!("{p}_out"))
}

/// A chunked layer's sizes: key heads (Mamba-2: groups), value heads, key dim (state size),
/// value dim.
fn sizes(g: &Graph) -> Result<(LinearAttention, [i32; 4])> {
    let la = g.c.linear.ok_or_else(|| Error::invalid("chunked linear-attention layers without their sizes"))?;
    Ok((la, [la.key_heads, la.value_heads, la.key_dim, la.value_dim].map(|v| v as i32)))
}

fn split_last(g: &mut Graph, x: &Var, sizes: &[i32], name: &str) -> Result<Vec<Var>> {
    g.f.op("split", name, vec![("x", x.into()), ("split_sizes", i32s(sizes)), ("axis", scalar_i32(-1))])
}

/// The log decay per head, (1, vh, N): −exp(A_log)·softplus(`raw` + dt_bias) (the time step),
/// the time step bounded by `limit` when given; and the time step itself, (1, N, vh). fp32.
fn log_decay(g: &mut Graph, l: usize, raw: &Var, limit: Option<(f64, f64)>, p: &str) -> Result<(Var, Var)> {
    let raw = g.cast(raw, DType::Fp32, &format!("{p}_dt_raw"))?;
    let dt_bias = g.required(Role::Layer(l, LayerRole::DtBias))?;
    let biased = g.binary(Binary::Add, &format!("{p}_dt_biased"), &raw, &dt_bias)?;
    let mut dt = g.op("softplus", &format!("{p}_dt"), vec![("x", (&biased).into())])?;
    if let Some((lo, hi)) = limit {
        let (lo, hi) = (g.float(DType::Fp32, lo), g.float(DType::Fp32, hi));
        dt = g.op("clip", &format!("{p}_dt_limited"), vec![("x", (&dt).into()), ("alpha", lo), ("beta", hi)])?;
    }
    let a_log = g.required(Role::Layer(l, LayerRole::ALog))?;
    let rate = g.op("exp", &format!("{p}_rate"), vec![("x", (&a_log).into())])?;
    let rate = g.mul_s(&rate, -1.0, &format!("{p}_neg_rate"))?;
    let decay = g.binary(Binary::Mul, &format!("{p}_decay_t"), &dt, &rate)?;
    Ok((g.transpose(&format!("{p}_decay"), &decay, &[0, 2, 1])?, dt))
}

/// Runs the chunked rule of layer `l` from its state and stores the state it leaves: the
/// output, (1, N, vh, vd).
#[allow(clippy::too_many_arguments)]
fn run_chunked(
    g: &mut Graph,
    states: &RecurrentStates,
    l: usize,
    qkv: [&Var; 3],
    beta: Option<&Var>,
    decay: &Var,
    n: usize,
    p: &str,
) -> Result<Var> {
    let state = states.read(g, Kind::Delta, l, &format!("{p}_state"))?;
    let (out, state) = chunked_rule(g, qkv, beta, decay, state, n, p)?;
    states.write(g, Kind::Delta, l, &state, &format!("{p}_state"))?;
    g.transpose(&format!("{p}_out_t"), &out, &[0, 2, 1, 3])
}

/// Qwen3.5's Gated DeltaNet over `n` tokens: the convolved queries, keys and values, keys and
/// queries L2-normed (queries scaled by 1/√key_dim), β = sigmoid(b), decay
/// g = −exp(A_log)·softplus(a + dt_bias); the delta rule's output normed per head, times its gain,
/// gated by SiLU(z), projected out.
fn gated_delta_net(
    g: &mut Graph,
    states: &RecurrentStates,
    at: &Positions,
    compute: DType,
    l: usize,
    x: &Var,
    n: usize,
) -> Result<Var> {
    use LayerRole::*;
    let p = format!("l{l}_delta");
    let lr = |r| Role::Layer(l, r);
    let (_, [kh, vh, kd, vd]) = sizes(g)?;
    let qkv = g.linear(x, lr(MixerIn), None, &format!("{p}_in"))?;
    let qkv = states.causal_conv(g, at, l, &qkv, true, &format!("{p}_conv"))?;
    let parts = split_last(g, &qkv, &[kh * kd, kh * kd, vh * vd], &format!("{p}_qkv"))?;
    let q = heads_first(g, &parts[0], [kh, kd, vh], true, &format!("{p}_q"))?;
    let q = g.mul_s(&q, (kd as f64).powf(-0.5), &format!("{p}_q_scaled"))?;
    let k = heads_first(g, &parts[1], [kh, kd, vh], true, &format!("{p}_k"))?;
    let v = heads_first(g, &parts[2], [vh, vd, vh], false, &format!("{p}_v"))?;
    let b = g.linear(x, lr(DeltaBeta), None, &format!("{p}_b_proj"))?;
    let b = g.cast(&b, DType::Fp32, &format!("{p}_b_32"))?;
    let beta = g.op("sigmoid", &format!("{p}_beta_t"), vec![("x", (&b).into())])?;
    let beta = g.transpose(&format!("{p}_beta"), &beta, &[0, 2, 1])?;
    let a = g.linear(x, lr(DeltaDecay), None, &format!("{p}_a_proj"))?;
    let (decay, _) = log_decay(g, l, &a, None, &p)?;
    let out = run_chunked(g, states, l, [&q, &k, &v], Some(&beta), &decay, n, &p)?;
    // RMSNorm over each head's values, times its gain, times SiLU(z).
    let normed = grouped_rms(g, &out, [vh, vd], &format!("{p}_norm"))?;
    let gain = g.required(lr(MixerNorm))?;
    let normed = g.binary(Binary::Mul, &format!("{p}_norm_w"), &normed, &gain)?;
    let z = g.linear(x, lr(DeltaGate), None, &format!("{p}_z_proj"))?;
    let z = g.cast(&z, DType::Fp32, &format!("{p}_z_32"))?;
    let z = g.reshape(&format!("{p}_z_h"), &z, &[1, -1, vh, vd])?;
    let z = g.op("silu", &format!("{p}_z_act"), vec![("x", (&z).into())])?;
    let gated = g.binary(Binary::Mul, &format!("{p}_gated"), &normed, &z)?;
    let flat = g.reshape(&format!("{p}_flat"), &gated, &[1, -1, vh * vd])?;
    let flat = g.cast(&flat, compute, &format!("{p}_flat_c"))?;
    g.linear(&flat, lr(MixerOut), None, &format!("{p}_out"))
}

/// `x` (1, N, heads·dim) as (1, value heads, N, dim): L2-normed over `dim` (eps 1e-6) when
/// `l2`, each head repeated for the value heads it serves (repeat_interleave) when fewer.
fn heads_first(g: &mut Graph, x: &Var, [h, d, vh]: [i32; 3], l2: bool, name: &str) -> Result<Var> {
    let mut x = g.reshape(&format!("{name}_h"), x, &[1, -1, h, d])?;
    if l2 {
        let sq = g.binary(Binary::Mul, &format!("{name}_sq"), &x, &x)?;
        let ss = g.op(
            "reduce_sum",
            &format!("{name}_ss"),
            vec![("x", (&sq).into()), ("axes", i32s(&[-1])), ("keep_dims", Arg::Tensor(Tensor::scalar_bool(true)))],
        )?;
        let eps = g.float(DType::Fp32, 1e-6);
        let r = g.op("rsqrt", &format!("{name}_r"), vec![("x", (&ss).into()), ("epsilon", eps)])?;
        x = g.binary(Binary::Mul, &format!("{name}_l2"), &x, &r)?;
    }
    if h < vh {
        let e = g.reshape(&format!("{name}_e"), &x, &[1, -1, h, 1, d])?;
        let t = g.op("tile", &format!("{name}_t"), vec![("x", (&e).into()), ("reps", i32s(&[1, 1, 1, vh / h, 1]))])?;
        x = g.reshape(&format!("{name}_rep"), &t, &[1, -1, vh, d])?;
    }
    g.transpose(name, &x, &[0, 2, 1, 3])
}

/// RMSNorm (eps from the config, fp32) of `x` in `groups` groups of `group` values:
/// (1, N, groups, group) whatever the layout of `x`'s N rows.
fn grouped_rms(g: &mut Graph, x: &Var, [groups, group]: [i32; 2], name: &str) -> Result<Var> {
    let Norm::Rms { eps, .. } = g.c.norm else { return Err(Error::invalid("a recurrent layer in a LayerNorm family")) };
    let grouped = g.reshape(&format!("{name}_groups"), x, &[1, -1, groups, group])?;
    let sq = g.binary(Binary::Mul, &format!("{name}_sq"), &grouped, &grouped)?;
    let ms = g.op(
        "reduce_mean",
        &format!("{name}_ms"),
        vec![("x", (&sq).into()), ("axes", i32s(&[-1])), ("keep_dims", Arg::Tensor(Tensor::scalar_bool(true)))],
    )?;
    let eps = g.float(DType::Fp32, eps);
    let r = g.op("rsqrt", &format!("{name}_r"), vec![("x", (&ms).into()), ("epsilon", eps)])?;
    g.binary(Binary::Mul, name, &grouped, &r)
}

/// Mamba-2 (Granite 4.0-H) over `n` tokens: in_proj gives z, then x, B and C (convolved, SiLU)
/// and the time step dt = softplus(dt_raw + dt_bias) within its limit; the chunked rule runs with
/// C as queries, B as keys, x·dt as values and decay dt·(−exp(A_log)), plus the skip D·x; then
/// y·SiLU(z), RMS-normed per group, times its gain, projected out.
fn mamba2(
    g: &mut Graph,
    states: &RecurrentStates,
    at: &Positions,
    compute: DType,
    l: usize,
    x: &Var,
    n: usize,
) -> Result<Var> {
    use LayerRole::*;
    let p = format!("l{l}_ssm");
    let lr = |r| Role::Layer(l, r);
    let (la, [kh, vh, kd, vd]) = sizes(g)?;
    let (values, channels) = (vh * vd, la.conv_channels() as i32);
    let proj = g.linear(x, lr(MixerIn), Some(lr(MixerInBias)), &format!("{p}_in"))?;
    let parts = split_last(g, &proj, &[values, channels, vh], &format!("{p}_zxbcdt"))?;
    let xbc = states.causal_conv(g, at, l, &parts[1], true, &format!("{p}_conv"))?;
    let xbc = split_last(g, &xbc, &[values, kh * kd, kh * kd], &format!("{p}_xbc"))?;
    let (decay, dt) = log_decay(g, l, &parts[2], la.time_step_limit, &p)?;
    let xs = heads_first(g, &xbc[0], [vh, vd, vh], false, &format!("{p}_x"))?;
    let dt_t = g.transpose(&format!("{p}_dt_t"), &dt, &[0, 2, 1])?;
    let dt4 = g.expand_dims(&format!("{p}_dt4"), &dt_t, &[-1])?;
    let v = g.binary(Binary::Mul, &format!("{p}_v"), &xs, &dt4)?;
    let k = heads_first(g, &xbc[1], [kh, kd, vh], false, &format!("{p}_b"))?;
    let q = heads_first(g, &xbc[2], [kh, kd, vh], false, &format!("{p}_c"))?;
    let out = run_chunked(g, states, l, [&q, &k, &v], None, &decay, n, &p)?;
    // The skip D·x per head, (1, N, vh, vd) like the output.
    let skip = g.required(lr(SkipScale))?;
    let skip = g.reshape(&format!("{p}_skip2"), &skip, &[vh, 1])?;
    let xs_t = g.transpose(&format!("{p}_x_t"), &xs, &[0, 2, 1, 3])?;
    let skipped = g.binary(Binary::Mul, &format!("{p}_skipped"), &xs_t, &skip)?;
    let out = g.binary(Binary::Add, &format!("{p}_y_heads"), &out, &skipped)?;
    let y = g.reshape(&format!("{p}_y"), &out, &[1, -1, values])?;
    let z = g.cast(&parts[0], DType::Fp32, &format!("{p}_z32"))?;
    let z = g.op("silu", &format!("{p}_z_act"), vec![("x", (&z).into())])?;
    let gated = g.binary(Binary::Mul, &format!("{p}_gated"), &y, &z)?;
    let normed = grouped_rms(g, &gated, [kh, values / kh], &format!("{p}_norm"))?;
    let normed = g.reshape(&format!("{p}_norm_flat"), &normed, &[1, -1, values])?;
    let gain = g.required(lr(MixerNorm))?;
    let normed = g.binary(Binary::Mul, &format!("{p}_norm_w"), &normed, &gain)?;
    let normed = g.cast(&normed, compute, &format!("{p}_normed_c"))?;
    g.linear(&normed, lr(MixerOut), Some(lr(MixerOutBias)), &format!("{p}_out"))
}

/// Chunked linear attention over `n` tokens, fp32: with `beta`, the gated delta rule
/// (transformers' `torch_chunk_gated_delta_rule`), without, plain gated linear attention (Mamba-2's
/// state-space dual form, `mamba2_chunk_scan`). q, k (1, vh, N, kd), v (1, vh, N, vd), β and the log
/// decay (1, vh, N), the state (1, vh, kd, vd). Returns the output (1, vh, N, vd) and the state
/// after the last token. The chunk is the largest power of two up to [`DELTA_CHUNK`] that divides
/// `n` (one token: the recurrent step).
fn chunked_rule(
    g: &mut Graph,
    [q, k, v]: [&Var; 3],
    beta: Option<&Var>,
    decay: &Var,
    mut state: Var,
    n: usize,
    p: &str,
) -> Result<(Var, Var)> {
    let chunk =
        (0..=DELTA_CHUNK.trailing_zeros()).rev().map(|e| 1usize << e).find(|c| n.is_multiple_of(*c)).unwrap_or(1);
    let ty = q.ty();
    let vh = ty.dims[1].fixed().ok_or_else(|| Error::invalid("value heads must be fixed"))? as i32;
    let (kd, vd) = (
        ty.dims[3].fixed().ok_or_else(|| Error::invalid("key size must be fixed"))? as i32,
        v.ty().dims[3].fixed().ok_or_else(|| Error::invalid("value size must be fixed"))? as i32,
    );
    let c = chunk as i32;
    let mut outs = Vec::new();
    for i in 0..(n / chunk) as i32 {
        let pc = format!("{p}_c{i}");
        let (s, e) = (i * c, (i + 1) * c);
        let rows = |g: &mut Graph, x: &Var, d: i32, tag: &str| {
            g.slice_by_index(&format!("{pc}_{tag}"), x, i32s(&[0, 0, s, 0]), i32s(&[1, vh, e, d]))
        };
        let (qc, kc, vc) = (rows(g, q, kd, "q")?, rows(g, k, kd, "k")?, rows(g, v, vd, "v")?);
        let steps = |g: &mut Graph, x: &Var, tag: &str| {
            g.slice_by_index(&format!("{pc}_{tag}"), x, i32s(&[0, 0, s]), i32s(&[1, vh, e]))
        };
        let gc = steps(g, decay, "g")?;
        let cum = g.op("cumsum", &format!("{pc}_cum"), vec![("x", (&gc).into()), ("axis", scalar_i32(-1))])?;
        let col = g.expand_dims(&format!("{pc}_cum_col"), &cum, &[-1])?;
        let row = g.expand_dims(&format!("{pc}_cum_row"), &cum, &[-2])?;
        // exp(cum_i − cum_j) for j ≤ i, 0 above the diagonal (masked before the exp, where
        // the difference is positive and could overflow).
        let diff = g.binary(Binary::Sub, &format!("{pc}_diff"), &col, &row)?;
        let lower = |g: &mut Graph, x: &Var, name: String| {
            g.op("band_part", &name, vec![("x", x.into()), ("lower", scalar_i32(-1)), ("upper", scalar_i32(0))])
        };
        let diff = lower(g, &diff, format!("{pc}_diff_low"))?;
        let pair = g.op("exp", &format!("{pc}_pair_exp"), vec![("x", (&diff).into())])?;
        let pair = lower(g, &pair, format!("{pc}_pair"))?;
        let ecum = g.op("exp", &format!("{pc}_ecum_t"), vec![("x", (&col).into())])?;
        let qk = matmul(g, &qc, &kc, false, true, &format!("{pc}_qk"))?;
        let intra = g.binary(Binary::Mul, &format!("{pc}_intra"), &qk, &pair)?;
        // The values the chunk writes: as they are, or the delta rule's corrections of what the
        // state (and the chunk's earlier keys) already give for each key.
        let v_new = match beta {
            None => vc,
            Some(beta) => {
                let bc = steps(g, beta, "beta")?;
                let b4 = g.expand_dims(&format!("{pc}_beta4"), &bc, &[-1])?;
                let kb = g.binary(Binary::Mul, &format!("{pc}_kb"), &kc, &b4)?;
                let vb = g.binary(Binary::Mul, &format!("{pc}_vb"), &vc, &b4)?;
                let kbd = g.binary(Binary::Mul, &format!("{pc}_kbd"), &kb, &ecum)?;
                let (new_values, k_cumdecay) = if chunk > 1 {
                    let kk = matmul(g, &kb, &kc, false, true, &format!("{pc}_kk"))?;
                    let ut = g.binary(Binary::Mul, &format!("{pc}_ut"), &kk, &pair)?;
                    let strict_lower = g.shared_constant(&format!("delta_strict_lower_{chunk}"), || {
                        let mask: Vec<f32> =
                            (0..chunk * chunk).map(|i| if i % chunk < i / chunk { 1.0 } else { 0.0 }).collect();
                        Tensor::from_f32(vec![chunk, chunk], &mask)
                    })?;
                    let low = g.binary(Binary::Mul, &format!("{pc}_ut_low"), &ut, &strict_lower)?;
                    let t = unit_lower_inverse(g, &low, vh, chunk, &pc)?;
                    let u = matmul(g, &t, &vb, false, false, &format!("{pc}_u"))?;
                    (u, matmul(g, &t, &kbd, false, false, &format!("{pc}_w"))?)
                } else {
                    (vb, kbd)
                };
                let ws = matmul(g, &k_cumdecay, &state, false, false, &format!("{pc}_ws"))?;
                g.binary(Binary::Sub, &format!("{pc}_v_new"), &new_values, &ws)?
            }
        };
        let qd = g.binary(Binary::Mul, &format!("{pc}_qd"), &qc, &ecum)?;
        let inter = matmul(g, &qd, &state, false, false, &format!("{pc}_inter"))?;
        let local = matmul(g, &intra, &v_new, false, false, &format!("{pc}_local"))?;
        outs.push(g.binary(Binary::Add, &format!("{pc}_out"), &inter, &local)?);
        // The state decays by the chunk's whole decay; each key by what follows it.
        let last = g.slice_by_index(&format!("{pc}_last"), &col, i32s(&[0, 0, c - 1, 0]), i32s(&[1, vh, c, 1]))?;
        let after = g.binary(Binary::Sub, &format!("{pc}_after"), &last, &col)?;
        let after = g.op("exp", &format!("{pc}_after_exp"), vec![("x", (&after).into())])?;
        let kd_ = g.binary(Binary::Mul, &format!("{pc}_k_decayed"), &kc, &after)?;
        let whole = g.op("exp", &format!("{pc}_whole"), vec![("x", (&last).into())])?;
        let kept = g.binary(Binary::Mul, &format!("{pc}_kept"), &state, &whole)?;
        let written = matmul(g, &kd_, &v_new, true, false, &format!("{pc}_written"))?;
        state = g.binary(Binary::Add, &format!("{pc}_state"), &kept, &written)?;
    }
    let out = match outs.as_slice() {
        [one] => one.clone(),
        _ => g.concat(&format!("{p}_core"), outs.iter().collect(), 2)?,
    };
    Ok((out, state))
}

fn matmul(g: &mut Graph, x: &Var, y: &Var, tx: bool, ty: bool, name: &str) -> Result<Var> {
    g.op(
        "matmul",
        name,
        vec![
            ("x", x.into()),
            ("y", y.into()),
            ("transpose_x", Arg::Tensor(Tensor::scalar_bool(tx))),
            ("transpose_y", Arg::Tensor(Tensor::scalar_bool(ty))),
        ],
    )
}

/// (I + L)⁻¹ for `low` = L (1, vh, C, C) strictly lower triangular, C a power of two, by
/// doubling the inverted diagonal blocks: [[X₁, 0], [B, X₂]] with X₁, X₂ the inverses of the
/// two halves is inverted by [[X₁, 0], [−X₂·B·X₁, X₂]], every block of a level at once. As
/// stable as forward substitution (which the reference's solver runs), in log₂ C levels.
fn unit_lower_inverse(g: &mut Graph, low: &Var, vh: i32, c: usize, p: &str) -> Result<Var> {
    let ci = c as i32;
    let l3 = g.reshape(&format!("{p}_l3"), low, &[vh, ci, ci])?;
    // Blocks of size b, (vh, C / b, b, b); the 1 × 1 diagonal blocks of I + L are ones.
    let mut blocks = g.shared_constant(&format!("delta_inverse_{c}_blocks_1"), || {
        Tensor::from_f32(vec![vh as usize, c, 1, 1], &vec![1.0; vh as usize * c])
    })?;
    let mut b = 1usize;
    while b < c {
        let (m, bi) = ((c / (2 * b)) as i32, b as i32);
        let pl = format!("{p}_inv{}", 2 * b);
        let pairs = g.reshape(&format!("{pl}_pairs"), &blocks, &[vh, m, 2, bi, bi])?;
        let half = |g: &mut Graph, at: i32, tag: &str| -> Result<Var> {
            let h = g.slice_by_index(
                &format!("{pl}_{tag}5"),
                &pairs,
                i32s(&[0, 0, at, 0, 0]),
                i32s(&[vh, m, at + 1, bi, bi]),
            )?;
            g.reshape(&format!("{pl}_{tag}"), &h, &[vh, m, bi, bi])
        };
        let (x1, x2) = (half(g, 0, "x1")?, half(g, 1, "x2")?);
        // L's block below the diagonal of each pair: rows 2jb + b.., columns 2jb...
        let rows = g.reshape(&format!("{pl}_rows"), &l3, &[vh, m, 2 * bi, ci])?;
        let rows = g.slice_by_index(&format!("{pl}_below"), &rows, i32s(&[0, 0, bi, 0]), i32s(&[vh, m, 2 * bi, ci]))?;
        let index = g.shared_constant(&format!("delta_inverse_{c}_columns_{b}"), || {
            let index: Vec<i32> = (0..vh)
                .flat_map(|_| (0..m).flat_map(move |j| (0..bi * bi).map(move |e| 2 * j * bi + e % bi)))
                .collect();
            Tensor::from_i32(vec![vh as usize, m as usize, b, b], &index)
        })?;
        let b21 = g.op(
            "gather_along_axis",
            &format!("{pl}_b21"),
            vec![("x", (&rows).into()), ("indices", (&index).into()), ("axis", scalar_i32(3))],
        )?;
        let y = matmul(g, &x2, &b21, false, false, &format!("{pl}_x2b"))?;
        let y = matmul(g, &y, &x1, false, false, &format!("{pl}_x2bx1"))?;
        let y = g.mul_s(&y, -1.0, &format!("{pl}_y"))?;
        let zero = g.op(
            "fill_like",
            &format!("{pl}_zero"),
            vec![("ref_tensor", (&x1).into()), ("value", g.float(DType::Fp32, 0.0))],
        )?;
        let top = g.concat(&format!("{pl}_top"), vec![&x1, &zero], -1)?;
        let bottom = g.concat(&format!("{pl}_bottom"), vec![&y, &x2], -1)?;
        blocks = g.concat(&format!("{pl}_blocks"), vec![&top, &bottom], -2)?;
        b *= 2;
    }
    g.reshape(&format!("{p}_inverse"), &blocks, &[1, vh, ci, ci])
}
