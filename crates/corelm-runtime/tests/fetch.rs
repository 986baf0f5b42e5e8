//! Bundles and verified downloads against a real HTTP server on localhost: an interrupted
//! transfer resumes with a Range request; a corrupted byte or a wrong checksum is rejected;
//! the cache never holds a partial model; tampered bundles fail verification.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use corelm_runtime::{bundle, fetch};

fn fixture_package() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/coremltools/stateful_torch.mlpackage")
}

/// How the server misbehaves.
#[derive(Default)]
struct Script {
    /// Close the connection after this many body bytes, for the first `cut_times` responses.
    cut_at: Option<usize>,
    cut_times: usize,
    /// Flip this byte of the file.
    corrupt: Option<usize>,
    /// `Range` header of each request (None: whole file).
    requests: Vec<Option<String>>,
}

/// Serves `file` over HTTP/1.1 with Range support, one connection per request.
fn serve(file: Vec<u8>, script: Arc<Mutex<Script>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut range = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
                    range = Some(v.trim().to_string());
                }
            }
            let mut s = script.lock().unwrap();
            s.requests.push(range.clone());
            let mut body = file.clone();
            if let Some(i) = s.corrupt {
                body[i] ^= 0x40;
            }
            let start = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
                .unwrap_or(0);
            let head = if range.is_some() {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
                    body.len() - start,
                    body.len() - 1,
                    body.len()
                )
            } else {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
            };
            let mut end = body.len();
            if s.cut_times > 0 {
                if let Some(cut) = s.cut_at {
                    end = end.min(cut.max(start + 1));
                    s.cut_times -= 1;
                }
            }
            drop(s);
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body[start..end]);
            let _ = stream.flush();
            // Dropping the stream closes the connection, mid-body when cut.
        }
    });
    format!("http://{addr}/model.tar")
}

fn make_bundle(dir: &Path) -> (Vec<u8>, String) {
    let tar = dir.join("model.tar");
    bundle::write(&fixture_package(), &tar, false).unwrap();
    let bytes = std::fs::read(&tar).unwrap();
    let (sha, _) = bundle::sha256_of(bytes.as_slice()).unwrap();
    (bytes, sha)
}

fn visible_entries(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache)
        .map(|d| {
            d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect()
        })
        .unwrap_or_default()
}

#[test]
fn an_interrupted_download_resumes_and_installs() {
    let tmp = tempfile::tempdir().unwrap();
    let (bytes, sha) = make_bundle(tmp.path());
    let script = Arc::new(Mutex::new(Script { cut_at: Some(bytes.len() / 3), cut_times: 1, ..Script::default() }));
    let url = serve(bytes.clone(), script.clone());
    let cache = tmp.path().join("cache");
    let mut seen = Vec::new();
    let pkg =
        fetch::fetch(&url, &sha, &cache, &Default::default(), &mut |done, total| seen.push((done, total))).unwrap();
    let requests = script.lock().unwrap().requests.clone();
    assert_eq!(requests, [None, Some(format!("bytes={}-", bytes.len() / 3))], "resumed with a Range request");
    assert_eq!(seen.last(), Some(&(bytes.len() as u64, Some(bytes.len() as u64))));
    assert_eq!(pkg, cache.join(&sha).join("stateful_torch.mlpackage"));
    corelm_format::Package::open(&pkg).unwrap();
    bundle::verify(&cache.join(&sha)).unwrap();
    assert!(std::fs::read_dir(cache.join(".partial")).unwrap().next().is_none(), "no partial download left");
    // Installed: a second fetch does not download again.
    fetch::fetch(&url, &sha, &cache, &Default::default(), &mut |_, _| {}).unwrap();
    assert_eq!(script.lock().unwrap().requests.len(), 2);
}

#[test]
fn a_corrupted_byte_or_a_wrong_checksum_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let (bytes, sha) = make_bundle(tmp.path());
    let cache = tmp.path().join("cache");
    let url =
        serve(bytes.clone(), Arc::new(Mutex::new(Script { corrupt: Some(bytes.len() / 2), ..Script::default() })));
    let err = fetch::fetch(&url, &sha, &cache, &Default::default(), &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("SHA-256") && err.contains(&sha), "{err}");
    assert!(visible_entries(&cache).is_empty(), "nothing installed: {:?}", visible_entries(&cache));
    assert!(!cache.join(".partial").join(format!("{sha}.tar")).exists(), "a corrupt download is not kept to resume");

    let url = serve(bytes, Arc::new(Mutex::new(Script::default())));
    let wrong = "0".repeat(64);
    let err = fetch::fetch(&url, &wrong, &cache, &Default::default(), &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("SHA-256") && err.contains(&wrong), "{err}");
    assert!(visible_entries(&cache).is_empty());
    let err = fetch::fetch(&url, "abc", &cache, &Default::default(), &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("64 hex digits"), "{err}");
}

