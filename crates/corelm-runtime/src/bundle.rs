//! Delivery bundles: a package plus `bundle.json`, which lists every file with its size and
//! SHA-256, the model id, version and minimum OS. Written as a folder or a tar file; verified
//! file by file; installed into a cache folder only after every byte checks out.

use std::fs;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use corelm_format::Package;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The manifest's file name, at the bundle's root.
pub const MANIFEST: &str = "bundle.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    /// Relative to the bundle root, `/`-separated, inside `package`.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleManifest {
    pub format: u32,
    pub model_id: String,
    pub version: String,
    pub minimum_os: String,
    /// The package folder's name inside the bundle (`<name>.mlpackage`).
    pub package: String,
    pub files: Vec<BundleFile>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 and length of everything `r` yields.
pub fn sha256_of(mut r: impl Read) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Ok((hex(&h.finalize()), n));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

/// A manifest path is safe: relative, no `..`, no empty or dot components.
fn safe_relative(path: &str) -> bool {
    !path.is_empty() && !path.contains('\\') && Path::new(path).components().all(|c| matches!(c, Component::Normal(_)))
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir).map_err(io(dir))?.collect::<std::io::Result<_>>().map_err(io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let kind = e.file_type().map_err(io(&path))?;
        let rel = format!("{rel}/{name}");
        if kind.is_dir() {
            walk(&path, &rel, out)?;
        } else if kind.is_file() {
            out.push((rel, path));
        } else {
            return Err(Error::invalid(format!("{}: links and special files cannot be bundled", path.display())));
        }
    }
    Ok(())
}

/// The manifest of a package: its files hashed, identity from its metadata.
pub fn manifest_for(package: &Path) -> Result<BundleManifest> {
    let pkg = Package::open(package)?;
    let name = package
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".mlpackage"))
        .ok_or_else(|| Error::invalid(format!("{}: a package folder ends in .mlpackage", package.display())))?;
    let meta = &pkg.model().description.metadata;
    let model_id =
        meta.user_defined.get("corelm.source").cloned().unwrap_or_else(|| name.trim_end_matches(".mlpackage").into());
    let minimum_os = match pkg.model().target() {
        Some(t) => t.os_releases().to_string(),
        None => format!("specification {}", pkg.model().spec_version),
    };
    let mut files = Vec::new();
    let mut found = Vec::new();
    walk(package, &name, &mut found)?;
    for (rel, path) in found {
        let (sha256, size) = sha256_of(fs::File::open(&path).map_err(io(&path))?).map_err(io(&path))?;
        files.push(BundleFile { path: rel, size, sha256 });
    }
    Ok(BundleManifest { format: 1, model_id, version: meta.version.clone(), minimum_os, package: name, files })
}

/// A sibling temporary path for `target`, so a rename can put the result in place at once.
fn staging(target: &Path) -> Result<PathBuf> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io(parent))?;
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(parent.join(format!(".{name}.{}.partial", std::process::id())))
}

fn refuse_existing(target: &Path, overwrite: bool) -> Result<()> {
    if fs::symlink_metadata(target).is_ok() {
        if !overwrite {
            return Err(Error::OutputExists { path: target.to_path_buf() });
        }
        let removed = if target.is_dir() { fs::remove_dir_all(target) } else { fs::remove_file(target) };
        removed.map_err(io(target))?;
    }
    Ok(())
}

/// Writes the bundle of `package` to `output`: a tar file when it ends in `.tar`, else a folder.
pub fn write(package: &Path, output: &Path, overwrite: bool) -> Result<BundleManifest> {
    let manifest = manifest_for(package)?;
    if fs::symlink_metadata(output).is_ok() && !overwrite {
        return Err(Error::OutputExists { path: output.to_path_buf() });
    }
    let temp = staging(output)?;
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    let result = (|| -> Result<()> {
        if output.extension().is_some_and(|e| e == "tar") {
            let file = fs::File::create(&temp).map_err(io(&temp))?;
            let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
            // The manifest first, so a reader can check files as they stream past.
            let mut header = tar::Header::new_gnu();
            header.set_size(json.len() as u64);
            header.set_mode(0o644);
            tar.append_data(&mut header, MANIFEST, json.as_slice()).map_err(io(&temp))?;
            for f in &manifest.files {
                let src = package.parent().unwrap_or(Path::new(".")).join(&f.path);
                tar.append_path_with_name(&src, &f.path).map_err(io(&src))?;
            }
            tar.into_inner().map_err(io(&temp))?.flush().map_err(io(&temp))?;
        } else {
            fs::create_dir_all(&temp).map_err(io(&temp))?;
            fs::write(temp.join(MANIFEST), &json).map_err(io(&temp))?;
            for f in &manifest.files {
                let (src, dst) = (package.parent().unwrap_or(Path::new(".")).join(&f.path), temp.join(&f.path));
                fs::create_dir_all(dst.parent().expect("inside the bundle")).map_err(io(&dst))?;
                fs::copy(&src, &dst).map_err(io(&src))?;
            }
        }
        // The copy must match what was hashed (a package changing underneath would not).
        verify(&temp).map(|_| ())?;
        refuse_existing(output, overwrite)?;
        fs::rename(&temp, output).map_err(io(output))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&temp).or_else(|_| fs::remove_file(&temp));
    }
    result.map(|_| manifest)
}

