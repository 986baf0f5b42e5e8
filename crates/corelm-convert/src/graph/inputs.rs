//! A function's inputs and where its tokens sit: the token ids (or the previous stage's hidden
//! states), the causal mask, the positions derived from them, and the RoPE rows at those
//! positions.

use super::emitter::{i32s, scalar_i32, Binary, Graph};
use super::weights::StoredWeights;
use super::Stage;
use crate::Result;
use corelm_contract::names;
use corelm_format::{DType, InputShape, Tensor, Var};

/// The inputs every function takes.
pub(super) struct Inputs {
    /// Token ids (1, N), or in a later stage the hidden states (1, N, [`Stage::carried_width`]).
    pub tokens: Var,
    /// (1, 1, N, end): the causal mask, which also says where the call ends.
    pub mask: Var,
    /// The first stage of a model with per-layer embeddings: the table's rows at the tokens,
    /// (1, N, layers × width), gathered by the runtime.
    pub per_layer_rows: Option<Var>,
}

impl Inputs {
    /// Flexible (`query_len` `None`: 1..=context tokens) or fixed shapes.
    pub fn declare(
        g: &mut Graph,
        context: usize,
        query_len: Option<usize>,
        stage: &Stage,
        residual: DType,
        compute: DType,
    ) -> Result<Inputs> {
        let (ids_shape, mask_shape) = match query_len {
            None => (
                InputShape::Range { default: vec![1, 1], ranges: vec![(1, Some(1)), (1, Some(context))] },
                InputShape::Range {
                    default: vec![1, 1, 1, 1],
                    ranges: vec![(1, Some(1)), (1, Some(1)), (1, Some(context)), (1, Some(context))],
                },
            ),
            Some(n) => (InputShape::Fixed(vec![1, n]), InputShape::Fixed(vec![1, 1, n, context])),
        };
        // Per token: a vector of `width` values, shaped like the ids.
        let per_token = |width: usize| match ids_shape.clone() {
            InputShape::Range { mut default, mut ranges } => {
                default.push(width);
                ranges.push((width, Some(width)));
                InputShape::Range { default, ranges }
            }
            InputShape::Fixed(mut dims) => {
                dims.push(width);
                InputShape::Fixed(dims)
            }
            other => other,
        };
        // The first stage reads token ids; later ones the hidden states the one before returned.
        let tokens = if stage.first {
            g.f.input(names::INPUT_IDS, DType::Int32, ids_shape.clone())?
        } else {
            g.f.input(names::HIDDEN_STATES, residual, per_token(Stage::carried_width(g.c, stage.layers.start)))?
        };
        let mask = g.f.input(names::CAUSAL_MASK, compute, mask_shape)?;
        let per_layer_rows = match g.c.per_layer_inputs {
            Some(p) if stage.first => {
                // In the table's dtype: the package's precision (fp16 on the Neural Engine).
                let dtype = if compute == DType::Fp32 { DType::Fp32 } else { DType::Fp16 };
                Some(g.f.input(names::PER_LAYER_EMBEDDINGS, dtype, per_token(g.c.num_layers * p.width))?)
            }
            _ => None,
        };
        Ok(Inputs { tokens, mask, per_layer_rows })
    }
}

/// Where this call writes into the cache and which positions it covers.
pub(super) struct Positions {
    /// int32 [1]: first position written (end − N).
    pub start: Var,
    /// int32 [1]: one past the last position (the mask's last dimension).
    pub end: Var,
    /// int32 [N]: the positions of the query tokens.
    pub query: Var,
    /// int32 [1]: how many cache positions attention reads (`end`, or the whole context when
    /// shapes are fixed and the mask hides what is not yet written).
    pub key_end: Var,
}

impl Positions {
    /// end = mask.shape[3], start = end − N (flexible), or a `position` input (fixed).
    pub fn new(g: &mut Graph, inputs: &Inputs, query_len: Option<usize>, context: usize) -> Result<Positions> {
        Ok(match query_len {
            None => {
                let ids_shape = g.op("shape", "ids_shape", vec![("x", (&inputs.tokens).into())])?;
                let n = g.slice_by_index("query_len", &ids_shape, i32s(&[1]), i32s(&[2]))?;
                let mshape = g.op("shape", "mask_shape", vec![("x", (&inputs.mask).into())])?;
                let end = g.slice_by_index("end_pos", &mshape, i32s(&[3]), i32s(&[4]))?;
                let start = g.binary(Binary::Sub, "start_pos", &end, &n)?;
                let s0 = g.squeeze("start_scalar", &start, &[0])?;
                let e0 = g.squeeze("end_scalar", &end, &[0])?;
                let query = g.op(
                    "range_1d",
                    "positions",
                    vec![("end", (&e0).into()), ("start", (&s0).into()), ("step", scalar_i32(1))],
                )?;
                Positions { start, key_end: end.clone(), end, query }
            }
            Some(n) => {
                let start = g.f.input(names::POSITION, DType::Int32, InputShape::Fixed(vec![1]))?;
                let end = g.binary(Binary::Add, "end_pos", &start, i32s(&[n as i32]))?;
                let steps = g.ints("steps", &(0..n as i32).collect::<Vec<_>>())?;
                let query = g.binary(Binary::Add, "positions", &steps, &start)?;
                let key_end = g.f.constant("context_len", Tensor::from_i32(vec![1], &[context as i32])?)?;
                Positions { start, end, query, key_end }
            }
        })
    }
}

/// The RoPE tables' rows at the query positions, (1, 1, N, rotary_dim): cos and sin for global
/// layers, and for local (sliding-window) layers when their RoPE differs.
pub(super) struct RopeRows {
    global: Option<(Var, Var)>,
    local: Option<(Var, Var)>,
}

impl RopeRows {
    pub fn gather(g: &mut Graph, weights: &StoredWeights, query: &Var) -> Result<RopeRows> {
        let mut rows = [None, None];
        for (slot, (tag, tables)) in
            [("rope", &weights.rope), ("rope_local", &weights.rope_local)].into_iter().enumerate()
        {
            let Some((cos_blob, sin_blob)) = tables else { continue };
            let mut pair = Vec::new();
            for (part, blob) in [("cos", cos_blob), ("sin", sin_blob)] {
                let table = g.f.weight(&format!("{tag}_{part}_table"), blob);
                let at = g.gather_rows(&format!("{tag}_{part}_rows"), &table, query)?;
                pair.push(g.expand_dims(&format!("{tag}_{part}"), &at, &[0, 1])?);
            }
            rows[slot] = Some((pair[0].clone(), pair[1].clone()));
        }
        let [global, local] = rows;
        Ok(RopeRows { global, local })
    }

    /// The tables a layer rotates with: the local ones for sliding-window layers when there are.
    pub fn for_layer(&self, sliding: bool) -> Option<&(Var, Var)> {
        if sliding && self.local.is_some() {
            self.local.as_ref()
        } else {
            self.global.as_ref()
        }
    }
}
