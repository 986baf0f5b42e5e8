//! Building ML Programs: typed variables, ops checked and typed as they are added, constants
//! streamed to the weight files, and the model description derived from the functions.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::mil::names::NameAllocator;
use crate::mil::ops::{self, ArgInfo, Args};
use crate::mil::program::{Binding, Block, Function, NamedType, Operation, Program, Value};
use crate::mil::types::{Dim, TensorType, ValueType};
use crate::model::{
    ArrayFeature, Feature, FeatureKind, Flexibility, FunctionDescription, Metadata, Model, ModelDescription, MAIN,
};
use crate::target::Target;
use crate::tensor::Tensor;
use crate::weights::{BlobRef, WeightStore};

/// Constants with at least this many elements go to the weight file (coremltools' policy).
pub const BLOB_MIN_ELEMENTS: usize = 10;
/// Constants up to this size keep their value for type inference (shapes, axes, perms).
const KEEP_VALUE_MAX_ELEMENTS: usize = 1024;

/// A variable of the function being built.
#[derive(Clone, Debug, PartialEq)]
pub struct Var {
    name: String,
    ty: ValueType,
}

impl Var {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensor type (for a state, the wrapped tensor).
    pub fn ty(&self) -> &TensorType {
        self.ty.tensor()
    }

    pub fn dtype(&self) -> DType {
        self.ty.tensor().dtype
    }

    pub fn value_type(&self) -> &ValueType {
        &self.ty
    }
}

/// The shapes an input accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputShape {
    Fixed(Vec<usize>),
    /// Each dimension within an inclusive range (`None` = unbounded); `default` must lie inside.
    Range {
        default: Vec<usize>,
        ranges: Vec<(usize, Option<usize>)>,
    },
    /// One of a list of shapes; the first is the default.
    Enumerated(Vec<Vec<usize>>),
}

impl InputShape {
    fn describe(&self, name: &str) -> Result<(Vec<Dim>, Vec<usize>, Flexibility)> {
        let bad = |m: String| Err(Error::invalid(format!("input `{name}`: {m}")));
        match self {
            InputShape::Fixed(s) => Ok((s.iter().map(|&d| Dim::Fixed(d)).collect(), s.clone(), Flexibility::Fixed)),
            InputShape::Range { default, ranges } => {
                if default.len() != ranges.len() {
                    return bad(format!("{} ranges for a rank-{} default shape", ranges.len(), default.len()));
                }
                for (&d, &(lo, hi)) in default.iter().zip(ranges) {
                    if d < lo || hi.is_some_and(|h| d > h || h < lo) || lo == 0 {
                        return bad(format!("default {default:?} outside the ranges {ranges:?} (bounds start at 1)"));
                    }
                }
                let dims =
                    ranges.iter().map(|&(lo, hi)| if Some(lo) == hi { Dim::Fixed(lo) } else { Dim::Unknown }).collect();
                Ok((dims, default.clone(), Flexibility::Range(ranges.clone())))
            }
            InputShape::Enumerated(shapes) => {
                let Some(first) = shapes.first() else { return bad("no enumerated shapes".into()) };
                if shapes.iter().any(|s| s.len() != first.len()) {
                    return bad("enumerated shapes differ in rank".into());
                }
                let dims = (0..first.len())
                    .map(|i| if shapes.iter().all(|s| s[i] == first[i]) { Dim::Fixed(first[i]) } else { Dim::Unknown })
                    .collect();
                Ok((dims, first.clone(), Flexibility::Enumerated(shapes.clone())))
            }
        }
    }
}

/// One argument of an op being added.
#[derive(Clone, Debug)]
pub enum Arg<'a> {
    Var(&'a Var),
    /// Several variables for a tuple parameter (`concat.values`).
    Tuple(Vec<&'a Var>),
    /// A constant, emitted as a `const` op (or inline for `constexpr_*` ops).
    Tensor(Tensor),
    /// A tensor already in a weight file (shared between functions).
    Blob(&'a BlobRef),
}

impl<'a> From<&'a Var> for Arg<'a> {
    fn from(v: &'a Var) -> Arg<'a> {
        Arg::Var(v)
    }
}

impl From<Tensor> for Arg<'_> {
    fn from(t: Tensor) -> Self {
        Arg::Tensor(t)
    }
}

impl<'a> From<&'a BlobRef> for Arg<'a> {
    fn from(b: &'a BlobRef) -> Arg<'a> {
        Arg::Blob(b)
    }
}

/// What the builder knows about a defined variable.
struct VarInfo {
    ty: ValueType,
    /// Set for outputs of `const`/`constexpr_*` ops; holds the value when it is small.
    constant: Option<Option<Tensor>>,
}

/// Builds one function. Ops are checked and typed as they are added, so an error names the op.
pub struct FunctionBuilder<'w> {
    name: String,
    target: Target,
    weights: &'w mut WeightStore,
    names: NameAllocator,
    inputs: Vec<NamedType>,
    input_features: Vec<Feature>,
    state_features: Vec<Feature>,
    operations: Vec<Operation>,
    vars: HashMap<String, VarInfo>,
    used: HashSet<String>,
    outputs: Vec<String>,
}