fn parse_manifest(bytes: &[u8], origin: &Path) -> Result<BundleManifest> {
    let m: BundleManifest = serde_json::from_slice(bytes)
        .map_err(|e| Error::invalid(format!("{}: {MANIFEST} is not a bundle manifest: {e}", origin.display())))?;
    if m.format != 1 {
        return Err(Error::invalid(format!("{}: bundle format {} is not supported", origin.display(), m.format)));
    }
    let prefix = format!("{}/", m.package);
    if !safe_relative(&m.package) || !m.package.ends_with(".mlpackage") {
        return Err(Error::invalid(format!("{}: bad package name `{}`", origin.display(), m.package)));
    }
    for f in &m.files {
        if !safe_relative(&f.path) || !f.path.starts_with(&prefix) {
            return Err(Error::invalid(format!("{}: unsafe path `{}` in {MANIFEST}", origin.display(), f.path)));
        }
    }
    Ok(m)
}

/// Checks a bundle folder or tar file: every listed file present with its size and SHA-256,
/// nothing else in it. Returns its manifest.
pub fn verify(bundle: &Path) -> Result<BundleManifest> {
    if bundle.is_dir() {
        let json = fs::read(bundle.join(MANIFEST)).map_err(io(&bundle.join(MANIFEST)))?;
        let m = parse_manifest(&json, bundle)?;
        let mut present = Vec::new();
        walk(&bundle.join(&m.package), &m.package, &mut present)?;
        let listed: std::collections::BTreeSet<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        if let Some((extra, _)) = present.iter().find(|(rel, _)| !listed.contains(rel.as_str())) {
            return Err(Error::invalid(format!("{}: `{extra}` is not listed in {MANIFEST}", bundle.display())));
        }
        for f in &m.files {
            let path = bundle.join(&f.path);
            let file =
                fs::File::open(&path).map_err(|e| Error::invalid(format!("{}: `{}` {e}", bundle.display(), f.path)))?;
            check(bundle, f, file)?;
        }
        return Ok(m);
    }
    let file = fs::File::open(bundle).map_err(io(bundle))?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let mut manifest: Option<BundleManifest> = None;
    let mut seen = std::collections::BTreeSet::new();
    for entry in tar.entries().map_err(io(bundle))? {
        let entry = entry.map_err(|e| Error::invalid(format!("{}: not a readable tar file: {e}", bundle.display())))?;
        let path = entry.path().map_err(io(bundle))?.to_string_lossy().replace('\\', "/");
        match &manifest {
            None if path == MANIFEST => {
                let mut bytes = Vec::new();
                let mut entry = entry;
                entry.read_to_end(&mut bytes).map_err(io(bundle))?;
                manifest = Some(parse_manifest(&bytes, bundle)?);
            }
            None => return Err(Error::invalid(format!("{}: {MANIFEST} must come first", bundle.display()))),
            Some(m) => {
                if entry.header().entry_type().is_dir() {
                    continue;
                }
                let f = m.files.iter().find(|f| f.path == path).ok_or_else(|| {
                    Error::invalid(format!("{}: `{path}` is not listed in {MANIFEST}", bundle.display()))
                })?;
                if !entry.header().entry_type().is_file() {
                    return Err(Error::invalid(format!("{}: `{path}` is not a plain file", bundle.display())));
                }
                check(bundle, f, entry)?;
                seen.insert(path);
            }
        }
    }
    let m = manifest.ok_or_else(|| Error::invalid(format!("{}: no {MANIFEST}", bundle.display())))?;
    if let Some(missing) = m.files.iter().find(|f| !seen.contains(&f.path)) {
        return Err(Error::invalid(format!("{}: `{}` is missing", bundle.display(), missing.path)));
    }
    Ok(m)
}

fn check(bundle: &Path, f: &BundleFile, r: impl Read) -> Result<()> {
    let (sha, size) = sha256_of(r).map_err(io(bundle))?;
    if size != f.size {
        return Err(Error::invalid(format!(
            "{}: `{}` has {size} bytes, {} expected",
            bundle.display(),
            f.path,
            f.size
        )));
    }
    if sha != f.sha256 {
        return Err(Error::invalid(format!(
            "{}: `{}` has SHA-256 {sha}, {} expected",
            bundle.display(),
            f.path,
            f.sha256
        )));
    }
    Ok(())
}

/// Unpacks a verified bundle tar into `cache/<id>` (via a hidden staging folder and a rename,
/// so the cache never shows a partial model); returns the installed package's path.
pub fn install(tar_path: &Path, cache: &Path, id: &str) -> Result<PathBuf> {
    let target = cache.join(id);
    let manifest = verify(tar_path)?;
    if target.join(MANIFEST).is_file() && verify(&target).is_ok() {
        return Ok(target.join(&manifest.package));
    }
    let temp = staging(&target)?;
    let result = (|| -> Result<()> {
        fs::create_dir_all(&temp).map_err(io(&temp))?;
        let file = fs::File::open(tar_path).map_err(io(tar_path))?;
        let mut tar = tar::Archive::new(std::io::BufReader::new(file));
        for entry in tar.entries().map_err(io(tar_path))? {
            let mut entry = entry.map_err(io(tar_path))?;
            let rel = entry.path().map_err(io(tar_path))?.to_string_lossy().replace('\\', "/");
            if entry.header().entry_type().is_dir() {
                continue;
            }
            // Only what the (verified) manifest lists, at paths checked to stay inside.
            if rel != MANIFEST && !manifest.files.iter().any(|f| f.path == rel) {
                return Err(Error::invalid(format!("{}: unexpected entry `{rel}`", tar_path.display())));
            }
            let dst = temp.join(&rel);
            fs::create_dir_all(dst.parent().expect("inside staging")).map_err(io(&dst))?;
            let mut out = fs::File::create(&dst).map_err(io(&dst))?;
            std::io::copy(&mut entry, &mut out).map_err(io(&dst))?;
        }
        verify(&temp)?;
        refuse_existing(&target, true)?;
        fs::rename(&temp, &target).map_err(io(&target))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&temp);
    }
    result.map(|_| target.join(&manifest.package))
}
