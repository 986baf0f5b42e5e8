//! The validator finds what is wrong in hand-broken models and says where.

use corelm_format::mil::program::{Binding, Value};
use corelm_format::mil::validate::validate_model;
use corelm_format::model::FeatureKind;
use corelm_format::{samples, DType, Dim, Model, Package, Tensor, TensorType, ValueType};

fn kv_cache_model() -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let path = samples::kv_cache(&dir.path().join("m.mlpackage")).unwrap();
    let model = Package::open(&path).unwrap().model().clone();
    assert!(validate_model(&model).is_empty());
    (dir, model)
}

/// Applies `mutate` and expects an issue containing `expect`.
fn finds(expect: &str, mutate: impl FnOnce(&mut Model)) {
    let (_dir, mut model) = kv_cache_model();
    mutate(&mut model);
    let issues = validate_model(&model);
    assert!(issues.iter().any(|i| i.to_string().contains(expect)), "expected `{expect}` among {issues:#?}");
}

fn main_fn(m: &mut Model) -> &mut corelm_format::mil::program::Function {
    m.program.functions.get_mut("main").unwrap()
}

fn op_named<'a>(m: &'a mut Model, name: &str) -> &'a mut corelm_format::mil::program::Operation {
    main_fn(m).block.operations.iter_mut().find(|o| o.name.as_deref() == Some(name)).unwrap()
}

#[test]
fn description_must_match_the_program() {
    finds("output `attn` of the program is `logits` in the description", |m| {
        m.description.functions[0].outputs[0].name = "logits".into();
    });
    finds("input `x` is fp16 in the program", |m| {
        if let FeatureKind::Array(a) = &mut m.description.functions[0].inputs[0].kind {
            a.dtype = Some(DType::Fp32);
        }
    });
    finds("dim 1 is flexible in the program but fixed in the description", |m| {
        if let FeatureKind::Array(a) = &mut m.description.functions[0].inputs[0].kind {
            a.flexibility = corelm_format::model::Flexibility::Fixed;
        }
    });
    finds("1 states in the program, 0 in the description", |m| m.description.functions[0].states.clear());
}

#[test]
fn states_must_be_fp16_and_only_read_or_written() {
    finds("states must be fp16", |m| {
        main_fn(m).inputs[3].ty = ValueType::State(TensorType::fixed(DType::Fp32, &[1, 2, 16, 4]));
    });
    finds("state `keyCache` can only be used by read_state and write_state", |m| {
        op_named(m, "k_proj").inputs.insert("x".into(), vec![Binding::Name("keyCache".into())]);
    });
}

#[test]
fn names_must_be_defined_before_use_and_valid() {
    finds("refers to `nowhere`, which is not defined before this op", |m| {
        op_named(m, "k_proj").inputs.insert("x".into(), vec![Binding::Name("nowhere".into())]);
    });
    finds("op name is not a valid identifier", |m| op_named(m, "k_proj").name = Some("k-proj".into()));
    finds("`k_proj` is defined twice", |m| op_named(m, "k_heads").outputs[0].name = "k_proj".into());
}

#[test]
fn index_math_must_be_int32() {
    finds("Core ML has no 64-bit integers at run time, use int32", |m| {
        let v = Value::immediate(Tensor::from_ints(DType::Int64, vec![4], &[1, -1, 2, 4]).unwrap());
        let op = main_fn(m).block.operations.iter_mut().find(|o| o.outputs[0].name == "k_heads_shape").unwrap();
        op.outputs[0].ty = ValueType::Tensor(v.ty.clone());
        op.attributes.insert("val".into(), v);
    });
}

#[test]
fn ops_must_exist_in_the_opset_and_types_must_agree() {
    finds("needs ios18 or later, but the program targets ios17", |m| {
        m.spec_version = 8;
        main_fn(m).opset = "CoreML7".into();
    });
    finds("opset `CoreML7` does not match the specification version (CoreML8)", |m| {
        main_fn(m).opset = "CoreML7".into()
    });
    finds("output `k_t` is declared tensor<fp16, [1, 2, ?, 5]> but the inputs give tensor<fp16, [1, 2, ?, 4]>", |m| {
        op_named(m, "k_t").outputs[0].ty = ValueType::Tensor(TensorType::new(
            DType::Fp16,
            vec![Dim::Fixed(1), Dim::Fixed(2), Dim::Unknown, Dim::Fixed(5)],
        ));
    });
    finds("required input `y` is missing", |m| {
        op_named(m, "end").inputs.remove("y");
    });
    finds("attributes other than `name` are only allowed on constants", |m| {
        let v = Value::immediate(Tensor::scalar_i32(1));
        op_named(m, "k_proj").attributes.insert("extra".into(), v);
    });
}

/// A fuzzer-found program: a `constexpr_lut_to_dense` whose indices are 64-bit integers made
/// type inference shift past the width of usize. It is now reported as a problem.
#[test]
fn lut_indices_wider_than_a_byte_are_reported_not_a_panic() {
    use prost::Message;
    let bytes = include_bytes!("fixtures/fuzz/lut-indices-64-bit.mlmodel");
    let message = corelm_format::proto::Model::decode(&bytes[..]).unwrap();
    let model = Model::from_proto(&message).unwrap();
    let issues = validate_model(&model);
    assert!(issues.iter().any(|i| i.to_string().contains("lut indices must be uint1 to uint8")), "{issues:?}");
}
