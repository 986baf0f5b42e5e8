//! Conversion between the in-memory program and the MIL protobuf messages. Reading is strict:
//! every count, rank and length that comes from the file is checked before it is used.

use std::collections::BTreeMap;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::mil::program::{Binding, Block, Function, NamedType, Operation, Program, Value, ValueData};
use crate::mil::types::{Dim, TensorType, ValueType};
use crate::proto::mil as pb;
use crate::tensor::{element_count, Tensor};

const BUILD_INFO: &str = "buildInfo";

// ---------------------------------------------------------------- writing

fn dims_to_proto(dims: &[Dim]) -> Vec<pb::Dimension> {
    use pb::dimension::{ConstantDimension, Dimension as D, UnknownDimension};
    dims.iter()
        .map(|d| pb::Dimension {
            dimension: Some(match d {
                Dim::Fixed(n) => D::Constant(ConstantDimension { size: *n as u64 }),
                Dim::Unknown => D::Unknown(UnknownDimension { variadic: false }),
            }),
        })
        .collect()
}

pub fn tensor_type_to_proto(t: &TensorType) -> pb::ValueType {
    pb::ValueType {
        r#type: Some(pb::value_type::Type::TensorType(pb::TensorType {
            data_type: t.dtype.to_proto() as i32,
            rank: t.rank() as i64,
            dimensions: dims_to_proto(&t.dims),
            attributes: BTreeMap::new(),
        })),
    }
}

pub fn value_type_to_proto(t: &ValueType) -> pb::ValueType {
    match t {
        ValueType::Tensor(t) => tensor_type_to_proto(t),
        ValueType::State(t) => pb::ValueType {
            r#type: Some(pb::value_type::Type::StateType(Box::new(pb::StateType {
                wrapped_type: Some(Box::new(tensor_type_to_proto(t))),
            }))),
        },
    }
}

/// Encodes a tensor in the `TensorValue` field coremltools uses for its dtype (format spec §3.1).
pub fn tensor_value_to_proto(t: &Tensor) -> pb::TensorValue {
    use pb::tensor_value::*;
    let ints = || t.to_i64().expect("integer dtype");
    let value = match t.dtype() {
        DType::Fp32 => {
            Value::Floats(RepeatedFloats { values: t.to_f64().expect("float").into_iter().map(|v| v as f32).collect() })
        }
        DType::Fp64 => Value::Doubles(RepeatedDoubles { values: t.to_f64().expect("float") }),
        DType::Int32 | DType::Int16 | DType::Uint16 => {
            Value::Ints(RepeatedInts { values: ints().into_iter().map(|v| v as i32).collect() })
        }
        DType::Int64 | DType::Uint64 => Value::LongInts(RepeatedLongInts { values: ints() }),
        DType::Bool => Value::Bools(RepeatedBools { values: ints().into_iter().map(|v| v != 0).collect() }),
        DType::String => Value::Strings(RepeatedStrings { values: t.strings().unwrap_or(&[]).to_vec() }),
        // fp16, bf16, int8, uint8, uint32 and the sub-byte types: raw storage bytes.
        _ => Value::Bytes(RepeatedBytes { values: t.bytes().to_vec() }),
    };
    pb::TensorValue { value: Some(value) }
}

