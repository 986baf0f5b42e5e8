//! The Neural Engine fallback rules: each fires on a small program built to trip it, a program
//! shaped for the Neural Engine trips none, and the rule list in `docs/ane-rules.md` is the one
//! the code applies.

use std::collections::BTreeSet;

use corelm_format::ane::{self, Finding, RULES};
use corelm_format::inspect::Report;
use corelm_format::mil::program::Value;
use corelm_format::package::{WriteOptions, MAX_WEIGHT_FILE_BYTES};
use corelm_format::weights::WeightStore;
use corelm_format::{
    samples, DType, FunctionBuilder, InputShape, Model, Package, PackageWriter, ProgramBuilder, Result, Target, Tensor,
    ValueType,
};

/// A one-function model (`main`, iOS 18) built in memory; its weights go to a scratch folder.
fn model(build: impl FnOnce(&mut FunctionBuilder<'_>) -> Result<()>) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let mut weights = WeightStore::new(dir.path());
    let mut f = FunctionBuilder::new("main", Target::Ios18, &mut weights).unwrap();
    build(&mut f).unwrap();
    let mut prog = ProgramBuilder::new(Target::Ios18);
    prog.add_function(f.finish().unwrap()).unwrap();
    prog.finish().unwrap()
}

/// (rule, subject) of each finding, in report order.
fn hits(findings: &[Finding]) -> Vec<(&'static str, String)> {
    findings.iter().map(|h| (h.rule, h.subject.to_string())).collect()
}

fn main_hits(model: &Model) -> Vec<(&'static str, String)> {
    hits(&ane::model_findings(model)["main"])
}

fn i32s(values: &[i32]) -> Tensor {
    Tensor::from_i32(vec![values.len()], values).unwrap()
}

fn fp16_zeros(shape: &[usize]) -> Tensor {
    Tensor::from_floats(DType::Fp16, shape.to_vec(), &vec![0.0; shape.iter().product()]).unwrap()
}

#[test]
fn the_doc_lists_exactly_the_rules_the_code_applies() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/ane-rules.md");
    let text = std::fs::read_to_string(path).unwrap();
    // Each rule is a `### `id`` heading.
    let documented: BTreeSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("### `").and_then(|rest| rest.strip_suffix('`'))).collect();
    let applied: BTreeSet<&str> = RULES.into_iter().collect();
    assert_eq!(documented, applied);
}

#[test]
fn a_program_shaped_for_the_neural_engine_has_no_findings() {
    let m = model(|f| {
        // Enumerated shapes are compiled for the Neural Engine one by one: not a fallback.
        let x = f.input("x", DType::Fp16, InputShape::Enumerated(vec![vec![1, 1, 64], vec![1, 8, 64]]))?;
        let row = f.input("row", DType::Fp16, InputShape::Fixed(vec![1, 1, 64]))?;
        let cache = f.state("cache", &[1, 32, 64])?;
        let h = f.op1("linear", "proj", vec![("x", (&x).into()), ("weight", fp16_zeros(&[64, 64]).into())])?;
        let old = f.op1("read_state", "old", vec![("input", (&cache).into())])?;
        let new = f.op1(
            "slice_update",
            "upd",
            vec![
                ("x", (&old).into()),
                ("update", (&row).into()),
                ("begin", i32s(&[0, 0, 0]).into()),
                ("end", i32s(&[1, 1, 64]).into()),
            ],
        )?;
        f.op("write_state", "store", vec![("input", (&cache).into()), ("data", (&new).into())])?;
        let keys = f.op1("read_state", "keys", vec![("input", (&cache).into())])?;
        let scores = f.op1(
            "matmul",
            "scores",
            vec![("x", (&h).into()), ("y", (&keys).into()), ("transpose_y", Tensor::scalar_bool(true).into())],
        )?;
        f.output(&scores, "scores")
    });
    assert_eq!(main_hits(&m), vec![]);
}

