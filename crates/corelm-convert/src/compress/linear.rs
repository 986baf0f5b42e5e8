//! Linear integer quantization: `w ≈ scale · (q − offset)` with one scale (and zero point) per
//! block of input columns, as `constexpr_blockwise_shift_scale`.

use corelm_format::{DType, Tensor};

use rayon::prelude::*;

use super::Compressed;
use crate::Result;

/// Rounds a scale to the precision it is stored in, so the integers are chosen for the scale
/// that is actually used; never zero.
fn stored(scale: f32, dtype: DType) -> f32 {
    let s = match dtype {
        DType::Fp16 => half::f16::from_f32(scale).to_f32(),
        _ => scale,
    };
    if s > 0.0 && s.is_finite() {
        s
    } else {
        // An all-zero block: any scale reproduces it.
        match dtype {
            DType::Fp16 => half::f16::MIN_POSITIVE.to_f32(),
            _ => f32::MIN_POSITIVE,
        }
    }
}

/// Squared error of `chunk` on the grid `s · [qmin, qmax]`.
fn grid_error(chunk: &[f32], s: f32, qmin: i64, qmax: i64) -> f64 {
    chunk
        .iter()
        .map(|&v| {
            let q = (v / s).round().clamp(qmin as f32, qmax as f32);
            ((v - q * s) as f64).powi(2)
        })
        .sum()
}

/// The scale of a zero-point-free block: at 4 bits, of a few candidates around `max |w| / qmax`
/// (the plain symmetric choice, first, kept on ties), the one with the least squared error over
/// the whole integer range (−8 included); finer steps that clip a rare outlier usually win.
fn symmetric_scale(chunk: &[f32], qmin: i64, qmax: i64, dtype: DType) -> f32 {
    let max = chunk.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let mut best = (stored(max / qmax as f32, dtype), f64::INFINITY);
    // The search only pays at 4 bits: at 8 bits the squared-error winner (finer steps, clipped
    // outliers) measured worse in the model's outputs on SmolLM2 than max/qmax (KL 0.0042 vs
    // 0.0039), so 8 bits keeps the plain scale.
    let (divisors, shrinks): (&[f32], &[f32]) =
        if qmax > 7 { (&[0.0], &[1.0]) } else { (&[0.0, 0.5], &[1.0, 0.95, 0.9, 0.85]) };
    for &extra in divisors {
        let divisor = qmax as f32 + extra;
        for &shrink in shrinks {
            let s = stored(max * shrink / divisor, dtype);
            let err = grid_error(chunk, s, qmin, qmax);
            if err < best.1 {
                best = (s, err);
            }
        }
    }
    best.0
}

/// Quantizes a (rows, cols) matrix with one scale (and zero point) per `block` columns of
/// each row. The scales come from the weights alone. The integers are the nearest ones, or,
/// given `gram` (Σ x xᵀ over calibration inputs of the layer, cols × cols), the ones a
/// column-by-column search picks to keep the layer's outputs close (see [`OutputErrorFactor`]).
#[allow(clippy::too_many_arguments)]
pub fn quantize(
    rows: usize,
    cols: usize,
    w: &[f32],
    bits: u8,
    block: usize,
    offset: bool,
    dtype: DType,
    gram: Option<&[f64]>,
) -> Result<Compressed> {
    let (qmin, qmax) = (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1);
    let blocks = cols / block;
    // (scale, zero point) per block; the zero point is 0 without offsets.
    let params: Vec<(f32, f32)> = w
        .chunks(block)
        .map(|chunk| {
            if offset {
                // The range always includes zero, so the zero point is an integer of the data's type.
                let lo = chunk.iter().fold(0f32, |m, &v| m.min(v));
                let hi = chunk.iter().fold(0f32, |m, &v| m.max(v));
                let s = stored((hi - lo) / (qmax - qmin) as f32, dtype);
                (s, ((qmin as f32) - lo / s).round().clamp(qmin as f32, qmax as f32))
            } else {
                (symmetric_scale(chunk, qmin, qmax, dtype), 0.0)
            }
        })
        .collect();
    let to_int = |v: f32, (s, zero): (f32, f32)| (v / s + zero).round().clamp(qmin as f32, qmax as f32);
    // One byte a value (bits ≤ 8): the widest tensors are quantized without widening them.
    let mut data = vec![0i8; rows * cols];
    let factor = gram.and_then(|g| OutputErrorFactor::new(g, cols));
    data.par_chunks_mut(cols).zip(w.par_chunks(cols)).zip(params.par_chunks(blocks)).for_each(|((q, row), params)| {
        match &factor {
            None => {
                for (i, (q, &v)) in q.iter_mut().zip(row).enumerate() {
                    *q = to_int(v, params[i / block]) as i8;
                }
            }
            Some(m) => m.round_row(row, q, |i, target| {
                let (s, zero) = params[i / block];
                let n = to_int(target, (s, zero));
                (n as i8, s * (n - zero))
            }),
        }
    });
    let int = if bits == 8 { DType::Int8 } else { DType::Int4 };
    let scales: Vec<f64> = params.iter().map(|&(s, _)| s as f64).collect();
    let mut inputs = vec![
        ("data", Tensor::from_ints(int, vec![rows, cols], &data)?),
        ("scale", Tensor::from_floats(dtype, vec![rows, blocks], &scales)?),
    ];
    if offset {
        let zeros: Vec<i8> = params.iter().map(|&(_, z)| z as i8).collect();
        inputs.push(("offset", Tensor::from_ints(int, vec![rows, blocks], &zeros)?));
    }
    Ok(Compressed { op: "constexpr_blockwise_shift_scale", inputs, data_from: None })
}

