//! Tensors as JSON for `corelm predict`: `{"shape": [...], "dtype": "int32"|"fp16"|"fp32"|"bool",
//! "data": [...]}` (data flat, row-major).

use std::collections::BTreeMap;

use corelm_format::DType;
use serde_json::{json, Value as Json};

use crate::value::{Data, Value};
use crate::{Error, Result};

fn tensor_from_json(name: &str, t: &Json) -> Result<Value> {
    let bad = |m: &str| Error::invalid(format!("input `{name}`: {m}"));
    let shape: Vec<usize> = t["shape"]
        .as_array()
        .ok_or_else(|| bad("`shape` must be a list of sizes"))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(|| bad("`shape` must be a list of sizes")))
        .collect::<Result<_>>()?;
    let dtype_name = t["dtype"].as_str().ok_or_else(|| bad("`dtype` must be a string"))?;
    let dtype = DType::from_name(dtype_name)
        .filter(|d| matches!(d, DType::Int32 | DType::Fp16 | DType::Fp32 | DType::Bool))
        .ok_or_else(|| bad(&format!("dtype `{dtype_name}` is not one of int32, fp16, fp32, bool")))?;
    let data = t["data"].as_array().ok_or_else(|| bad("`data` must be a list"))?;
    let value = match dtype {
        DType::Int32 => Value::i32(
            shape,
            data.iter()
                .map(|v| {
                    v.as_i64().and_then(|v| i32::try_from(v).ok()).ok_or_else(|| bad("int32 data must be integers"))
                })
                .collect::<Result<_>>()?,
        ),
        DType::Bool => Value::bool(
            shape,
            data.iter()
                .map(|v| v.as_bool().ok_or_else(|| bad("bool data must be true/false")))
                .collect::<Result<_>>()?,
        ),
        _ => Value::f32(
            dtype,
            shape,
            data.iter()
                .map(|v| match v {
                    Json::String(s) if s == "-inf" => Ok(f32::NEG_INFINITY),
                    Json::String(s) if s == "inf" => Ok(f32::INFINITY),
                    _ => v
                        .as_f64()
                        .map(|f| f as f32)
                        .ok_or_else(|| bad("float data must be numbers (or \"inf\", \"-inf\")")),
                })
                .collect::<Result<_>>()?,
        ),
    };
    value.check().map_err(|e| bad(&e.to_string()))?;
    Ok(value)
}

/// One call: input name → tensor.
pub fn inputs_from_json(call: &Json) -> Result<BTreeMap<String, Value>> {
    let map = call.as_object().ok_or_else(|| Error::invalid("a call must map input names to tensors"))?;
    map.iter().map(|(k, v)| Ok((k.clone(), tensor_from_json(k, v)?))).collect()
}

fn float_json(x: f32) -> Json {
    if x.is_finite() {
        json!(x)
    } else if x.is_nan() {
        json!("nan")
    } else if x > 0.0 {
        json!("inf")
    } else {
        json!("-inf")
    }
}

pub fn outputs_to_json(out: &BTreeMap<String, Value>) -> Json {
    let mut m = serde_json::Map::new();
    for (name, v) in out {
        let data: Vec<Json> = match &v.data {
            Data::F32(d) => d.iter().map(|&x| float_json(x)).collect(),
            Data::I32(d) => d.iter().map(|&x| json!(x)).collect(),
            Data::Bool(d) => d.iter().map(|&x| json!(x)).collect(),
            Data::Str(d) => d.iter().map(|x| json!(x)).collect(),
            Data::Packed(p) => p.dense().into_iter().map(float_json).collect(),
        };
        m.insert(name.clone(), json!({"shape": v.shape, "dtype": v.dtype.name(), "data": data}));
    }
    Json::Object(m)
}
