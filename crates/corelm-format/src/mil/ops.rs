//! Op signatures (parameters, type domains, defaults, the opset each version starts in) and
//! output type inference. The builder uses them to check inputs and type outputs as ops are
//! added; the validator re-runs them over programs read from disk.

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
    pub domain: Domain,
    pub default: ParamDefault,
}

const fn req(name: &'static str, domain: Domain) -> Param {
    Param { name, required: true, constant: false, tuple: false, domain, default: ParamDefault::None }
}
const fn req_c(name: &'static str, domain: Domain) -> Param {
    Param { name, required: true, constant: true, tuple: false, domain, default: ParamDefault::None }
}
const fn tuple(name: &'static str, domain: Domain) -> Param {
    Param { name, required: true, constant: false, tuple: true, domain, default: ParamDefault::None }
}
const fn opt(name: &'static str, domain: Domain, default: ParamDefault) -> Param {
    Param { name, required: false, constant: false, tuple: false, domain, default }
}
const fn opt_c(name: &'static str, domain: Domain, default: ParamDefault) -> Param {
    Param { name, required: false, constant: true, tuple: false, domain, default }
}

pub type InferFn = fn(&Args) -> Result<Vec<TensorType>>;

/// One version of an op.
pub struct OpDef {
    pub name: &'static str,
    /// The first opset this version is in force.
    pub since: Target,
    pub params: Vec<Param>,
    /// Parameters serialized as attributes rather than inputs (iOS 16/17 `constexpr_*` forms).
    pub params_as_attributes: bool,
    pub infer: InferFn,
}

impl OpDef {
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
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
    Ok(vec![TensorType::new(dtype, reduced_dims(&x.dims, Some(vec![ax]), keep)?)])
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
    if !(1..=3).contains(&x.rank()) || w.rank() != 2 {
        return Err(bad(format!("linear needs x of rank 1..3 and a rank-2 weight, got {x} and {w}")));
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
    Tensor::from_floats(if w.dtype == Fp32 { Fp32 } else { Fp16 }, vec![out], &vec![0.0; out])
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
    Ok(vec![TensorType::new(x.dtype, idx.dims.clone())])
}

fn gather_nd(a: &Args) -> Result<Vec<TensorType>> {
    let (x, idx) = (a.ty("x")?, a.ty("indices")?);
    let bd = a.int("batch_dims").unwrap_or(0).max(0) as usize;
    let last =
        idx.dims.last().and_then(|d| d.fixed()).ok_or_else(|| bad("gather_nd: last indices dim must be fixed"))?;
    let mut dims = idx.dims[..idx.rank() - 1].to_vec();
    dims.extend_from_slice(x.dims.get(bd + last..).unwrap_or(&[]));
    Ok(vec![TensorType::new(x.dtype, dims)])
}

fn concat(a: &Args) -> Result<Vec<TensorType>> {
    // coremltools concatenates scalars as length-1 vectors.
    let values: Vec<TensorType> = a
        .tuple("values")
        .iter()
        .map(|v| if v.ty.rank() == 0 { TensorType::new(v.ty.dtype, vec![Dim::Fixed(1)]) } else { v.ty.clone() })
        .collect();
    let first = values.first().ok_or_else(|| bad("concat needs at least one value"))?;
    let ax = axis(a.const_ints("axis")?[0], first.rank())?;
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
    let ax = axis(a.const_ints("axis")?[0], first.rank() + 1)?;
    let mut dims = first.dims.clone();
    dims.insert(ax, Dim::Fixed(values.len()));
    Ok(vec![TensorType::new(first.dtype, dims)])
}

fn split(a: &Args) -> Result<Vec<TensorType>> {
    let x = a.ty("x")?;
    let ax = axis(a.const_ints("axis")?[0], x.rank())?;
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
    let x = a.ty("x")?;
    let shape_ty = a.ty("shape")?;
    let Some(shape) = a.ints("shape") else {
        let k = shape_ty.dims.first().and_then(|d| d.fixed()).ok_or_else(|| bad("reshape: shape length unknown"))?;
        return Ok(vec![TensorType::new(x.dtype, vec![Dim::Unknown; k])]);
    };
    let mut dims: Vec<Dim> = shape
        .iter()
        .enumerate()
        .map(|(i, &s)| match s {
            0 if shape.len() == x.rank() => Ok(x.dims[i]),
            0 => Ok(Dim::Unknown),
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
        // Listed axes go (they must be 1 at run time); unknown ones are taken to be 1.
        Some(v) => {
            let axes: Vec<usize> = v.into_iter().map(|v| axis(v, x.rank())).collect::<Result<_>>()?;
            if let Some(&i) = axes.iter().find(|&&i| matches!(x.dims[i], Dim::Fixed(n) if n != 1)) {
                return Err(bad(format!("cannot squeeze axis {i} of {x}: its size is not 1")));
            }
            x.dims.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, d)| *d).collect()
        }
        None => x.dims.iter().filter(|d| **d != Dim::Fixed(1)).copied().collect(),
    };
    Ok(vec![TensorType::new(x.dtype, dims)])
}

