//! Checkpoint readers (safetensors, GGUF), one module per architecture family, and the
//! passes that turn a checkpoint into an ML Program package.

pub mod gguf;

pub use corelm_format::{Error, Result};
