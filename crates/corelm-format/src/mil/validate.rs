//! Our own checks of a model, beyond what coremltools' loader checks: identifiers, SSA order,
//! op availability per opset, argument types re-inferred against declared outputs, int32-only
//! index math, fp16 states, and agreement of the description with the program.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::dtype::DType;
use crate::mil::names;
use crate::mil::ops::{self, ArgInfo, Args, OpDef};
use crate::mil::program::{Binding, Function, Operation, Value, ValueData};
use crate::mil::types::{Dim, TensorType, ValueType};
use crate::model::{ArrayFeature, Feature, FeatureKind, Flexibility, FunctionDescription, Model};
use crate::target::Target;
use crate::tensor::Tensor;

/// One problem found, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub location: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

struct Report {
    issues: Vec<Issue>,
}

impl Report {
    fn add(&mut self, location: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue { location: location.into(), message: message.into() });
    }
}

/// Checks a whole model; an empty list means no problem was found.
pub fn validate_model(model: &Model) -> Vec<Issue> {
    let mut r = Report { issues: vec![] };
    let Some(target) = model.target() else {
        r.add("model", format!("unknown specification version {}", model.spec_version));
        return r.issues;
    };
    if target < Target::Ios15 {
        r.add("model", "ML Programs need specification version 6 or later");
    }
    let desc = &model.description;
    if desc.is_multifunction() && !target.supports_states() {
        r.add("model", format!("multifunction models need specification version 9, this is {}", model.spec_version));
    }
    if let Some(default) = &desc.default_function {
        if !model.program.functions.contains_key(default) {
            r.add("model", format!("default function `{default}` is not in the program"));
        }
    }
    if model.program.functions.is_empty() {
        r.add("program", "no functions");
    }
    if !desc.is_multifunction() && model.program.functions.len() > 1 {
        r.add("model", "several functions but no default function: the description must list them");
    }
    for (name, function) in &model.program.functions {
        let location = format!("function `{name}`");
        if !names::is_valid(name) {
            r.add(&location, "invalid function name");
        }
        check_function(&mut r, &location, function, target, None);
        match desc.functions.iter().find(|f| f.name == *name) {
            Some(fd) => check_description(&mut r, &location, function, fd, target),
            None => r.add(&location, "not in the model description"),
        }
    }
    for fd in &desc.functions {
        if !model.program.functions.contains_key(&fd.name) {
            r.add(format!("description of `{}`", fd.name), "no such function in the program");
        }
    }
    r.issues
}

/// Walks every blob-file value of a program (const values and inline bindings).
pub fn blob_values(function: &Function) -> impl Iterator<Item = (&Operation, &Value)> {
    function.block.operations.iter().flat_map(|op| {
        let attrs = op.attributes.values();
        let inline = op.inputs.values().flatten().filter_map(|b| match b {
            Binding::Value(v) => Some(v),
            Binding::Name(_) => None,
        });
        attrs.chain(inline).filter(|v| matches!(v.data, ValueData::Blob { .. })).map(move |v| (op, v))
    })
}

fn check_type(r: &mut Report, location: &str, what: &str, t: &TensorType) {
    if matches!(t.dtype, DType::Int64 | DType::Uint64) {
        r.add(location, format!("{what} is {}: Core ML has no 64-bit integers at run time, use int32", t.dtype));
    }
}

fn const_kept(v: &Value) -> Option<Tensor> {
    v.as_immediate().filter(|t| t.len() <= 1024).cloned()
}

struct VarState {
    ty: ValueType,
    /// Some for constants; holds small immediate values.
    constant: Option<Option<Tensor>>,
}

/// The types of `f`'s outputs when its inputs take the given types (the others as declared),
/// inferred op by op rather than read from the ops' declared outputs: what a flexible output's
/// shape is at given input shapes. A dim inference cannot tell stays unknown.
pub fn output_types_at(f: &Function, target: Target, inputs: &BTreeMap<String, TensorType>) -> Vec<TensorType> {
    let mut r = Report { issues: vec![] };
    let vars = check_function(&mut r, "", f, target, Some(inputs));
    f.block
        .outputs
        .iter()
        .map(|o| vars.get(o.as_str()).map_or_else(|| TensorType::new(DType::Fp32, vec![]), |v| v.ty.tensor().clone()))
        .collect()
}