/// Python slice length for a known dimension.
fn slice_len(dim: usize, begin: i64, end: i64, stride: i64) -> usize {
    let d = dim as i64;
    let clamp = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
    let norm = |v: i64| if v < 0 { v + d } else { v };
    if stride > 0 {
        let (b, e) = (clamp(norm(begin), 0, d), clamp(norm(end), 0, d));
        if e > b {
            ((e - b + stride - 1) / stride) as usize
        } else {
            0
        }
    } else {
        let (b, e) = (clamp(norm(begin), -1, d - 1), clamp(norm(end), -1, d - 1));
        if b > e {
            ((b - e - stride - 1) / -stride) as usize
        } else {
            0
        }
    }
}

/// Output dims of `slice_by_index`/`slice_update` with Python semantics per dimension.
fn sliced_dims(a: &Args, x: &TensorType) -> Result<Vec<Dim>> {
    let r = x.rank();
    let mask = |name: &str| a.ints(name).unwrap_or_else(|| vec![0; r]);
    let (bm, em, sm) = (mask("begin_mask"), mask("end_mask"), mask("squeeze_mask"));
    let stride = a.ints("stride").unwrap_or_else(|| vec![1; r]);
    let (begin, end) = (a.ints("begin"), a.ints("end"));
    for (n, v) in [("begin_mask", &bm), ("end_mask", &em), ("squeeze_mask", &sm), ("stride", &stride)] {
        if v.len() != r {
            return Err(bad(format!("`{n}` has {} entries for rank {r}", v.len())));
        }
    }
    if stride.contains(&0) {
        return Err(bad("slice stride 0"));
    }
    let mut dims = Vec::new();
    for i in 0..r {
        if sm[i] != 0 {
            continue;
        }
        let d = match (x.dims[i], &begin, &end) {
            (Dim::Fixed(n), Some(b), Some(e)) if b.len() == r && e.len() == r => {
                let s = stride[i];
                let bi = if bm[i] != 0 {
                    if s > 0 {
                        0
                    } else {
                        -1
                    }
                } else {
                    b[i]
                };
                let ei = if em[i] != 0 {
                    if s > 0 {
                        n as i64
                    } else {
                        -(n as i64) - 1
                    }
                } else {
                    e[i]
                };
                Dim::Fixed(slice_len(n, bi, ei, s))
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
    let mut dims = x.dims.clone();
    dims[ax] = if k >= 0 { Dim::Fixed(k as usize) } else { Dim::Unknown };
    let idx = output_dtype(a, "output_indices_dtype", Int32)?;
    let mut out = vec![TensorType::new(x.dtype, dims.clone())];
    if a.boolean("return_indices").unwrap_or(true) {
        out.push(TensorType::new(idx, dims));
    }
    Ok(out)
}

fn conv(a: &Args) -> Result<Vec<TensorType>> {
    let (x, w) = (a.ty("x")?, a.ty("weight")?);
    if x.rank() < 3 || w.rank() != x.rank() {
        return Err(bad(format!("conv needs x (N, C, *spatial) and weight of the same rank: {x}, {w}")));
    }
    let spatial = x.rank() - 2;
    let ones = vec![1i64; spatial];
    let strides = a.ints("strides").unwrap_or_else(|| ones.clone());
    let dil = a.ints("dilations").unwrap_or_else(|| ones.clone());
    let pads = a.ints("pad").unwrap_or_else(|| vec![0; 2 * spatial]);
    let pad_type = a.string("pad_type").unwrap_or("valid");
    let mut dims = vec![x.dims[0], w.dims[0]];
    for i in 0..spatial {
        let d = match (x.dims[2 + i], w.dims[2 + i]) {
            (Dim::Fixed(n), Dim::Fixed(k)) => {
                let (s, dl) = (strides[i].max(1), dil[i].max(1));
                let n = n as i64;
                let eff = dl * (k as i64 - 1) + 1;
                Dim::Fixed(match pad_type {
                    "same" | "same_lower" => (n + s - 1) / s,
                    "custom" => (n + pads[2 * i] + pads[2 * i + 1] - eff) / s + 1,
                    _ => (n - eff) / s + 1,
                } as usize)
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
    let (idx, lut) = (a.ty("indices")?, a.ty("lut")?);
    if lut.rank() != idx.rank() + 2 {
        return Err(bad(format!("lut {lut} must have rank {} for indices {idx}", idx.rank() + 2)));
    }
    let bits = idx.dtype.bit_width().expect("index dtypes have widths");
    // Type checking reports a wrong index dtype separately; the entry count needs one that fits.
    if bits > 8 {
        return Err(bad(format!("lut indices must be uint1 to uint8, not {}", idx.dtype)));
    }
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
    if let Some(Dim::Fixed(v)) = lut.dims.last().copied().filter(|d| *d != Dim::Fixed(1)) {
        let ax = axis(
            a.int("vector_axis").ok_or_else(|| bad("vector_axis is required when the lut holds vectors"))?,
            idx.rank(),
        )?;
        dims[ax] = dims[ax].fixed().map_or(Dim::Unknown, |n| Dim::Fixed(n * v));
    }
    Ok(vec![TensorType::new(lut.dtype, dims)])
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
    Ok(vec![a.ty("source_val")?.with_dtype(dtype)])
}

fn sparse_to_dense(a: &Args) -> Result<Vec<TensorType>> {
    Ok(vec![a.ty("mask")?.with_dtype(a.ty("nonzero_data")?.dtype)])
}

fn lut_to_sparse(a: &Args) -> Result<Vec<TensorType>> {
    let mask = a.ty("indices_mask")?;
    Ok(vec![mask.clone(), TensorType::new(a.ty("lut")?.dtype, vec![Dim::Unknown])])
}

fn sparse_blockwise_shift_scale(a: &Args) -> Result<Vec<TensorType>> {
    let mask = a.ty("data_mask")?;
    let nz = a.ty("nonzero_data")?;
    Ok(vec![mask.clone(), nz.with_dtype(a.ty("scale")?.dtype)])
}

// ---------------------------------------------------------------- the registry

fn def(name: &'static str, since: Target, params: Vec<Param>, infer: InferFn) -> OpDef {
    OpDef { name, since, params, params_as_attributes: false, infer }
}

fn unary(name: &'static str, domain: &'static [DType]) -> OpDef {
    def(name, Target::Ios15, vec![req("x", t(domain))], same_as_x)
}

const BINARY_OPS: &[&str] = &["add", "sub", "mul", "real_div", "pow", "maximum", "minimum", "floor_div", "mod"];
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
    for &name in BINARY_OPS {
        ops.push(def(name, Ios15, vec![req("x", t(NUMERIC)), req("y", t(NUMERIC))], binary));
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
    ops.push(def("gelu", Ios15, vec![req("x", t(FLOAT)), opt_c("mode", free(STRING), D::Str("EXACT"))], same_as_x));
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
        vec![req("x", t(FLOAT)), req_c("weight", u(FLOAT)), opt_c("bias", u(FLOAT), D::Computed(linear_bias_default))],
        linear,
    ));
    ops.push(def(
        "gather",
        Ios15,
        vec![
            req("x", t(DATA)),
            req("indices", u(INDEX)),
            opt_c("axis", free(I32), D::Int(0)),
            opt_c("batch_dims", free(I32), D::Int(0)),
        ],
        gather,
    ));
    ops.push(def(
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
    ops.push(def(
        "concat",
        Ios15,
        vec![tuple("values", t(DATA)), req_c("axis", free(I32)), opt_c("interleave", free(BOOL), D::Bool(false))],
        concat,
    ));
    ops.push(def("stack", Ios15, vec![tuple("values", t(DATA)), req_c("axis", free(I32))], stack));
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
    ops.push(def("reshape", Ios15, vec![req("x", t(DATA)), req("shape", free(I32))], reshape));
    ops.push(def("transpose", Ios15, vec![req("x", t(DATA)), req_c("perm", free(I32))], transpose));
    ops.push(def("expand_dims", Ios15, vec![req("x", t(DATA)), req_c("axes", free(I32))], expand_dims));
    ops.push(def("squeeze", Ios15, vec![req("x", t(DATA)), opt_c("axes", free(I32), D::None)], squeeze));
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
    ops.push(def("slice_by_index", Ios15, p, slice_by_index));
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
    ops.push(def("cast", Ios15, vec![req("x", t(DATA)), req_c("dtype", free(STRING))], cast));
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
    ops.push(def("shape", Ios15, vec![req("x", free(DATA))], shape_op));
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
        same_as_x,
    ));
    ops.push(def(
        "topk",
        Ios17,
        vec![
            req("x", t(NUMERIC)),
            opt_c("k", free(I32), D::Int(1)),
            opt_c("axis", free(I32), D::Int(-1)),
            opt_c("ascending", free(BOOL), D::Bool(false)),
            opt_c("sort", free(BOOL), D::Bool(true)),
            opt_c("return_indices", free(BOOL), D::Bool(true)),
            opt_c("output_indices_dtype", free(STRING), D::Str("int32")),
        ],
        topk,
    ));
    ops.push(def("identity", Ios15, vec![req("x", free(ANY))], same_as_x));
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
    ops.push(def("read_state", Ios18, vec![req("input", free(DATA))], read_state));
    ops.push(def("write_state", Ios18, vec![req("input", t(DATA)), req("data", t(DATA))], write_state));
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
    let attr_form = |name, params, infer| OpDef { name, since: Ios16, params, params_as_attributes: true, infer };
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
