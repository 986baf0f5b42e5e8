//! `out[m×n] = x[m×k] · wᵀ` for a weight held as `n` rows of `k` values: f32, fp16, or
//! integers with a scale (and offset) per block of columns. The weight is widened and
//! dequantized in registers, a few rows at a time, and never stored as f32: decode reads each
//! weight once in its stored size (it is memory bound), prefill reuses each loaded weight
//! vector across several rows of `x`.

use half::f16;
use rayon::prelude::*;

use crate::value::Packed;

/// A weight matrix's rows as stored.
#[derive(Clone, Copy)]
pub enum WeightRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    /// `scale · (q − offset)`, one scale (and offset) per `block` columns of each row; `q` as
    /// stored by [`Packed::Blockwise`] (signed bytes, or nibbles when `bits` is 4).
    Blockwise {
        q: &'a [u8],
        bits: u8,
        /// Each rebuilt weight is rounded to fp16 (the op's output type).
        fp16: bool,
        scales: &'a [f32],
        offsets: Option<&'a [f32]>,
        block: usize,
    },
    /// Nibble indices into sixteen-value palettes, one per `group_rows` rows (as stored by
    /// [`Packed::Palette`]).
    Palette {
        indices: &'a [u8],
        palettes: &'a [f32],
        group_rows: usize,
    },
}

impl<'a> WeightRows<'a> {
    pub fn of(p: &'a Packed) -> WeightRows<'a> {
        match p {
            Packed::F16 { data, .. } => WeightRows::F16(data),
            Packed::Blockwise { q, bits, fp16, scales, offsets, block, .. } => WeightRows::Blockwise {
                q,
                bits: *bits,
                fp16: *fp16,
                scales,
                offsets: offsets.as_deref(),
                block: *block,
            },
            Packed::Palette { indices, palettes, group_rows, .. } => {
                WeightRows::Palette { indices, palettes, group_rows: *group_rows }
            }
        }
    }

    /// Row `r` (of `k` columns) widened into `out`.
    pub fn row_into(&self, k: usize, r: usize, out: &mut [f32]) {
        match *self {
            WeightRows::F32(w) => out.copy_from_slice(&w[r * k..(r + 1) * k]),
            WeightRows::F16(w) => crate::value::f16_to_f32(&w[r * k..(r + 1) * k], out),
            WeightRows::Blockwise { q, bits, fp16, scales, offsets, block } => {
                let blocks = k / block;
                for (c, d) in out[..k].iter_mut().enumerate() {
                    let at = r * blocks + c / block;
                    let v = match bits {
                        8 => q[r * k + c] as i8,
                        // Shifting the nibble to the top of a byte and back sign-extends it.
                        _ => ((q[(r * k + c) / 2] >> (4 * (c % 2))) << 4) as i8 >> 4,
                    };
                    let w = scales[at] * (v as f32 - offsets.map_or(0.0, |o| o[at]));
                    *d = if fp16 { half::f16::from_f32(w).to_f32() } else { w };
                }
            }
            WeightRows::Palette { indices, palettes, group_rows } => {
                let palette = &palettes[r / group_rows * 16..][..16];
                for (c, d) in out[..k].iter_mut().enumerate() {
                    *d = palette[usize::from((indices[(r * k + c) / 2] >> (4 * (c % 2))) & 0x0f)];
                }
            }
        }
    }
}

/// Output columns are written by one task each; the pointer is shared across tasks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint columns of the output (see `matmul_t`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[m×n] = x[m×k] · wᵀ`, parallel over blocks of weight rows.
pub fn matmul_t(m: usize, k: usize, n: usize, x: &[f32], w: WeightRows, out: &mut [f32]) {
    assert!(x.len() >= m * k && out.len() >= m * n, "matmul_t: buffers smaller than m×k and m×n");
    #[cfg(target_arch = "x86_64")]
    {
        if m >= avx512::MIN_ROWS && avx512::usable(&w) {
            avx512::matmul_t(m, k, n, x, w, out);
            return;
        }
        if narrow::usable(&w, k) {
            narrow::matmul_t(m, k, n, x, w, out);
            return;
        }
    }
    let threads = rayon::current_num_threads().max(1);
    // Several tasks per thread balance the load; whole tiles of rows keep the kernel busy.
    let rows_per_task = n.div_ceil(threads * 4).next_multiple_of(8).max(16);
    let ptr = OutPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let rows = t * rows_per_task..((t + 1) * rows_per_task).min(n);
        // SAFETY: this task writes only the columns `rows` of each output row, inside `out`.
        unsafe { rows_block(m, k, n, x, w, rows, ptr) };
    };
    let tasks = n.div_ceil(rows_per_task);
    if m * n * k < 1 << 15 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// Computes output columns `rows` for all `m` rows of `x`.
///
/// # Safety
/// `out` must point at an m×n row-major buffer in which no one else touches columns `rows`.
unsafe fn rows_block(
    m: usize,
    k: usize,
    n: usize,
    x: &[f32],
    w: WeightRows,
    rows: std::ops::Range<usize>,
    out: OutPtr,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::usable(&w) {
            // SAFETY: the CPU features were checked; the caller vouches for `out`.
            unsafe { avx2::rows_block(m, k, n, x, w, rows, out.0) };
            return;
        }
    }
    let mut buf = vec![0f32; k];
    for r in rows {
        w.row_into(k, r, &mut buf);
        for i in 0..m {
            let v: f32 = x[i * k..(i + 1) * k].iter().zip(&buf).map(|(a, b)| a * b).sum();
            // SAFETY: (i, r) lies in this task's columns of the m×n output.
            unsafe { *out.0.add(i * n + r) = v };
        }
    }
}

