//! Deployment planning: how much memory a model takes on an Apple device at a context length,
//! how fast it can decode there, and which compression, context and compute units to ship.

pub mod devices;
pub mod model;
pub mod plan;

use std::path::Path;

use corelm_format::{Error, IoContext, Result};

pub use devices::{Device, DEVICES};
pub use model::ModelShape;
pub use plan::{plan, Assumptions, Plan, Quant};

/// Reads what the planner needs from a `.mlpackage`, a `.gguf` file, a Hugging Face model folder
/// (only its `config.json` is read) or a `config.json` file.
pub fn open(path: &Path) -> Result<ModelShape> {
    let is_package = path.extension().is_some_and(|e| e == "mlpackage") || path.join("Manifest.json").is_file();
    if path.is_dir() && is_package {
        return ModelShape::from_package(path);
    }
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let source = corelm_convert::convert::open_source(path)?;
        return Ok(ModelShape::from_config(&source.config, &source.id));
    }
    let config_path = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    if !config_path.is_file() {
        return Err(Error::malformed(
            path,
            "not a .mlpackage, a .gguf file, a model folder with config.json, or a config.json file",
        ));
    }
    let text = std::fs::read(&config_path).at(&config_path)?;
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| Error::malformed(&config_path, format!("not valid JSON: {e}")))?;
    let config = corelm_convert::arch::read_config(&config_path, &json)?;
    let folder = if path.is_dir() { path } else { path.parent().unwrap_or(path) };
    let name = json
        .get("_name_or_path")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    Ok(ModelShape::from_config(&config, &name))
}