/// Checks `f`; with `instantiate`, those inputs take the given types and every op's outputs the
/// types inference gives them. Returns the variables' final states.
fn check_function<'a>(
    r: &mut Report,
    location: &str,
    f: &'a Function,
    model_target: Target,
    instantiate: Option<&BTreeMap<String, TensorType>>,
) -> HashMap<&'a str, VarState> {
    let target = match Target::from_opset(&f.opset) {
        Some(t) => {
            if t != model_target {
                r.add(
                    location,
                    format!("opset `{}` does not match the specification version ({})", f.opset, model_target.opset()),
                );
            }
            t
        }
        None => {
            r.add(location, format!("unknown opset `{}`", f.opset));
            model_target
        }
    };
    let mut vars: HashMap<&str, VarState> = HashMap::new();
    for input in &f.inputs {
        if !names::is_valid(&input.name) {
            r.add(location, format!("input `{}` is not a valid identifier", input.name));
        }
        let ty = match instantiate.and_then(|i| i.get(&input.name)) {
            Some(t) if !input.ty.is_state() => ValueType::Tensor(t.clone()),
            _ => input.ty.clone(),
        };
        if vars.insert(&input.name, VarState { ty, constant: None }).is_some() {
            r.add(location, format!("input `{}` is declared twice", input.name));
        }
        check_type(r, location, &format!("input `{}`", input.name), input.ty.tensor());
        if let ValueType::State(t) = &input.ty {
            if t.dtype != DType::Fp16 {
                r.add(location, format!("state `{}` is {}; states must be fp16", input.name, t.dtype));
            }
            if t.shape().is_none() {
                r.add(location, format!("state `{}` must have a fixed shape", input.name));
            }
        }
    }
    for op in &f.block.operations {
        let op_location = format!("{location}, op `{}` ({})", op.label(), op.op_type);
        check_operation(r, &op_location, op, target, &mut vars, instantiate.is_some());
    }
    for out in &f.block.outputs {
        match vars.get(out.as_str()) {
            None => r.add(location, format!("output `{out}` is not defined")),
            Some(v) if v.ty.is_state() => r.add(location, format!("output `{out}` is a state")),
            _ => {}
        }
    }
    vars
}

fn declare<'a>(
    r: &mut Report,
    loc: &str,
    vars: &mut HashMap<&'a str, VarState>,
    constant: Option<Option<Tensor>>,
    op: &'a Operation,
) {
    for o in &op.outputs {
        if !names::is_valid(&o.name) {
            r.add(loc, format!("output `{}` is not a valid identifier", o.name));
        }
        check_type(r, loc, &format!("output `{}`", o.name), o.ty.tensor());
        if o.ty.is_state() {
            r.add(loc, format!("output `{}` is typed as a state", o.name));
        }
        let state = VarState { ty: o.ty.clone(), constant: constant.clone() };
        if vars.insert(o.name.as_str(), state).is_some() {
            r.add(loc, format!("`{}` is defined twice", o.name));
        }
    }
}

fn check_operation<'a>(
    r: &mut Report,
    loc: &str,
    op: &'a Operation,
    target: Target,
    vars: &mut HashMap<&'a str, VarState>,
    propagate_inferred: bool,
) {
    if let Some(name) = &op.name {
        if !names::is_valid(name) {
            r.add(loc, "op name is not a valid identifier");
        }
    }
    if op.op_type == "const" {
        check_const(r, loc, op, vars);
        return;
    }
    let def = match ops::lookup(&op.op_type, target) {
        Ok(d) => d,
        Err(e) => {
            r.add(loc, e.to_string());
            declare(r, loc, vars, None, op);
            return;
        }
    };
    let constexpr = op.is_constant();
    if !constexpr && !op.attributes.is_empty() {
        r.add(
            loc,
            format!(
                "attributes other than `name` are only allowed on constants: {:?}",
                op.attributes.keys().collect::<Vec<_>>()
            ),
        );
    }
    let args = op_args(r, loc, op, def, vars, constexpr);
    let inferred = args.as_ref().map(|a| infer_outputs(r, loc, op, def, a)).unwrap_or_default();
    declare(r, loc, vars, constexpr.then_some(None), op);
    if let (true, Some(args)) = (propagate_inferred, &args) {
        assign_inferred(vars, op, def, args, inferred);
    }
}

