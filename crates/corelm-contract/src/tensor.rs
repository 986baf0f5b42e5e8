//! Tensors in host memory as they cross between the generation driver ([`crate::driver`]) and an
//! executor: token ids, positions, causal masks, the hidden states one package part hands the
//! next, and logits. Neither the interpreter's values nor Core ML's arrays, so neither backend
//! needs the other; each converts at its own boundary.

use std::collections::BTreeMap;

use corelm_format::DType;

/// A tensor's elements, one number type per kind: every float dtype as f32 (the executor rounds
/// to the precision it runs in), every integer dtype and bool (0 or 1) as i32.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

/// A tensor in host memory: its dtype in the package, its shape, and its elements row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: HostData,
}

/// The inputs or outputs of one prediction, by name.
pub type Tensors = BTreeMap<String, HostTensor>;

impl HostTensor {
    /// Floats of a float `dtype`.
    pub fn f32(dtype: DType, shape: Vec<usize>, data: Vec<f32>) -> HostTensor {
        HostTensor { dtype, shape, data: HostData::F32(data) }
    }

    /// 32-bit integers.
    pub fn i32(shape: Vec<usize>, data: Vec<i32>) -> HostTensor {
        HostTensor { dtype: DType::Int32, shape, data: HostData::I32(data) }
    }
}
