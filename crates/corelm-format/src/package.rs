//! `.mlpackage` folders: `Manifest.json`, the root model found through `rootModelIdentifier`,
//! and the weight files under `Data/com.apple.CoreML/weights/`. Writing happens in a hidden
//! sibling folder that is renamed into place only when everything is written and checked.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Component, Path, PathBuf};

use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::blob::BlobFile;
use crate::error::{Error, IoContext, Result};
use crate::mil::program::{Value, ValueData};
use crate::mil::validate::{blob_values, validate_model, Issue};
use crate::model::Model;
use crate::tensor::{element_count, Tensor};
pub use crate::weights::MAX_WEIGHT_FILE_BYTES;
use crate::weights::{WeightFile, WeightStore};

pub const MANIFEST: &str = "Manifest.json";
pub const DATA: &str = "Data";
pub const COREML_AUTHOR: &str = "com.apple.CoreML";
pub const MODEL_FILE: &str = "model.mlmodel";
pub const WEIGHTS_DIR: &str = "weights";
const MODEL_DESCRIPTION: &str = "CoreML Model Specification";
const WEIGHTS_DESCRIPTION: &str = "CoreML Model Weights";
/// The manifest author of the files corelm ships inside packages (tokenizer, digests, ...).
pub const CORELM_AUTHOR: &str = "ai.corelm";
/// corelm's record of each weight file's size and digest, written with the weights.
pub const WEIGHT_DIGESTS_FILE: &str = "weight-digests.json";
/// A digest record lists a few files; anything this large is not one.
const MAX_DIGESTS_BYTES: u64 = 1 << 20;
const FORMAT_VERSION: (u64, u64, u64) = (1, 0, 0);
/// Manifests are a few hundred bytes; anything this large is not one.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// The model protobuf holds no weights; 2 GiB is protobuf's own limit.
const MAX_MODEL_BYTES: u64 = 2 << 30;

/// One `itemInfoEntries` record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestItem {
    pub author: String,
    pub description: String,
    pub name: String,
    /// Relative to `Data/`.
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub file_format_version: String,
    pub item_info_entries: BTreeMap<String, ManifestItem>,
    pub root_model_identifier: String,
}

fn is_safe_relative(path: &str) -> bool {
    let p = Path::new(path);
    !path.is_empty() && !path.contains('\\') && p.components().all(|c| matches!(c, Component::Normal(_)))
}

fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let parts: Vec<u64> = v.split('.').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    match parts[..] {
        [a, b, c] => Some((a, b, c)),
        _ => None,
    }
}

impl Manifest {
    /// Parses and checks a manifest: version, four string keys per item, safe relative paths,
    /// and a root identifier that names an item.
    pub fn parse(path: &Path, text: &[u8]) -> Result<Manifest> {
        let bad = |m: String| Error::malformed(path, m);
        let json: serde_json::Value = serde_json::from_slice(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let obj = json.as_object().ok_or_else(|| bad("the manifest is not a JSON object".into()))?;
        let version = obj
            .get("fileFormatVersion")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("`fileFormatVersion` is missing or not a string".into()))?;
        match parse_version(version) {
            Some(v) if v <= FORMAT_VERSION => {}
            Some(_) => return Err(bad(format!("file format version {version} is newer than 1.0.0"))),
            None => return Err(bad(format!("file format version \"{version}\" is not major.minor.patch"))),
        }
        let mut items = BTreeMap::new();
        if let Some(entries) = obj.get("itemInfoEntries") {
            let entries = entries.as_object().ok_or_else(|| bad("`itemInfoEntries` is not an object".into()))?;
            for (id, entry) in entries {
                let field = |key: &str| {
                    entry
                        .get(key)
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("item {id}: `{key}` is missing or not a string")))
                };
                let item = ManifestItem {
                    author: field("author")?,
                    description: field("description")?,
                    name: field("name")?,
                    path: field("path")?,
                };
                if !is_safe_relative(&item.path) {
                    return Err(bad(format!(
                        "item {id}: path \"{}\" must be relative and stay inside Data/ (no `..`, no absolute paths)",
                        item.path
                    )));
                }
                items.insert(id.clone(), item);
            }
        }
        let root = obj
            .get("rootModelIdentifier")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("`rootModelIdentifier` is missing or not a string".into()))?;
        if !items.contains_key(root) {
            return Err(bad(format!("root model identifier {root} names no item")));
        }
        Ok(Manifest {
            file_format_version: version.into(),
            item_info_entries: items,
            root_model_identifier: root.into(),
        })
    }

    /// The JSON coremltools writes: sorted keys, four-space indent, trailing newline.
    pub fn to_json(&self) -> String {
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        self.serialize(&mut ser).expect("manifests serialize");
        let mut text = String::from_utf8(out).expect("JSON is UTF-8");
        text.push('\n');
        text
    }

    pub fn root(&self) -> &ManifestItem {
        &self.item_info_entries[&self.root_model_identifier]
    }
}

