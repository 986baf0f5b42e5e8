//! Weight compression as Core ML executes it natively (iOS 18 constexpr ops): linear integers
//! with per-channel or per-block scales (`constexpr_blockwise_shift_scale`) and palettization
//! with per-grouped-channel lookup tables (`constexpr_lut_to_dense`). One matrix at a time, so
//! compressing never holds more than the tensor being compressed.

mod linear;
mod lut;
pub mod package;

use std::fmt;

use corelm_format::{DType, Tensor};

pub use lut::kmeans_1d;

use crate::{Error, Result};

/// How one weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Integers of `bits` (8 or 4), one scale per `block` input columns of each output channel
    /// (`None`: one per channel); with `offset`, a zero point per block too (asymmetric).
    Linear { bits: u8, block: Option<usize>, offset: bool },
    /// A table of 2^`bits` values (4, 6 or 8 bits) per `group` output channels, found by k-means.
    Lut { bits: u8, group: usize },
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scheme::Linear { bits, block, offset } => {
                write!(f, "int{bits}")?;
                match block {
                    Some(b) => write!(f, " block {b}")?,
                    None => write!(f, " per channel")?,
                }
                if *offset {
                    write!(f, " with offsets")?;
                }
                Ok(())
            }
            Scheme::Lut { bits, group } => write!(f, "lut{bits} per {group} channels"),
        }
    }
}

impl Scheme {
    /// Whether a source grid of ggml type `source_type` is this scheme already (int4 in blocks
    /// of 32: Q4_0, Q4_1, Q4_K; int8: Q8_0), so it is kept instead of rounded a second time.
    pub fn is_grid(self, source_type: &str) -> bool {
        match self {
            Scheme::Linear { bits: 4, block: Some(32), .. } => matches!(source_type, "Q4_0" | "Q4_1" | "Q4_K"),
            Scheme::Linear { bits: 8, .. } => source_type == "Q8_0",
            _ => false,
        }
    }

    /// Checks the parameters Core ML can express.
    pub fn check(self) -> Result<Scheme> {
        match self {
            Scheme::Linear { bits: 4 | 8, block, .. } if block != Some(0) => Ok(self),
            Scheme::Lut { bits: 1 | 2 | 3 | 4 | 6 | 8, group } if group > 0 => Ok(self),
            _ => Err(Error::invalid(format!("{self:?} is not a compression Core ML supports"))),
        }
    }
}

/// Which scheme each weight gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Linear layers; `None` keeps them in the compute precision.
    pub body: Option<Scheme>,
    /// The embedding table and the LM head (tied or not).
    pub embeddings: Option<Scheme>,
    /// Weights whose name contains any of these strings stay uncompressed.
    pub keep: Vec<String>,
    /// From quantized sources (GGUF), keep each weight's grid when Core ML can hold it and the
    /// weight's scheme is none or that grid already ([`Scheme::is_grid`]); otherwise the
    /// weight is dequantized (and compressed by its scheme, rounding a second time).
    pub keep_grids: bool,
}

impl Default for Policy {
    /// No compression, source grids kept: what you downloaded is what you get.
    fn default() -> Policy {
        Policy { body: None, embeddings: None, keep: Vec::new(), keep_grids: true }
    }
}

impl Policy {
    /// The same scheme everywhere.
    pub fn uniform(scheme: Scheme) -> Policy {
        Policy { body: Some(scheme), embeddings: Some(scheme), ..Policy::default() }
    }

    /// Weight `name` stays uncompressed.
    pub fn keeps(&self, name: &str) -> bool {
        self.keep.iter().any(|k| name.contains(k.as_str()))
    }

    /// The scheme for weight `name`; `embedding` for the embedding table and LM head.
    pub fn scheme_for(&self, name: &str, embedding: bool) -> Option<Scheme> {
        if self.keeps(name) {
            return None;
        }
        if embedding {
            self.embeddings
        } else {
            self.body
        }
    }
}

