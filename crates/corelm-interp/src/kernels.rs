//! The op kernels. Each takes its inputs by parameter name and returns its outputs; the
//! executor rounds float outputs to the dtype the program declares.

use std::sync::Arc;

use corelm_format::mil::ops::broadcast as broadcast_dims;
use corelm_format::{DType, Dim};
use rayon::prelude::*;

use crate::matmul::{matmul_t, WeightRows};
use crate::vmath;

use crate::value::{checked_len, Data, Value};
use crate::{Error, Result};

/// One parameter's values (several for tuple parameters), by name.
pub type Bound<'a> = (&'a str, Vec<Arc<Value>>);

/// The inputs of one op invocation, by parameter name (a handful: a linear search is fastest).
pub struct Inputs<'a> {
    pub map: &'a [Bound<'a>],
}

impl Inputs<'_> {
    fn find(&self, name: &str) -> Option<&Vec<Arc<Value>>> {
        self.map.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.find(name).and_then(|v| v.first()).map(|a| a.as_ref())
    }

    pub fn req(&self, name: &str) -> Result<&Value> {
        self.get(name).ok_or_else(|| Error::invalid(format!("missing input `{name}`")))
    }

    pub fn tuple(&self, name: &str) -> Vec<&Value> {
        self.find(name).map(|v| v.iter().map(|a| a.as_ref()).collect()).unwrap_or_default()
    }

    fn int(&self, name: &str, default: i64) -> Result<i64> {
        match self.get(name) {
            Some(v) => v.ints()?.first().copied().ok_or_else(|| Error::invalid(format!("`{name}` is empty"))),
            None => Ok(default),
        }
    }

    fn boolean(&self, name: &str, default: bool) -> Result<bool> {
        Ok(self.int(name, default as i64)? != 0)
    }

    fn float(&self, name: &str, default: f32) -> Result<f32> {
        match self.get(name) {
            Some(v) => v.scalar_f32(),
            None => Ok(default),
        }
    }

    fn ints_or(&self, name: &str) -> Result<Option<Vec<i64>>> {
        self.get(name).map(|v| v.ints()).transpose()
    }
}

/// Below this many elements an elementwise loop runs on the calling thread: handing a decode
/// step's small vectors to another core costs more than the loop itself.
const PAR_MIN: usize = 1 << 15;

fn bad(msg: impl Into<String>) -> Error {
    Error::invalid(msg)
}

pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn norm_axis(axis: i64, rank: usize) -> Result<usize> {
    corelm_format::mil::ops::axis(axis, rank)
}

fn broadcast_shape(shapes: &[&[usize]]) -> Result<Vec<usize>> {
    let dims: Vec<Vec<Dim>> = shapes.iter().map(|s| s.iter().map(|&d| Dim::Fixed(d)).collect()).collect();
    let refs: Vec<&[Dim]> = dims.iter().map(|d| d.as_slice()).collect();
    let out: Vec<usize> = broadcast_dims(&refs)?.into_iter().map(|d| d.fixed().unwrap_or(1)).collect();
    // Broadcasting multiplies sizes: [n, 1] against [1, n] is n² elements.
    checked_len(&out, &"the broadcast result")?;
    Ok(out)
}

/// Flat offsets into each input for every output element, in row-major output order (for
/// small index spaces such as batch dimensions; elementwise data goes through [`Runs`]).
fn broadcast_offsets(out: &[usize], ins: &[&[usize]]) -> Vec<Vec<usize>> {
    let runs = Runs::new(out, ins);
    let mut offsets = vec![Vec::with_capacity(out.iter().product()); ins.len()];
    runs.for_each(|base| {
        for (k, offs) in offsets.iter_mut().enumerate() {
            offs.extend((0..runs.len).map(|i| base[k] + i * runs.step[k]));
        }
    });
    offsets
}

/// A broadcast iteration over an output shape, as runs of `len` consecutive output elements in
/// which each input advances by `step` (1, or 0 when broadcast). Dimensions that every input
/// walks contiguously are merged first, so a `[1, H, L, D] · [1, 1, L, D]` product is H runs of
/// L·D elements rather than H·L·D index computations.
struct Runs {
    /// Outer dimensions (after merging), with each input's stride along them.
    outer: Vec<usize>,
    outer_strides: Vec<Vec<usize>>,
    len: usize,
    step: Vec<usize>,
}

impl Runs {
    fn new(out: &[usize], ins: &[&[usize]]) -> Runs {
        let rank = out.len();
        let strides_of = |s: &[usize]| -> Vec<usize> {
            let st = strides(s);
            let pad = rank - s.len();
            (0..rank).map(|d| if d < pad || s[d - pad] == 1 { 0 } else { st[d - pad] }).collect()
        };
        let in_strides: Vec<Vec<usize>> = ins.iter().map(|s| strides_of(s)).collect();
        // Merge from the innermost dimension outwards while every input stays contiguous.
        let mut dims: Vec<usize> = Vec::new();
        let mut merged: Vec<Vec<usize>> = vec![Vec::new(); ins.len()];
        for d in (0..rank).rev() {
            if out[d] == 1 {
                continue;
            }
            let joinable = !dims.is_empty()
                && in_strides
                    .iter()
                    .zip(&merged)
                    .all(|(st, m)| st[d] == m.last().copied().unwrap_or(0) * dims.last().copied().unwrap_or(1));
            if joinable {
                *dims.last_mut().expect("non-empty") *= out[d];
            } else {
                dims.push(out[d]);
                for (m, st) in merged.iter_mut().zip(&in_strides) {
                    m.push(st[d]);
                }
            }
        }
        dims.reverse();
        merged.iter_mut().for_each(|m| m.reverse());
        let len = dims.pop().unwrap_or(1);
        let step = merged.iter_mut().map(|m| m.pop().unwrap_or(0)).collect();
        Runs { outer: dims, outer_strides: merged, len, step }
    }

    /// Each input's base offset for run number `run` (in output order).
    fn base_of(&self, mut run: usize) -> Vec<usize> {
        let mut base = vec![0usize; self.step.len()];
        for d in (0..self.outer.len()).rev() {
            let i = run % self.outer[d];
            run /= self.outer[d];
            for (b, st) in base.iter_mut().zip(&self.outer_strides) {
                *b += i * st[d];
            }
        }
        base
    }

    /// Calls `f` with each input's base offset for every run, in output order.
    fn for_each(&self, mut f: impl FnMut(&[usize])) {
        if self.outer.iter().product::<usize>() == 0 || self.len == 0 {
            return;
        }
        let mut idx = vec![0usize; self.outer.len()];
        let mut base = vec![0usize; self.step.len()];
        loop {
            f(&base);
            let mut d = self.outer.len();
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                for (b, st) in base.iter_mut().zip(&self.outer_strides) {
                    *b += st[d];
                }
                if idx[d] < self.outer[d] {
                    break;
                }
                for (b, st) in base.iter_mut().zip(&self.outer_strides) {
                    *b -= st[d] * self.outer[d];
                }
                idx[d] = 0;
            }
        }
    }
}

/// Applies `f` elementwise with numpy broadcasting.
fn zip2<A: Copy + Sync, B: Copy + Sync, O: Send>(
    xs: &[usize],
    x: &[A],
    ys: &[usize],
    y: &[B],
    f: impl Fn(A, B) -> O + Sync,
) -> Result<(Vec<usize>, Vec<O>)> {
    let out = broadcast_shape(&[xs, ys])?;
    if xs == ys {
        return Ok((out, x.par_iter().with_min_len(PAR_MIN).zip(y.par_iter()).map(|(&a, &b)| f(a, b)).collect()));
    }
    if y.len() == 1 {
        let b = y[0];
        if xs == out.as_slice() {
            return Ok((out, x.par_iter().with_min_len(PAR_MIN).map(|&a| f(a, b)).collect()));
        }
    }
    // Each run of output elements on its own, so long broadcasts (a norm's weight, a per-row
    // scale) run in parallel without per-element index arithmetic.
    let runs = Runs::new(&out, &[xs, ys]);
    let total: usize = out.iter().product();
    let mut v: Vec<O> = Vec::with_capacity(total);
    let run = |base: &[usize], o: &mut [std::mem::MaybeUninit<O>]| {
        let (xr, yr) = (&x[base[0]..], &y[base[1]..]);
        let n = o.len();
        match (runs.step[0], runs.step[1]) {
            (1, 1) => o.iter_mut().zip(&xr[..n]).zip(&yr[..n]).for_each(|((o, &a), &b)| {
                o.write(f(a, b));
            }),
            (1, _) => o.iter_mut().zip(&xr[..n]).for_each(|(o, &a)| {
                o.write(f(a, yr[0]));
            }),
            (_, 1) => o.iter_mut().zip(&yr[..n]).for_each(|(o, &b)| {
                o.write(f(xr[0], b));
            }),
            _ => o.iter_mut().for_each(|o| {
                o.write(f(xr[0], yr[0]));
            }),
        }
    };
    let slots = &mut v.spare_capacity_mut()[..total];
    if runs.len >= 16 && total >= PAR_MIN {
        slots
            .par_chunks_mut(runs.len)
            .with_min_len(PAR_MIN / runs.len)
            .enumerate()
            .for_each(|(i, o)| run(&runs.base_of(i), o));
    } else {
        let mut chunks = slots.chunks_mut(runs.len.max(1));
        runs.for_each(|base| run(base, chunks.next().expect("one chunk per run")));
    }
    // SAFETY: every one of the `total` elements was written above (one chunk per run).
    unsafe { v.set_len(total) };
    Ok((out, v))
}

