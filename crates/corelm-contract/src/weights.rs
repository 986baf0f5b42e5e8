//! Which constants of a program are weight matrices, and how the program uses them: the one
//! answer compression (what to compress, with which scheme), the interpreter (which layers
//! calibration observes) and deployment planning (parameters, tied heads, stored bytes) share.

use std::collections::{BTreeMap, HashMap, HashSet};

use corelm_format::mil::program::{Binding, Operation, Program};

/// How the program uses a weight matrix, which decides the scheme compression gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightUse {
    Layer,
    /// The embedding table (gathered by the token ids) or an LM head of the same vocabulary.
    Embedding,
}

/// A weight matrix: the rank-2 float output of a constant op (`const`, or a `constexpr_*`
/// decompression) that the program multiplies or gathers by token ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightMatrix {
    pub rows: usize,
    pub cols: usize,
    /// Multiplied: the weight of a `linear`, or through `expand_dims` of a 1×1 `conv` (the
    /// Neural Engine layout).
    pub multiplied: bool,
    /// Gathered by the token ids (or casts of them): an embedding table.
    pub gathered: bool,
    /// Gathered, or with as many rows as a gathered table (a separate LM head).
    pub embedding: bool,
}

impl WeightMatrix {
    pub fn use_(&self) -> WeightUse {
        if self.embedding {
            WeightUse::Embedding
        } else {
            WeightUse::Layer
        }
    }
}

/// The shortest side of a matrix worth compressing: smaller ones (Gemma 3n's AltUp
/// coefficients, a tiny model's low-rank branches) gain nothing and stay as they are, in
/// `corelm convert --quantize` and `corelm compress` alike.
pub const MIN_COMPRESSED_SIDE: usize = 16;

/// The weight matrices of a program: at least [`MIN_COMPRESSED_SIDE`] on each side. Rope tables
/// and other constants gathered by positions are not weights; neither are vectors (norms,
/// biases).
#[derive(Clone, Debug, Default)]
pub struct WeightMatrices {
    /// By the name of the constant op's output.
    pub matrices: BTreeMap<String, WeightMatrix>,
    /// `expand_dims` outputs of a matrix, by function and name: what a conv's weight names.
    expanded: HashMap<(String, String), String>,
}

fn name_of<'o>(op: &'o Operation, param: &str) -> Option<&'o str> {
    match op.input(param) {
        Some(Binding::Name(n)) => Some(n),
        _ => None,
    }
}

fn is_constant(op: &Operation) -> bool {
    op.op_type == "const" || op.op_type.starts_with("constexpr_")
}

impl WeightMatrices {
    pub fn find(program: &Program) -> WeightMatrices {
        let mut found = WeightMatrices::default();
        let mut vocab = HashSet::new();
        for (fname, f) in &program.functions {
            // The function's inputs, and casts of them, still carry token ids.
            let mut ids: HashSet<&str> = f.inputs.iter().map(|i| i.name.as_str()).collect();
            for op in &f.block.operations {
                let Some(out) = op.outputs.first() else { continue };
                if is_constant(op) {
                    let t = out.ty.tensor();
                    let shape = t.shape();
                    let big = shape.as_deref().is_some_and(|s| s.iter().all(|&d| d >= MIN_COMPRESSED_SIDE));
                    if let (Some([rows, cols]), true, true) = (shape.as_deref(), t.dtype.is_float(), big) {
                        let m = WeightMatrix {
                            rows: *rows,
                            cols: *cols,
                            multiplied: false,
                            gathered: false,
                            embedding: false,
                        };
                        found.matrices.entry(out.name.clone()).or_insert(m);
                    }
                    continue;
                }
                match op.op_type.as_str() {
                    "cast" if name_of(op, "x").is_some_and(|x| ids.contains(x)) => {
                        ids.insert(&out.name);
                    }
                    "expand_dims" => {
                        if let Some(x) = name_of(op, "x").filter(|x| found.matrices.contains_key(*x)) {
                            found.expanded.insert((fname.clone(), out.name.clone()), x.to_string());
                        }
                    }
                    "linear" | "conv" => {
                        if let Some(w) = found.multiplied_by(fname, op).map(str::to_string) {
                            found.matrices.get_mut(&w).expect("a matrix").multiplied = true;
                        }
                    }
                    "gather" if name_of(op, "indices").is_some_and(|i| ids.contains(i)) => {
                        if let Some(m) = name_of(op, "x").and_then(|x| found.matrices.get_mut(x)) {
                            m.gathered = true;
                            vocab.insert(m.rows);
                        }
                    }
                    _ => {}
                }
            }
        }
        found.matrices.retain(|_, m| m.multiplied || m.gathered);
        for m in found.matrices.values_mut() {
            m.embedding = m.gathered || vocab.contains(&m.rows);
        }
        found
    }

    /// The weight matrix `op` (in function `function`) multiplies: a `linear` weight, or the
    /// matrix a `conv` weight expands.
    pub fn multiplied_by(&self, function: &str, op: &Operation) -> Option<&str> {
        let w = name_of(op, "weight")?;
        let w = match op.op_type.as_str() {
            "linear" => w,
            "conv" => self.expanded.get(&(function.to_string(), w.to_string()))?.as_str(),
            _ => return None,
        };
        self.matrices.get_key_value(w).map(|(k, _)| k.as_str())
    }