#[test]
fn a_transfer_that_keeps_breaking_installs_nothing_and_resumes_later() {
    let tmp = tempfile::tempdir().unwrap();
    let (bytes, sha) = make_bundle(tmp.path());
    let cache = tmp.path().join("cache");
    // Every response stops at a tenth more of the file: four attempts are not enough.
    let script =
        Arc::new(Mutex::new(Script { cut_at: Some(bytes.len() / 10), cut_times: usize::MAX, ..Script::default() }));
    let url = serve(bytes.clone(), script.clone());
    let err = fetch::fetch(&url, &sha, &cache, &Default::default(), &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("breaking off"), "{err}");
    assert!(visible_entries(&cache).is_empty(), "a partial model is never installed");
    // The server recovers: the next run resumes from what arrived.
    script.lock().unwrap().cut_times = 0;
    let pkg = fetch::fetch(&url, &sha, &cache, &Default::default(), &mut |_, _| {}).unwrap();
    corelm_format::Package::open(pkg).unwrap();
    let requests = script.lock().unwrap().requests.clone();
    assert!(requests.last().unwrap().as_ref().is_some_and(|r| r.starts_with("bytes=")), "{requests:?}");
}

#[test]
fn tampered_bundles_fail_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bundle");
    let m = bundle::write(&fixture_package(), &dir, false).unwrap();
    assert!(m.files.iter().any(|f| f.path.ends_with("model.mlmodel")));
    assert_eq!(bundle::verify(&dir).unwrap(), m);
    assert!(bundle::write(&fixture_package(), &dir, false).is_err(), "an existing bundle needs overwrite");
    // A changed byte, named in the error.
    let victim = dir.join(&m.files[0].path);
    let mut data = std::fs::read(&victim).unwrap();
    data[0] ^= 1;
    std::fs::write(&victim, &data).unwrap();
    let err = bundle::verify(&dir).unwrap_err().to_string();
    assert!(err.contains(&m.files[0].path) && err.contains("SHA-256"), "{err}");
    data[0] ^= 1;
    std::fs::write(&victim, &data).unwrap();
    // An extra file.
    std::fs::write(dir.join(&m.package).join("extra.bin"), b"x").unwrap();
    let err = bundle::verify(&dir).unwrap_err().to_string();
    assert!(err.contains("extra.bin") && err.contains("not listed"), "{err}");
    // A tar whose manifest points outside the bundle.
    let evil = tmp.path().join("evil.tar");
    let mut manifest = m.clone();
    manifest.files[0].path = format!("{}/../../escape", m.package);
    let json = serde_json::to_vec(&manifest).unwrap();
    let mut tar = tar::Builder::new(std::fs::File::create(&evil).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_size(json.len() as u64);
    h.set_mode(0o644);
    tar.append_data(&mut h, bundle::MANIFEST, json.as_slice()).unwrap();
    tar.finish().unwrap();
    let err = bundle::verify(&evil).unwrap_err().to_string();
    assert!(err.contains("unsafe path"), "{err}");
    // A truncated tar.
    let good = tmp.path().join("good.tar");
    bundle::write(&fixture_package(), &good, false).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&good, &bytes[..bytes.len() / 2]).unwrap();
    assert!(bundle::verify(&good).is_err());
}

/// A folder planted (or changed) under `cache/<sha256>` is not served: it is checked against the
/// SHA-256 it is filed under, rebuilt from the installed files, and fetched again when it fails.
#[test]
fn a_planted_or_changed_cache_folder_is_not_served() {
    let tmp = tempfile::tempdir().unwrap();
    let (bytes, sha) = make_bundle(tmp.path());
    let script = Arc::new(Mutex::new(Script::default()));
    let url = serve(bytes, script.clone());
    let cache = tmp.path().join("cache");
    let installed = cache.join(&sha);
    // Another package's bundle, self-consistent, planted where the asked-for one would be.
    let other = fixture_package().with_file_name("stateful_torch_fp32.mlpackage");
    bundle::write(&other, &installed, false).unwrap();
    bundle::verify(&installed).unwrap();
    let err = bundle::verify_installed(&installed, &sha).unwrap_err().to_string();
    assert!(err.contains(bundle::TAR_LAYOUT), "{err}");
    let pkg = fetch::fetch(&url, &sha, &cache, &Default::default(), &mut |_, _| {}).unwrap();
    assert_eq!(pkg, installed.join("stateful_torch.mlpackage"));
    assert!(!installed.join("stateful_torch_fp32.mlpackage").exists(), "the planted package is gone");
    assert_eq!(script.lock().unwrap().requests.len(), 1);
    bundle::verify_installed(&installed, &sha).unwrap();
    // One changed byte in an installed file: not served either.
    let victim = pkg.join("Manifest.json");
    let mut data = std::fs::read(&victim).unwrap();
    data[0] ^= 1;
    std::fs::write(&victim, &data).unwrap();
    let err = bundle::verify_installed(&installed, &sha).unwrap_err().to_string();
    assert!(err.contains("holds the bundle with SHA-256"), "{err}");
    fetch::fetch(&url, &sha, &cache, &Default::default(), &mut |_, _| {}).unwrap();
    assert_eq!(script.lock().unwrap().requests.len(), 2);
    bundle::verify_installed(&installed, &sha).unwrap();
}

