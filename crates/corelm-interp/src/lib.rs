//! A reference interpreter for Core ML ML Programs. It runs any package on the CPU — ours and
//! coremltools' alike — so conversions can be checked without a Mac.
//!
//! Loading plans each function once: constants (and `constexpr_*` ops) are decoded, ops of
//! constants alone are evaluated, every variable gets a slot, and each slot is freed after its
//! last use. KV-cache states are updated in place when a `read_state → slice_update →
//! write_state` chain allows it. Floats are computed in f32 and rounded to fp16 wherever the
//! program types a value fp16, so results resemble the device's.

pub mod calibrate;
pub mod executor;
pub mod json;
pub mod kernels;
pub mod matmul;
pub mod value;
mod vmath;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use corelm_contract::weights::WeightMatrices;
use corelm_format::mil::program::{Binding, Function, Operation};
use corelm_format::model::{FeatureKind, Flexibility};
use corelm_format::package::BlobFiles;
use corelm_format::{DType, Dim, Package, TensorType, ValueType};
pub use corelm_format::{Error, Result};

use crate::kernels::{Inputs, Kernel};
use crate::value::{Data, Packed, Value};

enum Src {
    Slot(usize),
    Const(Arc<Value>),
}

enum Kind {
    Op(&'static Kernel),
    /// `take`: move the state out (it is rewritten before anything else reads it), so the
    /// `slice_update` that follows can work in place.
    ReadState {
        state: String,
        take: bool,
    },
    WriteState(String),
}

struct Step {
    kind: Kind,
    label: String,
    inputs: Vec<(String, Vec<Src>)>,
    outputs: Vec<(usize, TensorType)>,
    /// Slots whose last use is this step.
    free: Vec<usize>,
    /// Set on the steps that end in a function output and work row by row along `axis`, the
    /// output's second-to-last: when a caller wants one row of that output
    /// ([`Interpreter::predict_row`]), they compute only that row.
    row: Option<RowStep>,
    /// The constant weight of a `linear` or 1×1 `conv` step, by name, and where its input keeps
    /// the features (what calibration observes: [`calibrate`]).
    weight: Option<(String, Features)>,
}

#[derive(Clone, Copy)]
struct RowStep {
    axis: usize,
    /// The projection (`linear`, or `matmul` by a constant) that starts the chain: its `x` is
    /// cut to the one row before it runs. The steps after it are elementwise with scalars.
    cut: bool,
}

struct Plan {
    inputs: Vec<(String, usize, TensorType)>,
    states: Vec<(String, TensorType)>,
    steps: Vec<Step>,
    outputs: Vec<(String, usize)>,
    slots: usize,
    /// Values of `const`/`constexpr_*` outputs referenced by name.
    consts: Vec<(usize, Arc<Value>)>,
    flexible: HashMap<String, Flexibility>,
}

/// The states of one function (KV caches), kept across predictions.
#[derive(Default, Clone)]
pub struct State {
    values: BTreeMap<String, Arc<Value>>,
}

impl State {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name).map(|v| v.as_ref())
    }
}

/// Which axis of a layer's input holds the features its weight rows multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Features {
    /// The last (`linear`).
    Last,
    /// Axis 1 (a 1×1 `conv` over (B, C, H, W): the Neural Engine layout).
    Channels,
}

/// Sees each layer's input with its weight's name, for calibration ([`calibrate`]).
pub type Observer<'a> = dyn FnMut(&str, &Arc<Value>, Features) + Send + 'a;

pub struct Interpreter {
    plans: BTreeMap<String, Plan>,
    default: String,
}

fn context(f: &str, op: &Operation) -> String {
    format!("function `{f}`, op `{}` ({})", op.label(), op.op_type)
}

/// Evaluates a constexpr op at load time into a dense value.
fn constexpr(op: &Operation, args: &BTreeMap<String, Arc<Value>>, out: &TensorType) -> Result<Value> {
    let get = |n: &str| args.get(n).map(|v| v.as_ref()).ok_or_else(|| Error::invalid(format!("missing `{n}`")));
    let shape = out.shape().ok_or_else(|| Error::invalid("constexpr output must have a fixed shape"))?;
    let n = value::checked_len(&shape, &"the output")?;
    let strides = kernels::strides(&shape);
    // Index of the (block-)parameter element for output element `flat`, per parameter shape.
    let block_index = |flat: usize, pshape: &[usize]| -> usize {
        let pst = kernels::strides(pshape);
        (0..shape.len()).map(|d| ((flat / strides[d]) % shape[d]) / (shape[d] / pshape[d].max(1)).max(1) * pst[d]).sum()
    };
    let data: Vec<f32> = match op.op_type.as_str() {
        "constexpr_blockwise_shift_scale" => {
            let (d, s) = (get("data")?, get("scale")?);
            same_shape("data", &d.shape, &shape)?;
            blocks_divide("scale", &s.shape, &shape)?;
            let dv = d.to_f32_vec();
            let sv = s.to_f32_vec();
            let off = args.get("offset").map(|o| (o.to_f32_vec(), o.shape.clone()));
            if let Some((_, off_shape)) = &off {
                same_shape("offset", off_shape, &s.shape)?;
            }
            (0..n)
                .map(|i| {
                    let bi = block_index(i, &s.shape);
                    let o = off.as_ref().map_or(0.0, |(v, sh)| v[block_index(i, sh)]);
                    sv[bi] * (dv[i] - o)
                })
                .collect()
        }
        "constexpr_lut_to_dense" if args.contains_key("shape") => {
            // iOS 16 form: packed uint8 indices, a per-tensor lut.
            let lut = get("lut")?.to_f32_vec();
            if !(2..=256).contains(&lut.len()) || !lut.len().is_power_of_two() {
                return Err(Error::invalid(format!(
                    "a lut of {} entries: it must hold 2 to 256, a power of two",
                    lut.len()
                )));
            }
            let bits = (lut.len().trailing_zeros()) as usize;
            let raw: Vec<u8> = get("indices")?.ints()?.into_iter().map(|v| v as u8).collect();
            packed_fits("indices", raw.len(), bits, n)?;
            let idx = corelm_format::tensor::unpack_bits(&raw, bits, n);
            idx.into_iter().map(|i| lut[i as usize]).collect()
        }
        "constexpr_lut_to_dense" => {
            let (idx, lut) = (get("indices")?, get("lut")?);
            let iv = idx.ints()?;
            let lv = lut.to_f32_vec();
            let r = idx.rank();
            if lut.rank() != r + 2 {
                return Err(Error::invalid(format!(
                    "lut {:?} must have rank {} for indices {:?}",
                    lut.shape,
                    r + 2,
                    idx.shape
                )));
            }
            let (palettes, vsize) = (lut.shape[r], lut.shape[r + 1]);
            if vsize != 1 {
                return Err(Error::invalid("vector palettization (VECTOR_SIZE > 1) is not supported"));
            }
            same_shape("indices", &idx.shape, &shape)?;
            let groups = &lut.shape[..r];
            blocks_divide("lut", groups, &idx.shape)?;
            if let Some(i) = iv.iter().find(|&&i| i < 0 || i as usize >= palettes) {
                return Err(Error::invalid(format!("index {i} past a lut of {palettes} entries")));
            }
            let gst = kernels::strides(groups);
            let ist = kernels::strides(&idx.shape);
            (0..n)
                .map(|i| {
                    let g: usize =
                        (0..r).map(|d| ((i / ist[d]) % idx.shape[d]) / (idx.shape[d] / groups[d]) * gst[d]).sum();
                    lv[(g * palettes + iv[i] as usize) * vsize]
                })
                .collect()
        }
        "constexpr_affine_dequantize" => {
            let (q, zp, sc) = (get("quantized_data")?, get("zero_point")?, get("scale")?);
            let axis = get("axis")?.ints()?[0];
            let ax = corelm_format::mil::ops::axis(axis, q.rank())?;
            same_shape("quantized_data", &q.shape, &shape)?;
            let (qv, zv, sv) = (q.to_f32_vec(), zp.to_f32_vec(), sc.to_f32_vec());
            for (name, v) in [("zero_point", &zv), ("scale", &sv)] {
                if v.len() != 1 && v.len() != shape[ax] {
                    return Err(Error::invalid(format!(
                        "`{name}` holds {} values for {} along axis {ax}",
                        v.len(),
                        shape[ax]
                    )));
                }
            }
            (0..n)
                .map(|i| {
                    let c = (i / strides[ax]) % shape[ax];
                    let pick = |v: &[f32]| if v.len() == 1 { v[0] } else { v[c] };
                    (qv[i] - pick(&zv)) * pick(&sv)
                })
                .collect()
        }
        "constexpr_cast" => {
            let source = get("source_val")?;
            same_shape("source_val", &source.shape, &shape)?;
            source.to_f32_vec()
        }
        "constexpr_sparse_to_dense" => {
            let (nz, mask) = (get("nonzero_data")?.to_f32_vec(), get("mask")?);
            let bits: Vec<bool> = if args.contains_key("shape") {
                let raw: Vec<u8> = mask.ints()?.into_iter().map(|v| v as u8).collect();
                packed_fits("mask", raw.len(), 1, n)?;
                corelm_format::tensor::unpack_bits(&raw, 1, n).into_iter().map(|b| b != 0).collect()
            } else {
                same_shape("mask", &mask.shape, &shape)?;
                mask.ints()?.into_iter().map(|b| b != 0).collect()
            };
            let mut k = 0;
            bits.into_iter()
                .map(|b| {
                    if b {
                        k += 1;
                        nz.get(k - 1).copied().unwrap_or(0.0)
                    } else {
                        0.0
                    }
                })
                .collect()
        }
        other => return Err(Error::invalid(format!("`{other}` is not supported by the interpreter"))),
    };
    Ok(Value::f32(out.dtype, shape, data))
}