fn float_binary(x: &Value, y: &Value, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Value> {
    let (xs, ys) = (x.floats(), y.floats());
    let (shape, v) = zip2(&x.shape, &xs, &y.shape, &ys, f)?;
    Ok(Value::f32(x.dtype, shape, v))
}

fn int_binary(x: &Value, y: &Value, f: impl Fn(i32, i32) -> i32 + Sync) -> Result<Value> {
    let (shape, v) = zip2(&x.shape, x.as_i32()?, &y.shape, y.as_i32()?, f)?;
    Ok(Value { dtype: x.dtype, shape, data: Data::I32(v) })
}

fn binary(op: &str, x: &Value, y: &Value) -> Result<Value> {
    if let (Data::I32(_), Data::I32(_)) = (&x.data, &y.data) {
        return int_binary(
            x,
            y,
            match op {
                "add" => |a: i32, b: i32| a.wrapping_add(b),
                "sub" => |a: i32, b: i32| a.wrapping_sub(b),
                "mul" => |a: i32, b: i32| a.wrapping_mul(b),
                "maximum" => |a: i32, b: i32| a.max(b),
                "minimum" => |a: i32, b: i32| a.min(b),
                "floor_div" => |a: i32, b: i32| match b {
                    0 => 0,
                    _ if a % b != 0 && ((a < 0) != (b < 0)) => a / b - 1,
                    _ => a / b,
                },
                "mod" => |a: i32, b: i32| if b == 0 { 0 } else { ((a % b) + b) % b },
                "real_div" => |a: i32, b: i32| if b == 0 { 0 } else { a / b },
                "pow" => |a: i32, b: i32| a.wrapping_pow(b.max(0) as u32),
                _ => return Err(bad(format!("`{op}` is not an integer op"))),
            },
        );
    }
    // One instance of the element loop per op (not a function pointer), so each vectorizes.
    match op {
        "add" => float_binary(x, y, |a, b| a + b),
        "sub" => float_binary(x, y, |a, b| a - b),
        "mul" => float_binary(x, y, |a, b| a * b),
        "real_div" => float_binary(x, y, |a, b| a / b),
        "pow" => float_binary(x, y, f32::powf),
        "maximum" => float_binary(x, y, f32::max),
        "minimum" => float_binary(x, y, f32::min),
        "floor_div" => float_binary(x, y, |a, b| (a / b).floor()),
        "mod" => float_binary(x, y, |a, b| a - (a / b).floor() * b),
        _ => Err(bad(format!("unknown binary op `{op}`"))),
    }
}

fn compare(op: &str, x: &Value, y: &Value) -> Result<Value> {
    let f: fn(f64, f64) -> bool = match op {
        "equal" => |a, b| a == b,
        "not_equal" => |a, b| a != b,
        "less" => |a, b| a < b,
        "less_equal" => |a, b| a <= b,
        "greater" => |a, b| a > b,
        "greater_equal" => |a, b| a >= b,
        _ => return Err(bad(format!("unknown comparison `{op}`"))),
    };
    let to64 = |v: &Value| -> Vec<f64> {
        match &v.data {
            Data::I32(d) => d.iter().map(|&a| a as f64).collect(),
            _ => v.to_f32_vec().into_iter().map(|a| a as f64).collect(),
        }
    };
    let (a, b) = (to64(x), to64(y));
    let (shape, v) = zip2(&x.shape, &a, &y.shape, &b, f)?;
    Ok(Value::bool(shape, v))
}

fn logical(op: &str, x: &Value, y: &Value) -> Result<Value> {
    let f: fn(bool, bool) -> bool = match op {
        "logical_and" => |a, b| a && b,
        "logical_or" => |a, b| a || b,
        "logical_xor" => |a, b| a != b,
        _ => return Err(bad(format!("unknown logical op `{op}`"))),
    };
    let (shape, v) = zip2(&x.shape, x.as_bool()?, &y.shape, y.as_bool()?, f)?;
    Ok(Value::bool(shape, v))
}

fn erf(x: f32) -> f32 {
    // Abramowitz–Stegun 7.1.26 is too coarse for parity; use the f64 series/continued form.
    let x = x as f64;
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let y = 1.0
        - t * (-x * x - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    (if x >= 0.0 { y } else { -y }) as f32
}

fn unary(op: &str, inp: &Inputs, x: &Value) -> Result<Value> {
    if op == "identity" {
        return Ok(x.clone());
    }
    if let Data::I32(v) = &x.data {
        let f: fn(i32) -> i32 = match op {
            "abs" => |a| a.wrapping_abs(),
            "sign" => |a| a.signum(),
            "square" => |a| a.wrapping_mul(a),
            "identity" => |a| a,
            _ => return Err(bad(format!("`{op}` does not take integers"))),
        };
        return Ok(Value {
            dtype: x.dtype,
            shape: x.shape.clone(),
            data: Data::I32(v.iter().map(|&a| f(a)).collect()),
        });
    }
    if let Data::Bool(v) = &x.data {
        return match op {
            "logical_not" => Ok(Value::bool(x.shape.clone(), v.iter().map(|&a| !a).collect())),
            "identity" => Ok(x.clone()),
            _ => Err(bad(format!("`{op}` does not take bools"))),
        };
    }
    let eps = |d: f32| inp.float("epsilon", d);
    let v = x.as_f32()?;
    let out: Vec<f32> = match op {
        "identity" => v.to_vec(),
        "rsqrt" => {
            let e = eps(1e-12)?;
            v.par_iter().with_min_len(PAR_MIN).map(|&a| 1.0 / (a + e).sqrt()).collect()
        }
        "log" => {
            let e = eps(1e-45)?;
            v.iter().map(|&a| (a + e).ln()).collect()
        }
        "inverse" => {
            let e = eps(1e-4)?;
            v.iter().map(|&a| 1.0 / (a + e)).collect()
        }
        "gelu" => {
            let mode =
                inp.get("mode").map(|m| m.string().map(str::to_string)).transpose()?.unwrap_or_else(|| "EXACT".into());
            match mode.as_str() {
                "EXACT" => v
                    .par_iter()
                    .with_min_len(PAR_MIN)
                    .map(|&a| 0.5 * a * (1.0 + erf(a / std::f32::consts::SQRT_2)))
                    .collect(),
                "TANH_APPROXIMATION" => v
                    .par_iter()
                    .with_min_len(PAR_MIN)
                    .map(|&a| {
                        let a64 = a as f64;
                        (0.5 * a64
                            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (a64 + 0.044715 * a64.powi(3))).tanh()))
                            as f32
                    })
                    .collect(),
                "SIGMOID_APPROXIMATION" => v.iter().map(|&a| a / (1.0 + (-1.702 * a).exp())).collect(),
                other => return Err(bad(format!("unknown gelu mode `{other}`"))),
            }
        }
        "exp" | "sigmoid" | "silu" => {
            let negate = op != "exp";
            let mut e: Vec<f32> = v.iter().map(|&a| if negate { -a } else { a }).collect();
            e.par_chunks_mut(PAR_MIN).for_each(vmath::exp_in_place);
            match op {
                "sigmoid" => e.iter_mut().for_each(|e| *e = 1.0 / (1.0 + *e)),
                "silu" => e.iter_mut().zip(v.iter()).for_each(|(e, &a)| *e = a / (1.0 + *e)),
                _ => {}
            }
            e
        }
        "clip" => {
            let (lo, hi) = (inp.float("alpha", f32::MIN)?, inp.float("beta", f32::MAX)?);
            v.iter().map(|&a| a.max(lo).min(hi)).collect()
        }
        _ => {
            let f: fn(f32) -> f32 = match op {
                "sin" => f32::sin,
                "cos" => f32::cos,
                "tan" => f32::tan,
                "asin" => f32::asin,
                "acos" => f32::acos,
                "atan" => f32::atan,
                "sinh" => f32::sinh,
                "cosh" => f32::cosh,
                "atanh" => f32::atanh,
                "exp2" => f32::exp2,
                "sqrt" => f32::sqrt,
                "tanh" => f32::tanh,
                "relu" => |a| a.max(0.0),
                "relu6" => |a| a.clamp(0.0, 6.0),
                "erf" => erf,
                "floor" => f32::floor,
                "ceil" => f32::ceil,
                "round" => |a: f32| a.round_ties_even(),
                "sign" => |a: f32| {
                    if a > 0.0 {
                        1.0
                    } else if a < 0.0 {
                        -1.0
                    } else {
                        0.0
                    }
                },
                "abs" => f32::abs,
                "square" => |a| a * a,
                "softplus" => |a: f32| (1.0 + a.exp()).ln(),
                "softsign" => |a: f32| a / (1.0 + a.abs()),
                _ => return Err(bad(format!("unknown unary op `{op}`"))),
            };
            v.par_iter().with_min_len(PAR_MIN).map(|&a| f(a)).collect()
        }
    };
    Ok(Value::f32(x.dtype, x.shape.clone(), out))
}

/// Splits `shape` around `axis` into (outer, axis length, inner).
fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// Softmax of one contiguous row, in place (max subtracted first, so exp cannot overflow).
fn softmax_in_place(row: &mut [f32]) {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter_mut().for_each(|x| *x -= mx);
    vmath::exp_in_place(row);
    let sum: f32 = row.iter().sum();
    row.iter_mut().for_each(|x| *x /= sum);
}

fn softmax(x: &Value, axis: i64) -> Result<Value> {
    let ax = norm_axis(axis, x.rank())?;
    let (outer, n, inner) = around(&x.shape, ax);
    let v = x.as_f32()?;
    let mut out = vec![0f32; v.len()];
    out.par_chunks_mut(n * inner).with_min_len(PAR_MIN / (n * inner).max(1)).enumerate().for_each(|(o, chunk)| {
        let base = o * n * inner;
        if inner == 1 {
            chunk.copy_from_slice(&v[base..base + n]);
            softmax_in_place(chunk);
            return;
        }
        for i in 0..inner {
            let m = (0..n).map(|k| v[base + k * inner + i]).fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for k in 0..n {
                let e = vmath::exp(v[base + k * inner + i] - m);
                chunk[k * inner + i] = e;
                sum += e;
            }
            for k in 0..n {
                chunk[k * inner + i] /= sum;
            }
        }
    });
    let _ = outer;
    Ok(Value::f32(x.dtype, x.shape.clone(), out))
}

/// `Σ pre(a)` in f64, over eight interleaved partial sums (which the compiler can vectorize).
#[inline(always)]
fn lanes_sum(c: &[f32], pre: impl Fn(f32) -> f32) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = c.chunks_exact(8);
    for ch in &mut chunks {
        for (l, &a) in lanes.iter_mut().zip(ch) {
            *l += pre(a) as f64;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&a| pre(a) as f64).sum();
    lanes.iter().sum::<f64>() + tail
}

