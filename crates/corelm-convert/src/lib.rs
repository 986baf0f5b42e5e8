//! Checkpoint readers (safetensors, GGUF), one module per architecture family, and the
//! passes that turn a checkpoint into an ML Program package.

pub mod arch;
pub mod checkpoint;
pub mod compress;
pub mod config;
pub mod convert;
pub mod gguf;
pub mod gguf_source;
pub mod graph;
pub mod rope;

pub use corelm_format::{Error, Result};
