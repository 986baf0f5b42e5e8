//! The Core ML ML Program format: the protobuf schema, `.mlpackage` folders, blob storage,
//! and a MIL builder, validator and printer. Everything else in corelm builds on this crate.

pub mod ane;
pub mod blob;
pub mod bytes;
pub mod dtype;
pub mod error;
pub mod inspect;
pub mod model;
pub mod package;
pub mod samples;
pub mod target;
pub mod tensor;
pub mod weights;

pub mod mil {
    //! The Model Intermediate Language: types, the in-memory program, op signatures,
    //! the builder, the validator and the text printer.
    pub mod builder;
    pub mod names;
    pub mod ops;
    pub mod printer;
    pub mod program;
    pub mod proto_io;
    pub mod types;
    pub mod validate;
}

/// Generated protobuf messages (package `CoreML.Specification`).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/core_ml.specification.rs"));
    pub mod mil_spec {
        #![allow(clippy::all, missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/core_ml.specification.mil_spec.rs"));
    }
    pub use mil_spec as mil;
}

pub use dtype::DType;
pub use error::{Error, IoContext, Result};
pub use mil::builder::{Arg, FunctionBuilder, InputShape, ProgramBuilder, Var};
pub use mil::types::{Dim, TensorType, ValueType};
pub use model::Model;
pub use package::{Package, PackageWriter};
pub use target::Target;
pub use tensor::Tensor;
