//! GGUF reader: header, metadata, tensor table, dequantization, and the tokenizer stored in the
//! metadata.
//!
//! The file is memory-mapped and parsed once at [`GgufFile::open`]. Every count, length and offset
//! read from the file is checked against the bytes that are actually there before anything is
//! allocated or sliced, so a malformed file gives an [`Error::Malformed`] naming what is wrong and
//! never a panic or a huge allocation.
//!
//! Shapes are given in Hugging Face (row-major) order: GGUF stores ggml's `ne`, fastest-moving
//! dimension first, and [`TensorInfo::shape`] is that list reversed. The data of a tensor is
//! row-major in that shape; its last dimension is ggml's `ne[0]`, the one quantization blocks run
//! along.

mod lattice;
mod lattice_tables;
mod quants;
mod tokenizer;

pub use quants::{
    carried_grid, dequantize as dequantize_bytes, dequantize_into as dequantize_bytes_into, CarriedGrid, GgmlType,
    GridForm, IQ4_VALUES, QK_K,
};
pub use tokenizer::{chat_template, special_token_ids, tokenizer_config_json, tokenizer_json, SpecialTokenIds};

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use corelm_format::bytes::FileBytes;

use crate::{Error, Result};

/// `"GGUF"` read as a little-endian u32.
const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor in it, unless `general.alignment` says otherwise.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most this many dimensions.
pub const MAX_DIMS: usize = 4;
/// Arrays nested deeper than this are refused (llama.cpp writes none nested at all).
const MAX_ARRAY_DEPTH: usize = 8;
/// Smallest possible encoded metadata entry: empty key (8), value type (4), one-byte value (1).
const MIN_KV_BYTES: u64 = 13;
/// Smallest possible encoded tensor info: empty name (8), n_dims (4), type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 24;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(MetaArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: one element type, stored compactly.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetaArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

/// GGUF value type ids.
mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// Name of a GGUF value type id, for messages.
fn value_type_name(t: u32) -> &'static str {
    match t {
        vt::U8 => "u8",
        vt::I8 => "i8",
        vt::U16 => "u16",
        vt::I16 => "i16",
        vt::U32 => "u32",
        vt::I32 => "i32",
        vt::F32 => "f32",
        vt::BOOL => "bool",
        vt::STRING => "string",
        vt::ARRAY => "array",
        vt::U64 => "u64",
        vt::I64 => "i64",
        vt::F64 => "f64",
        _ => "unknown",
    }
}

impl MetaValue {
    /// The GGUF type name (`"u32"`, `"string"`, `"array of string"`, ...).
    pub fn type_name(&self) -> String {
        match self {
            MetaValue::Array(a) => format!("array of {}", a.element_type_name()),
            other => value_type_name(other.type_id()).to_string(),
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => vt::U8,
            MetaValue::I8(_) => vt::I8,
            MetaValue::U16(_) => vt::U16,
            MetaValue::I16(_) => vt::I16,
            MetaValue::U32(_) => vt::U32,
            MetaValue::I32(_) => vt::I32,
            MetaValue::F32(_) => vt::F32,
            MetaValue::Bool(_) => vt::BOOL,
            MetaValue::String(_) => vt::STRING,
            MetaValue::Array(_) => vt::ARRAY,
            MetaValue::U64(_) => vt::U64,
            MetaValue::I64(_) => vt::I64,
            MetaValue::F64(_) => vt::F64,
        }
    }

    /// Any integer value, widened.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any numeric value (integers included) as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short human-readable rendering; arrays and long strings are truncated to about `max` chars.
    pub fn display_truncated(&self, max: usize) -> String {
        let s = match self {
            MetaValue::String(s) => format!("{s:?}"),
            MetaValue::Array(a) => a.display_truncated(max),
            MetaValue::Bool(b) => b.to_string(),
            MetaValue::F32(v) => format!("{v:?}"),
            MetaValue::F64(v) => format!("{v:?}"),
            other => other.as_i128().map(|v| v.to_string()).unwrap_or_default(),
        };
        truncate_chars(s, max)
    }
}

fn truncate_chars(s: String, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s,
    }
}