#[test]
fn range_inputs_are_flagged() {
    let m = model(|f| {
        let shape =
            InputShape::Range { default: vec![1, 1, 64], ranges: vec![(1, Some(1)), (1, Some(16)), (64, Some(64))] };
        let x = f.input("x", DType::Fp16, shape)?;
        let h = f.op1("linear", "proj", vec![("x", (&x).into()), ("weight", fp16_zeros(&[64, 64]).into())])?;
        f.output(&h, "proj")
    });
    let findings = &ane::model_findings(&m)["main"];
    assert_eq!(hits(findings), vec![(ane::FLEXIBLE_SHAPE, "input x".to_string())]);
    assert_eq!(findings[0].detail, "range shape (dim 1: 1..16)");
}

#[test]
fn dimensions_over_65536_are_flagged() {
    let m = model(|f| {
        let x = f.input("x", DType::Fp16, InputShape::Fixed(vec![1, 8]))?;
        let wide = f.op1("tile", "wide", vec![("x", (&x).into()), ("reps", i32s(&[1, 9000]).into())])?;
        f.output(&wide, "wide")
    });
    assert_eq!(main_hits(&m), vec![(ane::DIM_OVER_65536, "wide (tile)".to_string())]);
}

#[test]
fn tensors_of_rank_over_5_are_flagged() {
    let m = model(|f| {
        let x = f.input("x", DType::Fp16, InputShape::Fixed(vec![64]))?;
        let deep = f.op1("reshape", "deep", vec![("x", (&x).into()), ("shape", i32s(&[2; 6]).into())])?;
        let flat = f.op1("reshape", "flat", vec![("x", (&deep).into()), ("shape", i32s(&[64]).into())])?;
        f.output(&flat, "flat")
    });
    assert_eq!(
        main_hits(&m),
        vec![(ane::RANK_OVER_5, "deep (reshape)".to_string()), (ane::RANK_OVER_5, "flat (reshape)".to_string())]
    );
}

#[test]
fn int64_values_are_flagged() {
    let mut m = model(|f| {
        let x = f.input("x", DType::Fp16, InputShape::Fixed(vec![1, 4]))?;
        let flat = f.op1("reshape", "flat", vec![("x", (&x).into()), ("shape", i32s(&[-1]).into())])?;
        f.output(&flat, "flat")
    });
    // The builder only writes int32 index math; a reader can meet int64 in other tools' files.
    let function = m.program.functions.get_mut("main").unwrap();
    let shape = function.block.operations.iter_mut().find(|op| op.outputs[0].name == "flat_shape").unwrap();
    let v = Value::immediate(Tensor::from_ints(DType::Int64, vec![1], &[-1]).unwrap());
    shape.outputs[0].ty = ValueType::Tensor(v.ty.clone());
    shape.attributes.insert("val".into(), v);
    assert_eq!(main_hits(&m), vec![(ane::INT64, "flat_shape (const)".to_string())]);
}

#[test]
fn fp32_compute_is_flagged_but_casts_at_the_edge_are_not() {
    let m = model(|f| {
        let x = f.input("x", DType::Fp32, InputShape::Fixed(vec![1, 8]))?;
        let sq = f.op1("mul", "sq", vec![("x", (&x).into()), ("y", (&x).into())])?;
        let h = f.op1("cast", "h", vec![("x", (&sq).into()), ("dtype", Tensor::scalar_string("fp16").into())])?;
        let y = f.op1("relu", "act", vec![("x", (&h).into())])?;
        let out = f.op1("cast", "out", vec![("x", (&y).into()), ("dtype", Tensor::scalar_string("fp32").into())])?;
        // Renamed through an identity: the cast still only hands the output out.
        f.output(&out, "y")
    });
    assert_eq!(
        main_hits(&m),
        vec![(ane::FP32_COMPUTE, "sq (mul)".to_string()), (ane::FP32_COMPUTE, "h (cast)".to_string())]
    );
}

#[test]
fn states_whose_width_is_not_a_multiple_of_32_are_flagged() {
    let m = model(|f| {
        let cache = f.state("cache", &[1, 32, 40])?;
        let now = f.op1("read_state", "now", vec![("input", (&cache).into())])?;
        f.output(&now, "now")
    });
    assert_eq!(main_hits(&m), vec![(ane::STATE_WIDTH_UNALIGNED, "state cache".to_string())]);
}

