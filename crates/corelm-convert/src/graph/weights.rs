//! Reading a checkpoint's weights into the weight files: each role once, plain, compressed,
//! on the source's own grid, or in blocks of rows for the Neural Engine.

use std::collections::HashMap;

use half::f16;

use super::{residual_divisor, GraphOptions, Profile, Stage, ANE_MAX_DIM};
use crate::arch::{tensor_spec, LayerRole, Role, Take};
use crate::checkpoint::{load, Checkpoint};
use crate::compress::Compressed;
use crate::config::{ModelConfig, Norm, Rope};
use crate::{Error, Result};
use corelm_format::weights::{BlobRef, WeightStore};
use corelm_format::{DType, Tensor};

/// The width of the Neural Engine form of an RMSNorm whose gain is `role`, when it is one: the
/// gain is stored times √(n/(n+1)), undoing the n+1 that the epsilon pair adds to the count
/// (see `Graph::ane_norm`).
fn ane_rms_width(c: &ModelConfig, role: Role) -> Option<usize> {
    use LayerRole::*;
    if !matches!(c.norm, Norm::Rms { .. }) {
        return None;
    }
    match role {
        Role::Layer(_, QNorm | KNorm) => Some(c.head_dim),
        Role::Layer(_, AttnNorm | PostAttnNorm | MlpNorm | PostMlpNorm) | Role::FinalNorm => Some(c.hidden_size),
        _ => None,
    }
}

/// Everything the graph reads from the weight files, stored once and shared by all functions.
/// A weight as stored: plain, or compressed (a constexpr op over stored tensors).
#[derive(Clone)]
pub(super) enum Stored {
    Plain(BlobRef),
    Compressed {
        op: &'static str,
        inputs: Vec<(&'static str, BlobRef)>,
    },
    /// A matrix too tall for the Neural Engine, as blocks of at most [`ANE_MAX_DIM`] rows.
    Pieces(Vec<Stored>),
}

pub struct StoredWeights {
    pub(super) tensors: HashMap<Role, Stored>,
    pub(super) rope: Option<(BlobRef, BlobRef)>,
    pub(super) rope_local: Option<(BlobRef, BlobRef)>,
    /// With `--grid gguf`: the quantized source tensors whose grid was not kept.
    pub grids_not_kept: Vec<GridNotKept>,
}

/// A quantized source tensor that `--grid gguf` asked to keep on its grid but that was stored
/// otherwise, and why: nothing changes silently.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GridNotKept {
    pub tensor: String,
    /// The ggml type it was stored as (`Q4_K`, ...).
    pub source_type: String,
    /// What it became in the package (`fp16`, `int4`, ...).
    pub stored_as: String,
    pub reason: String,
}

/// Why a quantized tensor's grid is not carried.
fn grid_not_kept_reason(source_type: &str, take: Take, kept: bool) -> String {
    if kept {
        "its name matches --keep".into()
    } else if take != Take::Whole {
        "it is a slice of a fused tensor".into()
    } else if ["Q4_0", "Q4_1", "Q8_0"].contains(&source_type) {
        "its rows are not whole 32-value blocks".into()
    } else {
        format!("Core ML has no form for {source_type} grids in corelm yet (Q4_0, Q4_1 and Q8_0 are carried)")
    }
}

/// Progress of weight loading, for progress bars.
pub trait Progress {
    fn tensor_done(&mut self, name: &str, bytes: u64);
}

impl<F: FnMut(&str, u64)> Progress for F {
    fn tensor_done(&mut self, name: &str, bytes: u64) {
        self(name, bytes)
    }
}

/// Every role the graph uses, in reading order.
pub fn roles(c: &ModelConfig) -> Vec<Role> {
    use LayerRole::*;
    let mut roles = vec![Role::Embed, Role::PositionEmbed];
    for l in 0..c.num_layers {
        for r in [
            AttnNorm,
            AttnNormBias,
            Q,
            K,
            V,
            QBias,
            KBias,
            VBias,
            QNorm,
            KNorm,
            O,
            OBias,
            PostAttnNorm,
            MlpNorm,
            MlpNormBias,
            Gate,
            Up,
            UpBias,
            Down,
            DownBias,
            PostMlpNorm,
        ] {
            roles.push(Role::Layer(l, r));
        }
    }
    roles.extend([Role::FinalNorm, Role::FinalNormBias, Role::LmHead]);
    roles
}

/// Weights that feed `linear` (or the embedding gather) and may be quantized.
fn is_matrix(role: Role) -> bool {
    use LayerRole::*;
    matches!(role, Role::Embed | Role::LmHead | Role::Layer(_, Q | K | V | O | Gate | Up | Down))
}

fn is_norm(role: Role) -> bool {
    use LayerRole::*;
    matches!(
        role,
        Role::FinalNorm
            | Role::FinalNormBias
            | Role::Layer(
                _,
                AttnNorm | AttnNormBias | PostAttnNorm | MlpNorm | MlpNormBias | PostMlpNorm | QNorm | KNorm
            )
    )
}

fn rope_tables(store: &mut WeightStore, rope: &Rope, context: usize, dtype: DType) -> Result<(BlobRef, BlobRef)> {
    let (cos, sin) = crate::rope::tables(rope, context)?;
    let shape = vec![context, rope.rotary_dim];
    Ok((
        store.store(&Tensor::from_floats(dtype, shape.clone(), &cos)?)?,
        store.store(&Tensor::from_floats(dtype, shape, &sin)?)?,
    ))
}

