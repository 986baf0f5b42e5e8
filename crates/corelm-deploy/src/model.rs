//! What the planner needs to know about a model, from a checkpoint's configuration (Hugging Face
//! `config.json` or a GGUF file) or from a converted package (its metadata, weight blobs and KV
//! cache states).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use corelm_contract::weights::{WeightMatrices, WeightMatrix, MIN_COMPRESSED_SIDE};
use corelm_contract::{keys, names};
use corelm_convert::config::{Attention, Mixer, ModelConfig, Norm, QkNorm};
use corelm_format::mil::program::{Binding, Operation, Program, Value, ValueData};
use corelm_format::model::FeatureKind;
use corelm_format::tensor::{element_count, storage_bytes};
use corelm_format::{Error, Package, Result};
use serde::Serialize;

/// A weight matrix that compression applies to (linear layers, the embedding table, the LM head).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Matrix {
    pub rows: u64,
    pub cols: u64,
    /// The embedding table or an LM head of the vocabulary (compressed with the embedding scheme).
    pub embedding: bool,
    /// Gathered by the token ids (the embedding table).
    pub gathered: bool,
    /// Read by that gather only (an untied embedding table): one row per token.
    pub gathered_only: bool,
    /// Bytes as stored in a package (values plus scales, offsets or tables); `None` for sources.
    pub stored_bytes: Option<u64>,
}

/// The KV cache of one layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KvLayer {
    pub kv_heads: u64,
    pub head_dim: u64,
    /// Sliding-window length, for layers that only attend to the last `window` tokens.
    pub window: Option<u64>,
}

/// A converted package's fixed properties.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PackageInfo {
    /// Tokens its KV cache holds.
    pub context: usize,
    /// Bytes of distinct weight blobs the program references.
    pub weight_bytes: u64,
    /// Bytes of the KV cache states (or cache inputs) as declared.
    pub kv_bytes: u64,
    /// Fixed query lengths of its functions; empty when flexible.
    pub query_lengths: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelShape {
    pub name: String,
    pub architecture: String,
    /// Parameters in the checkpoint's layout (embeddings counted once when tied).
    pub parameters: u64,
    pub hidden: u64,
    pub vocab: u64,
    pub heads: u64,
    pub intermediate: u64,
    pub layers: u64,
    /// The longest context the model can be converted for (learned positions, or a package's
    /// own context); `None` when RoPE allows any.
    pub max_context: Option<usize>,
    /// `max_position_embeddings` of the configuration, when known.
    pub trained_positions: Option<usize>,
    pub tied_embeddings: bool,
    #[serde(skip)]
    pub matrices: Vec<Matrix>,
    /// Values stored as fp32 whatever the scheme (norm weights: corelm computes norms in fp32).
    pub fp32_values: u64,
    /// Other values stored as fp16 (linear biases, zero or not; learned position embeddings).
    pub fp16_values: u64,
    /// Rotary dimension of each RoPE table pair (cos and sin, context × dim, fp16).
    pub rope_dims: Vec<u64>,
    #[serde(skip)]
    pub kv_layers: Vec<KvLayer>,
    /// Hybrid models' recurrent states (convolution windows, Gated DeltaNet matrices): a fixed
    /// size whatever the context, read and rewritten every call.
    pub recurrent_state_bytes: u64,
    pub package: Option<PackageInfo>,
    /// The per-layer embedding table (Gemma 3n, 4): kept beside the program, mapped, one row
    /// read per token, not loaded.
    pub per_layer_table: Option<SideTable>,
    /// What could not be read and was assumed.
    pub notes: Vec<String>,
}

/// A table the runtime gathers rows of from a file beside the program.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SideTable {
    pub rows: u64,
    pub cols: u64,
    /// Bytes per value (2: fp16, 4: fp32).
    pub value_bytes: u64,
}

impl SideTable {
    /// From its metadata value, `DTYPE:ROWSxWIDTH` ([`keys::PER_LAYER_EMBEDDINGS`]).
    fn from_metadata(value: &str) -> Option<SideTable> {
        let (dtype, size) = value.split_once(':')?;
        let (rows, cols) = size.split_once('x')?;
        let value_bytes = match dtype {
            "fp32" => 4,
            _ => 2,
        };
        Some(SideTable { rows: rows.parse().ok()?, cols: cols.parse().ok()?, value_bytes })
    }