fn reduce(op: &str, inp: &Inputs, x: &Value) -> Result<Value> {
    let rank = x.rank();
    let axes: Vec<usize> = match inp.ints_or("axes")? {
        Some(a) => a.into_iter().map(|a| norm_axis(a, rank)).collect::<Result<_>>()?,
        None => (0..rank).collect(),
    };
    let keep = inp.boolean("keep_dims", false)?;
    let out_full: Vec<usize> =
        x.shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let n_out: usize = out_full.iter().product();
    let v = x.floats();
    let count: usize = axes.iter().map(|&a| x.shape[a]).product();
    let (init, f): (f32, fn(f32, f32) -> f32) = match op {
        "reduce_sum" | "reduce_mean" | "reduce_l1_norm" | "reduce_l2_norm" | "reduce_sum_square" | "reduce_log_sum"
        | "reduce_log_sum_exp" => (0.0, |a, b| a + b),
        "reduce_max" => (f32::NEG_INFINITY, f32::max),
        "reduce_min" => (f32::INFINITY, f32::min),
        "reduce_prod" => (1.0, |a, b| a * b),
        _ => return Err(bad(format!("unknown reduction `{op}`"))),
    };
    let pre: fn(f32) -> f32 = match op {
        "reduce_l1_norm" => f32::abs,
        "reduce_l2_norm" | "reduce_sum_square" => |a| a * a,
        "reduce_log_sum_exp" => vmath::exp,
        _ => |a| a,
    };
    let mut acc = vec![init; n_out];
    // Accumulate in f64 for sums, so long reductions stay accurate.
    let mut acc64 = vec![0f64; n_out];
    let sumlike = init == 0.0;
    // Walk x in order; the output element of each run is a broadcast of the kept dimensions.
    let runs = Runs::new(&x.shape, &[&out_full]);
    if sumlike && runs.step[0] == 0 && runs.len == count && count >= 16 {
        // Every output sums one contiguous run (the reduced axes are innermost, as in a norm):
        // outputs in parallel, each an eight-lane f64 sum.
        let sums: Vec<(usize, f64)> = v
            .par_chunks(count)
            .with_min_len((PAR_MIN / count).max(1))
            .enumerate()
            .map(|(r, c)| {
                let sum = match op {
                    "reduce_l1_norm" => lanes_sum(c, f32::abs),
                    "reduce_l2_norm" | "reduce_sum_square" => lanes_sum(c, |a| a * a),
                    "reduce_log_sum_exp" => lanes_sum(c, vmath::exp),
                    _ => lanes_sum(c, |a| a),
                };
                (runs.base_of(r)[0], sum)
            })
            .collect();
        sums.into_iter().for_each(|(o, sum)| acc64[o] = sum);
    } else {
        let mut at = 0;
        runs.for_each(|base| {
            let (o, chunk) = (base[0], &v[at..at + runs.len]);
            at += runs.len;
            match (runs.step[0], sumlike) {
                (0, true) => acc64[o] += chunk.iter().map(|&a| pre(a) as f64).sum::<f64>(),
                (0, false) => acc[o] = chunk.iter().fold(acc[o], |a, &b| f(a, pre(b))),
                (_, true) => acc64[o..o + chunk.len()].iter_mut().zip(chunk).for_each(|(a, &b)| *a += pre(b) as f64),
                (_, false) => acc[o..o + chunk.len()].iter_mut().zip(chunk).for_each(|(a, &b)| *a = f(*a, pre(b))),
            }
        });
    }
    if sumlike {
        for (a, s) in acc.iter_mut().zip(&acc64) {
            *a = *s as f32;
        }
    }
    let post: Box<dyn Fn(f32) -> f32> = match op {
        "reduce_mean" => Box::new(move |a| a / count as f32),
        "reduce_l2_norm" => Box::new(f32::sqrt),
        "reduce_log_sum" | "reduce_log_sum_exp" => Box::new(f32::ln),
        _ => Box::new(|a| a),
    };
    let acc: Vec<f32> = acc.into_iter().map(post).collect();
    let shape = if keep {
        out_full
    } else {
        x.shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
    };
    if x.dtype == DType::Int32 {
        return Ok(Value::i32(shape, acc.into_iter().map(|a| a as i32).collect()));
    }
    Ok(Value::f32(x.dtype, shape, acc))
}

fn arg_reduce(op: &str, inp: &Inputs, x: &Value) -> Result<Value> {
    let ax = norm_axis(inp.int("axis", -1)?, x.rank())?;
    let keep = inp.boolean("keep_dims", false)?;
    let (outer, n, inner) = around(&x.shape, ax);
    let v = x.to_f32_vec();
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let mut best = 0;
            for k in 1..n {
                let (a, b) = (v[(o * n + k) * inner + i], v[(o * n + best) * inner + i]);
                if (op == "reduce_argmax" && a > b) || (op == "reduce_argmin" && a < b) {
                    best = k;
                }
            }
            out.push(best as i32);
        }
    }
    let mut shape = x.shape.clone();
    if keep {
        shape[ax] = 1;
    } else {
        shape.remove(ax);
    }
    Ok(Value::i32(shape, out))
}

/// C[m×n] (+)= A[m×k]·B[k×n] with explicit strides, split over rayon on n.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    rsa: isize,
    csa: isize,
    b: &[f32],
    rsb: isize,
    csb: isize,
    c: &mut [f32],
) {
    const CHUNK: usize = 64;
    if m * n * k < 1 << 16 || n < 2 * CHUNK {
        // SAFETY: strides describe in-bounds views of `a`, `b` and the m×n row-major `c`.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                rsa,
                csa,
                b.as_ptr(),
                rsb,
                csb,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
        return;
    }
    let cptr = c.as_mut_ptr() as usize;
    (0..n.div_ceil(CHUNK)).into_par_iter().for_each(|j| {
        let start = j * CHUNK;
        let width = CHUNK.min(n - start);
        // SAFETY: each task writes only columns start..start+width of `c`, which do not overlap.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                width,
                1.0,
                a.as_ptr(),
                rsa,
                csa,
                b.as_ptr().offset(start as isize * csb),
                rsb,
                csb,
                0.0,
                (cptr as *mut f32).add(start),
                n as isize,
                1,
            );
        }
    });
}

fn linear(x: &Value, w: &Value, b: Option<&Value>) -> Result<Value> {
    let (dout, din) = match (&w.data, w.shape.as_slice()) {
        (Data::Packed(p), _) => (p.rows(), p.cols()),
        (_, [o, i]) => (*o, *i),
        _ => return Err(bad("linear weight must be rank 2")),
    };
    if x.shape.last() != Some(&din) {
        return Err(bad(format!("linear: x {:?} does not match weight {:?}", x.shape, w.shape)));
    }
    let m = x.len() / din;
    let mut out = vec![0f32; m * dout];
    let xv = x.as_f32()?;
    match &w.data {
        Data::Packed(p) => matmul_t(m, din, dout, xv, WeightRows::of(p), &mut out),
        // Dense f32 weights: a packing GEMM pays off once there are enough rows to reuse them.
        _ if m <= 16 => matmul_t(m, din, dout, xv, WeightRows::F32(w.as_f32()?), &mut out),
        _ => sgemm(m, din, dout, xv, din as isize, 1, w.as_f32()?, 1, din as isize, &mut out),
    }
    if let Some(b) = b {
        let bv = b.floats();
        out.par_chunks_mut(dout)
            .with_min_len(PAR_MIN / dout.max(1))
            .for_each(|row| row.iter_mut().zip(bv.iter()).for_each(|(o, b)| *o += b));
    }
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("rank >= 1") = dout;
    Ok(Value::f32(x.dtype, shape, out))
}

fn matmul(inp: &Inputs) -> Result<Value> {
    let (x, y) = (inp.req("x")?, inp.req("y")?);
    let (tx, ty) = (inp.boolean("transpose_x", false)?, inp.boolean("transpose_y", false)?);
    let mut xs = x.shape.clone();
    let mut ys = y.shape.clone();
    let (x1, y1) = (xs.len() == 1, ys.len() == 1);
    if x1 {
        xs.insert(0, 1);
    }
    if y1 {
        ys.push(1);
    }
    let (xr, yr) = (xs.len(), ys.len());
    let (m, k) = if tx { (xs[xr - 1], xs[xr - 2]) } else { (xs[xr - 2], xs[xr - 1]) };
    let (k2, n) = if ty { (ys[yr - 1], ys[yr - 2]) } else { (ys[yr - 2], ys[yr - 1]) };
    if k != k2 {
        return Err(bad(format!("matmul: inner dimensions differ ({k} vs {k2})")));
    }
    let batch = broadcast_shape(&[&xs[..xr - 2], &ys[..yr - 2]])?;
    let nb: usize = batch.iter().product();
    let offs = broadcast_offsets(&batch, &[&xs[..xr - 2], &ys[..yr - 2]]);
    let (xv, yv) = (x.floats(), y.floats());
    let (xm, ym) = (xs[xr - 2] * xs[xr - 1], ys[yr - 2] * ys[yr - 1]);
    let mut out = vec![0f32; checked_len(&[nb, m, n], &"the matmul result")?];
    let (rsa, csa) = if tx { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if ty { (1, k as isize) } else { (n as isize, 1) };
    for bi in 0..nb {
        let a = &xv[offs[0][bi] * xm..][..xm];
        let b = &yv[offs[1][bi] * ym..][..ym];
        sgemm(m, k, n, a, rsa, csa, b, rsb, csb, &mut out[bi * m * n..(bi + 1) * m * n]);
    }
    let mut shape = batch;
    if !x1 {
        shape.push(m);
    }
    if !y1 {
        shape.push(n);
    }
    let dtype = if x.dtype.is_float() { x.dtype } else { y.dtype };
    Ok(Value::f32(dtype, shape, out))
}

fn sdpa(inp: &Inputs) -> Result<Value> {
    let (q, k, v) = (inp.req("query")?, inp.req("key")?, inp.req("value")?);
    let r = q.rank();
    if r < 2 || k.rank() != r || v.rank() != r {
        return Err(bad(format!(
            "attention of query {:?}, key {:?}, value {:?}: ranks differ",
            q.shape, k.shape, v.shape
        )));
    }
    let (l, e) = (q.shape[r - 2], q.shape[r - 1]);
    let (s, ev) = (k.shape[r - 2], v.shape[r - 1]);
    if k.shape[r - 1] != e || v.shape[r - 2] != s {
        return Err(bad(format!("attention of query {:?}, key {:?}, value {:?}", q.shape, k.shape, v.shape)));
    }
    let batch = broadcast_shape(&[&q.shape[..r - 2], &k.shape[..r - 2], &v.shape[..r - 2]])?;
    let nb: usize = batch.iter().product();
    checked_len(&[nb, l, ev.max(s)], &"the attention")?;
    let offs = broadcast_offsets(&batch, &[&q.shape[..r - 2], &k.shape[..r - 2], &v.shape[..r - 2]]);
    // The additive mask as (L, S) slabs, one per distinct batch index of the mask (usually one
    // shared by every head): slab_of[bi] says which.
    let mask: Option<(Vec<f32>, Vec<usize>)> = match inp.get("attn_mask") {
        None => None,
        Some(mk) => {
            // Rank below two: leading ones, as broadcasting reads it.
            let mut mshape = vec![1; 2usize.saturating_sub(mk.rank())];
            mshape.extend(&mk.shape);
            let add: Vec<f32> = match &mk.data {
                Data::Bool(b) => b.iter().map(|&t| if t { 0.0 } else { f32::NEG_INFINITY }).collect(),
                _ => mk.to_f32_vec(),
            };
            let (lead, tail) = mshape.split_at(mshape.len() - 2);
            let fits = |have: &[usize], want: &[usize]| {
                have.len() <= want.len() && have.iter().rev().zip(want.iter().rev()).all(|(&h, &w)| h == 1 || h == w)
            };
            if !fits(lead, &batch) || !fits(tail, &[l, s]) {
                return Err(bad(format!(
                    "attn_mask {:?} does not broadcast to the attention's {:?}",
                    mk.shape,
                    [batch.as_slice(), &[l, s]].concat()
                )));
            }
            let slabs: usize = lead.iter().product();
            // Each slab broadcast from its own (…, L or 1, S or 1) shape to (L, S).
            let per_slab = tail.iter().product::<usize>().max(1);
            let expand = broadcast_offsets(&[l, s], &[tail]);
            let mut expanded = Vec::with_capacity(slabs * l * s);
            for slab in 0..slabs {
                expanded.extend(expand[0].iter().map(|&i| add[slab * per_slab + i]));
            }
            let slab_of = broadcast_offsets(&batch, &[lead]).swap_remove(0);
            Some((expanded, slab_of))
        }
    };
    let (qv, kv, vv) = (q.as_f32()?, k.as_f32()?, v.as_f32()?);
    let scale = 1.0 / (e as f32).sqrt();
    let mut out = vec![0f32; nb * l * ev];
    // Work in blocks of query rows, so prefill keeps every core busy even with few heads.
    const ROWS: usize = 64;
    out.par_chunks_mut(l * ev).enumerate().for_each(|(bi, ob)| {
        let kb = &kv[offs[1][bi] * s * e..][..s * e];
        let vb = &vv[offs[2][bi] * s * ev..][..s * ev];
        ob.par_chunks_mut(ROWS * ev).enumerate().for_each(|(chunk, o)| {
            let (r0, rows) = (chunk * ROWS, o.len() / ev.max(1));
            let qb = &qv[(offs[0][bi] * l + r0) * e..][..rows * e];
            let mask_rows = mask.as_ref().map(|(m, slab_of)| &m[(slab_of[bi] * l + r0) * s..][..rows * s]);
            // Keys that every row of this block masks with -inf get exactly zero weight: leave
            // them out (half the work of a causal prefill). A block that masks everything keeps
            // all keys, so it still comes out as NaN.
            let keys = match mask_rows {
                Some(mb) => match mb.chunks(s).filter_map(|r| r.iter().rposition(|&a| a != f32::NEG_INFINITY)).max() {
                    Some(last) => last + 1,
                    None => s,
                },
                None => s,
            };
            let mut scores = vec![0f32; rows * keys];
            // SAFETY: in-bounds row-major views.
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    e,
                    keys,
                    scale,
                    qb.as_ptr(),
                    e as isize,
                    1,
                    kb.as_ptr(),
                    1,
                    e as isize,
                    0.0,
                    scores.as_mut_ptr(),
                    keys as isize,
                    1,
                );
            }
            if let Some(mb) = mask_rows {
                for (row, m) in scores.chunks_mut(keys).zip(mb.chunks(s)) {
                    row.iter_mut().zip(m).for_each(|(a, b)| *a += b);
                }
            }
            scores.chunks_mut(keys).for_each(softmax_in_place);
            // SAFETY: as above.
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    keys,
                    ev,
                    1.0,
                    scores.as_ptr(),
                    keys as isize,
                    1,
                    vb.as_ptr(),
                    ev as isize,
                    1,
                    0.0,
                    o.as_mut_ptr(),
                    ev as isize,
                    1,
                );
            }
        });
    });
    let mut shape = batch;
    shape.extend([l, ev]);
    Ok(Value::f32(q.dtype, shape, out))
}