/// A package opened for reading.
pub struct Package {
    path: PathBuf,
    manifest: Manifest,
    model_path: PathBuf,
    model: Model,
}

impl Package {
    pub fn open(path: impl AsRef<Path>) -> Result<Package> {
        let path = path.as_ref().to_path_buf();
        let meta = fs::metadata(&path).at(&path)?;
        if !meta.is_dir() {
            return Err(Error::malformed(&path, "not a directory (an .mlpackage is a folder)"));
        }
        let manifest_path = path.join(MANIFEST);
        if !manifest_path.is_file() {
            return Err(Error::malformed(&path, "no Manifest.json: not a valid .mlpackage"));
        }
        let text = read_capped(&manifest_path, MAX_MANIFEST_BYTES)?;
        let manifest = Manifest::parse(&manifest_path, &text)?;
        for (id, item) in &manifest.item_info_entries {
            let target = path.join(DATA).join(&item.path);
            if fs::symlink_metadata(&target).is_err() {
                return Err(Error::malformed(
                    &manifest_path,
                    format!("item {id} ({}) points at {}, which does not exist", item.name, target.display()),
                ));
            }
        }
        let model_path = path.join(DATA).join(&manifest.root().path);
        if !model_path.is_file() {
            return Err(Error::malformed(&manifest_path, format!("root model {} is not a file", model_path.display())));
        }
        let bytes = read_capped(&model_path, MAX_MODEL_BYTES)?;
        let proto = crate::proto::Model::decode(bytes.as_slice())
            .map_err(|e| Error::malformed(&model_path, format!("not a valid Core ML model protobuf: {e}")))?;
        let model = Model::from_proto(&proto).map_err(|e| Error::malformed(&model_path, e.to_string()))?;
        Ok(Package { path, manifest, model_path, model })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn model_path(&self) -> &Path {
        &self.model_path
    }

    /// The folder `@model_path` stands for: the one holding the root model.
    pub fn model_dir(&self) -> &Path {
        self.model_path.parent().expect("the model path has a parent")
    }

    /// The weights folder: the item coremltools looks for, else `weights/` beside the model.
    pub fn weights_dir(&self) -> PathBuf {
        self.manifest
            .item_info_entries
            .values()
            .find(|i| i.name == WEIGHTS_DIR && i.author == COREML_AUTHOR)
            .map(|i| self.path.join(DATA).join(&i.path))
            .unwrap_or_else(|| self.model_dir().join(WEIGHTS_DIR))
    }

    /// Resolves a program's blob file name (`@model_path/weights/weight.bin`) safely: a relative
    /// name, a regular file, and through any symbolic link still inside the package.
    pub fn blob_path(&self, file: &str) -> Result<PathBuf> {
        let rel = file.strip_prefix("@model_path/").unwrap_or(file);
        if !is_safe_relative(rel) {
            return Err(Error::malformed(&self.model_path, format!("blob file \"{file}\" points outside the package")));
        }
        let path = self.model_dir().join(rel);
        self.inside(&path)?;
        Ok(path)
    }

    /// Checks that `path` is a regular file whose real location (links followed) is inside the
    /// package: a link to `/etc/passwd` or to another package's weights is refused.
    fn inside(&self, path: &Path) -> Result<()> {
        crate::bytes::ensure_regular_file(path)?;
        let real = fs::canonicalize(path).at(path)?;
        let root = fs::canonicalize(&self.path).at(&self.path)?;
        if !real.starts_with(&root) {
            return Err(Error::malformed(path, format!("is a link to {}, outside the package", real.display())));
        }
        Ok(())
    }

    /// Every weight file with its size in bytes, relative to the model folder.
    pub fn weight_files(&self) -> Result<Vec<(String, u64)>> {
        let dir = self.weights_dir();
        let mut files = Vec::new();
        if dir.is_dir() {
            for entry in fs::read_dir(&dir).at(&dir)? {
                let entry = entry.at(&dir)?;
                let meta = entry.metadata().at(entry.path())?;
                if meta.is_file() {
                    files.push((format!("{WEIGHTS_DIR}/{}", entry.file_name().to_string_lossy()), meta.len()));
                }
            }
        }
        files.sort();
        Ok(files)
    }

    /// What defines the compiled model, as one SHA-256: the manifest, the model spec and each
    /// weight file's name, size and content digest. corelm's packages record the digests as
    /// they write the weights (`Data/ai.corelm/weight-digests.json`), so opening one hashes no
    /// weights; a file the record does not list at its current size (foreign packages,
    /// files replaced since) is read and hashed.
    pub fn content_hash(&self) -> Result<String> {
        let recorded = self.recorded_digests()?;
        let mut h = sha2::Sha256::new();
        for rel in [self.path.join(MANIFEST), self.model_path.clone()] {
            h.update(fs::read(&rel).at(&rel)?);
        }
        for (rel, bytes) in self.weight_files()? {
            let name = rel.strip_prefix(&format!("{WEIGHTS_DIR}/")).unwrap_or(&rel);
            let digest = match recorded.iter().find(|f| f.name == name && f.bytes == bytes) {
                Some(f) => f.digest.clone(),
                None => crate::blob::weight_file_digest(&self.weights_dir().join(name))?,
            };
            h.update(rel.as_bytes());
            h.update(bytes.to_le_bytes());
            h.update(digest.as_bytes());
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The weight digests the package records; empty when it has no record.
    pub fn recorded_digests(&self) -> Result<Vec<WeightFile>> {
        let Some(item) = self
            .manifest
            .item_info_entries
            .values()
            .find(|i| i.author == CORELM_AUTHOR && i.name == WEIGHT_DIGESTS_FILE)
        else {
            return Ok(vec![]);
        };
        let path = self.path.join(DATA).join(&item.path);
        let text = read_capped(&path, MAX_DIGESTS_BYTES)?;
        let record: DigestRecord =
            serde_json::from_slice(&text).map_err(|e| Error::malformed(&path, format!("not a digest record: {e}")))?;
        Ok(record.files.into_iter().map(|(name, f)| WeightFile { name, bytes: f.bytes, digest: f.digest }).collect())
    }

    /// Opens the blob files the program refers to, once each.
    pub fn blob_files(&self) -> BlobFiles<'_> {
        BlobFiles { package: self, open: HashMap::new() }
    }

    /// Our validator plus a check of every blob reference against its weight file.
    pub fn validate(&self) -> Vec<Issue> {
        let mut issues = validate_model(&self.model);
        let mut files = self.blob_files();
        for (fname, function) in &self.model.program.functions {
            for (op, value) in blob_values(function) {
                if let Err(e) = files.read_checked(value, false) {
                    issues.push(Issue {
                        location: format!("function `{fname}`, op `{}` ({})", op.label(), op.op_type),
                        message: e.to_string(),
                    });
                }
            }
        }
        issues
    }
}

/// Blob files of one package, opened on first use.
pub struct BlobFiles<'p> {
    package: &'p Package,
    open: HashMap<PathBuf, BlobFile>,
}

impl BlobFiles<'_> {
    fn file(&mut self, name: &str) -> Result<&BlobFile> {
        let path = self.package.blob_path(name)?;
        if !self.open.contains_key(&path) {
            let file = BlobFile::open(&path)?;
            self.open.insert(path.clone(), file);
        }
        Ok(&self.open[&path])
    }

