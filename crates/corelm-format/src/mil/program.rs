//! The ML Program in memory: functions, one block each, operations in SSA order.
//! Both the builder and the proto reader produce this; the validator, printer and
//! interpreter consume it.

use std::collections::BTreeMap;

use crate::mil::types::{TensorType, ValueType};
use crate::tensor::Tensor;

/// A constant value: inline, or a record in a blob file.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueData {
    Immediate(Tensor),
    /// `file` as written in the program (`@model_path/weights/weight.bin`); `offset` of the metadata.
    Blob {
        file: String,
        offset: u64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub ty: TensorType,
    pub data: ValueData,
}

impl Value {
    pub fn immediate(tensor: Tensor) -> Value {
        let ty = TensorType::fixed(tensor.dtype(), tensor.shape());
        Value { ty, data: ValueData::Immediate(tensor) }
    }

    pub fn as_immediate(&self) -> Option<&Tensor> {
        match &self.data {
            ValueData::Immediate(t) => Some(t),
            ValueData::Blob { .. } => None,
        }
    }
}

/// One argument of an op parameter: a variable by name, or an inline value.
#[derive(Clone, Debug, PartialEq)]
pub enum Binding {
    Name(String),
    Value(Value),
}

/// A named variable with its type (function inputs, op outputs).
#[derive(Clone, Debug, PartialEq)]
pub struct NamedType {
    pub name: String,
    pub ty: ValueType,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Operation {
    pub op_type: String,
    /// The `name` attribute (absent in some hand-written programs).
    pub name: Option<String>,
    /// Parameter name → bindings (several for tuple parameters such as `concat.values`).
    pub inputs: BTreeMap<String, Vec<Binding>>,
    pub outputs: Vec<NamedType>,
    /// Attributes other than `name`: `val` of `const`, parameters of iOS 16/17 `constexpr_*` ops.
    pub attributes: BTreeMap<String, Value>,
}

impl Operation {
    /// The single binding of a non-tuple parameter.
    pub fn input(&self, param: &str) -> Option<&Binding> {
        self.inputs.get(param).and_then(|b| b.first())
    }

    /// A label for messages: the op name, else its first output.
    pub fn label(&self) -> &str {
        self.name.as_deref().or_else(|| self.outputs.first().map(|o| o.name.as_str())).unwrap_or("<unnamed>")
    }

    pub fn is_constant(&self) -> bool {
        self.op_type == "const" || self.op_type.starts_with("constexpr_")
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Block {
    pub outputs: Vec<String>,
    pub operations: Vec<Operation>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    pub inputs: Vec<NamedType>,
    /// The active specialization (`CoreML8`, ...).
    pub opset: String,
    pub block: Block,
}

impl Function {
    /// The type of every variable defined in the function (inputs and op outputs).
    pub fn var_types(&self) -> BTreeMap<&str, &ValueType> {
        let mut types: BTreeMap<&str, &ValueType> = self.inputs.iter().map(|i| (i.name.as_str(), &i.ty)).collect();
        for op in &self.block.operations {
            for o in &op.outputs {
                types.insert(o.name.as_str(), &o.ty);
            }
        }
        types
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Program {
    pub functions: BTreeMap<String, Function>,
    /// The `buildInfo` attribute (string → string), e.g. the producing tool's version.
    pub build_info: BTreeMap<String, String>,
}