fn layer_norm(inp: &Inputs, x: &Value) -> Result<Value> {
    let rank = x.rank();
    let axes: Vec<usize> = match inp.ints_or("axes")? {
        Some(a) => a.into_iter().map(|a| norm_axis(a, rank)).collect::<Result<_>>()?,
        None => (0..rank).collect(),
    };
    let first = *axes.iter().min().ok_or_else(|| bad("layer_norm needs axes"))?;
    let last = *axes.iter().max().expect("non-empty");
    if axes.len() != last - first + 1 || (first..=last).any(|a| !axes.contains(&a)) {
        return Err(bad("layer_norm over axes that are not consecutive is not supported"));
    }
    let n: usize = x.shape[first..=last].iter().product();
    let inner: usize = x.shape[last + 1..].iter().product();
    let eps = inp.float("epsilon", 1e-5)? as f64;
    let gamma = inp.get("gamma").map(|g| g.floats());
    let beta = inp.get("beta").map(|b| b.floats());
    let v = x.as_f32()?;
    let mut out = vec![0f32; v.len()];
    if inner > 1 {
        // Normalized axes followed by others, e.g. the channels of (1, C, 1, S): statistics per
        // trailing position, accumulated row by row of the normalized axes.
        out.par_chunks_mut(n * inner).zip(v.par_chunks(n * inner)).for_each(|(o, block)| {
            let mut mean = vec![0f64; inner];
            for row in block.chunks(inner) {
                mean.iter_mut().zip(row).for_each(|(m, &a)| *m += a as f64);
            }
            mean.iter_mut().for_each(|m| *m /= n as f64);
            let mut var = vec![0f64; inner];
            for row in block.chunks(inner) {
                var.iter_mut().zip(row).zip(&mean).for_each(|((s, &a), m)| *s += (a as f64 - m).powi(2));
            }
            let inv: Vec<f64> = var.iter().map(|s| 1.0 / (s / n as f64 + eps).sqrt()).collect();
            for (k, (orow, row)) in o.chunks_mut(inner).zip(block.chunks(inner)).enumerate() {
                for (i, (o, &a)) in orow.iter_mut().zip(row).enumerate() {
                    let mut y = ((a as f64 - mean[i]) * inv[i]) as f32;
                    if let Some(g) = &gamma {
                        y *= g[k];
                    }
                    if let Some(b) = &beta {
                        y += b[k];
                    }
                    *o = y;
                }
            }
        });
        return Ok(Value::f32(x.dtype, x.shape.clone(), out));
    }
    out.par_chunks_mut(n).with_min_len(PAR_MIN / n.max(1)).zip(v.par_chunks(n)).for_each(|(o, row)| {
        let mean = row.iter().map(|&a| a as f64).sum::<f64>() / n as f64;
        let var = row.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let inv = 1.0 / (var + eps).sqrt();
        for (i, (o, &a)) in o.iter_mut().zip(row).enumerate() {
            let mut y = ((a as f64 - mean) * inv) as f32;
            if let Some(g) = &gamma {
                y *= g[i];
            }
            if let Some(b) = &beta {
                y += b[i];
            }
            *o = y;
        }
    });
    Ok(Value::f32(x.dtype, x.shape.clone(), out))
}

/// Copies runs `[start, start + run)` of `x` into a new value of `shape`.
fn take_runs(x: &Value, shape: Vec<usize>, starts: &[usize], run: usize) -> Value {
    fn copy<T: Clone>(v: &[T], starts: &[usize], run: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(starts.len() * run);
        for &s in starts {
            out.extend_from_slice(&v[s..s + run]);
        }
        out
    }
    let data = match &x.data {
        Data::F32(v) => Data::F32(copy(v, starts, run)),
        Data::I32(v) => Data::I32(copy(v, starts, run)),
        Data::Bool(v) => Data::Bool(copy(v, starts, run)),
        Data::Str(v) => Data::Str(copy(v, starts, run)),
        Data::Packed(p) => Data::F32(copy(&p.dense(), starts, run)),
    };
    Value { dtype: x.dtype, shape, data }
}

/// Gathers elements of `x` at flat source offsets.
fn take(x: &Value, shape: Vec<usize>, idx: &[usize]) -> Value {
    let data = match &x.data {
        Data::F32(v) => Data::F32(idx.iter().map(|&i| v[i]).collect()),
        Data::I32(v) => Data::I32(idx.iter().map(|&i| v[i]).collect()),
        Data::Bool(v) => Data::Bool(idx.iter().map(|&i| v[i]).collect()),
        Data::Str(v) => Data::Str(idx.iter().map(|&i| v[i].clone()).collect()),
        Data::Packed(p) => {
            let dense = p.dense();
            Data::F32(idx.iter().map(|&i| dense[i]).collect())
        }
    };
    Value { dtype: x.dtype, shape, data }
}

fn transpose(x: &Value, perm: &[i64]) -> Result<Value> {
    let rank = x.rank();
    let perm: Vec<usize> = perm.iter().map(|&p| norm_axis(p, rank)).collect::<Result<_>>()?;
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let st = strides(&x.shape);
    let pst: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    // Trailing axes the permutation leaves in place move as contiguous runs (heads ↔ positions
    // keeps the head dimension whole).
    let outer = rank - (0..rank).rev().take_while(|&d| perm[d] == d).count();
    let run: usize = x.shape[outer..].iter().product();
    let blocks = x.len().checked_div(run).unwrap_or(0);
    let mut starts = Vec::with_capacity(blocks);
    let mut counter = vec![0usize; outer];
    let mut cur = 0usize;
    for _ in 0..blocks {
        starts.push(cur);
        for d in (0..outer).rev() {
            counter[d] += 1;
            cur += pst[d];
            if counter[d] < shape[d] {
                break;
            }
            cur -= pst[d] * shape[d];
            counter[d] = 0;
        }
    }
    Ok(if run == 1 { take(x, shape, &starts) } else { take_runs(x, shape, &starts, run) })
}

/// Python-style slice bounds of one dimension.
fn slice_dim(dim: usize, begin: i64, end: i64, stride: i64, begin_mask: bool, end_mask: bool) -> Vec<usize> {
    let d = dim as i64;
    let norm = |v: i64| if v < 0 { v + d } else { v };
    let mut out = Vec::new();
    if stride > 0 {
        let b = if begin_mask { 0 } else { norm(begin).clamp(0, d) };
        let e = if end_mask { d } else { norm(end).clamp(0, d) };
        let mut i = b;
        while i < e {
            out.push(i as usize);
            i += stride;
        }
    } else {
        let b = if begin_mask { d - 1 } else { norm(begin).clamp(-1, d - 1) };
        let e = if end_mask { -1 } else { norm(end).clamp(-1, d - 1) };
        let mut i = b;
        while i > e {
            out.push(i as usize);
            i += stride;
        }
    }
    out
}

/// Per-dimension index lists of `slice_by_index` / `slice_update`, and which dims squeeze.
fn slice_indices(inp: &Inputs, shape: &[usize]) -> Result<(Vec<Vec<usize>>, Vec<bool>)> {
    let r = shape.len();
    let begin = inp.req("begin")?.ints()?;
    let end = inp.req("end")?.ints()?;
    let flags = |name: &str| -> Result<Vec<bool>> {
        Ok(inp.ints_or(name)?.map(|v| v.into_iter().map(|x| x != 0).collect()).unwrap_or_else(|| vec![false; r]))
    };
    let stride = inp.ints_or("stride")?.unwrap_or_else(|| vec![1; r]);
    let (bm, em, sm) = (flags("begin_mask")?, flags("end_mask")?, flags("squeeze_mask")?);
    if [begin.len(), end.len(), stride.len(), bm.len(), em.len(), sm.len()].iter().any(|&n| n != r) {
        return Err(bad(format!("slice parameters do not match rank {r}")));
    }
    let mut dims = Vec::with_capacity(r);
    for i in 0..r {
        if stride[i] == 0 {
            return Err(bad("slice stride 0"));
        }
        if sm[i] {
            let b = if begin[i] < 0 { begin[i] + shape[i] as i64 } else { begin[i] };
            if b < 0 || b >= shape[i] as i64 {
                return Err(bad(format!("squeezed index {} out of range for dim {}", begin[i], shape[i])));
            }
            dims.push(vec![b as usize]);
        } else {
            dims.push(slice_dim(shape[i], begin[i], end[i], stride[i], bm[i], em[i]));
        }
    }
    Ok((dims, sm))
}