fn check_const<'a>(r: &mut Report, loc: &str, op: &'a Operation, vars: &mut HashMap<&'a str, VarState>) {
    if !op.inputs.is_empty() {
        r.add(loc, "const ops take no inputs");
    }
    match op.attributes.get("val") {
        Some(val) => {
            check_type(r, loc, "value", &val.ty);
            if op.outputs.len() != 1 || !val.ty.accepts(op.outputs[0].ty.tensor()) {
                r.add(loc, "the output type differs from the type of `val`");
            }
            declare(r, loc, vars, Some(const_kept(val)), op);
        }
        None => r.add(loc, "const op without a `val` attribute"),
    }
    if op.attributes.keys().any(|k| k != "val") {
        r.add(loc, "const ops carry only `name` and `val` attributes");
    }
}

/// The arguments of `op` as inference sees them, or `None` when one is unusable (reported).
fn op_args(
    r: &mut Report,
    loc: &str,
    op: &Operation,
    def: &OpDef,
    vars: &HashMap<&str, VarState>,
    constexpr: bool,
) -> Option<Args> {
    // Parameters arrive as input bindings, or as attributes for iOS 16/17 constexpr forms.
    let mut params: BTreeMap<&str, Vec<Binding>> = op.inputs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    if constexpr {
        for (k, v) in &op.attributes {
            params.insert(k.as_str(), vec![Binding::Value(v.clone())]);
        }
    }
    let mut args = Args::default();
    let mut ok = true;
    for (pname, binds) in &params {
        let Some(param) = def.param(pname) else {
            r.add(loc, format!("`{}` has no input named `{pname}`", op.op_type));
            ok = false;
            continue;
        };
        if binds.is_empty() || (binds.len() > 1 && !param.tuple) {
            r.add(loc, format!("`{pname}` has {} bindings", binds.len()));
            ok = false;
            continue;
        }
        let mut infos = Vec::new();
        for b in binds {
            match arg_info(r, loc, param, b, vars, constexpr) {
                Some(info) => infos.push(info),
                None => ok = false,
            }
        }
        args.args.insert(pname.to_string(), infos);
    }
    for param in &def.params {
        if param.required && !params.contains_key(param.name) {
            r.add(loc, format!("required input `{}` is missing", param.name));
            ok = false;
        }
    }
    ok.then_some(args)
}

/// What inference knows of one binding of `param`, or `None` when it cannot be typed (reported).
fn arg_info(
    r: &mut Report,
    loc: &str,
    param: &ops::Param,
    b: &Binding,
    vars: &HashMap<&str, VarState>,
    constexpr: bool,
) -> Option<ArgInfo> {
    let pname = param.name;
    match b {
        Binding::Name(n) => {
            let Some(v) = vars.get(n.as_str()) else {
                r.add(loc, format!("`{pname}` refers to `{n}`, which is not defined before this op"));
                return None;
            };
            let state_ok = v.ty.is_state() == param.state;
            if !state_ok {
                let msg = if param.state {
                    format!("`{pname}` must be a state, `{n}` is not")
                } else {
                    format!("state `{n}` can only be used by read_state and write_state")
                };
                r.add(loc, msg);
            }
            if param.constant && v.constant.is_none() {
                r.add(loc, format!("`{pname}` must be a constant, but `{n}` is computed at run time"));
            }
            state_ok.then(|| ArgInfo { ty: v.ty.tensor().clone(), value: v.constant.clone().flatten() })
        }
        Binding::Value(v) => {
            if !constexpr && matches!(v.data, ValueData::Blob { .. }) {
                r.add(loc, format!("`{pname}`: blob values may only feed constants"));
            }
            check_type(r, loc, &format!("`{pname}`"), &v.ty);
            Some(ArgInfo { ty: v.ty.clone(), value: const_kept(v) })
        }
    }
}

