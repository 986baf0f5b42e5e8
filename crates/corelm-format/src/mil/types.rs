//! MIL value types: tensors with fixed or flexible dimensions, and states wrapping a tensor.

use std::fmt;

use crate::dtype::DType;

/// One dimension of a tensor type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(usize),
    /// Known only at prediction time (a flexible input dimension or something derived from it).
    Unknown,
}

impl Dim {
    pub fn fixed(self) -> Option<usize> {
        match self {
            Dim::Fixed(n) => Some(n),
            Dim::Unknown => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// A tensor type; rank 0 is a scalar.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub dims: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, dims: Vec<Dim>) -> TensorType {
        TensorType { dtype, dims }
    }

    pub fn fixed(dtype: DType, shape: &[usize]) -> TensorType {
        TensorType { dtype, dims: shape.iter().map(|&d| Dim::Fixed(d)).collect() }
    }

    pub fn scalar(dtype: DType) -> TensorType {
        TensorType { dtype, dims: vec![] }
    }

    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    /// The shape when every dimension is fixed.
    pub fn shape(&self) -> Option<Vec<usize>> {
        self.dims.iter().map(|d| d.fixed()).collect()
    }

    pub fn with_dtype(&self, dtype: DType) -> TensorType {
        TensorType { dtype, dims: self.dims.clone() }
    }

    /// Whether a value of type `actual` may stand where `self` is declared: same dtype and rank,
    /// and every dimension fixed on both sides agrees.
    pub fn accepts(&self, actual: &TensorType) -> bool {
        self.dtype == actual.dtype
            && self.rank() == actual.rank()
            && self.dims.iter().zip(&actual.dims).all(|(a, b)| match (a, b) {
                (Dim::Fixed(x), Dim::Fixed(y)) => x == y,
                _ => true,
            })
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dims.is_empty() {
            return write!(f, "{}", self.dtype);
        }
        write!(f, "tensor<{}, [", self.dtype)?;
        for (i, d) in self.dims.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]>")
    }
}

/// The type of a function input or an op output.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ValueType {
    Tensor(TensorType),
    /// A Core ML state (read with `read_state`, written with `write_state`).
    State(TensorType),
}

impl ValueType {
    pub fn tensor(&self) -> &TensorType {
        match self {
            ValueType::Tensor(t) | ValueType::State(t) => t,
        }
    }

    pub fn is_state(&self) -> bool {
        matches!(self, ValueType::State(_))
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueType::Tensor(t) => t.fmt(f),
            ValueType::State(t) => write!(f, "state<{t}>"),
        }
    }
}
