//! GGML tensor types, their dequantization to f32 and their grids in Core ML's form.
//!
//! Every `dequantize_*` routine follows ggml's reference `dequantize_row_*` (ggml-quants.c) operation
//! for operation, in f32, without fused multiply-adds, so the results are bit-identical to it.
//! The lattice i-quants, ternary and fp4 types are decoded in [`super::lattice`].

use super::lattice::{self, FP4_VALUES, IQ1_LEVELS, IQ2_LEVELS, IQ3S_LEVELS, IQ3XXS_LEVELS, TERNARY_LEVELS};
use crate::{Error, Result};
use corelm_format::DType;
use half::f16;

/// Elements per super-block of the K-quants.
pub const QK_K: usize = 256;

macro_rules! ggml_types {
    ($( $variant:ident = $id:literal, $name:literal, $block:expr, $size:expr; )*) => {
        /// A GGML tensor type, as stored in a GGUF tensor info.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum GgmlType {
            $( $variant, )*
        }

        impl GgmlType {
            /// All types this reader knows the block layout of.
            pub const ALL: &'static [GgmlType] = &[$( GgmlType::$variant, )*];

            /// The type with this GGUF id, if known.
            pub fn from_id(id: u32) -> Option<GgmlType> {
                match id {
                    $( $id => Some(GgmlType::$variant), )*
                    _ => None,
                }
            }

            /// The id GGUF files store for this type.
            pub fn id(self) -> u32 {
                match self {
                    $( GgmlType::$variant => $id, )*
                }
            }

            /// ggml's name for this type (`"Q4_K"`, `"F16"`, ...).
            pub fn name(self) -> &'static str {
                match self {
                    $( GgmlType::$variant => $name, )*
                }
            }

            /// Elements per block (1 for plain types).
            pub fn block_size(self) -> usize {
                match self {
                    $( GgmlType::$variant => $block, )*
                }
            }

            /// Bytes per block.
            pub fn type_size(self) -> usize {
                match self {
                    $( GgmlType::$variant => $size, )*
                }
            }
        }
    };
}

ggml_types! {
    F32 = 0, "F32", 1, 4;
    F16 = 1, "F16", 1, 2;
    Q4_0 = 2, "Q4_0", 32, 2 + 16;
    Q4_1 = 3, "Q4_1", 32, 2 + 2 + 16;
    Q5_0 = 6, "Q5_0", 32, 2 + 4 + 16;
    Q5_1 = 7, "Q5_1", 32, 2 + 2 + 4 + 16;
    Q8_0 = 8, "Q8_0", 32, 2 + 32;
    Q8_1 = 9, "Q8_1", 32, 2 + 2 + 32;
    Q2_K = 10, "Q2_K", QK_K, QK_K / 16 + QK_K / 4 + 2 + 2;
    Q3_K = 11, "Q3_K", QK_K, QK_K / 8 + QK_K / 4 + 12 + 2;
    Q4_K = 12, "Q4_K", QK_K, 2 + 2 + 12 + QK_K / 2;
    Q5_K = 13, "Q5_K", QK_K, 2 + 2 + 12 + QK_K / 8 + QK_K / 2;
    Q6_K = 14, "Q6_K", QK_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;
    Q8_K = 15, "Q8_K", QK_K, 4 + QK_K + 2 * QK_K / 16;
    IQ2_XXS = 16, "IQ2_XXS", QK_K, 2 + QK_K / 4;
    IQ2_XS = 17, "IQ2_XS", QK_K, 2 + QK_K / 4 + QK_K / 32;
    IQ3_XXS = 18, "IQ3_XXS", QK_K, 2 + QK_K / 4 + QK_K / 8;
    IQ1_S = 19, "IQ1_S", QK_K, 2 + QK_K / 8 + QK_K / 16;
    IQ4_NL = 20, "IQ4_NL", 32, 2 + 16;
    IQ3_S = 21, "IQ3_S", QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4;
    IQ2_S = 22, "IQ2_S", QK_K, 2 + QK_K / 4 + QK_K / 16;
    IQ4_XS = 23, "IQ4_XS", QK_K, 2 + 2 + QK_K / 2 + QK_K / 64;
    I8 = 24, "I8", 1, 1;
    I16 = 25, "I16", 1, 2;
    I32 = 26, "I32", 1, 4;
    I64 = 27, "I64", 1, 8;
    F64 = 28, "F64", 1, 8;
    IQ1_M = 29, "IQ1_M", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32;
    BF16 = 30, "BF16", 1, 2;
    TQ1_0 = 34, "TQ1_0", QK_K, 2 + 4 * 13;
    TQ2_0 = 35, "TQ2_0", QK_K, 2 + QK_K / 4;
    MXFP4 = 39, "MXFP4", 32, 1 + 16;
    NVFP4 = 40, "NVFP4", 64, 4 + 32;
}

