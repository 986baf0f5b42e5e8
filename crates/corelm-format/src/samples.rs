//! Small sample packages that exercise the format end to end: states with a KV-cache update,
//! fused attention, blockwise and palettized weights, flexible and enumerated inputs,
//! multifunction programs sharing weights, and a wide spread of ordinary ops. Tests check them
//! against coremltools; the fuzz targets use them as seeds.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::package::WriteOptions;
use crate::{Arg, DType, FunctionBuilder, InputShape, PackageWriter, ProgramBuilder, Target, Tensor, Var};

/// A deterministic pseudo-random sequence in [-1, 1) (no RNG dependency needed).
fn wave(n: usize, seed: u32) -> Vec<f64> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f64 / u32::MAX as f64) * 2.0 - 1.0
        })
        .collect()
}

fn fp16(shape: &[usize], seed: u32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_floats(DType::Fp16, shape.to_vec(), &wave(n, seed)).expect("sizes agree")
}

fn i32s(values: &[i32]) -> Tensor {
    Tensor::from_i32(vec![values.len()], values).expect("sizes agree")
}

/// An int4 per-block (block 8 along the input dim) weight of shape [out, inp].
fn int4_blockwise<'a>(f: &mut FunctionBuilder<'a>, name: &str, out: usize, inp: usize, seed: u32) -> Result<Var> {
    let q: Vec<i64> = wave(out * inp, seed).iter().map(|v| (v * 8.0).floor().clamp(-8.0, 7.0) as i64).collect();
    let data = Tensor::from_ints(DType::Int4, vec![out, inp], &q)?;
    let scale = Tensor::from_floats(DType::Fp16, vec![out, inp / 8], &vec![0.05; out * inp / 8])?;
    f.op1("constexpr_blockwise_shift_scale", name, vec![("data", data.into()), ("scale", scale.into())])
}

/// A KV-cache step: project x, write keys into the state at `position`, attend over the cache.
/// Query length is flexible (1..=16).
pub fn kv_cache(path: &Path) -> Result<PathBuf> {
    let (heads, ctx, dim) = (2, 16, 4);
    let mut pkg = PackageWriter::create(path, &WriteOptions::overwriting())?;
    let mut f = FunctionBuilder::new("main", Target::Ios18, pkg.weights())?;
    let x = f.input(
        "x",
        DType::Fp16,
        InputShape::Range { default: vec![1, 1, 8], ranges: vec![(1, Some(1)), (1, Some(16)), (8, Some(8))] },
    )?;
    let position = f.input("position", DType::Int32, InputShape::Fixed(vec![1]))?;
    let mask = f.input(
        "causalMask",
        DType::Fp16,
        InputShape::Range {
            default: vec![1, 1, 1, 16],
            ranges: vec![(1, Some(1)), (1, Some(1)), (1, Some(16)), (16, Some(16))],
        },
    )?;
    let cache = f.state("keyCache", &[1, heads, ctx, dim])?;
    let w = int4_blockwise(&mut f, "wk", heads * dim, 8, 1)?;
    let k = f.op1("linear", "k_proj", vec![("x", (&x).into()), ("weight", (&w).into())])?;
    let k = f.op1(
        "reshape",
        "k_heads",
        vec![("x", (&k).into()), ("shape", i32s(&[1, -1, heads as i32, dim as i32]).into())],
    )?;
    let k = f.op1("transpose", "k_t", vec![("x", (&k).into()), ("perm", i32s(&[0, 2, 1, 3]).into())])?;
    let zeros = f.constant("zeros2", i32s(&[0, 0]))?;
    let tail = f.constant("zero1", i32s(&[0]))?;
    let begin = f.op1(
        "concat",
        "begin",
        vec![("values", Arg::Tuple(vec![&zeros, &position, &tail])), ("axis", Tensor::scalar_i32(0).into())],
    )?;
    let kshape = f.op1("shape", "k_shape", vec![("x", (&k).into())])?;
    let end = f.op1("add", "end", vec![("x", (&begin).into()), ("y", (&kshape).into())])?;
    let old = f.op1("read_state", "cache_in", vec![("input", (&cache).into())])?;
    let new = f.op1(
        "slice_update",
        "cache_upd",
        vec![("x", (&old).into()), ("update", (&k).into()), ("begin", (&begin).into()), ("end", (&end).into())],
    )?;
    f.op("write_state", "cache_write", vec![("input", (&cache).into()), ("data", (&new).into())])?;
    let keys = f.op1("read_state", "cache_now", vec![("input", (&cache).into())])?;
    let attn = f.op1(
        "scaled_dot_product_attention",
        "attn",
        vec![("query", (&k).into()), ("key", (&keys).into()), ("value", (&keys).into()), ("attn_mask", (&mask).into())],
    )?;
    f.output(&attn, "attn")?;
    let mut prog = ProgramBuilder::new(Target::Ios18);
    prog.metadata.author = "corelm samples".into();
    prog.metadata.user_defined.insert("co.huggingface.exporters.name".into(), "corelm/sample-kv-cache".into());
    prog.add_function(f.finish()?)?;
    pkg.commit(&prog.finish()?)
}

