//! Checkpoint readers behind one interface: tensors by Hugging Face name, read one at a time
//! from memory-mapped files and widened to f32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use crate::arch::{LayerRole, Role, Take, TensorSpec};
use crate::compress::Compressed;
use crate::config::{Mixer, ModelConfig, QkNorm};
use crate::{Error, Result};
use corelm_format::bytes::FileBytes;
use corelm_format::error::IoContext;
use corelm_format::DType;

/// A source of named tensors.
pub trait Checkpoint {
    /// Where the tensors come from, for messages.
    fn source(&self) -> &Path;
    /// The shape of `name`, if present.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The elements of `name`, row-major, as f32.
    fn read_f32(&self, name: &str) -> Result<Vec<f32>>;
    /// `name` in the compressed form it is stored in, when Core ML can express that form
    /// (scales in `dtype`); `None` for plain tensors and forms it cannot.
    fn read_grid(&self, _name: &str, _dtype: DType) -> Result<Option<CarriedWeight>> {
        Ok(None)
    }
    /// How `name` is stored, for sources that say (GGUF).
    fn storage(&self, _name: &str) -> Option<SourceStorage> {
        None
    }
}

/// How a source stores a tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceStorage {
    /// `F32`, `BF16`, `Q4_K`, ...
    pub type_name: String,
    /// A grid of blocks with shared scales.
    pub quantized: bool,
    /// Bytes in the source file.
    pub bytes: u64,
}

/// A source tensor carried on its own grid: the constexpr op(s) that rebuild it, and how far
/// the rebuilt weights may lie from the source's own dequantization (0: not at all).
#[derive(Debug)]
pub struct CarriedWeight {
    pub compressed: Compressed,
    pub max_error: f32,
    /// The form, for reports: `uint4 × fp16 scale − fp16 offset per 32`, ...
    pub description: String,
}

/// One memory-mapped safetensors file with its validated header.
struct SafetensorsFile {
    path: PathBuf,
    map: FileBytes,
    header_len: usize,
    metadata: Metadata,
}

impl SafetensorsFile {
    fn open(path: &Path) -> Result<SafetensorsFile> {
        let map = FileBytes::map(path)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map)
            .map_err(|e| Error::malformed(path, format!("not a valid safetensors file: {e}")))?;
        // read_metadata checks offsets against each other; also check they fit the file.
        let data_len = map.len().saturating_sub(8 + header_len);
        for (name, info) in metadata.tensors() {
            if info.data_offsets.1 > data_len {
                return Err(Error::malformed(
                    path,
                    format!("tensor `{name}` ends at byte {} but the data section has {data_len}", info.data_offsets.1),
                ));
            }
        }
        Ok(SafetensorsFile { path: path.to_path_buf(), map, header_len, metadata })
    }

    fn read_f32(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some(info) = self.metadata.info(name) else { return Ok(None) };
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        let bytes = self
            .map
            .get(start..end)
            .ok_or_else(|| Error::malformed(&self.path, format!("tensor `{name}` lies outside the file")))?;
        let values = match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(Error::malformed(
                    &self.path,
                    format!("tensor `{name}` is {other:?}; corelm reads F32, F16 and BF16 checkpoints"),
                ))
            }
        };
        Ok(Some(values))
    }
}

/// A Hugging Face model folder: `model.safetensors`, or shards listed in
/// `model.safetensors.index.json`.
pub struct Safetensors {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    index: BTreeMap<String, usize>,
}

impl Safetensors {
    pub fn open(dir: &Path) -> Result<Safetensors> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if index_path.is_file() {
            let text = std::fs::read(&index_path).at(&index_path)?;
            let json: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| Error::malformed(&index_path, format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::malformed(&index_path, "no `weight_map` object"))?;
            let mut shards: Vec<PathBuf> = Vec::new();
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .filter(|f| !f.contains('/') && !f.contains('\\') && *f != ".." && !f.is_empty())
                    .ok_or_else(|| Error::malformed(&index_path, format!("`{tensor}` maps to an invalid file name")))?;
                let p = dir.join(file);
                if !shards.contains(&p) {
                    shards.push(p);
                }
            }
            shards.sort();
            shards
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(Error::malformed(dir, "no model.safetensors or model.safetensors.index.json in this folder"));
        };
        let files = names.iter().map(|p| SafetensorsFile::open(p)).collect::<Result<Vec<_>>>()?;
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.metadata.tensors().keys() {
                if let Some(prev) = index.insert(name.clone(), i) {
                    return Err(Error::malformed(
                        &f.path,
                        format!("tensor `{name}` is also in {}", files[prev].path.display()),
                    ));
                }
            }
        }
        Ok(Safetensors { dir: dir.to_path_buf(), files, index })
    }
}

