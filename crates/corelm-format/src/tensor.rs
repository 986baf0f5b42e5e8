//! Constant tensors in their storage encoding: little-endian elements, sub-byte types packed
//! as an LSB-first bit stream (the same bytes a blob file or an immediate `bytes` value holds).

use half::{bf16, f16};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// A constant tensor: dtype, shape and the encoded elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: TensorData,
}

#[derive(Clone, Debug, PartialEq)]
enum TensorData {
    /// Storage encoding; bools take one byte each (0 or 1).
    Bytes(Vec<u8>),
    Strings(Vec<String>),
}

/// Number of elements of a shape, `None` on overflow.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Bytes `count` elements of `dtype` occupy in storage, `None` on overflow or for strings.
pub fn storage_bytes(dtype: DType, count: usize) -> Option<usize> {
    let bits = count.checked_mul(dtype.bit_width()?)?;
    Some(bits.div_ceil(8))
}

/// Packs `width`-bit values (each already reduced to its low `width` bits) LSB-first.
pub fn pack_bits(values: &[u8], width: usize) -> Vec<u8> {
    let mut out = vec![0u8; (values.len() * width).div_ceil(8)];
    for (i, &v) in values.iter().enumerate() {
        let bit = i * width;
        let (byte, shift) = (bit / 8, bit % 8);
        let wide = (v as u16) << shift;
        out[byte] |= wide as u8;
        if shift + width > 8 {
            out[byte + 1] |= (wide >> 8) as u8;
        }
    }
    out
}

/// Unpacks `count` `width`-bit values from an LSB-first stream (caller checks the length).
pub fn unpack_bits(bytes: &[u8], width: usize, count: usize) -> Vec<u8> {
    let mask = ((1u16 << width) - 1) as u8;
    (0..count)
        .map(|i| {
            let bit = i * width;
            let (byte, shift) = (bit / 8, bit % 8);
            let lo = bytes[byte] as u16;
            let hi = bytes.get(byte + 1).copied().unwrap_or(0) as u16;
            ((((hi << 8) | lo) >> shift) as u8) & mask
        })
        .collect()
}