    pub fn bytes(&self) -> u64 {
        self.rows * self.cols * self.value_bytes
    }

    pub fn row_bytes(&self) -> u64 {
        self.cols * self.value_bytes
    }
}

impl ModelShape {
    /// From a configuration, with the weights laid out as `corelm convert` stores them.
    pub fn from_config(c: &ModelConfig, name: &str) -> ModelShape {
        // The widest MLP sets the activations' peak (Gemma 3n and 4 vary it by layer), or a
        // hybrid's recurrent input projection where wider (LFM2's B, C, x: 3 × hidden).
        let recurrent_width = |l: &corelm_convert::config::LayerShape| match (l.mixer, c.linear) {
            (Mixer::ShortConv { .. }, _) => 3 * c.hidden_size,
            (Mixer::GatedDeltaNet, Some(la)) => la.conv_channels(),
            (Mixer::Mamba2, Some(la)) => la.value_heads * (la.value_dim + 1) + la.conv_channels(),
            _ => 0,
        };
        let widest =
            c.layers.iter().map(|l| l.intermediate.max(recurrent_width(l))).max().unwrap_or(c.intermediate_size);
        let (h, i, v) = (c.hidden_size as u64, widest as u64, c.vocab_size as u64);
        let m = |rows: u64, cols: u64| Matrix {
            rows,
            cols,
            embedding: false,
            gathered: false,
            gathered_only: false,
            stored_bytes: None,
        };
        let mut matrices = vec![Matrix {
            rows: v,
            cols: h,
            embedding: true,
            gathered: true,
            gathered_only: !c.tie_word_embeddings,
            stored_bytes: None,
        }];
        let per_layer_width = c.per_layer_inputs.map_or(0, |p| p.width as u64);
        let streams = c.altup.map_or(1, |a| a.inputs as u64);
        // Per-layer embeddings: a second table (beside the program, see `per_layer_table`) and
        // the projection of the token embedding into every layer's input.
        let per_layer_table = c.per_layer_inputs.map(|p| SideTable {
            rows: p.vocab as u64,
            cols: c.num_layers as u64 * per_layer_width,
            value_bytes: 2,
        });
        if let Some(t) = &per_layer_table {
            matrices.push(m(t.cols, h));
        }
        matrices.extend((1..streams).flat_map(|_| [m(h, h), m(h, h)]));
        for shape in &c.layers {
            let (hd, i) = (shape.head_dim as u64, shape.intermediate as u64);
            let (q, kv) = (c.num_heads as u64 * hd, shape.kv_heads as u64 * hd);
            match (shape.mixer, c.linear) {
                (Mixer::ShortConv { .. }, _) => matrices.extend([m(3 * h, h), m(h, h)]),
                (Mixer::GatedDeltaNet, Some(la)) => {
                    let (values, heads) = ((la.value_heads * la.value_dim) as u64, la.value_heads as u64);
                    let qkv = la.conv_channels() as u64;
                    matrices.extend([m(qkv, h), m(values, h), m(heads, h), m(heads, h), m(h, values)]);
                }
                (Mixer::Mamba2, Some(la)) => {
                    let (values, heads) = ((la.value_heads * la.value_dim) as u64, la.value_heads as u64);
                    matrices.extend([m(values + la.conv_channels() as u64 + heads, h), m(h, values)]);
                }
                _ => {
                    matrices.push(m(q, h));
                    if c.attention_gate {
                        matrices.push(m(q, h));
                    }
                    if shape.kv_from.is_none() {
                        matrices.push(m(kv, h));
                        if !shape.values_are_keys {
                            matrices.push(m(kv, h));
                        }
                    }
                    matrices.push(m(h, q));
                }
            }
            if c.gated_mlp {
                matrices.extend([m(i, h), m(i, h), m(h, i)]);
            } else {
                matrices.extend([m(i, h), m(h, i)]);
            }
            if per_layer_width > 0 {
                matrices.extend([m(per_layer_width, h), m(h, per_layer_width)]);
            }
            if let Some(r) = c.laurel_rank {
                matrices.extend([m(r as u64, h), m(h, r as u64)]);
            }
        }
        if !c.tie_word_embeddings {
            matrices.push(Matrix { embedding: true, ..m(v, h) });
        }
        // Norm weights (and LayerNorm biases) as `store_weights` keeps them: fp32; with them
        // the per-layer embeddings', LAuReL's and AltUp's norms, scales and coefficients.
        let layer_norm = matches!(c.norm, Norm::Layer { .. });
        let per_norm = if layer_norm { 2 * h } else { h };
        let mut fp32_values = per_norm + per_layer_width;
        for shape in &c.layers {
            let hd = shape.head_dim as u64;
            let mut norms = 0;
            if c.block_norms.pre() {
                norms += 2 * per_norm;
            }
            if c.block_norms.post() {
                norms += 2 * h;
            }
            let own_keys = shape.kv_from.is_none();
            norms += match (shape.mixer, c.qk_norm) {
                (Mixer::Attention, QkNorm::PerHead) => hd + if own_keys { hd } else { 0 },
                (Mixer::Attention, QkNorm::Projection) => (c.num_heads + shape.kv_heads) as u64 * hd,
                _ => 0,
            };
            // The recurrent layers' kernels, biases and decay parameters, fp32 like the norms.
            norms += match (shape.mixer, c.linear) {
                (Mixer::ShortConv { kernel, bias }, _) => h * kernel as u64 + if bias { h } else { 0 },
                (Mixer::GatedDeltaNet, Some(la)) => {
                    (la.conv_channels() * la.conv_kernel + 2 * la.value_heads + la.value_dim) as u64
                }
                // Kernel and bias, dt bias, A_log and D per head, the norm's gain over the values.
                (Mixer::Mamba2, Some(la)) => {
                    let bias = if la.conv_bias { la.conv_channels() } else { 0 };
                    (la.conv_channels() * la.conv_kernel + bias + 3 * la.value_heads + la.value_heads * la.value_dim)
                        as u64
                }
                _ => 0,
            };
            norms += if per_layer_width > 0 { h } else { 0 } + if c.laurel_rank.is_some() { h } else { 0 };
            if streams > 1 {
                // Router norm and correction scale (h each), router (n × h), coefficients; the
                // fp32 linears of the router (n rows), prediction (n²) and correction (n) carry
                // fp32 zero biases, as blobs from 10 values up.
                norms += 2 * h + streams * h + streams * streams * (streams + 1);
                norms += [streams, streams * streams, streams].iter().filter(|&&r| r >= 10).sum::<u64>();
            }
            norms += u64::from(c.layer_scalar);
            fp32_values += norms;
        }
        // Every `linear` op carries a bias of its output rows in fp16: the model's own, else the
        // zeros the MIL builder writes for the optional input (as blobs from 10 values up).
        let linear_rows: u64 = matrices.iter().filter(|m| !m.gathered_only && m.rows >= 10).map(|m| m.rows).sum();
        let position_embeddings = if c.rope.is_none() { c.max_position_embeddings as u64 * h } else { 0 };
        // Matrices too small to compress stay fp16 whatever the scheme.
        let min = MIN_COMPRESSED_SIDE as u64;
        let (matrices, small): (Vec<Matrix>, Vec<Matrix>) =
            matrices.into_iter().partition(|m| m.rows >= min && m.cols >= min);
        let fp16_values = linear_rows + position_embeddings + small.iter().map(|m| m.rows * m.cols).sum::<u64>();
        let rope_dims = c.rope.iter().chain(&c.rope_local).map(|r| r.rotary_dim as u64).collect();
        // Only layers that compute keys and values have a cache (the others read theirs).
        let kv_layers = c
            .cached_layers()
            .map(|l| KvLayer {
                kv_heads: c.layer(l).kv_heads as u64,
                head_dim: c.layer(l).head_dim as u64,
                window: match c.layer_attention[l] {
                    Attention::Full => None,
                    Attention::Sliding(w) => Some(w as u64),
                },
            })
            .collect();
        ModelShape {
            name: name.to_string(),
            architecture: c.family.name().to_string(),
            parameters: c.parameter_count(),
            hidden: h,
            vocab: v,
            heads: c.num_heads as u64,
            intermediate: i,
            layers: c.num_layers as u64,
            max_context: if c.rope.is_none() { Some(c.max_position_embeddings) } else { None },
            trained_positions: Some(c.max_position_embeddings),
            tied_embeddings: c.tie_word_embeddings,
            matrices,
            fp32_values,
            fp16_values,
            rope_dims,
            kv_layers,
            recurrent_state_bytes: recurrent_state_values(c) * 2,
            package: None,
            per_layer_table,
            notes: vec![],
        }
    }

