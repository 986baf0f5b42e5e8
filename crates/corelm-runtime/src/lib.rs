//! What turns a converted model into a text generator, meant to be embedded in apps: the
//! tokenizer shipped inside the package, and measurements over token streams.

pub mod bundle;
pub mod chat;
pub mod compile_cache;
#[cfg(target_vendor = "apple")]
pub mod coreml;
pub mod fetch;
pub mod generate;
mod jinja_py;
pub mod model;
pub mod sampler;
pub mod strided;
pub mod tokenizer;
pub mod verify;

pub use corelm_format::{Error, Result};
