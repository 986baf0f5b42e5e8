//! From a checkpoint folder (or GGUF file) to a finished `.mlpackage`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::checkpoint::{Checkpoint, Safetensors};
use crate::config::ModelConfig;
use crate::gguf_source::GgufCheckpoint;
use crate::graph::{build_function, store_weights, GraphOptions, GridType, Progress, SourceGrid, Stage};
use crate::{Error, Result};
use corelm_contract::{keys, names};
use corelm_format::error::IoContext;
use corelm_format::package::{ExtraItem, WriteOptions};
use corelm_format::{DType, PackageWriter, ProgramBuilder};

/// Tokens the KV cache holds when `--context` is not given, unless the model was trained on fewer.
pub const DEFAULT_CONTEXT: usize = 2048;

/// The context a conversion gets without `--context`: [`DEFAULT_CONTEXT`], or the positions the
/// model was trained for when those are fewer (GPT-2's learned table has 1024, a tiny one 64).
pub fn default_context(c: &ModelConfig) -> usize {
    DEFAULT_CONTEXT.min(c.max_position_embeddings).max(1)
}

/// What a conversion produced, for `--json`.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// The package (the first part, with --chunks).
    pub output: PathBuf,
    /// Every package written: the output, or its parts in running order.
    pub packages: Vec<PathBuf>,
    pub architecture: String,
    pub parameters: u64,
    pub layers: usize,
    pub context: usize,
    pub functions: Vec<String>,
    /// Quantized source tensors (GGUF) by ggml type: how each was carried, the error, the bytes.
    pub grid_types: Vec<GridType>,
    /// The same, tensor by tensor.
    pub source_grids: Vec<SourceGrid>,
    pub output_bytes: u64,
    pub seconds: f64,
    /// Peak resident memory of this process (VmHWM), when the OS reports it.
    pub peak_memory_bytes: Option<u64>,
    /// Weights processed per second, as MB of float32 parameters.
    pub megabytes_per_second: f64,
    /// What of the source was left out, and why (a multimodal checkpoint's towers).
    pub notes: Vec<String>,
}

/// A loaded source: configuration, tensors and the files a runtime needs beside the weights.
pub struct Source {
    pub config: ModelConfig,
    pub checkpoint: Box<dyn Checkpoint>,
    /// Model id for metadata (`co.huggingface.exporters.name`).
    pub id: String,
    /// Files to ship in the package: tokenizer.json, tokenizer_config.json, generation_config.json.
    pub extras: Vec<(String, Vec<u8>)>,
    /// What of the source is left out (see [`crate::arch::left_out`]).
    pub notes: Vec<String>,
}

