//! Memory and speed of a model on each device: weights for a compression scheme, the KV cache
//! (per layer, with and without sliding-window savings), activations, load-time overhead, whether
//! it fits the app's memory, an upper bound on decode speed, and a recommendation.
//!
//! The formulas (all sizes in bytes; h hidden, i intermediate, V vocabulary, H heads, d head_dim,
//! Hkv KV heads, T context, N query length):
//!
//! - weights, per matrix of r × c: fp16 2rc; int8 per output channel rc + 2r; int4 per block of 32
//!   input columns rc/2 + 2·r·c/32 (one fp16 scale per block; per channel when 32 does not divide
//!   c); lutN with one 2^N-entry fp16 table per 16 output channels N·rc/8 + 2·2^N·r/16; mixed:
//!   int8 embedding table and LM head, int4 elsewhere. Tied embeddings are one matrix. Norm weights
//!   stay fp32 (4 B each); every linear layer has an fp16 bias of its r outputs (zeros when the
//!   model has none: MIL's default, written to the weight file); each RoPE table pair is
//!   2 · T · rotary_dim · 2 B — as `corelm convert` stores them (one function).
//! - KV cache, per layer: fp16 K and V, 2 · Hkv · d · 2 B per token. "Full cache" is what corelm
//!   writes (every layer holds T tokens); "sliding-window savings" is a ring buffer holding
//!   min(window, T) tokens on sliding layers.
//! - activations of one prediction (live buffers of one layer at a time):
//!   N · (8h + 2·(H·d + 2·Hkv·d) + 4i + 2V) + 2 · H · N · T — the fp32 residual stream and its
//!   normed copy, fp16 q/k/v, the two MLP branches, fp16 logits, and one layer's attention scores.
//!   Decode is N = 1; prefill is N = the prefill chunk (the longest fixed query length of a package,
//!   else min(T, 512)).
//! - load overhead: a fixed 256 MiB (Core ML runtime, compiled program) plus 10% of the weights
//!   (transient buffers while the model is loaded and specialized). An assumption, not a
//!   measurement: see [`Assumptions`].
//! - total = weights + KV cache + prefill activations + load overhead.
//! - decode upper bound: bandwidth / bytes read per token, where a token reads every weight
//!   (except an untied embedding table, of which it gathers one row, and the RoPE tables) and the
//!   whole KV cache up to position T.

use std::fmt::Write as _;

use corelm_format::{Error, Result};
use serde::Serialize;

use crate::devices::{Device, Kind, GIB};
use crate::model::{Matrix, ModelShape};

/// The compression schemes of `corelm convert --quantize` / `corelm compress`, with their default
/// parameters (int4 blocks of 32, LUT groups of 16 channels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    Fp16,
    Int8,
    Int4,
    Lut4,
    Lut6,
    Mixed,
}

impl Quant {
    pub const ALL: [Quant; 6] = [Quant::Fp16, Quant::Int8, Quant::Int4, Quant::Lut4, Quant::Lut6, Quant::Mixed];

    /// From the smallest expected quality loss to the largest: 8-bit before 6-bit before 4-bit;
    /// among 4-bit schemes, mixed (8-bit embeddings) before int4 blocks of 32 before 16 values
    /// per 16 channels (lut4).
    pub const BY_QUALITY: [Quant; 6] = [Quant::Fp16, Quant::Int8, Quant::Lut6, Quant::Mixed, Quant::Int4, Quant::Lut4];