/// A compressed matrix: the constexpr op that rebuilds it and that op's tensor inputs.
#[derive(Debug)]
pub struct Compressed {
    pub op: &'static str,
    pub inputs: Vec<(&'static str, Tensor)>,
    /// The op whose output is this op's `data`: a LUT expanded before a block scale, the form
    /// IQ4 grids are carried in. `None` for a single op (everything [`compress`] makes).
    pub data_from: Option<Box<Compressed>>,
}

impl Compressed {
    /// The shape of the matrix it rebuilds: that of its data (the first input of the chain's
    /// first op: the integers, or the indices a LUT expands).
    pub fn matrix_shape(&self) -> &[usize] {
        match &self.data_from {
            Some(inner) => inner.matrix_shape(),
            None => self.inputs.first().map_or(&[], |(_, t)| t.shape()),
        }
    }

    /// The ops rebuilding rows `start..start + len` of a matrix of `rows` rows: every input
    /// laid out by rows (data, indices, scales, offsets) sliced, shared tables as they are.
    pub fn rows(&self, rows: usize, start: usize, len: usize) -> Result<Compressed> {
        let inputs = self
            .inputs
            .iter()
            .map(|(name, t)| {
                Ok((*name, if t.shape().first() == Some(&rows) { t.rows(start, len)? } else { t.clone() }))
            })
            .collect::<Result<_>>()?;
        let data_from = match &self.data_from {
            Some(inner) => Some(Box::new(inner.rows(rows, start, len)?)),
            None => None,
        };
        Ok(Compressed { op: self.op, inputs, data_from })
    }
}

/// Compresses a (rows, cols) matrix; scales and tables are stored in `dtype` (the precision the
/// rebuilt weight has). `gram`: Σ x xᵀ (cols × cols, row-major) over calibration inputs of the
/// layer, with which integer schemes round to keep the layer's outputs close rather than each
/// weight (palettization does not use it).
pub fn compress(shape: &[usize], w: &[f32], scheme: Scheme, dtype: DType, gram: Option<&[f64]>) -> Result<Compressed> {
    let &[rows, cols] = shape else {
        return Err(Error::invalid(format!("only matrices are compressed, not shape {shape:?}")));
    };
    if w.len() != rows * cols {
        return Err(Error::invalid(format!("{} values for a {rows}×{cols} matrix", w.len())));
    }
    match scheme.check()? {
        Scheme::Linear { bits, block, offset } => {
            // A block that does not divide the row falls back to one scale per channel.
            let block = block.filter(|b| cols % b == 0).unwrap_or(cols);
            linear::quantize(rows, cols, w, bits, block, offset, dtype, gram)
        }
        Scheme::Lut { bits, group } => {
            let group = if rows % group == 0 { group } else { 1 };
            lut::palettize(rows, cols, w, bits, group, dtype)
        }
    }
}

/// Rebuilds the matrix from a [`Compressed`] weight in f32, as `scale · (data − offset)` or a
/// table lookup (the numbers the constexpr op defines, before any fp16 rounding of the output).
pub fn decompress(c: &Compressed) -> Result<Vec<f32>> {
    let get = |n: &str| c.inputs.iter().find(|(k, _)| *k == n).map(|(_, t)| t);
    let bad = || Error::invalid(format!("malformed {}", c.op));
    let floats = |t: &Tensor| t.to_f64().ok_or_else(bad);
    match c.op {
        "constexpr_blockwise_shift_scale" => {
            let data = get("data").ok_or_else(bad)?;
            let &[rows, cols] = data.shape() else { return Err(bad()) };
            let q = data.to_i64().ok_or_else(bad)?;
            let scale = floats(get("scale").ok_or_else(bad)?)?;
            let offset = get("offset").map(floats).transpose()?;
            let blocks = scale.len() / rows;
            let block = cols / blocks;
            Ok((0..rows * cols)
                .map(|i| {
                    let at = (i / cols) * blocks + (i % cols) / block;
                    (scale[at] * (q[i] as f64 - offset.as_ref().map_or(0.0, |o| o[at]))) as f32
                })
                .collect())
        }
        "constexpr_lut_to_dense" => {
            let indices = get("indices").ok_or_else(bad)?;
            let &[rows, cols] = indices.shape() else { return Err(bad()) };
            let idx = indices.to_i64().ok_or_else(bad)?;
            let lut_t = get("lut").ok_or_else(bad)?;
            let lut = floats(lut_t)?;
            let (groups, entries) = (lut_t.shape()[0], lut_t.shape()[2]);
            let group = rows / groups;
            Ok((0..rows * cols).map(|i| lut[(i / cols / group) * entries + idx[i] as usize] as f32).collect())
        }
        other => Err(Error::invalid(format!("`{other}` is not a compression op"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize) -> Vec<f32> {
        // A heavy-tailed, uneven spread like real weights.
        (0..rows * cols)
            .map(|i| {
                let x = ((i as u64).wrapping_mul(2654435761) % 10007) as f32 / 10007.0 - 0.5;
                x * x * x * 8.0 + (i % 7) as f32 * 0.01
            })
            .collect()
    }

    fn rms_error(a: &[f32], b: &[f32]) -> f64 {
        (a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.len() as f64).sqrt()
    }

    #[test]
    fn more_bits_and_smaller_blocks_cost_less_error() {
        let w = matrix(32, 128);
        let err =
            |s: Scheme| rms_error(&w, &decompress(&compress(&[32, 128], &w, s, DType::Fp32, None).unwrap()).unwrap());
        let int8 = err(Scheme::Linear { bits: 8, block: None, offset: false });
        let int4_ch = err(Scheme::Linear { bits: 4, block: None, offset: false });
        let int4_32 = err(Scheme::Linear { bits: 4, block: Some(32), offset: false });
        let int4_32o = err(Scheme::Linear { bits: 4, block: Some(32), offset: true });
        let lut4 = err(Scheme::Lut { bits: 4, group: 4 });
        let lut6 = err(Scheme::Lut { bits: 6, group: 4 });
        let lut8 = err(Scheme::Lut { bits: 8, group: 4 });
        assert!(int8 < int4_32 && int4_32 < int4_ch, "{int8} {int4_32} {int4_ch}");
        assert!(int4_32o < int4_32, "offsets fit skewed blocks better: {int4_32o} vs {int4_32}");
        assert!(lut8 < lut6 && lut6 < lut4, "{lut8} {lut6} {lut4}");
        // k-means tables place levels where the weights are: better than a uniform 4-bit grid.
        assert!(lut4 < int4_ch, "{lut4} vs {int4_ch}");
    }

    #[test]
    fn rejects_what_core_ml_cannot_express() {
        let w = matrix(4, 8);
        assert!(
            compress(&[4, 8], &w, Scheme::Linear { bits: 5, block: None, offset: false }, DType::Fp16, None).is_err()
        );
        assert!(compress(&[4, 8], &w, Scheme::Lut { bits: 5, group: 1 }, DType::Fp16, None).is_err());
        assert!(compress(&[32], &w, Scheme::Lut { bits: 4, group: 1 }, DType::Fp16, None).is_err());
        assert!(compress(&[4, 9], &w, Scheme::Lut { bits: 4, group: 1 }, DType::Fp16, None).is_err());
    }

    #[test]
    fn keep_list_and_embedding_override() {
        let int4 = Scheme::Linear { bits: 4, block: Some(32), offset: false };
        let int8 = Scheme::Linear { bits: 8, block: None, offset: false };
        let p = Policy { body: Some(int4), embeddings: Some(int8), keep: vec!["layers.0.".into()], keep_grids: false };
        assert_eq!(p.scheme_for("model.layers.1.mlp.up_proj.weight", false), Some(int4));
        assert_eq!(p.scheme_for("model.embed_tokens.weight", true), Some(int8));
        assert_eq!(p.scheme_for("model.layers.0.mlp.up_proj.weight", false), None);
    }
}