/// The layer-output error of a row's rounding errors e over calibration inputs X is
/// ‖X e‖² = eᵀ H e with H = XᵀX. Writing H = Mᵀ M with M lower triangular, it is
/// Σᵢ (Σ_{j≤i} M_ij e_j)², so columns rounded in order can each cancel the term the earlier
/// errors leave: column i aims at w_i + Σ_{j<i} M_ij e_j / M_ii. This is GPTQ's error feedback
/// (Frantar et al., 2022) in its nearest-plane form; H is damped by 1% of its mean diagonal,
/// as GPTQ does.
pub struct OutputErrorFactor {
    cols: usize,
    /// M, row-major.
    m: Vec<f32>,
}

impl OutputErrorFactor {
    /// `None` when `gram` is not cols × cols, is all zeros, or is not positive definite even
    /// after damping (the nearest integers are used then).
    pub fn new(gram: &[f64], cols: usize) -> Option<OutputErrorFactor> {
        if gram.len() != cols * cols {
            return None;
        }
        let mean_diag = (0..cols).map(|i| gram[i * cols + i]).sum::<f64>() / cols as f64;
        if !(mean_diag > 0.0 && mean_diag.is_finite()) {
            return None;
        }
        // A = J H J (J reverses the order) + damping; A = L Lᵀ gives M_ij = L_{c-1-j, c-1-i}.
        let rev = |i: usize| cols - 1 - i;
        let mut l: Vec<f64> = (0..cols * cols).map(|at| gram[rev(at / cols) * cols + rev(at % cols)]).collect();
        for i in 0..cols {
            l[i * cols + i] += 0.01 * mean_diag;
        }
        cholesky_in_place(&mut l, cols)?;
        let m = (0..cols * cols)
            .map(|at| {
                let (i, j) = (at / cols, at % cols);
                if j <= i {
                    l[rev(j) * cols + rev(i)] as f32
                } else {
                    0.0
                }
            })
            .collect();
        Some(OutputErrorFactor { cols, m })
    }

    /// Rounds one row in column order: `round(i, target)` gives column i's integer and the
    /// value it stands for.
    fn round_row(&self, row: &[f32], q: &mut [i8], round: impl Fn(usize, f32) -> (i8, f32)) {
        let mut err = vec![0f32; self.cols];
        for i in 0..self.cols {
            let mi = &self.m[i * self.cols..][..=i];
            let target = row[i] + dot(&mi[..i], &err[..i]) / mi[i];
            let (n, value) = round(i, target);
            q[i] = n;
            err[i] = row[i] - value;
        }
    }
}

/// Lower Cholesky factor of a symmetric positive definite matrix, in place (row-major; the
/// upper triangle is left as it was). `None` if it is not positive definite.
fn cholesky_in_place(a: &mut [f64], n: usize) -> Option<()> {
    for j in 0..n {
        let (done, rest) = a.split_at_mut((j + 1) * n);
        let row_j = &mut done[j * n..];
        let d = row_j[j] - dot(&row_j[..j], &row_j[..j]);
        if !(d > 0.0 && d.is_finite()) {
            return None;
        }
        row_j[j] = d.sqrt();
        let row_j = &row_j[..=j];
        rest.par_chunks_mut(n).with_min_len(16).for_each(|row_i| {
            row_i[j] = (row_i[j] - dot(&row_i[..j], &row_j[..j])) / row_j[j];
        });
    }
    Some(())
}

