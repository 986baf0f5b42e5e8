//! Packages written by coremltools' own MIL builder, one op pattern each
//! (`python/make_validator_fixtures.py` writes them into tests/fixtures/coremltools/ops/):
//! our validator must accept every one, and our type inference must give exactly the output
//! types coremltools recorded. Copies broken on purpose must still be reported, so the op rules
//! were relaxed to coremltools' behaviour and not switched off. docs/validator-audit.md has the
//! rule-by-rule record.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use corelm_format::mil::ops::{self, ArgInfo, Args};
use corelm_format::mil::program::{Binding, Function, Operation};
use corelm_format::mil::validate::validate_model;
use corelm_format::model::FeatureKind;
use corelm_format::target::Target;
use corelm_format::tensor::Tensor;
use corelm_format::{DType, Dim, Model, Package, TensorType, ValueType};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/coremltools/ops")
}

fn fixture(name: &str) -> PathBuf {
    fixture_dir().join(format!("{name}.mlpackage"))
}

/// Every package in the fixture directory, sorted by name.
fn all_fixtures() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("tests/fixtures/coremltools/ops exists: run python/make_validator_fixtures.py")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "mlpackage"))
        .collect();
    found.sort();
    found
}

fn open_model(name: &str) -> Model {
    Package::open(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}")).model().clone()
}

/// The packages the audit relies on; the directory may hold more.
const EXPECTED: &[&str] = &[
    "conv1d",
    "conv2d",
    "conv2d_groups_same",
    "conv_runtime_bias",
    "gather_along_axis_ios15",
    "gather_nd_ios15",
    "gather_nd_ios16_batch",
    "linear_int32",
    "linear_rank4",
    "linear_rank5",
    "matmul_broadcast",
    "matmul_constexpr_weight",
    "matmul_transposed_const",
    "reshape_int16_zero",
    "slice_by_size_int8",
    "slice_negative_stride",
    "squeeze_flexible",
    "topk_int16_k",
    "topk_ios15",
    "topk_ios16_values_only",
];

#[test]
fn every_expected_fixture_is_there() {
    let names: Vec<String> =
        all_fixtures().iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
    for want in EXPECTED {
        assert!(names.iter().any(|n| n == want), "{want}.mlpackage missing: run python/make_validator_fixtures.py");
    }
}

#[test]
fn validator_accepts_every_coremltools_package() {
    let mut problems = Vec::new();
    for path in all_fixtures() {
        let package = Package::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for issue in package.validate() {
            problems.push(format!("{}: {issue}", path.file_name().unwrap().to_string_lossy()));
        }
    }
    assert!(problems.is_empty(), "our validator objects to packages coremltools wrote:\n{}", problems.join("\n"));
}

/// What the validator knows of each variable while walking a function: its type, and its
/// value when it is an inline constant.
type Vars = HashMap<String, (TensorType, Option<Tensor>)>;

fn args_of(op: &Operation, vars: &Vars) -> Args {
    let mut args = Args::default();
    let bound = op.inputs.iter().map(|(k, v)| (k.clone(), v.clone()));
    let attrs = op.attributes.iter().map(|(k, v)| (k.clone(), vec![Binding::Value(v.clone())]));
    let all: Vec<(String, Vec<Binding>)> =
        if op.is_constant() { bound.chain(attrs.filter(|(k, _)| k != "name")).collect() } else { bound.collect() };
    for (param, binds) in all {
        let infos = binds
            .iter()
            .map(|b| match b {
                Binding::Name(n) => {
                    let (ty, value) = vars.get(n).unwrap_or_else(|| panic!("`{n}` is not defined"));
                    ArgInfo { ty: ty.clone(), value: value.clone() }
                }
                Binding::Value(v) => ArgInfo { ty: v.ty.clone(), value: v.as_immediate().cloned() },
            })
            .collect();
        args.args.insert(param, infos);
    }
    args
}