/// Checks the arguments' dtypes, and the declared outputs against the inferred ones, which it
/// returns (none when inference fails).
fn infer_outputs(r: &mut Report, loc: &str, op: &Operation, def: &OpDef, args: &Args) -> Vec<TensorType> {
    if let Err(e) = ops::check_domains(def, args) {
        r.add(loc, e.to_string());
    }
    match (def.infer)(args) {
        Ok(types) => {
            if types.len() != op.outputs.len() {
                r.add(loc, format!("declares {} outputs, the op has {}", op.outputs.len(), types.len()));
            }
            for (o, t) in op.outputs.iter().zip(&types) {
                if !o.ty.tensor().accepts(t) {
                    r.add(loc, format!("output `{}` is declared {} but the inputs give {t}", o.name, o.ty));
                }
            }
            types
        }
        Err(e) => {
            r.add(loc, e.to_string());
            vec![]
        }
    }
}

/// Gives `op`'s outputs their inferred types, and the value of shape arithmetic when it folds.
fn assign_inferred(
    vars: &mut HashMap<&str, VarState>,
    op: &Operation,
    def: &OpDef,
    args: &Args,
    inferred: Vec<TensorType>,
) {
    let folded = match (inferred.as_slice(), op.outputs.len()) {
        ([t], 1) => fold_shape_value(def, args, t),
        _ => None,
    };
    for (o, t) in op.outputs.iter().zip(inferred) {
        if let Some(v) = vars.get_mut(o.name.as_str()).filter(|v| !v.ty.is_state()) {
            v.ty = ValueType::Tensor(t);
            if folded.is_some() {
                v.constant = Some(folded.clone());
            }
        }
    }
}

/// The value of an op of shape arithmetic (see [`OpDef::fold`]) with a small integer output,
/// when its inputs are known. Other ops: `None`.
fn fold_shape_value(def: &OpDef, a: &Args, out: &TensorType) -> Option<Tensor> {
    let fold = def.fold?;
    let shape = out.shape()?;
    let integer = matches!(out.dtype, DType::Int32 | DType::Int16 | DType::Uint16 | DType::Int8 | DType::Uint8);
    if !integer || shape.len() > 1 {
        return None;
    }
    let values = fold(a)?;
    (values.len() == shape.iter().product::<usize>())
        .then(|| Tensor::from_ints(out.dtype, shape.clone(), &values).ok())?
}

fn dims_match(mil: &[Dim], feature: &ArrayFeature) -> Result<(), String> {
    let rank = mil.len();
    let flexible: Vec<bool> = match &feature.flexibility {
        Flexibility::Fixed => vec![false; rank],
        Flexibility::Range(ranges) => {
            if ranges.len() != rank {
                return Err(format!("{} ranges for rank {rank}", ranges.len()));
            }
            ranges.iter().map(|&(lo, hi)| hi != Some(lo)).collect()
        }
        Flexibility::Enumerated(shapes) => {
            if shapes.iter().any(|s| s.len() != rank) {
                return Err(format!("an enumerated shape is not of rank {rank}"));
            }
            if !shapes.contains(&feature.shape) {
                return Err(format!("default shape {:?} is not among the enumerated shapes", feature.shape));
            }
            (0..rank).map(|i| shapes.iter().any(|s| s[i] != shapes[0][i])).collect()
        }
    };
    if feature.shape.len() != rank {
        return Err(format!(
            "description shape {:?} has rank {}, the program {rank}",
            feature.shape,
            feature.shape.len()
        ));
    }
    for (i, (d, flex)) in mil.iter().zip(flexible).enumerate() {
        match (d, flex) {
            (Dim::Fixed(n), false) if *n != feature.shape[i] => {
                return Err(format!("dim {i} is {n} in the program but {} in the description", feature.shape[i]))
            }
            (Dim::Fixed(_), true) => {
                return Err(format!("dim {i} is flexible in the description but fixed in the program"))
            }
            (Dim::Unknown, false) => {
                return Err(format!("dim {i} is flexible in the program but fixed in the description"))
            }
            _ => {}
        }
    }
    if let Flexibility::Range(ranges) = &feature.flexibility {
        for (i, (&(lo, hi), &d)) in ranges.iter().zip(&feature.shape).enumerate() {
            if d < lo || hi.is_some_and(|h| d > h) {
                return Err(format!("default {d} of dim {i} lies outside [{lo}, {hi:?}]"));
            }
        }
    }
    Ok(())
}

