//! The package contract: what a corelm package declares beyond the Core ML format, in one place.
//! Its metadata keys ([`keys`]), the names of its inputs, outputs and states ([`names`]), the
//! interfaces by which its KV cache travels ([`interface`]), and which of its constants are weight
//! matrices and how the program uses them ([`weights`]). `corelm-convert` writes through it; the
//! interpreter, the Core ML backend, compression and deployment planning read through it.
//!
//! It also drives a package: [`driver::LanguageModel`] feeds token ids through the package's
//! interface to an [`driver::Executor`] (the interpreter, Core ML) in [`tensor::HostTensor`]s,
//! so a backend depends on this crate, not on another backend.

pub mod driver;
pub mod interface;
pub mod keys;
pub mod names;
pub mod tensor;
pub mod weights;

pub use corelm_format::{Error, Result};