    /// Whether this describes a converted package (fixed context and stored weights).
    pub fn is_package(&self) -> bool {
        self.package.is_some()
    }

    /// From a package: its weight blobs, KV cache states and `corelm.*` metadata.
    pub fn from_package(path: &Path) -> Result<ModelShape> {
        let pkg = Package::open(path)?;
        let model = pkg.model();
        let ud = &model.description.metadata.user_defined;
        let mut notes = Vec::new();
        let default = model.description.default_function.clone().unwrap_or_else(|| "main".to_string());
        let description = model
            .description
            .function(&default)
            .or_else(|| model.description.functions.first())
            .ok_or_else(|| Error::malformed(path, "the package describes no function"))?;

        // Weight blobs, each counted once across functions.
        let mut seen = HashSet::new();
        let mut weight_bytes = 0u64;
        for f in model.program.functions.values() {
            for op in &f.block.operations {
                for v in blob_values(op) {
                    if let Some(key) = blob_key(v) {
                        if seen.insert(key) {
                            weight_bytes += value_bytes(v);
                        }
                    }
                }
            }
        }

        // The KV cache: `keyCache` / `valueCache` states (or inputs, for iOS 16/17 packages); a
        // hybrid model's recurrent states apart, their size fixed.
        let recurrent = |name: &str| name.starts_with(names::CONV_STATE) || name.starts_with(names::RECURRENT_STATE);
        let recurrent_state_bytes = description
            .states
            .iter()
            .filter(|f| recurrent(&f.name))
            .filter_map(|f| f.array().and_then(|a| storage_bytes(a.dtype?, element_count(&a.shape)?)))
            .map(|b| b as u64)
            .sum();
        let caches: Vec<(String, Vec<usize>, u64)> = description
            .states
            .iter()
            .chain(&description.inputs)
            .filter(|f| !recurrent(&f.name))
            .filter(|f| {
                f.name == names::KEY_CACHE || f.name == names::VALUE_CACHE || matches!(f.kind, FeatureKind::State(_))
            })
            .filter_map(|f| {
                let a = f.array()?;
                let bytes = storage_bytes(a.dtype?, element_count(&a.shape)?)? as u64;
                Some((f.name.clone(), a.shape.clone(), bytes))
            })
            .collect();
        let kv_bytes: u64 = caches.iter().map(|c| c.2).sum();
        let key = caches.iter().find(|c| c.0 == names::KEY_CACHE && c.1.len() == 5);
        let meta_usize = |k: &str| ud.get(k).and_then(|s| s.parse::<usize>().ok());
        // Sizes from a package are a stranger's numbers too: bound them as config fields are.
        let limit = |what: &str, n: usize, field: &str| -> Result<usize> {
            let max = corelm_convert::config::config_limit(field);
            if n as u64 > max {
                return Err(Error::malformed(path, format!("{what} is {n}; corelm plans for at most {max}")));
            }
            Ok(n)
        };
        if let Some((_, s, _)) = key {
            limit("the keyCache state's layer count", s[0], "num_hidden_layers")?;
            limit("the keyCache state's context", s[3], "max_position_embeddings")?;
        }
        let context = match (meta_usize(keys::CONTEXT_LENGTH), key) {
            (Some(c), _) => limit(keys::CONTEXT_LENGTH, c, "max_position_embeddings")?,
            (None, Some(k)) => k.1[3],
            (None, None) => {
                return Err(Error::malformed(
                    path,
                    "cannot tell the context length: no corelm.context_length metadata and no keyCache state",
                ))
            }
        };
        let kv_layers = match key {
            Some(_) => full_length_kv_layers(path, &caches)?,
            None => {
                notes.push(
                    "no keyCache state of shape (layers, 1, kv_heads, context, head_dim): the KV cache is the \
                     declared state bytes, scaled linearly with the context"
                        .into(),
                );
                vec![]
            }
        };
        if key.is_some()
            && matches!(
                ud.get(keys::ARCHITECTURE).map(String::as_str),
                Some("gemma2" | "gemma3_text" | "gemma3n_text" | "gemma4_text")
            )
        {
            notes.push(
                "the package does not record which layers slide: the sliding-window savings are not computed".into(),
            );
        }

        let layer_range = layer_range(ud);
        let (matrices, hidden, vocab_seen) = package_matrices(&model.program);
        let per_layer_table = ud.get(keys::PER_LAYER_EMBEDDINGS).and_then(|v| SideTable::from_metadata(v));
        let vocab = meta_usize(keys::VOCAB_SIZE).map(|v| v as u64).or(vocab_seen).unwrap_or(0);
        let hidden = hidden.unwrap_or(0);
        let head_dim = kv_layers.first().map(|l| l.head_dim).unwrap_or(0);
        // The attention output projection is (hidden, heads × head_dim); the MLP's widest side
        // is the intermediate size.
        let intermediate = matrices
            .iter()
            .filter(|m| !m.embedding)
            .map(|m| m.rows.max(m.cols))
            .filter(|&d| d != hidden)
            .max()
            .unwrap_or(4 * hidden);
        // The narrowest such projection: MLPs (and hybrids' recurrent layers) read wider ones.
        let heads = matrices
            .iter()
            .filter(|m| !m.embedding && m.rows == hidden && m.cols != intermediate)
            .map(|m| m.cols)
            .filter(|&c| head_dim > 0 && c % head_dim == 0)
            .min()
            .map(|c| c / head_dim)
            .unwrap_or_else(|| hidden.checked_div(head_dim).unwrap_or(0));
        // Tied: the table the token ids gather is also the LM head's weight.
        let tied = matrices.iter().any(|m| m.gathered && !m.gathered_only);
        let parameters = matrices.iter().map(|m| m.rows * m.cols).sum();
        let query_lengths = match ud.get(keys::QUERY_LENGTHS).map(String::as_str) {
            Some("flexible") | None => vec![],
            Some(list) => list.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        };
        if matrices.is_empty() {
            notes.push("no weight matrices found (linear weights or embeddings): --quantize cannot be planned".into());
        }
        Ok(ModelShape {
            name: ud
                .get(keys::SOURCE)
                .or_else(|| ud.get(keys::HF_EXPORTERS_NAME))
                .cloned()
                .unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()),
            architecture: ud.get(keys::ARCHITECTURE).cloned().unwrap_or_else(|| "unknown".into()),
            parameters,
            hidden,
            vocab,
            heads,
            intermediate,
            layers: layer_range.map_or(kv_layers.len() as u64, |(start, end)| end.saturating_sub(start) as u64),
            max_context: Some(context),
            trained_positions: None,
            tied_embeddings: tied,
            matrices,
            fp32_values: 0,
            fp16_values: 0,
            rope_dims: vec![],
            kv_layers,
            recurrent_state_bytes,
            package: Some(PackageInfo { context, weight_bytes, kv_bytes, query_lengths }),
            per_layer_table,
            notes,
        })
    }
}