impl Checkpoint for Safetensors {
    fn source(&self) -> &Path {
        &self.dir
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let f = &self.files[*self.index.get(name)?];
        f.metadata.info(name).map(|i| i.shape.clone())
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let i =
            *self.index.get(name).ok_or_else(|| Error::malformed(&self.dir, format!("tensor `{name}` is missing")))?;
        self.files[i].read_f32(name)?.ok_or_else(|| Error::malformed(&self.dir, format!("tensor `{name}` is missing")))
    }
}

/// The shape a role's weight must have.
pub fn expected_shape(c: &ModelConfig, role: Role) -> Vec<usize> {
    use LayerRole::*;
    let h = c.hidden_size;
    let per_layer = c.per_layer_inputs.map_or(0, |p| p.width);
    let streams = c.altup.map_or(0, |a| a.inputs);
    match role {
        Role::Embed | Role::LmHead => vec![c.vocab_size, h],
        Role::PositionEmbed => vec![c.max_position_embeddings, h],
        Role::FinalNorm | Role::FinalNormBias => vec![h],
        Role::PerLayerEmbed => vec![c.per_layer_inputs.map_or(0, |p| p.vocab), c.num_layers * per_layer],
        Role::PerLayerProjection => vec![c.num_layers * per_layer, h],
        Role::PerLayerProjectionNorm => vec![per_layer],
        Role::AltUpProjection(_) | Role::AltUpUnembed(_) => vec![h, h],
        Role::Layer(l, r) => {
            let shape = c.layer(l);
            let (q, kv, i) = (c.num_heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate);
            let rank = c.laurel_rank.unwrap_or(0);
            match r {
                AttnNorm | AttnNormBias | PostAttnNorm | MlpNorm | MlpNormBias | PostMlpNorm | OBias | DownBias
                | PostPerLayerNorm | LaurelNorm | AltUpCorrectScale | AltUpRouterNorm => vec![h],
                Q => vec![q, h],
                K | V => vec![kv, h],
                O => vec![h, q],
                QBias => vec![q],
                KBias | VBias => vec![kv],
                QNorm if c.qk_norm == QkNorm::Projection => vec![q],
                KNorm if c.qk_norm == QkNorm::Projection => vec![kv],
                QNorm | KNorm => vec![shape.head_dim],
                Gate | Up => vec![i, h],
                Down => vec![h, i],
                UpBias => vec![i],
                LayerScalar => vec![1],
                PerLayerGate => vec![per_layer, h],
                PerLayerProj => vec![h, per_layer],
                LaurelLeft => vec![rank, h],
                LaurelRight => vec![h, rank],
                AltUpCorrection => vec![streams, streams],
                AltUpPrediction => vec![streams * streams, streams],
                AltUpRouter => vec![streams, h],
                QGate => vec![q, h],
                _ => recurrent_shape(c, shape.mixer, r),
            }
        }
    }
}

/// The shapes of a recurrent layer's weights (empty for a role its mixer does not have).
fn recurrent_shape(c: &ModelConfig, mixer: Mixer, r: LayerRole) -> Vec<usize> {
    use LayerRole::*;
    let h = c.hidden_size;
    match (mixer, c.linear) {
        (Mixer::ShortConv { kernel, .. }, _) => match r {
            MixerIn => vec![3 * h, h],
            MixerInBias => vec![3 * h],
            ConvKernel => vec![h, kernel],
            ConvBias | MixerOutBias => vec![h],
            MixerOut => vec![h, h],
            _ => vec![],
        },
        (Mixer::GatedDeltaNet, Some(la)) => {
            let values = la.value_heads * la.value_dim;
            match r {
                MixerIn => vec![la.conv_channels(), h],
                ConvKernel => vec![la.conv_channels(), la.conv_kernel],
                MixerOut => vec![h, values],
                DeltaGate => vec![values, h],
                DeltaBeta | DeltaDecay => vec![la.value_heads, h],
                DtBias | ALog => vec![la.value_heads],
                MixerNorm => vec![la.value_dim],
                _ => vec![],
            }
        }
        (Mixer::Mamba2, Some(la)) => {
            let values = la.value_heads * la.value_dim;
            let projected = values + la.conv_channels() + la.value_heads;
            match r {
                MixerIn => vec![projected, h],
                MixerInBias if la.proj_bias => vec![projected],
                ConvKernel => vec![la.conv_channels(), la.conv_kernel],
                ConvBias if la.conv_bias => vec![la.conv_channels()],
                DtBias | ALog | SkipScale => vec![la.value_heads],
                MixerNorm => vec![values],
                MixerOut => vec![h, values],
                MixerOutBias if la.proj_bias => vec![h],
                _ => vec![],
            }
        }
        _ => vec![],
    }
}