    /// The tensor a value holds, read from its blob file when needed.
    pub fn read(&mut self, value: &Value) -> Result<Tensor> {
        Ok(self.read_checked(value, true)?.expect("read asked for"))
    }

    /// Checks a value's blob record against its declared type; reads it when `read` is set.
    fn read_checked(&mut self, value: &Value, read: bool) -> Result<Option<Tensor>> {
        let (file, offset) = match &value.data {
            ValueData::Immediate(t) => return Ok(Some(t.clone())),
            ValueData::Blob { file, offset } => (file.clone(), *offset),
        };
        let shape = value
            .ty
            .shape()
            .ok_or_else(|| Error::invalid(format!("blob value of type {} has unknown dimensions", value.ty)))?;
        let blob = self.file(&file)?;
        if read {
            return blob.read(offset, value.ty.dtype, &shape).map(Some);
        }
        let meta = blob.metadata(offset)?;
        if meta.dtype != value.ty.dtype || Some(meta.element_count as usize) != element_count(&shape) {
            return Err(Error::malformed(
                blob.path(),
                format!(
                    "blob at offset {offset} holds {} {}, the program expects {}",
                    meta.element_count, meta.dtype, value.ty
                ),
            ));
        }
        Ok(None)
    }
}

/// Reads a whole file that must be a regular file of at most `cap` bytes (checked before reading).
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    crate::bytes::ensure_regular_file(path)?;
    let len = fs::metadata(path).at(path)?.len();
    if len > cap {
        return Err(Error::malformed(path, format!("{len} bytes is more than the {cap} this file may have")));
    }
    fs::read(path).at(path)
}

