//! Linear weight quantization as Core ML executes it natively: symmetric integers with one fp16
//! scale per block of input columns, stored as `constexpr_blockwise_shift_scale(data, scale)`.

use corelm_format::{DType, Tensor};

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    /// int8, one scale per output channel.
    Int8,
    /// int4, one scale per `block` input columns of each output channel.
    Int4 { block: usize },
}

impl Quantization {
    fn bits(self) -> (DType, f32) {
        match self {
            // Symmetric ranges (±127, ±7), as coremltools' linear_symmetric mode uses.
            Quantization::Int8 => (DType::Int8, 127.0),
            Quantization::Int4 { .. } => (DType::Int4, 7.0),
        }
    }

    /// The block length for a row of `cols` columns; whole rows when the block does not divide it.
    pub fn block(self, cols: usize) -> usize {
        match self {
            Quantization::Int8 => cols,
            Quantization::Int4 { block } if block > 0 && cols % block == 0 => block,
            Quantization::Int4 { .. } => cols,
        }
    }
}

/// Quantizes a (rows, cols) matrix; returns the integer data and the (rows, cols / block) scales.
pub fn quantize(shape: &[usize], w: &[f32], q: Quantization, scale_dtype: DType) -> Result<(Tensor, Tensor)> {
    let [rows, cols] = shape else {
        return Err(Error::invalid(format!("only matrices are quantized, not shape {shape:?}")));
    };
    let (rows, cols) = (*rows, *cols);
    let (dtype, qmax) = q.bits();
    let block = q.block(cols);
    let blocks = cols / block;
    let mut data = Vec::with_capacity(rows * cols);
    let mut scales = Vec::with_capacity(rows * blocks);
    for r in 0..rows {
        for b in 0..blocks {
            let chunk = &w[r * cols + b * block..r * cols + (b + 1) * block];
            let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Round the scale to its stored precision first, so the integers fit what is stored.
            let raw = if max > 0.0 { max / qmax } else { 1.0 };
            let scale = match scale_dtype {
                DType::Fp16 => half::f16::from_f32(raw).to_f32(),
                _ => raw,
            };
            let scale = if scale > 0.0 { scale } else { f32::MIN_POSITIVE };
            scales.push(scale as f64);
            data.extend(chunk.iter().map(|v| (v / scale).round().clamp(-qmax, qmax) as i64));
        }
    }
    Ok((
        Tensor::from_ints(dtype, vec![rows, cols], &data)?,
        Tensor::from_floats(scale_dtype, vec![rows, blocks], &scales)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_blocks_reconstruct_within_half_a_step() {
        let w: Vec<f32> = (0..128).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let (data, scale) = quantize(&[2, 64], &w, Quantization::Int4 { block: 32 }, DType::Fp16).unwrap();
        assert_eq!(scale.shape(), &[2, 2]);
        let q = data.to_i64().unwrap();
        let s = scale.to_f64().unwrap();
        for (i, &v) in w.iter().enumerate() {
            let step = s[(i / 64) * 2 + (i % 64) / 32];
            assert!((q[i] as f64 * step - v as f64).abs() <= step / 2.0 + 1e-6, "element {i}");
            assert!((-7..=7).contains(&q[i]));
        }
    }

    #[test]
    fn int8_is_per_channel_and_odd_widths_fall_back_to_rows() {
        let w = vec![0.5f32; 3 * 40];
        let (data, scale) = quantize(&[3, 40], &w, Quantization::Int8, DType::Fp16).unwrap();
        assert_eq!((data.dtype(), scale.shape()), (DType::Int8, &[3usize, 1][..]));
        let (_, scale) = quantize(&[3, 40], &w, Quantization::Int4 { block: 32 }, DType::Fp16).unwrap();
        assert_eq!(scale.shape(), &[3, 1]);
    }
}