/// A 4-bit palettized linear layer (per-grouped-channel LUTs) with enumerated input shapes.
pub fn palettized(path: &Path) -> Result<PathBuf> {
    let mut pkg = PackageWriter::create(path, &WriteOptions::overwriting())?;
    let mut f = FunctionBuilder::new("main", Target::Ios18, pkg.weights())?;
    let x = f.input("x", DType::Fp32, InputShape::Enumerated(vec![vec![1, 16], vec![4, 16], vec![8, 16]]))?;
    let idx: Vec<i64> = wave(32 * 16, 7).iter().map(|v| ((v + 1.0) * 8.0).floor().clamp(0.0, 15.0) as i64).collect();
    let indices = Tensor::from_ints(DType::Uint4, vec![32, 16], &idx)?;
    // Two groups of 16 output channels, one 16-entry table each: lut shape [2, 1, 16, 1].
    let lut = Tensor::from_floats(DType::Fp16, vec![2, 1, 16, 1], &wave(32, 9))?;
    let w = f.op1("constexpr_lut_to_dense", "w", vec![("indices", indices.into()), ("lut", lut.into())])?;
    let x16 = f.op1("cast", "x16", vec![("x", (&x).into()), ("dtype", Tensor::scalar_string("fp16").into())])?;
    let y =
        f.op1("linear", "lin", vec![("x", (&x16).into()), ("weight", (&w).into()), ("bias", fp16(&[32], 3).into())])?;
    let y =
        f.op1("gelu", "act", vec![("x", (&y).into()), ("mode", Tensor::scalar_string("TANH_APPROXIMATION").into())])?;
    let y = f.op1("cast", "y", vec![("x", (&y).into()), ("dtype", Tensor::scalar_string("fp32").into())])?;
    f.output(&y, "y")?;
    let mut prog = ProgramBuilder::new(Target::Ios18);
    prog.add_function(f.finish()?)?;
    pkg.commit(&prog.finish()?)
}

