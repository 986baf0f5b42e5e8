//! Op signatures (parameters, type domains, defaults, the opset each version starts in), output
//! type inference and the folding of shape arithmetic. The builder uses them to check inputs and
//! type outputs as ops are added; the validator re-runs them over programs read from disk.

use std::collections::BTreeMap;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::mil::types::{Dim, TensorType};
use crate::target::Target;
use crate::tensor::Tensor;

use DType::{Bool, Fp16, Fp32, Int16, Int32, Int4, Int8, Uint1, Uint16, Uint2, Uint3, Uint32, Uint4, Uint6, Uint8};

/// Allowed dtypes of a parameter; parameters sharing a `group` letter must have equal dtypes.
#[derive(Clone, Copy, Debug)]
pub struct Domain {
    pub group: Option<char>,
    pub types: &'static [DType],
}

const FLOAT: &[DType] = &[Fp16, Fp32];
const NUMERIC: &[DType] = &[Fp16, Fp32, Int32];
const NUMERIC_BOOL: &[DType] = &[Fp16, Fp32, Int32, Bool];
const BOOL: &[DType] = &[Bool];
const I32: &[DType] = &[Int32];
const STRING: &[DType] = &[DType::String];
const DATA: &[DType] = &[Fp16, Fp32, Int32, Int16, Uint16, Int8, Uint8, Bool];
const INDEX: &[DType] = &[Int32, Int16, Uint16, Int8, Uint8];
const SLICE_INDEX: &[DType] = &[Int32, Int16, Int8];
const INDEX_IOS16: &[DType] = &[Int32, Uint16, Int16];
/// iOS 17's wider data types for topk's input (iOS17/tensor_operation.py).
const TOPK_DATA: &[DType] = &[Fp16, Fp32, Int8, Int16, Int32, Uint8, Uint16];
const QUANT_SRC: &[DType] = &[Int4, Uint4, Int8, Uint8, Fp16, Fp32];
const LUT_INDEX: &[DType] = &[Uint1, Uint2, Uint3, Uint4, Uint6, Uint8];
const LUT_VALUE: &[DType] = &[Int8, Uint8, Fp16, Fp32];
const MASK_BITS: &[DType] = &[Uint1];
const ANY: &[DType] =
    &[Fp16, Fp32, Int32, Int16, Uint16, Int8, Uint8, Bool, Int4, Uint4, Uint1, Uint2, Uint3, Uint6, Uint32];

const fn t(types: &'static [DType]) -> Domain {
    Domain { group: Some('T'), types }
}
const fn u(types: &'static [DType]) -> Domain {
    Domain { group: Some('U'), types }
}
const fn free(types: &'static [DType]) -> Domain {
    Domain { group: None, types }
}

/// The value an optional parameter takes when absent. Non-`None` defaults are written out
/// explicitly as `const` inputs by the builder, as coremltools does.
#[derive(Clone, Copy, Debug)]
pub enum ParamDefault {
    None,
    Bool(bool),
    Int(i32),
    Float(f32),
    Str(&'static str),
    /// Computed from the other arguments (e.g. `linear.bias` = zeros of the output width).
    Computed(fn(&Args) -> Result<Tensor>),
}

#[derive(Clone, Copy, Debug)]
pub struct Param {
    pub name: &'static str,
    pub required: bool,
    /// Must be a compile-time constant (a `const`/`constexpr_*` output or an inline value).
    pub constant: bool,
    /// A tuple parameter (`concat.values`): one binding per element.
    pub tuple: bool,
    /// Takes a state (`read_state.input`, `write_state.input`); no other parameter may.
    pub state: bool,
    pub domain: Domain,
    pub default: ParamDefault,
}

const fn req(name: &'static str, domain: Domain) -> Param {
    Param { name, required: true, constant: false, tuple: false, state: false, domain, default: ParamDefault::None }
}
const fn req_c(name: &'static str, domain: Domain) -> Param {
    Param { name, required: true, constant: true, tuple: false, state: false, domain, default: ParamDefault::None }
}
const fn tuple(name: &'static str, domain: Domain) -> Param {
    Param { name, required: true, constant: false, tuple: true, state: false, domain, default: ParamDefault::None }
}
const fn req_state(name: &'static str, domain: Domain) -> Param {
    Param { name, required: true, constant: false, tuple: false, state: true, domain, default: ParamDefault::None }
}
const fn opt(name: &'static str, domain: Domain, default: ParamDefault) -> Param {
    Param { name, required: false, constant: false, tuple: false, state: false, domain, default }
}
const fn opt_c(name: &'static str, domain: Domain, default: ParamDefault) -> Param {
    Param { name, required: false, constant: true, tuple: false, state: false, domain, default }
}

pub type InferFn = fn(&Args) -> Result<Vec<TensorType>>;

/// The integer values of an op's output from the constant values of its inputs, or `None`.
pub type FoldFn = fn(&Args) -> Option<Vec<i64>>;

/// One version of an op.
pub struct OpDef {
    pub name: &'static str,
    /// The first opset this version is in force.
    pub since: Target,
    pub params: Vec<Param>,
    /// Parameters serialized as attributes rather than inputs (iOS 16/17 `constexpr_*` forms).
    pub params_as_attributes: bool,
    pub infer: InferFn,
    /// Set on the small integer ops of shape arithmetic (`shape`, then slices, squeezes and sums
    /// of its result): what lets inference at concrete input shapes see through
    /// `range_1d(start, end)` to a concrete length.
    pub fold: Option<FoldFn>,
}

impl OpDef {
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    fn folding(self, fold: FoldFn) -> OpDef {
        OpDef { fold: Some(fold), ..self }
    }
}

/// What inference knows of one argument: its type, and its value when it is constant.
#[derive(Clone, Debug)]
pub struct ArgInfo {
    pub ty: TensorType,
    pub value: Option<Tensor>,
}

/// The arguments of one op being typed.
#[derive(Clone, Debug, Default)]
pub struct Args {
    pub args: BTreeMap<String, Vec<ArgInfo>>,
}

impl Args {
    pub fn get(&self, name: &str) -> Option<&ArgInfo> {
        self.args.get(name).and_then(|v| v.first())
    }

    pub fn ty(&self, name: &str) -> Result<&TensorType> {
        self.get(name).map(|a| &a.ty).ok_or_else(|| Error::invalid(format!("missing input `{name}`")))
    }

    pub fn tuple(&self, name: &str) -> &[ArgInfo] {
        self.args.get(name).map(|v| v.as_slice()).unwrap_or(&[])
    }

    pub fn value(&self, name: &str) -> Option<&Tensor> {
        self.get(name).and_then(|a| a.value.as_ref())
    }

    /// The constant integer values of `name`, if present and constant.
    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.value(name).and_then(|t| t.to_i64())
    }

    pub fn int(&self, name: &str) -> Option<i64> {
        self.ints(name).and_then(|v| v.first().copied())
    }

    pub fn boolean(&self, name: &str) -> Option<bool> {
        self.int(name).map(|v| v != 0)
    }

    pub fn string(&self, name: &str) -> Option<&str> {
        self.value(name).and_then(|t| t.strings()).and_then(|s| s.first()).map(|s| s.as_str())
    }

    /// A required constant integer list, with a clear error when missing or not constant.
    fn const_ints(&self, name: &str) -> Result<Vec<i64>> {
        self.ints(name).ok_or_else(|| Error::invalid(format!("`{name}` must be a constant integer tensor")))
    }

