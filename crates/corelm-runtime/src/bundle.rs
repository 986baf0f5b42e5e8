//! Delivery bundles: a package plus `bundle.json`, which lists every file with its size and
//! SHA-256, the model id, version and minimum OS. Written as a folder or a tar file; verified
//! file by file; installed into a cache folder only after every byte checks out.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use corelm_contract::keys;
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

/// A manifest path is safe and canonical: relative, `/`-separated, every component a plain name
/// (no `..`, `.`, empty or backslashed ones), so one file has exactly one spelling.
fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && path.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
        && Path::new(path).components().all(|c| matches!(c, Component::Normal(_)))
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
        meta.user_defined.get(keys::SOURCE).cloned().unwrap_or_else(|| name.trim_end_matches(".mlpackage").into());
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
    let mut seen = HashSet::new();
    for f in &m.files {
        if !safe_relative(&f.path) || !f.path.starts_with(&prefix) {
            return Err(Error::invalid(format!("{}: unsafe path `{}` in {MANIFEST}", origin.display(), f.path)));
        }
        if !seen.insert(f.path.as_str()) {
            return Err(Error::invalid(format!("{}: `{}` is listed twice in {MANIFEST}", origin.display(), f.path)));
        }
    }
    Ok(m)
}

/// A manifest's files by path, and the folders they lie in: lookups in constant time, so
/// checking a bundle of many files stays linear.
struct Listing {
    files: HashMap<String, usize>,
    folders: HashSet<String>,
}

impl Listing {
    fn of(m: &BundleManifest) -> Listing {
        let files = m.files.iter().enumerate().map(|(i, f)| (f.path.clone(), i)).collect();
        let mut folders = HashSet::new();
        for f in &m.files {
            let mut path = f.path.as_str();
            while let Some((parent, _)) = path.rsplit_once('/') {
                if !folders.insert(parent.to_string()) {
                    break;
                }
                path = parent;
            }
        }
        Listing { files, folders }
    }

    /// Whether a tar's directory entry `dir` is a folder some listed file lies in.
    fn holds_folder(&self, dir: &str) -> bool {
        self.folders.contains(dir.strip_suffix('/').unwrap_or(dir))
    }
}

/// Checks a bundle folder or tar file: every listed file present with its size and SHA-256,
/// nothing else in it. Returns its manifest.
pub fn verify(bundle: &Path) -> Result<BundleManifest> {
    if bundle.is_dir() {
        return verify_folder(bundle);
    }
    let file = fs::File::open(bundle).map_err(io(bundle))?;
    verify_tar(&file, bundle)
}

fn verify_folder(bundle: &Path) -> Result<BundleManifest> {
    let json = corelm_format::package::read_capped(&bundle.join(MANIFEST), MAX_MANIFEST_BYTES)?;
    let m = parse_manifest(&json, bundle)?;
    let mut present = Vec::new();
    walk(&bundle.join(&m.package), &m.package, &mut present)?;
    let listing = Listing::of(&m);
    if let Some((extra, _)) = present.iter().find(|(rel, _)| !listing.files.contains_key(rel.as_str())) {
        return Err(Error::invalid(format!("{}: `{extra}` is not listed in {MANIFEST}", bundle.display())));
    }
    for f in &m.files {
        let path = bundle.join(&f.path);
        let file =
            fs::File::open(&path).map_err(|e| Error::invalid(format!("{}: `{}` {e}", bundle.display(), f.path)))?;
        check(bundle, f, file)?;
    }
    Ok(m)
}

/// The largest bundle.json read: 40 000 files take a few megabytes.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// What one tar entry is, once checked against the manifest.
enum TarEntry<'m> {
    Manifest,
    File(&'m BundleFile),
    Folder,
}