/// Values of a hybrid model's recurrent states: each recurrent layer's convolution window
/// (channels × (taps − 1)) and each Gated DeltaNet layer's value heads × key dim × value dim.
fn recurrent_state_values(c: &ModelConfig) -> u64 {
    c.layers
        .iter()
        .map(|l| match (l.mixer, c.linear) {
            (Mixer::ShortConv { kernel, .. }, _) => (c.hidden_size * (kernel - 1)) as u64,
            (Mixer::GatedDeltaNet | Mixer::Mamba2, Some(la)) => {
                (la.conv_channels() * (la.conv_kernel - 1) + la.value_heads * la.key_dim * la.value_dim) as u64
            }
            _ => 0,
        })
        .sum()
}

/// The layers of every full-length key cache: `keyCache`, and where layers differ in shape
/// (Gemma 4's global layers) `keyCacheGlobal` and the like; not a state pair's residual half.
fn full_length_kv_layers(path: &Path, caches: &[(String, Vec<usize>, u64)]) -> Result<Vec<KvLayer>> {
    let mut layers = Vec::new();
    for (name, s, _) in caches.iter().filter(|c| {
        c.0.starts_with(names::KEY_CACHE) && !c.0.ends_with("Residual") && !c.0.ends_with("Local") && c.1.len() == 5
    }) {
        let max = corelm_convert::config::config_limit("num_hidden_layers");
        if s[0] as u64 > max {
            return Err(Error::malformed(
                path,
                format!("the {name} state's layer count is {}; corelm plans for at most {max}", s[0]),
            ));
        }
        layers.extend(vec![KvLayer { kv_heads: s[2] as u64, head_dim: s[4] as u64, window: None }; s[0]]);
    }
    Ok(layers)
}