    /// How the matrix named `name` is used; `None` if it is not a weight matrix.
    pub fn use_of(&self, name: &str) -> Option<WeightUse> {
        self.matrices.get(name).map(WeightMatrix::use_)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corelm_format::package::{PackageWriter, WriteOptions};
    use corelm_format::{DType, FunctionBuilder, InputShape, ProgramBuilder, Target, Tensor};

    fn fp16(rows: usize, cols: usize) -> Tensor {
        Tensor::from_floats(DType::Fp16, vec![rows, cols], &vec![0.5; rows * cols]).unwrap()
    }

    /// An embedding table gathered by (a cast of) the token ids, a layer weight, an LM head of
    /// the vocabulary's rows, a conv weight through expand_dims, and a rope table gathered by
    /// computed positions: only the weights are found, each with its use. (A constant gathered
    /// by an input directly counts as gathered by token ids: packages from other tools name
    /// their ids input as they like.)
    #[test]
    fn weights_are_found_with_their_uses() {
        let dir = std::env::temp_dir().join(format!("corelm-contract-{}", std::process::id()));
        let mut pkg = PackageWriter::create(dir.join("w.mlpackage"), &WriteOptions::overwriting()).unwrap();
        let mut f = FunctionBuilder::new("main", Target::Ios18, pkg.weights()).unwrap();
        let ids = f.input("inputIds", DType::Int32, InputShape::Fixed(vec![1, 4])).unwrap();
        let pos = f.input("position", DType::Int32, InputShape::Fixed(vec![4])).unwrap();
        // Every side at least MIN_COMPRESSED_SIDE: smaller matrices are not weights to compress.
        let table = f.constant("embed", fp16(32, 16)).unwrap();
        let rope = f.constant("rope", fp16(16, 16)).unwrap();
        let layer = f.constant("w_up", fp16(24, 16)).unwrap();
        let head = f.constant("lm_head", fp16(32, 24)).unwrap();
        let conv_w = f.constant("w_conv", fp16(24, 24)).unwrap();
        let small = f.constant("w_small", fp16(4, 16)).unwrap();
        let int16 = Tensor::from_strings(vec![], vec!["int16".into()]).unwrap();
        let ids16 = f.op1("cast", "ids16", vec![("x", (&ids).into()), ("dtype", int16.into())]).unwrap();
        let axis0 = || Tensor::scalar_i32(0).into();
        let x = f.op1("gather", "x", vec![("x", (&table).into()), ("indices", (&ids16).into()), ("axis", axis0())]);
        // Positions reach the rope table computed (from the position input and an offset).
        let at = f.op1("add", "at", vec![("x", (&pos).into()), ("y", Tensor::scalar_i32(1).into())]).unwrap();
        let r = f.op1("gather", "r", vec![("x", (&rope).into()), ("indices", (&at).into()), ("axis", axis0())]);
        let (x, r) = (x.unwrap(), r.unwrap());
        let y = f.op1("add", "y", vec![("x", (&x).into()), ("y", (&r).into())]).unwrap();
        let up = f.op1("linear", "up", vec![("x", (&y).into()), ("weight", (&layer).into())]).unwrap();
        let axes = Tensor::from_ints(DType::Int32, vec![2], &[2, 3]).unwrap();
        let w4 = f.op1("expand_dims", "w4", vec![("x", (&conv_w).into()), ("axes", axes.into())]).unwrap();
        let x4 = f.op1(
            "expand_dims",
            "x4",
            vec![("x", (&up).into()), ("axes", Tensor::from_ints(DType::Int32, vec![1], &[3]).unwrap().into())],
        );
        let x4 = f
            .op1(
                "transpose",
                "x4t",
                vec![
                    ("x", (&x4.unwrap()).into()),
                    ("perm", Tensor::from_ints(DType::Int32, vec![4], &[0, 2, 1, 3]).unwrap().into()),
                ],
            )
            .unwrap();
        let c = f.op1("conv", "c", vec![("x", (&x4).into()), ("weight", (&w4).into())]).unwrap();
        let logits = f.op1("linear", "logits", vec![("x", (&up).into()), ("weight", (&head).into())]).unwrap();
        let mixed = f.op1("linear", "mixed", vec![("x", (&y).into()), ("weight", (&small).into())]).unwrap();
        f.output(&mixed, "mixed").unwrap();
        f.output(&logits, "logits").unwrap();
        f.output(&c, "c").unwrap();
        let mut prog = ProgramBuilder::new(Target::Ios18);
        prog.add_function(f.finish().unwrap()).unwrap();
        let model = prog.finish().unwrap();
        let found = WeightMatrices::find(&model.program);
        let uses: Vec<(&str, WeightUse)> = found.matrices.iter().map(|(n, m)| (n.as_str(), m.use_())).collect();
        assert_eq!(
            uses,
            [
                ("embed", WeightUse::Embedding),
                ("lm_head", WeightUse::Embedding),
                ("w_conv", WeightUse::Layer),
                ("w_up", WeightUse::Layer)
            ]
        );
        assert!(found.matrices["embed"].gathered && !found.matrices["embed"].multiplied);
        assert!(found.matrices["w_conv"].multiplied);
        let conv = model.program.functions["main"].block.operations.iter().find(|o| o.op_type == "conv").unwrap();
        assert_eq!(found.multiplied_by("main", conv), Some("w_conv"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
