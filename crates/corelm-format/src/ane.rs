//! Static checks for patterns known to make Core ML run an op, or the whole model, somewhere other
//! than the Neural Engine. Every rule is documented with its sources in `docs/ane-rules.md`; a
//! test keeps the rule ids here and there the same.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use serde::Serialize;

use crate::dtype::DType;
use crate::mil::program::{Binding, Function, Operation, ValueData};
use crate::mil::types::{TensorType, ValueType};
use crate::mil::validate::blob_values;
use crate::model::{Flexibility, FunctionDescription, Model};
use crate::package::{Package, MAX_WEIGHT_FILE_BYTES};

pub const FLEXIBLE_SHAPE: &str = "ane-flexible-shape";
pub const DIM_OVER_65536: &str = "ane-dim-over-65536";
pub const RANK_OVER_5: &str = "ane-rank-over-5";
pub const INT64: &str = "ane-int64";
pub const FP32_COMPUTE: &str = "ane-fp32-compute";
pub const STATE_WIDTH_UNALIGNED: &str = "ane-state-width-unaligned";
pub const WEIGHT_FILE_OVER_2GIB: &str = "ane-weight-file-over-2gib";

/// Every rule id, in the order reports list them.
pub const RULES: [&str; 7] =
    [FLEXIBLE_SHAPE, DIM_OVER_65536, RANK_OVER_5, INT64, FP32_COMPUTE, STATE_WIDTH_UNALIGNED, WEIGHT_FILE_OVER_2GIB];

/// The largest extent of any Neural Engine tensor axis (N and C; D, H and W stop at 16384).
const MAX_DIM: usize = 65536;
/// The Neural Engine lays tensors out on five axes (N, D, C, H, W).
const MAX_RANK: usize = 5;
/// fp16 elements in the 64 bytes the Neural Engine aligns each row of a tensor to.
const STATE_WIDTH_MULTIPLE: usize = 32;

/// What a finding is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Subject {
    Op {
        name: String,
        op_type: String,
    },
    Input {
        name: String,
    },
    State {
        name: String,
    },
    /// As the program names it (`@model_path/weights/weight.bin`).
    WeightFile {
        path: String,
    },
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Op { name, op_type } => write!(f, "{name} ({op_type})"),
            Subject::Input { name } => write!(f, "input {name}"),
            Subject::State { name } => write!(f, "state {name}"),
            Subject::WeightFile { path } => f.write_str(path),
        }
    }
}

/// One rule hit in one function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// One of [`RULES`].
    pub rule: &'static str,
    pub subject: Subject,
    pub detail: String,
}

/// The findings of every rule for each function of a package, the weight-file rule included.
pub fn findings(package: &Package) -> BTreeMap<String, Vec<Finding>> {
    let mut all = model_findings(package.model());
    for (name, function) in &package.model().program.functions {
        let files: BTreeSet<&str> = blob_values(function)
            .filter_map(|(_, value)| match &value.data {
                ValueData::Blob { file, .. } => Some(file.as_str()),
                ValueData::Immediate(_) => None,
            })
            .collect();
        for file in files {
            // A file that cannot be found is the validator's to report.
            let Some(bytes) = package.blob_path(file).ok().and_then(|p| std::fs::metadata(p).ok()).map(|m| m.len())
            else {
                continue;
            };
            if bytes > MAX_WEIGHT_FILE_BYTES {
                all.entry(name.clone()).or_default().push(Finding {
                    rule: WEIGHT_FILE_OVER_2GIB,
                    subject: Subject::WeightFile { path: file.into() },
                    detail: format!("{bytes} bytes, over the maximum of {MAX_WEIGHT_FILE_BYTES}"),
                });
            }
        }
    }
    all
}

/// The findings of the rules that read only the program and its description, per function.
pub fn model_findings(model: &Model) -> BTreeMap<String, Vec<Finding>> {
    model
        .program
        .functions
        .iter()
        .map(|(name, f)| (name.clone(), function_findings(f, model.description.function(name))))
        .collect()
}

fn is_64_bit_int(dtype: DType) -> bool {
    matches!(dtype, DType::Int64 | DType::Uint64)
}

fn function_findings(f: &Function, described: Option<&FunctionDescription>) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(d) = described {
        range_inputs(d, &mut out);
    }
    for input in &f.inputs {
        match &input.ty {
            ValueType::State(t) => {
                let width = t.dims.last().and_then(|d| d.fixed());
                if let Some(w) = width.filter(|w| !w.is_multiple_of(STATE_WIDTH_MULTIPLE)) {
                    out.push(Finding {
                        rule: STATE_WIDTH_UNALIGNED,
                        subject: Subject::State { name: input.name.clone() },
                        detail: format!("last dimension {w} is not a multiple of {STATE_WIDTH_MULTIPLE}"),
                    });
                }
            }
            ValueType::Tensor(t) if is_64_bit_int(t.dtype) => out.push(Finding {
                rule: INT64,
                subject: Subject::Input { name: input.name.clone() },
                detail: format!("{} input", t.dtype),
            }),
            ValueType::Tensor(_) => {}
        }
    }
    let types = f.var_types();
    let constants: HashSet<&str> = f
        .block
        .operations
        .iter()
        .filter(|op| op.is_constant())
        .flat_map(|op| op.outputs.iter().map(|o| o.name.as_str()))
        .collect();
    let edge = edge_values(f);
    for op in &f.block.operations {
        op_findings(op, &types, &constants, &edge, &mut out);
    }
    out
}