/// Finds `name`: as given, without its first component (`transformer.h.0` vs `h.0`), or, for
/// the language model of a multimodal checkpoint, under `model.language_model.` (transformers
/// 5) or `language_model.model.` (4.x).
pub fn resolve(ck: &dyn Checkpoint, name: &str) -> Option<String> {
    let mut candidates = vec![name.to_string()];
    if let Some((_, rest)) = name.split_once('.') {
        candidates.push(rest.to_string());
    }
    match name.strip_prefix("model.") {
        Some(rest) => {
            candidates.push(format!("model.language_model.{rest}"));
            candidates.push(format!("language_model.model.{rest}"));
        }
        None => candidates.push(format!("language_model.{name}")),
    }
    candidates.into_iter().find(|n| ck.shape(n).is_some())
}

/// A whole-tensor role's weight in its stored compressed form, if the checkpoint has one Core ML
/// can express (see [`Checkpoint::read_grid`]), with its shape checked.
pub fn load_grid(
    ck: &dyn Checkpoint,
    c: &ModelConfig,
    role: Role,
    spec: &TensorSpec,
    dtype: DType,
) -> Result<Option<CarriedWeight>> {
    let Some(name) = resolve(ck, &spec.name) else { return Ok(None) };
    let Some(grid) = ck.read_grid(&name, dtype)? else { return Ok(None) };
    let shape = grid.compressed.matrix_shape().to_vec();
    let expected = expected_shape(c, role);
    if shape != expected {
        return Err(Error::malformed(
            ck.source(),
            format!("tensor `{name}` has shape {shape:?}; {expected:?} expected for {role:?}"),
        ));
    }
    Ok(Some(grid))
}

/// Reads a role's weight as the graph wants it: the right slice of a fused tensor, transposed
/// where the checkpoint stores it transposed, with its shape checked.
pub fn load(ck: &dyn Checkpoint, c: &ModelConfig, role: Role, spec: &TensorSpec) -> Result<(Vec<usize>, Vec<f32>)> {
    let expected = expected_shape(c, role);
    let missing = || Error::malformed(ck.source(), format!("tensor `{}` is missing", spec.name));
    let name = resolve(ck, &spec.name).ok_or_else(missing)?;
    let shape = ck.shape(&name).ok_or_else(missing)?;
    let wrong = |got: &[usize]| {
        Error::malformed(
            ck.source(),
            format!("tensor `{name}` has shape {got:?}; {:?} expected for {role:?}", expected),
        )
    };
    let data = ck.read_f32(&name)?;
    // A depthwise convolution's kernel (channels, 1, taps) reads as (channels, taps).
    let shape = match shape.as_slice() {
        [r, 1, c] => vec![*r, *c],
        _ => shape,
    };
    let (rows_total, cols) = match shape.as_slice() {
        [n] => (*n, 1),
        [r, c] => (*r, *c),
        _ => return Err(wrong(&shape)),
    };
    let (data, shape) = match spec.take {
        Take::Whole => (data, shape),
        Take::Rows { start, len } => {
            if start + len > rows_total {
                return Err(wrong(&shape));
            }
            let out = data[start * cols..(start + len) * cols].to_vec();
            let s = if shape.len() == 1 { vec![len] } else { vec![len, cols] };
            (out, s)
        }
        Take::TransposedRows { start, len } => {
            // Stored (in, out): output rows are columns start..start+len.
            if shape.len() != 2 || start + len > cols {
                return Err(wrong(&shape));
            }
            let mut out = Vec::with_capacity(len * rows_total);
            for o in start..start + len {
                out.extend((0..rows_total).map(|r| data[r * cols + o]));
            }
            (out, vec![len, rows_total])
        }
        Take::EveryRows { start, len, period } => {
            if period == 0 || start + len > period || !rows_total.is_multiple_of(period) {
                return Err(wrong(&shape));
            }
            let out: Vec<f32> = (0..rows_total / period)
                .flat_map(|b| data[(b * period + start) * cols..(b * period + start + len) * cols].iter().copied())
                .collect();
            let rows = rows_total / period * len;
            let s = if shape.len() == 1 { vec![rows] } else { vec![rows, cols] };
            (out, s)
        }
    };
    if shape != expected {
        return Err(wrong(&shape));
    }
    Ok((shape, data))
}