/// Weight rows `r0..r0 + NR`, the last repeated where they pass `end` (so a tile never reads
/// past the range; [`store_tile`] drops the repeats).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn group_rows<const NR: usize>(r0: usize, end: usize) -> [usize; NR] {
    let mut r = [0usize; NR];
    for (j, rj) in r.iter_mut().enumerate() {
        *rj = (r0 + j).min(end - 1);
    }
    r
}

/// Writes an `MR`×`NR` tile of sums at rows `i..`, columns `r0..` (those before `end`) of the
/// m×n output.
///
/// # Safety
/// Those outputs lie in the buffer at `out` and are the caller's alone to write.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_tile<const MR: usize, const NR: usize>(
    out: *mut f32,
    i: usize,
    n: usize,
    r0: usize,
    end: usize,
    sums: &[[f32; NR]; MR],
) {
    for (ii, row) in sums.iter().enumerate() {
        for (j, &v) in row.iter().enumerate().take(end - r0) {
            // SAFETY: the caller vouches for rows i..i+MR, columns r0..end.
            unsafe { *out.add((i + ii) * n + r0 + j) = v };
        }
    }
}

/// Adds columns `from..k` of `MR` rows of `x` (from row `i`) times weight rows `r` to `sums`:
/// the columns past a vector kernel's last whole vector, which only unblocked weights have.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn add_tail_columns<const MR: usize, const NR: usize>(
    x: &[f32],
    i: usize,
    k: usize,
    w: &WeightRows,
    r: [usize; NR],
    from: usize,
    sums: &mut [[f32; NR]; MR],
) {
    for c in from..k {
        for j in 0..NR {
            let wv = match *w {
                WeightRows::F32(v) => v[r[j] * k + c],
                WeightRows::F16(v) => v[r[j] * k + c].to_f32(),
                WeightRows::Blockwise { .. } | WeightRows::Palette { .. } => return,
            };
            for (ii, row) in sums.iter_mut().enumerate() {
                row[j] += x[(i + ii) * k + c] * wv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::WeightRows;

    /// The CPU has AVX2, FMA and F16C, and the weight's blocks are whole vectors.
    pub fn usable(w: &WeightRows) -> bool {
        static FEATURES: OnceLock<bool> = OnceLock::new();
        let cpu = *FEATURES.get_or_init(|| {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
        });
        cpu && match w {
            WeightRows::Blockwise { block, .. } => block % 8 == 0,
            WeightRows::Palette { .. } => false,
            _ => true,
        }
    }

    /// Eight weights of row `r` from column `c`, as f32 (`scale`/`offset` already broadcast for
    /// the row's current block).
    #[inline(always)]
    pub(super) unsafe fn load(w: &WeightRows, k: usize, r: usize, c: usize, scale: __m256, offset: __m256) -> __m256 {
        // SAFETY (all arms): the caller keeps c + 8 <= k and r < rows, so reads stay in the row.
        unsafe {
            match *w {
                WeightRows::F32(v) => _mm256_loadu_ps(v.as_ptr().add(r * k + c)),
                WeightRows::F16(v) => _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(r * k + c) as *const __m128i)),
                WeightRows::Blockwise { q, bits: 8, fp16, .. } => {
                    let bytes = _mm_loadl_epi64(q.as_ptr().add(r * k + c) as *const __m128i);
                    let ints = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
                    to_fp16_if(fp16, _mm256_mul_ps(_mm256_sub_ps(ints, offset), scale))
                }
                WeightRows::Palette { .. } => unreachable!("palettes are not `usable` here"),
                WeightRows::Blockwise { q, fp16, .. } => {
                    // Eight nibbles (four bytes), one to a lane, sign-extended from bit 3.
                    let word = (q.as_ptr().add((r * k + c) / 2) as *const i32).read_unaligned();
                    let lanes =
                        _mm256_srlv_epi32(_mm256_set1_epi32(word), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
                    let nibbles = _mm256_and_si256(lanes, _mm256_set1_epi32(0x0f));
                    let eight = _mm256_set1_epi32(8);
                    let ints = _mm256_sub_epi32(_mm256_xor_si256(nibbles, eight), eight);
                    to_fp16_if(fp16, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(ints), offset), scale))
                }
            }
        }
    }

    /// Row `r` of a weight whose `usable` check passed, widened and dequantized into `out`
    /// (`k` values) eight at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequant_row(w: &WeightRows, k: usize, r: usize, out: &mut [f32]) {
        let WeightRows::Blockwise { scales, offsets, block, .. } = *w else {
            return w.row_into(k, r, out);
        };
        let blocks = k / block;
        // SAFETY: blocks are whole vectors (`usable`), so every load and store stays in the row.
        unsafe {
            for b in 0..blocks {
                let scale = _mm256_set1_ps(scales[r * blocks + b]);
                let offset = _mm256_set1_ps(offsets.map_or(0.0, |o| o[r * blocks + b]));
                for c in (b * block..(b + 1) * block).step_by(8) {
                    _mm256_storeu_ps(out.as_mut_ptr().add(c), load(w, k, r, c, scale, offset));
                }
            }
        }
    }

    /// Rounds to fp16 and back when the weight is fp16-typed.
    #[inline(always)]
    unsafe fn to_fp16_if(fp16: bool, v: __m256) -> __m256 {
        if fp16 {
            // SAFETY: register-only F16C conversions, available under the caller's features.
            unsafe { _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)) }
        } else {
            v
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: register-only intrinsics, available under the caller's features.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
        }
    }

    /// Dot products of `MR` rows of `x` (from row `i`) with weight rows `r` (`NR` of them).
    #[inline(always)]
    unsafe fn tile<const MR: usize, const NR: usize>(
        x: &[f32],
        i: usize,
        k: usize,
        w: &WeightRows,
        r: [usize; NR],
    ) -> [[f32; NR]; MR] {
        // SAFETY: all loads stay within rows i..i+MR of x and rows r of w (callers check).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NR]; MR];
            let (block, blocks) = match *w {
                WeightRows::Blockwise { block, .. } => (block, k / block),
                _ => (k - k % 8, 1),
            };
            let xp = x.as_ptr().add(i * k);
            for b in 0..blocks {
                let mut scale = [_mm256_set1_ps(1.0); NR];
                let mut offset = [_mm256_setzero_ps(); NR];
                if let WeightRows::Blockwise { scales, offsets, .. } = *w {
                    for j in 0..NR {
                        scale[j] = _mm256_set1_ps(*scales.get_unchecked(r[j] * blocks + b));
                        if let Some(o) = offsets {
                            offset[j] = _mm256_set1_ps(*o.get_unchecked(r[j] * blocks + b));
                        }
                    }
                }
                let mut c = b * block;
                while c < (b + 1) * block {
                    let mut wv = [_mm256_setzero_ps(); NR];
                    for j in 0..NR {
                        wv[j] = load(w, k, r[j], c, scale[j], offset[j]);
                    }
                    for (ii, row) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(xp.add(ii * k + c));
                        for j in 0..NR {
                            row[j] = _mm256_fmadd_ps(xv, wv[j], row[j]);
                        }
                    }
                    c += 8;
                }
            }
            let mut sums = [[0f32; NR]; MR];
            for ii in 0..MR {
                for j in 0..NR {
                    sums[ii][j] = hsum(acc[ii][j]);
                }
            }
            super::add_tail_columns(x, i, k, w, r, block, &mut sums);
            sums
        }
    }

    /// `MR` rows of `x` against all weight rows in `rows`, `NR` at a time (the last group
    /// repeats its final row rather than reading past the range).
    #[inline(always)]
    unsafe fn strip<const MR: usize, const NR: usize>(
        x: &[f32],
        i: usize,
        k: usize,
        n: usize,
        w: &WeightRows,
        rows: &std::ops::Range<usize>,
        out: *mut f32,
    ) {
        for r0 in rows.clone().step_by(NR) {
            let r = super::group_rows::<NR>(r0, rows.end);
            // SAFETY: rows i..i+MR and weight rows r are in range; outputs are this task's.
            unsafe { super::store_tile(out, i, n, r0, rows.end, &tile::<MR, NR>(x, i, k, w, r)) };
        }
    }

    /// Fewer rows of `x` leave registers for more weight rows at once (decode reads many
    /// weight streams in parallel; prefill reuses each weight vector across four rows).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_block(
        m: usize,
        k: usize,
        n: usize,
        x: &[f32],
        w: WeightRows,
        rows: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        // Weight rows in groups of about 48 KB, each swept against every row of x while it sits
        // in cache (the group size is a multiple of every strip's row count).
        let bytes_per_row = k * match w {
            WeightRows::F32(_) => 4,
            WeightRows::F16(_) => 2,
            WeightRows::Blockwise { .. } | WeightRows::Palette { .. } => 1,
        };
        let group = (48 * 1024 / bytes_per_row.max(1)).next_multiple_of(12).clamp(12, 240);
        let mut start = rows.start;
        while start < rows.end {
            let sub = start..(start + group).min(rows.end);
            let mut i = 0;
            // SAFETY: each call covers rows i.. of x that exist; the caller vouches for `out`.
            unsafe {
                while i < m {
                    match m - i {
                        1 => strip::<1, 6>(x, i, k, n, &w, &sub, out),
                        2 => strip::<2, 4>(x, i, k, n, &w, &sub, out),
                        3 => strip::<3, 3>(x, i, k, n, &w, &sub, out),
                        _ => strip::<4, 2>(x, i, k, n, &w, &sub, out),
                    }
                    i += (m - i).min(4);
                }
            }
            start = sub.end;
        }
    }
}

