//! Gemma 3n's and 4's per-layer inputs: for each token, a row of the per-layer embedding table
//! (scaled by √width) and a projection of its token embedding (scaled by 1/√hidden, normed per
//! layer), summed and scaled by 1/√2; layer l reads its `width` values.

use std::collections::HashMap;

use half::f16;

use super::emitter::{i32s, scalar_i32, Binary, Graph};
use crate::arch::Role;
use crate::{Error, Result};
use corelm_format::{DType, Var};

pub(super) struct PerLayerInputs {
    /// By layer: the table's row at the tokens, and the embedding's projection, (1, N, width)
    /// each, channels-first (1, width, 1, N) on the Neural Engine (first stage).
    rows: Vec<Var>,
    projections: Vec<Var>,
    /// By layer: the inputs a later stage received from the one before.
    given: HashMap<usize, Var>,
    compute: DType,
}

impl PerLayerInputs {
    /// From the table's rows at the tokens (an input: the runtime gathers them, off the
    /// accelerator, from a table outside the program) and the token embedding `x` (the residual
    /// stream, divided by the profile's divisor, which the per-layer norm does not see).
    pub fn new(g: &mut Graph, rows: &Var, x: &Var, compute: DType) -> Result<PerLayerInputs> {
        let c = g.c;
        let pl = c.per_layer_inputs.ok_or_else(|| Error::invalid("the model has no per-layer inputs"))?;
        let rows = if g.ane { g.channels_first(rows, "per_layer_rows")? } else { rows.clone() };
        let rows = g.cast(&rows, compute, "per_layer_rows_c")?;
        // transformers rounds √width to the weights' dtype.
        let scale = (pl.width as f64).sqrt();
        let scale = if compute == DType::Fp16 { f16::from_f64(scale).to_f64() } else { scale };
        let rows = g.mul_s(&rows, scale, "per_layer_rows_scaled")?;
        let xc = g.cast(x, compute, "per_layer_x")?;
        let projection = g.linear(&xc, Role::PerLayerProjection, None, "per_layer_projection")?;
        let projection = g.mul_s(&projection, (c.hidden_size as f64).powf(-0.5), "per_layer_projection_scaled")?;
        Ok(PerLayerInputs {
            rows: g.split_channels(&rows, c.num_layers, "per_layer_rows_split")?,
            projections: g.split_channels(&projection, c.num_layers, "per_layer_projection_split")?,
            given: HashMap::new(),
            compute,
        })
    }

    /// A later stage's hidden states (starting at layer `at`) split into the AltUp streams
    /// (one without AltUp) and the per-layer inputs of layers `at..` (see
    /// [`super::Stage::carried_width`]).
    pub fn unpack(g: &mut Graph, x: &Var, at: usize, compute: DType) -> Result<(Vec<Var>, Option<PerLayerInputs>)> {
        let c = g.c;
        let streams = c.altup.map_or(1, |a| a.inputs);
        let width = c.per_layer_inputs.map_or(0, |p| p.width);
        let mut sizes = vec![c.hidden_size as i32; streams];
        sizes.extend(std::iter::repeat_n(width as i32, if width > 0 { c.num_layers - at } else { 0 }));
        if sizes.len() == 1 {
            return Ok((vec![x.clone()], None));
        }
        let axis = g.channel_axis();
        let parts = g.f.op(
            "split",
            "carried_split",
            vec![("x", x.into()), ("split_sizes", i32s(&sizes)), ("axis", scalar_i32(axis))],
        )?;
        let (streams, inputs) = parts.split_at(streams);
        if width == 0 {
            return Ok((streams.to_vec(), None));
        }
        let mut given = HashMap::new();
        for (i, v) in inputs.iter().enumerate() {
            given.insert(at + i, g.cast(v, compute, &format!("l{}_per_layer_input_carried", at + i))?);
        }
        Ok((streams.to_vec(), Some(PerLayerInputs { rows: vec![], projections: vec![], given, compute })))
    }

    /// The hidden states a stage hands on: the streams, then the per-layer inputs of layers
    /// `from..` in the residual dtype.
    pub fn pack(&self, g: &mut Graph, streams: &[Var], from: usize, residual: DType) -> Result<Var> {
        let mut parts = streams.to_vec();
        for l in from..g.c.num_layers {
            let input = self.for_layer(g, l)?;
            parts.push(g.cast(&input, residual, &format!("l{l}_per_layer_input_handed"))?);
        }
        let axis = g.channel_axis();
        g.concat("carried", parts.iter().collect(), axis)
    }

    /// The AltUp streams as one tensor, for a model without per-layer inputs.
    pub fn pack_streams(g: &mut Graph, streams: &[Var]) -> Result<Var> {
        let axis = g.channel_axis();
        g.concat("carried", streams.iter().collect(), axis)
    }

    /// Layer `l`'s input: (norm(projection_l) + rows_l) / √2.
    pub fn for_layer(&self, g: &mut Graph, l: usize) -> Result<Var> {
        if let Some(v) = self.given.get(&l) {
            return Ok(v.clone());
        }
        let p = format!("l{l}_per_layer_input");
        let normed =
            g.norm(&self.projections[l], Role::PerLayerProjectionNorm, None, self.compute, true, &format!("{p}_norm"))?;
        let sum = g.binary(Binary::Add, &format!("{p}_sum"), &normed, &self.rows[l])?;
        g.mul_s(&sum, std::f64::consts::FRAC_1_SQRT_2, &p)
    }
}