impl GgmlType {
    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | F64 | I8 | I16 | I32) || self.grid_form().is_some()
    }

    /// Whether this type stores blocks of several elements with shared scales.
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// How this block type's grid is carried into Core ML, if it can be (see [`GridForm`]).
    pub fn grid_form(self) -> Option<GridForm> {
        use DType::{Int4, Int8, Uint4};
        use GgmlType::*;
        let form = |container, run, min, exact_scales, lut| GridForm { container, run, min, exact_scales, lut };
        // An index into `levels`. `exact_scales`: every run scale is the block's own fp16
        // (Q5_0, Q5_1, IQ4_NL, TQ*) or a ue4m3 value, all of which fp16 holds (NVFP4); MXFP4's
        // e8m0 scales span 2⁻¹²⁷..2¹²⁷, and the lattice types' are d times a sub-block factor.
        let lut = |run, min, exact_scales, levels: &'static [i8]| {
            form(index_container(levels), run, min, exact_scales, Some(levels))
        };
        Some(match self {
            Q4_0 => form(Int4, 32, false, true, None),
            Q4_1 => form(Uint4, 32, true, true, None),
            // Core ML's block scale takes no 2-, 3-, 5- or 6-bit integers; an index of that
            // width into a table of the integers themselves does.
            Q5_0 => lut(32, false, true, &SIGNED6),
            Q5_1 => lut(32, true, true, &SIGNED6),
            Q8_0 => form(Int8, 32, false, true, None),
            Q2_K => lut(16, true, false, &UNSIGNED2),
            Q3_K => lut(16, false, false, &SIGNED3),
            Q4_K => form(Uint4, 32, true, false, None),
            Q5_K => lut(32, true, false, &SIGNED6),
            Q6_K => lut(16, false, false, &SIGNED6),
            Q8_K => form(Int8, QK_K, false, false, None),
            IQ4_NL => lut(32, false, true, &IQ4_VALUES),
            IQ4_XS => lut(32, false, false, &IQ4_VALUES),
            IQ2_XXS => lut(32, false, false, &IQ2_LEVELS),
            IQ2_XS | IQ2_S => lut(16, false, false, &IQ2_LEVELS),
            IQ3_XXS => lut(32, false, false, &IQ3XXS_LEVELS),
            IQ3_S => lut(32, false, false, &IQ3S_LEVELS),
            IQ1_S => lut(32, false, false, &IQ1_LEVELS),
            IQ1_M => lut(16, false, false, &IQ1_LEVELS),
            TQ1_0 | TQ2_0 => lut(QK_K, false, true, &TERNARY_LEVELS),
            MXFP4 => lut(32, false, false, &FP4_VALUES),
            NVFP4 => lut(16, false, true, &FP4_VALUES),
            _ => return None,
        })
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The index type of a table of `levels`: 2, 3, 4 or 6 bits for 4, 8, 16 or 64 entries (Core
/// ML's `constexpr_lut_to_dense` wants exactly 2^bits entries).
fn index_container(levels: &[i8]) -> DType {
    match levels.len() {
        4 => DType::Uint2,
        8 => DType::Uint3,
        16 => DType::Uint4,
        64 => DType::Uint6,
        n => unreachable!("grid tables hold 4, 8, 16 or 64 levels, not {n}"),
    }
}

/// Integers as a table indexed by their `log2(N)`-bit two's complement: entry `i` is `i`
/// sign-extended.
const fn sign_extended<const N: usize>() -> [i8; N] {
    let shift = 8 - N.trailing_zeros();
    let mut t = [0i8; N];
    let mut i = 0;
    while i < N {
        t[i] = ((i as i8) << shift) >> shift;
        i += 1;
    }
    t
}

/// The 5- and 6-bit types' integers: Q5_0 and Q6_K signed, Q5_1 and Q5_K from 0.
pub const SIGNED6: [i8; 64] = sign_extended::<64>();
/// Q3_K's integers, −4..3.
pub const SIGNED3: [i8; 8] = sign_extended::<8>();
/// Q2_K's integers, 0..3.
pub const UNSIGNED2: [i8; 4] = [0, 1, 2, 3];

/// The non-linear grid of IQ4_NL and IQ4_XS (ggml's `kvalues_iq4nl`): each 4-bit index selects
/// one of these, times the block's scale.
pub const IQ4_VALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// How a block type's weights map onto Core ML's iOS 18 constexpr ops. Every block type here
/// is a sequence of runs of `run` weights, each weight `a·q − b` with one integer `q` per
/// weight and `a`, `b` per run (for the table types `q` is `lut[index]`). Core ML's
/// `constexpr_blockwise_shift_scale` computes `scale·(data − offset)` with fp16 `scale` and
/// `offset` per block of `run` weights: `data` holds the integers in `container` (the narrowest
/// type that op accepts for their range), `scale` = fp16(a), `offset` = fp16(b / scale). For the
/// table types (the 5- and 6-bit types, IQ4, lattice, ternary, fp4) `data` is the output of a
/// `constexpr_lut_to_dense` of the indices (in `container`: uint2, uint3, uint4 or uint6) over `lut`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridForm {
    pub container: DType,
    /// Weights per scale.
    pub run: usize,
    /// Whether runs have a minimum `b` (carried as an fp16 offset).
    pub min: bool,
    /// Whether every `a` is an fp16 value already (the block's own scale), so that without a
    /// minimum the grid is carried exactly.
    pub exact_scales: bool,
    /// The type's table of levels (4, 8, 16 or 64 of them), which the stored values index.
    pub lut: Option<&'static [i8]>,
}

