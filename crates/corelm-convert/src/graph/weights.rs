//! Reading a checkpoint's weights into the weight files: each role once, plain, compressed,
//! on the source's own grid, or in blocks of rows for the Neural Engine.

use std::collections::HashMap;

use half::f16;

use super::grids::{self, SourceGrid};
use super::{residual_divisor, GraphOptions, Profile, Stage, ANE_MAX_DIM};
use crate::arch::{tensor_spec, LayerRole, Role, TensorSpec};
use crate::checkpoint::{load, load_grid, Checkpoint};
use crate::compress::Compressed;
use crate::config::{ModelConfig, Norm, Rope};
use crate::Result;
use corelm_contract::weights::MIN_COMPRESSED_SIDE;
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
        Role::Layer(
            _,
            QNorm | KNorm | AttnNorm | PostAttnNorm | MlpNorm | PostMlpNorm | PostPerLayerNorm | LaurelNorm
            | AltUpRouterNorm,
        )
        | Role::FinalNorm
        | Role::PerLayerProjectionNorm => crate::checkpoint::expected_shape(c, role).first().copied(),
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
        /// The op whose output is `data` (see [`Compressed::data_from`]).
        data_from: Option<Box<Stored>>,
    },
    /// A matrix too tall for the Neural Engine, as blocks of at most [`ANE_MAX_DIM`] rows.
    Pieces(Vec<Stored>),
}

pub struct StoredWeights {
    pub(super) tensors: HashMap<Role, Stored>,
    pub(super) rope: Option<(BlobRef, BlobRef)>,
    pub(super) rope_local: Option<(BlobRef, BlobRef)>,
    /// What became of each quantized source tensor.
    pub source_grids: Vec<SourceGrid>,
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
    // The per-layer embedding table is not among them: it lies beside the program
    // (`convert::per_layer_table`), its rows gathered by the runtime.
    let mut roles = vec![Role::Embed, Role::PositionEmbed, Role::PerLayerProjection];
    roles.push(Role::PerLayerProjectionNorm);
    let streams = c.altup.map_or(0, |a| a.inputs);
    roles.extend((1..streams).map(|i| Role::AltUpProjection(i - 1)));
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
            AltUpCorrectScale,
            AltUpCorrection,
            AltUpPrediction,
            AltUpRouter,
            AltUpRouterNorm,
            LaurelLeft,
            LaurelRight,
            LaurelNorm,
            PerLayerGate,
            PerLayerProj,
            PostPerLayerNorm,
            LayerScalar,
            QGate,
            MixerIn,
            MixerInBias,
            ConvKernel,
            ConvBias,
            DeltaGate,
            DeltaBeta,
            DeltaDecay,
            DtBias,
            ALog,
            MixerNorm,
            SkipScale,
            MixerOut,
            MixerOutBias,
        ] {
            roles.push(Role::Layer(l, r));
        }
    }
    roles.extend((1..streams).map(|i| Role::AltUpUnembed(i - 1)));
    roles.extend([Role::FinalNorm, Role::FinalNormBias, Role::LmHead]);
    roles
}

/// Weights that feed `linear` (or the embedding gather) and may be quantized.
fn is_matrix(role: Role) -> bool {
    use LayerRole::*;
    matches!(
        role,
        Role::Embed
            | Role::LmHead
            | Role::PerLayerProjection
            | Role::AltUpProjection(_)
            | Role::AltUpUnembed(_)
            | Role::Layer(
                _,
                Q | K
                    | V
                    | O
                    | Gate
                    | Up
                    | Down
                    | PerLayerGate
                    | PerLayerProj
                    | LaurelLeft
                    | LaurelRight
                    | QGate
                    | MixerIn
                    | MixerOut
                    | DeltaGate
                    | DeltaBeta
                    | DeltaDecay
            )
    )
}

fn is_norm(role: Role) -> bool {
    use LayerRole::*;
    matches!(
        role,
        Role::FinalNorm
            | Role::FinalNormBias
            | Role::PerLayerProjectionNorm
            | Role::Layer(
                _,
                AttnNorm
                    | AttnNormBias
                    | PostAttnNorm
                    | MlpNorm
                    | MlpNormBias
                    | PostMlpNorm
                    | QNorm
                    | KNorm
                    | PostPerLayerNorm
                    | LaurelNorm
                    | AltUpRouterNorm
            )
    )
}

