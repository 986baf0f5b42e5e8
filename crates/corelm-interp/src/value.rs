//! Run-time values: floats computed in f32 (rounded to fp16 where the program types them fp16),
//! integers of every width widened to i32, bools, and strings for constant parameters.

use corelm_contract::tensor::{HostData, HostTensor};
use corelm_format::inspect::human_bytes;
use corelm_format::tensor::element_count;
use corelm_format::{DType, Tensor};
use half::f16;

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    /// A compressed constant matrix (see [`Packed`]).
    Packed(std::sync::Arc<Packed>),
}

/// A tensor value during execution.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    /// The MIL dtype the program gives this value (fp16 values hold fp16-representable f32s).
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Data,
}

/// Rounds every element to the nearest fp16 value (kept as f32).
pub fn round_f16(v: &mut [f32]) {
    use rayon::prelude::*;
    v.par_chunks_mut(1 << 15).for_each(|part| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
                // SAFETY: the features were detected at run time.
                unsafe { round_f16_f16c(part) };
                return;
            }
        }
        // Elsewhere through a small buffer, so `half`'s slice conversions use the CPU's vector
        // instructions where it has them.
        use half::slice::HalfFloatSliceExt;
        let mut buf = [f16::ZERO; 256];
        for chunk in part.chunks_mut(256) {
            let b = &mut buf[..chunk.len()];
            b.convert_from_f32_slice(chunk);
            b.convert_to_f32_slice(chunk);
        }
    });
}

/// [`round_f16`] eight at a time: to half precision (round to nearest even) and back.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c,avx")]
unsafe fn round_f16_f16c(v: &mut [f32]) {
    use std::arch::x86_64::{
        _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps, _MM_FROUND_TO_NEAREST_INT,
    };
    let mut chunks = v.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: the chunk holds eight floats.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(c.as_ptr()));
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    for x in chunks.into_remainder() {
        *x = f16::from_f32(*x).to_f32();
    }
}

/// Sets a lower [`memory_budget`] (bytes) for embedders and fuzzing.
pub const MEMORY_BUDGET_ENV: &str = "CORELM_MAX_TENSOR_BYTES";

/// The most bytes one tensor (or a function's states together) may take: the machine's physical
/// memory, or the process's address-space limit if that is lower, or `CORELM_MAX_TENSOR_BYTES`.
/// Shapes come from the package (declared) or from its data (`fill`, `tile`, broadcasting),
/// which may lie; past this an allocation would abort the process.
pub fn memory_budget() -> u64 {
    static BUDGET: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        let mut budget = std::env::var(MEMORY_BUDGET_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
        #[cfg(unix)]
        {
            // SAFETY: sysconf and getrlimit only read process and system settings.
            let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
            if pages > 0 && page > 0 {
                budget = budget.min((pages as u64).saturating_mul(page as u64));
            }
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: `limit` is a valid rlimit to write.
            if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } == 0 && limit.rlim_cur != libc::RLIM_INFINITY {
                budget = budget.min(limit.rlim_cur);
            }
        }
        budget
    })
}

/// The element count of `shape`, checked before anything is allocated for it: the product must
/// not overflow, and its values (at most 4 bytes each at run time) must fit [`memory_budget`].
/// The error names `what` and its size.
pub fn checked_len(shape: &[usize], what: &dyn std::fmt::Display) -> Result<usize> {
    let n = element_count(shape)
        .ok_or_else(|| Error::invalid(format!("{what}: shape {shape:?} has more elements than memory can address")))?;
    let bytes = (n as u64).saturating_mul(4);
    if bytes > memory_budget() {
        return Err(Error::invalid(format!(
            "{what}: shape {shape:?} needs {}, more than the {} this machine can hold",
            human_bytes(bytes),
            human_bytes(memory_budget())
        )));
    }
    Ok(n)
}

impl Value {
    pub fn f32(dtype: DType, shape: Vec<usize>, mut data: Vec<f32>) -> Value {
        if dtype == DType::Fp16 {
            round_f16(&mut data);
        }
        Value { dtype, shape, data: Data::F32(data) }
    }

    pub fn i32(shape: Vec<usize>, data: Vec<i32>) -> Value {
        Value { dtype: DType::Int32, shape, data: Data::I32(data) }
    }

    pub fn bool(shape: Vec<usize>, data: Vec<bool>) -> Value {
        Value { dtype: DType::Bool, shape, data: Data::Bool(data) }
    }