pub fn value_to_proto(v: &Value) -> pb::Value {
    let value = match &v.data {
        ValueData::Immediate(t) => pb::value::Value::ImmediateValue(pb::value::ImmediateValue {
            value: Some(pb::value::immediate_value::Value::Tensor(tensor_value_to_proto(t))),
        }),
        ValueData::Blob { file, offset } => {
            pb::value::Value::BlobFileValue(pb::value::BlobFileValue { file_name: file.clone(), offset: *offset })
        }
    };
    pb::Value { doc_string: String::new(), r#type: Some(tensor_type_to_proto(&v.ty)), value: Some(value) }
}

fn named_to_proto(n: &NamedType) -> pb::NamedValueType {
    pb::NamedValueType { name: n.name.clone(), r#type: Some(value_type_to_proto(&n.ty)) }
}

fn operation_to_proto(op: &Operation) -> pb::Operation {
    use pb::argument::{binding::Binding as B, Binding as PbBinding};
    let inputs = op
        .inputs
        .iter()
        .map(|(param, bindings)| {
            let arguments = bindings
                .iter()
                .map(|b| PbBinding {
                    binding: Some(match b {
                        Binding::Name(n) => B::Name(n.clone()),
                        Binding::Value(v) => B::Value(value_to_proto(v)),
                    }),
                })
                .collect();
            (param.clone(), pb::Argument { arguments })
        })
        .collect();
    let mut attributes: BTreeMap<String, pb::Value> =
        op.attributes.iter().map(|(k, v)| (k.clone(), value_to_proto(v))).collect();
    if let Some(name) = &op.name {
        attributes.insert("name".into(), value_to_proto(&Value::immediate(Tensor::scalar_string(name))));
    }
    pb::Operation {
        r#type: op.op_type.clone(),
        inputs,
        outputs: op.outputs.iter().map(named_to_proto).collect(),
        blocks: vec![],
        attributes,
    }
}

fn string_scalar_type() -> pb::ValueType {
    tensor_type_to_proto(&TensorType::scalar(DType::String))
}

fn build_info_to_proto(info: &BTreeMap<String, String>) -> pb::Value {
    use pb::dictionary_value::KeyValuePair;
    let string = |s: &str| value_to_proto(&Value::immediate(Tensor::scalar_string(s)));
    pb::Value {
        doc_string: String::new(),
        r#type: Some(pb::ValueType {
            r#type: Some(pb::value_type::Type::DictionaryType(Box::new(pb::DictionaryType {
                key_type: Some(Box::new(string_scalar_type())),
                value_type: Some(Box::new(string_scalar_type())),
            }))),
        }),
        value: Some(pb::value::Value::ImmediateValue(pb::value::ImmediateValue {
            value: Some(pb::value::immediate_value::Value::Dictionary(pb::DictionaryValue {
                values: info
                    .iter()
                    .map(|(k, v)| KeyValuePair { key: Some(string(k)), value: Some(string(v)) })
                    .collect(),
            })),
        })),
    }
}

pub fn program_to_proto(program: &Program) -> pb::Program {
    let functions = program
        .functions
        .iter()
        .map(|(name, f)| {
            let block = pb::Block {
                inputs: vec![],
                outputs: f.block.outputs.clone(),
                operations: f.block.operations.iter().map(operation_to_proto).collect(),
                attributes: BTreeMap::new(),
            };
            let function = pb::Function {
                inputs: f.inputs.iter().map(named_to_proto).collect(),
                opset: f.opset.clone(),
                block_specializations: BTreeMap::from([(f.opset.clone(), block)]),
                attributes: BTreeMap::new(),
            };
            (name.clone(), function)
        })
        .collect();
    let mut attributes = BTreeMap::new();
    if !program.build_info.is_empty() {
        attributes.insert(BUILD_INFO.to_string(), build_info_to_proto(&program.build_info));
    }
    pb::Program { version: 1, functions, doc_string: String::new(), attributes }
}

// ---------------------------------------------------------------- reading

pub fn tensor_type_from_proto(t: &pb::TensorType) -> Result<TensorType> {
    let dtype = DType::from_proto(t.data_type)
        .ok_or_else(|| Error::invalid(format!("unsupported data type number {}", t.data_type)))?;
    if t.rank < 0 {
        return Err(Error::invalid(format!("variable rank ({}) tensors are not supported", t.rank)));
    }
    if t.rank as u64 != t.dimensions.len() as u64 {
        return Err(Error::invalid(format!("tensor rank {} but {} dimensions listed", t.rank, t.dimensions.len())));
    }
    let dims = t
        .dimensions
        .iter()
        .map(|d| match &d.dimension {
            Some(pb::dimension::Dimension::Constant(c)) => usize::try_from(c.size)
                .map(Dim::Fixed)
                .map_err(|_| Error::invalid(format!("dimension {} is too large", c.size))),
            Some(pb::dimension::Dimension::Unknown(u)) if !u.variadic => Ok(Dim::Unknown),
            Some(pb::dimension::Dimension::Unknown(_)) => Err(Error::invalid("variadic dimensions are not supported")),
            None => Err(Error::invalid("dimension with neither size nor unknown marker")),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(TensorType { dtype, dims })
}

fn tensor_of(t: &pb::ValueType) -> Result<TensorType> {
    match &t.r#type {
        Some(pb::value_type::Type::TensorType(t)) => tensor_type_from_proto(t),
        Some(other) => Err(Error::invalid(format!("expected a tensor type, found {}", kind_name(other)))),
        None => Err(Error::invalid("value type is empty")),
    }
}

fn kind_name(t: &pb::value_type::Type) -> &'static str {
    match t {
        pb::value_type::Type::TensorType(_) => "tensor",
        pb::value_type::Type::ListType(_) => "list",
        pb::value_type::Type::TupleType(_) => "tuple",
        pb::value_type::Type::DictionaryType(_) => "dictionary",
        pb::value_type::Type::StateType(_) => "state",
    }
}