/// Inputs with range flexibility (enumerated shapes are not a fallback).
fn range_inputs(d: &FunctionDescription, out: &mut Vec<Finding>) {
    for input in &d.inputs {
        let Some(Flexibility::Range(ranges)) = input.array().map(|a| &a.flexibility) else { continue };
        let flexible: Vec<String> = ranges
            .iter()
            .enumerate()
            .filter(|(_, (lo, hi))| Some(*lo) != *hi)
            .map(|(i, (lo, hi))| format!("dim {i}: {lo}..{}", hi.map_or("∞".into(), |h| h.to_string())))
            .collect();
        if !flexible.is_empty() {
            out.push(Finding {
                rule: FLEXIBLE_SHAPE,
                subject: Subject::Input { name: input.name.clone() },
                detail: format!("range shape ({})", flexible.join(", ")),
            });
        }
    }
}

/// Values at the function's edge: its inputs and outputs, and identity copies of them. fp16
/// programs take and give fp32 features by casting these.
fn edge_values(f: &Function) -> HashSet<&str> {
    let mut edge: HashSet<&str> =
        f.inputs.iter().map(|i| i.name.as_str()).chain(f.block.outputs.iter().map(String::as_str)).collect();
    let copies: Vec<(&str, &str)> = f
        .block
        .operations
        .iter()
        .filter(|op| op.op_type == "identity")
        .filter_map(|op| match (op.input("x"), op.outputs.first()) {
            (Some(Binding::Name(x)), Some(out)) => Some((x.as_str(), out.name.as_str())),
            _ => None,
        })
        .collect();
    for &(x, copy) in &copies {
        if edge.contains(x) {
            edge.insert(copy);
        }
    }
    for &(x, copy) in copies.iter().rev() {
        if edge.contains(copy) {
            edge.insert(x);
        }
    }
    edge
}

fn op_findings(
    op: &Operation,
    types: &BTreeMap<&str, &ValueType>,
    constants: &HashSet<&str>,
    edge: &HashSet<&str>,
    out: &mut Vec<Finding>,
) {
    let mut push = |rule: &'static str, detail: String| {
        out.push(Finding {
            rule,
            subject: Subject::Op { name: op.label().into(), op_type: op.op_type.clone() },
            detail,
        })
    };
    let inline = op.inputs.values().flatten().filter_map(|b| match b {
        Binding::Value(v) => Some(&v.ty),
        Binding::Name(_) => None,
    });
    let mut held = op.outputs.iter().map(|o| o.ty.tensor()).chain(inline).chain(op.attributes.values().map(|v| &v.ty));
    if let Some(t) = held.find(|t| is_64_bit_int(t.dtype)) {
        push(INT64, format!("holds {t}"));
    }
    // Constants are folded or decompressed at load; the rules below are about what runs.
    if op.is_constant() {
        return;
    }
    let read = op.inputs.values().flatten().filter_map(|b| match b {
        Binding::Name(n) => types.get(n.as_str()).map(|t| t.tensor()),
        Binding::Value(v) => Some(&v.ty),
    });
    let touched: Vec<&TensorType> = read.chain(op.outputs.iter().map(|o| o.ty.tensor())).collect();
    if let Some(t) = touched.iter().find(|t| t.dims.iter().any(|d| d.fixed().is_some_and(|n| n > MAX_DIM))) {
        push(DIM_OVER_65536, format!("{t} has a dimension over {MAX_DIM}"));
    }
    if let Some(t) = touched.iter().find(|t| t.rank() > MAX_RANK) {
        push(RANK_OVER_5, format!("{t} has rank {}", t.rank()));
    }
    let run_time_reads = op.inputs.values().flatten().filter_map(|b| match b {
        Binding::Name(n) if !constants.contains(n.as_str()) => Some(n.as_str()),
        _ => None,
    });
    let fp32: Vec<&str> = run_time_reads
        .chain(op.outputs.iter().map(|o| o.name.as_str()))
        .filter(|n| types.get(n).is_some_and(|t| t.tensor().dtype == DType::Fp32))
        .collect();
    let crosses_edge = matches!(op.op_type.as_str(), "cast" | "identity") && fp32.iter().all(|n| edge.contains(n));
    if let Some(first) = fp32.first().filter(|_| !crosses_edge) {
        push(FP32_COMPUTE, format!("`{first}` is fp32"));
    }
}