/// Reads every weight the configuration needs, one tensor at a time, into the weight files.
/// Norm weights are kept in fp32 (norms are computed in fp32); Gemma's `1 + w` is folded in.
pub fn store_weights(
    c: &ModelConfig,
    ck: &dyn Checkpoint,
    opts: &GraphOptions,
    store: &mut WeightStore,
    stage: &Stage,
    progress: &mut dyn Progress,
) -> Result<StoredWeights> {
    let dtype = opts.precision.dtype();
    let mut tensors = HashMap::new();
    let mut by_name: HashMap<String, Stored> = HashMap::new();
    let mut grids_not_kept = Vec::new();
    for role in roles(c).into_iter().filter(|r| stage.holds(*r)) {
        let Some(spec) = tensor_spec(c, role) else { continue };
        let key = format!("{}{:?}", spec.name, spec.take);
        if let Some(existing) = by_name.get(&key) {
            // Tied embeddings: the LM head reads the embedding blob.
            tensors.insert(role, existing.clone());
            continue;
        }
        let bytes_before = store.bytes_written();
        let embedding = matches!(role, Role::Embed | Role::LmHead);
        let policy = &opts.compress;
        // A source grid Core ML can express is stored as it is: no second rounding.
        let grid = match (policy.source_grid, is_matrix(role), spec.take) {
            (true, true, Take::Whole) if !policy.keeps(&spec.name) => {
                crate::checkpoint::load_grid(ck, c, role, &spec, dtype)?
            }
            _ => None,
        };
        let ane = opts.profile == Profile::Ane;
        let split = ane && matches!(role, Role::Embed | Role::LmHead) && c.vocab_size > ANE_MAX_DIM;
        if split && grid.is_some() {
            return Err(Error::invalid(format!(
                "the ane profile splits {} ({} rows) into blocks of {ANE_MAX_DIM}; a carried-over GGUF grid \
                 cannot be split yet (drop --grid)",
                spec.name, c.vocab_size
            )));
        }
        let scheme = if is_matrix(role) { policy.scheme_for(&spec.name, embedding) } else { None };
        let storage = crate::checkpoint::resolve(ck, &spec.name).and_then(|n| ck.storage(n));
        if let (true, true, None, Some((source_type, true))) = (policy.source_grid, is_matrix(role), &grid, storage) {
            grids_not_kept.push(GridNotKept {
                tensor: spec.name.clone(),
                stored_as: scheme.map_or_else(|| dtype.name().to_string(), |s| format!("{s} (rounded again)")),
                reason: grid_not_kept_reason(&source_type, spec.take, policy.keeps(&spec.name)),
                source_type,
            });
        }
        if let Some(g) = grid {
            let stored = store_compressed(store, g)?;
            progress.tensor_done(&spec.name, store.bytes_written() - bytes_before);
            by_name.insert(key, stored.clone());
            tensors.insert(role, stored);
            continue;
        }
        let (shape, mut data) = load(ck, c, role, &spec)?;
        let add_one = matches!(c.norm, Norm::Rms { add_one: true, .. });
        if add_one && is_norm(role) {
            data.iter_mut().for_each(|v| *v += 1.0);
        }
        if matches!(role, Role::Layer(_, LayerRole::PostAttnNorm | LayerRole::PostMlpNorm)) {
            let d = residual_divisor(c, opts) as f32;
            data.iter_mut().for_each(|v| *v /= d);
        }
        if let Some(n) = ane_rms_width(c, role).filter(|_| ane) {
            let k = (n as f64 / (n as f64 + 1.0)).sqrt() as f32;
            data.iter_mut().for_each(|v| *v *= k);
        }
        // Norms are computed in fp32 except on the Neural Engine, which has no fp32.
        let keep_f32 = (is_norm(role) && !ane) || dtype == DType::Fp32;
        let stored = if split {
            let cols = shape[1];
            let mut pieces = Vec::new();
            for rows in data.chunks(ANE_MAX_DIM * cols) {
                pieces.push(store_matrix(store, vec![rows.len() / cols, cols], rows, scheme, keep_f32, dtype)?);
            }
            Stored::Pieces(pieces)
        } else {
            store_matrix(store, shape, &data, scheme, keep_f32, dtype)?
        };
        drop(data);
        progress.tensor_done(&spec.name, store.bytes_written() - bytes_before);
        by_name.insert(key, stored.clone());
        tensors.insert(role, stored);
    }
    let rope = match &c.rope {
        Some(r) => Some(rope_tables(store, r, opts.context, dtype)?),
        None => None,
    };
    let rope_local = match &c.rope_local {
        Some(r) => Some(rope_tables(store, r, opts.context, dtype)?),
        None => None,
    };
    Ok(StoredWeights { tensors, rope, rope_local, grids_not_kept })
}

/// One weight: compressed by `scheme`, or plain (f32 when `keep_f32`, else `dtype`).
fn store_matrix(
    store: &mut WeightStore,
    shape: Vec<usize>,
    data: &[f32],
    scheme: Option<crate::compress::Scheme>,
    keep_f32: bool,
    dtype: DType,
) -> Result<Stored> {
    match scheme {
        Some(scheme) => store_compressed(store, crate::compress::compress(&shape, data, scheme, dtype, None)?),
        None => {
            // Encode straight to storage bytes: the f32 copy and the encoded copy are the only
            // two of this tensor in memory, and only until it is written.
            let t = if keep_f32 {
                Tensor::from_f32(shape, data)?
            } else {
                let bytes = data.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
                Tensor::from_bytes(DType::Fp16, shape, bytes)?
            };
            Ok(Stored::Plain(store.store(&t)?))
        }
    }
}

fn store_compressed(store: &mut WeightStore, c: Compressed) -> Result<Stored> {
    let mut inputs = Vec::with_capacity(c.inputs.len());
    for (name, t) in &c.inputs {
        inputs.push((*name, store.store(t)?));
    }
    Ok(Stored::Compressed { op: c.op, inputs })
}