pub fn value_type_from_proto(t: &pb::ValueType) -> Result<ValueType> {
    match &t.r#type {
        Some(pb::value_type::Type::StateType(s)) => {
            let wrapped = s.wrapped_type.as_deref().ok_or_else(|| Error::invalid("state without a wrapped type"))?;
            Ok(ValueType::State(tensor_of(wrapped)?))
        }
        _ => Ok(ValueType::Tensor(tensor_of(t)?)),
    }
}

/// Decodes an immediate tensor, checking the element count against the declared shape.
pub fn tensor_value_from_proto(ty: &TensorType, v: &pb::TensorValue) -> Result<Tensor> {
    use pb::tensor_value::Value as V;
    let shape =
        ty.shape().ok_or_else(|| Error::invalid(format!("immediate value of type {ty} has unknown dimensions")))?;
    let count = element_count(&shape).ok_or_else(|| Error::invalid(format!("shape {shape:?} overflows")))?;
    let check = |n: usize| {
        if n == count {
            Ok(())
        } else {
            Err(Error::invalid(format!("{ty} value holds {n} elements, its type needs {count}")))
        }
    };
    let dtype = ty.dtype;
    match &v.value {
        Some(V::Floats(f)) if dtype.is_float() => {
            check(f.values.len())?;
            Tensor::from_floats(dtype, shape, &f.values.iter().map(|&x| x as f64).collect::<Vec<_>>())
        }
        Some(V::Doubles(f)) if dtype.is_float() => {
            check(f.values.len())?;
            Tensor::from_floats(dtype, shape, &f.values)
        }
        Some(V::Ints(i)) if dtype.is_int() => {
            check(i.values.len())?;
            Tensor::from_ints(dtype, shape, &i.values.iter().map(|&x| x as i64).collect::<Vec<_>>())
        }
        Some(V::LongInts(i)) if dtype.is_int() => {
            check(i.values.len())?;
            Tensor::from_ints(dtype, shape, &i.values)
        }
        Some(V::Bools(b)) if dtype == DType::Bool => {
            check(b.values.len())?;
            Tensor::from_bools(shape, &b.values)
        }
        Some(V::Strings(s)) if dtype == DType::String => {
            check(s.values.len())?;
            Tensor::from_strings(shape, s.values.clone())
        }
        Some(V::Bytes(b)) if dtype != DType::String => Tensor::from_bytes(dtype, shape, b.values.clone()),
        // A zero-element tensor may leave the oneof unset.
        None if count == 0 => Tensor::from_bytes(dtype, shape, vec![]),
        _ => Err(Error::invalid(format!("immediate value does not match its type {ty}"))),
    }
}

