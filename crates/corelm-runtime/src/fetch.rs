//! Verified download of a model bundle: HTTP(S), resumed with Range requests after an
//! interruption, SHA-256 checked before anything is installed, installed atomically into a
//! cache folder. Partial downloads live under `<cache>/.partial/` and are never loaded.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::bundle;
use crate::{Error, Result};

/// Attempts per download (each resumes where the last stopped).
const ATTEMPTS: usize = 4;

fn agent() -> ureq::Agent {
    let config = ureq::Agent::config_builder();
    // Apple platforms use the system TLS stack (no C toolchain needed to build for iOS);
    // elsewhere rustls.
    #[cfg(target_vendor = "apple")]
    let config = config.tls_config(ureq::tls::TlsConfig::builder().provider(ureq::tls::TlsProvider::NativeTls).build());
    config.build().into()
}

fn check_hex(sha256: &str) -> Result<String> {
    let s = sha256.trim().to_ascii_lowercase();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(format!("`{sha256}` is not a SHA-256 (64 hex digits)")));
    }
    Ok(s)
}

/// Progress: bytes so far and the total when the server says it.
pub type Progress<'a> = &'a mut dyn FnMut(u64, Option<u64>);

/// One request for the bytes from `have` on, appended to `partial`. Returns whether the file
/// is complete.
fn attempt(agent: &ureq::Agent, url: &str, partial: &Path, progress: Progress) -> Result<bool> {
    let have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let mut response = match request.call() {
        // The file was already whole when the last attempt stopped.
        Err(ureq::Error::StatusCode(416)) if have > 0 => return Ok(true),
        Err(e) => return Err(Error::invalid(format!("{url}: {e}"))),
        Ok(r) => r,
    };
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (resumed, total) = match response.status().as_u16() {
        206 => {
            // Content-Range: bytes <start>-<end>/<total>
            let range = header("content-range").unwrap_or_default();
            let start =
                range.strip_prefix("bytes ").and_then(|r| r.split('-').next()).and_then(|s| s.parse::<u64>().ok());
            if start != Some(have) {
                return Err(Error::invalid(format!("{url}: asked for bytes from {have}, got `{range}`")));
            }
            (true, range.rsplit('/').next().and_then(|t| t.parse().ok()))
        }
        200 => (false, header("content-length").and_then(|l| l.parse().ok())),
        code => return Err(Error::invalid(format!("{url}: HTTP {code}"))),
    };
    let mut file = if resumed {
        fs::OpenOptions::new().append(true).open(partial)
    } else {
        // The server ignored the range: start over.
        fs::File::create(partial)
    }
    .map_err(|e| Error::io(partial, e))?;
    let mut done = if resumed { have } else { 0 };
    let mut body = response.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            // A dropped connection: keep what arrived, the next attempt resumes.
            Err(_) => return Ok(false),
        };
        file.write_all(&buf[..n]).map_err(|e| Error::io(partial, e))?;
        done += n as u64;
        progress(done, total);
    }
    file.sync_all().map_err(|e| Error::io(partial, e))?;
    Ok(total.is_none_or(|t| done >= t))
}

/// Downloads `url` into `partial` (resuming what is there), retrying dropped connections.
pub fn download(url: &str, partial: &Path, progress: Progress) -> Result<()> {
    let agent = agent();
    if let Some(dir) = partial.parent() {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    for _ in 0..ATTEMPTS {
        if attempt(&agent, url, partial, &mut *progress)? {
            return Ok(());
        }
    }
    Err(Error::invalid(format!(
        "{url}: the transfer kept breaking off ({ATTEMPTS} attempts); run again to resume from {} bytes",
        fs::metadata(partial).map(|m| m.len()).unwrap_or(0)
    )))
}

/// Fetches the bundle tar at `url`, checks its SHA-256 against `sha256`, and installs it into
/// `cache/<sha256>/`; returns the installed package. An installed bundle is not fetched again.
pub fn fetch(url: &str, sha256: &str, cache: &Path, progress: Progress) -> Result<PathBuf> {
    let sha = check_hex(sha256)?;
    let installed = cache.join(&sha);
    if installed.join(bundle::MANIFEST).is_file() {
        if let Ok(m) = bundle::verify(&installed) {
            return Ok(installed.join(m.package));
        }
    }
    let partial = cache.join(".partial").join(format!("{sha}.tar"));
    download(url, &partial, progress)?;
    let file = fs::File::open(&partial).map_err(|e| Error::io(&partial, e))?;
    let (got, size) = bundle::sha256_of(file).map_err(|e| Error::io(&partial, e))?;
    if got != sha {
        // Corrupt or not what was asked for: never resumed from, never installed.
        let _ = fs::remove_file(&partial);
        return Err(Error::invalid(format!("{url}: SHA-256 of the {size} bytes received is {got}, {sha} expected")));
    }
    let result = bundle::install(&partial, cache, &sha);
    let _ = fs::remove_file(&partial);
    result
}
