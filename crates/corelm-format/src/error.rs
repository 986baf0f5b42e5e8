//! One error type for the format crate. Every error that comes from reading says which file and
//! what is wrong with it.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused an operation on a file.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// A file exists but its content is malformed.
    #[error("{}: {message}", path.display())]
    Malformed { path: PathBuf, message: String },
    /// The output exists and replacing it was not asked for.
    #[error("{} already exists (pass --force to replace it)", path.display())]
    OutputExists { path: PathBuf },
    /// A program, type or value that breaks a rule of the format.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::Invalid(message.into())
    }

    pub fn malformed(path: impl AsRef<Path>, message: impl Into<String>) -> Error {
        Error::Malformed { path: path.as_ref().to_path_buf(), message: message.into() }
    }

    pub fn io(path: impl AsRef<Path>, source: io::Error) -> Error {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }

    /// Prefixes an `Invalid` message with where it happened (op, function, ...).
    pub fn context(self, what: impl std::fmt::Display) -> Error {
        match self {
            Error::Invalid(m) => Error::Invalid(format!("{what}: {m}")),
            other => other,
        }
    }
}

/// Attaches a path to I/O errors.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