/// Two functions (`decode` with 1 token, `prefill` with 4) reading the same weight blobs.
pub fn multifunction(path: &Path) -> Result<PathBuf> {
    let mut pkg = PackageWriter::create(path, &WriteOptions::overwriting())?;
    let embed = pkg.weights().store(&fp16(&[64, 8], 11))?;
    let w = pkg.weights().store(&fp16(&[8, 8], 12))?;
    let mut prog = ProgramBuilder::new(Target::Ios18);
    for (name, len) in [("decode", 1), ("prefill", 4)] {
        let mut f = FunctionBuilder::new(name, Target::Ios18, pkg.weights())?;
        let ids = f.input("inputIds", DType::Int32, InputShape::Fixed(vec![1, len]))?;
        let cache = f.state("valueCache", &[1, 4, 8])?;
        let table = f.weight("embed", &embed);
        let h = f.op1("gather", "h", vec![("x", (&table).into()), ("indices", (&ids).into())])?;
        let h = f.op1("linear", "proj", vec![("x", (&h).into()), ("weight", Arg::Blob(&w))])?;
        let old = f.op1("read_state", "old", vec![("input", (&cache).into())])?;
        let upd = f.op1(
            "slice_update",
            "upd",
            vec![
                ("x", (&old).into()),
                ("update", (&h).into()),
                ("begin", i32s(&[0, 0, 0]).into()),
                ("end", i32s(&[1, len as i32, 8]).into()),
            ],
        )?;
        f.op("write_state", "store", vec![("input", (&cache).into()), ("data", (&upd).into())])?;
        let logits = f.op1(
            "matmul",
            "logits",
            vec![("x", (&h).into()), ("y", (&table).into()), ("transpose_y", Tensor::scalar_bool(true).into())],
        )?;
        f.output(&logits, "logits")?;
        prog.add_function(f.finish()?)?;
    }
    prog.set_default_function("decode");
    pkg.commit(&prog.finish()?)
}

