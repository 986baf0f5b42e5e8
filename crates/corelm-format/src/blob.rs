//! Blob storage v2 (`weight.bin`): a 64-byte header, then per blob a 64-byte metadata record
//! followed by its data, every record 64-byte aligned. Proto `BlobFileValue.offset` points at
//! the metadata record.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::bytes::FileBytes;
use crate::dtype::DType;
use crate::error::{Error, IoContext, Result};
use crate::tensor::{storage_bytes, Tensor};

pub const ALIGNMENT: u64 = 64;
pub const HEADER_BYTES: u64 = 64;
pub const METADATA_BYTES: u64 = 64;
pub const SENTINEL: u32 = 0xDEAD_BEEF;
pub const VERSION: u32 = 2;

fn align_up(offset: u64) -> Option<u64> {
    offset.checked_add(ALIGNMENT - 1).map(|o| o / ALIGNMENT * ALIGNMENT)
}

/// Writes blobs one at a time as they are produced; only the current blob is in memory.
pub struct BlobWriter {
    path: PathBuf,
    out: BufWriter<File>,
    end: u64,
    count: u32,
    /// SHA-256 of every byte after the header, as it is written (see [`weight_file_digest`]).
    body: Sha256,
}

/// A weight file's content digest: SHA-256 of its 64-byte header followed by the SHA-256 of the
/// rest of the file. The writer finishes the header (the blob count) last, so this form lets it
/// compute the digest while writing, without reading gigabytes back.
pub fn digest_of(header: &[u8], body_sha256: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(header);
    h.update(body_sha256);
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// [`digest_of`] a weight file on disk, reading it once (for packages that carry no record).
pub fn weight_file_digest(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = File::open(path).at(path)?;
    let mut header = [0u8; HEADER_BYTES as usize];
    let mut filled = 0;
    while filled < header.len() {
        match file.read(&mut header[filled..]).at(path)? {
            0 => break,
            n => filled += n,
        }
    }
    let mut body = Sha256::new();
    std::io::copy(&mut file, &mut body).at(path)?;
    Ok(digest_of(&header[..filled], &body.finalize()))
}

impl BlobWriter {
    /// Creates (or truncates) `path` and writes an empty header.
    pub fn create(path: impl AsRef<Path>) -> Result<BlobWriter> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).at(&path)?;
        let mut writer = BlobWriter { path, out: BufWriter::new(file), end: 0, count: 0, body: Sha256::new() };
        writer.write_header()?;
        writer.end = HEADER_BYTES;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far (the file size once finished).
    pub fn len(&self) -> u64 {
        self.end
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn header(&self) -> [u8; HEADER_BYTES as usize] {
        let mut header = [0u8; HEADER_BYTES as usize];
        header[0..4].copy_from_slice(&self.count.to_le_bytes());
        header[4..8].copy_from_slice(&VERSION.to_le_bytes());
        header
    }

    fn write_header(&mut self) -> Result<()> {
        let header = self.header();
        self.out.write_all(&header).at(&self.path)
    }

    fn write_body(&mut self, bytes: &[u8]) -> Result<()> {
        self.body.update(bytes);
        self.out.write_all(bytes).at(&self.path)
    }

    /// Appends one tensor; returns the offset of its metadata record.
    pub fn append(&mut self, tensor: &Tensor) -> Result<u64> {
        self.append_raw(tensor.dtype(), tensor.len(), tensor.bytes())
    }

    /// Appends `count` elements of `dtype` given in storage encoding.
    pub fn append_raw(&mut self, dtype: DType, count: usize, bytes: &[u8]) -> Result<u64> {
        let code =
            dtype.blob_code().ok_or_else(|| Error::invalid(format!("{dtype} cannot be stored in a blob file")))?;
        if storage_bytes(dtype, count) != Some(bytes.len()) {
            return Err(Error::invalid(format!("{count} {dtype} elements cannot take {} bytes", bytes.len())));
        }
        let width = dtype.bit_width().expect("blob types have a width");
        let padding_bits = ((8 - (count * width) % 8) % 8) as u64;
        let meta_offset = align_up(self.end).expect("file offsets stay far below u64::MAX");
        let gap = (meta_offset - self.end) as usize;
        self.write_body(&[0u8; ALIGNMENT as usize][..gap])?;
        let data_offset = meta_offset + METADATA_BYTES;
        let mut meta = [0u8; METADATA_BYTES as usize];
        meta[0..4].copy_from_slice(&SENTINEL.to_le_bytes());
        meta[4..8].copy_from_slice(&code.to_le_bytes());
        meta[8..16].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        meta[16..24].copy_from_slice(&data_offset.to_le_bytes());
        meta[24..32].copy_from_slice(&padding_bits.to_le_bytes());
        self.write_body(&meta)?;
        self.write_body(bytes)?;
        self.end = data_offset + bytes.len() as u64;
        self.count =
            self.count.checked_add(1).ok_or_else(|| Error::invalid("a blob file holds at most 2^32-1 blobs"))?;
        Ok(meta_offset)
    }

    /// Writes the final blob count into the header and flushes; the file is not padded at the end.
    /// Returns the file's size and content digest ([`digest_of`]).
    pub fn finish(mut self) -> Result<(u64, String)> {
        self.out.flush().at(&self.path)?;
        let file = self.out.get_mut();
        file.seek(SeekFrom::Start(0)).at(&self.path)?;
        file.write_all(&self.count.to_le_bytes()).at(&self.path)?;
        file.sync_all().at(&self.path)?;
        let digest = digest_of(&self.header(), &self.body.clone().finalize());
        Ok((self.end, digest))
    }
}

/// One blob's metadata record, checked against the file it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobMetadata {
    pub offset: u64,
    pub dtype: DType,
    pub size_in_bytes: u64,
    pub data_offset: u64,
    pub padding_bits: u64,
    /// Elements stored (for sub-byte types: bits minus padding, divided by the width).
    pub element_count: u64,
}

