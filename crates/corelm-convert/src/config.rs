//! The architecture-independent description of a decoder-only transformer, and the typed
//! reading of Hugging Face `config.json` fields with errors that name the file and the field.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// The families corelm converts, by their `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma,
    Gemma2,
    Gemma3,
    Phi3,
    Gpt2,
    SmolLm3,
    Granite,
    /// Granite 4's dense models (`granitemoehybrid` without Mamba-2 layers or experts).
    Granite4,
    Olmo2,
    Olmo3,
    /// Gemma 3n's language model: AltUp streams, LAuReL, per-layer embeddings, KV sharing,
    /// activation sparsity.
    Gemma3n,
    /// Gemma 4's dense language models: per-layer embeddings, KV sharing, wider global heads.
    Gemma4,
    /// LFM2: short convolutions with a few attention layers (a hybrid with recurrent state).
    Lfm2,
    /// Qwen3.5's dense language models: Gated DeltaNet with gated attention every fourth layer.
    Qwen35,
}

impl Family {
    /// The `model_type` corelm writes for this family (the first its registration lists).
    pub fn name(self) -> &'static str {
        crate::arch::registration(self).model_types[0]
    }

    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma | Family::Gemma2 | Family::Gemma3 | Family::Gemma3n | Family::Gemma4)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Norm {
    /// x / rms(x) * w, or * (1 + w) for Gemma.
    Rms { eps: f64, add_one: bool },
    /// Mean and variance, with weight and bias (GPT-2).
    Layer { eps: f64 },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Silu,
    GeluTanh,
    Gelu,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by the factor.
    Linear(f64),
    /// NTK-aware base scaling for contexts past the trained length.
    Dynamic {
        factor: f64,
        original_max_position: usize,
    },
    /// Llama 3 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: usize,
    },
    /// LongRoPE (Phi-3.5, Phi-4-mini): each frequency divided by its own factor, the short set
    /// within the trained length and the long one past it, and cos/sin scaled by
    /// `attention_factor`.
    LongRope {
        short_factor: Arc<[f64]>,
        long_factor: Arc<[f64]>,
        original_max_position: usize,
        attention_factor: f64,
    },
    /// Gemma 4's global layers: the first `rotated_pairs` pairs at the usual frequencies over
    /// the whole head, the rest at frequency 0 (passed through), all divided by `factor`.
    Proportional {
        rotated_pairs: usize,
        factor: f64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Dimensions rotated per head (head_dim unless partial rotary).
    pub rotary_dim: usize,
}

/// Where a layer's norms sit around its attention and MLP blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockNorms {
    /// Before each block (Llama).
    Pre,
    /// Before each block and on its output before the residual add (Gemma 2 and 3).
    Sandwich,
    /// Only on each block's output before the residual add (OLMo 2 and 3).
    Post,
}

impl BlockNorms {
    pub fn pre(self) -> bool {
        self != BlockNorms::Post
    }

    pub fn post(self) -> bool {
        self != BlockNorms::Pre
    }
}

/// Norms of the queries and keys before RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's head_dim values (Qwen3, Gemma 3).
    PerHead,
    /// Over the whole projection, all heads together (OLMo 2 and 3).
    Projection,
}

/// Whether a layer attends over the whole context or a sliding window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attention {
    Full,
    Sliding(usize),
}

/// What mixes tokens in a layer: attention over a KV cache, or a recurrence whose state is a
/// fixed size whatever the context (hybrid models).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mixer {
    #[default]
    Attention,
    /// LFM2's gated short convolution: `in_proj` gives B, C and x; the layer outputs
    /// `out_proj(C · conv(B · x))`, the depthwise causal convolution over `kernel` tokens;
    /// `bias`: the projections and the convolution have biases.
    ShortConv { kernel: usize, bias: bool },
    /// Gated DeltaNet linear attention (Qwen3.5): see [`LinearAttention`].
    GatedDeltaNet,
    /// Mamba-2's state-space layer (Granite 4.0-H): the same chunked linear attention without the
    /// delta rule's correction, B and C in the keys' and queries' places, the inputs times the
    /// time step as values, plus a skip connection per head.
    Mamba2,
}