    /// A required constant integer (the first of its values).
    fn const_int(&self, name: &str) -> Result<i64> {
        self.const_ints(name)?.first().copied().ok_or_else(|| Error::invalid(format!("`{name}` is empty")))
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::invalid(msg)
}

/// Normalises a possibly negative axis against `rank`.
pub fn axis(value: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if value < 0 { value + r } else { value };
    if a < 0 || a >= r.max(1) {
        return Err(bad(format!("axis {value} is out of range for rank {rank}")));
    }
    Ok(a as usize)
}

/// Numpy broadcasting of several shapes; unknown dims broadcast against fixed ones optimistically.
pub fn broadcast(shapes: &[&[Dim]]) -> Result<Vec<Dim>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![Dim::Fixed(1); rank];
    for shape in shapes {
        let pad = rank - shape.len();
        for (i, &d) in shape.iter().enumerate() {
            let o = &mut out[pad + i];
            *o = match (*o, d) {
                (Dim::Fixed(1), x) | (x, Dim::Fixed(1)) => x,
                (Dim::Fixed(a), Dim::Fixed(b)) if a == b => Dim::Fixed(a),
                (Dim::Fixed(a), Dim::Fixed(b)) => {
                    return Err(bad(format!("shapes cannot be broadcast: {a} vs {b} at dim {}", pad + i)))
                }
                (Dim::Fixed(a), Dim::Unknown) | (Dim::Unknown, Dim::Fixed(a)) => Dim::Fixed(a),
                (Dim::Unknown, Dim::Unknown) => Dim::Unknown,
            };
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- inference functions

fn same_as_x(a: &Args) -> Result<Vec<TensorType>> {
    Ok(vec![a.ty("x")?.clone()])
}

fn binary(a: &Args) -> Result<Vec<TensorType>> {
    let (x, y) = (a.ty("x")?, a.ty("y")?);
    Ok(vec![TensorType::new(x.dtype, broadcast(&[&x.dims, &y.dims])?)])
}

fn compare(a: &Args) -> Result<Vec<TensorType>> {
    Ok(vec![binary(a)?.remove(0).with_dtype(Bool)])
}

fn select(a: &Args) -> Result<Vec<TensorType>> {
    let (c, x, y) = (a.ty("cond")?, a.ty("a")?, a.ty("b")?);
    Ok(vec![TensorType::new(x.dtype, broadcast(&[&c.dims, &x.dims, &y.dims])?)])
}

fn reduced_dims(dims: &[Dim], axes: Option<Vec<i64>>, keep: bool) -> Result<Vec<Dim>> {
    let axes: Vec<usize> = match axes {
        Some(list) => list.into_iter().map(|v| axis(v, dims.len())).collect::<Result<_>>()?,
        None => (0..dims.len()).collect(),
    };
    Ok(dims
        .iter()
        .enumerate()
        .filter_map(|(i, &d)| match (axes.contains(&i), keep) {
            (false, _) => Some(d),
            (true, true) => Some(Dim::Fixed(1)),
            (true, false) => None,
        })
        .collect())
}

fn reduce(a: &Args) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    let keep = a.boolean("keep_dims").unwrap_or(false);
    let axes = match a.get("axes") {
        Some(_) => Some(a.const_ints("axes")?),
        None => None,
    };
    Ok(vec![TensorType::new(x.dtype, reduced_dims(&x.dims, axes, keep)?)])
}

fn output_dtype(a: &Args, param: &str, default: DType) -> Result<DType> {
    match a.string(param) {
        Some(s) => DType::from_name(s).ok_or_else(|| bad(format!("`{param}`: unknown dtype \"{s}\""))),
        None => Ok(default),
    }
}

fn arg_reduce(a: &Args) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    let ax = a.int("axis").unwrap_or(-1);
    let keep = a.boolean("keep_dims").unwrap_or(false);
    let dtype = output_dtype(a, "output_dtype", Int32)?;
    if !matches!(dtype, Int32 | Uint16) {
        return Err(bad(format!("output_dtype must be int32 or uint16, not {dtype}")));
    }
    Ok(vec![TensorType::new(dtype, reduced_dims(&x.dims, Some(vec![ax]), keep)?)])
}

fn gelu(a: &Args) -> Result<Vec<TensorType>> {
    match a.string("mode") {
        None | Some("EXACT" | "TANH_APPROXIMATION" | "SIGMOID_APPROXIMATION") => same_as_x(a),
        Some(m) => Err(bad(format!("gelu: unknown mode \"{m}\""))),
    }
}

/// iOS 17's clip also wants alpha below beta (iOS17/elementwise_unary.py).
fn clip_ios17(a: &Args) -> Result<Vec<TensorType>> {
    let bound = |name: &str| a.value(name).and_then(|t| t.to_f64()).and_then(|v| v.first().copied());
    if let (Some(lo), Some(hi)) = (bound("alpha"), bound("beta")) {
        if lo >= hi {
            return Err(bad(format!("clip: alpha {lo} must be below beta {hi}")));
        }
    }
    same_as_x(a)
}

fn cumsum(a: &Args) -> Result<Vec<TensorType>> {
    axis(a.int("axis").unwrap_or(0), a.ty("x")?.rank())?;
    same_as_x(a)
}

fn matmul(a: &Args) -> Result<Vec<TensorType>> {
    let (x, y) = (a.ty("x")?, a.ty("y")?);
    let (tx, ty) = (a.boolean("transpose_x").unwrap_or(false), a.boolean("transpose_y").unwrap_or(false));
    let mut xd = x.dims.clone();
    let mut yd = y.dims.clone();
    if xd.is_empty() || yd.is_empty() {
        return Err(bad("matmul inputs must have rank >= 1"));
    }
    let (x1, y1) = (xd.len() == 1, yd.len() == 1);
    if x1 {
        xd.insert(0, Dim::Fixed(1));
    }
    if y1 {
        yd.push(Dim::Fixed(1));
    }
    let (xr, yr) = (xd.len(), yd.len());
    if tx {
        xd.swap(xr - 1, xr - 2);
    }
    if ty {
        yd.swap(yr - 1, yr - 2);
    }
    if let (Dim::Fixed(k1), Dim::Fixed(k2)) = (xd[xr - 1], yd[yr - 2]) {
        if k1 != k2 {
            return Err(bad(format!("matmul inner dimensions differ: {k1} vs {k2}")));
        }
    }
    let mut out = broadcast(&[&xd[..xr - 2], &yd[..yr - 2]])?;
    if !x1 {
        out.push(xd[xr - 2]);
    }
    if !y1 {
        out.push(yd[yr - 1]);
    }
    // With one constant operand the output takes the other's dtype (mixed-precision weights).
    let dtype = if a.get("x").is_some_and(|v| v.value.is_some()) { y.dtype } else { x.dtype };
    Ok(vec![TensorType::new(dtype, out)])
}

fn linear(a: &Args) -> Result<Vec<TensorType>> {
    let (x, w) = (a.ty("x")?, a.ty("weight")?);
    // Any rank of x: coremltools' type inference only reads its last dim, and its torch
    // frontend emits `linear` for inputs of every rank (iOS15/linear.py).
    if x.rank() == 0 || w.rank() != 2 {
        return Err(bad(format!("linear needs x of rank 1 or more and a rank-2 weight, got {x} and {w}")));
    }
    if let (Some(Dim::Fixed(din)), Dim::Fixed(wdin)) = (x.dims.last(), w.dims[1]) {
        if *din != wdin {
            return Err(bad(format!("linear: x has {din} input features, weight {wdin}")));
        }
    }
    if let Some(b) = a.get("bias") {
        if b.ty.rank() != 1 || (b.ty.dims[0] != w.dims[0] && b.ty.dims[0] != Dim::Unknown) {
            return Err(bad(format!("linear: bias {} does not match weight {w}", b.ty)));
        }
    }
    let mut dims = x.dims.clone();
    *dims.last_mut().expect("rank >= 1") = w.dims[0];
    Ok(vec![TensorType::new(x.dtype, dims)])
}

fn linear_bias_default(a: &Args) -> Result<Tensor> {
    let w = a.ty("weight")?;
    let out = w.dims.first().and_then(|d| d.fixed()).ok_or_else(|| bad("linear weight needs a fixed shape"))?;
    match w.dtype {
        Int32 => Tensor::from_i32(vec![out], &vec![0; out]),
        Fp32 => Tensor::from_floats(Fp32, vec![out], &vec![0.0; out]),
        _ => Tensor::from_floats(Fp16, vec![out], &vec![0.0; out]),
    }
}

fn layer_norm_axes_default(a: &Args) -> Result<Tensor> {
    let rank = a.ty("x")?.rank();
    Tensor::from_i32(vec![rank], &(0..rank as i32).collect::<Vec<_>>())
}

fn sdpa(a: &Args) -> Result<Vec<TensorType>> {
    let (q, k, v) = (a.ty("query")?, a.ty("key")?, a.ty("value")?);
    if q.rank() < 3 || k.rank() != q.rank() || v.rank() != q.rank() {
        return Err(bad(format!("query, key and value must share a rank >= 3: {q}, {k}, {v}")));
    }
    let r = q.rank();
    if let (Dim::Fixed(e1), Dim::Fixed(e2)) = (q.dims[r - 1], k.dims[r - 1]) {
        if e1 != e2 {
            return Err(bad(format!("query and key embedding sizes differ: {e1} vs {e2}")));
        }
    }
    if let (Dim::Fixed(s1), Dim::Fixed(s2)) = (k.dims[r - 2], v.dims[r - 2]) {
        if s1 != s2 {
            return Err(bad(format!("key and value sequence lengths differ: {s1} vs {s2}")));
        }
    }
    if let Some(mask) = a.get("attn_mask") {
        let mut scores = q.dims.clone();
        scores[r - 1] = k.dims[r - 2];
        broadcast(&[&scores, &mask.ty.dims])
            .map_err(|e| e.context(format!("attn_mask {} does not broadcast to the scores", mask.ty)))?;
    }
    let mut dims = q.dims.clone();
    dims[r - 1] = v.dims[r - 1];
    Ok(vec![TensorType::new(q.dtype, dims)])
}

fn gather(a: &Args) -> Result<Vec<TensorType>> {
    let (x, idx) = (a.ty("x")?, a.ty("indices")?);
    let ax = axis(a.int("axis").unwrap_or(0), x.rank())?;
    let bd = a.int("batch_dims").unwrap_or(0).max(0) as usize;
    let mut dims = x.dims[..ax].to_vec();
    dims.extend_from_slice(idx.dims.get(bd..).unwrap_or(&[]));
    dims.extend_from_slice(&x.dims[ax + 1..]);
    Ok(vec![TensorType::new(x.dtype, dims)])
}

fn gather_along_axis(a: &Args) -> Result<Vec<TensorType>> {
    let (x, idx) = (a.ty("x")?, a.ty("indices")?);
    if x.rank() != idx.rank() {
        return Err(bad("gather_along_axis: x and indices must have the same rank"));
    }
    let ax = axis(a.int("axis").unwrap_or(0), x.rank())?;
    for (i, (d, k)) in x.dims.iter().zip(&idx.dims).enumerate() {
        if let (Dim::Fixed(d), Dim::Fixed(k)) = (d, k) {
            if i != ax && d != k {
                return Err(bad(format!("gather_along_axis: x {x} and indices {idx} differ at dim {i}")));
            }
        }
    }
    Ok(vec![TensorType::new(x.dtype, idx.dims.clone())])
}

fn gather_nd(a: &Args) -> Result<Vec<TensorType>> {
    let (x, idx) = (a.ty("x")?, a.ty("indices")?);
    let bd = a.int("batch_dims").unwrap_or(0).max(0) as usize;
    let last =
        idx.dims.last().and_then(|d| d.fixed()).ok_or_else(|| bad("gather_nd: last indices dim must be fixed"))?;
    if bd + last > x.rank() {
        return Err(bad(format!("gather_nd: {last} index components and {bd} batch dims exceed the rank of {x}")));
    }
    let mut dims = idx.dims[..idx.rank() - 1].to_vec();
    dims.extend_from_slice(x.dims.get(bd + last..).unwrap_or(&[]));
    Ok(vec![TensorType::new(x.dtype, dims)])
}

fn concat(a: &Args) -> Result<Vec<TensorType>> {
    // coremltools concatenates scalars as length-1 vectors, whatever the axis.
    let all_scalars = a.tuple("values").iter().all(|v| v.ty.rank() == 0);
    let values: Vec<TensorType> = a
        .tuple("values")
        .iter()
        .map(|v| if v.ty.rank() == 0 { TensorType::new(v.ty.dtype, vec![Dim::Fixed(1)]) } else { v.ty.clone() })
        .collect();
    let first = values.first().ok_or_else(|| bad("concat needs at least one value"))?;
    let ax = a.const_int("axis")?;
    let ax = if all_scalars { 0 } else { axis(ax, first.rank())? };
    let mut total = Some(0usize);
    for v in &values {
        if v.rank() != first.rank() || v.dtype != first.dtype {
            return Err(bad(format!("concat values differ in rank or dtype: {v} vs {first}")));
        }
        total = match (total, v.dims[ax]) {
            (Some(t), Dim::Fixed(n)) => Some(t + n),
            _ => None,
        };
    }
    let mut dims = first.dims.clone();
    dims[ax] = total.map_or(Dim::Unknown, Dim::Fixed);
    Ok(vec![TensorType::new(first.dtype, dims)])
}

fn stack(a: &Args) -> Result<Vec<TensorType>> {
    let values = a.tuple("values");
    let first = &values.first().ok_or_else(|| bad("stack needs at least one value"))?.ty;
    let ax = axis(a.const_int("axis")?, first.rank() + 1)?;
    let mut dims = first.dims.clone();
    dims.insert(ax, Dim::Fixed(values.len()));
    Ok(vec![TensorType::new(first.dtype, dims)])
}

fn split(a: &Args) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    let ax = axis(a.const_int("axis")?, x.rank())?;
    let sizes: Vec<Dim> = if let Some(sizes) = a.ints("split_sizes") {
        sizes.into_iter().map(|s| Dim::Fixed(s.max(0) as usize)).collect()
    } else {
        let n = a.int("num_splits").ok_or_else(|| bad("split needs num_splits or split_sizes"))?;
        if n <= 0 {
            return Err(bad("num_splits must be positive"));
        }
        let part = match x.dims[ax] {
            Dim::Fixed(d) if d % n as usize == 0 => Dim::Fixed(d / n as usize),
            Dim::Fixed(d) => return Err(bad(format!("cannot split {d} into {n} equal parts"))),
            Dim::Unknown => Dim::Unknown,
        };
        vec![part; n as usize]
    };
    Ok(sizes
        .into_iter()
        .map(|s| {
            let mut dims = x.dims.clone();
            dims[ax] = s;
            TensorType::new(x.dtype, dims)
        })
        .collect())
}