#[test]
fn weight_files_over_2_gib_are_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let mut pkg = PackageWriter::create(dir.path().join("big.mlpackage"), &WriteOptions::overwriting()).unwrap();
    let mut f = FunctionBuilder::new("main", Target::Ios18, pkg.weights()).unwrap();
    let x = f.input("x", DType::Fp16, InputShape::Fixed(vec![1, 64])).unwrap();
    let h = f.op1("linear", "proj", vec![("x", (&x).into()), ("weight", fp16_zeros(&[64, 64]).into())]).unwrap();
    f.output(&h, "proj").unwrap();
    let mut prog = ProgramBuilder::new(Target::Ios18);
    prog.add_function(f.finish().unwrap()).unwrap();
    let path = pkg.commit(&prog.finish().unwrap()).unwrap();
    let weight_file = path.join("Data/com.apple.CoreML/weights/weight.bin");
    let grow_to = |bytes: u64| std::fs::OpenOptions::new().write(true).open(&weight_file).unwrap().set_len(bytes);

    // Sparse: the test writes no gigabytes. At the limit the file is still fine.
    grow_to(MAX_WEIGHT_FILE_BYTES).unwrap();
    assert_eq!(hits(&ane::findings(&Package::open(&path).unwrap())["main"]), vec![]);
    grow_to(MAX_WEIGHT_FILE_BYTES + 1).unwrap();
    assert_eq!(
        hits(&ane::findings(&Package::open(&path).unwrap())["main"]),
        vec![(ane::WEIGHT_FILE_OVER_2GIB, "@model_path/weights/weight.bin".to_string())]
    );
}

#[test]
fn the_samples_report_what_keeps_them_off_the_neural_engine() {
    let dir = tempfile::tempdir().unwrap();
    let findings = |build: fn(&std::path::Path) -> Result<std::path::PathBuf>, name: &str| {
        let pkg = Package::open(build(&dir.path().join(name)).unwrap()).unwrap();
        ane::findings(&pkg).into_iter().map(|(f, list)| (f, hits(&list))).collect::<Vec<_>>()
    };
    // The default profile's interface: flexible query and mask lengths, a narrow KV state.
    assert_eq!(
        findings(samples::kv_cache, "kv.mlpackage"),
        vec![(
            "main".to_string(),
            vec![
                (ane::FLEXIBLE_SHAPE, "input x".to_string()),
                (ane::FLEXIBLE_SHAPE, "input causalMask".to_string()),
                (ane::STATE_WIDTH_UNALIGNED, "state keyCache".to_string()),
            ]
        )]
    );
    let state = vec![(ane::STATE_WIDTH_UNALIGNED, "state valueCache".to_string())];
    assert_eq!(
        findings(samples::multifunction, "multi.mlpackage"),
        vec![("decode".to_string(), state.clone()), ("prefill".to_string(), state)]
    );
    // fp32 features cast at the edge, palettized weights, enumerated shapes, ordinary ops.
    assert_eq!(findings(samples::palettized, "lut.mlpackage"), vec![("main".to_string(), vec![])]);
    assert_eq!(findings(samples::op_zoo, "zoo.mlpackage"), vec![("main".to_string(), vec![])]);
}

#[test]
fn inspect_reports_the_findings_per_function() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Package::open(samples::kv_cache(&dir.path().join("kv.mlpackage")).unwrap()).unwrap();
    let report = Report::new(&kv).unwrap();
    let json = serde_json::to_value(&report).unwrap();
    let first = &json["functions"]["main"]["ane_fallbacks"][0];
    assert_eq!(first["rule"], "ane-flexible-shape");
    assert_eq!(first["subject"], serde_json::json!({"kind": "input", "name": "x"}));
    let text = report.to_string();
    assert!(text.contains("    Neural Engine: known fallbacks (rules in docs/ane-rules.md)\n"), "{text}");
    assert!(text.contains("      ane-flexible-shape ×2: input x, input causalMask\n"), "{text}");
    assert!(text.contains("      ane-state-width-unaligned ×1: state keyCache\n"), "{text}");

    let lut = Package::open(samples::palettized(&dir.path().join("lut.mlpackage")).unwrap()).unwrap();
    let text = Report::new(&lut).unwrap().to_string();
    assert!(text.contains("    Neural Engine: no known fallbacks\n"), "{text}");
}
