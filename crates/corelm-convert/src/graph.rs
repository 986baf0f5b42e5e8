//! The decoder-only transformer as an ML Program: one graph, parameterised by the model
//! configuration, covering every supported family.
//!
//! Interface (stateful, iOS 18): inputs `inputIds` int32 (1, N) and `causalMask` (1, 1, N, end);
//! the write position is end − N; states `keyCache`/`valueCache` (layers, 1, kv_heads, context,
//! head_dim) fp16; output `logits` (1, N, vocab). Fixed query lengths become functions of one
//! multifunction model sharing the weights; those take fixed shapes throughout (the mask is
//! (1, 1, N, context)) and an extra `position` input.

use std::collections::HashMap;

use half::f16;

use crate::arch::{tensor_spec, LayerRole, Role, Take};
use crate::checkpoint::{load, Checkpoint};
use crate::compress::{Compressed, Policy};
use crate::config::{Activation, Attention, ModelConfig, Norm, Rope};
use crate::{Error, Result};
use corelm_contract::names;
use corelm_format::mil::builder::Arg;
use corelm_format::mil::program::Function;
use corelm_format::model::FunctionDescription;
use corelm_format::weights::{BlobRef, WeightStore};
use corelm_format::{DType, FunctionBuilder, InputShape, Target, Tensor, Var};

/// How attention is emitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionImpl {
    /// `scaled_dot_product_attention` (iOS 18), the scale folded into Q.
    Fused,
    /// matmul + softmax + matmul (always used where soft-capping is needed).
    Decomposed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Fp16,
    Fp32,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::Fp16 => DType::Fp16,
            Precision::Fp32 => DType::Fp32,
        }
    }
}

/// What the graph is shaped for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Profile {
    /// GPU and CPU: norms in fp32 (and Gemma's residual stream), any query-length scheme.
    #[default]
    Default,
    /// The Neural Engine (docs/ane-rules.md): fp16 throughout, fixed query lengths, context a
    /// multiple of 32, no tensor dimension over [`ANE_MAX_DIM`].
    Ane,
}

/// The largest tensor dimension the Neural Engine takes (rule `ane-dim-over-65536`).
pub const ANE_MAX_DIM: usize = 65536;

/// The ane profile's prefill chunk when no query lengths are given.
pub const ANE_PREFILL_CHUNK: usize = 64;

/// The part of the layer stack one package holds (`--chunks`): the first starts from token
/// ids, the others from the previous part's hidden states (`hiddenStates` in,
/// `nextHiddenStates` out); only the last ends in logits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub layers: std::ops::Range<usize>,
    pub first: bool,
    pub last: bool,
}

impl Stage {
    /// `parts` stages of consecutive layers whose sizes differ by at most one.
    pub fn split(layers: usize, parts: usize) -> Vec<Stage> {
        (0..parts)
            .map(|i| Stage {
                layers: i * layers / parts..(i + 1) * layers / parts,
                first: i == 0,
                last: i + 1 == parts,
            })
            .collect()
    }