/// The cartesian product of per-dimension index lists as contiguous runs `(start, len)`:
/// trailing dimensions taken whole, and a trailing consecutive range, merge into one run.
fn product_runs(dims: &[Vec<usize>], shape: &[usize]) -> (Vec<usize>, usize) {
    let st = strides(shape);
    let mut split = dims.len();
    let mut run = 1;
    while split > 0 {
        let d = split - 1;
        let list = &dims[d];
        let consecutive = list.windows(2).all(|w| w[1] == w[0] + 1);
        if !consecutive {
            break;
        }
        run *= list.len();
        split = d;
        if list.len() != shape[d] {
            break;
        }
    }
    if split == dims.len() {
        return (product_offsets(dims, shape), 1);
    }
    let first = dims[split].first().copied().unwrap_or(0) * st[split];
    let block = st[split] * shape[split];
    let starts = product_offsets(&dims[..split], &shape[..split]).into_iter().map(|o| o * block + first).collect();
    (starts, run)
}

/// Flat offsets of the cartesian product of per-dimension index lists.
fn product_offsets(dims: &[Vec<usize>], shape: &[usize]) -> Vec<usize> {
    let st = strides(shape);
    let mut offs = vec![0usize];
    for (d, list) in dims.iter().enumerate() {
        let mut next = Vec::with_capacity(offs.len() * list.len());
        for &o in &offs {
            for &i in list {
                next.push(o + i * st[d]);
            }
        }
        offs = next;
    }
    offs
}

fn slice_by_index(inp: &Inputs, x: &Value) -> Result<Value> {
    let (dims, squeeze) = slice_indices(inp, &x.shape)?;
    let (starts, run) = product_runs(&dims, &x.shape);
    let shape = dims.iter().zip(&squeeze).filter(|(_, &s)| !s).map(|(d, _)| d.len()).collect();
    Ok(take_runs(x, shape, &starts, run))
}

fn slice_by_size(inp: &Inputs, x: &Value) -> Result<Value> {
    let begin = inp.req("begin")?.ints()?;
    let size = inp.req("size")?.ints()?;
    let dims: Vec<Vec<usize>> = (0..x.rank())
        .map(|i| {
            let b = begin[i].max(0) as usize;
            let n = if size[i] < 0 { x.shape[i].saturating_sub(b) } else { size[i] as usize };
            (b..(b + n).min(x.shape[i])).collect()
        })
        .collect();
    let offs = product_offsets(&dims, &x.shape);
    Ok(take(x, dims.iter().map(|d| d.len()).collect(), &offs))
}

/// Writes `update` into `x` in place (x is owned by the caller).
pub fn slice_update_in_place(inp: &Inputs, x: &mut Value) -> Result<()> {
    let upd = inp.req("update")?;
    let (dims, squeeze) = slice_indices(inp, &x.shape)?;
    let (starts, run) = product_runs(&dims, &x.shape);
    let expected: Vec<usize> = dims.iter().zip(&squeeze).filter(|(_, &s)| !s).map(|(d, _)| d.len()).collect();
    if expected != upd.shape {
        return Err(bad(format!("update {:?} does not match the slice {expected:?}", upd.shape)));
    }
    fn put<T: Copy>(dst: &mut [T], src: &[T], starts: &[usize], run: usize) {
        for (i, &s) in starts.iter().enumerate() {
            dst[s..s + run].copy_from_slice(&src[i * run..(i + 1) * run]);
        }
    }
    match (&mut x.data, &upd.data) {
        (Data::F32(dst), Data::F32(src)) => put(dst, src, &starts, run),
        (Data::I32(dst), Data::I32(src)) => put(dst, src, &starts, run),
        (Data::Bool(dst), Data::Bool(src)) => put(dst, src, &starts, run),
        _ => return Err(bad("slice_update: x and update differ in type")),
    }
    Ok(())
}

fn gather(inp: &Inputs, x: &Value, along: bool) -> Result<Value> {
    let idx = inp.req("indices")?.ints()?;
    let ishape = inp.req("indices")?.shape.clone();
    let ax = norm_axis(inp.int("axis", 0)?, x.rank())?;
    let (outer, n, inner) = around(&x.shape, ax);
    let check = |i: i64| -> Result<usize> {
        let j = if i < 0 { i + n as i64 } else { i };
        if j < 0 || j >= n as i64 {
            return Err(bad(format!("gather index {i} out of range for a dimension of {n}")));
        }
        Ok(j as usize)
    };
    if along {
        // gather_along_axis: indices have x's rank; output has the indices' shape.
        let ist = strides(&ishape);
        let xst = strides(&x.shape);
        let mut offs = Vec::with_capacity(idx.len());
        for (flat, &i) in idx.iter().enumerate() {
            let mut o = 0;
            for d in 0..ishape.len() {
                let c = (flat / ist[d]) % ishape[d];
                o += if d == ax { check(i)? } else { c } * xst[d];
            }
            offs.push(o);
        }
        return Ok(take(x, ishape, &offs));
    }
    if inp.int("batch_dims", 0)? != 0 {
        return Err(bad("gather with batch_dims is not supported"));
    }
    if let (Data::Packed(p), 0) = (&x.data, ax) {
        // Embedding lookup in a compressed table: expand just the rows asked for.
        let cols = p.cols();
        let mut data = vec![0f32; idx.len() * cols];
        for (j, &i) in idx.iter().enumerate() {
            p.row_into(check(i)?, &mut data[j * cols..(j + 1) * cols]);
        }
        let mut shape = ishape.clone();
        shape.extend(&x.shape[1..]);
        return Ok(Value::f32(x.dtype, shape, data));
    }
    let mut offs = Vec::with_capacity(outer * idx.len() * inner);
    let resolved: Vec<usize> = idx.iter().map(|&i| check(i)).collect::<Result<_>>()?;
    for o in 0..outer {
        for &i in &resolved {
            offs.extend((0..inner).map(|k| (o * n + i) * inner + k));
        }
    }
    let mut shape = x.shape[..ax].to_vec();
    shape.extend(&ishape);
    shape.extend(&x.shape[ax + 1..]);
    Ok(take(x, shape, &offs))
}

fn concat(inp: &Inputs) -> Result<Value> {
    let values = inp.tuple("values");
    let first = values.first().ok_or_else(|| bad("concat of nothing"))?;
    if inp.boolean("interleave", false)? && values.len() > 1 {
        return Err(bad("concat with interleave is not supported"));
    }
    // coremltools concatenates scalars as length-1 vectors (e.g. the `end` of a dynamic slice).
    let shapes: Vec<&[usize]> = values.iter().map(|v| if v.rank() == 0 { &[1][..] } else { &v.shape[..] }).collect();
    let ax = norm_axis(inp.int("axis", 0)?, shapes[0].len())?;
    if let Some(s) = shapes.iter().find(|s| {
        s.len() != shapes[0].len() || s.iter().zip(shapes[0]).enumerate().any(|(d, (a, b))| d != ax && a != b)
    }) {
        return Err(bad(format!("concat of shapes {:?} and {s:?} along axis {ax}", shapes[0])));
    }
    let outer: usize = shapes[0][..ax].iter().product();
    let mut shape = shapes[0].to_vec();
    shape[ax] = shapes.iter().map(|s| s[ax]).sum();
    let mut data = match &first.data {
        Data::F32(_) => Data::F32(Vec::new()),
        Data::I32(_) => Data::I32(Vec::new()),
        Data::Bool(_) => Data::Bool(Vec::new()),
        Data::Str(_) | Data::Packed(_) => return Err(bad("concat of strings or compressed weights")),
    };
    for o in 0..outer {
        for (v, s) in values.iter().zip(&shapes) {
            let block: usize = s[ax..].iter().product();
            match (&mut data, &v.data) {
                (Data::F32(d), Data::F32(s)) => d.extend_from_slice(&s[o * block..(o + 1) * block]),
                (Data::I32(d), Data::I32(s)) => d.extend_from_slice(&s[o * block..(o + 1) * block]),
                (Data::Bool(d), Data::Bool(s)) => d.extend_from_slice(&s[o * block..(o + 1) * block]),
                _ => return Err(bad("concat values differ in type")),
            }
        }
    }
    Ok(Value { dtype: first.dtype, shape, data })
}

fn split(inp: &Inputs, x: &Value) -> Result<Vec<Value>> {
    let ax = norm_axis(inp.int("axis", 0)?, x.rank())?;
    let sizes: Vec<usize> = match inp.ints_or("split_sizes")? {
        Some(s) => s.into_iter().map(|v| v.max(0) as usize).collect(),
        None => {
            let n = inp.int("num_splits", 1)?.max(1) as usize;
            vec![x.shape[ax] / n; n]
        }
    };
    let mut start = 0;
    let mut out = Vec::new();
    for size in sizes {
        let dims: Vec<Vec<usize>> = (0..x.rank())
            .map(|d| if d == ax { (start..start + size).collect() } else { (0..x.shape[d]).collect() })
            .collect();
        let (starts, run) = product_runs(&dims, &x.shape);
        out.push(take_runs(x, dims.iter().map(|d| d.len()).collect(), &starts, run));
        start += size;
    }
    Ok(out)
}

fn reshaped(x: &Value, shape: &[i64]) -> Result<Value> {
    let n = x.len();
    let mut out: Vec<usize> = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &s) in shape.iter().enumerate() {
        match s {
            -1 => {
                infer = Some(i);
                out.push(1);
            }
            0 => out.push(*x.shape.get(i).ok_or_else(|| bad("reshape: 0 past the input rank"))?),
            s if s > 0 => out.push(s as usize),
            s => return Err(bad(format!("reshape: invalid dimension {s}"))),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !n.is_multiple_of(known) {
            return Err(bad(format!("cannot reshape {:?} to {shape:?}", x.shape)));
        }
        out[i] = n / known;
    }
    if out.iter().product::<usize>() != n {
        return Err(bad(format!("cannot reshape {:?} to {shape:?}", x.shape)));
    }
    Ok(Value { dtype: x.dtype, shape: out, data: x.data.clone() })
}

fn tile(x: &Value, reps: &[i64]) -> Result<Value> {
    let shape: Vec<usize> = x.shape.iter().zip(reps).map(|(&d, &r)| d.saturating_mul(r.max(0) as usize)).collect();
    checked_len(&shape, &format_args!("tile of {:?} by {reps:?}", x.shape))?;
    let dims: Vec<Vec<usize>> = shape.iter().zip(&x.shape).map(|(&n, &d)| (0..n).map(|i| i % d).collect()).collect();
    let offs = product_offsets(&dims, &x.shape);
    Ok(take(x, shape, &offs))
}