/// Re-infers every op's outputs; describes each output whose type differs from the recorded one.
fn reinfer(function: &Function) -> Vec<String> {
    let target = Target::from_opset(&function.opset).expect("known opset");
    let mut vars: Vars = function.inputs.iter().map(|i| (i.name.clone(), (i.ty.tensor().clone(), None))).collect();
    let mut differences = Vec::new();
    for op in &function.block.operations {
        if op.op_type == "const" {
            let val = &op.attributes["val"];
            vars.insert(op.outputs[0].name.clone(), (val.ty.clone(), val.as_immediate().cloned()));
            continue;
        }
        match ops::lookup(&op.op_type, target).and_then(|def| (def.infer)(&args_of(op, &vars))) {
            Ok(inferred) if inferred.len() != op.outputs.len() => differences.push(format!(
                "{} `{}`: {} outputs recorded, {} inferred",
                op.op_type,
                op.label(),
                op.outputs.len(),
                inferred.len()
            )),
            Ok(inferred) => {
                for (out, ty) in op.outputs.iter().zip(inferred) {
                    if out.ty.tensor() != &ty {
                        differences.push(format!("{} `{}`: recorded {}, inferred {ty}", op.op_type, out.name, out.ty));
                    }
                }
            }
            Err(e) => differences.push(format!("{} `{}`: {e}", op.op_type, op.label())),
        }
        for out in &op.outputs {
            vars.insert(out.name.clone(), (out.ty.tensor().clone(), None));
        }
    }
    differences
}