    /// Whether this stage reads the weight.
    pub fn holds(&self, role: Role) -> bool {
        match role {
            Role::Embed | Role::PositionEmbed => self.first,
            Role::Layer(l, _) => self.layers.contains(&l),
            Role::FinalNorm | Role::FinalNormBias | Role::LmHead => self.last,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphOptions {
    pub target: Target,
    /// Tokens the KV cache holds.
    pub context: usize,
    /// Empty: one function with a flexible query length (1..=context). Otherwise one function
    /// per length, named `length_<N>`, sharing weights.
    pub query_lengths: Vec<usize>,
    pub attention: AttentionImpl,
    pub precision: Precision,
    /// How the linear layers and embeddings are compressed (default: not at all).
    pub compress: Policy,
    pub profile: Profile,
    /// Packages the layer stack is split into (1: one package); see [`Stage`].
    pub chunks: usize,
}

impl Default for GraphOptions {
    /// What `corelm convert` does without flags: a stateful iOS 18 package, fused attention,
    /// fp16, no compression, the default profile, one package, the default context.
    fn default() -> GraphOptions {
        GraphOptions {
            target: Target::Ios18,
            context: crate::convert::DEFAULT_CONTEXT,
            query_lengths: vec![],
            attention: AttentionImpl::Fused,
            precision: Precision::Fp16,
            compress: Policy::default(),
            profile: Profile::Default,
            chunks: 1,
        }
    }
}

impl GraphOptions {
    /// The options with the profile's requirements applied: the ane profile takes fp16 and
    /// states (iOS 18), pads the context to a multiple of 32 and, without explicit query
    /// lengths, makes a decode function (1 token) and a prefill function (64).
    pub fn resolved(&self) -> Result<GraphOptions> {
        let mut o = self.clone();
        if o.profile == Profile::Ane {
            if o.precision != Precision::Fp16 {
                return Err(Error::invalid("the ane profile computes in fp16 (drop --precision fp32)"));
            }
            if !o.target.supports_states() {
                return Err(Error::invalid("the ane profile keeps the KV cache as states: it needs --target ios18"));
            }
            o.context = o.context.next_multiple_of(32);
            if o.query_lengths.is_empty() {
                o.query_lengths = vec![1, ANE_PREFILL_CHUNK.min(o.context)];
            }
        }
        Ok(o)
    }
}

/// Slots of the ring-buffer cache the ane profile gives sliding-window layers: the window plus
/// the longest query, so writing a chunk never overwrites a key an earlier query of the same
/// chunk still sees; rounded to a multiple of 32 and of every query length, so a chunk that
/// starts at a multiple of its length never wraps around. `None`: full-length caches.
pub fn ring_slots(c: &ModelConfig, opts: &GraphOptions) -> Option<usize> {
    let window = c
        .layer_attention
        .iter()
        .filter_map(|a| match a {
            Attention::Sliding(w) => Some(*w),
            Attention::Full => None,
        })
        .max()?;
    let longest = opts.query_lengths.iter().copied().max().unwrap_or(1);
    let unit = opts.query_lengths.iter().fold(32, |u, &n| lcm(u, n));
    let slots = (window + longest).next_multiple_of(unit);
    (opts.profile == Profile::Ane && slots < opts.context).then_some(slots)
}

fn lcm(a: usize, b: usize) -> usize {
    let gcd = |mut x: usize, mut y: usize| {
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    };
    a / gcd(a, b) * b
}

/// Gemma 2/3's residual stream passes fp16's 65504 (Gemma-3-270M peaks near 104 000 on the
/// evaluation text); the ane profile keeps it in fp16 divided by this. The post-norms that feed
/// the stream absorb the factor, and the norms that read the stream are scale-invariant (their
/// epsilon is divided by its square), so only the representation changes.
fn residual_divisor(c: &ModelConfig, opts: &GraphOptions) -> f64 {
    if opts.profile == Profile::Ane && c.sandwich_norms {
        8.0
    } else {
        1.0
    }
}

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
enum Stored {
    Plain(BlobRef),
    Compressed {
        op: &'static str,
        inputs: Vec<(&'static str, BlobRef)>,
    },
    /// A matrix too tall for the Neural Engine, as blocks of at most [`ANE_MAX_DIM`] rows.
    Pieces(Vec<Stored>),
}

pub struct StoredWeights {
    tensors: HashMap<Role, Stored>,
    rope: Option<(BlobRef, BlobRef)>,
    rope_local: Option<(BlobRef, BlobRef)>,
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

fn i32s(values: &[i32]) -> Arg<'static> {
    Arg::Tensor(Tensor::from_i32(vec![values.len()], values).expect("sizes agree"))
}

fn scalar_i32(v: i32) -> Arg<'static> {
    Arg::Tensor(Tensor::scalar_i32(v))
}

/// Graph-building helpers over one function.
struct Graph<'a, 'w> {
    f: FunctionBuilder<'w>,
    c: &'a ModelConfig,
    w: &'a StoredWeights,
    weights: HashMap<Role, Vec<Var>>,
    /// Neural Engine form: fp16 norms.
    ane: bool,
    /// What the residual stream is divided by (see [`residual_divisor`]).
    residual_divisor: f64,
    /// The Neural Engine norms' epsilon pairs, by shape, axis and value (see `ane_norm`).
    epsilon_pairs: HashMap<(Vec<usize>, usize, u64), Var>,
}

impl Graph<'_, '_> {
    fn op(&mut self, ty: &str, name: &str, args: Vec<(&str, Arg)>) -> Result<Var> {
        self.f.op1(ty, name, args)
    }

    fn float(&self, dtype: DType, v: f64) -> Arg<'static> {
        Arg::Tensor(Tensor::from_floats(dtype, vec![], &[v]).expect("scalar"))
    }

    /// A weight as its blocks of rows (one, unless the ane profile split it).
    fn pieces(&mut self, role: Role) -> Result<Option<Vec<Var>>> {
        if let Some(v) = self.weights.get(&role) {
            return Ok(Some(v.clone()));
        }
        let Some(stored) = self.w.tensors.get(&role) else { return Ok(None) };
        let name = match role {
            Role::Layer(l, r) => format!("layers_{l}_{r:?}"),
            other => format!("{other:?}"),
        }
        .to_lowercase();
        let vars = match stored {
            Stored::Pieces(parts) => {
                let mut vars = Vec::new();
                for (i, part) in parts.iter().enumerate() {
                    vars.push(self.materialize(&format!("{name}_{i}"), part)?);
                }
                vars
            }
            one => vec![self.materialize(&name, one)?],
        };
        self.weights.insert(role, vars.clone());
        Ok(Some(vars))
    }

    fn materialize(&mut self, name: &str, stored: &Stored) -> Result<Var> {
        match stored {
            Stored::Plain(blob) => Ok(self.f.weight(name, blob)),
            Stored::Compressed { op, inputs } => {
                self.f.op1(op, name, inputs.iter().map(|(param, blob)| (*param, Arg::Blob(blob))).collect())
            }
            Stored::Pieces(_) => Err(Error::invalid(format!("{name}: pieces inside pieces"))),
        }
    }

    fn weight(&mut self, role: Role) -> Result<Option<Var>> {
        match self.pieces(role)? {
            None => Ok(None),
            Some(v) if v.len() == 1 => Ok(v.into_iter().next()),
            Some(_) => Err(Error::invalid(format!("{role:?} is split in blocks of rows; it is read piece by piece"))),
        }
    }

    fn required(&mut self, role: Role) -> Result<Var> {
        self.weight(role)?.ok_or_else(|| Error::invalid(format!("weight for {role:?} was not loaded")))
    }

    fn cast(&mut self, x: &Var, to: DType, name: &str) -> Result<Var> {
        if x.dtype() == to {
            return Ok(x.clone());
        }
        self.op("cast", name, vec![("x", x.into()), ("dtype", Arg::Tensor(Tensor::scalar_string(to.name())))])
    }

    fn mul_s(&mut self, x: &Var, s: f64, name: &str) -> Result<Var> {
        let y = self.float(x.dtype(), s);
        self.op("mul", name, vec![("x", x.into()), ("y", y)])
    }

    /// A norm over the last axis, computed in fp32 (in fp16 for the Neural Engine); the result
    /// is cast to `out`. `of_residual`: `x` is the residual stream, divided by the profile's
    /// divisor, which the epsilon follows.
    fn norm(
        &mut self,
        x: &Var,
        weight: Role,
        bias: Option<Role>,
        out: DType,
        of_residual: bool,
        name: &str,
    ) -> Result<Var> {
        if self.ane {
            return self.ane_norm(x, weight, bias, of_residual, name);
        }
        let w = self.required(weight)?;
        let x32 = self.cast(x, DType::Fp32, &format!("{name}_in"))?;
        let y = match self.c.norm {
            Norm::Rms { eps, .. } => {
                let sq = self.op("mul", &format!("{name}_sq"), vec![("x", (&x32).into()), ("y", (&x32).into())])?;
                let ms = self.op(
                    "reduce_mean",
                    &format!("{name}_ms"),
                    vec![
                        ("x", (&sq).into()),
                        ("axes", i32s(&[-1])),
                        ("keep_dims", Arg::Tensor(Tensor::scalar_bool(true))),
                    ],
                )?;
                let r = self.op(
                    "rsqrt",
                    &format!("{name}_r"),
                    vec![("x", (&ms).into()), ("epsilon", self.float(DType::Fp32, eps))],
                )?;
                let n = self.op("mul", &format!("{name}_n"), vec![("x", (&x32).into()), ("y", (&r).into())])?;
                self.op("mul", &format!("{name}_w"), vec![("x", (&n).into()), ("y", (&w).into())])?
            }
            Norm::Layer { eps } => self.layer_norm(&x32, -1, Some((weight, bias)), eps, &format!("{name}_ln"))?,
        };
        self.cast(&y, out, name)
    }

    /// The Neural Engine form of a norm, all fp16. RMSNorm is a layer_norm over `[x, −x]`
    /// (mean zero by construction, so its variance is mean(x²)): the sum of squares happens
    /// inside one op, where fp16 squares cannot overflow (the form ANEMLL uses).
    ///
    /// The epsilon travels as data, not as layer_norm's fp16 `epsilon`: the norms of Gemma's
    /// residual stream, divided by 8, need eps/64 = 1.6e-8 for eps 1e-6, which fp16 (smallest
    /// subnormal 6e-8) rounds to 0, and a row of zeros (a pad token's zero embedding; the
    /// runtime pads every partial chunk with id 0) then normalizes to 0/0 = NaN, which the
    /// cache hands to every later query. Two more entries, +c and −c with c = √(n·eps) for n
    /// entries of x, make layer_norm's variance (Σx² + n·eps)/(n + 1): that of RMSNorm times
    /// n/(n + 1), which the stored gain undoes ([`ane_rms_width`]). c is an fp16 normal
    /// (≥ 6.1e-5) whenever n·eps ≥ 3.8e-9: Gemma-3-270M's residual norms have
    /// c = √(640 · 1e-6/64) = 3.2e-3, the tiny fixtures' 1e-3.
    ///
    /// Hidden states are channels-first, (1, C, 1, S), so those norms run over axis 1; the
    /// q/k norms over the head dimension of (1, heads, S, head_dim), the last.
    fn ane_norm(&mut self, x: &Var, weight: Role, bias: Option<Role>, of_residual: bool, name: &str) -> Result<Var> {
        let per_head = matches!(weight, Role::Layer(_, LayerRole::QNorm | LayerRole::KNorm));
        let axis = if per_head { -1 } else { 1 };
        let scale = if of_residual { self.residual_divisor.powi(2) } else { 1.0 };
        match self.c.norm {
            Norm::Rms { eps, .. } => {
                let mut w = self.required(weight)?;
                if !per_head {
                    // (C,) → (C, 1, 1), to scale the channels of (1, C, 1, S).
                    let axes = i32s(&[1, 2]);
                    w = self.op("expand_dims", &format!("{name}_w"), vec![("x", (&w).into()), ("axes", axes)])?;
                }
                let (pair, n) = self.epsilon_pair(x, axis, eps / scale)?;
                let neg = self.mul_s(x, -1.0, &format!("{name}_neg"))?;
                let both = self.op(
                    "concat",
                    &format!("{name}_pm"),
                    vec![("values", Arg::Tuple(vec![x, &neg, &pair])), ("axis", scalar_i32(axis))],
                )?;
                let ln = self.layer_norm(&both, axis, None, 0.0, &format!("{name}_ln"))?;
                let halves = self.f.op(
                    "split",
                    &format!("{name}_half"),
                    vec![
                        ("x", (&ln).into()),
                        ("split_sizes", i32s(&[n as i32, n as i32 + 2])),
                        ("axis", scalar_i32(axis)),
                    ],
                )?;
                self.op("mul", name, vec![("x", (&halves[0]).into()), ("y", (&w).into())])
            }
            Norm::Layer { eps } => self.layer_norm(x, axis, Some((weight, bias)), eps / scale, name),
        }
    }

    /// The constant `[c, −c]` along `axis`, shaped like `x` along the other axes, where
    /// c = √(n·eps) for the n entries of `x` along `axis` (see [`Graph::ane_norm`]); and n. One
    /// constant per shape and value in a function.
    fn epsilon_pair(&mut self, x: &Var, axis: i32, eps: f64) -> Result<(Var, usize)> {
        let name = x.name().to_string();
        let mut shape =
            x.ty().shape().ok_or_else(|| Error::invalid(format!("{name}: the ane profile needs fixed shapes")))?;
        let ax = if axis < 0 { shape.len() as i32 + axis } else { axis } as usize;
        let n = shape[ax];
        let c = f16::from_f64((n as f64 * eps).sqrt());
        shape[ax] = 2;
        let key = (shape.clone(), ax, c.to_bits() as u64);
        if let Some(v) = self.epsilon_pairs.get(&key) {
            return Ok((v.clone(), n));
        }
        let (outer, inner): (usize, usize) = (shape[..ax].iter().product(), shape[ax + 1..].iter().product());
        let mut data = Vec::with_capacity(outer * 2 * inner);
        for _ in 0..outer {
            data.extend(std::iter::repeat_n(c.to_f64(), inner));
            data.extend(std::iter::repeat_n(-c.to_f64(), inner));
        }
        let v = self.f.constant(
            &format!("norm_eps_{}", self.epsilon_pairs.len()),
            Tensor::from_floats(DType::Fp16, shape, &data)?,
        )?;
        self.epsilon_pairs.insert(key, v.clone());
        Ok((v, n))
    }

    /// `layer_norm` over `axis`, scaled and shifted by the (weight, bias) roles when given
    /// (they keep the normalized axis's (C,) shape).
    fn layer_norm(
        &mut self,
        x: &Var,
        axis: i32,
        affine: Option<(Role, Option<Role>)>,
        eps: f64,
        name: &str,
    ) -> Result<Var> {
        let eps = self.float(x.dtype(), eps);
        let mut args = vec![("x", Arg::Var(x)), ("axes", i32s(&[axis]))];
        let (gamma, beta);
        if let Some((weight, bias)) = affine {
            gamma = self.required(weight)?;
            beta = self.required(bias.ok_or_else(|| Error::invalid("layer norm without a bias weight"))?)?;
            args.extend([("gamma", Arg::Var(&gamma)), ("beta", Arg::Var(&beta))]);
        }
        args.push(("epsilon", eps));
        self.op("layer_norm", name, args)
    }

    /// Token embeddings, in the residual stream's dtype and scale. A table split in blocks of
    /// rows is read block by block, each id taken from the last block that starts at or below it.
    fn embed(&mut self, ids: &Var, query: &Var, compute: DType, residual: DType, divisor: f64) -> Result<Var> {
        let c = self.c;
        let tables = self.pieces(Role::Embed)?.ok_or_else(|| Error::invalid("no embedding weight"))?;
        let mut x: Option<Var> = None;
        for (i, table) in tables.iter().enumerate() {
            let tag = if tables.len() == 1 { "embed".to_string() } else { format!("embed{i}") };
            // Ids outside this block are clamped into it (Core ML leaves out-of-range gathers
            // undefined), then replaced by the block that holds them.
            let local = if tables.len() == 1 {
                ids.clone()
            } else {
                let first = (i * ANE_MAX_DIM) as i32;
                let rows = table.ty().dims[0].fixed().expect("weights have fixed shapes") as i32;
                let shifted =
                    self.op("sub", &format!("{tag}_local"), vec![("x", ids.into()), ("y", scalar_i32(first))])?;
                let lo =
                    self.op("maximum", &format!("{tag}_lo"), vec![("x", (&shifted).into()), ("y", scalar_i32(0))])?;
                self.op("minimum", &format!("{tag}_hi"), vec![("x", (&lo).into()), ("y", scalar_i32(rows - 1))])?
            };
            let rows = self.op(
                "gather",
                &format!("{tag}_rows"),
                vec![("x", table.into()), ("indices", (&local).into()), ("axis", scalar_i32(0))],
            )?;
            x = Some(match x {
                None => rows,
                Some(below) => {
                    let first = (i * ANE_MAX_DIM) as i32;
                    let here = self.op(
                        "greater_equal",
                        &format!("{tag}_here"),
                        vec![("x", ids.into()), ("y", scalar_i32(first))],
                    )?;
                    let here = self.op(
                        "expand_dims",
                        &format!("{tag}_cond"),
                        vec![("x", (&here).into()), ("axes", i32s(&[-1]))],
                    )?;
                    self.op(
                        "select",
                        &format!("{tag}_sel"),
                        vec![("cond", (&here).into()), ("a", (&rows).into()), ("b", (&below).into())],
                    )?
                }
            });
        }
        let mut x = x.expect("at least one embedding block");
        if let Some(pos_table) = self.weight(Role::PositionEmbed)? {
            let pe = self.op(
                "gather",
                "pos_embed",
                vec![("x", (&pos_table).into()), ("indices", query.into()), ("axis", scalar_i32(0))],
            )?;
            x = self.op("add", "embed_sum", vec![("x", (&x).into()), ("y", (&pe).into())])?;
        }
        x = self.cast(&x, residual, "embed_res")?;
        if c.embedding_scale.is_some() || divisor != 1.0 {
            // Hugging Face rounds the multiplier to the activation dtype first.
            let s =
                c.embedding_scale.map_or(1.0, |s| if compute == DType::Fp16 { f16::from_f64(s).to_f64() } else { s });
            x = self.mul_s(&x, s / divisor, "embed_scaled")?;
        }
        Ok(x)
    }

    fn linear(&mut self, x: &Var, weight: Role, bias: Option<Role>, name: &str) -> Result<Var> {
        let w = self.required(weight)?;
        let b = match bias {
            Some(b) => self.weight(b)?,
            None => None,
        };
        self.project(x, &w, b.as_ref(), name)
    }

    /// `x·wᵀ + b`: a `linear` op, or for the Neural Engine a 1×1 `conv` over channels-first
    /// (1, C, 1, S) activations, the weight viewed as (out, in, 1, 1).
    fn project(&mut self, x: &Var, w: &Var, b: Option<&Var>, name: &str) -> Result<Var> {
        let mut args = vec![("x", Arg::Var(x))];
        let w4;
        if self.ane {
            w4 = self.op("expand_dims", &format!("{name}_w"), vec![("x", w.into()), ("axes", i32s(&[2, 3]))])?;
            args.push(("weight", Arg::Var(&w4)));
        } else {
            args.push(("weight", Arg::Var(w)));
        }
        if let Some(b) = b {
            args.push(("bias", Arg::Var(b)));
        }
        self.f.op1(if self.ane { "conv" } else { "linear" }, name, args)
    }

    /// (1, S, C) ↔ (1, C, 1, S), the Neural Engine's channels-first layout.
    fn channels_first(&mut self, x: &Var, name: &str) -> Result<Var> {
        let t = self.op("transpose", &format!("{name}_t"), vec![("x", x.into()), ("perm", i32s(&[0, 2, 1]))])?;
        self.op("expand_dims", name, vec![("x", (&t).into()), ("axes", i32s(&[2]))])
    }

    fn tokens_first(&mut self, x: &Var, name: &str) -> Result<Var> {
        let t = self.op("squeeze", &format!("{name}_sq"), vec![("x", x.into()), ("axes", i32s(&[2]))])?;
        self.op("transpose", name, vec![("x", (&t).into()), ("perm", i32s(&[0, 2, 1]))])
    }

    fn activation(&mut self, x: &Var, name: &str) -> Result<Var> {
        match self.c.activation {
            Activation::Silu => self.op("silu", name, vec![("x", x.into())]),
            Activation::GeluTanh => self.op(
                "gelu",
                name,
                vec![("x", x.into()), ("mode", Arg::Tensor(Tensor::scalar_string("TANH_APPROXIMATION")))],
            ),
            Activation::Gelu => {
                self.op("gelu", name, vec![("x", x.into()), ("mode", Arg::Tensor(Tensor::scalar_string("EXACT")))])
            }
        }
    }

    /// (1, N, heads·head_dim), or channels-first (1, heads·head_dim, 1, N) → (1, heads, N, head_dim).
    fn split_heads(&mut self, x: &Var, heads: usize, name: &str) -> Result<Var> {
        let hd = self.c.head_dim as i32;
        let (shape, perm) = if self.ane {
            ([1, heads as i32, hd, -1], [0, 1, 3, 2])
        } else {
            ([1, -1, heads as i32, hd], [0, 2, 1, 3])
        };
        let r = self.op("reshape", &format!("{name}_r"), vec![("x", x.into()), ("shape", i32s(&shape))])?;
        self.op("transpose", name, vec![("x", (&r).into()), ("perm", i32s(&perm))])
    }

    /// x·cos + swap_halves(x)·sin over the rotated part of the head dimension.
    fn apply_rope(&mut self, x: &Var, cos: &Var, sin: &Var, name: &str) -> Result<Var> {
        let hd = self.c.head_dim;
        let rd = cos.ty().dims[3].fixed().expect("tables have fixed width");
        let (rot, pass) = if rd < hd {
            let parts = self.f.op(
                "split",
                &format!("{name}_part"),
                vec![("x", x.into()), ("split_sizes", i32s(&[rd as i32, (hd - rd) as i32])), ("axis", scalar_i32(-1))],
            )?;
            (parts[0].clone(), Some(parts[1].clone()))
        } else {
            (x.clone(), None)
        };
        let halves = self.f.op(
            "split",
            &format!("{name}_half"),
            vec![("x", (&rot).into()), ("num_splits", scalar_i32(2)), ("axis", scalar_i32(-1))],
        )?;
        let swapped = self.op(
            "concat",
            &format!("{name}_swap"),
            vec![("values", Arg::Tuple(vec![&halves[1], &halves[0]])), ("axis", scalar_i32(-1))],
        )?;
        let a = self.op("mul", &format!("{name}_cos"), vec![("x", (&rot).into()), ("y", cos.into())])?;
        let b = self.op("mul", &format!("{name}_sin"), vec![("x", (&swapped).into()), ("y", sin.into())])?;
        let y = self.op("add", &format!("{name}_rot"), vec![("x", (&a).into()), ("y", (&b).into())])?;
        match pass {
            Some(p) => self.op("concat", name, vec![("values", Arg::Tuple(vec![&y, &p])), ("axis", scalar_i32(-1))]),
            None => Ok(y),
        }
    }
}

/// Where this call writes into the cache and which positions it covers.
struct Positions {
    /// int32 [1]: first position written (end − N).
    start: Var,
    /// int32 [1]: one past the last position (the mask's last dimension).
    end: Var,
    /// int32 [N]: the positions of the query tokens.
    query: Var,
    /// int32 [1]: how many cache positions attention reads (`end`, or the whole context when
    /// shapes are fixed and the mask hides what is not yet written).
    key_end: Var,
}

/// Builds one function; `query_len` `None` means a flexible query length.
pub fn build_function(
    name: &str,
    c: &ModelConfig,
    weights: &StoredWeights,
    opts: &GraphOptions,
    store: &mut WeightStore,
    query_len: Option<usize>,
    stage: &Stage,
) -> Result<(Function, FunctionDescription)> {
    let dt = opts.precision.dtype();
    let ane = opts.profile == Profile::Ane;
    // Gemma's residual stream passes fp16's 65504, so it stays fp32 (field notes, item 6),
    // except on the Neural Engine, where it is scaled down instead.
    let residual = if c.family.is_gemma() && !ane { DType::Fp32 } else { dt };
    let divisor = residual_divisor(c, opts);
    let f = FunctionBuilder::new(name, opts.target, store)?;
    let mut g = Graph {
        f,
        c,
        w: weights,
        weights: HashMap::new(),
        ane,
        residual_divisor: divisor,
        epsilon_pairs: HashMap::new(),
    };
    let ctx = opts.context;
    let (ids_shape, mask_shape) = match query_len {
        None => (
            InputShape::Range { default: vec![1, 1], ranges: vec![(1, Some(1)), (1, Some(ctx))] },
            InputShape::Range {
                default: vec![1, 1, 1, 1],
                ranges: vec![(1, Some(1)), (1, Some(1)), (1, Some(ctx)), (1, Some(ctx))],
            },
        ),
        Some(n) => (InputShape::Fixed(vec![1, n]), InputShape::Fixed(vec![1, 1, n, ctx])),
    };
    // The first stage reads token ids; later ones the hidden states the one before returned.
    let tokens = if stage.first {
        g.f.input(names::INPUT_IDS, DType::Int32, ids_shape)?
    } else {
        let shape = match ids_shape {
            InputShape::Range { mut default, mut ranges } => {
                default.push(c.hidden_size);
                ranges.push((c.hidden_size, Some(c.hidden_size)));
                InputShape::Range { default, ranges }
            }
            InputShape::Fixed(mut dims) => {
                dims.push(c.hidden_size);
                InputShape::Fixed(dims)
            }
            other => other,
        };
        g.f.input(names::HIDDEN_STATES, residual, shape)?
    };
    let mask = g.f.input(names::CAUSAL_MASK, dt, mask_shape)?;
    // Sliding-window layers of the ane profile keep a ring buffer of `ring` slots; every other
    // layer a full-length cache. Each layer's index within its cache:
    let ring = ring_slots(c, opts);
    let in_ring = |l: usize| ring.is_some() && matches!(c.layer_attention[l], Attention::Sliding(_));
    let mut cache_index = Vec::with_capacity(stage.layers.len());
    let (mut full_layers, mut ring_layers) = (0, 0);
    for l in stage.layers.clone() {
        let counter = if in_ring(l) { &mut ring_layers } else { &mut full_layers };
        cache_index.push(*counter);
        *counter += 1;
    }
    let cache_shape = [full_layers, 1, c.num_kv_heads, ctx, c.head_dim];
    // iOS 18 keeps the caches as states; older targets pass them in and return them updated.
    let stateful = opts.target.supports_states();
    // States are fp16 only, so fp32 compute keeps each cache as an fp16 pair (value, residual):
    // 22 significant bits, enough that the cache adds no error beyond fp32 arithmetic. Tensor
    // caches (inputs/outputs) simply take the compute dtype.
    let split_cache = stateful && dt == DType::Fp32;
    let mut caches: Vec<Vec<Var>> = Vec::new();
    let mut ring_caches: Vec<Vec<Var>> = Vec::new();
    for name in [names::KEY_CACHE, names::VALUE_CACHE] {
        if let Some(slots) = ring.filter(|_| ring_layers > 0) {
            let shape = [ring_layers, 1, c.num_kv_heads, slots, c.head_dim];
            ring_caches.push(vec![g.f.state(&format!("{name}Local"), &shape)?]);
        }
        caches.push(if full_layers == 0 {
            vec![]
        } else if !stateful {
            vec![g.f.input(name, dt, InputShape::Fixed(cache_shape.to_vec()))?]
        } else if split_cache {
            vec![g.f.state(name, &cache_shape)?, g.f.state(&format!("{name}Residual"), &cache_shape)?]
        } else {
            vec![g.f.state(name, &cache_shape)?]
        });
    }
    let mut updated_layers: [Vec<Var>; 2] = [Vec::new(), Vec::new()];

    // Positions: end = mask.shape[3], start = end − N (flexible), or a `position` input (fixed).
    let positions = match query_len {
        None => {
            let ids_shape = g.op("shape", "ids_shape", vec![("x", (&tokens).into())])?;
            let n = g.op(
                "slice_by_index",
                "query_len",
                vec![("x", (&ids_shape).into()), ("begin", i32s(&[1])), ("end", i32s(&[2]))],
            )?;
            let mshape = g.op("shape", "mask_shape", vec![("x", (&mask).into())])?;
            let end = g.op(
                "slice_by_index",
                "end_pos",
                vec![("x", (&mshape).into()), ("begin", i32s(&[3])), ("end", i32s(&[4]))],
            )?;
            let start = g.op("sub", "start_pos", vec![("x", (&end).into()), ("y", (&n).into())])?;
            let s0 = g.op("squeeze", "start_scalar", vec![("x", (&start).into()), ("axes", i32s(&[0]))])?;
            let e0 = g.op("squeeze", "end_scalar", vec![("x", (&end).into()), ("axes", i32s(&[0]))])?;
            let query = g.op(
                "range_1d",
                "positions",
                vec![("end", (&e0).into()), ("start", (&s0).into()), ("step", scalar_i32(1))],
            )?;
            Positions { start, key_end: end.clone(), end, query }
        }
        Some(n) => {
            let start = g.f.input(names::POSITION, DType::Int32, InputShape::Fixed(vec![1]))?;
            let end = g.op("add", "end_pos", vec![("x", (&start).into()), ("y", i32s(&[n as i32]))])?;
            let steps = g.f.constant("steps", Tensor::from_i32(vec![n], &(0..n as i32).collect::<Vec<_>>())?)?;
            let query = g.op("add", "positions", vec![("x", (&steps).into()), ("y", (&start).into())])?;
            let key_end = g.f.constant("context_len", Tensor::from_i32(vec![1], &[ctx as i32])?)?;
            Positions { start, end, query, key_end }
        }
    };

    let mut x = if stage.first { g.embed(&tokens, &positions.query, dt, residual, divisor)? } else { tokens.clone() };
    if ane {
        x = g.channels_first(&x, "hidden_channels")?;
    }

    // RoPE tables gathered at the query positions: (1, 1, N, rotary_dim).
    let mut rope_vars = Vec::new();
    for (tag, tables) in [("rope", &weights.rope), ("rope_local", &weights.rope_local)] {
        let Some((cos_blob, sin_blob)) = tables else {
            rope_vars.push(None);
            continue;
        };
        let mut pair = Vec::new();
        for (part, blob) in [("cos", cos_blob), ("sin", sin_blob)] {
            let table = g.f.weight(&format!("{tag}_{part}_table"), blob);
            let rows = g.op(
                "gather",
                &format!("{tag}_{part}_rows"),
                vec![("x", (&table).into()), ("indices", (&positions.query).into()), ("axis", scalar_i32(0))],
            )?;
            pair.push(g.op(
                "expand_dims",
                &format!("{tag}_{part}"),
                vec![("x", (&rows).into()), ("axes", i32s(&[0, 1]))],
            )?);
        }
        rope_vars.push(Some((pair[0].clone(), pair[1].clone())));
    }

    // Masks: the causal mask for full layers; for each sliding window, positions further back
    // than the window are masked too.
    let mut window_masks: HashMap<usize, Var> = HashMap::new();
    for att in c.layer_attention[stage.layers.clone()].iter().filter(|_| ring.is_none()) {
        if let Attention::Sliding(wnd) = *att {
            if window_masks.contains_key(&wnd) {
                continue;
            }
            let e0 = g.op(
                "squeeze",
                &format!("w{wnd}_end"),
                vec![("x", (&positions.key_end).into()), ("axes", i32s(&[0]))],
            )?;
            let keys = g.op(
                "range_1d",
                &format!("w{wnd}_keys"),
                vec![("end", (&e0).into()), ("start", scalar_i32(0)), ("step", scalar_i32(1))],
            )?;
            let q = g.op(
                "expand_dims",
                &format!("w{wnd}_q"),
                vec![("x", (&positions.query).into()), ("axes", i32s(&[1]))],
            )?;
            let diff = g.op("sub", &format!("w{wnd}_diff"), vec![("x", (&q).into()), ("y", (&keys).into())])?;
            let far = g.op(
                "greater_equal",
                &format!("w{wnd}_far"),
                vec![("x", (&diff).into()), ("y", scalar_i32(wnd as i32))],
            )?;
            let floor = g.float(dt, f16::MIN.to_f64());
            let m = g.op(
                "select",
                &format!("w{wnd}_mask"),
                vec![("cond", (&far).into()), ("a", floor), ("b", (&mask).into())],
            )?;
            window_masks.insert(wnd, m);
        }
    }

    // The ring: this call writes slots [start mod R, + N) (the driver starts chunks at multiples
    // of their length, so they never wrap). After the write, slot k holds the latest position
    // p ≤ end − 1 with p ≡ k (mod R); query q sees it when 0 ≤ q − p < window and p ≥ 0.
    let ring_write = match ring.filter(|_| ring_layers > 0) {
        None => None,
        Some(slots) => {
            let n = query_len.ok_or_else(|| Error::invalid("ring-buffer caches need fixed query lengths"))?;
            let window = c
                .layer_attention
                .iter()
                .filter_map(|a| match a {
                    Attention::Sliding(w) => Some(*w),
                    Attention::Full => None,
                })
                .max()
                .expect("a ring implies a sliding layer");
            let r = slots as i32;
            let first = g.op("mod", "ring_first", vec![("x", (&positions.start).into()), ("y", scalar_i32(r))])?;
            let past = g.op("add", "ring_past", vec![("x", (&first).into()), ("y", scalar_i32(n as i32))])?;
            let last = g.op("sub", "ring_last_pos", vec![("x", (&positions.end).into()), ("y", scalar_i32(1))])?;
            let ks = g.f.constant("ring_slots", Tensor::from_i32(vec![slots], &(0..r).collect::<Vec<_>>())?)?;
            let behind = g.op("sub", "ring_behind", vec![("x", (&last).into()), ("y", (&ks).into())])?;
            let behind = g.op("add", "ring_behind_pos", vec![("x", (&behind).into()), ("y", scalar_i32(r))])?;
            let behind = g.op("mod", "ring_age", vec![("x", (&behind).into()), ("y", scalar_i32(r))])?;
            let held = g.op("sub", "ring_held", vec![("x", (&last).into()), ("y", (&behind).into())])?;
            let q = g.op("expand_dims", "ring_q", vec![("x", (&positions.query).into()), ("axes", i32s(&[1]))])?;
            let age = g.op("sub", "ring_key_age", vec![("x", (&q).into()), ("y", (&held).into())])?;
            let seen = g.op("greater_equal", "ring_seen", vec![("x", (&age).into()), ("y", scalar_i32(0))])?;
            let recent = g.op("less", "ring_recent", vec![("x", (&age).into()), ("y", scalar_i32(window as i32))])?;
            let written = g.op("greater_equal", "ring_written", vec![("x", (&held).into()), ("y", scalar_i32(0))])?;
            let ok = g.op("logical_and", "ring_in_window", vec![("x", (&seen).into()), ("y", (&recent).into())])?;
            let ok = g.op("logical_and", "ring_visible", vec![("x", (&ok).into()), ("y", (&written).into())])?;
            // select takes its shape from `a` and `b` (coremltools' typing), so one is full size.
            let open = g.op("fill", "ring_open", vec![("shape", i32s(&[n as i32, r])), ("value", g.float(dt, 0.0))])?;
            let shut = g.float(dt, f16::MIN.to_f64());
            let m = g.op("select", "ring_mask_2d", vec![("cond", (&ok).into()), ("a", (&open).into()), ("b", shut)])?;
            let m = g.op("expand_dims", "ring_mask", vec![("x", (&m).into()), ("axes", i32s(&[0, 1]))])?;
            let span = g.f.constant("ring_span", Tensor::from_i32(vec![1], &[r])?)?;
            Some((first, past, m, span))
        }
    };

    // Attention reads this layer's cache rows for positions [0, key_end): the written part when
    // the query length is flexible, the whole context when shapes are fixed (the mask hides what
    // is not written yet). One slice per layer and cache, ending at (index+1, 1, kv, key_end, hd).
    let mut read_ends: HashMap<(usize, bool), Var> = HashMap::new();
    // For tensor caches: pad amounts placing this call's rows at [start, end) of the context,
    // and which context positions this call writes.
    let (positions_pad, positions_in_call) = if stateful {
        (None, None)
    } else {
        let ctx_len = g.f.constant("ctx_len", Tensor::from_i32(vec![1], &[ctx as i32])?)?;
        let after = g.op("sub", "pad_after", vec![("x", (&ctx_len).into()), ("y", (&positions.end).into())])?;
        let head = g.f.constant("pad_head", Tensor::from_i32(vec![6], &[0; 6])?)?;
        let tail = g.f.constant("pad_tail", Tensor::from_i32(vec![2], &[0; 2])?)?;
        let pads = g.op(
            "concat",
            "cache_pads",
            vec![("values", Arg::Tuple(vec![&head, &positions.start, &after, &tail])), ("axis", scalar_i32(0))],
        )?;
        let all = g.f.constant("all_positions", Tensor::from_i32(vec![ctx], &(0..ctx as i32).collect::<Vec<_>>())?)?;
        let from =
            g.op("greater_equal", "at_or_after_start", vec![("x", (&all).into()), ("y", (&positions.start).into())])?;
        let to = g.op("less", "before_end", vec![("x", (&all).into()), ("y", (&positions.end).into())])?;
        let both = g.op("logical_and", "written_now", vec![("x", (&from).into()), ("y", (&to).into())])?;
        let cond =
            g.op("reshape", "written_rows", vec![("x", (&both).into()), ("shape", i32s(&[1, 1, 1, ctx as i32, 1]))])?;
        (Some(pads), Some(cond))
    };
    let fused =
        opts.attention == AttentionImpl::Fused && c.attn_logit_softcap.is_none() && opts.target >= Target::Ios18;
    let rep = c.num_heads / c.num_kv_heads;
    // GQA without copying K/V: fold the query heads that share a KV head into the query axis,
    // and repeat the mask rows to match.
    let mut tiled_masks: HashMap<Option<usize>, Var> = HashMap::new();
    for (l, &layer_slot) in stage.layers.clone().zip(&cache_index) {
        use LayerRole::*;
        let p = format!("l{l}");
        let lr = |r| Role::Layer(l, r);
        let attn_in = g.norm(&x, lr(AttnNorm), Some(lr(AttnNormBias)), dt, true, &format!("{p}_attn_norm"))?;
        let q = g.linear(&attn_in, lr(Q), Some(lr(QBias)), &format!("{p}_q"))?;
        let k = g.linear(&attn_in, lr(K), Some(lr(KBias)), &format!("{p}_k"))?;
        let v = g.linear(&attn_in, lr(V), Some(lr(VBias)), &format!("{p}_v"))?;
        let mut q = g.split_heads(&q, c.num_heads, &format!("{p}_qh"))?;
        let mut k = g.split_heads(&k, c.num_kv_heads, &format!("{p}_kh"))?;
        let v = g.split_heads(&v, c.num_kv_heads, &format!("{p}_vh"))?;
        if c.qk_norm {
            q = g.norm(&q, lr(QNorm), None, dt, false, &format!("{p}_q_norm"))?;
            k = g.norm(&k, lr(KNorm), None, dt, false, &format!("{p}_k_norm"))?;
        }
        let window = match c.layer_attention[l] {
            Attention::Sliding(w) => Some(w),
            Attention::Full => None,
        };
        let rope = if window.is_some() && rope_vars[1].is_some() { &rope_vars[1] } else { &rope_vars[0] };
        if let Some((cos, sin)) = rope.clone() {
            q = g.apply_rope(&q, &cos, &sin, &format!("{p}_q_rope"))?;
            k = g.apply_rope(&k, &cos, &sin, &format!("{p}_k_rope"))?;
        }

        // Write this call's keys and values into the caches at [start, end), then read this
        // layer's keys and values for positions [0, key_end): (1, kv_heads, key_end, head_dim).
        let ring_layer = in_ring(l);
        let ci = layer_slot as i32;
        let (write_start, write_end) = match (&ring_write, ring_layer) {
            (Some((first, past, _, _)), true) => (first.clone(), past.clone()),
            _ => (positions.start.clone(), positions.end.clone()),
        };
        let head = g.f.constant(&format!("{p}_b0"), Tensor::from_i32(vec![3], &[ci, 0, 0])?)?;
        let zero = g.f.constant(&format!("{p}_b1"), Tensor::from_i32(vec![1], &[0])?)?;
        let begin = g.op(
            "concat",
            &format!("{p}_begin"),
            vec![("values", Arg::Tuple(vec![&head, &write_start, &zero])), ("axis", scalar_i32(0))],
        )?;
        let ehead =
            g.f.constant(&format!("{p}_e0"), Tensor::from_i32(vec![3], &[ci + 1, 1, c.num_kv_heads as i32])?)?;
        let etail = g.f.constant(&format!("{p}_e1"), Tensor::from_i32(vec![1], &[c.head_dim as i32])?)?;
        let end = g.op(
            "concat",
            &format!("{p}_end"),
            vec![("values", Arg::Tuple(vec![&ehead, &write_end, &etail])), ("axis", scalar_i32(0))],
        )?;
        let mut layer_kv = Vec::new();
        for (i, (tag, val)) in [("k", &k), ("v", &v)].into_iter().enumerate() {
            let upd = g.op("expand_dims", &format!("{p}_{tag}_upd5"), vec![("x", val.into()), ("axes", i32s(&[0]))])?;
            let cache_dtype = if stateful { DType::Fp16 } else { dt };
            let hi = g.cast(&upd, cache_dtype, &format!("{p}_{tag}_upd"))?;
            let mut parts = vec![hi.clone()];
            if split_cache {
                let back = g.cast(&hi, DType::Fp32, &format!("{p}_{tag}_upd_back"))?;
                let rest =
                    g.op("sub", &format!("{p}_{tag}_upd_rest"), vec![("x", (&upd).into()), ("y", (&back).into())])?;
                parts.push(g.cast(&rest, DType::Fp16, &format!("{p}_{tag}_upd_lo"))?);
            }
            let mut seen_parts = Vec::new();
            let layer_caches = if ring_layer { &ring_caches[i] } else { &caches[i] };
            for (part, (upd, cache)) in parts.iter().zip(layer_caches).enumerate() {
                let tag = if part == 0 { tag.to_string() } else { format!("{tag}_lo") };
                let layer_range = |g: &mut Graph, x: &Var| {
                    g.op(
                        "slice_by_index",
                        &format!("{p}_{tag}_layer5"),
                        vec![
                            ("x", x.into()),
                            ("begin", i32s(&[l as i32, 0, 0, 0, 0])),
                            ("end", i32s(&[l as i32 + 1, 1, c.num_kv_heads as i32, ctx as i32, c.head_dim as i32])),
                        ],
                    )
                };
                let layer = if stateful {
                    let old = g.op("read_state", &format!("{p}_{tag}_old"), vec![("input", cache.into())])?;
                    let new = g.op(
                        "slice_update",
                        &format!("{p}_{tag}_new"),
                        vec![
                            ("x", (&old).into()),
                            ("update", upd.into()),
                            ("begin", (&begin).into()),
                            ("end", (&end).into()),
                        ],
                    )?;
                    g.f.op(
                        "write_state",
                        &format!("{p}_{tag}_store"),
                        vec![("input", cache.into()), ("data", (&new).into())],
                    )?;
                    new
                } else {
                    // Without slice_update: pad the new rows out to the context and select them
                    // where positions fall in [start, end).
                    let old = layer_range(&mut g, cache)?;
                    let pads = positions_pad.as_ref().expect("built for tensor caches");
                    let rows =
                        g.op("pad", &format!("{p}_{tag}_rows"), vec![("x", upd.into()), ("pad", pads.into())])?;
                    let in_call = positions_in_call.as_ref().expect("built for tensor caches");
                    let merged = g.op(
                        "select",
                        &format!("{p}_{tag}_merged"),
                        vec![("cond", in_call.into()), ("a", (&rows).into()), ("b", (&old).into())],
                    )?;
                    // The runtime pad amounts hide the shape from type inference; restate it.
                    let merged = g.op(
                        "reshape",
                        &format!("{p}_{tag}_written"),
                        vec![
                            ("x", (&merged).into()),
                            ("shape", i32s(&[1, 1, c.num_kv_heads as i32, ctx as i32, c.head_dim as i32])),
                        ],
                    )?;
                    updated_layers[i].push(merged.clone());
                    merged
                };
                // The stateful cache holds every layer; a merged tensor cache row holds just this one.
                let index = if stateful { layer_slot } else { 0 };
                let read_end = match read_ends.get(&(index, ring_layer)) {
                    Some(v) => v.clone(),
                    None => {
                        let tag = if ring_layer { "ring_" } else { "" };
                        let head = g.f.constant(
                            &format!("read_end_{tag}{index}"),
                            Tensor::from_i32(vec![3], &[index as i32 + 1, 1, c.num_kv_heads as i32])?,
                        )?;
                        let tail = g.f.constant("read_end_tail", Tensor::from_i32(vec![1], &[c.head_dim as i32])?)?;
                        let key_end = match (&ring_write, ring_layer) {
                            (Some((_, _, _, span)), true) => span.clone(),
                            _ => positions.key_end.clone(),
                        };
                        let v = g.op(
                            "concat",
                            &format!("read_end_{tag}{index}_all"),
                            vec![("values", Arg::Tuple(vec![&head, &key_end, &tail])), ("axis", scalar_i32(0))],
                        )?;
                        read_ends.insert((index, ring_layer), v.clone());
                        v
                    }
                };
                let seen = g.op(
                    "slice_by_index",
                    &format!("{p}_{tag}_seen5"),
                    vec![
                        ("x", (&layer).into()),
                        ("begin", i32s(&[index as i32, 0, 0, 0, 0])),
                        ("end", (&read_end).into()),
                    ],
                )?;
                let seen = g.op(
                    "reshape",
                    &format!("{p}_{tag}_seen16"),
                    vec![("x", (&seen).into()), ("shape", i32s(&[1, c.num_kv_heads as i32, -1, c.head_dim as i32]))],
                )?;
                seen_parts.push(g.cast(&seen, dt, &format!("{p}_{tag}_seen"))?);
            }
            layer_kv.push(match seen_parts.as_slice() {
                [one] => one.clone(),
                [hi, lo] => g.op("add", &format!("{p}_{tag}_seen_sum"), vec![("x", hi.into()), ("y", lo.into())])?,
                _ => unreachable!("one or two cache parts"),
            });
        }
        let (keys, values) = (layer_kv[0].clone(), layer_kv[1].clone());

        let base_mask = match (window, &ring_write) {
            (Some(_), Some((_, _, ring_mask, _))) => ring_mask.clone(),
            (Some(w), None) => window_masks[&w].clone(),
            (None, _) => mask.clone(),
        };
        // The Neural Engine form attends head by head: each query head against its KV head
        // with the plain (1, 1, N, keys) mask, as small separate products.
        let per_head = ane && fused;
        let layer_mask = if rep > 1 && !per_head {
            match tiled_masks.get(&window) {
                Some(t) => t.clone(),
                None => {
                    let t = g.op(
                        "tile",
                        &format!("{p}_mask_rep"),
                        vec![("x", (&base_mask).into()), ("reps", i32s(&[1, 1, rep as i32, 1]))],
                    )?;
                    tiled_masks.insert(window, t.clone());
                    t
                }
            }
        } else {
            base_mask
        };
        let kvh = c.num_kv_heads as i32;
        let hd = c.head_dim as i32;
        let attn = if per_head {
            let extra = c.attention_scale * (c.head_dim as f64).sqrt();
            let qs = if (extra - 1.0).abs() > 1e-12 { g.mul_s(&q, extra, &format!("{p}_q_scaled"))? } else { q };
            let split = |g: &mut Graph, x: &Var, n: usize, name: String| -> Result<Vec<Var>> {
                if n == 1 {
                    return Ok(vec![x.clone()]);
                }
                g.f.op(
                    "split",
                    &name,
                    vec![("x", x.into()), ("num_splits", scalar_i32(n as i32)), ("axis", scalar_i32(1))],
                )
            };
            let qh = split(&mut g, &qs, c.num_heads, format!("{p}_q_head"))?;
            let kh = split(&mut g, &keys, c.num_kv_heads, format!("{p}_k_head"))?;
            let vh = split(&mut g, &values, c.num_kv_heads, format!("{p}_v_head"))?;
            let mut outs = Vec::with_capacity(c.num_heads);
            for (h, qv) in qh.iter().enumerate() {
                outs.push(g.op(
                    "scaled_dot_product_attention",
                    &format!("{p}_attn_h{h}"),
                    vec![
                        ("query", qv.into()),
                        ("key", (&kh[h / rep]).into()),
                        ("value", (&vh[h / rep]).into()),
                        ("attn_mask", (&layer_mask).into()),
                    ],
                )?);
            }
            g.op(
                "concat",
                &format!("{p}_attn"),
                vec![("values", Arg::Tuple(outs.iter().collect())), ("axis", scalar_i32(1))],
            )?
        } else if fused {
            let qg = g.op(
                "reshape",
                &format!("{p}_q_groups"),
                vec![("x", (&q).into()), ("shape", i32s(&[1, kvh, -1, hd]))],
            )?;
            // SDPA divides by √head_dim itself; fold any other scale into Q.
            let extra = c.attention_scale * (c.head_dim as f64).sqrt();
            let qs = if (extra - 1.0).abs() > 1e-12 { g.mul_s(&qg, extra, &format!("{p}_q_scaled"))? } else { qg };
            g.op(
                "scaled_dot_product_attention",
                &format!("{p}_attn"),
                vec![
                    ("query", (&qs).into()),
                    ("key", (&keys).into()),
                    ("value", (&values).into()),
                    ("attn_mask", (&layer_mask).into()),
                ],
            )?
        } else {
            let qg = g.op(
                "reshape",
                &format!("{p}_q_groups"),
                vec![("x", (&q).into()), ("shape", i32s(&[1, kvh, -1, hd]))],
            )?;
            let qs = g.mul_s(&qg, c.attention_scale, &format!("{p}_q_scaled"))?;
            let mut scores = g.op(
                "matmul",
                &format!("{p}_scores"),
                vec![
                    ("x", (&qs).into()),
                    ("y", (&keys).into()),
                    ("transpose_y", Arg::Tensor(Tensor::scalar_bool(true))),
                ],
            )?;
            if let Some(cap) = c.attn_logit_softcap {
                let s = g.mul_s(&scores, 1.0 / cap, &format!("{p}_cap_in"))?;
                let t = g.op("tanh", &format!("{p}_cap_tanh"), vec![("x", (&s).into())])?;
                scores = g.mul_s(&t, cap, &format!("{p}_capped"))?;
            }
            let masked =
                g.op("add", &format!("{p}_masked"), vec![("x", (&scores).into()), ("y", (&layer_mask).into())])?;
            let probs =
                g.op("softmax", &format!("{p}_probs"), vec![("x", (&masked).into()), ("axis", scalar_i32(-1))])?;
            g.op("matmul", &format!("{p}_attn"), vec![("x", (&probs).into()), ("y", (&values).into())])?
        };
        let heads = g.op(
            "reshape",
            &format!("{p}_attn_heads"),
            vec![("x", (&attn).into()), ("shape", i32s(&[1, c.num_heads as i32, -1, hd]))],
        )?;
        // Back to (1, N, heads·head_dim), or channels-first (1, heads·head_dim, 1, N).
        let (perm, shape) = if ane {
            ([0, 1, 3, 2], vec![1, c.num_heads as i32 * hd, 1, -1])
        } else {
            ([0, 2, 1, 3], vec![1, -1, c.num_heads as i32 * hd])
        };
        let tokens = g.op("transpose", &format!("{p}_attn_t"), vec![("x", (&heads).into()), ("perm", i32s(&perm))])?;
        let flat =
            g.op("reshape", &format!("{p}_attn_flat"), vec![("x", (&tokens).into()), ("shape", i32s(&shape))])?;
        let mut o = g.linear(&flat, lr(O), Some(lr(OBias)), &format!("{p}_o"))?;
        if c.sandwich_norms {
            o = g.norm(&o, lr(PostAttnNorm), None, residual, false, &format!("{p}_post_attn_norm"))?;
        }
        let o = g.cast(&o, residual, &format!("{p}_o_res"))?;
        x = g.op("add", &format!("{p}_h"), vec![("x", (&x).into()), ("y", (&o).into())])?;

        let mlp_in = g.norm(&x, lr(MlpNorm), Some(lr(MlpNormBias)), dt, true, &format!("{p}_mlp_norm"))?;
        let mut m = if c.gated_mlp {
            let gate = g.linear(&mlp_in, lr(Gate), None, &format!("{p}_gate"))?;
            let act = g.activation(&gate, &format!("{p}_act"))?;
            let up = g.linear(&mlp_in, lr(Up), None, &format!("{p}_up"))?;
            let prod = g.op("mul", &format!("{p}_gated"), vec![("x", (&act).into()), ("y", (&up).into())])?;
            g.linear(&prod, lr(Down), Some(lr(DownBias)), &format!("{p}_down"))?
        } else {
            let up = g.linear(&mlp_in, lr(Up), Some(lr(UpBias)), &format!("{p}_up"))?;
            let act = g.activation(&up, &format!("{p}_act"))?;
            g.linear(&act, lr(Down), Some(lr(DownBias)), &format!("{p}_down"))?
        };
        if c.sandwich_norms {
            m = g.norm(&m, lr(PostMlpNorm), None, residual, false, &format!("{p}_post_mlp_norm"))?;
        }
        let m = g.cast(&m, residual, &format!("{p}_mlp_res"))?;
        x = g.op("add", &format!("{p}_out"), vec![("x", (&x).into()), ("y", (&m).into())])?;
    }

    if !stage.last {
        let out = if ane { g.tokens_first(&x, "next_hidden")? } else { x };
        g.f.output(&out, names::NEXT_HIDDEN_STATES)?;
        return g.f.finish();
    }
    let h = g.norm(&x, Role::FinalNorm, Some(Role::FinalNormBias), dt, true, "final_norm")?;
    // A split LM head gives one output per block of rows, `logits_0`, `logits_1`, ... (joining
    // them would make a tensor too wide for the Neural Engine), which the runtime joins, and the
    // greedy token of each position as `argmax` (1, N), taken in the graph across the blocks.
    let heads = g.pieces(Role::LmHead)?.ok_or_else(|| Error::invalid("no LM head weight"))?;
    let mut best: Option<(Var, Var)> = None;
    for (i, head) in heads.iter().enumerate() {
        let out = if heads.len() == 1 { names::LOGITS.to_string() } else { names::logits_block(i) };
        // Logits are (1, N, vocab) in every layout.
        let name = if c.final_logit_softcap.is_none() { out.clone() } else { format!("{out}_raw") };
        let projected = if ane {
            let ch = g.project(&h, head, None, &format!("{out}_channels"))?;
            g.tokens_first(&ch, &name)?
        } else {
            g.project(&h, head, None, &name)?
        };
        let logits = match c.final_logit_softcap {
            None => projected,
            Some(cap) => {
                let raw = projected;
                let s = g.mul_s(&raw, 1.0 / cap, &format!("{out}_cap_in"))?;
                let t = g.op("tanh", &format!("{out}_cap_tanh"), vec![("x", (&s).into())])?;
                g.mul_s(&t, cap, &out)?
            }
        };
        g.f.output(&logits, &out)?;
        if heads.len() > 1 {
            let top = g.op(
                "reduce_max",
                &format!("{out}_max"),
                vec![
                    ("x", (&logits).into()),
                    ("axes", i32s(&[-1])),
                    ("keep_dims", Arg::Tensor(Tensor::scalar_bool(false))),
                ],
            )?;
            let at = g.op(
                "reduce_argmax",
                &format!("{out}_at"),
                vec![
                    ("x", (&logits).into()),
                    ("axis", scalar_i32(-1)),
                    ("keep_dims", Arg::Tensor(Tensor::scalar_bool(false))),
                ],
            )?;
            let at = g.op(
                "add",
                &format!("{out}_token"),
                vec![("x", (&at).into()), ("y", scalar_i32((i * ANE_MAX_DIM) as i32))],
            )?;
            best = Some(match best {
                None => (top, at),
                // Strictly greater: on a tie the lower token id wins, as in a joined argmax.
                Some((best_top, best_at)) => {
                    let wins =
                        g.op("greater", &format!("{out}_wins"), vec![("x", (&top).into()), ("y", (&best_top).into())])?;
                    let last = i + 1 == heads.len();
                    let at_name = if last { names::ARGMAX.to_string() } else { format!("{out}_best_token") };
                    let at = g.op(
                        "select",
                        &at_name,
                        vec![("cond", (&wins).into()), ("a", (&at).into()), ("b", (&best_at).into())],
                    )?;
                    let top = if last {
                        top
                    } else {
                        g.op(
                            "select",
                            &format!("{out}_best_max"),
                            vec![("cond", (&wins).into()), ("a", (&top).into()), ("b", (&best_top).into())],
                        )?
                    };
                    (top, at)
                }
            });
        }
    }
    if let Some((_, argmax)) = best {
        g.f.output(&argmax, names::ARGMAX)?;
    }
    for (input, layers) in [(names::KEY_CACHE, &updated_layers[0]), (names::VALUE_CACHE, &updated_layers[1])] {
        if layers.is_empty() {
            continue;
        }
        let name = &names::carried_output(input);
        let all =
            g.op("concat", name, vec![("values", Arg::Tuple(layers.iter().collect())), ("axis", scalar_i32(0))])?;
        g.f.output(&all, name)?;
    }
    g.f.finish()
}