/// A blob file opened for reading; every read is bounds-checked.
pub struct BlobFile {
    path: PathBuf,
    map: FileBytes,
    count: u32,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl BlobFile {
    pub fn open(path: impl AsRef<Path>) -> Result<BlobFile> {
        let path = path.as_ref().to_path_buf();
        let map = FileBytes::map(&path)?;
        Self::from_storage(path, map)
    }

    /// Reads blob storage held in memory; `path` only labels errors.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<BlobFile> {
        Self::from_storage(path.as_ref().to_path_buf(), FileBytes::Owned(bytes))
    }

    fn from_storage(path: PathBuf, map: FileBytes) -> Result<BlobFile> {
        if (map.len() as u64) < HEADER_BYTES {
            return Err(Error::malformed(
                &path,
                format!("blob file is {} bytes, shorter than its 64-byte header", map.len()),
            ));
        }
        let version = le_u32(&map, 4);
        if version != VERSION {
            return Err(Error::malformed(&path, format!("blob storage version {version}, expected {VERSION}")));
        }
        let count = le_u32(&map, 0);
        Ok(BlobFile { path, map, count })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Blob count the header claims.
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn bad(&self, message: String) -> Error {
        Error::malformed(&self.path, message)
    }

    /// Reads and checks the metadata record at `offset`.
    pub fn metadata(&self, offset: u64) -> Result<BlobMetadata> {
        let len = self.len();
        if offset < HEADER_BYTES || !offset.is_multiple_of(ALIGNMENT) {
            return Err(self.bad(format!("blob offset {offset} is not a 64-aligned record offset")));
        }
        let end = offset.checked_add(METADATA_BYTES).filter(|&e| e <= len).ok_or_else(|| {
            self.bad(format!("blob metadata at offset {offset} lies past the end of the file ({len} bytes)"))
        })?;
        let m = &self.map[offset as usize..end as usize];
        let sentinel = le_u32(m, 0);
        if sentinel != SENTINEL {
            return Err(self.bad(format!("blob at offset {offset}: sentinel {sentinel:#010x}, expected 0xdeadbeef")));
        }
        let code = le_u32(m, 4);
        let dtype = DType::from_blob_code(code)
            .ok_or_else(|| self.bad(format!("blob at offset {offset}: unknown data type code {code}")))?;
        let size_in_bytes = le_u64(m, 8);
        let data_offset = le_u64(m, 16);
        let padding_bits = le_u64(m, 24);
        if data_offset < end {
            return Err(self.bad(format!("blob at offset {offset}: data offset {data_offset} overlaps its metadata")));
        }
        match data_offset.checked_add(size_in_bytes) {
            Some(data_end) if data_end <= len => {}
            _ => {
                return Err(self.bad(format!(
                    "blob at offset {offset}: {size_in_bytes} bytes at {data_offset} run past the end of the file ({len} bytes)"
                )))
            }
        }
        let width = dtype.bit_width().expect("blob types have a width") as u64;
        let bits =
            size_in_bytes.checked_mul(8).ok_or_else(|| self.bad(format!("blob at offset {offset}: size overflows")))?;
        let padding_ok = if width < 8 {
            padding_bits < 8
                && (width == 3 || width == 6 || padding_bits.is_multiple_of(width))
                && (bits - padding_bits.min(bits)) % width == 0
                && padding_bits <= bits
        } else {
            padding_bits == 0 && size_in_bytes.is_multiple_of(width / 8)
        };
        if !padding_ok {
            return Err(self.bad(format!(
                "blob at offset {offset}: {size_in_bytes} bytes with {padding_bits} padding bits is not a whole number of {dtype} elements"
            )));
        }
        Ok(BlobMetadata {
            offset,
            dtype,
            size_in_bytes,
            data_offset,
            padding_bits,
            element_count: (bits - padding_bits) / width,
        })
    }

    /// The raw data bytes of the blob whose metadata is at `offset`.
    pub fn data(&self, meta: &BlobMetadata) -> &[u8] {
        &self.map[meta.data_offset as usize..(meta.data_offset + meta.size_in_bytes) as usize]
    }

    /// Reads the blob at `offset` as a tensor of `dtype` and `shape`, checking both.
    pub fn read(&self, offset: u64, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let meta = self.metadata(offset)?;
        if meta.dtype != dtype {
            return Err(
                self.bad(format!("blob at offset {offset} holds {}, but the program expects {dtype}", meta.dtype))
            );
        }
        let expected = crate::tensor::element_count(shape);
        if expected != Some(meta.element_count as usize) {
            return Err(self.bad(format!(
                "blob at offset {offset} holds {} elements, but the program expects shape {shape:?}",
                meta.element_count
            )));
        }
        Tensor::from_bytes(dtype, shape.to_vec(), self.data(&meta).to_vec())
    }

    /// Every blob record, walked from the first as the reference reader does; checks the count.
    pub fn all_metadata(&self) -> Result<Vec<BlobMetadata>> {
        let mut out = Vec::new();
        let mut offset = HEADER_BYTES;
        for _ in 0..self.count {
            let meta = self.metadata(offset)?;
            offset = meta
                .data_offset
                .checked_add(meta.size_in_bytes)
                .and_then(align_up)
                .ok_or_else(|| self.bad(format!("blob at offset {offset}: size overflows")))?;
            out.push(meta);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_spec_hexdump() {
        // §4.2: int4 [16,8] then fp16 [16,2] then fp16 [16] -> metadata at 64, 192, 320; EOF 416.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weight.bin");
        let mut w = BlobWriter::create(&path).unwrap();
        let int4 = Tensor::from_ints(DType::Int4, vec![16, 8], &vec![-3; 128]).unwrap();
        let a = Tensor::from_floats(DType::Fp16, vec![16, 2], &[0.5; 32]).unwrap();
        let b = Tensor::from_floats(DType::Fp16, vec![16], &[1.0; 16]).unwrap();
        assert_eq!(w.append(&int4).unwrap(), 64);
        assert_eq!(w.append(&a).unwrap(), 192);
        assert_eq!(w.append(&b).unwrap(), 320);
        let (len, digest) = w.finish().unwrap();
        assert_eq!(len, 416);
        // The digest computed while writing is the one a reader computes from the file.
        assert_eq!(digest, weight_file_digest(&path).unwrap());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 416);
        assert_eq!(&bytes[0..8], &[3, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(&bytes[64..72], &[0xef, 0xbe, 0xad, 0xde, 8, 0, 0, 0]);
        assert_eq!(le_u64(&bytes, 64 + 16), 128);
        let file = BlobFile::open(&path).unwrap();
        let metas = file.all_metadata().unwrap();
        assert_eq!(metas.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![64, 192, 320]);
        assert_eq!(file.read(64, DType::Int4, &[16, 8]).unwrap(), int4);
        assert!(file.read(64, DType::Fp16, &[16, 8]).is_err());
        assert!(file.read(192, DType::Fp16, &[16, 3]).is_err());
    }

    #[test]
    fn sub_byte_padding_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        let mut w = BlobWriter::create(&path).unwrap();
        let t = Tensor::from_ints(DType::Uint3, vec![7], &[1, 2, 3, 4, 5, 6, 7]).unwrap();
        let off = w.append(&t).unwrap();
        w.finish().unwrap();
        let file = BlobFile::open(&path).unwrap();
        let meta = file.metadata(off).unwrap();
        assert_eq!((meta.size_in_bytes, meta.padding_bits, meta.element_count), (3, 3, 7));
        assert_eq!(file.read(off, DType::Uint3, &[7]).unwrap(), t);
    }
}