#[test]
fn reinferred_output_types_equal_the_recorded_ones() {
    let mut differences = Vec::new();
    for path in all_fixtures() {
        let package = Package::open(&path).unwrap();
        for (fname, function) in &package.model().program.functions {
            for d in reinfer(function) {
                differences.push(format!("{} ({fname}): {d}", path.file_name().unwrap().to_string_lossy()));
            }
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

// ---------------------------------------------------------------- still reported

fn main_fn(m: &mut Model) -> &mut Function {
    m.program.functions.get_mut("main").unwrap()
}

fn op_of_type<'a>(m: &'a mut Model, op_type: &str) -> &'a mut Operation {
    main_fn(m).block.operations.iter_mut().find(|o| o.op_type == op_type).unwrap()
}

/// Changes the shape of function input `name`, in the program and in the description alike,
/// so the only problems left are the ones the op rules find.
fn reshape_input(m: &mut Model, name: &str, shape: &[usize]) {
    let input = main_fn(m).inputs.iter_mut().find(|i| i.name == name).unwrap();
    let dtype = input.ty.tensor().dtype;
    input.ty = ValueType::Tensor(TensorType::fixed(dtype, shape));
    for f in &mut m.description.functions {
        for feature in f.inputs.iter_mut().filter(|f| f.name == name) {
            if let FeatureKind::Array(a) = &mut feature.kind {
                a.shape = shape.to_vec();
            }
        }
    }
}

/// Applies `mutate` to fixture `name` and expects an issue containing `expect`.
fn finds(name: &str, expect: &str, mutate: impl FnOnce(&mut Model)) {
    let mut model = open_model(name);
    assert!(validate_model(&model).is_empty(), "{name} must be valid before the change");
    mutate(&mut model);
    let issues = validate_model(&model);
    assert!(issues.iter().any(|i| i.to_string().contains(expect)), "{name}: expected `{expect}` among {issues:#?}");
}

#[test]
fn linear_with_mismatched_input_features_is_reported() {
    finds("linear_rank4", "linear: x has 16 input features, weight 32", |m| reshape_input(m, "x", &[1, 4, 1, 16]));
    finds("linear_rank5", "linear: x has 8 input features, weight 16", |m| reshape_input(m, "x", &[2, 1, 3, 2, 8]));
}

#[test]
fn linear_output_of_the_wrong_shape_is_reported() {
    finds("linear_rank4", "output `y` is declared tensor<fp32, [1, 4, 32]> but the inputs give", |m| {
        op_of_type(m, "linear").outputs[0].ty = ValueType::Tensor(TensorType::fixed(DType::Fp32, &[1, 4, 32]));
    });
}

#[test]
fn linear_needs_a_rank_2_weight_and_a_matching_bias() {
    finds("linear_rank4", "linear needs x of rank 1 or more and a rank-2 weight", |m| {
        let weight = match &op_of_type(m, "linear").inputs["weight"][0] {
            Binding::Name(n) => n.clone(),
            Binding::Value(_) => unreachable!("coremltools binds weights by name"),
        };
        let op = main_fn(m).block.operations.iter_mut().find(|o| o.outputs[0].name == weight).unwrap();
        let val = op.attributes.get_mut("val").unwrap();
        val.ty = TensorType::fixed(val.ty.dtype, &[1, 32, 32]);
        op.outputs[0].ty = ValueType::Tensor(val.ty.clone());
    });
    finds("linear_rank4", "linear: bias tensor<fp32, [31]> does not match weight", |m| {
        let bias = match &op_of_type(m, "linear").inputs["bias"][0] {
            Binding::Name(n) => n.clone(),
            Binding::Value(_) => unreachable!("coremltools binds biases by name"),
        };
        let op = main_fn(m).block.operations.iter_mut().find(|o| o.outputs[0].name == bias).unwrap();
        let val = op.attributes.get_mut("val").unwrap();
        val.ty = TensorType::fixed(val.ty.dtype, &[31]);
        op.outputs[0].ty = ValueType::Tensor(val.ty.clone());
    });
}

#[test]
fn linear_weight_computed_at_run_time_is_reported() {
    // The weight must be a constant: here it is the model input itself.
    finds("linear_rank4", "`weight` must be a constant, but `x` is computed at run time", |m| {
        op_of_type(m, "linear").inputs.insert("weight".into(), vec![Binding::Name("x".into())]);
    });
}

#[test]
fn matmul_shape_errors_are_reported() {
    finds("matmul_broadcast", "matmul inner dimensions differ: 4 vs 3", |m| reshape_input(m, "y", &[5, 3, 6]));
    finds("matmul_broadcast", "shapes cannot be broadcast: 3 vs 5", |m| reshape_input(m, "x", &[2, 3, 3, 4]));
}

#[test]
fn conv_shape_errors_are_reported() {
    finds("conv2d", "conv: x has 4 input channels; with 1 groups the weight needs 4 per group, not 3", |m| {
        reshape_input(m, "x", &[1, 4, 9, 8])
    });
    finds("conv1d", "conv needs x (N, C, *spatial) and a weight of the same rank", |m| {
        reshape_input(m, "x", &[1, 4, 16, 1])
    });
    finds("conv2d", "conv: spatial dimension 1 has no output (0)", |m| reshape_input(m, "x", &[1, 3, 9, 1]));
}

#[test]
fn topk_larger_than_its_axis_is_reported() {
    finds("topk_ios15", "topk: k = 3 is larger than axis 1 of size 2", |m| reshape_input(m, "x", &[2, 2]));
}

#[test]
fn version_rules_still_hold() {
    // gather_along_axis is in iOS 15, but its iOS 17 form (validate_indices) is not.
    finds("gather_along_axis_ios15", "`gather_along_axis` has no input named `validate_indices`", |m| {
        let v = corelm_format::mil::program::Value::immediate(Tensor::scalar_bool(false));
        op_of_type(m, "gather_along_axis").inputs.insert("validate_indices".into(), vec![Binding::Value(v)]);
    });
    // int16 indices arrived in iOS 16.
    finds("gather_nd_ios15", "`indices` is int16; allowed: int32", |m| {
        let input = main_fn(m).inputs.iter_mut().find(|i| i.name == "idx").unwrap();
        input.ty = ValueType::Tensor(input.ty.tensor().with_dtype(DType::Int16));
    });
}

#[test]
fn flexible_dims_stay_flexible() {
    // coremltools keeps a squeezed axis of unknown size; so do we, and say so in the type.
    let model = open_model("squeeze_flexible");
    let f = &model.program.functions["main"];
    let y = f.block.operations.iter().find(|o| o.op_type == "squeeze").unwrap();
    assert_eq!(y.outputs[0].ty.tensor().dims, vec![Dim::Unknown, Dim::Fixed(3)]);
}