/// Walks the tar in `file` from its start, refusing anything but the manifest first, then listed
/// files (plain, each exactly once) and the folders holding them. `on_entry` sees each entry as
/// what it was found to be (the manifest's contents already read).
fn walk_tar(
    file: &fs::File,
    origin: &Path,
    mut on_entry: impl FnMut(TarEntry, &mut tar::Entry<'_, std::io::BufReader<&fs::File>>) -> Result<()>,
) -> Result<BundleManifest> {
    let mut reader = file;
    std::io::Seek::rewind(&mut reader).map_err(io(origin))?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let not_tar = |e: std::io::Error| Error::invalid(format!("{}: not a readable tar file: {e}", origin.display()));
    let mut manifest: Option<(BundleManifest, Listing)> = None;
    let mut seen = HashSet::new();
    for entry in tar.entries_with_seek().map_err(not_tar)? {
        let mut entry = entry.map_err(not_tar)?;
        let path = entry.path().map_err(not_tar)?.to_string_lossy().into_owned();
        let kind = entry.header().entry_type();
        let Some((m, listing)) = &manifest else {
            if path != MANIFEST || !kind.is_file() {
                return Err(Error::invalid(format!("{}: {MANIFEST} must come first", origin.display())));
            }
            if entry.size() > MAX_MANIFEST_BYTES {
                return Err(Error::invalid(format!(
                    "{}: {MANIFEST} is over {MAX_MANIFEST_BYTES} bytes",
                    origin.display()
                )));
            }
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(not_tar)?;
            let parsed = parse_manifest(&bytes, origin)?;
            on_entry(TarEntry::Manifest, &mut entry)?;
            let listing = Listing::of(&parsed);
            manifest = Some((parsed, listing));
            continue;
        };
        let listed = listing.files.get(&path).map(|&i| &m.files[i]);
        let what = match (kind.is_dir(), kind.is_file(), listed) {
            (true, _, _) if listing.holds_folder(&path) => TarEntry::Folder,
            (false, true, Some(f)) if seen.insert(f.path.clone()) => TarEntry::File(f),
            (false, true, Some(_)) => {
                return Err(Error::invalid(format!("{}: `{path}` appears twice", origin.display())))
            }
            (false, false, Some(_)) => {
                return Err(Error::invalid(format!("{}: `{path}` is not a plain file", origin.display())))
            }
            _ => return Err(Error::invalid(format!("{}: `{path}` is not listed in {MANIFEST}", origin.display()))),
        };
        on_entry(what, &mut entry)?;
    }
    let (m, _) = manifest.ok_or_else(|| Error::invalid(format!("{}: no {MANIFEST}", origin.display())))?;
    if let Some(missing) = m.files.iter().find(|f| !seen.contains(&f.path)) {
        return Err(Error::invalid(format!("{}: `{}` is missing", origin.display(), missing.path)));
    }
    Ok(m)
}

/// Checks the bundle tar open as `file` (from its start), every file against the manifest.
fn verify_tar(file: &fs::File, origin: &Path) -> Result<BundleManifest> {
    walk_tar(file, origin, |what, entry| match what {
        TarEntry::File(f) => check(origin, f, entry),
        TarEntry::Manifest | TarEntry::Folder => Ok(()),
    })
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

/// Beside an installed bundle's files: the tar's bytes that are not file contents (headers,
/// padding, the end), in order, with where each file's contents go. Hashed together with the
/// installed files it gives back the tar's SHA-256, so a cache hit is checked against the SHA-256
/// it is filed under, not only against a bundle.json that came with it.
pub const TAR_LAYOUT: &str = ".tar-layout";

/// The most non-content bytes a bundle tar may have (headers are 512 bytes a file).
const MAX_LAYOUT_BYTES: u64 = 64 << 20;

/// Appends the file's bytes `from..to` (not file contents) to a layout.
fn layout_raw(layout: &mut Vec<u8>, file: &fs::File, from: u64, to: u64, origin: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let len =
        to.checked_sub(from).ok_or_else(|| Error::invalid(format!("{}: overlapping tar entries", origin.display())))?;
    if layout.len() as u64 + len > MAX_LAYOUT_BYTES {
        return Err(Error::invalid(format!(
            "{}: over {MAX_LAYOUT_BYTES} bytes besides file contents",
            origin.display()
        )));
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, from).map_err(io(origin))?;
    layout.push(b'R');
    layout.extend_from_slice(&len.to_le_bytes());
    layout.extend_from_slice(&bytes);
    Ok(())
}

/// The SHA-256 of the tar an installed bundle came from, rebuilt from its [`TAR_LAYOUT`] and
/// its files.
fn installed_tar_sha256(dir: &Path) -> Result<String> {
    let path = dir.join(TAR_LAYOUT);
    let layout = corelm_format::package::read_capped(&path, MAX_LAYOUT_BYTES * 2)?;
    let bad = || Error::malformed(&path, "not a tar layout");
    let mut h = Sha256::new();
    let mut rest = layout.as_slice();
    let take = |n: usize, rest: &mut &[u8]| -> Result<Vec<u8>> {
        let (head, tail) = rest.split_at_checked(n).ok_or_else(bad)?;
        *rest = tail;
        Ok(head.to_vec())
    };
    while let Some((&tag, tail)) = rest.split_first() {
        rest = tail;
        let len = u64::from_le_bytes(take(8, &mut rest)?.try_into().expect("8 bytes"));
        match tag {
            b'R' => h.update(take(usize::try_from(len).map_err(|_| bad())?, &mut rest)?),
            b'F' => {
                let name_len = u32::from_le_bytes(take(4, &mut rest)?.try_into().expect("4 bytes")) as usize;
                let name = String::from_utf8(take(name_len, &mut rest)?).map_err(|_| bad())?;
                if !safe_relative(&name) {
                    return Err(bad());
                }
                let file_path = dir.join(&name);
                corelm_format::bytes::ensure_regular_file(&file_path)?;
                let file = fs::File::open(&file_path).map_err(io(&file_path))?;
                let mut hashing = HashingWriter(&mut h);
                let copied = std::io::copy(&mut file.take(len), &mut hashing).map_err(io(&file_path))?;
                if copied != len || fs::metadata(&file_path).map_err(io(&file_path))?.len() != len {
                    return Err(Error::malformed(&file_path, format!("not the {len} bytes the bundle had")));
                }
            }
            _ => return Err(bad()),
        }
    }
    Ok(hex(&h.finalize()))
}

struct HashingWriter<'h>(&'h mut Sha256);

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Checks a bundle installed under `cache/<sha256>`: rebuilt, it is the tar with that SHA-256,
/// and its files are the ones its manifest lists. A folder planted or changed there fails.
pub fn verify_installed(dir: &Path, sha256: &str) -> Result<BundleManifest> {
    let got = installed_tar_sha256(dir)?;
    if got != sha256 {
        return Err(Error::invalid(format!("{}: holds the bundle with SHA-256 {got}, not {sha256}", dir.display())));
    }
    verify_folder(dir)
}

/// Unpacks the bundle tar at `tar_path` into `cache/<id>`; see [`install_from`].
pub fn install(tar_path: &Path, cache: &Path, id: &str) -> Result<PathBuf> {
    let file = fs::File::open(tar_path).map_err(io(tar_path))?;
    install_from(&file, tar_path, cache, id)
}

/// Unpacks the bundle tar open as `file` (read from its start, through this one handle: what
/// was hashed is what is unpacked) into `cache/<id>`, where `id` is its SHA-256, via a hidden
/// staging folder and a rename, so the cache never shows a partial model. The staged copy must
/// check out against the manifest and rebuild to `id` before it is moved in. Returns the
/// installed package's path.
pub fn install_from(file: &fs::File, origin: &Path, cache: &Path, id: &str) -> Result<PathBuf> {
    let target = cache.join(id);
    if let Ok(m) = verify_installed(&target, id) {
        return Ok(target.join(m.package));
    }
    let temp = staging(&target)?;
    let result = (|| -> Result<BundleManifest> {
        fs::create_dir_all(&temp).map_err(io(&temp))?;
        let (mut layout, mut cursor) = (Vec::new(), 0u64);
        let manifest = walk_tar(file, origin, |what, entry| {
            let path = match what {
                TarEntry::Manifest => MANIFEST.to_string(),
                TarEntry::File(f) => f.path.clone(),
                TarEntry::Folder => return Ok(()),
            };
            let (start, size) = (entry.raw_file_position(), entry.size());
            layout_raw(&mut layout, file, cursor, start, origin)?;
            layout.push(b'F');
            layout.extend_from_slice(&size.to_le_bytes());
            layout.extend_from_slice(&(path.len() as u32).to_le_bytes());
            layout.extend_from_slice(path.as_bytes());
            cursor = start + size;
            // Only listed paths, checked to stay inside, are written.
            let dst = temp.join(&path);
            fs::create_dir_all(dst.parent().expect("inside staging")).map_err(io(&dst))?;
            let mut out = fs::File::create(&dst).map_err(io(&dst))?;
            let mut contents = std::io::Read::take(std::io::BufReader::new(PositionedReader { file, at: start }), size);
            std::io::copy(&mut contents, &mut out).map_err(io(&dst))?;
            Ok(())
        })?;
        let end = file.metadata().map_err(io(origin))?.len();
        layout_raw(&mut layout, file, cursor, end, origin)?;
        fs::write(temp.join(TAR_LAYOUT), &layout).map_err(io(&temp))?;
        verify_installed(&temp, id).map_err(|e| e.context(origin.display()))?;
        refuse_existing(&target, true)?;
        fs::rename(&temp, &target).map_err(io(&target))?;
        Ok(manifest)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&temp);
    }
    result.map(|m| target.join(m.package))
}

/// Reads a file from a position on, without moving the handle's own cursor.
struct PositionedReader<'f> {
    file: &'f fs::File,
    at: u64,
}

impl Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}