    pub fn name(self) -> &'static str {
        match self {
            Quant::Fp16 => "fp16",
            Quant::Int8 => "int8",
            Quant::Int4 => "int4",
            Quant::Lut4 => "lut4",
            Quant::Lut6 => "lut6",
            Quant::Mixed => "mixed",
        }
    }

    pub fn parse(s: &str) -> Option<Quant> {
        Quant::ALL.into_iter().find(|q| q.name().eq_ignore_ascii_case(s))
    }

    pub fn describe(self) -> &'static str {
        match self {
            Quant::Fp16 => "fp16 weights",
            Quant::Int8 => "int8 per output channel, fp16 scales",
            Quant::Int4 => "int4 per block of 32, fp16 scales",
            Quant::Lut4 => "4-bit lookup tables per 16 channels",
            Quant::Lut6 => "6-bit lookup tables per 16 channels",
            Quant::Mixed => "int4 layers, int8 embeddings and LM head",
        }
    }

    /// Bytes of an r × c matrix in this scheme.
    pub fn matrix_bytes(self, rows: u64, cols: u64, embedding: bool) -> u64 {
        let n = rows * cols;
        let lut = |bits: u64| {
            let groups = if rows.is_multiple_of(16) { rows / 16 } else { rows };
            (n * bits).div_ceil(8) + groups * (1 << bits) * 2
        };
        match self {
            Quant::Fp16 => 2 * n,
            Quant::Int8 => n + 2 * rows,
            Quant::Int4 => {
                let scales = if cols.is_multiple_of(32) { rows * (cols / 32) } else { rows };
                n.div_ceil(2) + 2 * scales
            }
            Quant::Lut4 => lut(4),
            Quant::Lut6 => lut(6),
            Quant::Mixed if embedding => Quant::Int8.matrix_bytes(rows, cols, true),
            Quant::Mixed => Quant::Int4.matrix_bytes(rows, cols, false),
        }
    }

    /// Whether weights are stored below 8 bits (decompressed on the fly).
    pub fn low_bit(self) -> bool {
        matches!(self, Quant::Int4 | Quant::Lut4 | Quant::Lut6 | Quant::Mixed)
    }
}

/// The planner's assumptions, reported with every plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Assumptions {
    /// Tokens fed per prediction during prefill when the package's query length is flexible.
    pub prefill_chunk: usize,
    /// Core ML runtime, compiled program and framework allocations.
    pub overhead_fixed_bytes: u64,
    /// Transient buffers while loading, as a fraction of the weight bytes.
    pub overhead_weight_fraction: f64,
    /// A plan "fits" when its total is at most this fraction of the usable memory ("tight" up to 1).
    pub margin: f64,
}