impl GridForm {
    /// The index a decoded value `q` is stored as: itself, or for the table types its low bits
    /// (the decoders give table positions, or for [`SIGNED6`] the integers themselves).
    pub fn index(self, q: i8) -> i8 {
        self.lut.map_or(q, |lut| (q as u8 as usize & (lut.len() - 1)) as i8)
    }

    /// The integer a decoded value `q` stands for: itself, or for the table types its entry.
    pub fn level(self, q: i8) -> f32 {
        self.lut.map_or(f32::from(q), |lut| f32::from(lut[self.index(q) as usize]))
    }
}

/// A tensor's grid as Core ML stores it (see [`GridForm`]).
#[derive(Debug, PartialEq)]
pub struct CarriedGrid {
    pub form: GridForm,
    /// One integer per weight, in storage order (LUT indices for the table types).
    pub values: Vec<i8>,
    /// One per run, fp16 values.
    pub scales: Vec<f32>,
    pub offsets: Option<Vec<f32>>,
    /// The largest |carried − dequantized| over the tensor, both in f32 (0: exact).
    pub max_error: f32,
}

/// The grid of `data` (whole blocks of `dtype`) in Core ML's form, scales and offsets in
/// `scales` (fp16, or fp32 for fp32 packages: then rounded to f32 only); `None` if the type has
/// no form.
pub fn carried_grid(dtype: GgmlType, data: &[u8], scales: DType) -> Option<CarriedGrid> {
    let form = dtype.grid_form()?;
    let size = dtype.type_size();
    let n = data.len() / size * dtype.block_size();
    let mut g = CarriedGrid {
        form,
        values: Vec::with_capacity(n),
        scales: Vec::with_capacity(n / form.run),
        offsets: form.min.then(|| Vec::with_capacity(n / form.run)),
        max_error: 0.0,
    };
    let level = |q: i8| form.level(q);
    let round = |v: f32| if scales == DType::Fp32 { v } else { f16::from_f32(v).to_f32() };
    let mut carry = |a: f32, b: Option<f32>, q: &[i8]| {
        let scale = round(a);
        let (scale, offset, ones) = match (b, scale == 0.0) {
            // Every weight of the run is −b: carried as 1·(−b) − 0.
            (Some(b), true) => (round(-b), 0.0, true),
            (Some(b), false) => (scale, round(b / scale), false),
            (None, _) => (scale, 0.0, false),
        };
        for &qi in q {
            let exact = a * level(qi) - b.unwrap_or(0.0);
            let carried = if ones { scale } else { scale * (level(qi) - offset) };
            g.max_error = g.max_error.max((carried - exact).abs());
        }
        if ones {
            g.values.extend(std::iter::repeat_n(1, q.len()));
        } else {
            g.values.extend(q.iter().map(|&qi| form.index(qi)));
        }
        g.scales.push(scale);
        if let Some(o) = g.offsets.as_mut() {
            o.push(offset);
        }
    };
    for b in data.chunks_exact(size) {
        decode_block(dtype, b, &mut carry);
    }
    Some(g)
}