/// A constexpr's source must have the shape it declares for its output.
fn same_shape(what: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::invalid(format!("`{what}` is {got:?} but the output is declared {want:?}")));
    }
    Ok(())
}

/// Per-block parameters (`params`) must have the rank of what they apply to and divide it.
fn blocks_divide(what: &str, params: &[usize], of: &[usize]) -> Result<()> {
    if params.len() != of.len() || params.iter().zip(of).any(|(&p, &d)| p == 0 || d % p != 0) {
        return Err(Error::invalid(format!("`{what}` {params:?} does not divide into blocks of {of:?}")));
    }
    Ok(())
}

/// Bit-packed bytes must hold `count` values of `bits` each.
fn packed_fits(what: &str, bytes: usize, bits: usize, count: usize) -> Result<()> {
    if bytes.saturating_mul(8) < count.saturating_mul(bits) {
        return Err(Error::invalid(format!("`{what}` has {bytes} bytes, too few for {count} values of {bits} bits")));
    }
    Ok(())
}

/// Large fp16 matrices stay fp16 in memory (half the bytes of f32).
fn pack_f16(v: Value) -> Value {
    match (&v.data, v.shape.as_slice()) {
        (Data::F32(d), &[rows, cols]) if v.dtype == DType::Fp16 && d.len() >= PACK_MIN_ELEMENTS => {
            let data = d.iter().map(|&x| half::f16::from_f32(x)).collect();
            Value { data: Data::Packed(Arc::new(Packed::F16 { rows, cols, data })), ..v }
        }
        _ => v,
    }
}

/// A `const` value; large fp16 matrices go straight from their stored bytes to [`Packed::F16`].
fn const_value(t: &corelm_format::Tensor) -> Result<Value> {
    match t.shape() {
        &[rows, cols] if t.dtype() == DType::Fp16 && rows * cols >= PACK_MIN_ELEMENTS => {
            let data = value::fp16_values(t.bytes());
            Ok(Value {
                dtype: DType::Fp16,
                shape: vec![rows, cols],
                data: Data::Packed(Arc::new(Packed::F16 { rows, cols, data })),
            })
        }
        _ => Value::from_tensor(t),
    }
}

/// Matrices smaller than this are expanded to f32 at load.
const PACK_MIN_ELEMENTS: usize = 4096;

/// A `constexpr_blockwise_shift_scale` of an integer matrix with per-row block scales, kept
/// as integers and scales (expanded a row at a time inside `linear` and `gather`).
fn packed_blockwise(
    op: &Operation,
    consts: &HashMap<&str, Arc<Value>>,
    files: &mut BlobFiles,
    out: &TensorType,
) -> Result<Option<Value>> {
    if op.op_type != "constexpr_blockwise_shift_scale" {
        return Ok(None);
    }
    let arg = |files: &mut BlobFiles, name: &str| -> Result<Option<Value>> {
        match op.input(name) {
            Some(Binding::Value(v)) => Ok(Some(Value::from_tensor(&files.read(v)?)?)),
            Some(Binding::Name(n)) => Ok(consts.get(n.as_str()).map(|v| (**v).clone())),
            None => Ok(None),
        }
    };
    let (Some(data), Some(scale)) = (arg(files, "data")?, arg(files, "scale")?) else { return Ok(None) };
    let (&[rows, cols], &[srows, blocks]) = (data.shape.as_slice(), scale.shape.as_slice()) else { return Ok(None) };
    if srows != rows || blocks == 0 || cols % blocks != 0 || rows * cols < PACK_MIN_ELEMENTS {
        return Ok(None);
    }
    same_shape("data", &data.shape, &out.shape().unwrap_or_default())?;
    let Some((dtype, values)) = narrow_integers(&data)? else { return Ok(None) };
    let scales = scale.to_f32_vec();
    let mut offsets = arg(files, "offset")?.map(|o| o.to_f32_vec());
    if offsets.as_ref().is_some_and(|o| o.len() != scales.len()) {
        return Ok(None);
    }
    // Unsigned values are stored shifted into the signed range, the shift folded into the
    // offsets: s·(q − o) = s·((q − 2ᵇ⁻¹) − (o − 2ᵇ⁻¹)).
    let (bits, shift) = match dtype {
        DType::Int8 => (8, 0),
        DType::Uint8 => (8, 128),
        DType::Int4 => (4, 0),
        _ => (4, 8),
    };
    if shift != 0 {
        let o = offsets.get_or_insert_with(|| vec![0.0; scales.len()]);
        o.iter_mut().for_each(|v| *v -= shift as f32);
    }
    let values: Vec<i8> = values.into_iter().map(|v| (v - shift) as i8).collect();
    let q: Vec<u8> = if bits == 8 || cols % 2 != 0 {
        values.iter().map(|&v| v as u8).collect()
    } else {
        pack_nibbles(values.iter().map(|&v| v as u8))
    };
    let bits = if cols % 2 != 0 { 8 } else { bits };
    let fp16 = out.dtype == DType::Fp16;
    let packed = Packed::Blockwise { rows, cols, block: cols / blocks, bits, fp16, q, scales, offsets };
    Ok(Some(Value { dtype: out.dtype, shape: vec![rows, cols], data: Data::Packed(Arc::new(packed)) }))
}