impl Default for Assumptions {
    fn default() -> Assumptions {
        Assumptions {
            prefill_chunk: 512,
            overhead_fixed_bytes: 256 << 20,
            overhead_weight_fraction: 0.10,
            margin: 0.85,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeightBytes {
    pub total: u64,
    /// Linear layers, the embedding table and the LM head in the scheme.
    pub matrices: u64,
    /// Of which the embedding table and LM head (once when tied).
    pub embeddings: u64,
    /// Norms (fp32), biases, position embeddings and RoPE tables.
    pub other: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerKv {
    pub layer: usize,
    pub window: Option<u64>,
    /// Bytes when the layer holds the whole context (what corelm writes).
    pub full: u64,
    /// Bytes with a ring buffer of the window on sliding layers.
    pub sliding: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KvBytes {
    /// Every layer holds the whole context: the layout corelm writes today.
    pub full: u64,
    /// Sliding-window layers hold only their window.
    pub with_sliding_window_savings: u64,
    pub sliding_layers: usize,
    pub per_layer: Vec<LayerKv>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActivationBytes {
    pub decode: u64,
    pub prefill: u64,
    pub prefill_tokens: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Breakdown {
    /// The scheme's name, or "as stored" for a package planned without --quantize.
    pub scheme: String,
    pub context: usize,
    pub weights: WeightBytes,
    pub kv_cache: KvBytes,
    pub activations: ActivationBytes,
    pub load_overhead: u64,
    /// Weights + full KV cache + prefill activations + load overhead.
    pub total: u64,
    /// The same with sliding-window savings.
    pub total_with_sliding_window_savings: u64,
    /// Weights and KV cache read to decode the token at position `context`.
    pub decode_bytes_per_token: u64,
    /// The per-layer embedding table beside the program (Gemma 3n, 4): on disk and mapped, not
    /// in `total`; a token reads one row of it (counted in `decode_bytes_per_token`).
    pub per_layer_table: u64,
    /// Hybrid models' recurrent states, in `total` (read and written back every call, counted
    /// twice in `decode_bytes_per_token`).
    pub recurrent_states: u64,
}

/// Whether a total fits a device's usable memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fit {
    /// At most `margin` of the usable memory.
    Fits,
    /// Above the margin, within the usable memory: likely to be killed under pressure.
    Tight,
    DoesNotFit,
}

impl Fit {
    fn of(total: u64, usable: u64, margin: f64) -> Fit {
        if total as f64 <= usable as f64 * margin {
            Fit::Fits
        } else if total <= usable {
            Fit::Tight
        } else {
            Fit::DoesNotFit
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Fit::Fits => "yes",
            Fit::Tight => "tight",
            Fit::DoesNotFit => "no",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recommendation {
    /// The least lossy scheme that fits with margin; `None` when nothing does.
    pub scheme: Option<Quant>,
    /// The context that fits with it (the requested one when possible).
    pub context: Option<usize>,
    pub compute_units: &'static str,
    pub total_bytes: Option<u64>,
    pub decode_tokens_per_second: Option<f64>,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceReport {
    pub device: &'static Device,
    pub usable_bytes: u64,
    pub fit: Fit,
    pub fit_with_sliding_window_savings: Fit,
    /// Usable memory minus the total (negative when it does not fit).
    pub headroom_bytes: i64,
    /// Bandwidth ÷ bytes read per token: an upper bound.
    pub decode_tokens_per_second: f64,
    pub recommendation: Recommendation,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub model: ModelShape,
    pub breakdown: Breakdown,
    pub devices: Vec<DeviceReport>,
    pub assumptions: Assumptions,
    pub compute_units_rule: &'static str,
}

pub const COMPUTE_UNITS_RULE: &str =
    "Mac: cpuAndGPU (decode is bandwidth-bound and the GPU pairs the highest bandwidth \
     with the most compute). iPhone and iPad: cpuAndNeuralEngine for weights below 8 bits (int4, lut4, lut6, mixed), \
     which the Neural Engine decompresses on the fly at the lowest power; all for fp16 and int8, letting Core ML \
     place each op.";

/// The compute units the rule in [`COMPUTE_UNITS_RULE`] picks.
pub fn compute_units(kind: Kind, low_bit_weights: bool) -> &'static str {
    match (kind, low_bit_weights) {
        (Kind::Mac, _) => "cpuAndGPU",
        (_, true) => "cpuAndNeuralEngine",
        (_, false) => "all",
    }
}

/// The context a plan uses when none is given: a package's own, else what `corelm convert` gives
/// the source (2048, or fewer positions when the model was trained on fewer).
pub fn default_context(model: &ModelShape) -> usize {
    // A source plans for the context `corelm convert` would give it.
    let default = corelm_convert::convert::DEFAULT_CONTEXT;
    match (&model.package, model.trained_positions) {
        (Some(p), _) => p.context,
        (None, Some(trained)) => default.min(trained).max(1),
        (None, None) => default,
    }
}

fn check_context(model: &ModelShape, context: usize) -> Result<()> {
    if context == 0 {
        return Err(Error::invalid("--context must be at least 1"));
    }
    match (&model.package, model.max_context) {
        (Some(p), _) if context > p.context => Err(Error::invalid(format!(
            "the package holds {} tokens; --context {context} needs a new conversion with --context {context}",
            p.context
        ))),
        (None, Some(max)) if context > max => Err(Error::invalid(format!(
            "{} has learned positions for {max} tokens; --context {context} is too long",
            model.architecture
        ))),
        _ => Ok(()),
    }
}

/// Memory and bytes per token for `scheme` (`None`: a package as stored, a source in fp16).
/// The KV cache holds `context` tokens (a package's own context when planning a package).
pub fn breakdown(model: &ModelShape, scheme: Option<Quant>, context: usize, a: &Assumptions) -> Result<Breakdown> {
    check_context(model, context)?;
    let memory_context = model.package.as_ref().map_or(context, |p| p.context);
    Ok(compute(model, scheme, memory_context, context, a))
}

fn matrix_bytes(m: &Matrix, scheme: Option<Quant>) -> u64 {
    match (scheme, m.stored_bytes) {
        (None, Some(stored)) => stored,
        (q, _) => q.unwrap_or(Quant::Fp16).matrix_bytes(m.rows, m.cols, m.embedding),
    }
}

/// `memory_context`: tokens the KV cache holds; `read_context`: the position decoded.
fn compute(
    model: &ModelShape,
    scheme: Option<Quant>,
    memory_context: usize,
    read_context: usize,
    a: &Assumptions,
) -> Breakdown {
    let (mc, rc) = (memory_context as u64, read_context as u64);
    // Weights.
    let matrices: u64 = model.matrices.iter().map(|m| matrix_bytes(m, scheme)).sum();
    let embeddings: u64 = model.matrices.iter().filter(|m| m.embedding).map(|m| matrix_bytes(m, scheme)).sum();
    let gathered: u64 = model.matrices.iter().filter(|m| m.gathered_only).map(|m| matrix_bytes(m, scheme)).sum();
    let rope: u64 = model.rope_dims.iter().map(|d| 2 * mc * d * 2).sum();
    let other = match &model.package {
        Some(p) => {
            let stored: u64 = model.matrices.iter().map(|m| m.stored_bytes.unwrap_or(0)).sum();
            p.weight_bytes.saturating_sub(stored)
        }
        None => model.fp32_values * 4 + model.fp16_values * 2 + rope,
    };
    let weights = WeightBytes { total: matrices + other, matrices, embeddings, other };

    // KV cache.
    let per_layer: Vec<LayerKv> = model
        .kv_layers
        .iter()
        .enumerate()
        .map(|(layer, l)| {
            let per_token = 2 * l.kv_heads * l.head_dim * 2;
            LayerKv {
                layer,
                window: l.window,
                full: per_token * mc,
                sliding: per_token * l.window.map_or(mc, |w| w.min(mc)),
            }
        })
        .collect();
    let (full, sliding, read) = match (&model.package, per_layer.is_empty()) {
        (Some(p), true) => {
            // Unstructured states: scale the declared bytes.
            let per_token = p.kv_bytes as f64 / p.context.max(1) as f64;
            let full = (per_token * mc as f64) as u64;
            (full, full, (per_token * rc as f64) as u64)
        }
        _ => {
            let full = per_layer.iter().map(|l| l.full).sum();
            let sliding = per_layer.iter().map(|l| l.sliding).sum();
            let read = model.kv_layers.iter().map(|l| 2 * l.kv_heads * l.head_dim * 2 * rc).sum();
            (full, sliding, read)
        }
    };
    let kv_cache = KvBytes {
        full,
        with_sliding_window_savings: sliding,
        sliding_layers: per_layer.iter().filter(|l| l.window.is_some()).count(),
        per_layer,
    };

    // Activations.
    let (h, i, v) = (model.hidden, model.intermediate, model.vocab);
    let (kv_heads, head_dim) = model.kv_layers.first().map_or((model.heads, 0), |l| (l.kv_heads, l.head_dim));
    let head_dim = if head_dim == 0 && model.heads > 0 { h / model.heads } else { head_dim };
    let q_dim = model.heads * head_dim;
    let per_token = 8 * h + 2 * (q_dim + 2 * kv_heads * head_dim) + 4 * i + 2 * v;
    let scores = |n: u64| 2 * model.heads * n * mc;
    let prefill_tokens = match &model.package {
        Some(p) if !p.query_lengths.is_empty() => *p.query_lengths.iter().max().unwrap_or(&1),
        _ => a.prefill_chunk.min(memory_context),
    }
    .max(1);
    let activations = ActivationBytes {
        decode: per_token + scores(1),
        prefill: prefill_tokens as u64 * per_token + scores(prefill_tokens as u64),
        prefill_tokens,
    };

    let load_overhead = a.overhead_fixed_bytes + (weights.total as f64 * a.overhead_weight_fraction) as u64;
    let base =
        weights.total + activations.prefill.max(activations.decode) + load_overhead + model.recurrent_state_bytes;
    let rope_read = if model.package.is_none() { rope } else { 0 };
    Breakdown {
        scheme: scheme.map_or_else(
            || if model.package.is_some() { "as stored".into() } else { "fp16".into() },
            |q| q.name().to_string(),
        ),
        context: read_context,
        decode_bytes_per_token: weights.total - gathered - rope_read
            + read
            + model.per_layer_table.as_ref().map_or(0, |t| t.row_bytes())
            + 2 * model.recurrent_state_bytes,
        per_layer_table: model.per_layer_table.as_ref().map_or(0, |t| t.bytes()),
        recurrent_states: model.recurrent_state_bytes,
        total: base + kv_cache.full,
        total_with_sliding_window_savings: base + kv_cache.with_sliding_window_savings,
        weights,
        kv_cache,
        activations,
        load_overhead,
    }
}

/// Whether the weights in `b` are stored below 8 bits.
fn low_bit(model: &ModelShape, scheme: Option<Quant>) -> bool {
    match scheme {
        Some(q) => q.low_bit(),
        // A package as stored: below 8 bits when its matrices average under one byte a value.
        None => {
            let values: u64 = model.matrices.iter().map(|m| m.rows * m.cols).sum();
            let stored: u64 = model.matrices.iter().map(|m| matrix_bytes(m, None)).sum();
            values > 0 && stored < values
        }
    }
}

/// The least lossy scheme that fits `device` with margin at `context`; else the scheme and the
/// longest context (halving down to 256 tokens) that fit, preferring context, then quality.
pub fn recommend(model: &ModelShape, device: &Device, context: usize, a: &Assumptions) -> Recommendation {
    let usable = device.usable_bytes();
    let budget = usable as f64 * a.margin;
    let fits = |b: &Breakdown| b.total as f64 <= budget;
    let found = |q: Quant, ctx: usize, b: &Breakdown, reason: String| Recommendation {
        scheme: Some(q),
        context: Some(ctx),
        compute_units: compute_units(device.kind, q.low_bit()),
        total_bytes: Some(b.total),
        decode_tokens_per_second: Some(device.bandwidth() / b.decode_bytes_per_token.max(1) as f64),
        reason,
    };
    // A package keeps its KV cache size unless it is converted again.
    let memory_context = model.package.as_ref().map_or(context, |p| p.context);
    for q in Quant::BY_QUALITY {
        let b = compute(model, Some(q), memory_context, context, a);
        if fits(&b) {
            let free = format!("the least lossy scheme that leaves {:.0}% free", (1.0 - a.margin) * 100.0);
            // A package planned as stored: how to get the recommended weights from it.
            let stored = model.matrices.iter().map(|m| matrix_bytes(m, None)).sum::<u64>();
            let uncompressed = model.matrices.iter().map(|m| Quant::Fp16.matrix_bytes(m.rows, m.cols, m.embedding));
            let package_fp16 = stored >= uncompressed.sum::<u64>();
            let reason = match (model.is_package(), q, package_fp16) {
                (false, Quant::Fp16, _) => "fits uncompressed".to_string(),
                (false, _, _) => free,
                (true, Quant::Fp16, true) => "fits as it is".to_string(),
                (true, Quant::Fp16, false) => "fits uncompressed: convert the source without --quantize".to_string(),
                (true, q, true) => format!("{free}: corelm compress --quantize {}", q.name()),
                (true, q, false) => format!("{free}: convert the source with --quantize {}", q.name()),
            };
            return found(q, context, &b, reason);
        }
    }
    let mut best: Option<(usize, Quant, Breakdown)> = None;
    for q in Quant::BY_QUALITY {
        let mut ctx = memory_context.min(context) / 2;
        while ctx >= 256 {
            let b = compute(model, Some(q), ctx, ctx, a);
            if fits(&b) {
                if best.as_ref().is_none_or(|(c, _, _)| ctx > *c) {
                    best = Some((ctx, q, b));
                }
                break;
            }
            ctx /= 2;
        }
    }
    match best {
        Some((ctx, q, b)) => {
            let how = if model.is_package() { "convert again" } else { "convert" };
            found(q, ctx, &b, format!("no scheme fits {context} tokens; {how} with --context {ctx}"))
        }
        None => Recommendation {
            scheme: None,
            context: None,
            compute_units: compute_units(device.kind, true),
            total_bytes: None,
            decode_tokens_per_second: None,
            reason: "does not fit with any scheme at 256 tokens or more: a smaller model is needed".into(),
        },
    }
}

/// Plans `model` with `scheme` at `context` (defaults: fp16 or as stored, [`default_context`])
/// against `devices`.
pub fn plan(
    model: &ModelShape,
    scheme: Option<Quant>,
    context: Option<usize>,
    devices: &[&'static Device],
    a: &Assumptions,
) -> Result<Plan> {
    if model.is_package() && scheme.is_some() && model.matrices.is_empty() {
        return Err(Error::invalid("the package has no weight matrices the planner can re-quantize"));
    }
    let context = context.unwrap_or_else(|| default_context(model));
    let max = corelm_convert::config::config_limit("max_position_embeddings");
    if context == 0 || context as u64 > max {
        return Err(Error::invalid(format!("--context {context} is outside 1..={max}")));
    }
    let b = breakdown(model, scheme, context, a)?;
    let low = low_bit(model, scheme);
    let devices = devices
        .iter()
        .map(|&d| {
            let usable = d.usable_bytes();
            DeviceReport {
                device: d,
                usable_bytes: usable,
                fit: Fit::of(b.total, usable, a.margin),
                fit_with_sliding_window_savings: Fit::of(b.total_with_sliding_window_savings, usable, a.margin),
                headroom_bytes: usable as i64 - b.total as i64,
                decode_tokens_per_second: d.bandwidth() / b.decode_bytes_per_token.max(1) as f64,
                recommendation: {
                    let mut r = recommend(model, d, context, a);
                    if r.scheme.is_none() {
                        r.compute_units = compute_units(d.kind, low);
                    }
                    r
                },
            }
        })
        .collect();
    let mut model = model.clone();
    if let Some(trained) = model.trained_positions.filter(|&t| context > t) {
        model.notes.push(format!("context {context} is beyond the {trained} positions the model was trained for"));
    }
    Ok(Plan { model, breakdown: b, devices, assumptions: a.clone(), compute_units_rule: COMPUTE_UNITS_RULE })
}

/// Bytes for people: MiB below one GiB, else GiB.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b < GIB {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.2} GiB", b / GIB)
    }
}

impl Plan {
    /// The report `corelm plan` prints.
    pub fn to_text(&self) -> String {
        let (m, b) = (&self.model, &self.breakdown);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model        {} ({}): {:.2} B parameters, {} layers, hidden {}, vocab {}{}",
            m.name,
            m.architecture,
            m.parameters as f64 / 1e9,
            m.layers,
            m.hidden,
            m.vocab,
            if m.tied_embeddings { ", tied embeddings" } else { "" }
        );
        let scheme = Quant::parse(&b.scheme).map_or(b.scheme.clone(), |q| format!("{} ({})", q.name(), q.describe()));
        let _ = writeln!(s, "plan         {scheme}, context {}", b.context);
        let _ = writeln!(
            s,
            "weights      {} ({:.2} GB): matrices {} (embeddings {}), other {}",
            human(b.weights.total),
            b.weights.total as f64 / 1e9,
            human(b.weights.matrices),
            human(b.weights.embeddings),
            human(b.weights.other)
        );
        let kv = &b.kv_cache;
        let _ = writeln!(
            s,
            "KV cache     {} full cache; {} with sliding-window savings ({} of {} layers slide)",
            human(kv.full),
            human(kv.with_sliding_window_savings),
            kv.sliding_layers,
            kv.per_layer.len()
        );
        let _ = writeln!(
            s,
            "activations  decode {}, prefill of {} tokens {}",
            human(b.activations.decode),
            b.activations.prefill_tokens,
            human(b.activations.prefill)
        );
        let _ = writeln!(
            s,
            "load         {} ({} + {:.0}% of the weights, assumed)",
            human(b.load_overhead),
            human(self.assumptions.overhead_fixed_bytes),
            self.assumptions.overhead_weight_fraction * 100.0
        );
        let _ = writeln!(
            s,
            "total        {} ({} with sliding-window savings)",
            human(b.total),
            human(b.total_with_sliding_window_savings)
        );
        let _ = writeln!(s, "decode reads {} per token at position {}", human(b.decode_bytes_per_token), b.context);
        if b.per_layer_table > 0 {
            let _ = writeln!(
                s,
                "per-layer    {} embedding table beside the weights: mapped from disk, one row read per token, not in the total",
                human(b.per_layer_table)
            );
        }
        for n in &m.notes {
            let _ = writeln!(s, "note         {n}");
        }
        let _ = writeln!(s);
        let width = self.devices.iter().map(|d| d.device.name.len()).max().unwrap_or(6).max(6);
        let _ = writeln!(
            s,
            "{:width$}  {:>6}  {:>7}  {:>5}  {:>7}  recommended (scheme, context, compute units)",
            "device", "RAM", "usable", "fits", "tok/s"
        );
        for d in &self.devices {
            let r = &d.recommendation;
            let rec = match (r.scheme, r.context) {
                (Some(q), Some(c)) => format!(
                    "{} @ {c}, {}, ≤{:.0} tok/s",
                    q.name(),
                    r.compute_units,
                    r.decode_tokens_per_second.unwrap_or(0.0)
                ),
                _ => "nothing fits".into(),
            };
            let _ = writeln!(
                s,
                "{:width$}  {:>6}  {:>7}  {:>5}  {:>7.1}  {rec}",
                d.device.name,
                format!("{:.0} GB", d.device.ram_gib),
                format!("{:.1} GB", d.device.usable_gib),
                d.fit.label(),
                d.decode_tokens_per_second
            );
        }
        if self.devices.len() == 1 {
            let d = &self.devices[0];
            let _ = writeln!(
                s,
                "\n{}: {} usable, {} headroom; {:.1} GB/s ({:?}); recommendation: {}",
                d.device.name,
                human(d.usable_bytes),
                if d.headroom_bytes >= 0 {
                    human(d.headroom_bytes as u64)
                } else {
                    format!("-{}", human(d.headroom_bytes.unsigned_abs()))
                },
                d.device.bandwidth_gbps,
                d.device.bandwidth_source,
                d.recommendation.reason
            );
        }
        let _ = writeln!(
            s,
            "\nfits: total within {:.0}% of the usable memory (tight: within 100%); tok/s: bandwidth ÷ bytes read per \
             token, an upper bound. Usable memory: iPhone/iPad with the increased-memory-limit entitlement, Mac the \
             GPU working set. Sources and estimates: docs/devices.md.",
            self.assumptions.margin * 100.0
        );
        s
    }
}