impl MetaArray {
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GGUF name of the element type.
    pub fn element_type_name(&self) -> &'static str {
        value_type_name(self.element_type_id())
    }

    fn element_type_id(&self) -> u32 {
        match self {
            MetaArray::U8(_) => vt::U8,
            MetaArray::I8(_) => vt::I8,
            MetaArray::U16(_) => vt::U16,
            MetaArray::I16(_) => vt::I16,
            MetaArray::U32(_) => vt::U32,
            MetaArray::I32(_) => vt::I32,
            MetaArray::F32(_) => vt::F32,
            MetaArray::Bool(_) => vt::BOOL,
            MetaArray::String(_) => vt::STRING,
            MetaArray::Array(_) => vt::ARRAY,
            MetaArray::U64(_) => vt::U64,
            MetaArray::I64(_) => vt::I64,
            MetaArray::F64(_) => vt::F64,
        }
    }

    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            MetaArray::String(v) => Some(v),
            _ => None,
        }
    }

    /// Integer elements, widened; `None` for non-integer arrays.
    pub fn to_i128_vec(&self) -> Option<Vec<i128>> {
        fn w<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
            v.iter().map(|&x| x.into()).collect()
        }
        Some(match self {
            MetaArray::U8(v) => w(v),
            MetaArray::I8(v) => w(v),
            MetaArray::U16(v) => w(v),
            MetaArray::I16(v) => w(v),
            MetaArray::U32(v) => w(v),
            MetaArray::I32(v) => w(v),
            MetaArray::U64(v) => w(v),
            MetaArray::I64(v) => w(v),
            _ => return None,
        })
    }

    /// Numeric elements (integers included) as f64; `None` otherwise.
    pub fn to_f64_vec(&self) -> Option<Vec<f64>> {
        match self {
            MetaArray::F32(v) => Some(v.iter().map(|&x| x.into()).collect()),
            MetaArray::F64(v) => Some(v.clone()),
            _ => self.to_i128_vec().map(|v| v.into_iter().map(|x| x as f64).collect()),
        }
    }

    /// A short rendering: the length, the element type and the first few elements.
    pub fn display_truncated(&self, max: usize) -> String {
        let items: Vec<String> = match self {
            MetaArray::String(v) => v.iter().take(8).map(|s| format!("{s:?}")).collect(),
            MetaArray::Bool(v) => v.iter().take(8).map(|b| b.to_string()).collect(),
            MetaArray::F32(v) => v.iter().take(8).map(|x| format!("{x:?}")).collect(),
            MetaArray::F64(v) => v.iter().take(8).map(|x| format!("{x:?}")).collect(),
            MetaArray::Array(v) => v.iter().take(4).map(|a| a.display_truncated(max / 4)).collect(),
            other => other.to_i128_vec().unwrap_or_default().iter().take(8).map(|x| x.to_string()).collect(),
        };
        let more = if self.len() > items.len() { ", …" } else { "" };
        let s = format!("[{} × {}] [{}{more}]", self.len(), self.element_type_name(), items.join(", "));
        truncate_chars(s, max)
    }
}