fn reshape(a: &Args) -> Result<Vec<TensorType>> {
    reshape_with(a, false)
}

/// iOS 17's reshape: a 0 copies the dim of x at the same place counted from the end (1 past
/// x's rank), so the ranks may differ (iOS17/tensor_transformation.py).
fn reshape_ios17(a: &Args) -> Result<Vec<TensorType>> {
    reshape_with(a, true)
}

fn reshape_with(a: &Args, zeros_from_end: bool) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    let shape_ty = a.ty("shape")?;
    let Some(shape) = a.ints("shape") else {
        let k = shape_ty.dims.first().and_then(|d| d.fixed()).ok_or_else(|| bad("reshape: shape length unknown"))?;
        return Ok(vec![TensorType::new(x.dtype, vec![Dim::Unknown; k])]);
    };
    if shape.contains(&0) && shape.len() != x.rank() && !zeros_from_end {
        return Err(bad(format!("reshape: a 0 in shape {shape:?} needs it to have the rank of {x}")));
    }
    let mut dims: Vec<Dim> = shape
        .iter()
        .enumerate()
        .map(|(i, &s)| match s {
            0 => {
                let from_end = shape.len() - 1 - i;
                Ok(if from_end < x.rank() { x.dims[x.rank() - 1 - from_end] } else { Dim::Fixed(1) })
            }
            -1 => Ok(Dim::Unknown),
            s if s > 0 => Ok(Dim::Fixed(s as usize)),
            s => Err(bad(format!("reshape: invalid target dimension {s}"))),
        })
        .collect::<Result<_>>()?;
    let known_in: Option<usize> = x.dims.iter().map(|d| d.fixed()).product();
    if let Some(total) = known_in {
        let fixed: usize = dims.iter().filter_map(|d| d.fixed()).product();
        let unknown = dims.iter().filter(|d| **d == Dim::Unknown).count();
        if unknown == 0 && fixed != total {
            return Err(bad(format!("cannot reshape {x} ({total} elements) to {shape:?}")));
        }
        if unknown == 1 && shape.contains(&-1) {
            if fixed == 0 || total % fixed != 0 {
                return Err(bad(format!("cannot reshape {x} to {shape:?}")));
            }
            let i = dims.iter().position(|d| *d == Dim::Unknown).expect("one unknown");
            dims[i] = Dim::Fixed(total / fixed);
        }
    }
    Ok(vec![TensorType::new(x.dtype, dims)])
}

fn transpose(a: &Args) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    let perm = a.const_ints("perm")?;
    if perm.len() != x.rank() {
        return Err(bad(format!("perm {perm:?} does not match rank {}", x.rank())));
    }
    let mut seen = vec![false; x.rank()];
    let mut dims = Vec::with_capacity(x.rank());
    for &p in &perm {
        let p = axis(p, x.rank())?;
        if std::mem::replace(&mut seen[p], true) {
            return Err(bad(format!("perm {perm:?} repeats an axis")));
        }
        dims.push(x.dims[p]);
    }
    Ok(vec![TensorType::new(x.dtype, dims)])
}

fn expand_dims(a: &Args) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    let axes = a.const_ints("axes")?;
    let rank = x.rank() + axes.len();
    let mut positions: Vec<usize> = axes.iter().map(|&v| axis(v, rank)).collect::<Result<_>>()?;
    positions.sort_unstable();
    let mut dims = x.dims.clone();
    for p in positions {
        dims.insert(p, Dim::Fixed(1));
    }
    Ok(vec![TensorType::new(x.dtype, dims)])
}

fn squeeze(a: &Args) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    let dims = match a.ints("axes") {
        // As coremltools (iOS15/tensor_transformation.py): a listed axis goes when its size is
        // known to be 1; one of unknown size stays in the type (it is 1 at run time).
        Some(v) => {
            let axes: Vec<usize> = v.into_iter().map(|v| axis(v, x.rank())).collect::<Result<_>>()?;
            if let Some(&i) = axes.iter().find(|&&i| matches!(x.dims[i], Dim::Fixed(n) if n != 1)) {
                return Err(bad(format!("cannot squeeze axis {i} of {x}: its size is not 1")));
            }
            x.dims
                .iter()
                .enumerate()
                .filter(|&(i, d)| !(axes.contains(&i) && *d == Dim::Fixed(1)))
                .map(|(_, d)| *d)
                .collect()
        }
        None => x.dims.iter().filter(|d| **d != Dim::Fixed(1)).copied().collect(),
    };
    Ok(vec![TensorType::new(x.dtype, dims)])
}