impl Mixer {
    /// Whether the layer keeps a recurrent state (and no keys and values).
    pub fn is_recurrent(self) -> bool {
        self != Mixer::Attention
    }

    /// Whether the layer keeps a matrix state its calls update in chunks (Gated DeltaNet, Mamba-2):
    /// such functions have fixed lengths, and need fp32.
    pub fn is_chunked(self) -> bool {
        matches!(self, Mixer::GatedDeltaNet | Mixer::Mamba2)
    }
}

/// The sizes of chunked linear-attention layers. Gated DeltaNet: `in_proj_qkv` feeds a depthwise
/// causal convolution (`conv_kernel` taps, SiLU) over queries, keys and values; each value head
/// keeps a `key_dim` × `value_dim` state, decayed and updated by the delta rule every token.
/// Mamba-2: the convolution runs over x, B and C (`key_heads` groups of B and C, `key_dim` the
/// state size; `value_heads` heads of `value_dim`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearAttention {
    pub key_heads: usize,
    pub value_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub conv_kernel: usize,
    /// Biases on the convolution, and on the input and output projections (Mamba-2).
    pub conv_bias: bool,
    pub proj_bias: bool,
    /// Mamba-2's bounds on the time step, when finite.
    pub time_step_limit: Option<(f64, f64)>,
}

impl LinearAttention {
    /// Channels of the convolution: queries, keys, values.
    pub fn conv_channels(&self) -> usize {
        2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim
    }
}

/// What one layer's attention and MLP look like, where layers differ (Gemma 3n and 4, hybrid
/// models), and where its keys and values come from.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerShape {
    pub mixer: Mixer,
    pub head_dim: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    /// The earlier layer whose keys and values this one attends over (KV sharing): it has no
    /// K/V projections and no cache of its own.
    pub kv_from: Option<usize>,
    /// Gemma 4's `attention_k_eq_v` global layers: the values are the key projection's output.
    pub values_are_keys: bool,
    /// Gemma 3n's activation sparsity: the gate keeps only what exceeds mean + z·std of its
    /// row, z (given here) the standard normal quantile of the fraction to zero; `None`: dense.
    pub sparsity_cutoff: Option<f64>,
}

impl LayerShape {
    /// A layer with the model's common sizes, its own keys and values, and `mixer`.
    pub fn uniform(c: &ModelConfig, mixer: Mixer) -> LayerShape {
        LayerShape {
            mixer,
            head_dim: c.head_dim,
            kv_heads: c.num_kv_heads,
            intermediate: c.intermediate_size,
            kv_from: None,
            values_are_keys: false,
            sparsity_cutoff: None,
        }
    }
}

/// Per-layer embeddings (Gemma 3n, Gemma 4): a second token table of `width` values per layer,
/// combined with a projection of the token embedding and fed into every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerLayerInputs {
    pub width: usize,
    /// Rows of the table; ids past it read row 0 (Gemma 3n).
    pub vocab: usize,
}

/// Gemma 3n's AltUp: the hidden state as `inputs` streams, one of which (`active`) the layer
/// computes on; the others are predicted from it and corrected after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AltUp {
    pub inputs: usize,
    pub active: usize,
    /// Whether the corrected active stream is scaled before the per-layer input gate.
    pub correct_scale: bool,
}

