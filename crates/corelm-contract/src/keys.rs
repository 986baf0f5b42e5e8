//! Metadata keys (`user_defined` in the model description) corelm writes and reads.

/// The model id a package came from (a Hugging Face repository or a file name).
pub const SOURCE: &str = "corelm.source";
/// The Hugging Face `model_type` the conversion read.
pub const ARCHITECTURE: &str = "corelm.architecture";
/// Tokens the KV cache holds.
pub const CONTEXT_LENGTH: &str = "corelm.context_length";
pub const VOCAB_SIZE: &str = "corelm.vocab_size";
pub const LAYERS: &str = "corelm.layers";
/// `flexible`, or the comma-separated query lengths of a fixed-length package's functions.
pub const QUERY_LENGTHS: &str = "corelm.query_lengths";
/// `default` or `ane`.
pub const PROFILE: &str = "corelm.profile";
/// Slots of the ring-buffer caches of sliding-window layers (the Neural Engine profile): present
/// when chunks must start at a multiple of their length.
pub const RING_SLOTS: &str = "corelm.ring_slots";
/// `DTYPE:ROWSxWIDTH` (`fp16` or `fp32`) of the per-layer embedding table stored beside the
/// program (row-major, little-endian, in `Data/ai.corelm/per_layer_embeddings.bin`); ids past its
/// rows read row 0.
pub const PER_LAYER_EMBEDDINGS: &str = "corelm.per_layer_embeddings";
/// Where that table lies in a package.
pub const PER_LAYER_EMBEDDINGS_PATH: &str = "Data/ai.corelm/per_layer_embeddings.bin";
/// Hybrid models: the comma-separated names of the recurrent states (see
/// [`crate::names::CONV_STATE`]). Their state cannot be rewound by moving the write position,
/// and a call must not carry padding tokens, which would enter it.
pub const RECURRENT_STATES: &str = "corelm.recurrent_states";
/// The comma-separated package names of a split model's parts, in running order.
pub const CHUNKS: &str = "corelm.chunks";
pub const BOS_TOKEN_ID: &str = "corelm.bos_token_id";
/// Comma-separated.
pub const EOS_TOKEN_IDS: &str = "corelm.eos_token_ids";
pub const PAD_TOKEN_ID: &str = "corelm.pad_token_id";
/// The corelm version that wrote the package.
pub const VERSION: &str = "corelm.version";
/// The model id as Hugging Face's exporters (and coremltools users) record it.
pub const HF_EXPORTERS_NAME: &str = "co.huggingface.exporters.name";
