//! Names of the inputs, outputs and states of the functions corelm writes.

/// Token ids, int32 (1, N).
pub const INPUT_IDS: &str = "inputIds";
/// The rows of the per-layer embedding table (Gemma 3n, 4) at the token ids, (1, N, layers ×
/// width): the driver gathers them from the package's `Data/ai.corelm/per_layer_embeddings.bin`.
pub const PER_LAYER_EMBEDDINGS: &str = "perLayerEmbeddings";
/// What a later part of a split model takes in place of the token ids.
pub const HIDDEN_STATES: &str = "hiddenStates";
/// Additive causal mask (1, 1, N, end).
pub const CAUSAL_MASK: &str = "causalMask";
/// The write position of a fixed-length function, int32 (1).
pub const POSITION: &str = "position";
/// The KV caches: states (iOS 18) or inputs (iOS 16/17), (layers, 1, kv_heads, context, head_dim).
pub const KEY_CACHE: &str = "keyCache";
pub const VALUE_CACHE: &str = "valueCache";
/// Hybrid models' recurrent states (iOS 18 states, fp16; `…Residual` beside each in fp32
/// packages): each recurrent layer's window of its last convolution inputs, (layers, 1,
/// channels, 1, taps − 1), and each Gated DeltaNet or Mamba-2 layer's matrix state, (layers, 1,
/// value heads, key dim (Mamba-2: state size), value dim (head size)). Unlike a KV cache they
/// cannot be rewound by moving the write position.
pub const CONV_STATE: &str = "convState";
pub const RECURRENT_STATE: &str = "recurrentState";
/// Logits (1, N, vocab), or with a split LM head the blocks `logits_0`, `logits_1`, ...
pub const LOGITS: &str = "logits";
/// The greedy token of each position, computed in the graph (Neural Engine profile).
pub const ARGMAX: &str = "argmax";
/// What a part of a split model hands to the next.
pub const NEXT_HIDDEN_STATES: &str = "nextHiddenStates";

/// The output that carries an input's new value to the next call (iOS 16/17 KV caches:
/// `keyCacheOut` for `keyCache`).
pub fn carried_output(input: &str) -> String {
    format!("{input}Out")
}

/// Block `i` of a split LM head's logits.
pub fn logits_block(i: usize) -> String {
    format!("{LOGITS}_{i}")
}

/// Whether an output holds logits: [`LOGITS`] or a block of them.
pub fn is_logits(name: &str) -> bool {
    name == LOGITS || name.strip_prefix("logits_").is_some_and(|i| i.parse::<usize>().is_ok())
}