/// Many ordinary ops in one function, so type inference is compared with coremltools' widely.
pub fn op_zoo(path: &Path) -> Result<PathBuf> {
    let mut pkg = PackageWriter::create(path, &WriteOptions::overwriting())?;
    let mut f = FunctionBuilder::new("main", Target::Ios18, pkg.weights())?;
    let x = f.input("x", DType::Fp32, InputShape::Fixed(vec![2, 3, 8]))?;
    let ids = f.input("ids", DType::Int32, InputShape::Fixed(vec![2, 3]))?;
    let h = f.op1("cast", "h", vec![("x", (&x).into()), ("dtype", Tensor::scalar_string("fp16").into())])?;
    let ln = f.op1(
        "layer_norm",
        "ln",
        vec![
            ("x", (&h).into()),
            ("axes", i32s(&[-1]).into()),
            ("gamma", fp16(&[8], 21).into()),
            ("beta", fp16(&[8], 22).into()),
        ],
    )?;
    let sq = f.op1("mul", "sq", vec![("x", (&ln).into()), ("y", (&ln).into())])?;
    let ms = f.op1(
        "reduce_mean",
        "ms",
        vec![("x", (&sq).into()), ("axes", i32s(&[-1]).into()), ("keep_dims", Tensor::scalar_bool(true).into())],
    )?;
    let r = f.op1("rsqrt", "r", vec![("x", (&ms).into())])?;
    let n = f.op1("mul", "n", vec![("x", (&ln).into()), ("y", (&r).into())])?;
    let s = f.op1("silu", "s", vec![("x", (&n).into())])?;
    let sm = f.op1("softmax", "sm", vec![("x", (&s).into()), ("axis", Tensor::scalar_i32(-1).into())])?;
    let mm = f.op1(
        "matmul",
        "mm",
        vec![("x", (&sm).into()), ("y", (&sm).into()), ("transpose_y", Tensor::scalar_bool(true).into())],
    )?;
    let band = f.op1(
        "band_part",
        "band",
        vec![("x", (&mm).into()), ("lower", Tensor::scalar_i32(-1).into()), ("upper", Tensor::scalar_i32(0).into())],
    )?;
    let table = f.constant("table", fp16(&[16, 8], 23))?;
    let g = f.op1(
        "gather",
        "g",
        vec![("x", (&table).into()), ("indices", (&ids).into()), ("axis", Tensor::scalar_i32(0).into())],
    )?;
    let parts = f.op(
        "split",
        "parts",
        vec![("x", (&g).into()), ("num_splits", Tensor::scalar_i32(2).into()), ("axis", Tensor::scalar_i32(-1).into())],
    )?;
    let cat = f.op1(
        "concat",
        "cat",
        vec![("values", Arg::Tuple(vec![&parts[1], &parts[0]])), ("axis", Tensor::scalar_i32(-1).into())],
    )?;
    let sl = f.op1(
        "slice_by_index",
        "sl",
        vec![("x", (&cat).into()), ("begin", i32s(&[0, 1, 0]).into()), ("end", i32s(&[2, 3, 8]).into())],
    )?;
    let sz = f.op1(
        "slice_by_size",
        "sz",
        vec![("x", (&sl).into()), ("begin", i32s(&[0, 0, 2]).into()), ("size", i32s(&[-1, 2, 4]).into())],
    )?;
    let ex = f.op1("expand_dims", "ex", vec![("x", (&sz).into()), ("axes", i32s(&[0]).into())])?;
    let sqz = f.op1("squeeze", "sqz", vec![("x", (&ex).into()), ("axes", i32s(&[0]).into())])?;
    let tl = f.op1("tile", "tl", vec![("x", (&sqz).into()), ("reps", i32s(&[1, 1, 2]).into())])?;
    let pd = f.op1("pad", "pd", vec![("x", (&tl).into()), ("pad", i32s(&[0, 0, 1, 0, 0, 0]).into())])?;
    let cs = f.op1("cumsum", "cs", vec![("x", (&pd).into()), ("axis", Tensor::scalar_i32(1).into())])?;
    let ge = f.op1("gelu", "ge", vec![("x", (&cs).into())])?;
    let tk = f.op("topk", "tk", vec![("x", (&ge).into()), ("k", Tensor::scalar_i32(3).into())])?;
    let am = f.op1("reduce_argmax", "am", vec![("x", (&band).into()), ("axis", Tensor::scalar_i32(-1).into())])?;
    let rng = f.op1(
        "range_1d",
        "rng",
        vec![
            ("end", Tensor::scalar_i32(3).into()),
            ("start", Tensor::scalar_i32(0).into()),
            ("step", Tensor::scalar_i32(1).into()),
        ],
    )?;
    let lt = f.op1("less", "lt", vec![("x", (&am).into()), ("y", (&rng).into())])?;
    let zero = f.op1("fill", "zero", vec![("shape", i32s(&[2, 3]).into()), ("value", Tensor::scalar_i32(0).into())])?;
    let sel = f.op1("select", "sel", vec![("cond", (&lt).into()), ("a", (&am).into()), ("b", (&zero).into())])?;
    let x4 = f.op1("expand_dims", "x4", vec![("x", (&h).into()), ("axes", i32s(&[-1]).into())])?;
    let cw = f.constant("cw", fp16(&[4, 3, 1, 1], 24))?;
    let cv = f.op1("conv", "cv", vec![("x", (&x4).into()), ("weight", (&cw).into())])?;
    let out = f.op1("cast", "out", vec![("x", (&tk[0]).into()), ("dtype", Tensor::scalar_string("fp32").into())])?;
    let cvo = f.op1("cast", "conv_out", vec![("x", (&cv).into()), ("dtype", Tensor::scalar_string("fp32").into())])?;
    f.output(&out, "out")?;
    f.output(&tk[1], "top_indices")?;
    f.output(&sel, "selected")?;
    f.output(&cvo, "conv_out")?;
    let mut prog = ProgramBuilder::new(Target::Ios18);
    prog.add_function(f.finish()?)?;
    pkg.commit(&prog.finish()?)
}

/// Writes every sample into `dir`; returns the package paths.
pub fn write_all(dir: &Path) -> Result<Vec<PathBuf>> {
    type Build = fn(&Path) -> Result<PathBuf>;
    let samples: [(&str, Build); 4] = [
        ("kv_cache.mlpackage", kv_cache),
        ("palettized.mlpackage", palettized),
        ("multifunction.mlpackage", multifunction),
        ("op_zoo.mlpackage", op_zoo),
    ];
    samples.iter().map(|(name, build)| build(&dir.join(name)).map_err(|e| e.context(*name))).collect()
}
