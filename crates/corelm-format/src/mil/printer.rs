//! MIL text, in the style of coremltools' program printout and compiled `model.mil` files.

use std::fmt::Write;

use crate::dtype::DType;
use crate::mil::program::{Binding, Function, Operation, Program, Value, ValueData};
use crate::mil::types::ValueType;
use crate::tensor::Tensor;

/// Immediate tensors longer than this are abbreviated.
const MAX_PRINTED_ELEMENTS: usize = 16;

fn scalar_text(dtype: DType, t: &Tensor, i: usize) -> String {
    if let Some(s) = t.strings() {
        return format!("{:?}", s[i]);
    }
    match dtype {
        DType::Bool => (t.to_i64().expect("bool")[i] != 0).to_string(),
        d if d.is_float() => format!("{:?}", t.to_f64().expect("float")[i]),
        _ => t.to_i64().expect("int")[i].to_string(),
    }
}

fn value_text(v: &Value) -> String {
    match &v.data {
        ValueData::Blob { file, offset } => {
            format!("{}(BLOBFILE(path = string({file:?}), offset = uint64({offset})))", v.ty)
        }
        ValueData::Immediate(t) if t.shape().is_empty() => format!("{}({})", t.dtype(), scalar_text(t.dtype(), t, 0)),
        ValueData::Immediate(t) => {
            let n = t.len().min(MAX_PRINTED_ELEMENTS);
            let mut items: Vec<String> = (0..n).map(|i| scalar_text(t.dtype(), t, i)).collect();
            if t.len() > n {
                items.push(format!("... {} more", t.len() - n));
            }
            format!("{}([{}])", v.ty, items.join(", "))
        }
    }
}

fn binding_text(b: &Binding) -> String {
    match b {
        Binding::Name(n) => n.clone(),
        Binding::Value(v) => value_text(v),
    }
}

fn type_text(t: &ValueType) -> String {
    t.to_string()
}

fn operation_text(op: &Operation) -> String {
    let outputs: Vec<String> = op.outputs.iter().map(|o| format!("{} {}", type_text(&o.ty), o.name)).collect();
    let lhs = match outputs.len() {
        0 => String::new(),
        1 => format!("{} = ", outputs[0]),
        _ => format!("({}) = ", outputs.join(", ")),
    };
    let args: Vec<String> = op
        .inputs
        .iter()
        .map(|(k, bs)| {
            let parts: Vec<String> = bs.iter().map(binding_text).collect();
            if bs.len() == 1 {
                format!("{k} = {}", parts[0])
            } else {
                format!("{k} = ({})", parts.join(", "))
            }
        })
        .collect();
    let mut attrs = Vec::new();
    if let Some(name) = &op.name {
        attrs.push(format!("name = string({name:?})"));
    }
    attrs.extend(op.attributes.iter().map(|(k, v)| format!("{k} = {}", value_text(v))));
    format!("{lhs}{}({})[{}];", op.op_type, args.join(", "), attrs.join(", "))
}

fn function_text(out: &mut String, name: &str, f: &Function) {
    let suffix = crate::target::Target::from_opset(&f.opset).map_or(f.opset.clone(), |t| t.mil_name().to_string());
    let inputs: Vec<String> = f.inputs.iter().map(|i| format!("{} {}", type_text(&i.ty), i.name)).collect();
    let _ = writeln!(out, "    func {name}<{suffix}>({}) {{", inputs.join(", "));
    for op in &f.block.operations {
        let _ = writeln!(out, "        {}", operation_text(op));
    }
    let _ = writeln!(out, "    }} -> ({});", f.block.outputs.join(", "));
}

/// The whole program as MIL text.
pub fn program_text(p: &Program) -> String {
    let mut out = String::from("program(1.0)\n");
    if !p.build_info.is_empty() {
        let pairs: Vec<String> = p.build_info.iter().map(|(k, v)| format!("{{{k:?}, {v:?}}}")).collect();
        let _ = writeln!(out, "[buildInfo = dict<string, string>({{{}}})]", pairs.join(", "));
    }
    out.push_str("{\n");
    for (name, f) in &p.functions {
        function_text(&mut out, name, f);
    }
    out.push_str("}\n");
    out
}