#[inline]
pub(super) fn half(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Dequantizes `data`, a whole number of `dtype` blocks, to f32 in storage order.
///
/// Fails (without panicking) if `data` is not a whole number of blocks or the type has no
/// dequantizer here.
pub fn dequantize(dtype: GgmlType, data: &[u8]) -> Result<Vec<f32>> {
    let (block, size) = (dtype.block_size(), dtype.type_size());
    if !data.len().is_multiple_of(size) {
        return Err(Error::invalid(format!(
            "{} bytes of {dtype} data is not a whole number of {size}-byte blocks",
            data.len()
        )));
    }
    let n = data.len() / size * block;
    let mut out = vec![0f32; n];
    dequantize_into(dtype, data, &mut out)?;
    Ok(out)
}

/// Like [`dequantize`], writing into `out`, which must hold exactly the element count.
pub fn dequantize_into(dtype: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let (block, size) = (dtype.block_size(), dtype.type_size());
    if !data.len().is_multiple_of(size) || data.len() / size * block != out.len() {
        return Err(Error::invalid(format!(
            "{} bytes of {dtype} data do not make {} elements ({block} per {size}-byte block)",
            data.len(),
            out.len()
        )));
    }
    let blocks = data.chunks_exact(size).zip(out.chunks_exact_mut(block));
    match dtype {
        GgmlType::F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = half(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
        }
        GgmlType::F64 => blocks.for_each(|(b, y)| y[0] = f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32),
        GgmlType::I8 => blocks.for_each(|(b, y)| y[0] = f32::from(b[0] as i8)),
        GgmlType::I16 => blocks.for_each(|(b, y)| y[0] = f32::from(i16::from_le_bytes([b[0], b[1]]))),
        GgmlType::I32 => blocks.for_each(|(b, y)| y[0] = i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32),
        t => {
            let form = t.grid_form().ok_or_else(|| Error::invalid(format!("dequantizing {t} is not supported")))?;
            let level = |q: i8| form.level(q);
            for (b, y) in blocks {
                let mut at = 0;
                decode_block(t, b, &mut |a, min, q| {
                    for (yj, &qj) in y[at..at + q.len()].iter_mut().zip(q) {
                        // ggml's order: a·q, then − b (no fused multiply-add).
                        *yj = match min {
                            Some(b) => a * level(qj) - b,
                            None => a * level(qj),
                        };
                    }
                    at += q.len();
                });
            }
        }
    }
    Ok(())
}

/// Receives the runs of a block: `(a, b, q)` for weights `a·q − b`.
pub(super) type Runs<'a> = dyn FnMut(f32, Option<f32>, &[i8]) + 'a;

/// Hands each run of one block to `run(a, b, q)`, in storage order: the weights are `a·q − b`
/// (`b` `None`: `a·q`). Follows ggml's `dequantize_row_*` (ggml-quants.c) for how the bits and
/// the run parameters are laid out and computed (in f32, as ggml does).
fn decode_block(dtype: GgmlType, b: &[u8], run: &mut Runs) {
    match dtype {
        GgmlType::Q4_0 => q4_0(b, run),
        GgmlType::Q4_1 => q4_1(b, run),
        GgmlType::Q5_0 => q5_0(b, run),
        GgmlType::Q5_1 => q5_1(b, run),
        GgmlType::Q8_0 => run(half(b, 0), None, &as_i8::<32>(&b[2..34])),
        GgmlType::Q2_K => q2_k(b, run),
        GgmlType::Q3_K => q3_k(b, run),
        GgmlType::Q4_K | GgmlType::Q5_K => q4_q5_k(dtype == GgmlType::Q5_K, b, run),
        GgmlType::Q6_K => q6_k(b, run),
        GgmlType::Q8_K => run(f32::from_le_bytes([b[0], b[1], b[2], b[3]]), None, &as_i8::<QK_K>(&b[4..4 + QK_K])),
        GgmlType::IQ4_NL => run(half(b, 0), None, &nibbles(&b[2..18])),
        GgmlType::IQ4_XS => iq4_xs(b, run),
        GgmlType::IQ2_XXS => lattice::iq2_xxs(b, run),
        GgmlType::IQ2_XS => lattice::iq2_xs(b, run),
        GgmlType::IQ2_S => lattice::iq2_s(b, run),
        GgmlType::IQ3_XXS => lattice::iq3_xxs(b, run),
        GgmlType::IQ3_S => lattice::iq3_s(b, run),
        GgmlType::IQ1_S => lattice::iq1_s(b, run),
        GgmlType::IQ1_M => lattice::iq1_m(b, run),
        GgmlType::TQ1_0 => lattice::tq1_0(b, run),
        GgmlType::TQ2_0 => lattice::tq2_0(b, run),
        GgmlType::MXFP4 => lattice::mxfp4(b, run),
        GgmlType::NVFP4 => lattice::nvfp4(b, run),
        other => unreachable!("{other} has no grid form"),
    }
}

fn as_i8<const N: usize>(b: &[u8]) -> [i8; N] {
    std::array::from_fn(|i| b[i] as i8)
}

/// 16 bytes of packed 4-bit values: the low nibbles are values 0..16, the high ones 16..32.
pub(super) fn nibbles(qs: &[u8]) -> [i8; 32] {
    let mut q = [0i8; 32];
    for (j, &byte) in qs.iter().enumerate() {
        q[j] = (byte & 0x0F) as i8;
        q[j + 16] = (byte >> 4) as i8;
    }
    q
}

// block_q4_0 { f16 d; u8 qs[16]; }: d·(q − 8)
fn q4_0(b: &[u8], run: &mut Runs) {
    run(half(b, 0), None, &nibbles(&b[2..18]).map(|q| q - 8));
}

// block_q4_1 { f16 d; f16 m; u8 qs[16]; }: d·q + m
fn q4_1(b: &[u8], run: &mut Runs) {
    run(half(b, 0), Some(-half(b, 2)), &nibbles(&b[4..20]));
}

/// The 32 5-bit values of Q5_0/Q5_1: low nibbles from `qs`, fifth bits from `qh`.
fn five_bit(qh: u32, qs: &[u8]) -> [i8; 32] {
    let mut q = nibbles(qs);
    for j in 0..16 {
        q[j] |= ((((qh >> j) << 4) & 0x10) as u8) as i8;
        q[j + 16] |= (((qh >> (j + 12)) & 0x10) as u8) as i8;
    }
    q
}

// block_q5_0 { f16 d; u8 qh[4]; u8 qs[16]; }: d·(q − 16)
fn q5_0(b: &[u8], run: &mut Runs) {
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    run(half(b, 0), None, &five_bit(qh, &b[6..22]).map(|q| q - 16));
}

// block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16]; }: d·q + m
fn q5_1(b: &[u8], run: &mut Runs) {
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    run(half(b, 0), Some(-half(b, 2)), &five_bit(qh, &b[8..24]));
}

// block_q2_K { u8 scales[16]; u8 qs[64]; f16 d; f16 dmin; }: runs of 16, d·(sc & 15)·q − dmin·(sc >> 4)
fn q2_k(b: &[u8], run: &mut Runs) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let (d, min) = (half(b, 80), half(b, 82));
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[32 * n..32 * n + 32];
        for shift in [0u32, 2, 4, 6] {
            for half_idx in 0..2 {
                let sc = scales[is];
                is += 1;
                let values: [i8; 16] = std::array::from_fn(|l| ((q[l + 16 * half_idx] >> shift) & 3) as i8);
                run(d * f32::from(sc & 0x0F), Some(min * f32::from(sc >> 4)), &values);
            }
        }
    }
}