/// The length coremltools gives one sliced dimension of known size `n` when begin and end are
/// constants (`solve_slice_by_index_shape` in ops/defs/_utils.py). It is Python's slice length
/// except at the edges: a begin past the end is an error, a size-1 dim always gives 1, and a
/// negative end is clamped at 0 before a negative stride walks down to it.
fn slice_len(n: usize, (b, e, s): (i64, i64, i64), (bm, em): (bool, bool)) -> Result<usize> {
    // Bounded so that no arithmetic below overflows on hostile inputs.
    let (b, e, s) = (bounded(b), bounded(e), bounded(s));
    let n = n as i64;
    if bm && em {
        return Ok(((n + s.abs() - 1) / s.abs()) as usize);
    }
    if !bm && !em {
        let mut out = None;
        if b >= 0 && e >= 0 && s > 0 {
            if e < b {
                return Err(bad(format!("slice: end {e} before begin {b} with stride {s}")));
            }
            out = Some(floor_div(e - b + s - 1, s).max(0));
        }
        if b < 0 && e < 0 && s < 0 {
            if b < e {
                return Err(bad(format!("slice: begin {b} before end {e} with stride {s}")));
            }
            out = Some(floor_div(-(b - e - s - 1), s).max(0));
        }
        if let Some(o @ (0 | 1)) = out {
            return Ok(o as usize);
        }
    }
    if !bm && em && ((b == 0 && s < 0) || (b == -1 && s > 0)) {
        return Ok(1);
    }
    if n == 1 {
        return Ok(1);
    }
    let b = if b < 0 { (b + n).max(0) } else { b };
    let e = if e < 0 { (e + n).max(0) } else { e };
    let (lo, hi) = if s > 0 { (0, n) } else { (-1, n - 1) };
    let (from, to, from_masked, to_masked) = if s > 0 { (b, e, bm, em) } else { (e, b, em, bm) };
    let from = if from_masked { lo } else { from };
    let to = if to_masked { hi } else { to.min(hi) };
    let span = to - from;
    Ok(if span <= 0 { 0 } else { ((span + s.abs() - 1) / s.abs()) as usize })
}

/// Output dims of `slice_by_index`/`slice_update` as coremltools infers them.
fn sliced_dims(a: &Args, x: &TensorType) -> Result<Vec<Dim>> {
    let r = x.rank();
    let mask = |name: &str| a.ints(name).unwrap_or_else(|| vec![0; r]);
    let (bm, em, sm) = (mask("begin_mask"), mask("end_mask"), mask("squeeze_mask"));
    let stride = a.ints("stride").unwrap_or_else(|| vec![1; r]);
    let (begin, end) = (a.ints("begin"), a.ints("end"));
    // coremltools reads one entry per dim: longer lists pass, shorter ones do not.
    for (n, v) in [("begin_mask", &bm), ("end_mask", &em), ("squeeze_mask", &sm), ("stride", &stride)] {
        if v.len() < r {
            return Err(bad(format!("`{n}` has {} entries for rank {r}", v.len())));
        }
    }
    for (n, v) in [("begin", &begin), ("end", &end)] {
        if let Some(v) = v.as_ref().filter(|v| v.len() != r) {
            return Err(bad(format!("`{n}` has {} entries for rank {r}", v.len())));
        }
    }
    if stride[..r].contains(&0) {
        return Err(bad("slice stride 0"));
    }
    let mut dims = Vec::new();
    for i in 0..r {
        if sm[i] != 0 {
            continue;
        }
        let d = match (x.dims[i], &begin, &end) {
            (Dim::Fixed(n), Some(b), Some(e)) => {
                Dim::Fixed(slice_len(n, (b[i], e[i], stride[i]), (bm[i] != 0, em[i] != 0))?)
            }
            (Dim::Fixed(n), _, _) if bm[i] != 0 && em[i] != 0 && stride[i] == 1 => Dim::Fixed(n),
            _ => Dim::Unknown,
        };
        dims.push(d);
    }
    Ok(dims)
}

fn slice_by_index(a: &Args) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    Ok(vec![TensorType::new(x.dtype, sliced_dims(a, x)?)])
}

fn slice_update(a: &Args) -> Result<Vec<TensorType>> {
    let (x, upd) = (a.ty("x")?, a.ty("update")?);
    if upd.rank() == 0 {
        return Err(bad("slice_update does not take a rank-0 update"));
    }
    let slice = sliced_dims(a, x)?;
    if slice.len() != upd.rank()
        || slice.iter().zip(&upd.dims).any(|(s, u)| matches!((s, u), (Dim::Fixed(p), Dim::Fixed(q)) if p != q))
    {
        return Err(bad(format!("update {upd} does not match the slice shape {slice:?}")));
    }
    Ok(vec![x.clone()])
}

fn slice_by_size(a: &Args) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    for name in ["begin", "size"] {
        let t = a.ty(name)?;
        if t.rank() != 1 || matches!(t.dims[0], Dim::Fixed(n) if n != x.rank()) {
            return Err(bad(format!("slice_by_size: `{name}` {t} must be a vector of one entry per dim of {x}")));
        }
    }
    let dims = match (a.ints("begin"), a.ints("size")) {
        (Some(b), Some(s)) if b.len() == x.rank() && s.len() == x.rank() => x
            .dims
            .iter()
            .enumerate()
            .map(|(i, d)| match (s[i], d) {
                (-1, Dim::Fixed(n)) => Dim::Fixed(n.saturating_sub(b[i].max(0) as usize)),
                (-1, Dim::Unknown) => Dim::Unknown,
                (v, _) => Dim::Fixed(v.max(0) as usize),
            })
            .collect(),
        (_, Some(s)) => s.iter().map(|&v| if v >= 0 { Dim::Fixed(v as usize) } else { Dim::Unknown }).collect(),
        _ => vec![Dim::Unknown; x.rank()],
    };
    Ok(vec![TensorType::new(x.dtype, dims)])
}

fn cast(a: &Args) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    let name = a.string("dtype").ok_or_else(|| bad("cast: `dtype` must be a constant string"))?;
    let dtype = match name {
        "int8" | "uint8" | "int16" | "uint16" | "int32" | "fp16" | "fp32" | "bool" => DType::from_name(name),
        _ => None,
    }
    .ok_or_else(|| bad(format!("cast: unsupported dtype \"{name}\"")))?;
    Ok(vec![x.with_dtype(dtype)])
}

fn shape_from_value(a: &Args, param: &str) -> Result<Vec<Dim>> {
    match a.ints(param) {
        Some(s) => Ok(s.into_iter().map(|v| Dim::Fixed(v.max(0) as usize)).collect()),
        None => {
            let k = a
                .ty(param)?
                .dims
                .first()
                .and_then(|d| d.fixed())
                .ok_or_else(|| bad(format!("`{param}` length unknown")))?;
            Ok(vec![Dim::Unknown; k])
        }
    }
}

fn fill(a: &Args) -> Result<Vec<TensorType>> {
    let dtype = a.get("value").map_or(Fp32, |v| v.ty.dtype);
    Ok(vec![TensorType::new(dtype, shape_from_value(a, "shape")?)])
}

fn fill_like(a: &Args) -> Result<Vec<TensorType>> {
    let dtype = a.get("value").map_or(Fp32, |v| v.ty.dtype);
    Ok(vec![a.ty("ref_tensor")?.with_dtype(dtype)])
}

fn range_1d(a: &Args) -> Result<Vec<TensorType>> {
    let end = a.ty("end")?;
    let len = match (a.value("start"), a.value("end"), a.value("step")) {
        (Some(s), Some(e), Some(st)) => {
            let f = |t: &Tensor| t.to_f64().and_then(|v| v.first().copied());
            match (f(s), f(e), f(st)) {
                (Some(s), Some(e), Some(st)) if st != 0.0 => Dim::Fixed(((e - s) / st).ceil().max(0.0) as usize),
                _ => return Err(bad("range_1d: step must be non-zero")),
            }
        }
        _ => Dim::Unknown,
    };
    Ok(vec![TensorType::new(end.dtype, vec![len])])
}

fn shape_op(a: &Args) -> Result<Vec<TensorType>> {
    Ok(vec![TensorType::fixed(Int32, &[a.ty("x")?.rank()])])
}

fn tile(a: &Args) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    let dims = match a.ints("reps") {
        Some(r) if r.iter().any(|&k| k <= 0) || r.is_empty() => {
            return Err(bad(format!("tile: reps {r:?} must be one positive count per dim")))
        }
        Some(r) if r.len() == x.rank() => x
            .dims
            .iter()
            .zip(&r)
            .map(|(d, &k)| d.fixed().map_or(Dim::Unknown, |n| Dim::Fixed(n * k.max(0) as usize)))
            .collect(),
        Some(r) => return Err(bad(format!("tile: reps {r:?} does not match rank {}", x.rank()))),
        None => vec![Dim::Unknown; x.rank()],
    };
    Ok(vec![TensorType::new(x.dtype, dims)])
}

fn pad(a: &Args) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    // coremltools' checks (iOS15/tensor_operation.py).
    let mode = a.string("mode").unwrap_or("constant");
    if !matches!(mode, "constant" | "reflect" | "replicate") {
        return Err(bad(format!("pad: unknown mode \"{mode}\"")));
    }
    let pad_ty = a.ty("pad")?;
    if pad_ty.rank() != 1 {
        return Err(bad(format!("pad: `pad` {pad_ty} must be a vector")));
    }
    if let (None, Dim::Fixed(n)) = (a.value("pad"), pad_ty.dims[0]) {
        if n != 2 * x.rank() {
            return Err(bad(format!("pad: a `pad` computed at run time needs {} values, not {n}", 2 * x.rank())));
        }
    }
    if let Some(v) = a.ints("pad").and_then(|p| p.into_iter().find(|&v| v < 0)) {
        return Err(bad(format!("pad: padding {v} must not be negative")));
    }
    let dims = match a.ints("pad") {
        Some(p) if p.len() % 2 == 0 && p.len() / 2 <= x.rank() => {
            let k = p.len() / 2;
            let first = x.rank() - k;
            x.dims
                .iter()
                .enumerate()
                .map(|(i, d)| match (i >= first, d) {
                    (true, Dim::Fixed(n)) => {
                        let j = i - first;
                        Dim::Fixed((*n as i64 + p[2 * j] + p[2 * j + 1]).max(0) as usize)
                    }
                    (true, Dim::Unknown) => Dim::Unknown,
                    (false, d) => *d,
                })
                .collect()
        }
        Some(p) => return Err(bad(format!("pad: {} values do not fit rank {}", p.len(), x.rank()))),
        None => vec![Dim::Unknown; x.rank()],
    };
    Ok(vec![TensorType::new(x.dtype, dims)])
}