/// `weight-digests.json`: weight file name → size and digest.
#[derive(Serialize, Deserialize)]
struct DigestRecord {
    files: BTreeMap<String, DigestEntry>,
}

#[derive(Serialize, Deserialize)]
struct DigestEntry {
    bytes: u64,
    digest: String,
}

/// An extra file carried inside the package (tokenizer, chat template, ...).
#[derive(Clone, Debug)]
pub struct ExtraItem {
    pub author: String,
    pub name: String,
    pub description: String,
    pub bytes: Vec<u8>,
}

/// Writes a package into a hidden sibling folder; `commit` checks it and renames it into place.
/// Dropped without commit, it removes everything it wrote.
pub struct PackageWriter {
    final_path: PathBuf,
    temp_path: PathBuf,
    overwrite: bool,
    weights: Option<WeightStore>,
    extras: Vec<ExtraItem>,
    committed: bool,
}

fn item_id(path: &str) -> String {
    // Deterministic ids keep identical conversions byte-identical.
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, path.as_bytes()).to_string()
}

/// How a package is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// Replace an existing package.
    pub overwrite: bool,
    /// Weight files are split before they grow past this (a single tensor may exceed it, up to
    /// [`MAX_WEIGHT_FILE_BYTES`]).
    pub max_weight_file_bytes: u64,
}

impl Default for WriteOptions {
    /// No overwriting; weight files of at most 1 GiB, the size that stays safe on iOS.
    fn default() -> WriteOptions {
        WriteOptions { overwrite: false, max_weight_file_bytes: 1 << 30 }
    }
}

impl WriteOptions {
    pub fn overwriting() -> WriteOptions {
        WriteOptions { overwrite: true, ..WriteOptions::default() }
    }
}

