//! The builder refuses what Core ML would refuse, and says which op and input is wrong.

use corelm_format::weights::WeightStore;
use corelm_format::{Arg, DType, FunctionBuilder, InputShape, ProgramBuilder, Target, Tensor};

fn err_of<T: std::fmt::Debug>(r: corelm_format::Result<T>) -> String {
    r.expect_err("the builder should refuse this").to_string()
}

#[test]
fn checks_inputs_as_ops_are_added() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = WeightStore::new(dir.path());
    let mut f = FunctionBuilder::new("main", Target::Ios18, &mut store).unwrap();
    let x = f.input("x", DType::Fp16, InputShape::Fixed(vec![2, 8])).unwrap();
    let ids = f.input("ids", DType::Int32, InputShape::Fixed(vec![2])).unwrap();
    let state = f.state("cache", &[2, 8]).unwrap();

    let e = err_of(f.op1("add", "s", vec![("x", (&x).into()), ("y", (&ids).into())]));
    assert!(e.contains("add `s`") && e.contains("must have the same dtype"), "{e}");
    let e = err_of(f.op1("softmax", "", vec![("x", (&ids).into())]));
    assert!(e.contains("`x` is int32; allowed: fp16, fp32"), "{e}");
    let e = err_of(f.op1("linear", "l", vec![("x", (&x).into())]));
    assert!(e.contains("required input `weight` is missing"), "{e}");
    let e = err_of(f.op1("relu", "r", vec![("x", (&x).into()), ("alpha", (&x).into())]));
    assert!(e.contains("no input named `alpha`"), "{e}");
    let e = err_of(f.op1("transpose", "t", vec![("x", (&x).into()), ("perm", (&ids).into())]));
    assert!(e.contains("must be a constant"), "{e}");
    let e = err_of(f.op1("relu", "r", vec![("x", (&state).into())]));
    assert!(e.contains("can only be read by read_state"), "{e}");
    let e = err_of(f.op1("read_state", "rs", vec![("input", (&x).into())]));
    assert!(e.contains("is not a state"), "{e}");
    let e = err_of(f.op1("nonexistent_op", "n", vec![]));
    assert!(e.contains("unknown op `nonexistent_op`"), "{e}");
    let bad_shape = Tensor::from_i32(vec![2], &[3, 7]).unwrap();
    let e = err_of(f.op1("reshape", "rs", vec![("x", (&x).into()), ("shape", bad_shape.into())]));
    assert!(e.contains("cannot reshape"), "{e}");
    let w = Tensor::from_floats(DType::Fp16, vec![4, 5], &[0.0; 20]).unwrap();
    let e = err_of(f.op1("linear", "l", vec![("x", (&x).into()), ("weight", w.into())]));
    assert!(e.contains("x has 8 input features, weight 5"), "{e}");
    let e = err_of(f.output(&state, "out"));
    assert!(e.contains("cannot be an output"), "{e}");
    let e = err_of(f.input("x", DType::Fp16, InputShape::Fixed(vec![1])));
    assert!(e.contains("already used"), "{e}");
    let e = err_of(f.input("big", DType::Int64, InputShape::Fixed(vec![1])));
    assert!(e.contains("int64 inputs are not supported"), "{e}");
    let e = err_of(f.input("flex", DType::Fp16, InputShape::Range { default: vec![20], ranges: vec![(1, Some(16))] }));
    assert!(e.contains("outside the ranges"), "{e}");
}

#[test]
fn checks_target_features() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = WeightStore::new(dir.path());
    let mut f = FunctionBuilder::new("main", Target::Ios17, &mut store).unwrap();
    assert!(err_of(f.state("cache", &[1, 4])).contains("states need ios18"));
    let x = f.input("x", DType::Fp16, InputShape::Fixed(vec![1, 2, 4])).unwrap();
    let e = err_of(f.op1(
        "scaled_dot_product_attention",
        "a",
        vec![("query", Arg::Var(&x)), ("key", Arg::Var(&x)), ("value", Arg::Var(&x))],
    ));
    assert!(e.contains("needs ios18 or later, but the program targets ios17"), "{e}");
    let mut f = FunctionBuilder::new("main", Target::Ios15, &mut store).unwrap();
    assert!(err_of(f.input("x", DType::Fp16, InputShape::Fixed(vec![1])))
        .contains("fp16 inputs are not supported by ios15"));
}

#[test]
fn multifunction_needs_ios18_and_a_known_default() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = WeightStore::new(dir.path());
    let build = |store: &mut WeightStore, name: &str, target| {
        let mut f = FunctionBuilder::new(name, target, store).unwrap();
        let x = f.input("x", DType::Fp32, InputShape::Fixed(vec![1])).unwrap();
        let y = f.op1("relu", "y", vec![("x", (&x).into())]).unwrap();
        f.output(&y, "y").unwrap();
        f.finish().unwrap()
    };
    let mut p = ProgramBuilder::new(Target::Ios17);
    p.add_function(build(&mut store, "a", Target::Ios17)).unwrap();
    p.add_function(build(&mut store, "b", Target::Ios17)).unwrap();
    assert!(err_of(p.finish()).contains("multifunction models need ios18"));
    let mut p = ProgramBuilder::new(Target::Ios18);
    p.add_function(build(&mut store, "a", Target::Ios18)).unwrap();
    assert!(err_of(p.add_function(build(&mut store, "a", Target::Ios18))).contains("defined twice"));
    p.set_default_function("zzz");
    assert!(err_of(p.finish()).contains("default function `zzz` is not defined"));
}

#[test]
fn names_are_sanitized_and_unique() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = WeightStore::new(dir.path());
    let mut f = FunctionBuilder::new("main", Target::Ios18, &mut store).unwrap();
    let x = f.input("x", DType::Fp32, InputShape::Fixed(vec![4])).unwrap();
    let a = f.op1("relu", "model.layers.0/act", vec![("x", (&x).into())]).unwrap();
    let b = f.op1("relu", "model.layers.0/act", vec![("x", (&a).into())]).unwrap();
    let c = f.op1("relu", "fp16", vec![("x", (&b).into())]).unwrap();
    assert_eq!((a.name(), b.name(), c.name()), ("model_layers_0_act", "model_layers_0_act_0", "fp16_workaround"));
}
