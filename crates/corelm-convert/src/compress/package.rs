//! Compressing an existing package (`corelm compress`): every weight matrix of the program is
//! replaced by its compressed constexpr form, every other stored value is copied, and the
//! result is written as a new package (through a temporary folder, like a conversion).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use corelm_contract::weights::{WeightMatrices, WeightUse};
use corelm_format::mil::program::{Binding, Operation, Value, ValueData};
use corelm_format::package::{
    ExtraItem, PackageWriter, WriteOptions, CORELM_AUTHOR, COREML_AUTHOR, WEIGHT_DIGESTS_FILE,
};
use corelm_format::{DType, Package, Target, Tensor};
use serde::Serialize;

use super::{compress, Policy};
use crate::convert::dir_size;
use crate::{Error, Result};

#[derive(Debug, Serialize)]
pub struct CompressSummary {
    pub output: PathBuf,
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// Weight matrices compressed (each shared blob counted once).
    pub compressed: usize,
    /// Weight matrices left as they were (kept by the policy).
    pub kept: usize,
    pub seconds: f64,
    /// Input weight bytes compressed per second.
    pub megabytes_per_second: f64,
}

/// The blob a const op reads, as an identity shared across functions.
fn blob_key(v: &Value) -> Option<(String, u64)> {
    match &v.data {
        ValueData::Blob { file, offset } => Some((file.clone(), *offset)),
        ValueData::Immediate(_) => None,
    }
}

/// Stored floats as f32.
fn floats(t: &Tensor) -> Result<Vec<f32>> {
    match t.dtype() {
        DType::Fp16 => Ok(t.bytes().chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()),
        DType::Fp32 => Ok(t.bytes().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        other => Err(Error::invalid(format!("cannot compress a {other} weight"))),
    }
}

/// Calibration statistics by weight name: Σ x xᵀ over the inputs a linear layer saw (cols ×
/// cols, row-major), as `corelm_interp::calibrate` collects them.
pub type Grams = HashMap<String, Arc<Vec<f64>>>;

/// Writes `input` with its weights compressed per `policy` to `output`. Layer weights found in
/// `grams` are rounded to keep their layer's outputs close (integer schemes; see
/// [`super::compress`]); the embedding table and LM head are not, since a tied table serves as
/// both. `progress` hears of each weight as it is done (name, bytes written for it).
pub fn compress_package(
    input: &Path,
    output: &Path,
    policy: &Policy,
    grams: &Grams,
    write: &WriteOptions,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<CompressSummary> {
    let started = Instant::now();
    let pkg = Package::open(input)?;
    if pkg.model().target().is_none_or(|t| t < Target::Ios18) {
        return Err(Error::invalid(format!(
            "{}: compression writes iOS 18 ops (constexpr_blockwise_shift_scale, constexpr_lut_to_dense); \
             convert with --target ios18 first",
            input.display()
        )));
    }
    if policy.body.is_none() && policy.embeddings.is_none() {
        return Err(Error::invalid("no compression scheme given (--quantize)"));
    }
    let uses = WeightMatrices::find(&pkg.model().program);
    let mut files = pkg.blob_files();
    let mut out = PackageWriter::create(output, write)?;
    // Each stored value is rewritten once, so functions that shared a blob still share it.
    let mut copied: HashMap<(String, u64), Value> = HashMap::new();
    let mut replaced: HashMap<(String, u64), Operation> = HashMap::new();
    let (mut compressed, mut kept, mut compressed_input_bytes) = (0usize, 0usize, 0u64);
    let mut model = pkg.model().clone();
    for f in model.program.functions.values_mut() {
        for op in f.block.operations.iter_mut() {
            let out_name = op.outputs.first().map(|o| o.name.clone()).unwrap_or_default();
            let weight_use = if op.op_type == "const" { uses.use_of(&out_name) } else { None };
            let val = op.attributes.get("val").cloned();
            if let (Some(u), Some(v)) = (weight_use, &val) {
                let key = blob_key(v);
                let scheme = policy.scheme_for(&out_name, u == WeightUse::Embedding);
                match (scheme, key) {
                    (Some(scheme), Some(key)) => {
                        if let Some(done) = replaced.get(&key) {
                            let mut done = done.clone();
                            done.name = op.name.clone();
                            done.outputs = op.outputs.clone();
                            *op = done;
                            continue;
                        }
                        let t = files.read(v).map_err(|e| e.context(format!("weight `{out_name}`")))?;
                        let before = out.weights().bytes_written();
                        let gram = grams.get(&out_name).filter(|_| u == WeightUse::Layer).map(|g| g.as_slice());
                        let c = compress(t.shape(), &floats(&t)?, scheme, t.dtype(), gram)
                            .map_err(|e| e.context(format!("weight `{out_name}`")))?;
                        if c.data_from.is_some() {
                            return Err(Error::invalid(format!("weight `{out_name}`: a chain of constexpr ops")));
                        }
                        compressed_input_bytes += t.bytes().len() as u64;
                        let mut inputs = BTreeMap::new();
                        for (param, tensor) in &c.inputs {
                            inputs.insert(param.to_string(), vec![Binding::Value(out.weights().store(tensor)?.value)]);
                        }
                        let new_op = Operation {
                            op_type: c.op.to_string(),
                            name: op.name.clone(),
                            inputs,
                            outputs: op.outputs.clone(),
                            attributes: BTreeMap::new(),
                        };
                        progress(&out_name, out.weights().bytes_written() - before);
                        replaced.insert(key, new_op.clone());
                        *op = new_op;
                        compressed += 1;
                        continue;
                    }
                    (None, _) => kept += 1,
                    _ => {}
                }
            }
            // Everything else: stored values move to the new weight file as they are.
            let mut rewrite = |v: &mut Value| -> Result<()> {
                let Some(key) = blob_key(v) else { return Ok(()) };
                if let Some(new) = copied.get(&key) {
                    *v = new.clone();
                    return Ok(());
                }
                let t = files.read(v)?;
                let new = out.weights().store(&t)?.value;
                copied.insert(key, new.clone());
                *v = new;
                Ok(())
            };
            for v in op.attributes.values_mut() {
                rewrite(v)?;
            }
            for bindings in op.inputs.values_mut() {
                for b in bindings.iter_mut() {
                    if let Binding::Value(v) = b {
                        rewrite(v)?;
                    }
                }
            }
        }
    }
    if compressed == 0 {
        return Err(Error::invalid(format!("{}: found no weight matrices to compress", input.display())));
    }
    // Tokenizer, chat template and other items travel with the model; the weights and their
    // digests are new.
    for item in pkg.manifest().item_info_entries.values() {
        let digests = item.author == CORELM_AUTHOR && item.name == WEIGHT_DIGESTS_FILE;
        if item.author == COREML_AUTHOR || digests {
            continue;
        }
        let path = pkg.path().join("Data").join(&item.path);
        if path.is_file() {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            out.add_item(ExtraItem {
                author: item.author.clone(),
                name: item.name.clone(),
                description: item.description.clone(),
                bytes,
            })?;
        }
    }
    let written = out.commit(&model)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(CompressSummary {
        input_bytes: dir_size(input),
        output_bytes: dir_size(&written),
        output: written,
        compressed,
        kept,
        seconds,
        megabytes_per_second: compressed_input_bytes as f64 / 1e6 / seconds.max(1e-9),
    })
}
