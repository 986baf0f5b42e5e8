//! The decoder-only transformer as an ML Program: one graph, parameterised by the model
//! configuration, covering every supported family.
//!
//! Interface (stateful, iOS 18): inputs `inputIds` int32 (1, N) and `causalMask` (1, 1, N, end);
//! the write position is end − N; states `keyCache`/`valueCache` (layers, 1, kv_heads, context,
//! head_dim) fp16; output `logits` (1, N, vocab). Fixed query lengths become functions of one
//! multifunction model sharing the weights; those take fixed shapes throughout (the mask is
//! (1, 1, N, context)) and an extra `position` input.

mod altup;
mod attention;
mod cache;
mod emitter;
mod grids;
mod head;
mod inputs;
mod layer;
mod masks;
mod norms;
mod per_layer;
mod recurrent;
mod weights;

pub use grids::{GridCarry, GridType, SourceGrid};
pub use weights::{roles, store_weights, Progress, StoredWeights};

use crate::arch::Role;
use crate::compress::Policy;
use crate::config::{Attention, ModelConfig};
use crate::{Error, Result};
use attention::AttentionForm;
use cache::KvCache;
use corelm_contract::names;
use corelm_format::mil::program::Function;
use corelm_format::model::FunctionDescription;
use corelm_format::weights::WeightStore;
use corelm_format::{DType, FunctionBuilder, Target};
use emitter::Graph;
use inputs::{Inputs, Positions, RopeRows};
use layer::LayerContext;
use masks::Masks;
use per_layer::PerLayerInputs;

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
    /// `parts` stages of consecutive layers whose sizes differ by at most one, except that a
    /// layer reusing another's keys and values stays in its source's stage (states do not cross
    /// packages): a boundary between them moves back to the source.
    pub fn split(c: &ModelConfig, parts: usize) -> Result<Vec<Stage>> {
        let layers = c.num_layers;
        let mut bounds: Vec<usize> = (0..=parts).map(|i| i * layers / parts).collect();
        for bound in bounds.iter_mut().take(parts).skip(1) {
            let reaching_back = (*bound..layers).filter_map(|l| c.layer(l).kv_from).filter(|&s| s < *bound).min();
            if let Some(source) = reaching_back {
                *bound = source;
            }
        }
        if bounds.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid(format!(
                "the model cannot be split into {parts} parts: its later layers reuse the keys and values of \
                 earlier ones, which must stay in one part (fewer --chunks)"
            )));
        }
        Ok((0..parts)
            .map(|i| Stage { layers: bounds[i]..bounds[i + 1], first: i == 0, last: i + 1 == parts })
            .collect())
    }

    /// Channels of the hidden states this stage takes from the one before (`at` its first
    /// layer) or hands to the next (`at` the next stage's first layer): each AltUp stream, then
    /// the per-layer inputs of the layers from `at` on.
    pub fn carried_width(c: &ModelConfig, at: usize) -> usize {
        let streams = c.altup.map_or(1, |a| a.inputs);
        streams * c.hidden_size + c.per_layer_inputs.map_or(0, |p| (c.num_layers - at) * p.width)
    }

    /// Whether this stage reads the weight.
    pub fn holds(&self, role: Role) -> bool {
        match role {
            Role::Embed
            | Role::PositionEmbed
            | Role::PerLayerEmbed
            | Role::PerLayerProjection
            | Role::PerLayerProjectionNorm
            | Role::AltUpProjection(_) => self.first,
            Role::Layer(l, _) => self.layers.contains(&l),
            Role::FinalNorm | Role::FinalNormBias | Role::LmHead | Role::AltUpUnembed(_) => self.last,
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
    let window = widest_window(c)?;
    let longest = opts.query_lengths.iter().copied().max().unwrap_or(1);
    let unit = opts.query_lengths.iter().fold(32, |u, &n| lcm(u, n));
    let slots = (window + longest).next_multiple_of(unit);
    (opts.profile == Profile::Ane && slots < opts.context).then_some(slots)
}

/// The widest sliding window of any layer; `None` when no layer slides.
fn widest_window(c: &ModelConfig) -> Option<usize> {
    c.layer_attention
        .iter()
        .filter_map(|a| match a {
            Attention::Sliding(w) => Some(*w),
            Attention::Full => None,
        })
        .max()
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
pub(super) fn residual_divisor(c: &ModelConfig, opts: &GraphOptions) -> f64 {
    if opts.profile == Profile::Ane && c.block_norms == crate::config::BlockNorms::Sandwich {
        8.0
    } else {
        1.0
    }
}

/// Builds one function; `query_len` `None` means a flexible query length. The parts, in the
/// order their ops are emitted: inputs, caches, positions, embedding, RoPE rows, masks, the
/// cache writes' shared values, the layers, then the head (or the hidden states for the next
/// stage).
pub fn build_function(
    name: &str,
    c: &ModelConfig,
    weights: &StoredWeights,
    opts: &GraphOptions,
    store: &mut WeightStore,
    query_len: Option<usize>,
    stage: &Stage,
) -> Result<(Function, FunctionDescription)> {
    let compute = opts.precision.dtype();
    let ane = opts.profile == Profile::Ane;
    // Gemma's residual stream passes fp16's 65504, so it stays fp32 (field notes, item 6),
    // except on the Neural Engine, where it is scaled down instead.
    let residual = if c.family.is_gemma() && !ane { DType::Fp32 } else { compute };
    let divisor = residual_divisor(c, opts);
    let mut g = Graph::new(FunctionBuilder::new(name, opts.target, store)?, c, weights, ane, divisor);
    let inputs = Inputs::declare(&mut g, opts.context, query_len, stage, residual, compute)?;
    let mut kv = KvCache::declare(&mut g, c, opts, stage)?;
    kv.recurrent = recurrent::RecurrentStates::declare(&mut g, c, opts, stage)?;
    let positions = Positions::new(&mut g, &inputs, query_len, opts.context)?;
    let mut x = if stage.first {
        g.embed(&inputs.tokens, &positions.query, compute, residual, divisor)?
    } else {
        inputs.tokens.clone()
    };
    if ane {
        x = g.channels_first(&x, "hidden_channels")?;
    }
    // A later stage's hidden states carry the AltUp streams and the per-layer inputs too.
    let (carried_streams, per_layer) = match (stage.first, c.per_layer_inputs) {
        (true, Some(_)) => {
            let rows = inputs.per_layer_rows.as_ref().ok_or_else(|| Error::invalid("no per-layer embedding input"))?;
            (None, Some(PerLayerInputs::new(&mut g, rows, &x, compute)?))
        }
        (true, None) => (None, None),
        (false, _) => {
            let (streams, per_layer) = PerLayerInputs::unpack(&mut g, &x, stage.layers.start, compute)?;
            (Some(streams), per_layer)
        }
    };
    let rope = RopeRows::gather(&mut g, weights, &positions.query)?;
    let layers = &c.layer_attention[stage.layers.clone()];
    let mut masks = Masks::new(&mut g, layers, &inputs.mask, &positions, kv.has_ring(), compute)?;
    kv.prepare_writes(&mut g, &positions, query_len)?;
    masks.set_ring(kv.ring_mask());
    let fused =
        opts.attention == AttentionImpl::Fused && c.attn_logit_softcap.is_none() && opts.target >= Target::Ios18;
    let attention = match (fused, ane) {
        (false, _) => AttentionForm::Decomposed,
        (true, false) => AttentionForm::Fused,
        (true, true) => AttentionForm::PerHead,
    };
    let cx = LayerContext {
        compute,
        residual,
        attention,
        positions: &positions,
        rope: &rope,
        per_layer: per_layer.as_ref(),
        query_len,
    };
    let mut streams = match carried_streams {
        Some(s) => s,
        None if c.altup.is_some() => altup::streams(&mut g, &cx, x)?,
        None => vec![x],
    };
    for l in stage.layers.clone() {
        streams = match c.altup {
            Some(_) => altup::layer(&mut g, &cx, &mut kv, &mut masks, l, streams)?,
            None => vec![layer::decoder_layer(&mut g, &cx, &mut kv, &mut masks, l, streams.remove(0))?],
        };
    }
    if !stage.last {
        let x = match &per_layer {
            Some(p) => p.pack(&mut g, &streams, stage.layers.end, residual)?,
            None if streams.len() > 1 => PerLayerInputs::pack_streams(&mut g, &streams)?,
            None => streams.remove(0),
        };
        let out = if ane { g.tokens_first(&x, "next_hidden")? } else { x };
        g.f.output(&out, names::NEXT_HIDDEN_STATES)?;
        return g.f.finish();
    }
    let x = if c.altup.is_some() { altup::merge(&mut g, &cx, &streams)? } else { streams.remove(0) };
    head::logits(&mut g, &x, compute)?;
    kv.output_updates(&mut g)?;
    g.f.finish()
}