impl Tensor {
    /// A tensor from its storage bytes; the length must match dtype and shape exactly.
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Tensor> {
        let count = element_count(&shape).ok_or_else(|| Error::invalid(format!("shape {shape:?} overflows")))?;
        let expected = storage_bytes(dtype, count)
            .ok_or_else(|| Error::invalid(format!("{dtype} tensors have no byte encoding")))?;
        if bytes.len() != expected {
            return Err(Error::invalid(format!(
                "{dtype} tensor of shape {shape:?} needs {expected} bytes, got {}",
                bytes.len()
            )));
        }
        Ok(Tensor { dtype, shape, data: TensorData::Bytes(bytes) })
    }

    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Tensor> {
        Self::from_bytes(DType::Fp32, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    pub fn from_f16(shape: Vec<usize>, values: &[f16]) -> Result<Tensor> {
        Self::from_bytes(DType::Fp16, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// Rounds `values` to `dtype` (fp16, bf16, fp32 or fp64).
    pub fn from_floats(dtype: DType, shape: Vec<usize>, values: &[f64]) -> Result<Tensor> {
        let bytes: Vec<u8> = match dtype {
            DType::Fp16 => values.iter().flat_map(|&v| f16::from_f64(v).to_le_bytes()).collect(),
            DType::Bf16 => values.iter().flat_map(|&v| bf16::from_f64(v).to_le_bytes()).collect(),
            DType::Fp32 => values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(),
            DType::Fp64 => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
            _ => return Err(Error::invalid(format!("{dtype} is not a float type"))),
        };
        Self::from_bytes(dtype, shape, bytes)
    }

    /// Integers (any integer dtype, sub-byte included) or bools; each value must fit `dtype`.
    /// Takes any integer element type, so large quantized tensors need not be widened first.
    pub fn from_ints<T: Copy + Into<i64>>(dtype: DType, shape: Vec<usize>, values: &[T]) -> Result<Tensor> {
        let width = dtype
            .bit_width()
            .filter(|_| dtype.is_int() || dtype == DType::Bool)
            .ok_or_else(|| Error::invalid(format!("{dtype} is not an integer type")))?;
        let (lo, hi) = dtype.int_range().unwrap_or((i64::MIN, i64::MAX));
        let (lo, hi) = if dtype == DType::Bool { (0, 1) } else { (lo, hi) };
        if let Some(v) = values.iter().map(|&v| v.into()).find(|&v| v < lo || v > hi) {
            return Err(Error::invalid(format!("value {v} does not fit {dtype} [{lo}, {hi}]")));
        }
        let bytes = if width < 8 {
            let low: Vec<u8> = values.iter().map(|&v| (v.into() as u8) & ((1u8 << width) - 1)).collect();
            pack_bits(&low, width)
        } else {
            let n = width / 8;
            let mut bytes = Vec::with_capacity(values.len() * n);
            for &v in values {
                bytes.extend_from_slice(&v.into().to_le_bytes()[..n]);
            }
            bytes
        };
        Self::from_bytes(dtype, shape, bytes)
    }

    pub fn from_i32(shape: Vec<usize>, values: &[i32]) -> Result<Tensor> {
        Self::from_bytes(DType::Int32, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    pub fn from_bools(shape: Vec<usize>, values: &[bool]) -> Result<Tensor> {
        Self::from_bytes(DType::Bool, shape, values.iter().map(|&b| b as u8).collect())
    }

    pub fn from_strings(shape: Vec<usize>, values: Vec<String>) -> Result<Tensor> {
        if element_count(&shape) != Some(values.len()) {
            return Err(Error::invalid(format!("{} strings for shape {shape:?}", values.len())));
        }
        Ok(Tensor { dtype: DType::String, shape, data: TensorData::Strings(values) })
    }

    pub fn scalar_string(value: &str) -> Tensor {
        Tensor { dtype: DType::String, shape: vec![], data: TensorData::Strings(vec![value.into()]) }
    }

    pub fn scalar_i32(value: i32) -> Tensor {
        Self::from_i32(vec![], &[value]).expect("one element fits a scalar")
    }

    pub fn scalar_f32(value: f32) -> Tensor {
        Self::from_f32(vec![], &[value]).expect("one element fits a scalar")
    }

    pub fn scalar_bool(value: bool) -> Tensor {
        Self::from_bools(vec![], &[value]).expect("one element fits a scalar")
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        element_count(&self.shape).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Storage bytes (empty for strings).
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            TensorData::Bytes(b) => b,
            TensorData::Strings(_) => &[],
        }
    }

    pub fn strings(&self) -> Option<&[String]> {
        match &self.data {
            TensorData::Strings(s) => Some(s),
            TensorData::Bytes(_) => None,
        }
    }

    /// The same data under another shape with the same element count.
    pub fn reshaped(mut self, shape: Vec<usize>) -> Result<Tensor> {
        if element_count(&shape) != Some(self.len()) {
            return Err(Error::invalid(format!("cannot reshape {:?} to {shape:?}", self.shape)));
        }
        self.shape = shape;
        Ok(self)
    }

    /// Rows `start..start + len` along the first axis; each row must fill whole bytes.
    pub fn rows(&self, start: usize, len: usize) -> Result<Tensor> {
        let (&first, rest) = self.shape.split_first().ok_or_else(|| Error::invalid("a scalar has no rows"))?;
        let row_bits = element_count(rest).and_then(|n| n.checked_mul(self.dtype.bit_width()?));
        let row_bytes = match row_bits {
            Some(bits) if bits % 8 == 0 => bits / 8,
            _ => return Err(Error::invalid(format!("{} rows of shape {rest:?} are not whole bytes", self.dtype))),
        };
        if start.checked_add(len).is_none_or(|end| end > first) {
            return Err(Error::invalid(format!("rows {start}..{} of {first}", start.saturating_add(len))));
        }
        let mut shape = self.shape.clone();
        shape[0] = len;
        Tensor::from_bytes(self.dtype, shape, self.bytes()[start * row_bytes..(start + len) * row_bytes].to_vec())
    }

    /// Integer (or bool) elements, sign-extended for signed types.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        let width = self.dtype.bit_width()?;
        if !(self.dtype.is_int() || self.dtype == DType::Bool) {
            return None;
        }
        let bytes = self.bytes();
        let signed = self.dtype.is_signed_int();
        if width < 8 {
            let raw = unpack_bits(bytes, width, self.len());
            return Some(
                raw.into_iter()
                    .map(|v| {
                        let v = v as i64;
                        if signed && v >= 1 << (width - 1) {
                            v - (1 << width)
                        } else {
                            v
                        }
                    })
                    .collect(),
            );
        }
        let n = width / 8;
        Some(
            bytes
                .chunks_exact(n)
                .map(|c| {
                    let mut buf = [0u8; 8];
                    buf[..n].copy_from_slice(c);
                    let v = u64::from_le_bytes(buf);
                    if signed && n < 8 && v >> (n * 8 - 1) & 1 == 1 {
                        (v | (u64::MAX << (n * 8))) as i64
                    } else {
                        v as i64
                    }
                })
                .collect(),
        )
    }

    /// Elements as f64: floats exactly, integers and bools converted.
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        let b = self.bytes();
        Some(match self.dtype {
            DType::Fp16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
            DType::Bf16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
            DType::Fp32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
            DType::Fp64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("chunks of 8"))).collect(),
            _ => self.to_i64()?.into_iter().map(|v| v as f64).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_packing_matches_spec_examples() {
        // §4.4: int4 [2,-6,4,-5,7,1,2,3] -> a2 b4 17 32; §3.1: [3,-2,1] -> e3 01.
        let t = Tensor::from_ints(DType::Int4, vec![8], &[2, -6, 4, -5, 7, 1, 2, 3]).unwrap();
        assert_eq!(t.bytes(), &[0xa2, 0xb4, 0x17, 0x32]);
        let t = Tensor::from_ints(DType::Int4, vec![3], &[3, -2, 1]).unwrap();
        assert_eq!(t.bytes(), &[0xe3, 0x01]);
        assert_eq!(t.to_i64().unwrap(), vec![3, -2, 1]);
    }

    #[test]
    fn straddling_widths_round_trip() {
        for dtype in [DType::Uint3, DType::Uint6, DType::Uint1, DType::Uint2] {
            let max = dtype.int_range().unwrap().1;
            let values: Vec<i64> = (0..37).map(|i| (i * 5 + 3) % (max + 1)).collect();
            let t = Tensor::from_ints(dtype, vec![37], &values).unwrap();
            assert_eq!(t.bytes().len(), (37 * dtype.bit_width().unwrap()).div_ceil(8));
            assert_eq!(t.to_i64().unwrap(), values, "{dtype}");
        }
        // uint3 [5, 3, 7]: bits 101 | 011<<3 | 111<<6 -> 0b11_011_101, 0b1
        let t = Tensor::from_ints(DType::Uint3, vec![3], &[5, 3, 7]).unwrap();
        assert_eq!(t.bytes(), &[0b1101_1101, 0b0000_0001]);
    }

    #[test]
    fn rejects_out_of_range_and_wrong_lengths() {
        assert!(Tensor::from_ints(DType::Int4, vec![1], &[8]).is_err());
        assert!(Tensor::from_ints(DType::Uint2, vec![1], &[-1]).is_err());
        assert!(Tensor::from_bytes(DType::Fp16, vec![3], vec![0; 5]).is_err());
        assert!(Tensor::from_bytes(DType::Fp32, vec![usize::MAX, 2], vec![]).is_err());
    }

    #[test]
    fn signed_widening() {
        let t = Tensor::from_ints(DType::Int16, vec![3], &[-32768, 32767, -1]).unwrap();
        assert_eq!(t.to_i64().unwrap(), vec![-32768, 32767, -1]);
        let t = Tensor::from_ints(DType::Uint32, vec![1], &[u32::MAX as i64]).unwrap();
        assert_eq!(t.to_i64().unwrap(), vec![u32::MAX as i64]);
    }
}