fn topk(a: &Args) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    let ax = axis(a.int("axis").unwrap_or(-1), x.rank())?;
    let k = a.int("k").unwrap_or(1);
    if let Dim::Fixed(n) = x.dims[ax] {
        if k > n as i64 {
            return Err(bad(format!("topk: k = {k} is larger than axis {ax} of size {n}")));
        }
    }
    let mut dims = x.dims.clone();
    dims[ax] = if k >= 0 { Dim::Fixed(k as usize) } else { Dim::Unknown };
    let idx = output_dtype(a, "output_indices_dtype", Int32)?;
    if !matches!(idx, Int32 | Uint16) {
        return Err(bad(format!("topk: output_indices_dtype must be int32 or uint16, not {idx}")));
    }
    let mut out = vec![TensorType::new(x.dtype, dims.clone())];
    if a.boolean("return_indices").unwrap_or(true) {
        out.push(TensorType::new(idx, dims));
    }
    Ok(out)
}

/// Clamps a constant from the program to ±2^40, far beyond any real size, so that shape
/// arithmetic on it cannot overflow.
fn bounded(v: i64) -> i64 {
    v.clamp(-(1 << 40), 1 << 40)
}

/// Python's `//` (rounds toward negative infinity), as coremltools' shape formulas use it.
fn floor_div(a: i64, b: i64) -> i64 {
    let q = a / b;
    if a % b != 0 && ((a < 0) != (b < 0)) {
        q - 1
    } else {
        q
    }
}

fn conv(a: &Args) -> Result<Vec<TensorType>> {
    let (x, w) = (a.ty("x")?, a.ty("weight")?);
    // As coremltools (iOS15/conv.py): C_in is x's dim 1, x's and the weight's spatial dims pair up.
    if x.rank() < 2 || w.rank() != x.rank() {
        return Err(bad(format!("conv needs x (N, C, *spatial) and a weight of the same rank: {x}, {w}")));
    }
    let spatial = x.rank() - 2;
    let groups = a.int("groups").unwrap_or(1);
    if groups <= 0 {
        return Err(bad(format!("conv: groups must be positive, not {groups}")));
    }
    if let Dim::Fixed(c_in) = x.dims[1] {
        let g = groups as usize;
        if c_in % g != 0 {
            return Err(bad(format!("conv: x has {c_in} input channels, not divisible by {g} groups")));
        }
        if let Dim::Fixed(per_group) = w.dims[1] {
            if c_in / g != per_group {
                return Err(bad(format!(
                    "conv: x has {c_in} input channels; with {g} groups the weight needs {} per group, not {per_group}",
                    c_in / g
                )));
            }
        }
    }
    if let Some(b) = a.get("bias") {
        let fits = b.ty.rank() == 1
            && match (b.ty.dims[0], w.dims[0]) {
                (Dim::Fixed(n), Dim::Fixed(m)) => n == m,
                _ => true,
            };
        if !fits {
            return Err(bad(format!("conv: bias {} does not match the {} output channels of {w}", b.ty, w.dims[0])));
        }
    }
    let ints = |name: &str, default: Vec<i64>| a.ints(name).map_or(default, |v| v.into_iter().map(bounded).collect());
    let strides = ints("strides", vec![1; spatial]);
    let dil = ints("dilations", vec![1; spatial]);
    let pad_type = a.string("pad_type").unwrap_or("valid");
    if !matches!(pad_type, "valid" | "same" | "same_lower" | "custom") {
        return Err(bad(format!("conv: unknown pad_type \"{pad_type}\"")));
    }
    let pads = match pad_type {
        "custom" => ints("pad", vec![0; 2 * spatial]),
        _ => vec![0; 2 * spatial],
    };
    if strides.len() != spatial || dil.len() != spatial || pads.len() != 2 * spatial {
        return Err(bad(format!(
            "conv: {spatial} spatial dims, but {} strides, {} dilations and {} pad values",
            strides.len(),
            dil.len(),
            pads.len()
        )));
    }
    if let Some(s) = strides.iter().find(|&&s| s <= 0) {
        return Err(bad(format!("conv: stride {s} must be positive")));
    }
    let mut dims = vec![x.dims[0], w.dims[0]];
    for i in 0..spatial {
        let d = match (x.dims[2 + i], w.dims[2 + i]) {
            (Dim::Fixed(n), Dim::Fixed(k)) => {
                let (n, s) = (n as i64, strides[i]);
                let eff = dil[i] * (k as i64 - 1) + 1;
                // coremltools' aggregated padding and output size (_utils.py).
                let pad = match pad_type {
                    "same" | "same_lower" => (s * floor_div(n + s - 1, s) - n + eff - s).max(0),
                    "custom" => pads[2 * i] + pads[2 * i + 1],
                    _ => 0,
                };
                let out = floor_div(n + pad - eff, s) + 1;
                if out <= 0 {
                    return Err(bad(format!("conv: spatial dimension {i} has no output ({out}) for {x} and {w}")));
                }
                Dim::Fixed(out as usize)
            }
            _ => Dim::Unknown,
        };
        dims.push(d);
    }
    Ok(vec![TensorType::new(x.dtype, dims)])
}

fn read_state(a: &Args) -> Result<Vec<TensorType>> {
    Ok(vec![a.ty("input")?.clone()])
}

fn write_state(a: &Args) -> Result<Vec<TensorType>> {
    let (state, data) = (a.ty("input")?, a.ty("data")?);
    if !state.accepts(data) {
        return Err(bad(format!("write_state: data {data} does not match state {state}")));
    }
    Ok(vec![])
}

fn no_outputs_known(_: &Args) -> Result<Vec<TensorType>> {
    Err(bad("`const` takes its type from its value"))
}

fn blockwise_shift_scale(a: &Args) -> Result<Vec<TensorType>> {
    let (data, scale) = (a.ty("data")?, a.ty("scale")?);
    if data.rank() != scale.rank() {
        return Err(bad(format!("data {data} and scale {scale} must have the same rank")));
    }
    for (d, s) in data.dims.iter().zip(&scale.dims) {
        if let (Dim::Fixed(d), Dim::Fixed(s)) = (d, s) {
            if *s == 0 || d % s != 0 {
                return Err(bad(format!("scale {scale} does not divide data {data} into blocks")));
            }
        }
    }
    if let Some(off) = a.get("offset") {
        if off.ty.dims != scale.dims {
            return Err(bad(format!("offset {} must have the shape of scale {scale}", off.ty)));
        }
        if !off.ty.dtype.is_float() && off.ty.dtype != data.dtype {
            return Err(bad(format!("integer offset {} must have the dtype of data {}", off.ty.dtype, data.dtype)));
        }
    }
    Ok(vec![data.with_dtype(scale.dtype)])
}

fn lut_to_dense(a: &Args) -> Result<Vec<TensorType>> {
    let idx = a.ty("indices")?;
    Ok(vec![TensorType::new(a.ty("lut")?.dtype, lut_dims(a, idx)?)])
}

/// Checks `lut` against the indices it decodes (`idx`: their shape and dtype) and returns the
/// decoded shape: the indices' shape, times the vector size along `vector_axis`.
fn lut_dims(a: &Args, idx: &TensorType) -> Result<Vec<Dim>> {
    let lut = a.ty("lut")?;
    if lut.rank() != idx.rank() + 2 {
        return Err(bad(format!("lut {lut} must have rank {} for indices {idx}", idx.rank() + 2)));
    }
    // Type checking reports a wrong index dtype separately; the entry count needs one that fits.
    let bits = idx.dtype.bit_width().filter(|&b| b <= 8);
    let Some(bits) = bits else {
        return Err(bad(format!("lut indices must be uint1 to uint8, not {}", idx.dtype)));
    };
    if lut.dims[idx.rank()] != Dim::Fixed(1 << bits) {
        return Err(bad(format!("lut {lut} must hold {} entries for {} indices", 1 << bits, idx.dtype)));
    }
    for (d, g) in idx.dims.iter().zip(&lut.dims) {
        if let (Dim::Fixed(d), Dim::Fixed(g)) = (d, g) {
            if *g == 0 || d % g != 0 {
                return Err(bad(format!("lut groups {lut} do not divide indices {idx}")));
            }
        }
    }
    let mut dims = idx.dims.clone();
    if let Some(v) = lut_vector_size(lut) {
        let ax = axis(
            a.int("vector_axis").ok_or_else(|| bad("vector_axis is required when the lut holds vectors"))?,
            idx.rank(),
        )?;
        dims[ax] = dims[ax].fixed().map_or(Dim::Unknown, |n| Dim::Fixed(n * v));
    }
    Ok(dims)
}