/// `corelm.layers` (`start..end`): a part's layers, or a model whose caches do not count every
/// layer (KV sharing).
fn layer_range(ud: &BTreeMap<String, String>) -> Option<(usize, usize)> {
    let (a, b) = ud.get(keys::LAYERS)?.split_once("..")?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn blob_key(v: &Value) -> Option<(String, u64)> {
    match &v.data {
        ValueData::Blob { file, offset } => Some((file.clone(), *offset)),
        ValueData::Immediate(_) => None,
    }
}

fn value_bytes(v: &Value) -> u64 {
    v.ty.shape().and_then(|s| element_count(&s)).and_then(|n| storage_bytes(v.ty.dtype, n)).unwrap_or(0) as u64
}

/// Values stored in blobs that an op reads: attributes and inline inputs.
fn blob_values(op: &Operation) -> impl Iterator<Item = &Value> {
    let inline = op.inputs.values().flatten().filter_map(|b| match b {
        Binding::Value(v) => Some(v),
        Binding::Name(_) => None,
    });
    op.attributes.values().chain(inline).filter(|v| matches!(v.data, ValueData::Blob { .. }))
}

/// The value of parameter `name` of a constant op, as an attribute or an inline input.
fn param<'a>(op: &'a Operation, name: &str) -> Option<&'a Value> {
    op.attributes.get(name).or_else(|| match op.input(name) {
        Some(Binding::Value(v)) => Some(v),
        _ => None,
    })
}