/// One tensor of the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Hugging Face (row-major) order: ggml's `ne` reversed. Empty for a 0-d tensor.
    pub shape: Vec<usize>,
    pub dtype: GgmlType,
    /// Offset of the data from the start of the data section, as stored in the file.
    pub offset: u64,
    /// Offset of the data from the start of the file.
    pub file_offset: usize,
    /// Bytes of data.
    pub byte_len: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// ggml's `ne` (fastest-moving dimension first).
    pub fn ggml_dims(&self) -> Vec<usize> {
        self.shape.iter().rev().copied().collect()
    }

    /// Length of the last (fastest-moving) dimension: the row quantization blocks run along.
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Number of rows: all dimensions but the last multiplied together.
    pub fn n_rows(&self) -> usize {
        match self.shape.split_last() {
            Some((_, lead)) => lead.iter().product(),
            None => 1,
        }
    }

    /// Bytes of one row in storage.
    pub fn row_bytes(&self) -> usize {
        self.row_len() / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// A parsed GGUF file.
pub struct GgufFile {
    path: PathBuf,
    data: FileBytes,
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    /// Key order as in the file.
    key_order: Vec<String>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let map = FileBytes::map(&path)?;
        Self::parse(path, map)
    }

    /// Parses GGUF bytes held in memory; `path` only labels errors.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<GgufFile> {
        Self::parse(path.as_ref().to_path_buf(), FileBytes::Owned(bytes))
    }

    fn parse(path: PathBuf, data: FileBytes) -> Result<GgufFile> {
        let parsed = Parser { buf: &data, pos: 0, path: &path }.parse()?;
        let Parsed { version, metadata, key_order, tensors, alignment, data_start } = parsed;
        Ok(GgufFile { path, data, version, metadata, key_order, tensors, alignment, data_start })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> usize {
        self.data.len()
    }

    /// Alignment of the data section (from `general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// File offset of the data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// Metadata keys in the order the file lists them.
    pub fn metadata_keys(&self) -> &[String] {
        &self.key_order
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The stored bytes of a tensor of this file (empty if `t` does not describe bytes of this file).
    pub fn raw(&self, t: &TensorInfo) -> &[u8] {
        t.file_offset.checked_add(t.byte_len).and_then(|end| self.data.get(t.file_offset..end)).unwrap_or(&[])
    }

    /// The tensor as f32, row-major in [`TensorInfo::shape`], bit-exact with ggml's dequantizers.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let raw = self.raw(t);
        let (block, size) = (t.dtype.block_size(), t.dtype.type_size());
        let n_elements = t.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let expected_bytes = n_elements.and_then(|n| (n / block).checked_mul(size));
        if raw.len() != t.byte_len || !t.row_len().is_multiple_of(block) || expected_bytes != Some(t.byte_len) {
            return Err(Error::invalid(format!(
                "tensor '{}' does not describe data of {}",
                t.name,
                self.path.display()
            )));
        }
        quants::dequantize(t.dtype, raw).map_err(|e| e.context(format!("tensor '{}'", t.name)))
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn wrong_type(&self, key: &str, v: &MetaValue, expected: &str) -> Error {
        Error::malformed(&self.path, format!("metadata key '{key}' is {}, expected {expected}", v.type_name()))
    }

    /// Error for a required key that is absent.
    pub fn missing(&self, key: &str) -> Error {
        Error::malformed(&self.path, format!("metadata key '{key}' is missing"))
    }

    /// A string value; `Ok(None)` if absent, an error if of another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.wrong_type(key, v, "a string")),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.wrong_type(key, v, "a bool")),
        }
    }

    fn get_int<T: TryFrom<i128>>(&self, key: &str, what: &str) -> Result<Option<T>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let i = v.as_i128().ok_or_else(|| self.wrong_type(key, v, "an integer"))?;
        T::try_from(i).map(Some).map_err(|_| {
            Error::malformed(&self.path, format!("metadata key '{key}' is {i}, which does not fit {what}"))
        })
    }

    /// Any integer type whose value fits u32.
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get_int(key, "u32")
    }

    /// Any integer type whose value fits u64.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get_int(key, "u64")
    }

    /// Any integer type whose value fits i64.
    pub fn get_i64(&self, key: &str) -> Result<Option<i64>> {
        self.get_int(key, "i64")
    }

    /// Any integer type whose value is a valid non-negative usize.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get_int(key, "usize")
    }

    /// Any numeric type (floats and integers) as f64.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.wrong_type(key, v, "a number")),
        }
    }

    /// Any numeric type as f32 (f64 values are rounded).
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            Some(MetaValue::F32(v)) => Ok(Some(*v)),
            _ => Ok(self.get_f64(key)?.map(|v| v as f32)),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&MetaArray>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_array().map(Some).ok_or_else(|| self.wrong_type(key, v, "an array")),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .and_then(MetaArray::as_strings)
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, "an array of string")),
        }
    }

    /// A numeric array (any element type) as f32.
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(MetaArray::F32(v))) => Ok(Some(v.clone())),
            Some(v) => v
                .as_array()
                .and_then(MetaArray::to_f64_vec)
                .map(|v| Some(v.into_iter().map(|x| x as f32).collect()))
                .ok_or_else(|| self.wrong_type(key, v, "a numeric array")),
        }
    }

    /// An integer array (any integer element type) as i64; values outside i64 are an error.
    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let ints =
            v.as_array().and_then(MetaArray::to_i128_vec).ok_or_else(|| self.wrong_type(key, v, "an integer array"))?;
        ints.into_iter()
            .map(|i| {
                i64::try_from(i).map_err(|_| {
                    Error::malformed(&self.path, format!("metadata key '{key}' holds {i}, which does not fit i64"))
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// A required string.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)?.ok_or_else(|| self.missing(key))
    }

    /// A required non-negative integer.
    pub fn require_usize(&self, key: &str) -> Result<usize> {
        self.get_usize(key)?.ok_or_else(|| self.missing(key))
    }

    /// A required number.
    pub fn require_f32(&self, key: &str) -> Result<f32> {
        self.get_f32(key)?.ok_or_else(|| self.missing(key))
    }

    /// `general.architecture` (`"llama"`, `"gemma3"`, ...).
    pub fn architecture(&self) -> Result<&str> {
        self.require_str("general.architecture")
    }
}

/// Undoes llama.cpp's rotary row permutation of a Q or K projection.
///
/// `convert_hf_to_gguf.py` stores llama-family `q_proj`/`k_proj` weights (and biases) with their
/// rows reordered as `w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).reshape(rows, cols)`,
/// so that each head's two rotary halves are interleaved. This returns the rows in Hugging Face
/// order again, the same as transformers' `reverse_permute_weights`. Pass the query head count for
/// Q and the key/value head count for K.
///
/// Works on any element type: f32 values (`cols` = row length) or the raw bytes of quantized rows
/// (`cols` = [`TensorInfo::row_bytes`]), since the permutation moves whole rows.
pub fn unpermute_qk<T: Copy>(data: &[T], rows: usize, cols: usize, n_head: usize) -> Result<Vec<T>> {
    let groups = n_head.checked_mul(2).filter(|&g| g > 0 && rows.is_multiple_of(g)).ok_or_else(|| {
        Error::invalid(format!(
            "cannot unpermute {rows} rows over {n_head} heads: rows must be a multiple of 2 × heads"
        ))
    })?;
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(Error::invalid(format!("cannot unpermute {} values as {rows} rows of {cols}", data.len())));
    }
    let half = rows / groups;
    let head_rows = 2 * half;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_head {
        for a in 0..2 {
            for b in 0..half {
                // HF row h*head_rows + a*half + b was stored at h*head_rows + 2*b + a.
                let src = (h * head_rows + 2 * b + a) * cols;
                out.extend_from_slice(&data[src..src + cols]);
            }
        }
    }
    Ok(out)
}

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    key_order: Vec<String>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_start: u64,
}