/// Opens a Hugging Face folder (`config.json` + safetensors) or a `.gguf` file.
pub fn open_source(path: &Path) -> Result<Source> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let (checkpoint, json) = GgufCheckpoint::open(path)?;
        let config = crate::arch::read_config(path, &json)?;
        let extras = crate::gguf_source::extras(checkpoint.file())?;
        let id = json["_name_or_path"].as_str().map(str::to_string).unwrap_or_else(|| file_stem(path));
        return Ok(Source { config, checkpoint: Box::new(checkpoint), id, extras, notes: vec![] });
    }
    if !path.is_dir() {
        return Err(Error::malformed(path, "not a model folder (config.json and *.safetensors) or a .gguf file"));
    }
    let config_path = path.join("config.json");
    let text = std::fs::read(&config_path).at(&config_path)?;
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| Error::malformed(&config_path, format!("not valid JSON: {e}")))?;
    let config = crate::arch::read_config(&config_path, &json)?;
    let checkpoint = Box::new(Safetensors::open(path)?);
    let id = json
        .get("_name_or_path")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| file_stem(path));
    let mut extras = Vec::new();
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        let p = path.join(name);
        if p.is_file() {
            extras.push((name.to_string(), std::fs::read(&p).at(&p)?));
        }
    }
    Ok(Source { config, checkpoint, id, extras, notes: crate::arch::left_out(&json) })
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`).
pub fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes of every file under `path`.
pub(crate) fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The query lengths a Gated DeltaNet model's functions take when none are asked for: its
/// chunked recurrence is unrolled over a fixed number of chunks, so each function has one
/// length; 1 decodes, the others prefill (the driver combines them, padding none). A short-
/// convolution model on the Neural Engine (fixed lengths) takes the ones up to 64.
pub const HYBRID_QUERY_LENGTHS: [usize; 5] = [1, 4, 16, 64, 256];

/// The options with a hybrid model's needs applied, before the profile's: fixed query lengths
/// including 1 where they are needed (the driver never pads a recurrent model's call). Gated
/// DeltaNet and Mamba-2 are not built for the Neural Engine (their chunked form needs fp32 for
/// the decays' cumulative sums, and the delta rule for its triangular inverse).
fn hybrid_options(c: &ModelConfig, mut opts: GraphOptions) -> Result<GraphOptions> {
    if !c.is_hybrid() {
        return Ok(opts);
    }
    let delta = c.layers.iter().any(|l| l.mixer.is_chunked());
    let ane = opts.profile == crate::graph::Profile::Ane;
    if delta && ane {
        return Err(Error::invalid(format!(
            "--profile ane is not available for {}: its chunked linear-attention layers (Gated DeltaNet, Mamba-2) \
             compute the decays' cumulative sums (and the delta rule a triangular inverse) in fp32, which the Neural \
             Engine does not have; convert for the default profile",
            c.family.name()
        )));
    }
    if opts.query_lengths.is_empty() && (delta || ane) {
        let longest = if delta { usize::MAX } else { crate::graph::ANE_PREFILL_CHUNK };
        opts.query_lengths =
            HYBRID_QUERY_LENGTHS.iter().copied().filter(|&n| n <= opts.context && n <= longest).collect();
    }
    if !opts.query_lengths.is_empty() && !opts.query_lengths.contains(&1) {
        return Err(Error::invalid(
            "a model with recurrent layers needs a query length of 1 among --query-lengths: its state cannot take padding",
        ));
    }
    Ok(opts)
}

/// Converts `source` into a package at `output`, written as `write` says.
pub fn convert(
    source: &Source,
    output: &Path,
    opts: &GraphOptions,
    write: &WriteOptions,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    let started = Instant::now();
    let c = &source.config;
    let opts = &hybrid_options(c, opts.clone())?.resolved()?;
    if opts.context == 0 {
        return Err(Error::invalid("--context must be at least 1"));
    }
    if opts.query_lengths.iter().any(|&n| n == 0 || n > opts.context) {
        return Err(Error::invalid(format!("query lengths must lie in 1..={}", opts.context)));
    }
    if c.rope.is_none() && opts.context > c.max_position_embeddings {
        return Err(Error::invalid(format!(
            "{} has learned positions for {} tokens; --context {} is too long",
            c.family.name(),
            c.max_position_embeddings,
            opts.context
        )));
    }
    if opts.chunks == 0 || opts.chunks > c.num_layers {
        return Err(Error::invalid(format!("--chunks must lie in 1..={} (the model's layers)", c.num_layers)));
    }
    if opts.chunks > 1 && !opts.target.supports_states() {
        return Err(Error::invalid("--chunks needs the KV cache as states (--target ios18)"));
    }
    let stages = Stage::split(c, opts.chunks)?;
    let paths = if opts.chunks == 1 { vec![output.to_path_buf()] } else { chunk_paths(output, opts.chunks)? };
    // Either every part is written or none is left behind.
    if !write.overwrite {
        if let Some(p) = paths.iter().find(|p| std::fs::symlink_metadata(p).is_ok()) {
            return Err(Error::OutputExists { path: p.clone() });
        }
    }
    let mut written = Vec::new();
    let mut functions = Vec::new();
    let mut source_grids = Vec::new();
    for (stage, path) in stages.iter().zip(&paths) {
        match write_stage(source, path, opts, write, progress, stage, &paths) {
            Ok((p, f, g)) => {
                written.push(p);
                functions = f;
                source_grids.extend(g);
            }
            Err(e) => {
                for p in &written {
                    let _ = std::fs::remove_dir_all(p);
                }
                return Err(e);
            }
        }
    }
    Ok(Summary {
        output_bytes: written.iter().map(|p| dir_size(p)).sum(),
        output: written[0].clone(),
        packages: written,
        architecture: c.family.name().into(),
        parameters: c.parameter_count(),
        layers: c.num_layers,
        context: opts.context,
        functions,
        grid_types: GridType::summarize(&source_grids),
        source_grids,
        seconds: started.elapsed().as_secs_f64(),
        peak_memory_bytes: peak_memory(),
        megabytes_per_second: c.parameter_count() as f64 * 4.0 / 1e6 / started.elapsed().as_secs_f64().max(1e-9),
        notes: source.notes.clone(),
    })
}

/// The per-layer embedding table (Gemma 3n, 4) as the runtime reads it: (rows, width,
/// row-major bytes in `dtype`, the package's precision). It stays outside the program: a token
/// needs one row of it, and a table of vocabulary × layers × width (4.7 GB in fp16 for Gemma 4
/// E2B) should be neither loaded whole nor gathered on the Neural Engine.
fn per_layer_table(source: &Source, dtype: DType) -> Result<Option<(usize, usize, Vec<u8>)>> {
    use crate::arch::Role;
    let c = &source.config;
    let Some(spec) = crate::arch::tensor_spec(c, Role::PerLayerEmbed) else { return Ok(None) };
    let (shape, data) = crate::checkpoint::load(source.checkpoint.as_ref(), c, Role::PerLayerEmbed, &spec)?;
    let bytes = match dtype {
        DType::Fp32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => data.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
    };
    Ok(Some((shape[0], shape[1], bytes)))
}

/// `NAME.mlpackage` split in `k` parts: `NAME_1ofK.mlpackage`, ... beside it.
fn chunk_paths(output: &Path, k: usize) -> Result<Vec<PathBuf>> {
    let stem = output
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".mlpackage"))
        .ok_or_else(|| Error::invalid(format!("{}: the output name must end in .mlpackage", output.display())))?;
    Ok((1..=k).map(|i| output.with_file_name(format!("{stem}_{i}of{k}.mlpackage"))).collect())
}

/// Writes the package for one stage of the layer stack; returns its path, function names and
/// the grids it could not keep.
fn write_stage(
    source: &Source,
    output: &Path,
    opts: &GraphOptions,
    write: &WriteOptions,
    progress: &mut dyn Progress,
    stage: &Stage,
    parts: &[PathBuf],
) -> Result<(PathBuf, Vec<String>, Vec<SourceGrid>)> {
    let c = &source.config;
    let mut pkg = PackageWriter::create(output, write)?;
    let weights = store_weights(c, source.checkpoint.as_ref(), opts, pkg.weights(), stage, progress)?;
    let mut program = ProgramBuilder::new(opts.target);
    let mut functions = Vec::new();
    if opts.query_lengths.is_empty() {
        program.add_function(build_function("main", c, &weights, opts, pkg.weights(), None, stage)?)?;
        functions.push("main".to_string());
    } else {
        for &n in &opts.query_lengths {
            let name = format!("length_{n}");
            program.add_function(build_function(&name, c, &weights, opts, pkg.weights(), Some(n), stage)?)?;
            functions.push(name);
        }
        program.set_default_function(&functions[0]);
    }
    let md = &mut program.metadata;
    md.author = "corelm".into();
    md.version = env!("CARGO_PKG_VERSION").into();
    md.short_description = format!("{} converted by corelm", source.id);
    let ud = &mut md.user_defined;
    let ids = |v: &[u32]| v.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    ud.insert(keys::HF_EXPORTERS_NAME.into(), source.id.clone());
    ud.insert(keys::SOURCE.into(), source.id.clone());
    ud.insert(keys::ARCHITECTURE.into(), c.family.name().into());
    ud.insert(keys::CONTEXT_LENGTH.into(), opts.context.to_string());
    ud.insert(keys::VERSION.into(), env!("CARGO_PKG_VERSION").into());
    ud.insert(
        keys::QUERY_LENGTHS.into(),
        if opts.query_lengths.is_empty() {
            "flexible".into()
        } else {
            ids(&opts.query_lengths.iter().map(|&n| n as u32).collect::<Vec<_>>())
        },
    );
    ud.insert(keys::VOCAB_SIZE.into(), c.vocab_size.to_string());
    ud.insert(keys::PROFILE.into(), format!("{:?}", opts.profile).to_lowercase());
    if parts.len() > 1 {
        // The driver opens the parts, siblings in one folder, and runs them in this order.
        let names: Vec<String> =
            parts.iter().map(|p| p.file_name().expect("named").to_string_lossy().into_owned()).collect();
        ud.insert(keys::CHUNKS.into(), names.join(","));
        ud.insert(keys::LAYERS.into(), format!("{}..{}", stage.layers.start, stage.layers.end));
    } else if c.cached_layers().count() < c.num_layers {
        // Layers reusing others' keys and values have no cache: the caches no longer count them.
        ud.insert(keys::LAYERS.into(), format!("0..{}", c.num_layers));
    }
    if c.is_hybrid() {
        // The driver snapshots these instead of rewinding, and never pads a call.
        let mut states = vec![names::CONV_STATE.to_string()];
        if c.layers.iter().any(|l| l.mixer.is_chunked()) {
            states.push(names::RECURRENT_STATE.to_string());
        }
        ud.insert(keys::RECURRENT_STATES.into(), states.join(","));
    }
    if let Some(slots) = crate::graph::ring_slots(c, opts) {
        // The driver must start each chunk at a multiple of its length (see `ring_slots`).
        ud.insert(keys::RING_SLOTS.into(), slots.to_string());
    }
    if let Some(b) = c.bos_token_id {
        ud.insert(keys::BOS_TOKEN_ID.into(), b.to_string());
    }
    ud.insert(keys::EOS_TOKEN_IDS.into(), ids(&c.eos_token_ids));
    if let Some(p) = c.pad_token_id {
        ud.insert(keys::PAD_TOKEN_ID.into(), p.to_string());
    }
    let dtype = opts.precision.dtype();
    if let Some(table) = per_layer_table(source, dtype).transpose().filter(|_| stage.first) {
        let (rows, width, bytes) = table?;
        ud.insert(keys::PER_LAYER_EMBEDDINGS.into(), format!("{}:{rows}x{width}", dtype.name()));
        pkg.add_item(ExtraItem {
            author: corelm_format::package::CORELM_AUTHOR.into(),
            name: "per_layer_embeddings.bin".into(),
            description: "the per-layer embedding table, rows gathered by the runtime".into(),
            bytes,
        })?;
    }
    // The tokenizer and chat template travel with the first part, where the driver looks.
    for (name, bytes) in source.extras.iter().filter(|_| stage.first) {
        pkg.add_item(ExtraItem {
            author: corelm_format::package::CORELM_AUTHOR.into(),
            name: name.clone(),
            description: format!("{name} of the source model"),
            bytes: bytes.clone(),
        })?;
    }
    let model = program.finish()?;
    Ok((pkg.commit(&model)?, functions, weights.source_grids))
}