/// The number of values per lut entry, when more than one.
fn lut_vector_size(lut: &TensorType) -> Option<usize> {
    lut.dims.last().and_then(|d| d.fixed()).filter(|&v| v != 1)
}

fn shape_attribute_output(a: &Args, dtype_from: &str) -> Result<Vec<TensorType>> {
    let shape = a.const_ints("shape")?;
    Ok(vec![TensorType::new(
        a.ty(dtype_from)?.dtype,
        shape.into_iter().map(|v| Dim::Fixed(v.max(0) as usize)).collect(),
    )])
}

fn lut_to_dense_ios16(a: &Args) -> Result<Vec<TensorType>> {
    shape_attribute_output(a, "lut")
}

fn sparse_to_dense_ios16(a: &Args) -> Result<Vec<TensorType>> {
    shape_attribute_output(a, "nonzero_data")
}

fn affine_dequantize(a: &Args) -> Result<Vec<TensorType>> {
    Ok(vec![a.ty("quantized_data")?.with_dtype(a.ty("scale")?.dtype)])
}

fn constexpr_cast(a: &Args) -> Result<Vec<TensorType>> {
    let dtype = output_dtype(a, "output_dtype", Fp32)?;
    if dtype != Fp32 {
        return Err(bad(format!("constexpr_cast only casts to fp32, not {dtype}")));
    }
    Ok(vec![a.ty("source_val")?.with_dtype(dtype)])
}

fn sparse_to_dense(a: &Args) -> Result<Vec<TensorType>> {
    Ok(vec![a.ty("mask")?.with_dtype(a.ty("nonzero_data")?.dtype)])
}

fn lut_to_sparse(a: &Args) -> Result<Vec<TensorType>> {
    let (mask, nonzero, lut) = (a.ty("indices_mask")?, a.ty("indices_nonzero_data")?, a.ty("lut")?);
    // The mask grows along vector_axis and each non-zero index becomes a vector of values,
    // as in coremltools (iOS18/compression.py).
    let mask_dims = lut_dims(a, &mask.with_dtype(nonzero.dtype))?;
    let v = lut_vector_size(lut).unwrap_or(1);
    let values = nonzero.dims.iter().map(|d| d.fixed().map_or(Dim::Unknown, |n| Dim::Fixed(n * v))).collect();
    Ok(vec![TensorType::new(mask.dtype, mask_dims), TensorType::new(lut.dtype, values)])
}

fn sparse_blockwise_shift_scale(a: &Args) -> Result<Vec<TensorType>> {
    let mask = a.ty("data_mask")?;
    let nz = a.ty("nonzero_data")?;
    Ok(vec![mask.clone(), nz.with_dtype(a.ty("scale")?.dtype)])
}

// ---------------------------------------------------------------- folding shape arithmetic

fn fold_shape(a: &Args) -> Option<Vec<i64>> {
    Some(a.ty("x").ok()?.shape()?.iter().map(|&d| d as i64).collect())
}

/// Ops that keep the values of `x` (squeeze, expand_dims, reshape, identity, cast).
fn fold_values_of_x(a: &Args) -> Option<Vec<i64>> {
    a.ints("x")
}

fn fold_gather(a: &Args) -> Option<Vec<i64>> {
    if a.int("axis").unwrap_or(0) != 0 || a.int("batch_dims").unwrap_or(0) != 0 {
        return None;
    }
    let x = a.ints("x")?;
    let n = x.len() as i64;
    a.ints("indices")?.iter().map(|&i| x.get((if i < 0 { i + n } else { i }) as usize).copied()).collect()
}

fn fold_slice_by_index(a: &Args) -> Option<Vec<i64>> {
    let x = a.ints("x")?;
    let strided = a.ints("stride").is_some_and(|s| s.iter().any(|&v| v != 1));
    let masked =
        ["begin_mask", "end_mask", "squeeze_mask"].iter().any(|m| a.ints(m).is_some_and(|v| v.iter().any(|&b| b != 0)));
    let (begin, end) = (*a.ints("begin")?.first()?, *a.ints("end")?.first()?);
    let n = x.len() as i64;
    let at = |v: i64| if v < 0 { (v + n).clamp(0, n) } else { v.min(n) } as usize;
    if strided || masked || at(begin) > at(end) {
        return None;
    }
    Some(x[at(begin)..at(end)].to_vec())
}

/// `x` and `y` combined elementwise, a single value broadcasting against a list.
fn fold_elementwise(a: &Args, f: fn(i64, i64) -> Option<i64>) -> Option<Vec<i64>> {
    let (x, y) = (a.ints("x")?, a.ints("y")?);
    let pick = |v: &[i64], i: usize| if v.len() == 1 { v[0] } else { v[i] };
    let n = x.len().max(y.len());
    if (x.len() != n && x.len() != 1) || (y.len() != n && y.len() != 1) {
        return None;
    }
    (0..n).map(|i| f(pick(&x, i), pick(&y, i))).collect()
}

fn fold_add(a: &Args) -> Option<Vec<i64>> {
    fold_elementwise(a, i64::checked_add)
}

fn fold_sub(a: &Args) -> Option<Vec<i64>> {
    fold_elementwise(a, i64::checked_sub)
}

fn fold_mul(a: &Args) -> Option<Vec<i64>> {
    fold_elementwise(a, i64::checked_mul)
}

fn fold_concat(a: &Args) -> Option<Vec<i64>> {
    Some(a.tuple("values").iter().map(|v| v.value.as_ref()?.to_i64()).collect::<Option<Vec<_>>>()?.concat())
}

// ---------------------------------------------------------------- the registry

fn def(name: &'static str, since: Target, params: Vec<Param>, infer: InferFn) -> OpDef {
    OpDef { name, since, params, params_as_attributes: false, infer, fold: None }
}

fn unary(name: &'static str, domain: &'static [DType]) -> OpDef {
    def(name, Target::Ios15, vec![req("x", t(domain))], same_as_x)
}

/// The binary ops, with the folding of those shape arithmetic uses.
const BINARY_OPS: &[(&str, Option<FoldFn>)] = &[
    ("add", Some(fold_add)),
    ("sub", Some(fold_sub)),
    ("mul", Some(fold_mul)),
    ("real_div", None),
    ("pow", None),
    ("maximum", None),
    ("minimum", None),
    ("floor_div", None),
    ("mod", None),
];
const COMPARE_OPS: &[&str] = &["equal", "not_equal", "less", "less_equal", "greater", "greater_equal"];
const LOGICAL_OPS: &[&str] = &["logical_and", "logical_or", "logical_xor"];
const FLOAT_UNARY_OPS: &[&str] = &[
    "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "atanh", "exp", "sqrt", "tanh", "sigmoid", "silu",
    "relu", "relu6", "erf", "floor", "ceil", "round", "softplus", "softsign",
];
const NUMERIC_UNARY_OPS: &[&str] = &["abs", "sign", "square", "exp2"];
const REDUCE_OPS: &[&str] = &[
    "reduce_mean",
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_l1_norm",
    "reduce_l2_norm",
    "reduce_log_sum",
    "reduce_log_sum_exp",
    "reduce_sum_square",
];