/// Products with few rows of `x` (decode): memory bound, so each weight is read once, in its
/// stored size, and widened in registers sixteen at a time with AVX-512, with the next rows
/// prefetched. Int4 nibbles go through a per-block table of their sixteen dequantized values
/// (one permute), so the fp16 rounding of each rebuilt weight costs once per block, not per
/// weight. Each weight form has its own instance of the loops (`FORM`), so no form's
/// parameters take registers from another's.
#[cfg(target_arch = "x86_64")]
mod narrow {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use rayon::prelude::*;

    use super::{OutPtr, WeightRows};

    /// The CPU has AVX-512F, and nibbles come in whole chunks of sixteen per row (so do the
    /// blocks of int4 and int8, each with its own scale).
    pub fn usable(w: &WeightRows, k: usize) -> bool {
        static FEATURES: OnceLock<bool> = OnceLock::new();
        let cpu = *FEATURES.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c") && is_x86_feature_detected!("fma")
        });
        cpu && match w {
            WeightRows::Blockwise { block, .. } => block % 16 == 0,
            WeightRows::Palette { .. } => k.is_multiple_of(16),
            _ => true,
        }
    }

    /// The weight forms, as `FORM` parameters.
    const F32: u8 = 0;
    const F16: u8 = 1;
    const INT8: u8 = 2;
    const INT4: u8 = 3;
    const PALETTE4: u8 = 4;

    fn form(w: &WeightRows) -> u8 {
        match w {
            WeightRows::F32(_) => F32,
            WeightRows::F16(_) => F16,
            WeightRows::Blockwise { bits: 8, .. } => INT8,
            WeightRows::Blockwise { .. } => INT4,
            WeightRows::Palette { .. } => PALETTE4,
        }
    }

    /// Row `r` of a palettized weight (`usable`, so k is a multiple of 16) looked up into `out`,
    /// sixteen columns at a time, in column order.
    ///
    /// # Safety
    /// The CPU and weight passed `usable`; `r` is a row of the weight and `out` holds `k` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn palette_row(w: &WeightRows, k: usize, r: usize, out: &mut [f32]) {
        let WeightRows::Palette { indices, palettes, group_rows } = *w else {
            return w.row_into(k, r, out);
        };
        // SAFETY: the palette of row r's group and the row's k/2 bytes of indices exist; chunks
        // of sixteen stay inside the row and `out`.
        unsafe {
            let palette = _mm512_loadu_ps(palettes.as_ptr().add(r / group_rows * 16));
            // Nibble l of a chunk's eight bytes, to lane l: the low word in lanes 0–7, the high in
            // 8–15, each shifted by 4·(l mod 8).
            let shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
            for c in (0..k).step_by(16) {
                let bytes = indices.as_ptr().add((r * k + c) / 2);
                let low = _mm256_set1_epi32((bytes as *const i32).read_unaligned());
                let high = _mm256_set1_epi32((bytes.add(4) as *const i32).read_unaligned());
                let words = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high);
                let lanes = _mm512_srlv_epi32(words, shifts);
                _mm512_storeu_ps(out.as_mut_ptr().add(c), _mm512_permutexvar_ps(lanes, palette));
            }
        }
    }

    /// Lane `l` of a 16-column chunk of int4 weights reads nibble `NIBBLE[l]` of the chunk's
    /// eight bytes: a 64-bit word broadcast to every lane and shifted by `4·(l/2)` puts nibble
    /// `l/2` (even lanes, low half) or `8 + l/2` (odd lanes, high half) in each lane's low bits.
    const NIBBLE: [usize; 16] = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15];

    pub fn matmul_t(m: usize, k: usize, n: usize, x: &[f32], w: WeightRows, out: &mut [f32]) {
        // Int4 lanes read columns in NIBBLE order, so x is put in that order once per call.
        let reordered: Vec<f32>;
        let x = if form(&w) == INT4 || form(&w) == PALETTE4 {
            reordered = (0..m * k).map(|i| x[i - i % 16 + NIBBLE[i % 16]]).collect();
            &reordered[..]
        } else {
            x
        };
        let threads = rayon::current_num_threads().max(1);
        let rows_per_task = n.div_ceil(threads * 4).next_multiple_of(8).max(16);
        let ptr = OutPtr(out.as_mut_ptr());
        let task = |t: usize| {
            let rows = t * rows_per_task..((t + 1) * rows_per_task).min(n);
            // SAFETY: `usable` checked the CPU and the blocks; this task writes only the columns
            // `rows` of each of the m output rows.
            unsafe {
                match form(&w) {
                    F32 => rows_block::<F32>(m, k, n, x, &w, rows, ptr),
                    F16 => rows_block::<F16>(m, k, n, x, &w, rows, ptr),
                    INT8 => rows_block::<INT8>(m, k, n, x, &w, rows, ptr),
                    INT4 => rows_block::<INT4>(m, k, n, x, &w, rows, ptr),
                    _ => rows_block::<PALETTE4>(m, k, n, x, &w, rows, ptr),
                }
            }
        };
        let tasks = n.div_ceil(rows_per_task);
        if m * n * k < 1 << 15 {
            (0..tasks).for_each(task);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
    }

    #[inline(always)]
    unsafe fn round_fp16_if(fp16: bool, v: __m512) -> __m512 {
        if fp16 {
            // SAFETY: register-only conversions under the caller's AVX-512F.
            unsafe { _mm512_cvtph_ps(_mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)) }
        } else {
            v
        }
    }

    /// A weight row's parameters for block `b`: int8, the scale and offset broadcast; int4, the
    /// table of the sixteen values its nibbles stand for (and nothing in the second).
    #[inline(always)]
    unsafe fn block_params<const FORM: u8>(w: &WeightRows, r: usize, blocks: usize, b: usize) -> (__m512, __m512) {
        // SAFETY: register-only intrinsics; r·blocks + b indexes this row's scales (callers).
        unsafe {
            if let WeightRows::Palette { palettes, group_rows, .. } = *w {
                return (_mm512_loadu_ps(palettes.as_ptr().add(r / group_rows * 16)), _mm512_setzero_ps());
            }
            let WeightRows::Blockwise { fp16, scales, offsets, .. } = *w else {
                return (_mm512_setzero_ps(), _mm512_setzero_ps());
            };
            let scale = _mm512_set1_ps(*scales.get_unchecked(r * blocks + b));
            let offset = offsets.map_or(_mm512_setzero_ps(), |o| _mm512_set1_ps(*o.get_unchecked(r * blocks + b)));
            if FORM == INT4 {
                // Nibble i holds the two's-complement value i, or i − 16 from 8 up.
                let levels = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., -8., -7., -6., -5., -4., -3., -2., -1.);
                (round_fp16_if(fp16, _mm512_mul_ps(_mm512_sub_ps(levels, offset), scale)), _mm512_setzero_ps())
            } else {
                (scale, offset)
            }
        }
    }

    /// Where row `r`'s column `c` is stored (possibly past the matrix: only prefetched).
    #[inline(always)]
    fn row_bytes(w: &WeightRows, k: usize, r: usize, c: usize) -> *const i8 {
        let at = r * k + c;
        match *w {
            WeightRows::F32(v) => v.as_ptr().wrapping_add(at) as *const i8,
            WeightRows::F16(v) => v.as_ptr().wrapping_add(at) as *const i8,
            WeightRows::Blockwise { q, bits: 8, .. } => q.as_ptr().wrapping_add(at) as *const i8,
            WeightRows::Blockwise { q, .. } | WeightRows::Palette { indices: q, .. } => {
                q.as_ptr().wrapping_add(at / 2) as *const i8
            }
        }
    }

    /// Sixteen weights of row `r` from column `c` (int4: in NIBBLE order), as f32; `params`
    /// from [`block_params`].
    #[inline(always)]
    unsafe fn load<const FORM: u8>(w: &WeightRows, k: usize, r: usize, c: usize, params: (__m512, __m512)) -> __m512 {
        // SAFETY (all arms): callers keep c + 16 <= k and r < rows, so reads stay in the row.
        unsafe {
            match (FORM, *w) {
                (F32, WeightRows::F32(v)) => _mm512_loadu_ps(v.as_ptr().add(r * k + c)),
                (F16, WeightRows::F16(v)) => {
                    _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(r * k + c) as *const __m256i))
                }
                (INT8, WeightRows::Blockwise { q, fp16, .. }) => {
                    let bytes = _mm_loadu_si128(q.as_ptr().add(r * k + c) as *const __m128i);
                    let ints = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
                    round_fp16_if(fp16, _mm512_mul_ps(_mm512_sub_ps(ints, params.1), params.0))
                }
                (_, WeightRows::Blockwise { q, .. } | WeightRows::Palette { indices: q, .. }) => {
                    let word = (q.as_ptr().add((r * k + c) / 2) as *const i64).read_unaligned();
                    let shifts = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
                    let lanes = _mm512_srlv_epi32(_mm512_set1_epi64(word), shifts);
                    // The permute reads only each lane's low four bits: the nibble.
                    _mm512_permutexvar_ps(lanes, params.0)
                }
                _ => unreachable!("FORM is form(w)"),
            }
        }
    }

    /// Dot products of `MR` rows of `x` (from row `i`) with weight rows `r` (`NR` of them).
    #[inline(always)]
    unsafe fn tile<const FORM: u8, const MR: usize, const NR: usize>(
        x: &[f32],
        i: usize,
        k: usize,
        w: &WeightRows,
        r: [usize; NR],
    ) -> [[f32; NR]; MR] {
        // SAFETY: all loads stay within rows i..i+MR of x and rows r of w (callers check).
        // Plain loops, not closures: a closure would not inherit the caller's target features,
        // and every intrinsic in it would become a call.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            let (block, blocks) = match *w {
                WeightRows::Blockwise { block, .. } => (block, k / block),
                _ => (k - k % 16, 1),
            };
            let line_cols = match FORM {
                F32 => 16,
                F16 => 32,
                INT8 => 64,
                _ => 128,
            };
            let xp = x.as_ptr().add(i * k);
            for b in 0..blocks {
                let mut params = [(_mm512_setzero_ps(), _mm512_setzero_ps()); NR];
                if FORM == INT8 || FORM == INT4 || FORM == PALETTE4 {
                    for j in 0..NR {
                        params[j] = block_params::<FORM>(w, r[j], blocks, b);
                    }
                }
                let mut c = b * block;
                while c < (b + 1) * block {
                    if c % line_cols == 0 {
                        // Rows are short, so the hardware prefetcher never locks on: fetch the
                        // same columns of the rows two strips on, as this strip reads them.
                        for &rj in &r {
                            _mm_prefetch::<_MM_HINT_T0>(row_bytes(w, k, rj + 2 * NR, c));
                        }
                    }
                    let mut wv = [_mm512_setzero_ps(); NR];
                    for j in 0..NR {
                        wv[j] = load::<FORM>(w, k, r[j], c, params[j]);
                    }
                    for (ii, row) in acc.iter_mut().enumerate() {
                        let xv = _mm512_loadu_ps(xp.add(ii * k + c));
                        for j in 0..NR {
                            row[j] = _mm512_fmadd_ps(xv, wv[j], row[j]);
                        }
                    }
                    c += 16;
                }
            }
            let mut sums = [[0f32; NR]; MR];
            for ii in 0..MR {
                for j in 0..NR {
                    sums[ii][j] = _mm512_reduce_add_ps(acc[ii][j]);
                }
            }
            super::add_tail_columns(x, i, k, w, r, block, &mut sums);
            sums
        }
    }

    /// `MR` rows of `x` against all weight rows in `rows`, `NR` at a time (the last group
    /// repeats its final row rather than reading past the range).
    #[inline(always)]
    unsafe fn strip<const FORM: u8, const MR: usize, const NR: usize>(
        x: &[f32],
        i: usize,
        k: usize,
        n: usize,
        w: &WeightRows,
        rows: &std::ops::Range<usize>,
        out: OutPtr,
    ) {
        for r0 in rows.clone().step_by(NR) {
            let r = super::group_rows::<NR>(r0, rows.end);
            // SAFETY: rows i..i+MR and weight rows r are in range; outputs are this task's.
            unsafe { super::store_tile(out.0, i, n, r0, rows.end, &tile::<FORM, MR, NR>(x, i, k, w, r)) };
        }
    }

    /// # Safety
    /// The CPU and weight passed `usable`, `FORM` is `form(w)`; `out` is an m×n buffer whose
    /// columns `rows` only this call writes.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn rows_block<const FORM: u8>(
        m: usize,
        k: usize,
        n: usize,
        x: &[f32],
        w: &WeightRows,
        rows: std::ops::Range<usize>,
        out: OutPtr,
    ) {
        let mut i = 0;
        // SAFETY: each call covers rows i.. of x that exist; the caller vouches for `out`.
        unsafe {
            while i < m {
                match m - i {
                    1 => strip::<FORM, 1, 8>(x, i, k, n, w, &rows, out),
                    2 => strip::<FORM, 2, 6>(x, i, k, n, w, &rows, out),
                    3 => strip::<FORM, 3, 4>(x, i, k, n, w, &rows, out),
                    _ => strip::<FORM, 4, 4>(x, i, k, n, w, &rows, out),
                }
                i += (m - i).min(4);
            }
        }
    }
}