// block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d; }: runs of 16, d·(sc − 32)·q
fn q3_k(b: &[u8], run: &mut Runs) {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let hm = &b[0..32];
    let qs = &b[32..96];
    let sb = &b[96..108];
    let d_all = half(b, 108);

    let word = |i: usize| u32::from_le_bytes([sb[4 * i], sb[4 * i + 1], sb[4 * i + 2], sb[4 * i + 3]]);
    let (a0, a1, tmp) = (word(0), word(1), word(2));
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut scales = [0i8; 16];
    for (i, w) in aux.iter().enumerate() {
        for (k, byte) in w.to_le_bytes().iter().enumerate() {
            scales[4 * i + k] = *byte as i8;
        }
    }

    let mut is = 0;
    let mut m: u8 = 1;
    for n in 0..2 {
        let q = &qs[32 * n..32 * n + 32];
        for shift in [0u32, 2, 4, 6] {
            for half_idx in 0..2 {
                let dl = d_all * f32::from(i16::from(scales[is]) - 32);
                is += 1;
                let values: [i8; 16] = std::array::from_fn(|l| {
                    let i = l + 16 * half_idx;
                    let high = if hm[i] & m != 0 { 0 } else { 4 };
                    ((q[i] >> shift) & 3) as i8 - high
                });
                run(dl, None, &values);
            }
            m <<= 1;
        }
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8).
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

// block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }
// block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }
// Runs of 32: d·sc·q − dmin·m, q 4-bit (Q4_K) or 5-bit with its fifth bit from qh (Q5_K).
fn q4_q5_k(five: bool, b: &[u8], run: &mut Runs) {
    let (d, min) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let (qh, qs) = if five { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
    for j in 0..4 {
        let ql = &qs[32 * j..32 * j + 32];
        for (k, shift) in [(0, 0), (1, 4)] {
            let (sc, m) = scale_min_k4(2 * j + k, scales);
            let high_bit = 1u8 << (2 * j + k);
            let values: [i8; 32] = std::array::from_fn(|l| {
                let high = if five && qh[l] & high_bit != 0 { 16 } else { 0 };
                (((ql[l] >> shift) & 0x0F) + high) as i8
            });
            run(d * f32::from(sc), Some(min * f32::from(m)), &values);
        }
    }
}

// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }: runs of 16, d·sc·(q − 32)
fn q6_k(b: &[u8], run: &mut Runs) {
    let d = half(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        // Weight 32·k + l of this half takes the low or high nibble of ql[l] or ql[l + 32]
        // and bits 2k, 2k+1 of qh[l].
        let value = |k: usize, l: usize| {
            let byte = if k.is_multiple_of(2) { ql[l] } else { ql[l + 32] };
            let low = if k < 2 { byte & 0x0F } else { byte >> 4 };
            (low | (((qh[l] >> (2 * k)) & 3) << 4)) as i8 - 32
        };
        for k in 0..4 {
            for h in 0..2 {
                let values: [i8; 16] = std::array::from_fn(|l| value(k, 16 * h + l));
                run(d * f32::from(sc[2 * k + h] as i8), None, &values);
            }
        }
    }
}

// block_iq4_xs { f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]; }: runs of 32,
// d·(ls − 32)·lut[q], ls 6-bit (4 bits from scales_l, 2 from scales_h)
fn iq4_xs(b: &[u8], run: &mut Runs) {
    let d = half(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let scales_l = &b[4..8];
    for ib in 0..8 {
        let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0F;
        let ls = i32::from(low) | ((i32::from(scales_h >> (2 * ib)) & 3) << 4);
        run(d * (ls - 32) as f32, None, &nibbles(&b[8 + 16 * ib..8 + 16 * ib + 16]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables the 2-, 3-, 5- and 6-bit types index: each integer at its two's complement.
    #[test]
    fn integer_tables_hold_each_value_at_its_index() {
        assert_eq!(SIGNED3, [0, 1, 2, 3, -4, -3, -2, -1]);
        assert_eq!((SIGNED6[0], SIGNED6[31], SIGNED6[32], SIGNED6[63]), (0, 31, -32, -1));
        for (ty, values) in [(GgmlType::Q3_K, -4..4), (GgmlType::Q6_K, -32..32), (GgmlType::Q5_1, 0..32)] {
            let form = ty.grid_form().unwrap();
            for q in values {
                assert_eq!(form.level(q), f32::from(q), "{ty} {q}");
                assert!((form.index(q) as usize) < form.lut.unwrap().len());
            }
        }
    }

    #[test]
    fn sizes_match_ggml() {
        // sizeof(block_*) in ggml-common.h
        let expect = [
            (GgmlType::Q4_0, 18),
            (GgmlType::Q4_1, 20),
            (GgmlType::Q5_0, 22),
            (GgmlType::Q5_1, 24),
            (GgmlType::Q8_0, 34),
            (GgmlType::Q2_K, 84),
            (GgmlType::Q3_K, 110),
            (GgmlType::Q4_K, 144),
            (GgmlType::Q5_K, 176),
            (GgmlType::Q6_K, 210),
            (GgmlType::Q8_K, 292),
            (GgmlType::IQ2_XXS, 66),
            (GgmlType::IQ2_XS, 74),
            (GgmlType::IQ2_S, 82),
            (GgmlType::IQ3_XXS, 98),
            (GgmlType::IQ3_S, 110),
            (GgmlType::IQ1_S, 50),
            (GgmlType::IQ1_M, 56),
            (GgmlType::IQ4_NL, 18),
            (GgmlType::IQ4_XS, 136),
            (GgmlType::TQ1_0, 54),
            (GgmlType::TQ2_0, 66),
            (GgmlType::MXFP4, 17),
            (GgmlType::NVFP4, 36),
        ];
        for (t, size) in expect {
            assert_eq!(t.type_size(), size, "{t}");
        }
        for &t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
        assert_eq!(GgmlType::from_id(4), None);
    }

    #[test]
    fn q4_0_by_hand() {
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2] = 0xF0; // element 0 -> 0-8, element 16 -> 15-8
        let y = dequantize(GgmlType::Q4_0, &b).unwrap();
        assert_eq!(y[0], -4.0);
        assert_eq!(y[16], 3.5);
        assert_eq!(y[1], -4.0);
    }

    #[test]
    fn partial_blocks_are_refused() {
        let e = dequantize(GgmlType::Q8_0, &[0u8; 35]).unwrap_err().to_string();
        assert!(e.contains("not a whole number of 34-byte blocks"), "{e}");
        let e = dequantize(GgmlType::Q8_1, &[0u8; 36]).unwrap_err().to_string();
        assert!(e.contains("dequantizing Q8_1 is not supported"), "{e}");
    }

    #[test]
    fn index_containers_fit_the_tables() {
        for &t in GgmlType::ALL {
            let Some(GridForm { container, lut: Some(lut), .. }) = t.grid_form() else { continue };
            assert_eq!(container.bit_width().map(|b| 1 << b), Some(lut.len()), "{t}");
            assert_eq!(t.block_size() % t.grid_form().unwrap().run, 0, "{t}");
        }
    }
}
