//! The bytes of an untrusted file: memory-mapped from disk, or owned (tests, fuzzing). Readers
//! bounds-check every access, so a file changed underneath a map gives wrong values, never
//! out-of-bounds reads.

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::error::{Error, IoContext, Result};

/// Checks that `path` is a regular file (after links) before anything opens it: opening a FIFO
/// blocks until a writer appears, and a device has no end.
pub fn ensure_regular_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).at(path)?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(Error::malformed(path, "not a regular file (a folder, FIFO, socket or device is refused)"))
    }
}

pub enum FileBytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Maps `path` read-only.
    pub fn map(path: &Path) -> Result<FileBytes> {
        ensure_regular_file(path)?;
        let file = File::open(path).at(path)?;
        // SAFETY: read-only map; callers bounds-check every access (see the module docs).
        let map = unsafe { Mmap::map(&file) }.at(path)?;
        Ok(FileBytes::Mapped(map))
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}