/// Everything the graph builder needs to know about a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub norm: Norm,
    pub activation: Activation,
    /// RoPE of global layers; `None` for learned absolute positions (GPT-2).
    pub rope: Option<Rope>,
    /// RoPE of sliding-window layers when it differs (Gemma 3).
    pub rope_local: Option<Rope>,
    pub layer_attention: Vec<Attention>,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub qk_norm: QkNorm,
    pub block_norms: BlockNorms,
    /// Per layer: whether it rotates queries and keys (SmolLM3 leaves every fourth unrotated).
    pub rope_layers: Vec<bool>,
    /// Multiplier of each block's output before the residual add (Granite).
    pub residual_multiplier: Option<f64>,
    /// Multiplier of the logits (Granite: 1 / `logits_scaling`).
    pub logit_scale: Option<f64>,
    /// Gated MLP (gate, up, down) rather than fc → act → proj.
    pub gated_mlp: bool,
    pub tie_word_embeddings: bool,
    /// Multiplier of the token embeddings (Gemma: √hidden).
    pub embedding_scale: Option<f64>,
    /// Attention scale; 1/√head_dim unless the family says otherwise.
    pub attention_scale: f64,
    pub attn_logit_softcap: Option<f64>,
    pub final_logit_softcap: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Each layer's sizes and KV source.
    pub layers: Vec<LayerShape>,
    /// Values normed per head without a gain (Gemma 3n and 4).
    pub value_norm: bool,
    pub per_layer_inputs: Option<PerLayerInputs>,
    pub altup: Option<AltUp>,
    /// Gemma 3n's LAuReL: a low-rank residual branch of this rank beside attention.
    pub laurel_rank: Option<usize>,
    /// Each layer's output multiplied by a stored scalar (Gemma 4's `layer_scalar`).
    pub layer_scalar: bool,
    /// Attention output gated per channel by sigmoid of a second half of `q_proj` (Qwen3.5).
    pub attention_gate: bool,
    /// The Gated DeltaNet layers' sizes, when the model has such layers.
    pub linear: Option<LinearAttention>,
}

impl ModelConfig {
    /// Parameters of the matrices corelm converts (embeddings counted once when tied; norms and
    /// other vectors left out).
    pub fn parameter_count(&self) -> u64 {
        let (h, v) = (self.hidden_size as u64, self.vocab_size as u64);
        let mut total = v * h + if self.tie_word_embeddings { 0 } else { v * h };
        for l in &self.layers {
            let i = l.intermediate as u64;
            let q = (self.num_heads * l.head_dim) as u64;
            let kv = (l.kv_heads * l.head_dim) as u64;
            let kv_projections = match (l.kv_from, l.values_are_keys) {
                (Some(_), _) => 0,
                (None, true) => h * kv,
                (None, false) => 2 * h * kv,
            };
            let gate = if self.attention_gate { h * q } else { 0 };
            total += match (l.mixer, self.linear) {
                (Mixer::ShortConv { kernel, .. }, _) => 4 * h * h + h * kernel as u64,
                (Mixer::GatedDeltaNet, Some(la)) => {
                    let (values, channels) = ((la.value_heads * la.value_dim) as u64, la.conv_channels() as u64);
                    h * channels + 2 * h * values + 2 * h * la.value_heads as u64 + channels * la.conv_kernel as u64
                }
                (Mixer::Mamba2, Some(la)) => {
                    let (values, channels) = ((la.value_heads * la.value_dim) as u64, la.conv_channels() as u64);
                    h * (values + channels + la.value_heads as u64) + h * values + channels * la.conv_kernel as u64
                }
                _ => 2 * h * q + gate + kv_projections,
            };
            total += if self.gated_mlp { 3 * h * i } else { 2 * h * i };
            if let Some(p) = self.per_layer_inputs {
                total += 2 * h * p.width as u64;
            }
            total += 2 * h * self.laurel_rank.unwrap_or(0) as u64;
        }
        total + self.per_layer_table_parameters()
    }

    /// Parameters of the per-layer embedding table and its projection from the embedding.
    pub fn per_layer_table_parameters(&self) -> u64 {
        self.per_layer_inputs.map_or(0, |p| {
            let row = (self.num_layers * p.width) as u64;
            row * p.vocab as u64 + row * self.hidden_size as u64
        })
    }

    /// Layer `l`'s sizes.
    pub fn layer(&self, l: usize) -> &LayerShape {
        &self.layers[l]
    }

    /// Layers that keep keys and values of their own (the others reuse an earlier layer's, or
    /// keep a recurrent state).
    pub fn cached_layers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_layers).filter(|&l| self.layers[l].kv_from.is_none() && !self.layers[l].mixer.is_recurrent())
    }

    /// Whether any layer keeps a recurrent state, which (unlike a KV cache) cannot be rewound.
    pub fn is_hybrid(&self) -> bool {
        self.layers.iter().any(|l| l.mixer.is_recurrent())
    }
}