fn io_dtype_ok(dtype: DType, target: Target) -> bool {
    match dtype {
        DType::Fp32 | DType::Int32 => true,
        DType::Fp16 => target.supports_fp16_io(),
        DType::Int8 => target >= Target::Ios26,
        _ => false,
    }
}

impl<'w> FunctionBuilder<'w> {
    pub fn new(name: &str, target: Target, weights: &'w mut WeightStore) -> Result<FunctionBuilder<'w>> {
        if !crate::mil::names::is_valid(name) {
            return Err(Error::invalid(format!("`{name}` is not a valid function name")));
        }
        Ok(FunctionBuilder {
            name: name.to_string(),
            target,
            weights,
            names: NameAllocator::default(),
            inputs: vec![],
            input_features: vec![],
            state_features: vec![],
            operations: vec![],
            vars: HashMap::new(),
            used: HashSet::new(),
            outputs: vec![],
        })
    }

    pub fn target(&self) -> Target {
        self.target
    }

    fn claim(&mut self, name: &str) -> Result<()> {
        if self.names.claim(name) {
            Ok(())
        } else {
            Err(Error::invalid(format!("`{name}` is not a valid identifier or is already used in `{}`", self.name)))
        }
    }

    /// Declares a model input (fp32, int32, fp16 from iOS 16, int8 from iOS 26).
    pub fn input(&mut self, name: &str, dtype: DType, shape: InputShape) -> Result<Var> {
        if !io_dtype_ok(dtype, self.target) {
            return Err(Error::invalid(format!("input `{name}`: {dtype} inputs are not supported by {}", self.target)));
        }
        let (dims, default, flexibility) = shape.describe(name)?;
        self.claim(name)?;
        let ty = ValueType::Tensor(TensorType::new(dtype, dims));
        self.inputs.push(NamedType { name: name.into(), ty: ty.clone() });
        self.input_features.push(Feature {
            name: name.into(),
            kind: FeatureKind::Array(ArrayFeature { dtype: Some(dtype), shape: default, flexibility, optional: false }),
        });
        self.vars.insert(name.into(), VarInfo { ty: ty.clone(), constant: None });
        Ok(Var { name: name.into(), ty })
    }

    /// Declares a state (fp16, fixed shape; iOS 18 and later).
    pub fn state(&mut self, name: &str, shape: &[usize]) -> Result<Var> {
        if !self.target.supports_states() {
            return Err(Error::invalid(format!(
                "state `{name}`: states need ios18 or later, the target is {}",
                self.target
            )));
        }
        self.claim(name)?;
        let ty = ValueType::State(TensorType::fixed(DType::Fp16, shape));
        self.inputs.push(NamedType { name: name.into(), ty: ty.clone() });
        self.state_features.push(Feature {
            name: name.into(),
            kind: FeatureKind::State(ArrayFeature {
                dtype: Some(DType::Fp16),
                shape: shape.to_vec(),
                flexibility: Flexibility::Fixed,
                optional: false,
            }),
        });
        self.vars.insert(name.into(), VarInfo { ty: ty.clone(), constant: None });
        Ok(Var { name: name.into(), ty })
    }

    /// Whether a constant of this dtype and size goes to the weight file.
    fn goes_to_blob(&self, t: &Tensor) -> bool {
        let wide_ints = matches!(t.dtype(), DType::Int16 | DType::Uint16 | DType::Int32 | DType::Uint32);
        t.len() >= BLOB_MIN_ELEMENTS
            && t.dtype().blob_code().is_some()
            && t.dtype() != DType::Bf16
            && (!wide_ints || self.target >= Target::Ios18)
    }

    fn value_of(&mut self, t: Tensor) -> Result<Value> {
        if self.goes_to_blob(&t) {
            Ok(self.weights.store(&t)?.value)
        } else {
            Ok(Value::immediate(t))
        }
    }

    fn push_const(&mut self, name: String, val: Value, kept: Option<Tensor>) -> Var {
        let ty = ValueType::Tensor(val.ty.clone());
        self.operations.push(Operation {
            op_type: "const".into(),
            name: Some(name.clone()),
            inputs: BTreeMap::new(),
            outputs: vec![NamedType { name: name.clone(), ty: ty.clone() }],
            attributes: BTreeMap::from([("val".to_string(), val)]),
        });
        self.vars.insert(name.clone(), VarInfo { ty: ty.clone(), constant: Some(kept) });
        Var { name, ty }
    }

    /// A `const` op; large tensors are written to the weight file now.
    pub fn constant(&mut self, name: &str, tensor: Tensor) -> Result<Var> {
        let name = self.names.fresh(name);
        let kept = (tensor.len() <= KEEP_VALUE_MAX_ELEMENTS).then(|| tensor.clone());
        let val = self.value_of(tensor)?;
        Ok(self.push_const(name, val, kept))
    }

    /// A `const` op reading a tensor already stored (the way functions share weights).
    pub fn weight(&mut self, name: &str, blob: &BlobRef) -> Var {
        let name = self.names.fresh(name);
        self.push_const(name, blob.value.clone(), None)
    }

    fn var_info(&self, v: &Var) -> Result<&VarInfo> {
        match self.vars.get(&v.name) {
            Some(info) if info.ty == v.ty => Ok(info),
            _ => Err(Error::invalid(format!("variable `{}` does not belong to function `{}`", v.name, self.name))),
        }
    }

    /// Adds an op with a single output.
    pub fn op1(&mut self, op_type: &str, name: &str, inputs: Vec<(&str, Arg)>) -> Result<Var> {
        let mut outs = self.op(op_type, name, inputs)?;
        if outs.len() != 1 {
            return Err(Error::invalid(format!("`{op_type}` has {} outputs, not one", outs.len())));
        }
        Ok(outs.remove(0))
    }

    /// Adds an op. Optional parameters with a non-`None` default are written out explicitly.
    /// Outputs are named after the op (`name`, or `name_0`, `name_1`, ... for several).
    pub fn op(&mut self, op_type: &str, name: &str, inputs: Vec<(&str, Arg)>) -> Result<Vec<Var>> {
        let def = ops::lookup(op_type, self.target)?;
        let op_name = self.names.fresh(if name.is_empty() { op_type } else { name });
        let context = |e: Error| e.context(format!("{op_type} `{op_name}`"));
        let constexpr = op_type.starts_with("constexpr_");
        let mut args = Args::default();
        let mut bindings: BTreeMap<String, Vec<Binding>> = BTreeMap::new();

        let mut pending: Vec<(&'static str, Arg)> = Vec::new();
        for (param_name, arg) in inputs {
            let param = def
                .param(param_name)
                .ok_or_else(|| context(Error::invalid(format!("no input named `{param_name}`"))))?;
            if bindings.contains_key(param.name) || pending.iter().any(|(n, _)| *n == param.name) {
                return Err(context(Error::invalid(format!("`{param_name}` given twice"))));
            }
            pending.push((param.name, arg));
        }
        // Explicit arguments first, so computed defaults can look at them.
        let mut bind = |this: &mut Self, args: &mut Args, pname: &'static str, arg: Arg| -> Result<()> {
            let param = def.param(pname).expect("checked above");
            let (infos, binds) = this.bind_arg(&op_name, param, arg, constexpr)?;
            args.args.insert(pname.to_string(), infos);
            bindings.insert(pname.to_string(), binds);
            Ok(())
        };
        for (pname, arg) in pending {
            bind(self, &mut args, pname, arg).map_err(context)?;
        }
        for param in &def.params {
            if args.args.contains_key(param.name) {
                continue;
            }
            if param.required {
                return Err(context(Error::invalid(format!("required input `{}` is missing", param.name))));
            }
            if let Some(value) = ops::default_value(def, param, &args).map_err(context)? {
                bind(self, &mut args, param.name, Arg::Tensor(value)).map_err(context)?;
            }
        }
        ops::check_domains(def, &args).map_err(context)?;
        let out_types = (def.infer)(&args).map_err(context)?;

        let outputs: Vec<NamedType> = match out_types.len() {
            1 => vec![NamedType { name: op_name.clone(), ty: ValueType::Tensor(out_types[0].clone()) }],
            _ => out_types
                .iter()
                .enumerate()
                .map(|(i, t)| NamedType {
                    name: self.names.fresh(&format!("{op_name}_{i}")),
                    ty: ValueType::Tensor(t.clone()),
                })
                .collect(),
        };
        let mut attributes = BTreeMap::new();
        if def.params_as_attributes {
            for (pname, binds) in std::mem::take(&mut bindings) {
                match binds.into_iter().next() {
                    Some(Binding::Value(v)) => {
                        attributes.insert(pname, v);
                    }
                    _ => return Err(context(Error::invalid(format!("`{pname}` must be a constant value")))),
                }
            }
        }
        for o in &outputs {
            self.vars.insert(o.name.clone(), VarInfo { ty: o.ty.clone(), constant: constexpr.then_some(None) });
        }
        let vars = outputs.iter().map(|o| Var { name: o.name.clone(), ty: o.ty.clone() }).collect();
        self.operations.push(Operation {
            op_type: op_type.into(),
            name: Some(op_name),
            inputs: bindings,
            outputs,
            attributes,
        });
        Ok(vars)
    }

    fn bind_arg(
        &mut self,
        op_name: &str,
        param: &ops::Param,
        arg: Arg,
        constexpr: bool,
    ) -> Result<(Vec<ArgInfo>, Vec<Binding>)> {
        let vars: Vec<&Var> = match arg {
            Arg::Var(v) => vec![v],
            Arg::Tuple(vs) if param.tuple => vs,
            Arg::Tuple(_) => return Err(Error::invalid(format!("`{}` takes one value, not a tuple", param.name))),
            Arg::Tensor(t) => {
                let info = ArgInfo { ty: TensorType::fixed(t.dtype(), t.shape()), value: None };
                let kept = (t.len() <= KEEP_VALUE_MAX_ELEMENTS).then(|| t.clone());
                let info = ArgInfo { value: kept.clone(), ..info };
                if constexpr {
                    let v = self.value_of(t)?;
                    return Ok((vec![info], vec![Binding::Value(v)]));
                }
                let name = self.names.fresh(&format!("{op_name}_{}", param.name));
                let val = self.value_of(t)?;
                let var = self.push_const(name, val, kept);
                self.used.insert(var.name.clone());
                return Ok((vec![info], vec![Binding::Name(var.name)]));
            }
            Arg::Blob(b) => {
                let info = ArgInfo { ty: b.ty().clone(), value: None };
                if constexpr {
                    return Ok((vec![info], vec![Binding::Value(b.value.clone())]));
                }
                let name = self.names.fresh(&format!("{op_name}_{}", param.name));
                let var = self.push_const(name, b.value.clone(), None);
                self.used.insert(var.name.clone());
                return Ok((vec![info], vec![Binding::Name(var.name)]));
            }
        };
        let mut infos = Vec::new();
        let mut binds = Vec::new();
        for v in vars {
            let info = self.var_info(v)?;
            match (&info.ty, param.state) {
                (ValueType::State(_), false) => {
                    return Err(Error::invalid(format!(
                        "state `{}` can only be read by read_state or written by write_state",
                        v.name
                    )))
                }
                (ValueType::Tensor(_), true) => {
                    return Err(Error::invalid(format!("`{}` is not a state", v.name)));
                }
                _ => {}
            }
            if param.constant && info.constant.is_none() {
                return Err(Error::invalid(format!(
                    "`{}` must be a constant, but `{}` is computed at run time",
                    param.name, v.name
                )));
            }
            infos.push(ArgInfo { ty: info.ty.tensor().clone(), value: info.constant.clone().flatten() });
            binds.push(Binding::Name(v.name.clone()));
            self.used.insert(v.name.clone());
        }
        Ok((infos, binds))
    }

    /// Makes `var` an output of the function under `name` (an `identity` op is added when the
    /// variable has another name, is an input, or is already an output).
    pub fn output(&mut self, var: &Var, name: &str) -> Result<()> {
        self.var_info(var)?;
        if var.ty.is_state() {
            return Err(Error::invalid(format!("state `{}` cannot be an output", var.name)));
        }
        if !io_dtype_ok(var.dtype(), self.target) {
            return Err(Error::invalid(format!(
                "output `{name}`: {} outputs are not supported by {}",
                var.dtype(),
                self.target
            )));
        }
        let is_input = self.inputs.iter().any(|i| i.name == var.name);
        let var = if var.name != name || is_input || self.outputs.contains(&var.name) {
            self.claim(name)?;
            self.used.insert(var.name.clone());
            let out = NamedType { name: name.into(), ty: var.ty.clone() };
            self.operations.push(Operation {
                op_type: "identity".into(),
                name: Some(name.into()),
                inputs: BTreeMap::from([("x".to_string(), vec![Binding::Name(var.name.clone())])]),
                outputs: vec![out],
                attributes: BTreeMap::new(),
            });
            Var { name: name.into(), ty: var.ty.clone() }
        } else {
            var.clone()
        };
        self.outputs.push(var.name);
        Ok(())
    }

    /// Completes the function: unused inputs get an `identity` op (as coremltools does), and
    /// the description is derived from inputs, states and outputs.
    pub fn finish(mut self) -> Result<(Function, FunctionDescription)> {
        if self.outputs.is_empty() {
            return Err(Error::invalid(format!("function `{}` has no outputs", self.name)));
        }
        let unused: Vec<NamedType> =
            self.inputs.iter().filter(|i| !i.ty.is_state() && !self.used.contains(&i.name)).cloned().collect();
        for input in unused {
            let name = self.names.fresh(&format!("{}_tmp", input.name));
            self.operations.push(Operation {
                op_type: "identity".into(),
                name: Some(name.clone()),
                inputs: BTreeMap::from([("x".to_string(), vec![Binding::Name(input.name.clone())])]),
                outputs: vec![NamedType { name, ty: input.ty.clone() }],
                attributes: BTreeMap::new(),
            });
        }
        let types: HashMap<&str, &ValueType> =
            self.operations.iter().flat_map(|o| o.outputs.iter()).map(|o| (o.name.as_str(), &o.ty)).collect();
        let outputs = self
            .outputs
            .iter()
            .map(|name| {
                let t = types.get(name.as_str()).expect("outputs are op outputs").tensor();
                Feature {
                    name: name.clone(),
                    kind: FeatureKind::Array(ArrayFeature {
                        dtype: Some(t.dtype),
                        shape: t.shape().unwrap_or_default(),
                        flexibility: Flexibility::Fixed,
                        optional: false,
                    }),
                }
            })
            .collect();
        let description = FunctionDescription {
            name: self.name.clone(),
            inputs: self.input_features,
            outputs,
            states: self.state_features,
        };
        let function = Function {
            inputs: self.inputs,
            opset: self.target.opset().to_string(),
            block: Block { outputs: self.outputs, operations: self.operations },
        };
        Ok((function, description))
    }
}

/// Collects functions and metadata into a `Model`.
pub struct ProgramBuilder {
    target: Target,
    functions: Vec<(String, Function, FunctionDescription)>,
    default_function: Option<String>,
    pub metadata: Metadata,
    pub build_info: BTreeMap<String, String>,
}

impl ProgramBuilder {
    pub fn new(target: Target) -> ProgramBuilder {
        let build_info = BTreeMap::from([("corelm-version".to_string(), env!("CARGO_PKG_VERSION").to_string())]);
        ProgramBuilder { target, functions: vec![], default_function: None, metadata: Metadata::default(), build_info }
    }

