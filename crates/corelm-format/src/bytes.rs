//! The bytes of an untrusted file: memory-mapped from disk, or owned (tests, fuzzing). Readers
//! bounds-check every access, so a file changed underneath a map gives wrong values, never
//! out-of-bounds reads.

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::error::{IoContext, Result};

pub enum FileBytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Maps `path` read-only.
    pub fn map(path: &Path) -> Result<FileBytes> {
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