/// The weight matrices of a program ([`WeightMatrices`]: constants, plain or compressed, that
/// a `linear` or 1×1 `conv` multiplies or the token ids gather), each blob once, with the bytes
/// stored for it. Returns them with the hidden size and the vocabulary (rows of the gathered
/// table).
fn package_matrices(program: &Program) -> (Vec<Matrix>, Option<u64>, Option<u64>) {
    let weights = WeightMatrices::find(program);
    // Functions share blobs, and a tied table is one blob read by two constant ops (gathered
    // and multiplied): each matrix once, by the blob its values are stored in, its uses merged.
    let mut by_blob: BTreeMap<(String, u64), (WeightMatrix, u64)> = BTreeMap::new();
    for f in program.functions.values() {
        for op in &f.block.operations {
            let Some(m) = op.outputs.first().and_then(|o| weights.matrices.get(&o.name)) else { continue };
            let values = match op.op_type.as_str() {
                "const" => param(op, "val"),
                "constexpr_blockwise_shift_scale" => param(op, "data"),
                "constexpr_lut_to_dense" => param(op, "indices"),
                _ => None,
            };
            let Some(key) = values.and_then(blob_key) else { continue };
            let stored = blob_values(op).map(value_bytes).sum();
            let (seen, _) = by_blob.entry(key).or_insert_with(|| (m.clone(), stored));
            seen.multiplied |= m.multiplied;
            seen.gathered |= m.gathered;
            seen.embedding |= m.embedding;
        }
    }
    let matrices: Vec<Matrix> = by_blob
        .into_values()
        .map(|(m, stored)| Matrix {
            rows: m.rows as u64,
            cols: m.cols as u64,
            embedding: m.embedding,
            gathered: m.gathered,
            gathered_only: m.gathered && !m.multiplied,
            stored_bytes: Some(stored),
        })
        .collect();
    let gathered = matrices.iter().find(|m| m.gathered);
    let (hidden, vocab) = (gathered.map(|m| m.cols), gathered.map(|m| m.rows));
    (matrices, hidden, vocab)
}