/// Products with enough rows of `x` to reuse each weight many times (prefill): each group of
/// weight rows is dequantized once into f32, `x` is transposed once into panels of 32 rows, and
/// the kernel broadcasts one weight against 32 rows of `x` at a time, 12 weight rows × two
/// vectors of accumulators held in registers over the whole of `k`.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use rayon::prelude::*;

    use super::{avx2, narrow, OutPtr, WeightRows};

    /// Below this many rows of `x` the transposes cost more than the reuse gains.
    pub const MIN_ROWS: usize = 16;
    /// Weight rows per kernel call.
    const GROUP: usize = 12;
    /// Rows of `x` per panel (two vectors of 16).
    const PANEL: usize = 32;

    /// The output element `offset` places from the start (a function, so closures capture the
    /// whole `OutPtr` rather than its raw pointer field).
    ///
    /// # Safety
    /// `offset` must lie inside the output buffer.
    unsafe fn out_at(out: OutPtr, offset: usize) -> *mut f32 {
        // SAFETY: the caller keeps `offset` in bounds.
        unsafe { out.0.add(offset) }
    }

    pub fn usable(w: &WeightRows) -> bool {
        static FEATURES: OnceLock<bool> = OnceLock::new();
        // Palettes are widened by `narrow::palette_row` (AVX-512F implies AVX2 and FMA).
        *FEATURES.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c"))
            && (avx2::usable(w) || matches!(w, WeightRows::Palette { .. }))
    }

    pub fn matmul_t(m: usize, k: usize, n: usize, x: &[f32], w: WeightRows, out: &mut [f32]) {
        // x transposed: panel p holds, for each column c, the 32 values x[32p.., c] (zeros past m).
        let panels = m.div_ceil(PANEL);
        let mut xt = vec![0f32; panels * k * PANEL];
        xt.par_chunks_mut(k * PANEL).enumerate().for_each(|(p, panel)| {
            for lane in 0..PANEL.min(m - p * PANEL) {
                let row = &x[(p * PANEL + lane) * k..][..k];
                for (c, &v) in row.iter().enumerate() {
                    panel[c * PANEL + lane] = v;
                }
            }
        });
        // A task dequantizes up to eight groups of weight rows (a few hundred KB, held in L2) and
        // sweeps every panel of x against them, so each output row is written in runs of up to
        // 96 columns rather than 12.
        let groups = n.div_ceil(GROUP);
        let groups_per_task = groups.div_ceil(rayon::current_num_threads().max(1) * 2).clamp(1, 8);
        let ptr = OutPtr(out.as_mut_ptr());
        let xt = &xt;
        // Palettes are widened sixteen columns at a time where the rows come in whole chunks.
        let palette_rows = matches!(w, WeightRows::Palette { .. }) && narrow::usable(&w, k);
        (0..groups.div_ceil(groups_per_task)).into_par_iter().for_each(|t| {
            let task_groups = t * groups_per_task..((t + 1) * groups_per_task).min(groups);
            let mut weights = vec![0f32; task_groups.len() * GROUP * k];
            for (j, r) in (task_groups.start * GROUP..(task_groups.end * GROUP).min(n)).enumerate() {
                let row = &mut weights[j * k..(j + 1) * k];
                // SAFETY: `usable` (and for palettes `narrow::usable`) checked the CPU and the
                // weight's block shape.
                unsafe {
                    if palette_rows {
                        narrow::palette_row(&w, k, r, row);
                    } else {
                        avx2::dequant_row(&w, k, r, row);
                    }
                }
            }
            for p in 0..panels {
                for (gi, g) in task_groups.clone().enumerate() {
                    let rows = g * GROUP..((g + 1) * GROUP).min(n);
                    let group_weights = &weights[gi * GROUP * k..][..GROUP * k];
                    let lanes = PANEL.min(m - p * PANEL);
                    // SAFETY: features checked in `usable`; the panel and weights hold k columns;
                    // rows p·32.. of the output exist, and this task alone writes columns `rows`.
                    unsafe {
                        let at = out_at(ptr, p * PANEL * n + rows.start);
                        group_panel(k, n, group_weights, &xt[p * k * PANEL..][..k * PANEL], lanes, rows.len(), at)
                    };
                }
            }
        });
    }

    /// One group of weight rows (`cols` of them) against one panel of x (`lanes` rows), written
    /// at `out`: the panel's first output row at the group's first column, rows `n` apart.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn group_panel(
        k: usize,
        n: usize,
        weights: &[f32],
        panel: &[f32],
        lanes: usize,
        cols: usize,
        out: *mut f32,
    ) {
        let mut tile = [[0f32; PANEL]; GROUP];
        // SAFETY: weights hold GROUP×k values and the panel k×PANEL; loads stay inside them.
        // A short panel (a prompt's tail) uses the narrowest vectors that cover it: 8-lane
        // FMAs issue twice as fast as 16-lane ones on CPUs that split them.
        unsafe {
            if lanes > 16 {
                kernel::<__m512, 2>(k, weights.as_ptr(), panel.as_ptr(), &mut tile);
            } else if lanes > 8 {
                kernel::<__m512, 1>(k, weights.as_ptr(), panel.as_ptr(), &mut tile);
            } else {
                kernel::<__m256, 1>(k, weights.as_ptr(), panel.as_ptr(), &mut tile);
            }
        }
        for lane in 0..lanes {
            for (j, t) in tile.iter().take(cols).enumerate() {
                // SAFETY: the caller vouches for `lanes` rows and `cols` columns at `out`.
                unsafe { *out.add(lane * n + j) = t[lane] };
            }
        }
    }

    /// A vector of f32 lanes the kernel accumulates in.
    trait Lanes: Copy {
        const WIDTH: usize;
        unsafe fn zero() -> Self;
        unsafe fn load(p: *const f32) -> Self;
        unsafe fn splat(v: f32) -> Self;
        unsafe fn fma(a: Self, b: Self, acc: Self) -> Self;
        unsafe fn store(self, p: *mut f32);
    }

    /// Implements [`Lanes`] for a vector type from its width and intrinsics.
    macro_rules! lanes {
        ($v:ty, $width:expr, $zero:ident, $load:ident, $splat:ident, $fma:ident, $store:ident) => {
            // SAFETY: callers run these only where AVX-512F (hence AVX2 and FMA) was detected,
            // with pointers valid for WIDTH floats.
            impl Lanes for $v {
                const WIDTH: usize = $width;
                #[inline(always)]
                unsafe fn zero() -> Self {
                    unsafe { $zero() }
                }
                #[inline(always)]
                unsafe fn load(p: *const f32) -> Self {
                    unsafe { $load(p) }
                }
                #[inline(always)]
                unsafe fn splat(v: f32) -> Self {
                    unsafe { $splat(v) }
                }
                #[inline(always)]
                unsafe fn fma(a: Self, b: Self, acc: Self) -> Self {
                    unsafe { $fma(a, b, acc) }
                }
                #[inline(always)]
                unsafe fn store(self, p: *mut f32) {
                    unsafe { $store(p, self) }
                }
            }
        };
    }
    lanes!(__m512, 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps);
    lanes!(__m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps);

    /// GROUP weight rows against the first NV·WIDTH lanes of a panel, into `tile`.
    #[inline(always)]
    unsafe fn kernel<V: Lanes, const NV: usize>(
        k: usize,
        w: *const f32,
        panel: *const f32,
        tile: &mut [[f32; PANEL]; GROUP],
    ) {
        // SAFETY: the caller guarantees GROUP×k weights and k×PANEL panel values.
        unsafe {
            let mut acc = [[V::zero(); NV]; GROUP];
            for c in 0..k {
                let b: [V; NV] = std::array::from_fn(|v| V::load(panel.add(c * PANEL + V::WIDTH * v)));
                for (j, row) in acc.iter_mut().enumerate() {
                    let a = V::splat(*w.add(j * k + c));
                    for v in 0..NV {
                        row[v] = V::fma(a, b[v], row[v]);
                    }
                }
            }
            for (j, row) in acc.iter().enumerate() {
                for (v, vec) in row.iter().enumerate() {
                    vec.store(tile[j].as_mut_ptr().add(V::WIDTH * v));
                }
            }
        }
    }
}