fn registry() -> Vec<OpDef> {
    use ParamDefault as D;
    use Target::*;
    let mut ops = Vec::new();
    for &(name, fold) in BINARY_OPS {
        ops.push(OpDef { fold, ..def(name, Ios15, vec![req("x", t(NUMERIC)), req("y", t(NUMERIC))], binary) });
    }
    for &name in COMPARE_OPS {
        ops.push(def(name, Ios15, vec![req("x", t(NUMERIC_BOOL)), req("y", t(NUMERIC_BOOL))], compare));
    }
    for &name in LOGICAL_OPS {
        ops.push(def(name, Ios15, vec![req("x", t(BOOL)), req("y", t(BOOL))], compare));
    }
    ops.push(unary("logical_not", BOOL));
    for &name in FLOAT_UNARY_OPS {
        ops.push(unary(name, FLOAT));
    }
    for &name in NUMERIC_UNARY_OPS {
        ops.push(unary(name, NUMERIC));
    }
    for (name, eps) in [("rsqrt", 1e-12f32), ("log", 1e-45), ("inverse", 1e-4)] {
        ops.push(def(name, Ios15, vec![req("x", t(FLOAT)), opt_c("epsilon", u(FLOAT), D::Float(eps))], same_as_x));
    }
    ops.push(def(
        "clip",
        Ios15,
        vec![req("x", t(FLOAT)), req_c("alpha", u(FLOAT)), req_c("beta", u(FLOAT))],
        same_as_x,
    ));
    ops.push(def(
        "clip",
        Ios17,
        vec![req("x", t(FLOAT)), req_c("alpha", u(FLOAT)), req_c("beta", u(FLOAT))],
        clip_ios17,
    ));
    ops.push(def("gelu", Ios15, vec![req("x", t(FLOAT)), opt_c("mode", free(STRING), D::Str("EXACT"))], gelu));
    ops.push(def("softmax", Ios15, vec![req("x", t(FLOAT)), opt_c("axis", free(I32), D::Int(-1))], same_as_x));
    ops.push(def(
        "layer_norm",
        Ios15,
        vec![
            req("x", t(FLOAT)),
            opt_c("axes", free(I32), D::Computed(layer_norm_axes_default)),
            opt_c("gamma", u(FLOAT), D::None),
            opt_c("beta", u(FLOAT), D::None),
            opt_c("epsilon", u(FLOAT), D::Float(1e-5)),
        ],
        same_as_x,
    ));
    for &name in REDUCE_OPS {
        ops.push(def(
            name,
            Ios15,
            vec![
                req("x", t(NUMERIC)),
                opt_c("axes", free(I32), D::None),
                opt_c("keep_dims", free(BOOL), D::Bool(false)),
            ],
            reduce,
        ));
    }
    for name in ["reduce_argmax", "reduce_argmin"] {
        ops.push(def(
            name,
            Ios15,
            vec![
                req("x", t(NUMERIC)),
                opt_c("axis", free(I32), D::Int(-1)),
                opt_c("keep_dims", free(BOOL), D::Bool(false)),
            ],
            arg_reduce,
        ));
        ops.push(def(
            name,
            Ios17,
            vec![
                req("x", t(NUMERIC)),
                opt_c("axis", free(I32), D::Int(-1)),
                opt_c("keep_dims", free(BOOL), D::Bool(false)),
                opt_c("output_dtype", free(STRING), D::Str("int32")),
            ],
            arg_reduce,
        ));
    }
    ops.push(def(
        "matmul",
        Ios15,
        vec![
            req("x", t(NUMERIC)),
            req("y", u(NUMERIC)),
            opt_c("transpose_x", free(BOOL), D::Bool(false)),
            opt_c("transpose_y", free(BOOL), D::Bool(false)),
        ],
        matmul,
    ));
    ops.push(def(
        "linear",
        Ios15,
        vec![
            req("x", t(NUMERIC)),
            req_c("weight", u(NUMERIC)),
            opt_c("bias", u(NUMERIC), D::Computed(linear_bias_default)),
        ],
        linear,
    ));
    ops.push(
        def(
            "gather",
            Ios15,
            vec![
                req("x", t(DATA)),
                req("indices", u(INDEX)),
                opt_c("axis", free(I32), D::Int(0)),
                opt_c("batch_dims", free(I32), D::Int(0)),
            ],
            gather,
        )
        .folding(fold_gather),
    );
    ops.push(
        def(
            "gather",
            Ios17,
            vec![
                req("x", t(DATA)),
                req("indices", u(INDEX)),
                opt_c("axis", free(I32), D::Int(0)),
                opt_c("batch_dims", free(I32), D::Int(0)),
                opt_c("validate_indices", free(BOOL), D::Bool(false)),
            ],
            gather,
        )
        .folding(fold_gather),
    );
    // iOS 15 has gather_along_axis and gather_nd with int32 indices; iOS 16 adds int16/uint16
    // indices and gather_nd's batch_dims (iOS15/ and iOS16/scatter_gather.py).
    ops.push(def(
        "gather_along_axis",
        Ios15,
        vec![req("x", t(NUMERIC)), req("indices", u(I32)), opt_c("axis", free(I32), D::Int(0))],
        gather_along_axis,
    ));
    ops.push(def(
        "gather_along_axis",
        Ios16,
        vec![req("x", t(NUMERIC)), req("indices", u(INDEX_IOS16)), opt_c("axis", free(I32), D::Int(0))],
        gather_along_axis,
    ));
    ops.push(def("gather_nd", Ios15, vec![req("x", t(NUMERIC)), req("indices", u(I32))], gather_nd));
    ops.push(def(
        "gather_nd",
        Ios16,
        vec![req("x", t(NUMERIC)), req("indices", u(INDEX_IOS16)), opt_c("batch_dims", free(I32), D::Int(0))],
        gather_nd,
    ));
    ops.push(def(
        "gather_along_axis",
        Ios17,
        vec![
            req("x", t(DATA)),
            req("indices", u(INDEX)),
            opt_c("axis", free(I32), D::Int(0)),
            opt_c("validate_indices", free(BOOL), D::Bool(false)),
        ],
        gather_along_axis,
    ));
    ops.push(def(
        "gather_nd",
        Ios17,
        vec![
            req("x", t(DATA)),
            req("indices", u(INDEX)),
            opt_c("batch_dims", free(I32), D::Int(0)),
            opt_c("validate_indices", free(BOOL), D::Bool(false)),
        ],
        gather_nd,
    ));
    ops.push(
        def(
            "concat",
            Ios15,
            // Tuples have no dtype domain in coremltools (TupleInputType), only equal dtypes.
            vec![tuple("values", t(ANY)), req_c("axis", free(I32)), opt_c("interleave", free(BOOL), D::Bool(false))],
            concat,
        )
        .folding(fold_concat),
    );
    ops.push(def("stack", Ios15, vec![tuple("values", t(ANY)), req_c("axis", free(I32))], stack));
    ops.push(def(
        "split",
        Ios15,
        vec![
            req("x", t(DATA)),
            opt_c("num_splits", free(I32), D::None),
            opt_c("split_sizes", free(I32), D::None),
            req_c("axis", free(I32)),
        ],
        split,
    ));
    ops.push(
        def("reshape", Ios15, vec![req("x", t(DATA)), req("shape", free(I32))], reshape).folding(fold_values_of_x),
    );
    ops.push(
        def("reshape", Ios17, vec![req("x", t(DATA)), req("shape", free(SLICE_INDEX))], reshape_ios17)
            .folding(fold_values_of_x),
    );
    ops.push(def("transpose", Ios15, vec![req("x", t(DATA)), req_c("perm", free(I32))], transpose));
    ops.push(
        def("expand_dims", Ios15, vec![req("x", t(DATA)), req_c("axes", free(I32))], expand_dims)
            .folding(fold_values_of_x),
    );
    ops.push(
        def("squeeze", Ios15, vec![req("x", t(DATA)), opt_c("axes", free(I32), D::None)], squeeze)
            .folding(fold_values_of_x),
    );
    let slice_masks = || {
        vec![
            opt_c("stride", u(SLICE_INDEX), D::None),
            opt_c("begin_mask", free(BOOL), D::None),
            opt_c("end_mask", free(BOOL), D::None),
            opt_c("squeeze_mask", free(BOOL), D::None),
        ]
    };
    let mut p = vec![req("x", t(DATA)), req("begin", u(SLICE_INDEX)), req("end", u(SLICE_INDEX))];
    p.extend(slice_masks());
    ops.push(def("slice_by_index", Ios15, p, slice_by_index).folding(fold_slice_by_index));
    let mut p =
        vec![req("x", t(DATA)), req("update", t(DATA)), req("begin", u(SLICE_INDEX)), req("end", u(SLICE_INDEX))];
    p.extend(slice_masks());
    ops.push(def("slice_update", Ios18, p, slice_update));
    ops.push(def(
        "slice_by_size",
        Ios15,
        vec![req("x", t(DATA)), req("begin", u(I32)), req("size", u(I32))],
        slice_by_size,
    ));
    // iOS 17: begin and size may be int8 or int16 too (iOS17/tensor_transformation.py).
    ops.push(def(
        "slice_by_size",
        Ios17,
        vec![req("x", t(DATA)), req("begin", u(SLICE_INDEX)), req("size", u(SLICE_INDEX))],
        slice_by_size,
    ));
    ops.push(def("cast", Ios15, vec![req("x", t(DATA)), req_c("dtype", free(STRING))], cast).folding(fold_values_of_x));
    ops.push(def(
        "band_part",
        Ios15,
        vec![req("x", t(NUMERIC_BOOL)), opt_c("lower", free(I32), D::Int(-1)), opt_c("upper", free(I32), D::Int(-1))],
        same_as_x,
    ));
    ops.push(def("fill", Ios15, vec![req("shape", free(I32)), opt_c("value", t(NUMERIC_BOOL), D::Float(0.0))], fill));
    ops.push(def(
        "fill_like",
        Ios16,
        vec![req("ref_tensor", free(DATA)), opt_c("value", t(NUMERIC_BOOL), D::Float(0.0))],
        fill_like,
    ));
    ops.push(def(
        "range_1d",
        Ios15,
        vec![req("end", t(NUMERIC)), req("start", t(NUMERIC)), req("step", t(NUMERIC))],
        range_1d,
    ));
    ops.push(def("shape", Ios15, vec![req("x", free(DATA))], shape_op).folding(fold_shape));
    ops.push(def(
        "select",
        Ios15,
        vec![req("cond", free(BOOL)), req("a", t(NUMERIC_BOOL)), req("b", t(NUMERIC_BOOL))],
        select,
    ));
    ops.push(def("tile", Ios15, vec![req("x", t(DATA)), req("reps", free(I32))], tile));
    ops.push(def(
        "pad",
        Ios15,
        vec![
            req("x", t(FLOAT)),
            req("pad", free(I32)),
            opt_c("mode", free(STRING), D::Str("constant")),
            opt_c("constant_val", t(FLOAT), D::Float(0.0)),
        ],
        pad,
    ));
    ops.push(def(
        "cumsum",
        Ios15,
        vec![
            req("x", t(NUMERIC)),
            opt_c("axis", free(I32), D::Int(0)),
            opt_c("exclusive", free(BOOL), D::Bool(false)),
            opt_c("reverse", free(BOOL), D::Bool(false)),
        ],
        cumsum,
    ));
    // topk is in iOS 15; iOS 16 adds sort and return_indices; iOS 17 small integer inputs, a
    // k of int8/int16/int32 and the indices' dtype (iOS15/, iOS16/, iOS17/tensor_operation.py).
    ops.push(def(
        "topk",
        Ios15,
        vec![
            req("x", t(NUMERIC)),
            opt_c("k", free(I32), D::Int(1)),
            opt_c("axis", free(I32), D::Int(-1)),
            opt_c("ascending", free(BOOL), D::Bool(false)),
        ],
        topk,
    ));
    ops.push(def(
        "topk",
        Ios16,
        vec![
            req("x", t(NUMERIC)),
            opt_c("k", free(I32), D::Int(1)),
            opt_c("axis", free(I32), D::Int(-1)),
            opt_c("ascending", free(BOOL), D::Bool(false)),
            opt_c("sort", free(BOOL), D::Bool(true)),
            opt_c("return_indices", free(BOOL), D::Bool(true)),
        ],
        topk,
    ));
    ops.push(def(
        "topk",
        Ios17,
        vec![
            req("x", t(TOPK_DATA)),
            opt_c("k", free(SLICE_INDEX), D::Int(1)),
            opt_c("axis", free(I32), D::Int(-1)),
            opt_c("ascending", free(BOOL), D::Bool(false)),
            opt_c("sort", free(BOOL), D::Bool(true)),
            opt_c("return_indices", free(BOOL), D::Bool(true)),
            opt_c("output_indices_dtype", free(STRING), D::Str("int32")),
        ],
        topk,
    ));
    ops.push(def("identity", Ios15, vec![req("x", free(ANY))], same_as_x).folding(fold_values_of_x));
    ops.push(def(
        "conv",
        Ios15,
        vec![
            req("x", t(FLOAT)),
            req("weight", u(FLOAT)),
            opt_c("bias", u(FLOAT), D::None),
            opt_c("strides", free(I32), D::None),
            opt_c("pad_type", free(STRING), D::Str("valid")),
            opt_c("pad", free(I32), D::None),
            opt_c("dilations", free(I32), D::None),
            opt_c("groups", free(I32), D::Int(1)),
        ],
        conv,
    ));
    // iOS 17 made the bias an ordinary input, no longer a constant (iOS17/conv.py).
    ops.push(def(
        "conv",
        Ios17,
        vec![
            req("x", t(FLOAT)),
            req("weight", u(FLOAT)),
            opt("bias", u(FLOAT), D::None),
            opt_c("strides", free(I32), D::None),
            opt_c("pad_type", free(STRING), D::Str("valid")),
            opt_c("pad", free(I32), D::None),
            opt_c("dilations", free(I32), D::None),
            opt_c("groups", free(I32), D::Int(1)),
        ],
        conv,
    ));
    ops.push(def("read_state", Ios18, vec![req_state("input", free(DATA))], read_state));
    ops.push(def("write_state", Ios18, vec![req_state("input", t(DATA)), req("data", t(DATA))], write_state));
    ops.push(def(
        "scaled_dot_product_attention",
        Ios18,
        vec![
            req("query", t(FLOAT)),
            req("key", t(FLOAT)),
            req("value", t(FLOAT)),
            opt("attn_mask", free(&[Bool, Fp16, Fp32]), D::None),
        ],
        sdpa,
    ));
    ops.push(def("const", Ios15, vec![], no_outputs_known));
    ops.push(def(
        "constexpr_blockwise_shift_scale",
        Ios18,
        vec![req_c("data", free(QUANT_SRC)), req_c("scale", free(FLOAT)), opt_c("offset", free(QUANT_SRC), D::None)],
        blockwise_shift_scale,
    ));
    ops.push(def(
        "constexpr_lut_to_dense",
        Ios18,
        vec![
            req_c("indices", free(LUT_INDEX)),
            req_c("lut", free(LUT_VALUE)),
            opt_c("vector_axis", free(I32), D::None),
        ],
        lut_to_dense,
    ));
    ops.push(def(
        "constexpr_sparse_to_dense",
        Ios18,
        vec![req_c("nonzero_data", free(ANY)), req_c("mask", free(MASK_BITS))],
        sparse_to_dense,
    ));
    ops.push(def(
        "constexpr_lut_to_sparse",
        Ios18,
        vec![
            req_c("indices_mask", free(MASK_BITS)),
            req_c("indices_nonzero_data", free(LUT_INDEX)),
            req_c("lut", free(LUT_VALUE)),
            opt_c("vector_axis", free(I32), D::None),
        ],
        lut_to_sparse,
    ));
    ops.push(def(
        "constexpr_sparse_blockwise_shift_scale",
        Ios18,
        vec![
            req_c("data_mask", free(MASK_BITS)),
            req_c("nonzero_data", free(QUANT_SRC)),
            req_c("scale", free(FLOAT)),
            opt_c("offset", free(QUANT_SRC), D::None),
        ],
        sparse_blockwise_shift_scale,
    ));
    let attr_form =
        |name, params, infer| OpDef { name, since: Ios16, params, params_as_attributes: true, infer, fold: None };
    ops.push(attr_form(
        "constexpr_affine_dequantize",
        vec![
            req_c("quantized_data", free(&[Int8, Uint8, Int4, Uint4])),
            req_c("zero_point", free(&[Int8, Uint8, Fp16, Fp32, Int4, Uint4])),
            req_c("scale", free(FLOAT)),
            req_c("axis", free(I32)),
        ],
        affine_dequantize,
    ));
    ops.push(attr_form(
        "constexpr_cast",
        vec![req_c("source_val", free(&[Fp16])), req_c("output_dtype", free(STRING))],
        constexpr_cast,
    ));
    ops.push(attr_form(
        "constexpr_lut_to_dense",
        vec![req_c("indices", free(&[Uint8])), req_c("lut", free(LUT_VALUE)), req_c("shape", free(&[Uint32]))],
        lut_to_dense_ios16,
    ));
    ops.push(attr_form(
        "constexpr_sparse_to_dense",
        vec![req_c("nonzero_data", free(ANY)), req_c("mask", free(&[Uint8])), req_c("shape", free(&[Uint32]))],
        sparse_to_dense_ios16,
    ));
    ops
}