pub fn value_from_proto(v: &pb::Value) -> Result<Value> {
    let ty = tensor_of(v.r#type.as_ref().ok_or_else(|| Error::invalid("value without a type"))?)?;
    let data = match &v.value {
        Some(pb::value::Value::ImmediateValue(imm)) => match &imm.value {
            Some(pb::value::immediate_value::Value::Tensor(t)) => {
                ValueData::Immediate(tensor_value_from_proto(&ty, t)?)
            }
            Some(_) => return Err(Error::invalid("tuple, list and dictionary values are not supported here")),
            None => return Err(Error::invalid("immediate value is empty")),
        },
        Some(pb::value::Value::BlobFileValue(b)) => ValueData::Blob { file: b.file_name.clone(), offset: b.offset },
        None => return Err(Error::invalid("value has neither immediate data nor a blob reference")),
    };
    Ok(Value { ty, data })
}

fn named_from_proto(n: &pb::NamedValueType) -> Result<NamedType> {
    let ty = n.r#type.as_ref().ok_or_else(|| Error::invalid(format!("`{}` has no type", n.name)))?;
    Ok(NamedType {
        name: n.name.clone(),
        ty: value_type_from_proto(ty).map_err(|e| e.context(format!("`{}`", n.name)))?,
    })
}

fn operation_from_proto(op: &pb::Operation) -> Result<Operation> {
    if !op.blocks.is_empty() {
        return Err(Error::invalid(format!("op `{}` has nested blocks, which corelm does not support", op.r#type)));
    }
    let mut inputs = BTreeMap::new();
    for (param, arg) in &op.inputs {
        let bindings = arg
            .arguments
            .iter()
            .map(|b| match &b.binding {
                Some(pb::argument::binding::Binding::Name(n)) => Ok(Binding::Name(n.clone())),
                Some(pb::argument::binding::Binding::Value(v)) => Ok(Binding::Value(value_from_proto(v)?)),
                None => Err(Error::invalid(format!("empty binding for `{param}`"))),
            })
            .collect::<Result<Vec<_>>>()
            .map_err(|e| e.context(format!("input `{param}`")))?;
        inputs.insert(param.clone(), bindings);
    }
    let mut name = None;
    let mut attributes = BTreeMap::new();
    for (key, value) in &op.attributes {
        let value = value_from_proto(value).map_err(|e| e.context(format!("attribute `{key}`")))?;
        if key == "name" {
            let s = value.as_immediate().and_then(|t| t.strings()).and_then(|s| s.first()).cloned();
            name = Some(s.ok_or_else(|| Error::invalid("attribute `name` is not a string"))?);
        } else {
            attributes.insert(key.clone(), value);
        }
    }
    let outputs = op.outputs.iter().map(named_from_proto).collect::<Result<Vec<_>>>()?;
    Ok(Operation { op_type: op.r#type.clone(), name, inputs, outputs, attributes })
}

fn build_info_from_proto(v: &pb::Value) -> Result<BTreeMap<String, String>> {
    let dict = match &v.value {
        Some(pb::value::Value::ImmediateValue(pb::value::ImmediateValue {
            value: Some(pb::value::immediate_value::Value::Dictionary(d)),
        })) => d,
        _ => return Err(Error::invalid("`buildInfo` is not a dictionary value")),
    };
    let string = |v: &Option<pb::Value>| -> Result<String> {
        let v = value_from_proto(v.as_ref().ok_or_else(|| Error::invalid("buildInfo entry without key or value"))?)?;
        v.as_immediate()
            .and_then(|t| t.strings())
            .and_then(|s| s.first())
            .cloned()
            .ok_or_else(|| Error::invalid("buildInfo entries must be strings"))
    };
    dict.values.iter().map(|kv| Ok((string(&kv.key)?, string(&kv.value)?))).collect()
}

pub fn program_from_proto(p: &pb::Program) -> Result<Program> {
    if p.version != 1 {
        return Err(Error::invalid(format!("program version {} (only version 1 exists)", p.version)));
    }
    let mut build_info = BTreeMap::new();
    for (key, value) in &p.attributes {
        if key == BUILD_INFO {
            build_info = build_info_from_proto(value)?;
        }
    }
    let mut functions = BTreeMap::new();
    for (name, f) in &p.functions {
        let block = f.block_specializations.get(&f.opset).ok_or_else(|| {
            Error::invalid(format!("function `{name}`: opset `{}` has no block specialization", f.opset))
        })?;
        let operations = block
            .operations
            .iter()
            .map(|op| operation_from_proto(op).map_err(|e| e.context(format!("function `{name}`, op `{}`", op.r#type))))
            .collect::<Result<Vec<_>>>()?;
        let inputs = f
            .inputs
            .iter()
            .map(named_from_proto)
            .collect::<Result<Vec<_>>>()
            .map_err(|e| e.context(format!("function `{name}` inputs")))?;
        functions.insert(
            name.clone(),
            Function { inputs, opset: f.opset.clone(), block: Block { outputs: block.outputs.clone(), operations } },
        );
    }
    Ok(Program { functions, build_info })
}