/// Values of four bits (the low four of each), two to a byte, low nibble first (the layout
/// `Packed` holds and the matrix kernels read); an odd count leaves the last high nibble zero.
fn pack_nibbles(values: impl Iterator<Item = u8>) -> Vec<u8> {
    let values: Vec<u8> = values.collect();
    values.chunks(2).map(|p| (p[0] & 0x0f) | (p.get(1).map_or(0, |h| h << 4))).collect()
}

/// A `constexpr_lut_to_dense` of a matrix with 4-bit indices and a palette per group of rows,
/// kept as nibbles and palettes (looked up inside `linear` and `gather`).
fn packed_palette(op: &Operation, files: &mut BlobFiles, out: &TensorType) -> Result<Option<Value>> {
    if op.op_type != "constexpr_lut_to_dense" || op.input("vector_axis").is_some() {
        return Ok(None);
    }
    let (Some(Binding::Value(indices)), Some(Binding::Value(lut))) = (op.input("indices"), op.input("lut")) else {
        return Ok(None);
    };
    // Decided on the declared types, so a lut this cannot hold is read once, by the caller.
    let (Some(index_shape), Some(lut_shape)) = (indices.ty.shape(), lut.ty.shape()) else { return Ok(None) };
    let (&[rows, cols], &[groups, 1, 16, 1]) = (index_shape.as_slice(), lut_shape.as_slice()) else { return Ok(None) };
    if indices.ty.dtype != DType::Uint4 || groups == 0 || rows % groups != 0 || cols % 2 != 0 {
        return Ok(None);
    }
    if rows * cols < PACK_MIN_ELEMENTS || out.shape().as_deref() != Some(&[rows, cols][..]) {
        return Ok(None);
    }
    let nibbles = Value::from_tensor(&files.read(indices)?)?.ints()?;
    let indices = pack_nibbles(nibbles.iter().map(|&v| v as u8));
    let palettes = Value::from_tensor(&files.read(lut)?)?.to_f32_vec();
    let packed = Packed::Palette { rows, cols, group_rows: rows / groups, indices, palettes };
    Ok(Some(Value { dtype: out.dtype, shape: vec![rows, cols], data: Data::Packed(Arc::new(packed)) }))
}

/// The integers of a shift-scale's `data` and the container they fit: as stored (int4/int8 and
/// unsigned), or, for float data that holds only integers (a LUT of integer levels expanded by
/// `constexpr_lut_to_dense`, as GGUF's grids are carried), the narrowest of int4 and int8.
fn narrow_integers(data: &Value) -> Result<Option<(DType, Vec<i64>)>> {
    match data.dtype {
        DType::Int4 | DType::Int8 | DType::Uint4 | DType::Uint8 => Ok(Some((data.dtype, data.ints()?))),
        DType::Fp16 | DType::Fp32 => {
            let floats = data.to_f32_vec();
            let within = |lo: f32, hi: f32| floats.iter().all(|v| v.fract() == 0.0 && (lo..=hi).contains(v));
            let dtype = if within(-8.0, 7.0) {
                DType::Int4
            } else if within(-128.0, 127.0) {
                DType::Int8
            } else {
                return Ok(None);
            };
            Ok(Some((dtype, floats.iter().map(|&v| v as i64).collect())))
        }
        _ => Ok(None),
    }
}

/// Where planning has put each variable so far: in a slot, or (a constant) its value.
#[derive(Default)]
struct Places<'f> {
    slots: HashMap<&'f str, usize>,
    consts: HashMap<&'f str, Arc<Value>>,
    /// Slots given out.
    count: usize,
}

impl<'f> Places<'f> {
    fn new_slot(&mut self) -> usize {
        self.count += 1;
        self.count - 1
    }

    fn slot_for(&mut self, name: &'f str) -> usize {
        let slot = self.new_slot();
        self.slots.insert(name, slot);
        slot
    }
}

fn plan_function(
    pkg: &Package,
    fname: &str,
    f: &Function,
    weights: &WeightMatrices,
    files: &mut BlobFiles,
) -> Result<Plan> {
    let mut places = Places::default();
    let (inputs, states) = plan_inputs(fname, f, &mut places)?;
    let state_names: Vec<&str> = states.iter().map(|(n, _)| n.as_str()).collect();
    let mut steps: Vec<Step> = Vec::new();
    for op in &f.block.operations {
        // Constants: decoded once, here.
        if op.is_constant() {
            let out = op.outputs.first().ok_or_else(|| Error::invalid(format!("{}: no output", context(fname, op))))?;
            let value = decode_constant(fname, op, out.ty.tensor(), &places.consts, files)?;
            places.consts.insert(&out.name, Arc::new(value));
            continue;
        }
        let kind = step_kind(fname, op, &state_names)?;
        let step_inputs = step_sources(fname, op, &kind, &places, files)?;
        if let Some(values) = evaluate_if_constant(fname, op, &kind, &step_inputs)? {
            for (v, o) in values.into_iter().zip(&op.outputs) {
                places.consts.insert(&o.name, Arc::new(v));
            }
            continue;
        }
        let ctx = context(fname, op);
        let mut outputs = Vec::new();
        for o in &op.outputs {
            check_declared(o.ty.tensor(), &format_args!("{ctx}: output `{}`", o.name))?;
            outputs.push((places.slot_for(&o.name), o.ty.tensor().clone()));
        }
        // The weight matrix a linear layer (or a 1×1 conv, through expand_dims) multiplies.
        let features = if op.op_type == "conv" { Features::Channels } else { Features::Last };
        let weight = weights.multiplied_by(fname, op).map(|m| (m.to_string(), features));
        steps.push(Step { kind, label: ctx, inputs: step_inputs, outputs, free: vec![], row: None, weight });
    }
    let (outputs, consts) = plan_outputs(fname, f, &mut places)?;
    free_after_last_use(&mut steps, &outputs);
    mark_in_place_state_updates(&mut steps);
    mark_row_outputs(&mut steps, &outputs);
    let flexible = flexible_inputs(pkg, fname);
    Ok(Plan { inputs, states, steps, outputs, slots: places.count, consts, flexible })
}

type PlannedInputs = (Vec<(String, usize, TensorType)>, Vec<(String, TensorType)>);

/// A slot for each input; the states, which live outside the slots (in [`State`]).
fn plan_inputs<'f>(fname: &str, f: &'f Function, places: &mut Places<'f>) -> Result<PlannedInputs> {
    let mut inputs = Vec::new();
    let mut states = Vec::new();
    for input in &f.inputs {
        let kind = if matches!(input.ty, ValueType::State(_)) { "state" } else { "input" };
        check_declared(input.ty.tensor(), &format_args!("function `{fname}`: {kind} `{}`", input.name))?;
        match &input.ty {
            ValueType::Tensor(t) => inputs.push((input.name.clone(), places.slot_for(&input.name), t.clone())),
            ValueType::State(t) => states.push((input.name.clone(), t.clone())),
        }
    }
    Ok((inputs, states))
}

