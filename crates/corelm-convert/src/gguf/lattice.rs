//! Decoders of the lattice i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S), the
//! ternary types (TQ1_0, TQ2_0) and the fp4 types (MXFP4, NVFP4), in the runs form of
//! [`super::quants`]: every weight is `a·level[q]`, with `q` an index into one small table of
//! signed integer levels per type and `a` one f32 per run. Their reference is gguf-py's
//! `dequantize_blocks` (gguf.quants): `a` is computed in its operation order, and `a·level[q]`
//! is the one rounding it makes of the same real product, so the weights are bit-identical.
//!
//! The lattice types store each 4 or 8 weights as one codebook entry (a few magnitudes) plus a
//! sign per weight. Sign and magnitude together take at most 16 values, so a weight's index is
//! `magnitude index | negative << bits` into a table of the signed magnitudes: a Core ML LUT
//! of 8 or 16 entries that needs no per-block table.

use super::lattice_tables::{
    IQ1S_GRID, IQ1_VALUES, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ2_MAGNITUDES, IQ3S_GRID, IQ3S_MAGNITUDES, IQ3XXS_GRID,
    IQ3XXS_MAGNITUDES, KSIGNS,
};
use super::quants::{half, nibbles, Runs, QK_K};

pub(super) use super::lattice_tables::FP4_VALUES;

/// `magnitudes` then their negatives, each half padded with zeros to `N / 2`: the levels
/// indexed by `magnitude index | negative << log2(N / 2)`.
const fn signed<const N: usize>(magnitudes: &[i8]) -> [i8; N] {
    let mut out = [0i8; N];
    let mut i = 0;
    while i < magnitudes.len() {
        out[i] = magnitudes[i];
        out[i + N / 2] = -magnitudes[i];
        i += 1;
    }
    out
}

/// IQ2_*: ±{8, 25, 43}, 3-bit indices.
pub(super) const IQ2_LEVELS: [i8; 8] = signed(&IQ2_MAGNITUDES);
/// IQ3_XXS: ±{4, 12, .., 52, 62}, 4-bit indices.
pub(super) const IQ3XXS_LEVELS: [i8; 16] = signed(&IQ3XXS_MAGNITUDES);
/// IQ3_S: ±{1, 3, .., 15}, 4-bit indices.
pub(super) const IQ3S_LEVELS: [i8; 16] = signed(&IQ3S_MAGNITUDES);

/// IQ1_S/IQ1_M weights are `dl·(g + δ)`, `g` ∈ {−1, 0, 1} from the grid, δ = ±1/8 per group.
/// Folded into one level, `8·(g + δ)` ∈ {±1, ±7, ±9}, times `a = dl/8`: the division is exact
/// (a power of two, and dl ≥ 2⁻²⁴ stays normal) and `(dl/8)·8(g + δ)` is the same real
/// product as gguf-py's `dl·(g + δ)` (g + δ is exact in f32), rounded once, so it is
/// bit-identical. Index `g index | (δ < 0) << 2`.
pub(super) const IQ1_LEVELS: [i8; 8] = {
    let mut out = [0i8; 8];
    let mut i = 0;
    while i < IQ1_VALUES.len() {
        out[i] = 8 * IQ1_VALUES[i] + 1;
        out[i + 4] = 8 * IQ1_VALUES[i] - 1;
        i += 1;
    }
    out
};

/// TQ1_0/TQ2_0: the stored digit minus one. Digit 3 cannot come out of TQ1_0's base-3 bytes and
/// is never written by ggml into TQ2_0, but gguf-py decodes it as 2, and so do we.
pub(super) const TERNARY_LEVELS: [i8; 4] = [-1, 0, 1, 2];

/// A lattice codebook: entry `e` is `dim` weights, element `k` being bits `bits·k..bits·(k+1)`
/// of `grid[e]`, an index into the type's magnitudes (IQ1: into `IQ1_VALUES`).
struct Codebook {
    grid: &'static [u16],
    bits: u32,
    dim: usize,
}

const IQ2XXS: Codebook = Codebook { grid: &IQ2XXS_GRID, bits: 2, dim: 8 };
const IQ2XS: Codebook = Codebook { grid: &IQ2XS_GRID, bits: 2, dim: 8 };
const IQ2S: Codebook = Codebook { grid: &IQ2S_GRID, bits: 2, dim: 8 };
const IQ3XXS: Codebook = Codebook { grid: &IQ3XXS_GRID, bits: 3, dim: 4 };
const IQ3S: Codebook = Codebook { grid: &IQ3S_GRID, bits: 3, dim: 4 };
const IQ1S: Codebook = Codebook { grid: &IQ1S_GRID, bits: 2, dim: 8 };