    /// A zeroed tensor; `what` names it if its shape is too large to hold ([`checked_len`]).
    pub fn zeros(dtype: DType, shape: Vec<usize>, what: &dyn std::fmt::Display) -> Result<Value> {
        let n = checked_len(&shape, what)?;
        Ok(match dtype {
            d if d.is_float() => Value::f32(dtype, shape, vec![0.0; n]),
            DType::Bool => Value::bool(shape, vec![false; n]),
            _ => Value { dtype, shape, data: Data::I32(vec![0; n]) },
        })
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn as_f32(&self) -> Result<&[f32]> {
        match &self.data {
            Data::F32(v) => Ok(v),
            Data::Packed(_) => Err(Error::invalid("a compressed weight cannot be used here")),
            _ => Err(Error::invalid(format!("expected a float tensor, got {}", self.dtype))),
        }
    }

    pub fn as_i32(&self) -> Result<&[i32]> {
        match &self.data {
            Data::I32(v) => Ok(v),
            _ => Err(Error::invalid(format!("expected an integer tensor, got {}", self.dtype))),
        }
    }

    pub fn as_bool(&self) -> Result<&[bool]> {
        match &self.data {
            Data::Bool(v) => Ok(v),
            _ => Err(Error::invalid(format!("expected a bool tensor, got {}", self.dtype))),
        }
    }

    pub fn string(&self) -> Result<&str> {
        match &self.data {
            Data::Str(v) if !v.is_empty() => Ok(&v[0]),
            _ => Err(Error::invalid("expected a string")),
        }
    }

    /// Integer or bool contents as i64 (shapes, axes, indices).
    pub fn ints(&self) -> Result<Vec<i64>> {
        match &self.data {
            Data::I32(v) => Ok(v.iter().map(|&x| x as i64).collect()),
            Data::Bool(v) => Ok(v.iter().map(|&x| x as i64).collect()),
            Data::F32(v) => Ok(v.iter().map(|&x| x as i64).collect()),
            Data::Str(_) | Data::Packed(_) => Err(Error::invalid("expected integers")),
        }
    }

    pub fn scalar_f32(&self) -> Result<f32> {
        match &self.data {
            Data::F32(v) if !v.is_empty() => Ok(v[0]),
            Data::I32(v) if !v.is_empty() => Ok(v[0] as f32),
            Data::Packed(p) if p.rows() * p.cols() > 0 => Ok(p.dense()[0]),
            _ => Err(Error::invalid("expected a numeric scalar")),
        }
    }

    /// Elements as f32 whatever the dtype, borrowed when they already are.
    pub fn floats(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.data {
            Data::F32(v) => std::borrow::Cow::Borrowed(v),
            _ => std::borrow::Cow::Owned(self.to_f32_vec()),
        }
    }

    /// Elements as f32 whatever the dtype (for mixed inputs).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.clone(),
            Data::I32(v) => v.iter().map(|&x| x as f32).collect(),
            Data::Bool(v) => v.iter().map(|&x| x as u8 as f32).collect(),
            Data::Packed(p) => p.dense(),
            Data::Str(_) => vec![],
        }
    }

    /// Decodes a format-level constant tensor.
    pub fn from_tensor(t: &Tensor) -> Result<Value> {
        let shape = t.shape().to_vec();
        let dtype = t.dtype();
        Ok(match dtype {
            DType::String => Value { dtype, shape, data: Data::Str(t.strings().unwrap_or(&[]).to_vec()) },
            DType::Bool => Value::bool(shape, t.to_i64().expect("bool").into_iter().map(|v| v != 0).collect()),
            DType::Fp16 => {
                let halves = fp16_values(t.bytes());
                let mut out = vec![0f32; halves.len()];
                f16_to_f32(&halves, &mut out);
                Value { dtype, shape, data: Data::F32(out) }
            }
            DType::Fp32 => Value::f32(
                dtype,
                shape,
                t.bytes().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            ),
            d if d.is_float() => {
                Value::f32(d, shape, t.to_f64().expect("float").into_iter().map(|v| v as f32).collect())
            }
            _ => {
                let ints = t.to_i64().expect("integer");
                if ints.iter().any(|&v| v < i32::MIN as i64 || v > i32::MAX as i64) {
                    return Err(Error::invalid(format!("{dtype} constant does not fit int32")));
                }
                Value { dtype, shape, data: Data::I32(ints.into_iter().map(|v| v as i32).collect()) }
            }
        })
    }

    /// A driver's tensor as a value, its elements copied.
    pub fn from_host(t: &HostTensor) -> Value {
        let data = match (&t.data, t.dtype) {
            (HostData::F32(v), _) => Data::F32(v.clone()),
            (HostData::I32(v), DType::Bool) => Data::Bool(v.iter().map(|&x| x != 0).collect()),
            (HostData::I32(v), _) => Data::I32(v.clone()),
        };
        Value { dtype: t.dtype, shape: t.shape.clone(), data }
    }

    /// The value as a driver's tensor, its elements moved (a compressed constant expanded);
    /// strings have no such form. `name` names the output in the error.
    pub fn into_host(self, name: &str) -> Result<HostTensor> {
        let data = match self.data {
            Data::F32(v) => HostData::F32(v),
            Data::I32(v) => HostData::I32(v),
            Data::Bool(v) => HostData::I32(v.into_iter().map(i32::from).collect()),
            Data::Packed(p) => HostData::F32(p.dense()),
            Data::Str(_) => return Err(Error::invalid(format!("output `{name}`: strings do not reach the driver"))),
        };
        Ok(HostTensor { dtype: self.dtype, shape: self.shape, data })
    }

    /// Checks an element count against the shape.
    pub fn check(&self) -> Result<()> {
        let n = match &self.data {
            Data::F32(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::Bool(v) => v.len(),
            Data::Str(v) => v.len(),
            Data::Packed(p) => p.rows() * p.cols(),
        };
        if element_count(&self.shape) != Some(n) {
            return Err(Error::invalid(format!("{n} elements for shape {:?}", self.shape)));
        }
        Ok(())
    }
}