/// The value of a `const` or `constexpr_*` op.
fn decode_constant(
    fname: &str,
    op: &Operation,
    out: &TensorType,
    consts: &HashMap<&str, Arc<Value>>,
    files: &mut BlobFiles,
) -> Result<Value> {
    if let Some(packed) = packed_blockwise(op, consts, files, out)? {
        return Ok(packed);
    }
    if let Some(packed) = packed_palette(op, files, out)? {
        return Ok(packed);
    }
    let ctx = || context(fname, op);
    let value = if op.op_type == "const" {
        let val = op.attributes.get("val").ok_or_else(|| Error::invalid(format!("{}: no `val`", ctx())))?;
        const_value(&files.read(val).map_err(|e| e.context(ctx()))?)?
    } else {
        let mut args = BTreeMap::new();
        for (param, binds) in &op.inputs {
            let v = match binds.first() {
                Some(Binding::Value(v)) => Arc::new(Value::from_tensor(&files.read(v)?)?),
                Some(Binding::Name(n)) => consts
                    .get(n.as_str())
                    .cloned()
                    .ok_or_else(|| Error::invalid(format!("{}: `{param}` is not a constant", ctx())))?,
                None => continue,
            };
            args.insert(param.clone(), v);
        }
        for (param, v) in &op.attributes {
            args.insert(param.clone(), Arc::new(Value::from_tensor(&files.read(v)?)?));
        }
        constexpr(op, &args, out).map_err(|e| e.context(ctx()))?
    };
    Ok(pack_f16(value))
}

/// What a step of `op` does: read or write a state, or run the op's kernel.
fn step_kind(fname: &str, op: &Operation, state_names: &[&str]) -> Result<Kind> {
    let ctx = || context(fname, op);
    Ok(match op.op_type.as_str() {
        "read_state" | "write_state" => {
            let state = match op.input("input") {
                Some(Binding::Name(n)) if state_names.contains(&n.as_str()) => n.clone(),
                _ => return Err(Error::invalid(format!("{}: `input` is not a state", ctx()))),
            };
            if op.op_type == "read_state" {
                Kind::ReadState { state, take: false }
            } else {
                Kind::WriteState(state)
            }
        }
        t => Kind::Op(
            kernels::find(t)
                .ok_or_else(|| Error::invalid(format!("{}: the interpreter does not support op `{t}`", ctx())))?,
        ),
    })
}

/// Where each input of a step of `op` comes from (a state op's `input` is its state, not a value).
fn step_sources(
    fname: &str,
    op: &Operation,
    kind: &Kind,
    places: &Places,
    files: &mut BlobFiles,
) -> Result<Vec<(String, Vec<Src>)>> {
    let mut step_inputs = Vec::new();
    for (param, binds) in &op.inputs {
        if matches!(kind, Kind::ReadState { .. } | Kind::WriteState(_)) && param == "input" {
            continue;
        }
        let mut srcs = Vec::new();
        for b in binds {
            srcs.push(match b {
                Binding::Name(n) => match (places.slots.get(n.as_str()), places.consts.get(n.as_str())) {
                    (Some(&s), _) => Src::Slot(s),
                    (None, Some(c)) => Src::Const(c.clone()),
                    (None, None) => {
                        return Err(Error::invalid(format!(
                            "{}: `{n}` is not defined before this op",
                            context(fname, op)
                        )))
                    }
                },
                Binding::Value(v) => Src::Const(Arc::new(Value::from_tensor(&files.read(v)?)?)),
            });
        }
        step_inputs.push((param.clone(), srcs));
    }
    Ok(step_inputs)
}

/// The outputs of an op of constants only, computed once, here (the Neural Engine profile
/// reshapes every weight matrix for its conv: per call, that copied all the weights).
fn evaluate_if_constant(
    fname: &str,
    op: &Operation,
    kind: &Kind,
    step_inputs: &[(String, Vec<Src>)],
) -> Result<Option<Vec<Value>>> {
    let Kind::Op(kernel) = kind else { return Ok(None) };
    let constants: Option<Vec<kernels::Bound>> = step_inputs
        .iter()
        .map(|(p, srcs)| {
            srcs.iter()
                .map(|s| match s {
                    Src::Const(c) => Some(c.clone()),
                    Src::Slot(_) => None,
                })
                .collect::<Option<Vec<_>>>()
                .map(|v| (p.as_str(), v))
        })
        .collect();
    let Some(args) = constants else { return Ok(None) };
    let ctx = || context(fname, op);
    let mut outs = kernel.run(&Inputs { map: &args }).map_err(|e| e.context(ctx()))?;
    if outs.len() != op.outputs.len() {
        return Err(Error::invalid(format!("{}: {} outputs computed", ctx(), outs.len())));
    }
    for (v, o) in outs.iter_mut().zip(&op.outputs) {
        conform(v, o.ty.tensor(), None).map_err(|e| e.context(ctx()))?;
    }
    Ok(Some(outs))
}

type PlannedOutputs = (Vec<(String, usize)>, Vec<(usize, Arc<Value>)>);

/// The slot of each function output, and the constants to put in the slots of outputs that
/// are constants.
fn plan_outputs(fname: &str, f: &Function, places: &mut Places) -> Result<PlannedOutputs> {
    let mut outputs = Vec::new();
    let mut consts = Vec::new();
    for name in &f.block.outputs {
        match (places.slots.get(name.as_str()), places.consts.get(name.as_str())) {
            (Some(&s), _) => outputs.push((name.clone(), s)),
            (None, Some(c)) => {
                let c = c.clone();
                let slot = places.new_slot();
                consts.push((slot, c));
                outputs.push((name.clone(), slot));
            }
            _ => return Err(Error::invalid(format!("function `{fname}`: output `{name}` is not defined"))),
        }
    }
    Ok((outputs, consts))
}

/// Liveness: frees each slot after its last reader (outputs live to the end).
fn free_after_last_use(steps: &mut [Step], outputs: &[(String, usize)]) {
    let mut last_use: HashMap<usize, usize> = HashMap::new();
    for (i, step) in steps.iter().enumerate() {
        for (_, srcs) in &step.inputs {
            for s in srcs {
                if let Src::Slot(slot) = s {
                    last_use.insert(*slot, i);
                }
            }
        }
        for (slot, _) in &step.outputs {
            last_use.entry(*slot).or_insert(i);
        }
    }
    for (_, s) in outputs {
        last_use.remove(s);
    }
    for (slot, i) in last_use {
        steps[i].free.push(slot);
    }
}

