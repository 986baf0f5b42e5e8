//! The package contract: what a corelm package declares beyond the Core ML format, in one place.
//! Its metadata keys ([`keys`]), the names of its inputs, outputs and states ([`names`]), the
//! interfaces by which its KV cache travels ([`interface`]), and which of its constants are weight
//! matrices and how the program uses them ([`weights`]). `corelm-convert` writes through it; the
//! interpreter, the Core ML backend, compression and deployment planning read through it.

pub mod interface;
pub mod keys;
pub mod names;
pub mod weights;

pub use corelm_format::{Error, Result};
