//! What becomes of each quantized source tensor (GGUF): carried on its own grid, or
//! dequantized (and maybe compressed again), and why — reported per tensor, so nothing changes
//! silently.

use crate::arch::{Take, TensorSpec};
use crate::checkpoint::{CarriedWeight, SourceStorage};
use crate::compress::{Policy, Scheme};

/// How a quantized source tensor reached the package.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GridCarry {
    /// On its grid, every weight exactly the source's own dequantization.
    Exact,
    /// On its grid, its derived scales (and offsets) rounded to fp16: `max_error` says how far.
    ScaleRounded,
    /// Dequantized to the compute precision.
    Dequantized,
    /// Dequantized, then compressed by the weight's scheme (a second rounding).
    Requantized,
}

/// One quantized source tensor in the package.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SourceGrid {
    pub tensor: String,
    /// The ggml type (`Q4_K`, ...).
    pub source_type: String,
    pub carried: GridCarry,
    /// What it is in the package (`uint4 × fp16 scale − fp16 offset per 32`, `fp16`, `int4 block 32`).
    pub stored_as: String,
    /// For a carried grid, the largest |package weight − source dequantization| (f32).
    pub max_error: Option<f32>,
    /// Why the grid was not carried.
    pub reason: Option<String>,
    pub source_bytes: u64,
    pub package_bytes: u64,
}

/// Why a quantized source tensor is not carried on its grid, or `None` when it may be (then
/// only a grid Core ML cannot hold stops it). `matrix`: the graph multiplies (or gathers) it.
pub(super) fn refusal(
    policy: &Policy,
    spec: &TensorSpec,
    matrix: bool,
    scheme: Option<Scheme>,
    type_name: &str,
) -> Option<String> {
    if !matrix {
        Some("it is not a matrix the graph multiplies".into())
    } else if !policy.keep_grids {
        Some("--dequantize".into())
    } else if policy.keeps(&spec.name) {
        Some("its name matches --keep".into())
    } else if let Take::TransposedRows { .. } = spec.take {
        Some("its checkpoint layout is transposed (GPT-2's Conv1D)".into())
    } else if spec.take != Take::Whole {
        Some("it is a slice of a fused tensor".into())
    } else {
        scheme.filter(|s| !s.is_grid(type_name)).map(|s| format!("the scheme asked for is {s}"))
    }
}

impl SourceGrid {
    pub(super) fn carried(
        spec: &TensorSpec,
        source: &SourceStorage,
        grid: &CarriedWeight,
        package_bytes: u64,
    ) -> SourceGrid {
        SourceGrid {
            tensor: spec.name.clone(),
            source_type: source.type_name.clone(),
            carried: if grid.max_error == 0.0 { GridCarry::Exact } else { GridCarry::ScaleRounded },
            stored_as: grid.description.clone(),
            max_error: Some(grid.max_error),
            reason: None,
            source_bytes: source.bytes,
            package_bytes,
        }
    }

    /// The record of a tensor stored otherwise than on its grid.
    pub(super) fn not_carried(
        spec: &TensorSpec,
        source: &SourceStorage,
        stored: String,
        scheme: Option<Scheme>,
        reason: String,
        package_bytes: u64,
    ) -> SourceGrid {
        SourceGrid {
            tensor: spec.name.clone(),
            source_type: source.type_name.clone(),
            carried: if scheme.is_some() { GridCarry::Requantized } else { GridCarry::Dequantized },
            stored_as: scheme.map_or(stored, |s| s.to_string()),
            max_error: None,
            reason: Some(reason),
            source_bytes: source.bytes,
            package_bytes,
        }
    }
}

/// The tensors of one ggml type, summed.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GridType {
    pub source_type: String,
    pub tensors: usize,
    /// How many were carried exactly, with rounded scales, dequantized, re-quantized.
    pub exact: usize,
    pub scale_rounded: usize,
    pub dequantized: usize,
    pub requantized: usize,
    /// The largest error of a carried tensor of this type.
    pub max_error: f32,
    pub source_bytes: u64,
    pub package_bytes: u64,
}

impl GridType {
    /// One row per ggml type, in name order.
    pub fn summarize(grids: &[SourceGrid]) -> Vec<GridType> {
        let mut by_type: std::collections::BTreeMap<&str, GridType> = Default::default();
        for g in grids {
            let t = by_type.entry(&g.source_type).or_insert_with(|| GridType {
                source_type: g.source_type.clone(),
                tensors: 0,
                exact: 0,
                scale_rounded: 0,
                dequantized: 0,
                requantized: 0,
                max_error: 0.0,
                source_bytes: 0,
                package_bytes: 0,
            });
            t.tensors += 1;
            *match g.carried {
                GridCarry::Exact => &mut t.exact,
                GridCarry::ScaleRounded => &mut t.scale_rounded,
                GridCarry::Dequantized => &mut t.dequantized,
                GridCarry::Requantized => &mut t.requantized,
            } += 1;
            t.max_error = t.max_error.max(g.max_error.unwrap_or(0.0));
            t.source_bytes += g.source_bytes;
            t.package_bytes += g.package_bytes;
        }
        by_type.into_values().collect()
    }
}