    pub fn target(&self) -> Target {
        self.target
    }

    pub fn add_function(&mut self, built: (Function, FunctionDescription)) -> Result<()> {
        let (function, description) = built;
        if self.functions.iter().any(|(n, _, _)| *n == description.name) {
            return Err(Error::invalid(format!("function `{}` is defined twice", description.name)));
        }
        self.functions.push((description.name.clone(), function, description));
        Ok(())
    }

    /// The function Core ML runs when none is named (multifunction models).
    pub fn set_default_function(&mut self, name: &str) {
        self.default_function = Some(name.to_string());
    }

    /// A single function named `main` gives a plain model; anything else a multifunction model.
    pub fn finish(self) -> Result<Model> {
        if self.functions.is_empty() {
            return Err(Error::invalid("the program has no functions"));
        }
        let multifunction = self.functions.len() > 1 || self.functions[0].0 != MAIN;
        let default_function = if multifunction {
            if !self.target.supports_states() {
                return Err(Error::invalid(format!(
                    "multifunction models need ios18 or later, the target is {}",
                    self.target
                )));
            }
            let default = self.default_function.unwrap_or_else(|| self.functions[0].0.clone());
            if !self.functions.iter().any(|(n, _, _)| *n == default) {
                return Err(Error::invalid(format!("default function `{default}` is not defined")));
            }
            Some(default)
        } else {
            None
        };
        let mut program = Program { functions: BTreeMap::new(), build_info: self.build_info };
        let mut descriptions = Vec::new();
        for (name, function, description) in self.functions {
            program.functions.insert(name, function);
            descriptions.push(description);
        }
        Ok(Model {
            spec_version: self.target.spec_version(),
            description: ModelDescription { functions: descriptions, default_function, metadata: self.metadata },
            program,
        })
    }
}