impl PackageWriter {
    /// Starts a package at `path` (which must end in `.mlpackage`). An existing path is an
    /// error unless `opts.overwrite` is set.
    pub fn create(path: impl AsRef<Path>, opts: &WriteOptions) -> Result<PackageWriter> {
        let overwrite = opts.overwrite;
        if opts.max_weight_file_bytes == 0 || opts.max_weight_file_bytes > MAX_WEIGHT_FILE_BYTES {
            return Err(Error::invalid(format!(
                "weight files must be between 1 byte and 2 GiB, not {} bytes",
                opts.max_weight_file_bytes
            )));
        }
        let final_path = path.as_ref().to_path_buf();
        if final_path.extension().and_then(|e| e.to_str()) != Some("mlpackage") {
            return Err(Error::invalid(format!("{}: the output name must end in .mlpackage", final_path.display())));
        }
        if fs::symlink_metadata(&final_path).is_ok() && !overwrite {
            return Err(Error::OutputExists { path: final_path });
        }
        let file_name = final_path.file_name().expect("has an extension").to_string_lossy().into_owned();
        let parent = match final_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).at(&parent)?;
        let temp_path = parent.join(format!(".{file_name}.partial-{}", uuid::Uuid::new_v4().simple()));
        let weights_dir = temp_path.join(DATA).join(COREML_AUTHOR).join(WEIGHTS_DIR);
        fs::create_dir_all(&weights_dir).at(&weights_dir)?;
        Ok(PackageWriter {
            final_path,
            temp_path,
            overwrite,
            weights: Some(WeightStore::new(weights_dir).with_max_file_bytes(opts.max_weight_file_bytes)),
            extras: vec![],
            committed: false,
        })
    }

    /// Where blobs are written while the program is built.
    pub fn weights(&mut self) -> &mut WeightStore {
        self.weights.as_mut().expect("weights are open until commit")
    }

    /// Adds a file under `Data/<author>/<name>`, listed in the manifest.
    pub fn add_item(&mut self, item: ExtraItem) -> Result<()> {
        if !is_safe_relative(&item.author) || !is_safe_relative(&item.name) {
            return Err(Error::invalid(format!("item {}/{} must be a plain relative name", item.author, item.name)));
        }
        if item.author == CORELM_AUTHOR && item.name == WEIGHT_DIGESTS_FILE {
            return Err(Error::invalid(format!("{CORELM_AUTHOR}/{WEIGHT_DIGESTS_FILE} is written with the weights")));
        }
        self.extras.push(item);
        Ok(())
    }

    /// Validates the model, writes it and the manifest, re-reads the whole package to check
    /// every blob reference, then moves it into place.
    pub fn commit(mut self, model: &Model) -> Result<PathBuf> {
        let issues = validate_model(model);
        if !issues.is_empty() {
            return Err(Error::invalid(format!("the model is not valid:\n  {}", join_issues(&issues))));
        }
        let weight_files = self.weights.take().expect("commit runs once").finish()?;
        let record = DigestRecord {
            files: weight_files
                .into_iter()
                .map(|f| (f.name, DigestEntry { bytes: f.bytes, digest: f.digest }))
                .collect(),
        };
        self.extras.push(ExtraItem {
            author: CORELM_AUTHOR.into(),
            name: WEIGHT_DIGESTS_FILE.into(),
            description: "Size and content digest of each weight file".into(),
            bytes: serde_json::to_vec_pretty(&record).expect("the record serializes"),
        });
        let coreml_dir = self.temp_path.join(DATA).join(COREML_AUTHOR);
        let model_path = coreml_dir.join(MODEL_FILE);
        fs::write(&model_path, model.to_proto().encode_to_vec()).at(&model_path)?;
        let mut items = BTreeMap::new();
        let mut add = |author: &str, name: &str, description: &str| {
            let path = format!("{author}/{name}");
            items.insert(
                item_id(&path),
                ManifestItem { author: author.into(), description: description.into(), name: name.into(), path },
            );
        };
        add(COREML_AUTHOR, MODEL_FILE, MODEL_DESCRIPTION);
        add(COREML_AUTHOR, WEIGHTS_DIR, WEIGHTS_DESCRIPTION);
        for extra in &self.extras {
            add(&extra.author, &extra.name, &extra.description);
            let dir = self.temp_path.join(DATA).join(&extra.author);
            fs::create_dir_all(&dir).at(&dir)?;
            fs::write(dir.join(&extra.name), &extra.bytes).at(dir.join(&extra.name))?;
        }
        let manifest = Manifest {
            file_format_version: "1.0.0".into(),
            item_info_entries: items,
            root_model_identifier: item_id(&format!("{COREML_AUTHOR}/{MODEL_FILE}")),
        };
        let manifest_path = self.temp_path.join(MANIFEST);
        fs::write(&manifest_path, manifest.to_json()).at(&manifest_path)?;

        let written = Package::open(&self.temp_path)?;
        let issues = written.validate();
        if !issues.is_empty() {
            return Err(Error::invalid(format!("the written package does not read back:\n  {}", join_issues(&issues))));
        }
        self.move_into_place()?;
        self.committed = true;
        Ok(self.final_path.clone())
    }

    fn move_into_place(&self) -> Result<()> {
        let existing = fs::symlink_metadata(&self.final_path).is_ok();
        if existing && !self.overwrite {
            return Err(Error::OutputExists { path: self.final_path.clone() });
        }
        if existing {
            // Move the old package aside first so a failure never leaves neither.
            let aside = self.temp_path.with_extension("replaced");
            fs::rename(&self.final_path, &aside).at(&self.final_path)?;
            fs::rename(&self.temp_path, &self.final_path).at(&self.final_path)?;
            let removed = if aside.is_dir() { fs::remove_dir_all(&aside) } else { fs::remove_file(&aside) };
            removed.at(&aside)?;
        } else {
            fs::rename(&self.temp_path, &self.final_path).at(&self.final_path)?;
        }
        Ok(())
    }
}

impl Drop for PackageWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.temp_path);
        }
    }
}

pub fn join_issues(issues: &[Issue]) -> String {
    issues.iter().map(|i| i.to_string()).collect::<Vec<_>>().join("\n  ")
}
