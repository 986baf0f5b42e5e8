//! Linear integer quantization: `w ≈ scale · (q − offset)` with one scale (and zero point) per
//! block of input columns, as `constexpr_blockwise_shift_scale`.

use corelm_format::{DType, Tensor};

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

pub fn quantize(
    rows: usize,
    cols: usize,
    w: &[f32],
    bits: u8,
    block: usize,
    offset: bool,
    dtype: DType,
) -> Result<Compressed> {
    let (qmin, qmax) = (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1);
    let blocks = cols / block;
    // One byte a value (bits ≤ 8): the widest tensors are quantized without widening them.
    let mut data: Vec<i8> = Vec::with_capacity(rows * cols);
    let mut scales = Vec::with_capacity(rows * blocks);
    let mut offsets: Vec<i8> = Vec::with_capacity(if offset { rows * blocks } else { 0 });
    for chunk in w.chunks(block) {
        if offset {
            // The range always includes zero, so the zero point is an integer of the data's type.
            let lo = chunk.iter().fold(0f32, |m, &v| m.min(v));
            let hi = chunk.iter().fold(0f32, |m, &v| m.max(v));
            let s = stored((hi - lo) / (qmax - qmin) as f32, dtype);
            let zero = ((qmin as f32) - lo / s).round().clamp(qmin as f32, qmax as f32);
            scales.push(s as f64);
            offsets.push(zero as i8);
            data.extend(chunk.iter().map(|&v| ((v / s + zero).round().clamp(qmin as f32, qmax as f32)) as i8));
        } else {
            let s = symmetric_scale(chunk, qmin, qmax, dtype);
            scales.push(s as f64);
            data.extend(chunk.iter().map(|&v| ((v / s).round().clamp(qmin as f32, qmax as f32)) as i8));
        }
    }
    let int = if bits == 8 { DType::Int8 } else { DType::Int4 };
    let mut inputs = vec![
        ("data", Tensor::from_ints(int, vec![rows, cols], &data)?),
        ("scale", Tensor::from_floats(dtype, vec![rows, blocks], &scales)?),
    ];
    if offset {
        inputs.push(("offset", Tensor::from_ints(int, vec![rows, blocks], &offsets)?));
    }
    Ok(Compressed { op: "constexpr_blockwise_shift_scale", inputs })
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
            let c = quantize(4, 64, &w, bits, 32, false, DType::Fp16).unwrap();
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
            let c = quantize(4, 64, &w, bits, 32, true, DType::Fp32).unwrap();
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

    #[test]
    fn zero_blocks_survive() {
        let c = quantize(1, 8, &[0.0; 8], 4, 8, true, DType::Fp16).unwrap();
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