/// All op versions, built once.
pub fn all_ops() -> &'static [OpDef] {
    static OPS: std::sync::OnceLock<Vec<OpDef>> = std::sync::OnceLock::new();
    OPS.get_or_init(registry)
}

/// The version of `name` in force at `target`, or an error saying why there is none.
pub fn lookup(name: &str, target: Target) -> Result<&'static OpDef> {
    let versions: Vec<&OpDef> = all_ops().iter().filter(|d| d.name == name).collect();
    if versions.is_empty() {
        return Err(bad(format!("unknown op `{name}`")));
    }
    versions.iter().filter(|d| d.since <= target).max_by_key(|d| d.since).copied().ok_or_else(|| {
        let first = versions.iter().map(|d| d.since).min().expect("non-empty");
        bad(format!("op `{name}` needs {first} or later, but the program targets {target}"))
    })
}

/// The constant a non-`None` default stands for. A float default takes the dtype of a bound
/// parameter of the same type group (so `pad.constant_val` matches `x`), else fp32.
pub fn default_value(def: &OpDef, param: &Param, args: &Args) -> Result<Option<Tensor>> {
    let group_dtype = param.domain.group.and_then(|g| {
        def.params
            .iter()
            .filter(|p| p.name != param.name && p.domain.group == Some(g))
            .find_map(|p| args.get(p.name).map(|a| a.ty.dtype))
    });
    Ok(match param.default {
        ParamDefault::None => None,
        ParamDefault::Bool(b) => Some(Tensor::scalar_bool(b)),
        ParamDefault::Int(i) => Some(Tensor::scalar_i32(i)),
        ParamDefault::Str(s) => Some(Tensor::scalar_string(s)),
        ParamDefault::Float(f) => match group_dtype {
            Some(d) if d.is_float() => Some(Tensor::from_floats(d, vec![], &[f as f64])?),
            _ => Some(Tensor::scalar_f32(f)),
        },
        ParamDefault::Computed(compute) => Some(compute(args)?),
    })
}

/// Checks each argument's dtype against its domain and the group rule.
pub fn check_domains(def: &OpDef, args: &Args) -> Result<()> {
    let mut groups: BTreeMap<char, (DType, &str)> = BTreeMap::new();
    for param in &def.params {
        for arg in args.args.get(param.name).map(|v| v.as_slice()).unwrap_or(&[]) {
            let dtype = arg.ty.dtype;
            if !param.domain.types.contains(&dtype) {
                let allowed: Vec<&str> = param.domain.types.iter().map(|d| d.name()).collect();
                return Err(bad(format!("`{}` is {dtype}; allowed: {}", param.name, allowed.join(", "))));
            }
            if let Some(g) = param.domain.group {
                match groups.get(&g) {
                    Some((first, other)) if *first != dtype => {
                        return Err(bad(format!(
                            "`{}` is {dtype} but `{other}` is {first}; they must have the same dtype",
                            param.name
                        )))
                    }
                    Some(_) => {}
                    None => {
                        groups.insert(g, (dtype, param.name));
                    }
                }
            }
        }
    }
    Ok(())
}