/// Σ a_i b_i in eight independent sums, so the loop vectorizes.
fn dot<T: Copy + Default + std::ops::Add<Output = T> + std::ops::Mul<Output = T>>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::default(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ca.remainder().iter().zip(cb.remainder()).fold(T::default(), |s, (&x, &y)| s + x * y);
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] = acc[k] + x[k] * y[k];
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_scales_beat_the_plain_max_over_qmax() {
        // Blocks with an outlier, and plain ones.
        let w: Vec<f32> =
            (0..256).map(|i| if i % 61 == 0 { 3.0 } else { ((i * 37 % 101) as f32 - 50.0) / 40.0 }).collect();
        for bits in [4u8, 8] {
            let c = quantize(4, 64, &w, bits, 32, false, DType::Fp16, None).unwrap();
            let (q, s) = (c.inputs[0].1.to_i64().unwrap(), c.inputs[1].1.to_f64().unwrap());
            assert_eq!(c.inputs[1].1.shape(), &[4, 2]);
            let (lo, hi) = (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1);
            assert!(q.iter().all(|v| (lo..=hi).contains(v)));
            for (b, chunk) in w.chunks(32).enumerate() {
                let got: f64 =
                    chunk.iter().enumerate().map(|(j, &v)| (q[b * 32 + j] as f64 * s[b] - v as f64).powi(2)).sum();
                let max = chunk.iter().fold(0f32, |m, &v| m.max(v.abs()));
                let plain = stored(max / hi as f32, DType::Fp16);
                assert!(got <= grid_error(chunk, plain, -hi, hi) + 1e-9, "bits {bits} block {b}");
            }
        }
    }

    #[test]
    fn offsets_are_integers_in_range_and_reconstruct_within_half_a_step() {
        // Skewed blocks: mostly positive values.
        let w: Vec<f32> = (0..256).map(|i| (i % 64) as f32 / 10.0 - 0.3).collect();
        for bits in [4u8, 8] {
            let c = quantize(4, 64, &w, bits, 32, true, DType::Fp32, None).unwrap();
            let q = c.inputs[0].1.to_i64().unwrap();
            let s = c.inputs[1].1.to_f64().unwrap();
            let o = c.inputs[2].1.to_i64().unwrap();
            let (lo, hi) = (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1);
            for (i, &v) in w.iter().enumerate() {
                let b = (i / 64) * 2 + (i % 64) / 32;
                assert!((lo..=hi).contains(&q[i]) && (lo..=hi).contains(&o[b]));
                let back = s[b] * (q[i] - o[b]) as f64;
                assert!((back - v as f64).abs() <= s[b] / 2.0 + 1e-5, "bits {bits} element {i}: {back} vs {v}");
            }
        }
    }

    /// Calibration inputs whose columns are correlated, as a layer's inputs are.
    fn inputs(n: usize, cols: usize) -> Vec<f64> {
        let mut seed = 5u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let mut x = vec![0.0; n * cols];
        for r in 0..n {
            let common = rnd();
            for c in 0..cols {
                x[r * cols + c] = rnd() + common * (1.0 + (c % 3) as f64) + if c == 5 { 4.0 * rnd() } else { 0.0 };
            }
        }
        x
    }

    fn gram(x: &[f64], cols: usize) -> Vec<f64> {
        let mut h = vec![0.0; cols * cols];
        for row in x.chunks(cols) {
            for a in 0..cols {
                for b in 0..cols {
                    h[a * cols + b] += row[a] * row[b];
                }
            }
        }
        h
    }

    fn ints(c: &Compressed) -> Vec<i64> {
        c.inputs[0].1.to_i64().unwrap()
    }

    /// The rounding with error feedback picks exactly GPTQ's integers, computed here the way the
    /// paper states it: U upper with UᵀU = H⁻¹ (H damped by 1% of its mean diagonal), and after
    /// each column, the later columns of the row move by −(w_i − ŵ_i)/U_ii · U_ij.
    #[test]
    fn error_feedback_picks_gptqs_integers() {
        let (rows, cols, block) = (6, 24, 8);
        let h = gram(&inputs(64, cols), cols);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 60.0).collect();
        for (bits, offset) in [(4u8, false), (4, true), (8, false)] {
            let ours = quantize(rows, cols, &w, bits, block, offset, DType::Fp32, Some(&h)).unwrap();
            // H⁻¹ by Gauss–Jordan, then its Cholesky factor.
            let mean = (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
            let mut a: Vec<Vec<f64>> = (0..cols)
                .map(|i| {
                    let mut r: Vec<f64> = h[i * cols..][..cols].to_vec();
                    r[i] += 0.01 * mean;
                    r.extend((0..cols).map(|j| if i == j { 1.0 } else { 0.0 }));
                    r
                })
                .collect();
            for c in 0..cols {
                let p = (c..cols).max_by(|&x, &y| a[x][c].abs().total_cmp(&a[y][c].abs())).unwrap();
                a.swap(c, p);
                let d = a[c][c];
                a[c].iter_mut().for_each(|v| *v /= d);
                for r in 0..cols {
                    if r != c {
                        let f = a[r][c];
                        let pivot = a[c].clone();
                        a[r].iter_mut().zip(&pivot).for_each(|(v, p)| *v -= f * p);
                    }
                }
            }
            let hinv: Vec<Vec<f64>> = a.iter().map(|r| r[cols..].to_vec()).collect();
            let mut l = vec![vec![0.0; cols]; cols];
            for i in 0..cols {
                for j in 0..=i {
                    let s: f64 = hinv[i][j] - (0..j).map(|k| l[i][k] * l[j][k]).sum::<f64>();
                    l[i][j] = if i == j { s.sqrt() } else { s / l[j][j] };
                }
            }
            let u = |i: usize, j: usize| l[j][i];
            let scales = ours.inputs[1].1.to_f64().unwrap();
            let zeros = if offset { ours.inputs[2].1.to_i64().unwrap() } else { vec![0; scales.len()] };
            let (qmin, qmax) = (-(1i64 << (bits - 1)) as f64, ((1i64 << (bits - 1)) - 1) as f64);
            let mut want = Vec::new();
            for r in 0..rows {
                let mut row: Vec<f64> = w[r * cols..][..cols].iter().map(|&v| v as f64).collect();
                for i in 0..cols {
                    let at = r * (cols / block) + i / block;
                    let (s, z) = (scales[at], zeros[at] as f64);
                    let q = (row[i] / s + z).round().clamp(qmin, qmax);
                    want.push(q as i64);
                    let err = (row[i] - s * (q - z)) / u(i, i);
                    for (j, v) in row.iter_mut().enumerate().skip(i + 1) {
                        *v -= err * u(i, j);
                    }
                }
            }
            let got = ints(&ours);
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            // f32 against f64 arithmetic may split an exact tie the other way, rarely.
            assert!(differ <= 1, "int{bits} offset {offset}: {differ} of {} integers differ", got.len());
        }
    }

    /// On the calibration inputs the layer's output error is smaller than with the nearest
    /// integers (on the same scales), and without calibration the integers are the nearest.
    #[test]
    fn error_feedback_lowers_the_output_error() {
        let (rows, cols) = (16, 32);
        let x = inputs(200, cols);
        let h = gram(&x, cols);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 53 % 97) as f32 - 48.0) / 50.0).collect();
        for bits in [4u8, 8] {
            let output_error = |c: &Compressed| -> f64 {
                let back = super::super::decompress(c).unwrap();
                let mut total = 0.0;
                for xr in x.chunks(cols) {
                    for r in 0..rows {
                        let e: f64 = (0..cols).map(|j| (w[r * cols + j] - back[r * cols + j]) as f64 * xr[j]).sum();
                        total += e * e;
                    }
                }
                total
            };
            let nearest = quantize(rows, cols, &w, bits, 8, false, DType::Fp32, None).unwrap();
            let fed_back = quantize(rows, cols, &w, bits, 8, false, DType::Fp32, Some(&h)).unwrap();
            assert_eq!(nearest.inputs[1].1.to_f64(), fed_back.inputs[1].1.to_f64(), "the same scales");
            let (a, b) = (output_error(&nearest), output_error(&fed_back));
            assert!(b < 0.8 * a, "int{bits}: output error {b} with feedback vs {a} nearest");
            let direct: Vec<i64> = w
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let s = nearest.inputs[1].1.to_f64().unwrap()[i / 8] as f32;
                    let lim = ((1i64 << (bits - 1)) - 1) as f32;
                    (v / s).round().clamp(-lim - 1.0, lim) as i64
                })
                .collect();
            assert_eq!(ints(&nearest), direct);
        }
    }

    #[test]
    fn zero_blocks_survive() {
        let c = quantize(1, 8, &[0.0; 8], 4, 8, true, DType::Fp16, None).unwrap();
        let s = c.inputs[1].1.to_f64().unwrap();
        assert!(s[0] > 0.0);
        assert!(c.inputs[0]
            .1
            .to_i64()
            .unwrap()
            .iter()
            .zip(c.inputs[2].1.to_i64().unwrap().iter().cycle())
            .all(|(q, o)| q == o));
    }
}
