//! Weight files of a package being written: blobs are streamed to `weights/weight.bin` (and
//! further files when a size limit is set) as they are produced.

use std::path::{Path, PathBuf};

use crate::blob::BlobWriter;
use crate::error::{Error, Result};
use crate::mil::program::{Value, ValueData};
use crate::mil::types::TensorType;
use crate::tensor::Tensor;

/// One weight file over 2 GiB keeps Core ML off the Neural Engine (field notes §7).
pub const MAX_WEIGHT_FILE_BYTES: u64 = 2 << 30;

/// How programs name a file in the weights directory.
pub fn blob_file_name(file: &str) -> String {
    format!("@model_path/weights/{file}")
}

/// A tensor stored in a weight file, ready to be referenced by any function of the program.
#[derive(Clone, Debug, PartialEq)]
pub struct BlobRef {
    pub value: Value,
}

impl BlobRef {
    pub fn ty(&self) -> &TensorType {
        &self.value.ty
    }
}

/// A finished weight file: its name in `weights/`, size and content digest
/// ([`digest_of`](crate::blob::digest_of)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightFile {
    pub name: String,
    pub bytes: u64,
    pub digest: String,
}

pub struct WeightStore {
    dir: PathBuf,
    max_file_bytes: Option<u64>,
    current: Option<(String, BlobWriter)>,
    finished: Vec<WeightFile>,
}

impl WeightStore {
    /// Weight files go to `dir` (the package's `weights/` folder, which must exist).
    pub fn new(dir: impl AsRef<Path>) -> WeightStore {
        WeightStore { dir: dir.as_ref().to_path_buf(), max_file_bytes: None, current: None, finished: vec![] }
    }

    /// Start a new weight file before one would grow past `bytes` (a blob larger than the
    /// limit still gets a file of its own).
    pub fn with_max_file_bytes(mut self, bytes: u64) -> WeightStore {
        self.max_file_bytes = Some(bytes);
        self
    }

    fn file_name(index: usize) -> String {
        if index == 0 {
            "weight.bin".into()
        } else {
            format!("weight-{index}.bin")
        }
    }

    fn open_next(&mut self) -> Result<()> {
        self.close_current()?;
        let name = Self::file_name(self.finished.len());
        let writer = BlobWriter::create(self.dir.join(&name))?;
        self.current = Some((name, writer));
        Ok(())
    }

    /// Writes `tensor` now and returns the reference consts use.
    pub fn store(&mut self, tensor: &Tensor) -> Result<BlobRef> {
        if tensor.dtype().blob_code().is_none() {
            return Err(Error::invalid(format!("{} tensors cannot be stored in a weight file", tensor.dtype())));
        }
        let needed = 128 + tensor.bytes().len() as u64;
        if needed > MAX_WEIGHT_FILE_BYTES {
            return Err(Error::invalid(format!(
                "a {:?} {} tensor takes {:.2} GiB: more than the 2 GiB one weight file may hold; compress it (--quantize)",
                tensor.shape(),
                tensor.dtype(),
                needed as f64 / (1u64 << 30) as f64
            )));
        }
        let full = match (&self.current, self.max_file_bytes) {
            (None, _) => true,
            (Some((_, w)), Some(max)) => !w.is_empty() && w.len() + needed > max,
            (Some(_), None) => false,
        };
        if full {
            self.open_next()?;
        }
        let (name, writer) = self.current.as_mut().expect("a file is open");
        let offset = writer.append(tensor)?;
        Ok(BlobRef {
            value: Value {
                ty: TensorType::fixed(tensor.dtype(), tensor.shape()),
                data: ValueData::Blob { file: blob_file_name(name), offset },
            },
        })
    }

    /// Bytes written to all weight files so far.
    pub fn bytes_written(&self) -> u64 {
        self.finished.iter().map(|f| f.bytes).sum::<u64>() + self.current.as_ref().map_or(0, |(_, w)| w.len())
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some((name, w)) = self.current.take() {
            let (bytes, digest) = w.finish()?;
            self.finished.push(WeightFile { name, bytes, digest });
        }
        Ok(())
    }

    /// Closes the files; returns each one's name, size and digest. A store that received no
    /// blob still writes an empty `weight.bin`, as coremltools does.
    pub fn finish(mut self) -> Result<Vec<WeightFile>> {
        if self.current.is_none() && self.finished.is_empty() {
            self.open_next()?;
        }
        self.close_current()?;
        Ok(self.finished)
    }
}