/// A bounds-checked little-endian reader over the file bytes.
struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Parser<'a> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error::malformed(self.path, message)
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{}: needs {n} bytes at offset {}, but the file ends after {} more",
                what(),
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A length-prefixed UTF-8 string.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("{} (length)", what()))?;
        if len > self.remaining() as u64 {
            return Err(self.err(format!(
                "{}: string length {len} at offset {} runs past the end of the file ({} bytes left)",
                what(),
                self.pos - 8,
                self.remaining()
            )));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.err(format!("{}: string is not valid UTF-8 ({e})", what())))
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in what is left.
    fn check_count(&self, count: u64, min_size: u64, what: &dyn Fn() -> String) -> Result<usize> {
        let fits = count.checked_mul(min_size).is_some_and(|n| n <= self.remaining() as u64);
        if !fits {
            return Err(self.err(format!(
                "{}: count {count} cannot fit in the {} bytes left in the file (each takes at least {min_size})",
                what(),
                self.remaining()
            )));
        }
        Ok(count as usize)
    }

    fn parse(mut self) -> Result<Parsed> {
        if self.buf.len() < 4 {
            return Err(self
                .err(format!("truncated header: the file is {} bytes, too short for a GGUF header", self.buf.len())));
        }
        let magic = self.array::<4>(&|| "magic".into())?;
        if magic != MAGIC {
            return Err(self.err(format!(
                "not a GGUF file: starts with {:?}, expected \"GGUF\"",
                String::from_utf8_lossy(&magic)
            )));
        }
        let header = || "truncated header".to_string();
        let version = self.u32(&header)?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(self.err(
                    "GGUF version 1 is not supported (only versions 2 and 3); re-convert the model with a current llama.cpp",
                ))
            }
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(self.err(format!("big-endian GGUF (version {}) is not supported", v.swap_bytes())))
            }
            v => return Err(self.err(format!("unsupported GGUF version {v} (supported: 2 and 3)"))),
        }
        let tensor_count = self.u64(&header)?;
        let kv_count = self.u64(&header)?;
        let kv_count = self.check_count(kv_count, MIN_KV_BYTES, &|| "metadata entry count".into())?;
        self.check_count(tensor_count, MIN_TENSOR_INFO_BYTES, &|| "tensor count".into())?;

        let mut metadata = BTreeMap::new();
        let mut key_order = Vec::with_capacity(kv_count.min(4096));
        for i in 0..kv_count {
            let key = self.string(&|| format!("metadata entry #{i} key"))?;
            let what = || format!("metadata '{key}'");
            let vtype = self.u32(&what)?;
            let value = self.value(vtype, 0, &what)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(self.err(format!("metadata key '{key}' appears more than once")));
            }
            key_order.push(key);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_i128() {
                Some(a) if a > 0 && a <= 1 << 30 && (a & (a - 1)) == 0 => a as u64,
                _ => {
                    return Err(self.err(format!(
                        "general.alignment must be a power of two up to 2^30, got {}",
                        v.display_truncated(40)
                    )))
                }
            },
        };

        let tensor_count = self.check_count(tensor_count, MIN_TENSOR_INFO_BYTES, &|| "tensor count".into())?;
        let mut tensors = Vec::with_capacity(tensor_count.min(4096));
        let mut names = HashSet::new();
        for i in 0..tensor_count {
            let t = self.tensor_info(i)?;
            if !names.insert(t.name.clone()) {
                return Err(self.err(format!("tensor '{}' appears more than once", t.name)));
            }
            tensors.push(t);
        }

        let data_start = (self.pos as u64).next_multiple_of(alignment);
        let file_len = self.buf.len() as u64;
        for t in &mut tensors {
            if t.offset % alignment != 0 {
                return Err(self.err(format!(
                    "tensor '{}' has offset {}, which is not a multiple of the alignment {alignment}",
                    t.name, t.offset
                )));
            }
            let start = data_start.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.byte_len as u64));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_len => t.file_offset = start as usize,
                (Some(start), Some(end)) => {
                    return Err(self.err(format!(
                        "tensor '{}' data (bytes {start}..{end}) runs past the end of the file ({file_len} bytes)",
                        t.name
                    )))
                }
                _ => {
                    return Err(
                        self.err(format!("tensor '{}' offset {} + {} bytes overflows", t.name, t.offset, t.byte_len))
                    )
                }
            }
        }
        Ok(Parsed { version, metadata, key_order, tensors, alignment, data_start })
    }

    fn value(&mut self, vtype: u32, depth: usize, what: &dyn Fn() -> String) -> Result<MetaValue> {
        Ok(match vtype {
            vt::U8 => MetaValue::U8(self.array::<1>(what)?[0]),
            vt::I8 => MetaValue::I8(self.array::<1>(what)?[0] as i8),
            vt::U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            vt::I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            vt::U32 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            vt::I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            vt::F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            vt::U64 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            vt::I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            vt::F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            vt::BOOL => MetaValue::Bool(self.bool(what)?),
            vt::STRING => MetaValue::String(self.string(what)?),
            vt::ARRAY => MetaValue::Array(self.meta_array(depth + 1, what)?),
            t => return Err(self.err(format!("{}: unknown value type {t}", what()))),
        })
    }

    fn bool(&mut self, what: &dyn Fn() -> String) -> Result<bool> {
        match self.array::<1>(what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(format!("{}: bool byte is {b}, expected 0 or 1", what()))),
        }
    }

    fn meta_array(&mut self, depth: usize, what: &dyn Fn() -> String) -> Result<MetaArray> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(self.err(format!("{}: arrays nested more than {MAX_ARRAY_DEPTH} deep", what())));
        }
        let etype = self.u32(what)?;
        let count = self.u64(what)?;
        let min_size: u64 = match etype {
            vt::U8 | vt::I8 | vt::BOOL => 1,
            vt::U16 | vt::I16 => 2,
            vt::U32 | vt::I32 | vt::F32 => 4,
            vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
            vt::ARRAY => 12,
            t => return Err(self.err(format!("{}: array of unknown value type {t}", what()))),
        };
        let n = self.check_count(count, min_size, &|| format!("{} array of {}", what(), value_type_name(etype)))?;

        fn fixed<const N: usize, T>(
            p: &mut Parser,
            n: usize,
            what: &dyn Fn() -> String,
            f: fn([u8; N]) -> T,
        ) -> Result<Vec<T>> {
            let bytes = p.take(n * N, what)?;
            Ok(bytes.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect())
        }
        Ok(match etype {
            vt::U8 => MetaArray::U8(fixed::<1, _>(self, n, what, |b| b[0])?),
            vt::I8 => MetaArray::I8(fixed::<1, _>(self, n, what, |b| b[0] as i8)?),
            vt::U16 => MetaArray::U16(fixed(self, n, what, u16::from_le_bytes)?),
            vt::I16 => MetaArray::I16(fixed(self, n, what, i16::from_le_bytes)?),
            vt::U32 => MetaArray::U32(fixed(self, n, what, u32::from_le_bytes)?),
            vt::I32 => MetaArray::I32(fixed(self, n, what, i32::from_le_bytes)?),
            vt::F32 => MetaArray::F32(fixed(self, n, what, f32::from_le_bytes)?),
            vt::U64 => MetaArray::U64(fixed(self, n, what, u64::from_le_bytes)?),
            vt::I64 => MetaArray::I64(fixed(self, n, what, i64::from_le_bytes)?),
            vt::F64 => MetaArray::F64(fixed(self, n, what, f64::from_le_bytes)?),
            vt::BOOL => MetaArray::Bool((0..n).map(|_| self.bool(what)).collect::<Result<_>>()?),
            vt::STRING => MetaArray::String(
                (0..n).map(|i| self.string(&|| format!("{} element {i}", what()))).collect::<Result<_>>()?,
            ),
            _ => MetaArray::Array(
                (0..n)
                    .map(|i| self.meta_array(depth + 1, &|| format!("{} element {i}", what())))
                    .collect::<Result<_>>()?,
            ),
        })
    }

    fn tensor_info(&mut self, i: usize) -> Result<TensorInfo> {
        let name = self.string(&|| format!("tensor #{i} name"))?;
        let what = || format!("tensor '{name}'");
        let n_dims = self.u32(&what)?;
        if n_dims as usize > MAX_DIMS {
            return Err(self.err(format!("tensor '{name}' has {n_dims} dimensions; ggml allows at most {MAX_DIMS}")));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = self.u64(&what)?;
            if d > i64::MAX as u64 {
                return Err(self.err(format!("tensor '{name}' has dimension {d}, larger than ggml's int64")));
            }
            ne.push(d);
        }
        let type_id = self.u32(&what)?;
        let offset = self.u64(&what)?;
        let dtype = GgmlType::from_id(type_id)
            .ok_or_else(|| self.err(format!("tensor '{name}' has unknown ggml type id {type_id}")))?;

        let n_elements = ne.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= i64::MAX as u64);
        let Some(n_elements) = n_elements else {
            return Err(self.err(format!("tensor '{name}' dimensions {ne:?} overflow the element count")));
        };
        let (block, size) = (dtype.block_size() as u64, dtype.type_size() as u64);
        let row = ne.first().copied().unwrap_or(1);
        if row % block != 0 {
            return Err(self
                .err(format!("tensor '{name}' row length {row} is not a multiple of the {dtype} block size {block}")));
        }
        let byte_len = (n_elements / block)
            .checked_mul(size)
            .filter(|&b| b <= self.buf.len() as u64)
            .ok_or_else(|| self.err(format!("tensor '{name}' ({dtype}, dims {ne:?}) is larger than the whole file")))?;
        let shape = ne.iter().rev().map(|&d| d as usize).collect();
        Ok(TensorInfo { name, shape, dtype, offset, file_offset: 0, byte_len: byte_len as usize })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // Forward permutation as in convert_hf_to_gguf.py, on row indices.
        let (n_head, rows, cols) = (3usize, 12usize, 2usize);
        let half = rows / n_head / 2;
        let hf: Vec<u32> = (0..(rows * cols) as u32).collect();
        let mut stored = vec![0u32; rows * cols];
        for h in 0..n_head {
            for a in 0..2 {
                for b in 0..half {
                    let hf_row = h * 2 * half + a * half + b;
                    let gguf_row = h * 2 * half + b * 2 + a;
                    stored[gguf_row * cols..][..cols].copy_from_slice(&hf[hf_row * cols..][..cols]);
                }
            }
        }
        assert_ne!(stored, hf);
        assert_eq!(unpermute_qk(&stored, rows, cols, n_head).unwrap(), hf);
        assert!(unpermute_qk(&stored, rows, cols, 4).is_err());
        assert!(unpermute_qk(&stored, rows, cols, 0).is_err());
        assert!(unpermute_qk(&stored[1..], rows, cols, 3).is_err());
    }
}