/// The largest value corelm accepts for an integer config field. Each bound is far above every
/// published model (Llama 3.1 405B: 126 layers, hidden 16384, intermediate 53248; Gemma 3:
/// vocabulary 262144; the longest contexts: 10M positions), and small enough that products of
/// them (parameter counts, cache sizes in bytes) stay far inside 64 bits.
pub fn config_limit(key: &str) -> u64 {
    match key {
        "num_hidden_layers"
        | "n_layer"
        | "max_window_layers"
        | "sliding_window_pattern"
        | "_sliding_window_pattern" => 1 << 12,
        "num_attention_heads" | "n_head" | "num_key_value_heads" => 1 << 12,
        "hidden_size" | "n_embd" | "head_dim" => 1 << 17,
        "intermediate_size" | "n_inner" => 1 << 20,
        "vocab_size" => 1 << 24,
        "max_position_embeddings" | "n_positions" | "sliding_window" | "original_max_position_embeddings" => 1 << 26,
        // Token ids and anything else: they must at least fit the int32 the graph uses.
        _ => i32::MAX as u64,
    }
}

/// Typed access to one JSON object, naming the file and field in every error.
pub struct Fields<'a> {
    path: PathBuf,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub fn new(path: &Path, value: &'a Value) -> Result<Fields<'a>> {
        let map = value.as_object().ok_or_else(|| Error::malformed(path, "the top level is not a JSON object"))?;
        Ok(Fields { path: path.to_path_buf(), map })
    }

    fn wrong(&self, key: &str, expected: &str, got: &Value) -> Error {
        let kind = match got {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        };
        Error::malformed(&self.path, format!("field `{key}` must be {expected}, but it is {kind}"))
    }

    fn missing(&self, key: &str) -> Error {
        Error::malformed(&self.path, format!("required field `{key}` is missing"))
    }

    pub fn raw(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// A non-negative integer field, at most its [`config_limit`]: a config is a stranger's file,
    /// and sizes from it become allocations and loop counts.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.raw(key) else { return Ok(None) };
        let n = v.as_u64().ok_or_else(|| self.wrong(key, "a non-negative integer", v))?;
        let limit = config_limit(key);
        if n > limit {
            return Err(self.error(format!(
                "field `{key}` is {n}; corelm takes at most {limit} (the bounds are listed in docs/security.md)"
            )));
        }
        Ok(Some(n as usize))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    /// The first of several alternative names that is present (GPT-2 uses `n_embd`, ...).
    pub fn usize_any(&self, keys: &[&str]) -> Result<usize> {
        for k in keys {
            if let Some(v) = self.opt_usize(k)? {
                return Ok(v);
            }
        }
        Err(self.missing(keys[0]))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.wrong(key, "true or false", v)),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.wrong(key, "a string", v)),
        }
    }

    pub fn opt_object(&self, key: &str) -> Result<Option<Fields<'a>>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v @ Value::Object(map)) => {
                let _ = v;
                Ok(Some(Fields { path: self.path.clone(), map }))
            }
            Some(v) => Err(self.wrong(key, "an object", v)),
        }
    }

    /// Token ids given as one integer or a list of integers.
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.raw(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| self.wrong(key, "a list of token ids", v))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(|n| vec![n])
                .ok_or_else(|| self.wrong(key, "a token id", v)),
        }
    }

    /// A list field whose every item `item` reads (`what` names the list in errors).
    fn opt_list<T>(&self, key: &str, what: &str, item: impl Fn(&'a Value) -> Option<T>) -> Result<Option<Vec<T>>> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::Array(items)) => {
                items.iter().map(|v| item(v).ok_or_else(|| self.wrong(key, what, v))).collect::<Result<_>>().map(Some)
            }
            Some(v) => Err(self.wrong(key, what, v)),
        }
    }

    pub fn opt_str_list(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        self.opt_list(key, "a list of strings", Value::as_str)
    }

    pub fn f64_list(&self, key: &str) -> Result<Vec<f64>> {
        self.opt_list(key, "a list of numbers", Value::as_f64)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_bool_list(&self, key: &str) -> Result<Option<Vec<bool>>> {
        // Given as 0/1 (SmolLM3's `no_rope_layers`) or as booleans.
        self.opt_list(key, "a list of 0/1 flags", |v| match v {
            Value::Bool(b) => Some(*b),
            _ => v.as_u64().filter(|&n| n <= 1).map(|n| n == 1),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An error about this file.
    pub fn error(&self, message: impl Into<String>) -> Error {
        Error::malformed(&self.path, message)
    }
}