/// Small vectors and matrices kept in fp32 (outside the Neural Engine) like the norms: AltUp's
/// coefficients and scales, Gemma 4's layer scalar, the recurrent layers' convolution kernels,
/// decay parameters and (plain-gain) output norm.
fn is_coefficient(role: Role) -> bool {
    use LayerRole::*;
    matches!(
        role,
        Role::Layer(
            _,
            AltUpCorrectScale
                | AltUpCorrection
                | AltUpPrediction
                | AltUpRouter
                | LayerScalar
                | ConvKernel
                | ConvBias
                | DtBias
                | ALog
                | MixerNorm
                | SkipScale
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
    let mut source_grids = Vec::new();
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
        let big = crate::checkpoint::expected_shape(c, role).iter().all(|&d| d >= MIN_COMPRESSED_SIDE);
        let scheme = if is_matrix(role) && big { opts.compress.scheme_for(&spec.name, embedding) } else { None };
        // The ane profile stores a table taller than it takes in blocks of rows.
        let split = (opts.profile == Profile::Ane && embedding && c.vocab_size > ANE_MAX_DIM).then_some(ANE_MAX_DIM);
        let source = crate::checkpoint::resolve(ck, &spec.name).and_then(|n| ck.storage(&n)).filter(|s| s.quantized);
        let refused =
            source.as_ref().and_then(|s| grids::refusal(&opts.compress, &spec, is_matrix(role), scheme, &s.type_name));
        // A source grid Core ML can hold is stored as it is: no second rounding.
        let carried = match (&source, &refused) {
            (Some(_), None) => load_grid(ck, c, role, &spec, dtype)?,
            _ => None,
        };
        let stored = match &carried {
            Some(grid) => store_grid(store, &grid.compressed, split)?,
            None => store_values(c, ck, opts, store, role, &spec, scheme, split)?,
        };
        let package_bytes = store.bytes_written() - bytes_before;
        progress.tensor_done(&spec.name, package_bytes);
        if let Some(source) = source {
            source_grids.push(match carried {
                Some(grid) => SourceGrid::carried(&spec, &source, &grid, package_bytes),
                None => {
                    let reason =
                        refused.unwrap_or_else(|| format!("Core ML has no form for {} grids", source.type_name));
                    SourceGrid::not_carried(&spec, &source, dtype.name().to_string(), scheme, reason, package_bytes)
                }
            });
        }
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
    Ok(StoredWeights { tensors, rope, rope_local, source_grids })
}

/// A carried grid, in blocks of `split` rows when given.
fn store_grid(store: &mut WeightStore, grid: &Compressed, split: Option<usize>) -> Result<Stored> {
    let Some(block) = split else { return store_compressed(store, grid) };
    let rows = grid.matrix_shape()[0];
    let mut pieces = Vec::new();
    for start in (0..rows).step_by(block) {
        pieces.push(store_compressed(store, &grid.rows(rows, start, block.min(rows - start))?)?);
    }
    Ok(Stored::Pieces(pieces))
}

/// A weight read as values: norms with the graph's folds applied (Gemma's `1 + w`, the residual
/// divisor, the Neural Engine norm's gain), matrices compressed by `scheme`.
#[allow(clippy::too_many_arguments)]
fn store_values(
    c: &ModelConfig,
    ck: &dyn Checkpoint,
    opts: &GraphOptions,
    store: &mut WeightStore,
    role: Role,
    spec: &TensorSpec,
    scheme: Option<crate::compress::Scheme>,
    split: Option<usize>,
) -> Result<Stored> {
    let dtype = opts.precision.dtype();
    let ane = opts.profile == Profile::Ane;
    let (shape, mut data) = load(ck, c, role, spec)?;
    let add_one = matches!(c.norm, Norm::Rms { add_one: true, .. });
    if add_one && is_norm(role) {
        data.iter_mut().for_each(|v| *v += 1.0);
    }
    // The ane profile's residual divisor: norms that feed the stream divide by it; the
    // per-layer input's gate, reading the stream, multiplies it back.
    let d = residual_divisor(c, opts) as f32;
    match role {
        Role::Layer(_, LayerRole::PostAttnNorm | LayerRole::PostMlpNorm | LayerRole::PostPerLayerNorm) => {
            data.iter_mut().for_each(|v| *v /= d)
        }
        Role::Layer(_, LayerRole::PerLayerGate) => data.iter_mut().for_each(|v| *v *= d),
        _ => {}
    }
    if let Some(n) = ane_rms_width(c, role).filter(|_| ane) {
        let k = (n as f64 / (n as f64 + 1.0)).sqrt() as f32;
        data.iter_mut().for_each(|v| *v *= k);
    }
    // Norms are computed in fp32 except on the Neural Engine, which has no fp32.
    let keep_f32 = ((is_norm(role) || is_coefficient(role)) && !ane) || dtype == DType::Fp32;
    match split {
        Some(block) => {
            let cols = shape[1];
            let mut pieces = Vec::new();
            for rows in data.chunks(block * cols) {
                pieces.push(store_matrix(store, vec![rows.len() / cols, cols], rows, scheme, keep_f32, dtype)?);
            }
            Ok(Stored::Pieces(pieces))
        }
        None => store_matrix(store, shape, &data, scheme, keep_f32, dtype),
    }
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
        Some(scheme) => store_compressed(store, &crate::compress::compress(&shape, data, scheme, dtype, None)?),
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

fn store_compressed(store: &mut WeightStore, c: &Compressed) -> Result<Stored> {
    let mut inputs = Vec::with_capacity(c.inputs.len());
    for (name, t) in &c.inputs {
        inputs.push((*name, store.store(t)?));
    }
    let data_from = match &c.data_from {
        Some(inner) => Some(Box::new(store_compressed(store, inner)?)),
        None => None,
    };
    Ok(Stored::Compressed { op: c.op, inputs, data_from })
}