/// One 256-weight block of a lattice type, as `runs` runs of `QK_K / runs` weights: run `r` has
/// scale `scale(r)`, weights `dim·i..dim·(i + 1)` are codebook entry `entry(i)`, and weight `w`
/// is negative where bit `w % 8` of `sign(w / 8)` is set (IQ1: where its δ is). Every layout
/// below is these three accessors; `entry` must stay below the codebook's length, which each
/// type's masks guarantee.
fn lattice(
    book: &Codebook,
    runs: usize,
    scale: impl Fn(usize) -> f32,
    entry: impl Fn(usize) -> usize,
    sign: impl Fn(usize) -> u8,
    run: &mut Runs,
) {
    let n = QK_K / runs;
    let mask = (1u16 << book.bits) - 1;
    let mut q = [0i8; 32];
    for r in 0..runs {
        for (e, group) in q[..n].chunks_exact_mut(book.dim).enumerate() {
            let i = r * n / book.dim + e;
            let packed = book.grid[entry(i)];
            for (k, qk) in group.iter_mut().enumerate() {
                let w = i * book.dim + k;
                let magnitude = (packed >> (book.bits * k as u32)) & mask;
                let negative = u16::from((sign(w / 8) >> (w % 8)) & 1);
                *qk = (magnitude | negative << book.bits) as i8;
            }
        }
        run(scale(r), None, &q[..n]);
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The 4-bit field `r` of packed nibbles starting at `at`, low nibble first.
fn nibble(b: &[u8], at: usize, r: usize) -> u8 {
    (b[at + r / 2] >> (4 * (r % 2))) & 0x0F
}

/// IQ2_XXS and IQ3_XXS: runs of 32, each with a u32 `aux` (at `aux_at + aux_stride·r`) of four
/// 7-bit indices into `KSIGNS` (one sign byte per 8 weights) and a 4-bit scale `s` on top;
/// the run's entries are bytes `2 + 8r..`. `db = d·(0.5 + s)·factor`, in gguf-py's order.
fn xxs(b: &[u8], run: &mut Runs, book: &Codebook, aux_at: usize, aux_stride: usize, factor: f32) {
    let d = half(b, 0);
    let aux = |r: usize| u32_at(b, aux_at + aux_stride * r);
    let per_run = 32 / book.dim;
    lattice(
        book,
        QK_K / 32,
        |r| d * (0.5 + (aux(r) >> 28) as f32) * factor,
        |i| usize::from(b[2 + 8 * (i / per_run) + i % per_run]),
        |j| KSIGNS[((aux(j / 4) >> (7 * (j % 4))) & 0x7F) as usize],
        run,
    );
}

// block_iq2_xxs { f16 d; u16 qs[32]; }: per 32 weights, 4 entry bytes then aux.
pub(super) fn iq2_xxs(b: &[u8], run: &mut Runs) {
    xxs(b, run, &IQ2XXS, 6, 8, 0.25);
}

// block_iq3_xxs { f16 d; u8 qs[64]; u32 aux[8]; }: the entries first, then aux per 32 weights.
pub(super) fn iq3_xxs(b: &[u8], run: &mut Runs) {
    xxs(b, run, &IQ3XXS, 2 + QK_K / 4, 4, 0.5);
}

/// IQ2_XS and IQ2_S: runs of 16, `db = d·(0.5 + s)·0.25` with `s` the run's nibble of the 8
/// scale bytes at `scales_at`.
fn iq2_per_16(
    b: &[u8],
    run: &mut Runs,
    book: &Codebook,
    scales_at: usize,
    entry: impl Fn(usize) -> usize,
    sign: impl Fn(usize) -> u8,
) {
    let d = half(b, 0);
    lattice(book, QK_K / 16, |r| d * (0.5 + f32::from(nibble(b, scales_at, r))) * 0.25, entry, sign, run);
}

// block_iq2_xs { f16 d; u16 qs[32]; u8 scales[8]; }: each qs is a 9-bit entry and a 7-bit
// KSIGNS index for its 8 weights.
pub(super) fn iq2_xs(b: &[u8], run: &mut Runs) {
    let qs = |i: usize| u16_at(b, 2 + 2 * i);
    iq2_per_16(b, run, &IQ2XS, 66, |i| usize::from(qs(i) & 0x1FF), |j| KSIGNS[usize::from(qs(j) >> 9)]);
}

// block_iq2_s { f16 d; u8 qs[32]; u8 signs[32]; u8 qh[8]; u8 scales[8]; }: 10-bit entries, the
// top 2 bits in qh; the signs are stored as they are.
pub(super) fn iq2_s(b: &[u8], run: &mut Runs) {
    let entry = |i: usize| usize::from(b[2 + i]) | usize::from((b[66 + i / 4] >> (2 * (i % 4))) & 3) << 8;
    iq2_per_16(b, run, &IQ2S, 74, entry, |j| b[34 + j]);
}

// block_iq3_s { f16 d; u8 qs[64]; u8 qh[8]; u8 signs[32]; u8 scales[4]; }: runs of 32, 9-bit
// entries (ninth bit in qh), db = d·(1 + 2s).
pub(super) fn iq3_s(b: &[u8], run: &mut Runs) {
    let d = half(b, 0);
    let entry = |i: usize| usize::from(b[2 + i]) | usize::from((b[66 + i / 8] >> (i % 8)) & 1) << 8;
    lattice(&IQ3S, QK_K / 32, |r| d * f32::from(1 + 2 * nibble(b, 106, r)), entry, |j| b[74 + j], run);
}

/// The IQ1 run scale `dl/8` for `dl = d·(2s + 1)` (see [`IQ1_LEVELS`]), and the sign byte
/// standing for δ's sign over one 8-weight entry.
fn iq1_scale(d: f32, s: u16) -> f32 {
    d * f32::from(2 * s + 1) / 8.0
}

fn iq1_delta(negative: bool) -> u8 {
    if negative {
        0xFF
    } else {
        0
    }
}

// block_iq1_s { f16 d; u8 qs[32]; u16 qh[8]; }: per 32 weights one qh holding the top 3 bits of
// its 4 entries (11-bit), the scale s (bits 12..15) and δ's sign (bit 15).
pub(super) fn iq1_s(b: &[u8], run: &mut Runs) {
    let d = half(b, 0);
    let qh = |r: usize| u16_at(b, 34 + 2 * r);
    let entry = |i: usize| usize::from(b[2 + i]) | usize::from((qh(i / 4) >> (3 * (i % 4))) & 7) << 8;
    let scale = |r: usize| iq1_scale(d, (qh(r) >> 12) & 7);
    lattice(&IQ1S, QK_K / 32, scale, entry, |j| iq1_delta(qh(j / 4) & 0x8000 != 0), run);
}

// block_iq1_m { u8 qs[32]; u8 qh[16]; u16 scales[4]; }: one qh nibble per entry (top 3 bits,
// then δ's sign), 3-bit scales per 16 weights in the low 12 bits of the scales, and the f16 d
// spread over their top nibbles.
pub(super) fn iq1_m(b: &[u8], run: &mut Runs) {
    let sc = |k: usize| u16_at(b, 48 + 2 * k);
    let d_bits = (sc(0) >> 12) | ((sc(1) >> 8) & 0x00F0) | ((sc(2) >> 4) & 0x0F00) | (sc(3) & 0xF000);
    let d = half(&d_bits.to_le_bytes(), 0);
    let entry = |i: usize| usize::from(b[i]) | usize::from(nibble(b, 32, i) & 7) << 8;
    let scale = |r: usize| iq1_scale(d, (sc(r / 4) >> (3 * (r % 4))) & 7);
    lattice(&IQ1S, QK_K / 16, scale, entry, |j| iq1_delta(nibble(b, 32, j) & 8 != 0), run);
}

// block_tq1_0 { u8 qs[48]; u8 qh[4]; f16 d; }: base-3 digits, 5 per qs byte and 4 per qh byte,
// each byte stored as ⌈x·256/243⌉ so that digit k is ((byte·3^k mod 256)·3) >> 8. Digit k of
// byte l of a part goes to weight `first + k·len + l`.
pub(super) fn tq1_0(b: &[u8], run: &mut Runs) {
    let mut q = [0i8; QK_K];
    for (bytes, digits, first) in [(&b[0..32], 5, 0), (&b[32..48], 5, 160), (&b[48..52], 4, 240)] {
        for k in 0..digits {
            for (l, &x) in bytes.iter().enumerate() {
                q[first + k as usize * bytes.len() + l] = ((u16::from(x.wrapping_mul(3u8.pow(k))) * 3) >> 8) as i8;
            }
        }
    }
    run(half(b, 52), None, &q);
}

// block_tq2_0 { u8 qs[64]; f16 d; }: 2-bit digits, weight 128j + 32k + l in bits 2k of qs[32j + l].
pub(super) fn tq2_0(b: &[u8], run: &mut Runs) {
    let q: [i8; QK_K] = std::array::from_fn(|w| ((b[32 * (w / 128) + w % 32] >> (2 * ((w / 32) % 4))) & 3) as i8);
    run(half(b, 64), None, &q);
}

// block_mxfp4 { u8 e; u8 qs[16]; }: 4-bit codes into the doubled e2m1 values, scale 2^(e−128)
// (gguf-py's e8m0_to_fp32_half: the halving is because the values are doubled; e < 2 gives the
// f32 subnormals 2⁻¹²⁸, 2⁻¹²⁷).
pub(super) fn mxfp4(b: &[u8], run: &mut Runs) {
    let e = u32::from(b[0]);
    let d = f32::from_bits(if e < 2 { 0x0020_0000 << e } else { (e - 1) << 23 });
    run(d, None, &nibbles(&b[1..17]));
}

/// gguf-py's `NVFP4.ue4m3_to_fp32`: unsigned e4m3 (bias 7, the byte's top bit ignored) halved
/// for the doubled values; 0 and 0x7F (e4m3's NaN) give 0. Every value is exact in f32 and in
/// fp16 (2⁻¹⁰..240), whatever order computes it.
fn ue4m3_half(x: u8) -> f32 {
    let (exp, man) = (i32::from((x >> 3) & 0x0F), f32::from(x & 7));
    let raw = if exp == 0 { man * 2f32.powi(-9) } else { (1.0 + man / 8.0) * 2f32.powi(exp - 7) };
    if x == 0 || x == 0x7F {
        0.0
    } else {
        raw * 0.5
    }
}

// block_nvfp4 { u8 d[4]; u8 qs[32]; }: four runs of 16, each a ue4m3 scale and 8 bytes of codes
// (low nibbles the first 8 weights, high nibbles the next 8).
pub(super) fn nvfp4(b: &[u8], run: &mut Runs) {
    for s in 0..4 {
        let qs = &b[4 + 8 * s..12 + 8 * s];
        let q: [i8; 16] = std::array::from_fn(|l| ((qs[l % 8] >> (4 * (l / 8))) & 0x0F) as i8);
        run(ue4m3_half(b[s]), None, &q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_signed_magnitudes() {
        assert_eq!(IQ2_LEVELS, [8, 25, 43, 0, -8, -25, -43, 0]);
        assert_eq!(IQ1_LEVELS, [-7, 1, 9, 0, -9, -1, 7, 0]);
        assert_eq!(IQ3S_LEVELS[7], 15);
        assert_eq!(IQ3XXS_LEVELS[15], -62);
    }

    #[test]
    fn codebook_entries_fit_their_fields() {
        for book in [IQ2XXS, IQ2XS, IQ2S, IQ3XXS, IQ3S, IQ1S] {
            let bits = book.bits * book.dim as u32;
            assert!(book.grid.iter().all(|&e| u32::from(e) < 1 << bits));
            // No field indexes past the magnitudes (IQ2 and IQ1 have 3 of 4 slots).
            let used = if book.bits == 2 { 3 } else { 8 };
            for &e in book.grid {
                assert!((0..book.dim).all(|k| (e >> (book.bits as usize * k)) & ((1 << book.bits) - 1) < used));
            }
        }
    }

    #[test]
    fn fp4_scales() {
        assert_eq!(ue4m3_half(0x38), 0.5); // exponent 7, mantissa 0: 1.0, halved
        assert_eq!(ue4m3_half(0x01), 2f32.powi(-10));
        assert_eq!(ue4m3_half(0x7F), 0.0);
        assert_eq!(ue4m3_half(0xFF), 240.0);
        let mut got = Vec::new();
        mxfp4(&[127, 0x21, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &mut |a, _, q| got.push((a, q[0], q[16])));
        assert_eq!(got, [(0.5, 1, 2)]);
    }
}