fn pad(inp: &Inputs, x: &Value) -> Result<Value> {
    let p = inp.req("pad")?.ints()?;
    let mode =
        inp.get("mode").map(|m| m.string().map(str::to_string)).transpose()?.unwrap_or_else(|| "constant".into());
    if mode != "constant" {
        return Err(bad(format!("pad mode `{mode}` is not supported")));
    }
    let cval = inp.float("constant_val", 0.0)?;
    let k = p.len() / 2;
    let first = x.rank() - k;
    let mut shape = x.shape.clone();
    for j in 0..k {
        let padded = (x.shape[first + j] as i64).saturating_add(p[2 * j]).saturating_add(p[2 * j + 1]);
        shape[first + j] = padded.max(0) as usize;
    }
    let n = checked_len(&shape, &format_args!("pad of {:?} by {p:?}", x.shape))?;
    let ost = strides(&shape);
    let ist = strides(&x.shape);
    let v = x.as_f32()?;
    let mut out = vec![cval; n];
    for (flat, o) in out.iter_mut().enumerate() {
        let mut src = 0i64;
        let mut inside = true;
        for d in 0..shape.len() {
            let mut c = ((flat / ost[d]) % shape[d]) as i64;
            if d >= first {
                c -= p[2 * (d - first)];
            }
            if c < 0 || c >= x.shape[d] as i64 {
                inside = false;
                break;
            }
            src += c * ist[d] as i64;
        }
        if inside {
            *o = v[src as usize];
        }
    }
    Ok(Value::f32(x.dtype, shape, out))
}

fn select(inp: &Inputs) -> Result<Value> {
    let (c, a, b) = (inp.req("cond")?, inp.req("a")?, inp.req("b")?);
    let shape = broadcast_shape(&[&c.shape, &a.shape, &b.shape])?;
    let offs = broadcast_offsets(&shape, &[&c.shape, &a.shape, &b.shape]);
    let cv = c.as_bool()?;
    let data = match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => {
            Data::F32((0..offs[0].len()).map(|i| if cv[offs[0][i]] { x[offs[1][i]] } else { y[offs[2][i]] }).collect())
        }
        (Data::I32(x), Data::I32(y)) => {
            Data::I32((0..offs[0].len()).map(|i| if cv[offs[0][i]] { x[offs[1][i]] } else { y[offs[2][i]] }).collect())
        }
        (Data::Bool(x), Data::Bool(y)) => {
            Data::Bool((0..offs[0].len()).map(|i| if cv[offs[0][i]] { x[offs[1][i]] } else { y[offs[2][i]] }).collect())
        }
        _ => return Err(bad("select: a and b differ in type")),
    };
    Ok(Value { dtype: a.dtype, shape, data })
}

fn cast(x: &Value, to: &str) -> Result<Value> {
    let dtype = DType::from_name(to).ok_or_else(|| bad(format!("cast to unknown dtype `{to}`")))?;
    let v = x.to_f32_vec();
    Ok(match dtype {
        d if d.is_float() => Value::f32(d, x.shape.clone(), v),
        DType::Bool => Value::bool(x.shape.clone(), v.iter().map(|&a| a != 0.0).collect()),
        d => {
            let (lo, hi) = d.int_range().unwrap_or((i32::MIN as i64, i32::MAX as i64));
            let ints = match &x.data {
                Data::I32(i) => i.clone(),
                _ => v.iter().map(|&a| a as i32).collect(),
            };
            Value {
                dtype: d,
                shape: x.shape.clone(),
                data: Data::I32(ints.into_iter().map(|a| (a as i64).clamp(lo, hi) as i32).collect()),
            }
        }
    })
}

fn range_1d(inp: &Inputs) -> Result<Value> {
    let (s, e, st) = (inp.req("start")?, inp.req("end")?, inp.req("step")?);
    if let (Data::I32(a), Data::I32(b), Data::I32(c)) = (&s.data, &e.data, &st.data) {
        let (a, b, c) = (a[0], b[0], c[0]);
        if c == 0 {
            return Err(bad("range_1d step 0"));
        }
        let (a, b, c) = (a as i64, b as i64, c as i64);
        let n = if (b - a).signum() == c.signum() { ((b - a).abs() + c.abs() - 1) / c.abs() } else { 0 };
        let n = checked_len(&[n as usize], &format_args!("range_1d({a}, {b}, {c})"))?;
        return Ok(Value::i32(vec![n], (0..n as i64).map(|i| (a + i * c) as i32).collect()));
    }
    let (a, b, c) = (s.scalar_f32()?, e.scalar_f32()?, st.scalar_f32()?);
    if c == 0.0 {
        return Err(bad("range_1d step 0"));
    }
    let n = checked_len(&[((b - a) / c).ceil().max(0.0) as usize], &format_args!("range_1d({a}, {b}, {c})"))?;
    Ok(Value::f32(e.dtype, vec![n], (0..n).map(|i| a + i as f32 * c).collect()))
}

fn band_part(inp: &Inputs, x: &Value) -> Result<Value> {
    let (lower, upper) = (inp.int("lower", -1)?, inp.int("upper", -1)?);
    let r = x.rank();
    let (rows, cols) = (x.shape[r - 2] as i64, x.shape[r - 1] as i64);
    let keep: Vec<bool> = (0..x.len())
        .map(|i| {
            let n = (i as i64) % cols;
            let m = (i as i64 / cols) % rows;
            (lower < 0 || m - n <= lower) && (upper < 0 || n - m <= upper)
        })
        .collect();
    Ok(match &x.data {
        Data::F32(v) => {
            Value::f32(x.dtype, x.shape.clone(), v.iter().zip(&keep).map(|(&a, &k)| if k { a } else { 0.0 }).collect())
        }
        Data::I32(v) => Value {
            dtype: x.dtype,
            shape: x.shape.clone(),
            data: Data::I32(v.iter().zip(&keep).map(|(&a, &k)| if k { a } else { 0 }).collect()),
        },
        Data::Bool(v) => Value::bool(x.shape.clone(), v.iter().zip(&keep).map(|(&a, &k)| a && k).collect()),
        Data::Str(_) | Data::Packed(_) => return Err(bad("band_part of strings or compressed weights")),
    })
}

fn cumsum(inp: &Inputs, x: &Value) -> Result<Value> {
    let ax = norm_axis(inp.int("axis", 0)?, x.rank())?;
    let (exclusive, reverse) = (inp.boolean("exclusive", false)?, inp.boolean("reverse", false)?);
    let (outer, n, inner) = around(&x.shape, ax);
    let v = x.to_f32_vec();
    let mut out = vec![0f32; v.len()];
    for o in 0..outer {
        for i in 0..inner {
            let mut acc = 0f32;
            let order: Vec<usize> = if reverse { (0..n).rev().collect() } else { (0..n).collect() };
            for k in order {
                let at = (o * n + k) * inner + i;
                if exclusive {
                    out[at] = acc;
                    acc += v[at];
                } else {
                    acc += v[at];
                    out[at] = acc;
                }
            }
        }
    }
    if x.dtype == DType::Int32 {
        return Ok(Value::i32(x.shape.clone(), out.into_iter().map(|a| a as i32).collect()));
    }
    Ok(Value::f32(x.dtype, x.shape.clone(), out))
}

fn topk(inp: &Inputs, x: &Value) -> Result<Vec<Value>> {
    let ax = norm_axis(inp.int("axis", -1)?, x.rank())?;
    let k = inp.int("k", 1)?.max(0) as usize;
    let ascending = inp.boolean("ascending", false)?;
    let (outer, n, inner) = around(&x.shape, ax);
    let v = x.to_f32_vec();
    let (mut vals, mut idxs) = (vec![0f32; outer * k * inner], vec![0i32; outer * k * inner]);
    for o in 0..outer {
        for i in 0..inner {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| {
                let (va, vb) = (v[(o * n + a) * inner + i], v[(o * n + b) * inner + i]);
                let c = va.partial_cmp(&vb).unwrap_or(std::cmp::Ordering::Equal);
                if ascending { c } else { c.reverse() }.then(a.cmp(&b))
            });
            for (j, &src) in order.iter().take(k).enumerate() {
                vals[(o * k + j) * inner + i] = v[(o * n + src) * inner + i];
                idxs[(o * k + j) * inner + i] = src as i32;
            }
        }
    }
    let mut shape = x.shape.clone();
    shape[ax] = k;
    let values = if x.dtype == DType::Int32 {
        Value::i32(shape.clone(), vals.into_iter().map(|a| a as i32).collect())
    } else {
        Value::f32(x.dtype, shape.clone(), vals)
    };
    let mut out = vec![values];
    if inp.boolean("return_indices", true)? {
        out.push(Value::i32(shape, idxs));
    }
    Ok(out)
}

/// A 1×1 convolution is a matrix product over channels (the Neural Engine's form of a linear
/// layer): per batch, out (C_out × HW) = W (C_out × C_in) · x (C_in × HW), through the matrix
/// kernel with the positions as rows, so compressed weights stay compressed.
fn pointwise_conv(inp: &Inputs, x: &Value, w: &Value, cout: usize) -> Result<Value> {
    let (nb, cin) = (x.shape[0], x.shape[1]);
    let hw = x.shape[2] * x.shape[3];
    let rows = match &w.data {
        Data::Packed(p) => WeightRows::of(p),
        _ => WeightRows::F32(w.as_f32()?),
    };
    let bias = inp.get("bias").map(|b| b.to_f32_vec());
    let xv = x.as_f32()?;
    let mut out = vec![0f32; nb * cout * hw];
    let (mut positions, mut product) = (vec![0f32; hw * cin], vec![0f32; hw * cout]);
    for b in 0..nb {
        transpose_into(&xv[b * cin * hw..(b + 1) * cin * hw], cin, hw, &mut positions);
        matmul_t(hw, cin, cout, &positions, rows, &mut product);
        let ob = &mut out[b * cout * hw..(b + 1) * cout * hw];
        transpose_into(&product, hw, cout, ob);
        if let Some(bv) = &bias {
            ob.chunks_mut(hw).zip(bv).for_each(|(row, &c)| row.iter_mut().for_each(|v| *v += c));
        }
    }
    let mut shape = x.shape.clone();
    shape[1] = cout;
    Ok(Value::f32(x.dtype, shape, out))
}

/// `src` (rows × cols) transposed into `dst` (cols × rows).
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(rows).with_min_len((PAR_MIN / rows.max(1)).max(1)).enumerate().for_each(|(c, out)| {
        for (r, v) in out.iter_mut().enumerate() {
            *v = src[r * cols + c];
        }
    });
}