fn feature_array<'a>(r: &mut Report, loc: &str, f: &'a Feature, state: bool) -> Option<&'a ArrayFeature> {
    match (&f.kind, state) {
        (FeatureKind::Array(a), false) | (FeatureKind::State(a), true) => Some(a),
        _ => {
            r.add(loc, format!("`{}` must be a {} feature", f.name, if state { "state" } else { "multi-array" }));
            None
        }
    }
}

fn check_description(r: &mut Report, loc: &str, f: &Function, d: &FunctionDescription, target: Target) {
    let loc = format!("{loc} (description)");
    let io_ok = |dt: DType| match dt {
        DType::Fp32 | DType::Int32 => true,
        DType::Fp16 => target.supports_fp16_io(),
        DType::Int8 => target >= Target::Ios26,
        _ => false,
    };
    let (states, inputs): (Vec<_>, Vec<_>) = f.inputs.iter().partition(|i| i.ty.is_state());
    if inputs.len() != d.inputs.len() {
        r.add(&loc, format!("{} inputs in the program, {} in the description", inputs.len(), d.inputs.len()));
    }
    for (p, feature) in inputs.iter().zip(&d.inputs) {
        if p.name != feature.name {
            r.add(&loc, format!("input `{}` of the program is `{}` in the description", p.name, feature.name));
            continue;
        }
        if let Some(a) = feature_array(r, &loc, feature, false) {
            let t = p.ty.tensor();
            if a.dtype != Some(t.dtype) {
                r.add(
                    &loc,
                    format!("input `{}` is {} in the program, {:?} in the description", p.name, t.dtype, a.dtype),
                );
            }
            if !io_ok(t.dtype) {
                r.add(&loc, format!("input `{}`: {} model inputs are not supported by {target}", p.name, t.dtype));
            }
            if let Err(e) = dims_match(&t.dims, a) {
                r.add(&loc, format!("input `{}`: {e}", p.name));
            }
        }
    }
    if states.len() != d.states.len() {
        r.add(&loc, format!("{} states in the program, {} in the description", states.len(), d.states.len()));
    }
    for (p, feature) in states.iter().zip(&d.states) {
        if p.name != feature.name {
            r.add(&loc, format!("state `{}` of the program is `{}` in the description", p.name, feature.name));
            continue;
        }
        if let Some(a) = feature_array(r, &loc, feature, true) {
            let t = p.ty.tensor();
            if a.dtype != Some(DType::Fp16) {
                r.add(&loc, format!("state `{}` must be fp16 in the description", p.name));
            }
            if t.shape().as_deref() != Some(&a.shape[..]) || a.flexibility != Flexibility::Fixed {
                r.add(&loc, format!("state `{}` is {t} in the program, {:?} in the description", p.name, a.shape));
            }
        }
    }
    let types = f.var_types();
    if f.block.outputs.len() != d.outputs.len() {
        r.add(
            &loc,
            format!("{} outputs in the program, {} in the description", f.block.outputs.len(), d.outputs.len()),
        );
    }
    for (name, feature) in f.block.outputs.iter().zip(&d.outputs) {
        if *name != feature.name {
            r.add(&loc, format!("output `{name}` of the program is `{}` in the description", feature.name));
            continue;
        }
        let (Some(a), Some(ty)) = (feature_array(r, &loc, feature, false), types.get(name.as_str())) else { continue };
        let t = ty.tensor();
        if a.dtype != Some(t.dtype) {
            r.add(&loc, format!("output `{name}` is {} in the program, {:?} in the description", t.dtype, a.dtype));
        }
        if !io_ok(t.dtype) {
            r.add(&loc, format!("output `{name}`: {} model outputs are not supported by {target}", t.dtype));
        }
        if let (Some(shape), false) = (t.shape(), a.shape.is_empty()) {
            if shape != a.shape {
                r.add(&loc, format!("output `{name}` is {t} in the program, {:?} in the description", a.shape));
            }
        }
    }
}