/// A tar bundle made of `entries` (path, directory?, contents) after a bundle.json of `manifest`.
fn tar_of(path: &Path, manifest: &bundle::BundleManifest, entries: &[(&str, bool, &[u8])]) {
    let json = serde_json::to_vec(manifest).unwrap();
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut append = |name: &str, dir: bool, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(if dir { tar::EntryType::Directory } else { tar::EntryType::Regular });
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        // Written raw, so the names are exactly what a hostile tool would put there.
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        tar.append(&h, data).unwrap();
    };
    append(bundle::MANIFEST, false, &json);
    for (name, dir, data) in entries {
        append(name, *dir, data);
    }
    tar.finish().unwrap();
}

/// Paths have one spelling: `a/./b` and `a//b` aliases, a listing twice over and directory
/// entries outside what the manifest lists are refused; a sound hand-made tar verifies.
#[test]
fn bundle_paths_are_canonical_and_every_entry_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let data = b"weights";
    let (sha, _) = bundle::sha256_of(&data[..]).unwrap();
    let file = |path: &str| bundle::BundleFile { path: path.into(), size: data.len() as u64, sha256: sha.clone() };
    let manifest = |files: Vec<bundle::BundleFile>| bundle::BundleManifest {
        format: 1,
        model_id: "m".into(),
        version: "1".into(),
        minimum_os: "iOS 18".into(),
        package: "m.mlpackage".into(),
        files,
    };
    let sound = manifest(vec![file("m.mlpackage/Data/w.bin")]);
    let tar = tmp.path().join("b.tar");
    tar_of(
        &tar,
        &sound,
        &[("m.mlpackage/", true, b""), ("m.mlpackage/Data/", true, b""), ("m.mlpackage/Data/w.bin", false, data)],
    );
    assert_eq!(bundle::verify(&tar).unwrap(), sound);
    for (what, m, entries, expect) in [
        (
            "dot alias",
            manifest(vec![file("m.mlpackage/./Data/w.bin")]),
            vec![("m.mlpackage/./Data/w.bin", false, &data[..])],
            "unsafe path",
        ),
        (
            "double slash",
            manifest(vec![file("m.mlpackage//Data/w.bin")]),
            vec![("m.mlpackage//Data/w.bin", false, &data[..])],
            "unsafe path",
        ),
        (
            "listed twice",
            manifest(vec![file("m.mlpackage/Data/w.bin"), file("m.mlpackage/Data/w.bin")]),
            vec![],
            "listed twice",
        ),
        (
            "stray folder",
            sound.clone(),
            vec![("../outside/", true, &b""[..]), ("m.mlpackage/Data/w.bin", false, &data[..])],
            "`../outside/` is not listed",
        ),
        (
            "unlisted folder",
            sound.clone(),
            vec![("m.mlpackage/Other/", true, &b""[..]), ("m.mlpackage/Data/w.bin", false, &data[..])],
            "not listed",
        ),
        (
            "entry twice",
            sound.clone(),
            vec![("m.mlpackage/Data/w.bin", false, &data[..]), ("m.mlpackage/Data/w.bin", false, &data[..])],
            "appears twice",
        ),
    ] {
        tar_of(&tar, &m, &entries);
        let err = bundle::verify(&tar).expect_err(what).to_string();
        assert!(err.contains(expect), "{what}: {err}");
        let cache = tmp.path().join("cache");
        assert!(bundle::install(&tar, &cache, &"0".repeat(64)).is_err(), "{what}");
        assert!(!cache.join("0".repeat(64)).exists(), "{what}");
    }
}