impl Packed {
    /// Expands row `r` into `out` (length `cols`). These two live here rather than in `value`,
    /// so the matrix kernels depend on the values and not the other way round.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        WeightRows::of(self).row_into(self.cols(), r, out);
    }

    pub fn dense(&self) -> Vec<f32> {
        let cols = self.cols();
        let mut out = vec![0f32; self.rows() * cols];
        for (r, row) in out.chunks_mut(cols.max(1)).enumerate() {
            self.row_into(r, row);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel shape (1–5 rows of x, row counts that leave partial groups, a column tail)
    /// and every weight kind against a plain f64 product.
    #[test]
    fn matches_a_plain_product() {
        let mut seed = 7u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for (m, k, n) in [
            (1usize, 64usize, 37usize),
            (2, 72, 9),
            (3, 40, 50),
            (4, 64, 17),
            (5, 96, 130),
            (9, 19, 5),
            (1, 8, 1),
            (1, 96, 40),
            (1, 200, 3),
            (6, 32, 21),
        ]
        .into_iter()
        // Prefill-sized: panels of 32 rows of x whose last takes two 16-lane vectors, one,
        // or one 8-lane vector; weight row groups of 12 with a partial last group.
        .chain([(16, 64, 25), (37, 72, 30), (41, 24, 14), (64, 19, 13), (70, 40, 12), (56, 16, 7)])
        {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let wf: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            let q8: Vec<u8> = (0..n * k).map(|_| (rnd() * 200.0) as i8 as u8).collect();
            let q4: Vec<u8> = (0..(n * k).div_ceil(2)).map(|_| ((rnd() + 0.5) * 255.0) as u8).collect();
            // Blocks of 8 columns take the AVX2 kernels, of 16 and 32 the AVX-512 decode ones.
            let blocks: Vec<usize> = [8, 16, 32].into_iter().filter(|b| k % b == 0).chain([k]).collect();
            let scales: Vec<f32> = (0..n * k).map(|_| rnd() * 0.1).collect();
            let offsets: Vec<f32> = (0..n * k).map(|_| rnd() * 4.0).collect();
            let palettes: Vec<f32> = (0..n * 16).map(|_| rnd()).collect();
            let mut kinds = vec![WeightRows::F32(&wf), WeightRows::F16(&wh)];
            // A palette per row, and (where n allows) one per group of rows.
            for group_rows in [1, 2, 5].into_iter().filter(|g| n % g == 0) {
                let palettes = &palettes[..n / group_rows * 16];
                if k % 2 == 0 {
                    kinds.push(WeightRows::Palette { indices: &q4, palettes, group_rows });
                }
            }
            for block in blocks {
                let (scales, offsets) = (&scales[..n * k / block], &offsets[..n * k / block]);
                kinds.extend([
                    WeightRows::Blockwise { q: &q8, bits: 8, fp16: false, scales, offsets: None, block },
                    WeightRows::Blockwise { q: &q8, bits: 8, fp16: true, scales, offsets: Some(offsets), block },
                    WeightRows::Blockwise { q: &q4, bits: 4, fp16: false, scales, offsets: Some(offsets), block },
                    WeightRows::Blockwise { q: &q4, bits: 4, fp16: true, scales, offsets: None, block },
                ]);
            }
            for w in kinds {
                let mut out = vec![f32::NAN; m * n];
                matmul_t(m, k, n, &x, w, &mut out);
                let mut row = vec![0f32; k];
                for r in 0..n {
                    w.row_into(k, r, &mut row);
                    for i in 0..m {
                        let want: f64 = (0..k).map(|c| x[i * k + c] as f64 * row[c] as f64).sum();
                        let got = out[i * n + r] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "m{m} k{k} n{n} ({i},{r}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