/// The flexibility of each of the function's inputs, from the model description.
fn flexible_inputs(pkg: &Package, fname: &str) -> HashMap<String, Flexibility> {
    let description = pkg.model().description.function(fname);
    description
        .map(|d| {
            d.inputs
                .iter()
                .filter_map(|f| match &f.kind {
                    FeatureKind::Array(a) => Some((f.name.clone(), a.flexibility.clone())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Refuses a declared type no machine could hold (its fixed dimensions alone), before anything
/// runs: a package that declares a 132 GB state fails here, naming it, rather than aborting on
/// the allocation.
fn check_declared(t: &TensorType, what: &dyn std::fmt::Display) -> Result<()> {
    let fixed: Vec<usize> = t.dims.iter().map(|d| d.fixed().unwrap_or(1)).collect();
    value::checked_len(&fixed, what).map(drop)
}

/// Marks `read_state` steps whose value only feeds a `slice_update` that is written back to the
/// same state before the state is touched again: those may move the state out.
fn mark_in_place_state_updates(steps: &mut [Step]) {
    let readers = |slot: usize, steps: &[Step]| -> Vec<usize> {
        steps
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.inputs.iter().any(|(_, srcs)| srcs.iter().any(|x| matches!(x, Src::Slot(v) if *v == slot)))
            })
            .map(|(i, _)| i)
            .collect()
    };
    for i in 0..steps.len() {
        let Kind::ReadState { state, .. } = &steps[i].kind else { continue };
        let state = state.clone();
        let out = steps[i].outputs[0].0;
        let users = readers(out, steps);
        let [u] = users.as_slice() else { continue };
        let is_update = matches!(&steps[*u].kind, Kind::Op(k) if k.op == "slice_update")
            && steps[*u].inputs.iter().any(|(p, s)| p == "x" && matches!(s.as_slice(), [Src::Slot(v)] if *v == out));
        if !is_update {
            continue;
        }
        let updated = steps[*u].outputs[0].0;
        // The next step touching this state must be the write of the updated value.
        let next_touch = steps.iter().enumerate().skip(i + 1).find(|(_, s)| match &s.kind {
            Kind::ReadState { state: n, .. } | Kind::WriteState(n) => *n == state,
            _ => false,
        });
        let writes_back = matches!(next_touch, Some((_, s)) if matches!(&s.kind, Kind::WriteState(n) if *n == state)
            && s.inputs.iter().any(|(p, srcs)| p == "data" && matches!(srcs.as_slice(), [Src::Slot(v)] if *v == updated)));
        if writes_back {
            steps[i].kind = Kind::ReadState { state, take: true };
        }
    }
}

/// Marks, for each function output, the chain of steps that computes it row by row from a
/// projection: `linear` (or `matmul` by a constant) followed by elementwise ops with scalars,
/// each value read only by the next step. That is how an LM head's logits are made; a caller
/// that needs only the last position's logits then multiplies one row by the head, not all.
fn mark_row_outputs(steps: &mut [Step], outputs: &[(String, usize)]) {
    let mut producer = HashMap::new();
    let mut readers: HashMap<usize, usize> = HashMap::new();
    for (i, step) in steps.iter().enumerate() {
        for (slot, _) in &step.outputs {
            producer.insert(*slot, i);
        }
        for s in step.inputs.iter().flat_map(|(_, srcs)| srcs) {
            if let Src::Slot(slot) = s {
                *readers.entry(*slot).or_default() += 1;
            }
        }
    }
    for (_, slot) in outputs {
        *readers.entry(*slot).or_default() += 1;
    }
    for (_, out) in outputs {
        let mut chain: Vec<usize> = Vec::new();
        let mut slot = *out;
        while let Some(&i) = producer.get(&slot) {
            let step = &steps[i];
            let Kind::Op(kernel) = &step.kind else { break };
            let [(_, ty)] = step.outputs.as_slice() else { break };
            let slot_inputs: Vec<(&str, usize)> = step
                .inputs
                .iter()
                .flat_map(|(p, srcs)| srcs.iter().map(move |s| (p.as_str(), s)))
                .filter_map(|(p, s)| match s {
                    Src::Slot(v) => Some((p, *v)),
                    Src::Const(_) => None,
                })
                .collect();
            let [(param, from)] = slot_inputs.as_slice() else { break };
            if readers.get(&slot) != Some(&1) || ty.rank() < 2 {
                break;
            }
            let params = || step.inputs.iter().flat_map(|(p, srcs)| srcs.iter().map(move |s| (p.as_str(), s)));
            let is_const_false = |name: &str| {
                params().all(|(p, s)| p != name || matches!(s, Src::Const(c) if c.ints().is_ok_and(|v| v == [0])))
            };
            let projection =
                *param == "x" && (kernel.op == "linear" || (kernel.op == "matmul" && is_const_false("transpose_x")));
            let scalars = params().all(|(_, s)| match s {
                Src::Const(c) => c.len() <= 1,
                Src::Slot(_) => true,
            });
            let elementwise = scalars && kernel.rowwise;
            if projection {
                let axis = ty.rank() - 2;
                steps[i].row = Some(RowStep { axis, cut: true });
                for &j in &chain {
                    steps[j].row = Some(RowStep { axis, cut: false });
                }
                break;
            }
            if !elementwise {
                break;
            }
            chain.push(i);
            slot = *from;
        }
    }
}

/// Row `row` of `v` along `axis` (the axis kept, with length 1).
fn row_of(v: &Value, axis: usize, row: usize) -> Result<Value> {
    let n = *v.shape.get(axis).ok_or_else(|| Error::invalid("no such axis"))?;
    if row >= n {
        return Err(Error::invalid(format!("row {row} of a value with {n} rows")));
    }
    let inner: usize = v.shape[axis + 1..].iter().product();
    let data =
        v.as_f32()?.chunks(n * inner).flat_map(|outer| &outer[row * inner..(row + 1) * inner]).copied().collect();
    let mut shape = v.shape.clone();
    shape[axis] = 1;
    Ok(Value { shape, data: Data::F32(data), dtype: v.dtype })
}

impl Interpreter {
    /// Plans every function of a package.
    pub fn load(pkg: &Package) -> Result<Interpreter> {
        let mut files = pkg.blob_files();
        let mut plans = BTreeMap::new();
        let weights = WeightMatrices::find(&pkg.model().program);
        for (name, f) in &pkg.model().program.functions {
            plans.insert(name.clone(), plan_function(pkg, name, f, &weights, &mut files)?);
        }
        let default = pkg
            .model()
            .description
            .default_function
            .clone()
            .or_else(|| plans.keys().next().cloned())
            .ok_or_else(|| Error::invalid("the program has no functions"))?;
        Ok(Interpreter { plans, default })
    }

    pub fn functions(&self) -> impl Iterator<Item = &str> {
        self.plans.keys().map(|s| s.as_str())
    }

    pub fn default_function(&self) -> &str {
        &self.default
    }

    fn plan(&self, function: Option<&str>) -> Result<(&str, &Plan)> {
        let name = function.unwrap_or(&self.default);
        self.plans.get_key_value(name).map(|(k, p)| (k.as_str(), p)).ok_or_else(|| {
            let known: Vec<&str> = self.functions().collect();
            Error::invalid(format!("no function `{name}`; the package has {}", known.join(", ")))
        })
    }

    /// Input names and types of a function (non-state).
    pub fn inputs(&self, function: Option<&str>) -> Result<Vec<(String, TensorType)>> {
        Ok(self.plan(function)?.1.inputs.iter().map(|(n, _, t)| (n.clone(), t.clone())).collect())
    }

    /// Fresh (zeroed) states for a function.
    pub fn new_state(&self, function: Option<&str>) -> Result<State> {
        let (_, plan) = self.plan(function)?;
        let mut values = BTreeMap::new();
        let mut shapes = Vec::with_capacity(plan.states.len());
        for (name, t) in &plan.states {
            let shape = t.shape().ok_or_else(|| Error::invalid(format!("state `{name}` has no fixed shape")))?;
            shapes.push(value::checked_len(&shape, &format_args!("state `{name}`"))?);
        }
        // Each state fits on its own (checked at load); together they must too.
        value::checked_len(&[shapes.iter().sum()], &"the states together")?;
        for (name, t) in &plan.states {
            let shape = t.shape().expect("checked above");
            values.insert(name.clone(), Arc::new(Value::zeros(t.dtype, shape, &format_args!("state `{name}`"))?));
        }
        Ok(State { values })
    }

    /// Runs one prediction; states are read and updated in `state`.
    pub fn predict(
        &self,
        function: Option<&str>,
        inputs: &BTreeMap<String, Value>,
        state: &mut State,
    ) -> Result<BTreeMap<String, Value>> {
        self.predict_owned(function, inputs.clone(), state, None, None)
    }

    /// Like [`predict`](Self::predict), for a caller that needs only row `row` (along the
    /// second-to-last axis: the query position) of the outputs a final projection computes,
    /// such as an LM head's logits. Those outputs then hold that row alone, and the projection
    /// multiplies just that row. Other outputs are complete.
    pub fn predict_row(
        &self,
        function: Option<&str>,
        inputs: &BTreeMap<String, Value>,
        state: &mut State,
        row: usize,
    ) -> Result<BTreeMap<String, Value>> {
        self.predict_owned(function, inputs.clone(), state, Some(row), None)
    }

    /// [`predict`](Self::predict) (with `row`, [`predict_row`](Self::predict_row)) taking the
    /// inputs by value: each moves into the program instead of being copied, so a KV cache passed
    /// as an input is updated in place. With `observe`, shows it the input `x` of each layer with
    /// a constant weight matrix (`linear`, or a 1×1 `conv` of one), with that matrix's name,
    /// before the layer runs: what calibrated compression measures ([`calibrate`]).
    fn predict_owned(
        &self,
        function: Option<&str>,
        inputs: BTreeMap<String, Value>,
        state: &mut State,
        row: Option<usize>,
        observe: Option<&mut Observer<'_>>,
    ) -> Result<BTreeMap<String, Value>> {
        // On a pool thread, each parallel kernel shares work with the other workers directly;
        // from outside the pool, every one would be a cross-thread hand-off and wake-up.
        rayon::scope(|_| self.predict_on_worker(function, inputs, state, row, observe))
    }

    fn predict_on_worker(
        &self,
        function: Option<&str>,
        mut inputs: BTreeMap<String, Value>,
        state: &mut State,
        row: Option<usize>,
        mut observe: Option<&mut Observer<'_>>,
    ) -> Result<BTreeMap<String, Value>> {
        let (fname, plan) = self.plan(function)?;
        let mut slots: Vec<Option<Arc<Value>>> = vec![None; plan.slots];
        for name in inputs.keys() {
            if !plan.inputs.iter().any(|(n, _, _)| n == name) {
                let known: Vec<&str> = plan.inputs.iter().map(|(n, _, _)| n.as_str()).collect();
                return Err(Error::invalid(format!(
                    "`{fname}` has no input `{name}`; its inputs: {}",
                    known.join(", ")
                )));
            }
        }
        for (name, slot, ty) in &plan.inputs {
            let mut v =
                inputs.remove(name).ok_or_else(|| Error::invalid(format!("input `{name}` of `{fname}` is missing")))?;
            check_input(name, &v, ty, plan.flexible.get(name))?;
            if let Data::F32(d) = &mut v.data {
                if ty.dtype == DType::Fp16 {
                    value::round_f16(d);
                }
            }
            v.dtype = ty.dtype;
            slots[*slot] = Some(Arc::new(v));
        }
        for (slot, v) in &plan.consts {
            slots[*slot] = Some(v.clone());
        }
        for step in &plan.steps {
            if let (Some(observe), Some((weight, features))) = (observe.as_deref_mut(), &step.weight) {
                if let Some((_, srcs)) = step.inputs.iter().find(|(p, _)| p == "x") {
                    observe(weight, &fetch(&slots, &srcs[0])?, *features);
                }
            }
            let row = row.and_then(|r| step.row.map(|s| (s, r)));
            self.run_step(step, &mut slots, state, row).map_err(|e| e.context(&step.label))?;
            for &s in &step.free {
                slots[s] = None;
            }
        }
        let mut out = BTreeMap::new();
        for (name, slot) in &plan.outputs {
            let v = slots[*slot].take().ok_or_else(|| Error::invalid(format!("output `{name}` was not computed")))?;
            out.insert(name.clone(), Arc::try_unwrap(v).unwrap_or_else(|a| (*a).clone()));
        }
        Ok(out)
    }

    /// `row`: compute only this row of a row-by-row step's output (see [`Step::row`]).
    fn run_step(
        &self,
        step: &Step,
        slots: &mut [Option<Arc<Value>>],
        state: &mut State,
        row: Option<(RowStep, usize)>,
    ) -> Result<()> {
        match &step.kind {
            Kind::ReadState { state: name, take } => {
                let v = if *take { state.values.remove(name) } else { state.values.get(name).cloned() };
                slots[step.outputs[0].0] = Some(v.ok_or_else(|| Error::invalid(format!("state `{name}` is not set")))?);
            }
            Kind::WriteState(name) => {
                let data = step.inputs.iter().find(|(p, _)| p == "data").ok_or_else(|| Error::invalid("no data"))?;
                let v = fetch(slots, &data.1[0])?;
                state.values.insert(name.clone(), v);
            }
            Kind::Op(kernel) => {
                // slice_update works in place on a value nobody else holds.
                if kernel.op == "slice_update" {
                    let x_src = &step.inputs.iter().find(|(p, _)| p == "x").ok_or_else(|| Error::invalid("no x"))?.1[0];
                    let mut x = match x_src {
                        Src::Slot(i) if step.free.contains(i) => {
                            slots[*i].take().ok_or_else(|| Error::invalid("x freed"))?
                        }
                        s => fetch(slots, s)?,
                    };
                    let map = gather(step, slots, Some("x"))?;
                    kernels::slice_update_in_place(&Inputs { map: &map }, Arc::make_mut(&mut x))?;
                    slots[step.outputs[0].0] = Some(x);
                    return Ok(());
                }
                let mut map = gather(step, slots, None)?;
                if let Some((RowStep { axis, cut: true }, r)) = row {
                    for (param, values) in &mut map {
                        if *param == "x" {
                            values[0] = Arc::new(row_of(&values[0], axis, r)?);
                        }
                    }
                }
                let outs = kernel.run(&Inputs { map: &map })?;
                if outs.len() != step.outputs.len() {
                    return Err(Error::invalid(format!(
                        "produced {} outputs, the program declares {}",
                        outs.len(),
                        step.outputs.len()
                    )));
                }
                for (mut v, (slot, ty)) in outs.into_iter().zip(&step.outputs) {
                    conform(&mut v, ty, row.map(|(s, _)| s.axis))?;
                    slots[*slot] = Some(Arc::new(v));
                }
            }
        }
        Ok(())
    }
}

fn fetch(slots: &[Option<Arc<Value>>], s: &Src) -> Result<Arc<Value>> {
    match s {
        Src::Const(c) => Ok(c.clone()),
        Src::Slot(i) => slots[*i].clone().ok_or_else(|| Error::invalid("a value was used after it was freed")),
    }
}

/// The inputs of a step by parameter name, except `skip`.
fn gather<'s>(step: &'s Step, slots: &[Option<Arc<Value>>], skip: Option<&str>) -> Result<Vec<kernels::Bound<'s>>> {
    let mut map = Vec::with_capacity(step.inputs.len());
    for (param, srcs) in &step.inputs {
        if Some(param.as_str()) == skip {
            continue;
        }
        map.push((param.as_str(), srcs.iter().map(|s| fetch(slots, s)).collect::<Result<Vec<_>>>()?));
    }
    Ok(map)
}

/// Gives a kernel's result the dtype the program declares (rounding floats to fp16 where
/// declared) and checks its shape against the declared fixed dimensions. A result the kernel
/// already typed fp16 holds fp16 values (see [`Value`]), so it is not rounded twice.
/// `one_row`: an axis computed for one row only, whose declared length is not checked.
fn conform(v: &mut Value, ty: &TensorType, one_row: Option<usize>) -> Result<()> {
    let fits = |(i, (&a, d)): (usize, (&usize, &Dim))| Some(i) == one_row || !matches!(d, Dim::Fixed(n) if *n != a);
    if v.rank() != ty.rank() || !v.shape.iter().zip(&ty.dims).enumerate().all(fits) {
        return Err(Error::invalid(format!("computed shape {:?}, but the program declares {ty}", v.shape)));
    }
    match (&mut v.data, ty.dtype) {
        (Data::F32(d), DType::Fp16) if v.dtype != DType::Fp16 => value::round_f16(d),
        (Data::F32(_), DType::Fp16) => {}
        (Data::F32(_) | Data::Packed(_), d) if d.is_float() => {}
        (Data::I32(_), d) if d.is_int() => {}
        (Data::Bool(_), DType::Bool) | (Data::Str(_), DType::String) => {}
        (Data::I32(i), d) if d.is_float() => {
            let f: Vec<f32> = i.iter().map(|&x| x as f32).collect();
            v.data = Data::F32(f);
        }
        _ => return Err(Error::invalid(format!("computed {}, but the program declares {}", v.dtype, ty.dtype))),
    }
    v.dtype = ty.dtype;
    Ok(())
}

fn check_input(name: &str, v: &Value, ty: &TensorType, flex: Option<&Flexibility>) -> Result<()> {
    v.check().map_err(|e| e.context(format!("input `{name}`")))?;
    let kind_ok = match (&v.data, ty.dtype) {
        (Data::F32(_), d) => d.is_float(),
        (Data::I32(_), d) => d.is_int(),
        (Data::Bool(_), DType::Bool) => true,
        _ => false,
    };
    if !kind_ok {
        return Err(Error::invalid(format!("input `{name}` must be {}, got {}", ty.dtype, v.dtype)));
    }
    let fits = v.rank() == ty.rank()
        && v.shape.iter().zip(&ty.dims).all(|(&a, d)| matches!(d, Dim::Unknown) || *d == Dim::Fixed(a));
    let allowed = match flex {
        Some(Flexibility::Range(r)) => {
            r.iter().zip(&v.shape).all(|(&(lo, hi), &d)| d >= lo && hi.is_none_or(|h| d <= h))
        }
        Some(Flexibility::Enumerated(shapes)) => shapes.contains(&v.shape),
        _ => true,
    };
    if !fits || !allowed {
        return Err(Error::invalid(format!(
            "input `{name}` has shape {:?}; the model takes {ty}{}",
            v.shape,
            match flex {
                Some(Flexibility::Range(r)) => format!(" with ranges {r:?}"),
                Some(Flexibility::Enumerated(s)) => format!(" with shapes {s:?}"),
                _ => String::new(),
            }
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use corelm_format::mil::ops;
    use corelm_format::package::WriteOptions;
    use corelm_format::{FunctionBuilder, InputShape, PackageWriter, ProgramBuilder, Target, Tensor, Var};

    use super::*;
    use crate::kernels::KERNELS;

    /// Ops of the format's table that the planner handles itself, without a kernel.
    const PLANNED: &[&str] = &[
        // Decoded once at load (`const_value`, `constexpr`, `packed_blockwise`).
        "const",
        "constexpr_affine_dequantize",
        "constexpr_blockwise_shift_scale",
        "constexpr_cast",
        "constexpr_lut_to_dense",
        "constexpr_sparse_to_dense",
        // Steps of their own, which move a state in and out of the slots.
        "read_state",
        "write_state",
    ];

    /// Ops of the format's table that the interpreter does not run: loading a program with one
    /// fails, naming it.
    const UNSUPPORTED: &[&str] = &["gather_nd", "constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale"];

    /// Every kernel runs an op of the table, once; every op of the table has a kernel, or the
    /// planner handles it, or it is listed as unsupported.
    #[test]
    fn kernels_agree_with_the_op_table() {
        let table: BTreeSet<&str> = ops::all_ops().iter().map(|d| d.name).collect();
        let kernels: Vec<&str> = KERNELS.iter().map(|k| k.op).collect();
        assert_eq!(kernels.len(), kernels.iter().collect::<BTreeSet<_>>().len(), "a kernel is listed twice");
        for op in kernels.iter().chain(PLANNED).chain(UNSUPPORTED) {
            assert!(table.contains(op), "`{op}` is not an op of the table");
        }
        for op in table {
            let homes = [kernels.contains(&op), PLANNED.contains(&op), UNSUPPORTED.contains(&op)];
            assert_eq!(homes.iter().filter(|&&h| h).count(), 1, "`{op}`: kernel, planned, unsupported: {homes:?}");
        }
    }

    /// A non-linear grid (3-bit indices into a table of integer levels, then a scale and offset
    /// per 32 columns, as GGUF's lattice and IQ4 grids are carried) is held as int8 with its
    /// scales, not widened, and the layer computes `Σ x·s·(level − o)`.
    #[test]
    fn lut_grids_stay_packed_and_compute_their_levels() {
        // Levels past int4's range are held as bytes; Q3_K's −4..3 as nibbles.
        for (levels, bits) in
            [([-43.0, -25.0, -8.0, 8.0, 25.0, 43.0, 0.0, 0.0], 8), ([0.0, 1.0, 2.0, 3.0, -4.0, -3.0, -2.0, -1.0], 4)]
        {
            lut_grid_case(levels, bits);
        }
    }

    fn lut_grid_case(levels: [f64; 8], bits: u8) {
        let (rows, cols, run) = (64, 64, 32);
        let index = |r: usize, c: usize| (r * 7 + c * 3) % 6;
        let scale = |r: usize, b: usize| 0.001 * (1 + (r + b) % 5) as f64;
        let offset = |r: usize, b: usize| 0.5 * ((r + 2 * b) % 3) as f64;
        let x: Vec<f32> = (0..cols).map(|c| ((c % 9) as f32 - 4.0) * 0.25).collect();

        let dir = tempfile::tempdir().unwrap();
        let mut pkg = PackageWriter::create(dir.path().join("m.mlpackage"), &WriteOptions::overwriting()).unwrap();
        let mut f = FunctionBuilder::new("main", Target::Ios18, pkg.weights()).unwrap();
        let input = f.input("x", DType::Fp16, InputShape::Fixed(vec![1, cols])).unwrap();
        let idx: Vec<i64> = (0..rows * cols).map(|i| index(i / cols, i % cols) as i64).collect();
        let table = |v: &dyn Fn(usize, usize) -> f64| -> Vec<f64> { (0..rows * 2).map(|i| v(i / 2, i % 2)).collect() };
        let lut = vec![
            ("indices", Tensor::from_ints(DType::Uint3, vec![rows, cols], &idx).unwrap().into()),
            ("lut", Tensor::from_floats(DType::Fp16, vec![1, 1, 8, 1], &levels).unwrap().into()),
        ];
        let data = f.op1("constexpr_lut_to_dense", "w_levels", lut).unwrap();
        let shift_scale = vec![
            ("data", (&data).into()),
            ("scale", Tensor::from_floats(DType::Fp16, vec![rows, 2], &table(&scale)).unwrap().into()),
            ("offset", Tensor::from_floats(DType::Fp16, vec![rows, 2], &table(&offset)).unwrap().into()),
        ];
        let w = f.op1("constexpr_blockwise_shift_scale", "w", shift_scale).unwrap();
        let model = linear_model(f, &input, &w);
        let interp = Interpreter::load(&Package::open(pkg.commit(&model).unwrap()).unwrap()).unwrap();

        let weights = packed_weights(&interp);
        assert!(
            matches!(weights.as_slice(), [Packed::Blockwise { bits: b, .. }] if *b == bits),
            "the weight was widened"
        );
        assert_eq!(weights[0].bytes(), rows * cols * usize::from(bits) / 8 + 4 * 2 * rows * 2);

        let inputs = BTreeMap::from([("x".to_string(), Value::f32(DType::Fp16, vec![1, cols], x.clone()))]);
        let out = interp.predict(None, &inputs, &mut interp.new_state(None).unwrap()).unwrap()["y"].to_f32_vec();
        for (r, &got) in out.iter().enumerate() {
            let want: f64 = (0..cols)
                .map(|c| f64::from(x[c]) * scale(r, c / run) * (levels[index(r, c)] - offset(r, c / run)))
                .sum();
            assert!((f64::from(got) - want).abs() <= 2e-3 * want.abs().max(0.1), "row {r}: {got} vs {want}");
        }
    }

    /// A 4-bit palettized matrix (a palette per group of rows, as `--quantize lut4` and
    /// coremltools write it) is held as nibbles and palettes, and the layer computes
    /// `Σ x·palette[index]`.
    #[test]
    fn lut4_palettes_stay_packed() {
        let (rows, cols, groups) = (64, 96, 4);
        let index = |r: usize, c: usize| (r * 7 + c * 3 + r * c) % 16;
        let palette = |g: usize, i: usize| ((g * 16 + i) as f64 * 0.37).sin();
        let x: Vec<f32> = (0..cols).map(|c| ((c % 9) as f32 - 4.0) * 0.25).collect();

        let dir = tempfile::tempdir().unwrap();
        let mut pkg = PackageWriter::create(dir.path().join("m.mlpackage"), &WriteOptions::overwriting()).unwrap();
        let mut f = FunctionBuilder::new("main", Target::Ios18, pkg.weights()).unwrap();
        let input = f.input("x", DType::Fp16, InputShape::Fixed(vec![1, cols])).unwrap();
        let idx: Vec<i64> = (0..rows * cols).map(|i| index(i / cols, i % cols) as i64).collect();
        let luts: Vec<f64> = (0..groups * 16).map(|i| palette(i / 16, i % 16)).collect();
        let lut = vec![
            ("indices", Tensor::from_ints(DType::Uint4, vec![rows, cols], &idx).unwrap().into()),
            ("lut", Tensor::from_floats(DType::Fp16, vec![groups, 1, 16, 1], &luts).unwrap().into()),
        ];
        let w = f.op1("constexpr_lut_to_dense", "w", lut).unwrap();
        let model = linear_model(f, &input, &w);
        let interp = Interpreter::load(&Package::open(pkg.commit(&model).unwrap()).unwrap()).unwrap();
        let packed = packed_weights(&interp);
        assert!(matches!(packed.as_slice(), [Packed::Palette { group_rows: 16, .. }]), "the weight was widened");
        assert_eq!(packed[0].bytes(), rows * cols / 2 + 4 * groups * 16);

        let inputs = BTreeMap::from([("x".to_string(), Value::f32(DType::Fp16, vec![1, cols], x.clone()))]);
        let out = interp.predict(None, &inputs, &mut interp.new_state(None).unwrap()).unwrap()["y"].to_f32_vec();
        for (r, &got) in out.iter().enumerate() {
            // The palette as stored: fp16.
            let entry = |i: usize| f64::from(half::f16::from_f64(palette(r / 16, i)).to_f32());
            let want: f64 = (0..cols).map(|c| f64::from(x[c]) * entry(index(r, c))).sum();
            assert!((f64::from(got) - want).abs() <= 2e-3 * want.abs().max(0.1), "row {r}: {got} vs {want}");
        }
    }

    /// The model whose function `f` outputs `y = linear(input, w)`.
    fn linear_model(mut f: FunctionBuilder, input: &Var, w: &Var) -> corelm_format::Model {
        let y = f.op1("linear", "y", vec![("x", input.into()), ("weight", w.into())]).unwrap();
        f.output(&y, "y").unwrap();
        let mut program = ProgramBuilder::new(Target::Ios18);
        program.add_function(f.finish().unwrap()).unwrap();
        program.finish().unwrap()
    }

    /// The compressed weights `main`'s steps read.
    fn packed_weights(interp: &Interpreter) -> Vec<&Packed> {
        interp.plans["main"]
            .steps
            .iter()
            .flat_map(|s| &s.inputs)
            .flat_map(|(_, srcs)| srcs)
            .filter_map(|s| match s {
                Src::Const(v) => match &v.data {
                    Data::Packed(p) => Some(p.as_ref()),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    /// An op the table defines but the interpreter has no kernel for is refused at load, by name.
    #[test]
    fn an_op_without_a_kernel_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut pkg = PackageWriter::create(dir.path().join("m.mlpackage"), &WriteOptions::overwriting()).unwrap();
        let mut f = FunctionBuilder::new("main", Target::Ios18, pkg.weights()).unwrap();
        let x = f.input("x", DType::Fp32, InputShape::Fixed(vec![4, 3])).unwrap();
        let indices = Tensor::from_i32(vec![2, 1], &[0, 2]).unwrap();
        let y = f.op1("gather_nd", "rows", vec![("x", (&x).into()), ("indices", indices.into())]).unwrap();
        f.output(&y, "y").unwrap();
        let mut program = ProgramBuilder::new(Target::Ios18);
        program.add_function(f.finish().unwrap()).unwrap();
        let path = pkg.commit(&program.finish().unwrap()).unwrap();
        let e = Interpreter::load(&Package::open(path).unwrap()).err().expect("gather_nd has no kernel").to_string();
        assert!(e.contains("the interpreter does not support op `gather_nd`"), "{e}");
    }
}