/// Little-endian fp16 storage as values.
pub fn fp16_values(bytes: &[u8]) -> Vec<f16> {
    bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect()
}

/// Widens fp16 to f32, with the F16C instructions where the CPU has them (the portable path in
/// `half` converts one element at a time unless the whole build targets F16C).
pub fn f16_to_f32(src: &[half::f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the features were detected at run time.
            unsafe { f16_to_f32_f16c(src, out) };
            return;
        }
    }
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c,avx")]
unsafe fn f16_to_f32_f16c(src: &[half::f16], out: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let n = src.len().min(out.len());
    let chunks = n / 8;
    for i in 0..chunks {
        // SAFETY: 8 halves (16 bytes) are read and 8 floats written, within both slices.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i * 8) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i * 8), _mm256_cvtph_ps(h));
        }
    }
    for i in chunks * 8..n {
        out[i] = src[i].to_f32();
    }
}

/// A constant matrix kept compressed in memory and expanded row by row where it is used
/// (inside `linear` and `gather`), so weights cost their stored size, not f32.
#[derive(Debug, PartialEq)]
pub enum Packed {
    F16 {
        rows: usize,
        cols: usize,
        data: Vec<half::f16>,
    },
    /// `scale · (q − offset)` with one scale (and offset) per `block` columns of each row; `q`
    /// signed, one byte each (`bits` 8) or two to a byte, low nibble first (`bits` 4).
    Blockwise {
        rows: usize,
        cols: usize,
        block: usize,
        bits: u8,
        /// The op's output is fp16: each rebuilt weight is rounded to it, as on the device.
        fp16: bool,
        q: Vec<u8>,
        scales: Vec<f32>,
        offsets: Option<Vec<f32>>,
    },
    /// 4-bit palettization: each weight is an entry of its row group's palette of sixteen
    /// values; indices two to a byte, low nibble first.
    Palette {
        rows: usize,
        cols: usize,
        /// Rows sharing one palette.
        group_rows: usize,
        indices: Vec<u8>,
        /// Sixteen values per group of rows.
        palettes: Vec<f32>,
    },
}

impl Packed {
    pub fn rows(&self) -> usize {
        match self {
            Packed::F16 { rows, .. } | Packed::Blockwise { rows, .. } | Packed::Palette { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Packed::F16 { cols, .. } | Packed::Blockwise { cols, .. } | Packed::Palette { cols, .. } => *cols,
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Packed::F16 { data, .. } => data.len() * 2,
            Packed::Blockwise { q, scales, offsets, .. } => {
                q.len() + 4 * (scales.len() + offsets.as_ref().map_or(0, |o| o.len()))
            }
            Packed::Palette { indices, palettes, .. } => indices.len() + 4 * palettes.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector rounding agrees with `half`'s scalar conversion everywhere that matters:
    /// ties (to even), fp16 subnormals and underflow, overflow to infinity, NaN, and lengths
    /// that leave a remainder after the groups of eight.
    #[test]
    fn round_f16_matches_the_scalar_conversion() {
        let mut values =
            vec![0.0f32, -0.0, 1.0, 65504.0, 65520.0, 1e6, -1e6, f32::INFINITY, f32::NAN, 6e-8, 3e-8, 1e-9];
        // Every fp16 step boundary region: halfway points between neighbours round to even.
        for bits in (0u16..0x7c00).step_by(97) {
            let h = f16::from_bits(bits).to_f32();
            let next = f16::from_bits(bits + 1).to_f32();
            values.extend([h, (h + next) / 2.0, -(h + next) / 2.0, h + (next - h) * 0.49, h + (next - h) * 0.51]);
        }
        values.push(0.3); // an odd length: a remainder after the groups of eight
        let want: Vec<f32> = values.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let mut got = values.clone();
        round_f16(&mut got);
        for ((g, w), v) in got.iter().zip(&want).zip(&values) {
            assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "{v:e}: {g:e} vs {w:e}");
        }
    }
}
