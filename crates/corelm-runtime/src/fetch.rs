//! Verified download of a model bundle: HTTP(S), resumed with Range requests after an
//! interruption, SHA-256 checked before anything is installed, installed atomically into a
//! cache folder. Partial downloads live under `<cache>/.partial/` and are never loaded.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::bundle;
use crate::{Error, Result};

/// Attempts per download (each resumes where the last stopped).
const ATTEMPTS: u32 = 4;

/// The default [`FetchOptions::max_size`]: past the largest model an iPhone or Mac runs, so only
/// a server that will not stop reaches it.
pub const DEFAULT_MAX_SIZE: u64 = 64 << 30;

/// Limits on one download: the server is a stranger too.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Bytes past which the download stops and is discarded (the bundle's size when known).
    pub max_size: u64,
    /// How long connecting, the response headers, or any one read of the body may take.
    pub timeout: std::time::Duration,
}

impl Default for FetchOptions {
    fn default() -> FetchOptions {
        FetchOptions { max_size: DEFAULT_MAX_SIZE, timeout: std::time::Duration::from_secs(60) }
    }
}

fn agent(timeout: std::time::Duration) -> ureq::Agent {
    let t = Some(timeout);
    let config = ureq::Agent::config_builder()
        .timeout_resolve(t)
        .timeout_connect(t)
        .timeout_send_request(t)
        .timeout_recv_response(t)
        .timeout_per_read(t)
        // Error statuses come back as values, so a 5xx can be retried.
        .http_status_as_error(false);
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

/// How one request ended, when it did not fail for good.
enum Attempt {
    Complete,
    /// Broken off (dropped, timed out, a server error): the next attempt resumes.
    Interrupted(String),
}

/// One request for the bytes from `have` on, appended to `partial`.
fn attempt(agent: &ureq::Agent, url: &str, partial: &Path, opts: &FetchOptions, progress: Progress) -> Result<Attempt> {
    let have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let mut response = match request.call() {
        Ok(r) => r,
        Err(e @ (ureq::Error::Timeout(_) | ureq::Error::Io(_) | ureq::Error::ConnectionFailed)) => {
            return Ok(Attempt::Interrupted(e.to_string()))
        }
        Err(e) => return Err(Error::invalid(format!("{url}: {e}"))),
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
        // The file was already whole when the last attempt stopped.
        416 if have > 0 => return Ok(Attempt::Complete),
        code @ (408 | 429 | 500..=599) => return Ok(Attempt::Interrupted(format!("HTTP {code}"))),
        code => return Err(Error::invalid(format!("{url}: HTTP {code}"))),
    };
    if let Some(t) = total.filter(|&t| t > opts.max_size) {
        return Err(too_large(url, partial, &format!("the server announces {t} bytes"), opts.max_size));
    }
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
            // A dropped or stalled connection: keep what arrived, the next attempt resumes.
            Err(e) => {
                file.sync_all().map_err(|e| Error::io(partial, e))?;
                return Ok(Attempt::Interrupted(e.to_string()));
            }
        };
        if done + n as u64 > opts.max_size {
            return Err(too_large(url, partial, "the server sends more", opts.max_size));
        }
        file.write_all(&buf[..n]).map_err(|e| Error::io(partial, e))?;
        done += n as u64;
        progress(done, total);
    }
    file.sync_all().map_err(|e| Error::io(partial, e))?;
    Ok(if total.is_none_or(|t| done >= t) { Attempt::Complete } else { Attempt::Interrupted("cut short".into()) })
}

/// The error for a download past `max_size`; what arrived is removed (never resumed from).
fn too_large(url: &str, partial: &Path, what: &str, max_size: u64) -> Error {
    let _ = fs::remove_file(partial);
    Error::invalid(format!("{url}: {what} than the {max_size}-byte limit (--max-size); nothing was kept"))
}

/// Downloads `url` into `partial` (resuming what is there), retrying broken-off transfers with
/// growing pauses.
pub fn download(url: &str, partial: &Path, opts: &FetchOptions, progress: Progress) -> Result<()> {
    let agent = agent(opts.timeout);
    if let Some(dir) = partial.parent() {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut why = String::new();
    for i in 0..ATTEMPTS {
        if i > 0 {
            std::thread::sleep(std::time::Duration::from_millis(250 << i));
        }
        match attempt(&agent, url, partial, opts, &mut *progress)? {
            Attempt::Complete => return Ok(()),
            Attempt::Interrupted(reason) => why = reason,
        }
    }
    Err(Error::invalid(format!(
        "{url}: the transfer kept breaking off ({ATTEMPTS} attempts, last: {why}); run again to resume from {} bytes",
        fs::metadata(partial).map(|m| m.len()).unwrap_or(0)
    )))
}

/// Fetches the bundle tar at `url`, checks its SHA-256 against `sha256`, and installs it into
/// `cache/<sha256>/`; returns the installed package. A bundle already installed there is used
/// when it checks out against that SHA-256 ([`bundle::verify_installed`]); otherwise it is
/// fetched again and replaced.
pub fn fetch(url: &str, sha256: &str, cache: &Path, opts: &FetchOptions, progress: Progress) -> Result<PathBuf> {
    let sha = check_hex(sha256)?;
    if let Ok(m) = bundle::verify_installed(&cache.join(&sha), &sha) {
        return Ok(cache.join(&sha).join(m.package));
    }
    let partial = cache.join(".partial").join(format!("{sha}.tar"));
    download(url, &partial, opts, progress)?;
    // One handle from here on: the bytes hashed are the bytes unpacked.
    let file = fs::File::open(&partial).map_err(|e| Error::io(&partial, e))?;
    let (got, size) = bundle::sha256_of(&file).map_err(|e| Error::io(&partial, e))?;
    if got != sha {
        // Corrupt or not what was asked for: never resumed from, never installed.
        let _ = fs::remove_file(&partial);
        return Err(Error::invalid(format!("{url}: SHA-256 of the {size} bytes received is {got}, {sha} expected")));
    }
    let result = bundle::install_from(&file, &partial, cache, &sha);
    let _ = fs::remove_file(&partial);
    result
}