fn conv(inp: &Inputs, x: &Value) -> Result<Value> {
    let w = inp.req("weight")?;
    if x.rank() != 4 {
        return Err(bad("only 2-D convolutions are supported"));
    }
    let (nb, cin, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (cout, cin_g, kh, kw) = (w.shape[0], w.shape[1], w.shape[2], w.shape[3]);
    let groups = inp.int("groups", 1)?.max(1) as usize;
    let strides = inp.ints_or("strides")?.unwrap_or_else(|| vec![1, 1]);
    let dil = inp.ints_or("dilations")?.unwrap_or_else(|| vec![1, 1]);
    let pad_type =
        inp.get("pad_type").map(|p| p.string().map(str::to_string)).transpose()?.unwrap_or_else(|| "valid".into());
    let positive = |v: &[i64], what: &str| match v {
        [a, b, ..] if *a > 0 && *b > 0 => Ok((*a as usize, *b as usize)),
        _ => Err(bad(format!("conv: {what} {v:?} must be two positive numbers"))),
    };
    let ((sh, sw), (dh, dw)) = (positive(&strides, "strides")?, positive(&dil, "dilations")?);
    if kh == 0 || kw == 0 {
        return Err(bad(format!("conv: empty kernel {:?}", w.shape)));
    }
    let (eh, ew) = (dh.saturating_mul(kh - 1).saturating_add(1), dw.saturating_mul(kw - 1).saturating_add(1));
    // Output length along one axis; a kernel wider than the padded input is an error.
    let out_len = |len: usize, pad: usize, extent: usize, stride: usize| {
        len.saturating_add(pad)
            .checked_sub(extent)
            .map(|d| d / stride + 1)
            .ok_or_else(|| bad(format!("conv: kernel extent {extent} exceeds the padded input {}", len + pad)))
    };
    let (pt, pl, oh, ow) = match pad_type.as_str() {
        "valid" => (0, 0, out_len(h, 0, eh, sh)?, out_len(wd, 0, ew, sw)?),
        "custom" => {
            let p = inp.req("pad")?.ints()?;
            let [pt, pb, pl, pr] = match p.as_slice() {
                &[a, b, c, d] if a >= 0 && b >= 0 && c >= 0 && d >= 0 => [a, b, c, d].map(|v| v as usize),
                _ => return Err(bad(format!("conv: pad {p:?} must be four non-negative numbers"))),
            };
            (pt, pl, out_len(h, pt + pb, eh, sh)?, out_len(wd, pl + pr, ew, sw)?)
        }
        "same" | "same_lower" => {
            let (oh, ow) = (h.div_ceil(sh), wd.div_ceil(sw));
            let th = ((oh - 1) * sh + eh).saturating_sub(h);
            let tw = ((ow - 1) * sw + ew).saturating_sub(wd);
            let lower = pad_type == "same_lower";
            (if lower { th.div_ceil(2) } else { th / 2 }, if lower { tw.div_ceil(2) } else { tw / 2 }, oh, ow)
        }
        other => return Err(bad(format!("conv pad_type `{other}` is not supported"))),
    };
    if cin_g * groups != cin {
        return Err(bad("conv: channels do not match groups"));
    }
    if (kh, kw, groups, sh, sw, pt, pl, oh, ow) == (1, 1, 1, 1, 1, 0, 0, h, wd) {
        return pointwise_conv(inp, x, w, cout);
    }
    let (xv, wv) = (x.as_f32()?, w.to_f32_vec());
    let bias = inp.get("bias").map(|b| b.to_f32_vec());
    let cout_g = cout / groups;
    let mut out = vec![0f32; checked_len(&[nb, cout, oh, ow], &"the conv result")?];
    for b in 0..nb {
        for co in 0..cout {
            let g = co / cout_g;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias.as_ref().map_or(0.0, |bv| bv[co]);
                    for ci in 0..cin_g {
                        let cin_idx = g * cin_g + ci;
                        for ky in 0..kh {
                            let iy = (oy * sh + ky * dh) as i64 - pt as i64;
                            if iy < 0 || iy >= h as i64 {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * sw + kx * dw) as i64 - pl as i64;
                                if ix < 0 || ix >= wd as i64 {
                                    continue;
                                }
                                acc += xv[((b * cin + cin_idx) * h + iy as usize) * wd + ix as usize]
                                    * wv[((co * cin_g + ci) * kh + ky) * kw + kx];
                            }
                        }
                    }
                    out[((b * cout + co) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    Ok(Value::f32(x.dtype, vec![nb, cout, oh, ow], out))
}

/// Computes an op's outputs from its inputs. It is given the op's name for the kernels several
/// ops share (`binary` serves `add`, `sub`, ...).
type Compute = fn(op: &str, inp: &Inputs) -> Result<Vec<Value>>;

/// One op the interpreter runs.
pub struct Kernel {
    pub op: &'static str,
    compute: Compute,
    /// Elementwise once its other parameters are scalars: one row of the output needs only the
    /// same row of `x` (what `Interpreter::predict_row` relies on).
    pub rowwise: bool,
}

impl Kernel {
    const fn new(op: &'static str, compute: Compute) -> Kernel {
        Kernel { op, compute, rowwise: false }
    }

    const fn rowwise(op: &'static str, compute: Compute) -> Kernel {
        Kernel { op, compute, rowwise: true }
    }

    pub fn run(&self, inp: &Inputs) -> Result<Vec<Value>> {
        (self.compute)(self.op, inp)
    }
}

/// The kernel of `op`, if the interpreter has one.
pub fn find(op: &str) -> Option<&'static Kernel> {
    KERNELS.iter().find(|k| k.op == op)
}

/// Every op the interpreter runs by a kernel; the planner handles `const`, `constexpr_*`,
/// `read_state` and `write_state` itself. A test checks these names against the format's op table.
pub static KERNELS: &[Kernel] = &[
    Kernel::rowwise("add", run_binary),
    Kernel::rowwise("sub", run_binary),
    Kernel::rowwise("mul", run_binary),
    Kernel::rowwise("real_div", run_binary),
    Kernel::new("pow", run_binary),
    Kernel::rowwise("maximum", run_binary),
    Kernel::rowwise("minimum", run_binary),
    Kernel::new("floor_div", run_binary),
    Kernel::new("mod", run_binary),
    Kernel::new("equal", run_compare),
    Kernel::new("not_equal", run_compare),
    Kernel::new("less", run_compare),
    Kernel::new("less_equal", run_compare),
    Kernel::new("greater", run_compare),
    Kernel::new("greater_equal", run_compare),
    Kernel::new("logical_and", run_logical),
    Kernel::new("logical_or", run_logical),
    Kernel::new("logical_xor", run_logical),
    Kernel::new("logical_not", run_unary),
    Kernel::new("softmax", |_, inp| one(softmax(inp.req("x")?, inp.int("axis", -1)?)?)),
    Kernel::new("linear", |_, inp| one(linear(inp.req("x")?, inp.req("weight")?, inp.get("bias"))?)),
    Kernel::new("matmul", |_, inp| one(matmul(inp)?)),
    Kernel::new("scaled_dot_product_attention", |_, inp| one(sdpa(inp)?)),
    Kernel::new("layer_norm", |_, inp| one(layer_norm(inp, inp.req("x")?)?)),
    Kernel::new("reduce_argmax", run_arg_reduce),
    Kernel::new("reduce_argmin", run_arg_reduce),
    Kernel::new("reduce_mean", run_reduce),
    Kernel::new("reduce_sum", run_reduce),
    Kernel::new("reduce_max", run_reduce),
    Kernel::new("reduce_min", run_reduce),
    Kernel::new("reduce_prod", run_reduce),
    Kernel::new("reduce_l1_norm", run_reduce),
    Kernel::new("reduce_l2_norm", run_reduce),
    Kernel::new("reduce_log_sum", run_reduce),
    Kernel::new("reduce_log_sum_exp", run_reduce),
    Kernel::new("reduce_sum_square", run_reduce),
    Kernel::new("reshape", |_, inp| one(reshaped(inp.req("x")?, &inp.req("shape")?.ints()?)?)),
    Kernel::new("transpose", |_, inp| one(transpose(inp.req("x")?, &inp.req("perm")?.ints()?)?)),
    Kernel::new("expand_dims", |_, inp| one(expand_dims(inp)?)),
    Kernel::new("squeeze", |_, inp| one(squeeze(inp)?)),
    Kernel::new("slice_by_index", |_, inp| one(slice_by_index(inp, inp.req("x")?)?)),
    Kernel::new("slice_by_size", |_, inp| one(slice_by_size(inp, inp.req("x")?)?)),
    Kernel::new("slice_update", |_, inp| one(slice_update(inp)?)),
    Kernel::new("gather", |_, inp| one(gather(inp, inp.req("x")?, false)?)),
    Kernel::new("gather_along_axis", |_, inp| one(gather(inp, inp.req("x")?, true)?)),
    Kernel::new("concat", |_, inp| one(concat(inp)?)),
    Kernel::new("stack", |_, inp| one(stack(inp)?)),
    Kernel::new("split", |_, inp| split(inp, inp.req("x")?)),
    Kernel::new("tile", |_, inp| one(tile(inp.req("x")?, &inp.req("reps")?.ints()?)?)),
    Kernel::new("pad", |_, inp| one(pad(inp, inp.req("x")?)?)),
    Kernel::new("select", |_, inp| one(select(inp)?)),
    Kernel::rowwise("cast", |_, inp| one(cast(inp.req("x")?, inp.req("dtype")?.string()?)?)),
    Kernel::new("shape", |_, inp| one(shape_of(inp.req("x")?))),
    Kernel::new("range_1d", |_, inp| one(range_1d(inp)?)),
    Kernel::new("fill", |_, inp| one(fill(inp)?)),
    Kernel::new("fill_like", |_, inp| one(fill_like(inp)?)),
    Kernel::new("band_part", |_, inp| one(band_part(inp, inp.req("x")?)?)),
    Kernel::new("cumsum", |_, inp| one(cumsum(inp, inp.req("x")?)?)),
    Kernel::new("topk", |_, inp| topk(inp, inp.req("x")?)),
    Kernel::new("conv", |_, inp| one(conv(inp, inp.req("x")?)?)),
    // Elementwise ops of one tensor (their other parameters are scalars).
    Kernel::rowwise("identity", run_unary),
    Kernel::rowwise("rsqrt", run_unary),
    Kernel::rowwise("log", run_unary),
    Kernel::rowwise("inverse", run_unary),
    Kernel::rowwise("gelu", run_unary),
    Kernel::rowwise("clip", run_unary),
    Kernel::rowwise("sin", run_unary),
    Kernel::rowwise("cos", run_unary),
    Kernel::rowwise("tan", run_unary),
    Kernel::rowwise("asin", run_unary),
    Kernel::rowwise("acos", run_unary),
    Kernel::rowwise("atan", run_unary),
    Kernel::rowwise("sinh", run_unary),
    Kernel::rowwise("cosh", run_unary),
    Kernel::rowwise("atanh", run_unary),
    Kernel::rowwise("exp", run_unary),
    Kernel::rowwise("exp2", run_unary),
    Kernel::rowwise("sqrt", run_unary),
    Kernel::rowwise("tanh", run_unary),
    Kernel::rowwise("sigmoid", run_unary),
    Kernel::rowwise("silu", run_unary),
    Kernel::rowwise("relu", run_unary),
    Kernel::rowwise("relu6", run_unary),
    Kernel::rowwise("erf", run_unary),
    Kernel::rowwise("floor", run_unary),
    Kernel::rowwise("ceil", run_unary),
    Kernel::rowwise("round", run_unary),
    Kernel::rowwise("sign", run_unary),
    Kernel::rowwise("abs", run_unary),
    Kernel::rowwise("square", run_unary),
    Kernel::rowwise("softplus", run_unary),
    Kernel::rowwise("softsign", run_unary),
];

fn one(v: Value) -> Result<Vec<Value>> {
    Ok(vec![v])
}

fn run_binary(op: &str, inp: &Inputs) -> Result<Vec<Value>> {
    one(binary(op, inp.req("x")?, inp.req("y")?)?)
}

fn run_compare(op: &str, inp: &Inputs) -> Result<Vec<Value>> {
    one(compare(op, inp.req("x")?, inp.req("y")?)?)
}

fn run_logical(op: &str, inp: &Inputs) -> Result<Vec<Value>> {
    one(logical(op, inp.req("x")?, inp.req("y")?)?)
}

fn run_arg_reduce(op: &str, inp: &Inputs) -> Result<Vec<Value>> {
    one(arg_reduce(op, inp, inp.req("x")?)?)
}

fn run_reduce(op: &str, inp: &Inputs) -> Result<Vec<Value>> {
    one(reduce(op, inp, inp.req("x")?)?)
}

fn run_unary(op: &str, inp: &Inputs) -> Result<Vec<Value>> {
    one(unary(op, inp, inp.req("x")?)?)
}

fn expand_dims(inp: &Inputs) -> Result<Value> {
    let x = inp.req("x")?;
    let axes = inp.req("axes")?.ints()?;
    let rank = x.rank() + axes.len();
    let mut pos: Vec<usize> = axes.iter().map(|&a| norm_axis(a, rank)).collect::<Result<_>>()?;
    pos.sort_unstable();
    let mut shape = x.shape.clone();
    for p in pos {
        shape.insert(p, 1);
    }
    Ok(Value { shape, ..x.clone() })
}

fn squeeze(inp: &Inputs) -> Result<Value> {
    let x = inp.req("x")?;
    let shape = match inp.ints_or("axes")? {
        Some(a) => {
            let axes: Vec<usize> = a.into_iter().map(|v| norm_axis(v, x.rank())).collect::<Result<_>>()?;
            x.shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
        }
        None => x.shape.iter().copied().filter(|&d| d != 1).collect(),
    };
    Ok(Value { shape, ..x.clone() })
}

/// `slice_update` on a copy of `x` (the executor updates in place when it can).
fn slice_update(inp: &Inputs) -> Result<Value> {
    let mut out = inp.req("x")?.clone();
    slice_update_in_place(inp, &mut out)?;
    Ok(out)
}

/// `stack` is a `concat` of the values, each given a new axis of length 1.
fn stack(inp: &Inputs) -> Result<Value> {
    let ax = inp.int("axis", 0)?;
    let values = inp.tuple("values");
    let expanded: Vec<Arc<Value>> = values
        .iter()
        .map(|v| {
            let a = norm_axis(ax, v.rank() + 1)?;
            let mut shape = v.shape.clone();
            shape.insert(a, 1);
            Ok(Arc::new(Value { shape, ..(*v).clone() }))
        })
        .collect::<Result<_>>()?;
    let map = [("values", expanded), ("axis", vec![Arc::new(Value::i32(vec![], vec![ax as i32]))])];
    concat(&Inputs { map: &map })
}

fn shape_of(x: &Value) -> Value {
    Value::i32(vec![x.rank()], x.shape.iter().map(|&d| d as i32).collect())
}

fn fill(inp: &Inputs) -> Result<Value> {
    let shape: Vec<usize> = inp.req("shape")?.ints()?.into_iter().map(|d| d.max(0) as usize).collect();
    let value = inp.get("value");
    let n = checked_len(&shape, &"fill")?;
    Ok(match value.map(|v| &v.data) {
        Some(Data::I32(v)) => Value::i32(shape, vec![v[0]; n]),
        Some(Data::Bool(v)) => Value::bool(shape, vec![v[0]; n]),
        _ => Value::f32(value.map_or(DType::Fp32, |v| v.dtype), shape, vec![inp.float("value", 0.0)?; n]),
    })
}

fn fill_like(inp: &Inputs) -> Result<Value> {
    let r = inp.req("ref_tensor")?;
    let v = inp.float("value", 0.0)?;
    Ok(Value::f32(inp.get("value").map_or(DType::Fp32, |v| v.dtype), r.shape.clone(), vec![v; r.len()]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(shape: &[usize], seed: u64) -> Value {
        let mut s = seed;
        let data = (0..shape.iter().product())
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Value::f32(DType::Fp32, shape.to_vec(), data)
    }

    fn try_call(op: &str, args: Vec<(&'static str, Value)>) -> Result<Value> {
        let bound: Vec<Bound> = args.into_iter().map(|(n, v)| (n, vec![Arc::new(v)])).collect();
        Ok(find(op).expect(op).run(&Inputs { map: &bound })?.remove(0))
    }

    fn call(op: &str, args: Vec<(&'static str, Value)>) -> Value {
        try_call(op, args).unwrap()
    }

    fn ints(v: &[i32]) -> Value {
        Value::i32(vec![v.len()], v.to_vec())
    }

    /// Shapes that come from a program's data (fill, tile, range_1d, pad, broadcasting) are
    /// checked before anything is allocated: past the machine, or overflowing, is an error that
    /// says so, not an abort or a wrapped size.
    #[test]
    fn sizes_from_data_are_checked_before_allocating() {
        let refused = |op: &str, args: Vec<(&'static str, Value)>| {
            let e = try_call(op, args).expect_err(op).to_string();
            assert!(e.contains("this machine can hold") || e.contains("more elements than memory"), "{op}: {e}");
        };
        let big = i32::MAX;
        refused("fill", vec![("shape", ints(&[big, big, big])), ("value", Value::f32(DType::Fp32, vec![], vec![1.0]))]);
        refused("tile", vec![("x", value(&[2, 2], 1)), ("reps", ints(&[big, big]))]);
        let scalar = |v: f32| Value::f32(DType::Fp32, vec![], vec![v]);
        refused("range_1d", vec![("start", scalar(0.0)), ("end", scalar(1e30)), ("step", scalar(1.0))]);
        refused("pad", vec![("x", value(&[2, 2], 1)), ("pad", ints(&[0, big, 0, big]))]);
        let (col, row) = (value(&[1 << 20, 1], 2), value(&[1, 1 << 20], 3));
        refused("add", vec![("x", col.clone()), ("y", row.clone())]);
        refused("matmul", vec![("x", col), ("y", row)]);
        // A range reaching i32::MAX ends (it used to wrap and loop).
        let r = call(
            "range_1d",
            vec![("start", ints(&[big - 2])), ("end", ints(&[big])), ("step", ints(&[5]))]
                .into_iter()
                .map(|(n, v)| (n, Value { shape: vec![], ..v }))
                .collect(),
        );
        assert_eq!(r.data, Data::I32(vec![big - 2]));
    }

    /// An attention mask that neither matches the queries nor broadcasts to them is an error
    /// (it used to index out of bounds): a (1, 1, 3, 8) mask for 4 queries over 8 keys.
    #[test]
    fn a_mask_of_the_wrong_shape_is_an_error() {
        let (q, kv) = (value(&[1, 2, 4, 8], 1), value(&[1, 2, 8, 8], 2));
        let attention = |mask: Value| {
            try_call(
                "scaled_dot_product_attention",
                vec![("query", q.clone()), ("key", kv.clone()), ("value", kv.clone()), ("attn_mask", mask)],
            )
        };
        let e = attention(value(&[1, 1, 3, 8], 3)).unwrap_err().to_string();
        assert!(e.contains("does not broadcast"), "{e}");
        assert!(attention(value(&[1, 1, 4, 8], 3)).is_ok());
        assert!(attention(value(&[1, 8], 3)).is_ok());
    }

    /// Transposes against index arithmetic: permutations that keep trailing axes in place
    /// (copied as runs), ones that move the last axis, and the identity.
    #[test]
    fn transpose_matches_index_arithmetic() {
        let shape = [2usize, 3, 4, 5];
        let x = value(&shape, 9);
        let xv = x.as_f32().unwrap();
        for perm in [[0usize, 2, 1, 3], [1, 0, 2, 3], [3, 2, 1, 0], [0, 1, 3, 2], [0, 1, 2, 3], [2, 0, 3, 1]] {
            let p = Value::i32(vec![4], perm.iter().map(|&a| a as i32).collect());
            let y = call("transpose", vec![("x", x.clone()), ("perm", p)]);
            let out_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
            assert_eq!(y.shape, out_shape);
            let yv = y.as_f32().unwrap();
            let st = strides(&shape);
            for (flat, &got) in yv.iter().enumerate() {
                let mut rest = flat;
                let mut src = 0;
                for d in (0..4).rev() {
                    src += (rest % out_shape[d]) * st[perm[d]];
                    rest /= out_shape[d];
                }
                assert_eq!(got, xv[src], "perm {perm:?} at {flat}");
            }
        }
    }

    /// The channels-first linear layer: a 1×1 conv over (B, C, 1, S), with a bias, against the
    /// sum it stands for.
    #[test]
    fn pointwise_conv_is_a_product_over_channels() {
        let (b, cin, cout, s) = (2, 24, 13, 37);
        let x = value(&[b, cin, 1, s], 1);
        let w = value(&[cout, cin, 1, 1], 2);
        let bias = value(&[cout], 3);
        let y = call("conv", vec![("x", x.clone()), ("weight", w.clone()), ("bias", bias.clone())]);
        assert_eq!(y.shape, [b, cout, 1, s]);
        let (xv, wv, bv, yv) = (x.as_f32().unwrap(), w.as_f32().unwrap(), bias.as_f32().unwrap(), y.as_f32().unwrap());
        for n in 0..b {
            for o in 0..cout {
                for p in 0..s {
                    let want: f64 = bv[o] as f64
                        + (0..cin).map(|c| wv[o * cin + c] as f64 * xv[(n * cin + c) * s + p] as f64).sum::<f64>();
                    let got = yv[(n * cout + o) * s + p] as f64;
                    assert!((got - want).abs() < 1e-5, "({n},{o},{p}): {got} vs {want}");
                }
            }
        }
    }

    /// layer_norm over the channels of (1, C, 1, S): each position normalized over C, scaled by
    /// gamma and shifted by beta per channel.
    #[test]
    fn layer_norm_over_a_leading_axis() {
        let (c, s) = (9, 11);
        let x = value(&[1, c, 1, s], 4);
        let (gamma, beta) = (value(&[c], 5), value(&[c], 6));
        let axes = Value::i32(vec![1], vec![1]);
        let eps = Value::f32(DType::Fp32, vec![], vec![1e-5]);
        let y = call(
            "layer_norm",
            vec![("x", x.clone()), ("axes", axes), ("gamma", gamma.clone()), ("beta", beta.clone()), ("epsilon", eps)],
        );
        let (xv, g, b, yv) =
            (x.as_f32().unwrap(), gamma.as_f32().unwrap(), beta.as_f32().unwrap(), y.as_f32().unwrap());
        for p in 0..s {
            let col: Vec<f64> = (0..c).map(|k| xv[k * s + p] as f64).collect();
            let mean = col.iter().sum::<f64>() / c as f64;
            let var = col.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / c as f64;
            for k in 0..c {
                let want = (col[k] - mean) / (var + 1e-5).sqrt() * g[k] as f64 + b[k] as f64;
                assert!((yv[k * s + p] as f64 - want).abs() < 1e-5, "({k},{p})");
            }
        }
    }
}
