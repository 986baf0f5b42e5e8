//! Hostile inputs (issue 25): packages, checkpoints and chat templates crafted to hang corelm,
//! exhaust its memory or make it abort. Each is made here, small, from a tiny fixture, and run
//! through the release binary under a 4 GiB address-space limit (`ulimit -v`) with a 60 s kill
//! switch: the outcome must be a clean error (exit 1 or 2) naming the input and the limit, with no
//! panic and no abort. docs/security.md lists the limits.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Outcome {
    code: i32,
    text: String,
    elapsed: Duration,
}

/// Runs `corelm args` with at most 4 GiB of address space, killed after 60 s.
fn corelm_limited(args: &[&str]) -> Outcome {
    let started = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4194304 && exec timeout -k 5 60 \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_corelm"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Outcome {
        code: out.status.code().unwrap_or(-1),
        text: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        elapsed: started.elapsed(),
    }
}

/// The run failed cleanly, in time, saying each of `expect`.
fn assert_clean_error(o: &Outcome, expect: &[&str]) {
    assert!(o.code == 1 || o.code == 2, "exit {} after {:?} (124: killed at 60 s):\n{}", o.code, o.elapsed, o.text);
    assert!(!o.text.contains("panicked") && !o.text.contains("memory allocation"), "{}", o.text);
    for e in expect {
        assert!(o.text.contains(e), "the message does not say `{e}`:\n{}", o.text);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A word-level tokenizer.json for the tiny fixtures' 128-token vocabulary: "w1" … "w127".
fn tiny_tokenizer() -> Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), json!(0));
    for i in 1..128 {
        vocab.insert(format!("w{i}"), json!(i));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// The tiny Llama fixture with a tokenizer and `template` as its chat template, converted.
fn package_with_template(dir: &Path, template: &str) -> PathBuf {
    let src = dir.join("tiny");
    copy_dir(&root().join("tests/fixtures/tiny/llama_rope_linear"), &src);
    fs::write(src.join("tokenizer.json"), tiny_tokenizer().to_string()).unwrap();
    let config = json!({"chat_template": template, "bos_token": "w1", "eos_token": "w2"});
    fs::write(src.join("tokenizer_config.json"), config.to_string()).unwrap();
    let pkg = dir.join("tiny.mlpackage");
    let o = corelm_limited(&["convert", src.to_str().unwrap(), "-o", pkg.to_str().unwrap(), "--context", "32"]);
    assert_eq!(o.code, 0, "{}", o.text);
    pkg
}

#[test]
fn a_chat_template_that_loops_without_end_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}w3";
    let pkg = package_with_template(dir.path(), template);
    let o = corelm_limited(&["run", pkg.to_str().unwrap(), "--prompt", "w5", "--max-new-tokens", "2"]);
    assert_clean_error(&o, &["tokenizer_config.json", "ran past 20000000 instructions"]);
}

#[test]
fn a_chat_template_that_writes_without_end_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let template = "{% set s = 'x' * 100000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}";
    let pkg = package_with_template(dir.path(), template);
    let o = corelm_limited(&["run", pkg.to_str().unwrap(), "--prompt", "w5", "--max-new-tokens", "2"]);
    assert_clean_error(&o, &["tokenizer_config.json", "output would exceed"]);
}

/// A sound template still renders through the same limits.
#[test]
fn a_sound_template_renders() {
    let dir = tempfile::tempdir().unwrap();
    let template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w3{% endif %}";
    let pkg = package_with_template(dir.path(), template);
    let o = corelm_limited(&["run", pkg.to_str().unwrap(), "--prompt", "w5 w6", "--max-new-tokens", "2", "--json"]);
    assert_eq!(o.code, 0, "{}", o.text);
    assert!(o.text.contains("\"prompt_ids\":[5,6,3]"), "{}", o.text);
}

/// A config field far past any real model: convert and plan refuse it at parse time, naming
/// the field and the bound (they used to allocate 16 TB, or wrap to "0.00 B parameters").
#[test]
fn config_numbers_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    for (field, value, bound) in [
        ("num_hidden_layers", json!(1u64 << 40), "at most 4096"),
        ("hidden_size", json!(1u64 << 40), "at most 131072"),
        ("vocab_size", json!(1u64 << 62), "at most 16777216"),
        ("intermediate_size", json!(u64::MAX), "at most 1048576"),
        ("max_position_embeddings", json!(1u64 << 50), "at most 67108864"),
    ] {
        let src = dir.path().join(field);
        copy_dir(&root().join("tests/fixtures/tiny/llama_rope_linear"), &src);
        let path = src.join("config.json");
        let mut config: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        config[field] = value;
        fs::write(&path, config.to_string()).unwrap();
        let out = dir.path().join(format!("{field}.mlpackage"));
        let o = corelm_limited(&["convert", src.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert_clean_error(&o, &["config.json", &format!("field `{field}`"), bound]);
        assert!(!out.exists());
        let o = corelm_limited(&["plan", src.to_str().unwrap()]);
        assert_clean_error(&o, &["config.json", &format!("field `{field}`"), bound]);
    }
}

/// A converted tiny package whose weight file is replaced by `replace`.
fn package_with_weight_file(dir: &Path, replace: impl FnOnce(&Path)) -> PathBuf {
    let pkg = dir.join("w.mlpackage");
    let src = root().join("tests/fixtures/tiny/qwen3");
    let o = corelm_limited(&["convert", src.to_str().unwrap(), "-o", pkg.to_str().unwrap(), "--context", "16"]);
    assert_eq!(o.code, 0, "{}", o.text);
    let weights = pkg.join("Data/com.apple.CoreML/weights/weight.bin");
    fs::remove_file(&weights).unwrap();
    replace(&weights);
    pkg
}

#[test]
fn a_fifo_in_place_of_a_weight_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = package_with_weight_file(dir.path(), |w| {
        assert!(Command::new("mkfifo").arg(w).status().unwrap().success());
    });
    for command in ["validate", "inspect"] {
        let o = corelm_limited(&[command, pkg.to_str().unwrap()]);
        assert_clean_error(&o, &["weight.bin", "not a regular file"]);
    }
    let o = corelm_limited(&["run", pkg.to_str().unwrap(), "--ids", "5,6"]);
    assert_clean_error(&o, &["weight.bin", "not a regular file"]);
}

#[test]
fn a_weight_file_linking_outside_the_package_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A real weight file, but another package's: it must not be read through the link.
    let other = dir.path().join("other.bin");
    let pkg = package_with_weight_file(dir.path(), |w| {
        fs::copy(root().join("tests/fixtures/tiny/qwen3/model.safetensors"), &other).unwrap();
        std::os::unix::fs::symlink(&other, w).unwrap();
    });
    for command in ["validate", "inspect"] {
        let o = corelm_limited(&[command, pkg.to_str().unwrap()]);
        assert_clean_error(&o, &["weight.bin", "outside the package"]);
    }
}

/// A checkpoint whose final norm holds a NaN converts into a package that gives NaN logits: the
/// conversion's check refuses it and removes it; with --no-check it is written, and `verify`
/// then fails on it.
#[test]
fn a_package_with_non_finite_logits_is_not_shipped_unnoticed() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("llama_rope_linear");
    copy_dir(&root().join("tests/fixtures/tiny/llama_rope_linear"), &src);
    fs::write(src.join("tokenizer.json"), tiny_tokenizer().to_string()).unwrap();
    // Overwrite model.norm.weight's first value with a NaN, in place.
    let st = src.join("model.safetensors");
    let mut bytes = fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header["model.norm.weight"]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    fs::write(&st, bytes).unwrap();
    let pkg = dir.path().join("nan.mlpackage");
    let o = corelm_limited(&["convert", src.to_str().unwrap(), "-o", pkg.to_str().unwrap(), "--context", "48"]);
    assert_clean_error(&o, &["fails its check", "NaN or infinite logits at position"]);
    assert!(!pkg.exists(), "the broken package was left behind");
    let o = corelm_limited(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        pkg.to_str().unwrap(),
        "--context",
        "48",
        "--no-check",
    ]);
    assert_eq!(o.code, 0, "{}", o.text);
    let text = dir.path().join("text.txt");
    fs::write(&text, "w1 w2 w3").unwrap();
    let o = corelm_limited(&[
        "verify",
        pkg.to_str().unwrap(),
        "--against",
        src.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
    ]);
    assert_clean_error(&o, &["nan.mlpackage", "NaN or infinite logits"]);
    // Generation refuses NaN logits rather than taking one for the greedy token.
    let o = corelm_limited(&["run", pkg.to_str().unwrap(), "--ids", "1,2,3", "--max-new-tokens", "4"]);
    assert_clean_error(&o, &["logits are NaN"]);
}

/// A stateful package of one `read_state`, its state declared with `shape`: what a package that
/// lies about its sizes asks the interpreter to allocate.
fn package_with_state(path: &Path, shape: &[usize]) {
    use corelm_format::package::WriteOptions;
    use corelm_format::{DType, FunctionBuilder, InputShape, PackageWriter, ProgramBuilder, Target};
    let mut pkg = PackageWriter::create(path, &WriteOptions::overwriting()).unwrap();
    let mut f = FunctionBuilder::new("main", Target::Ios18, pkg.weights()).unwrap();
    let x = f.input("x", DType::Fp16, InputShape::Fixed(vec![1])).unwrap();
    let cache = f.state("keyCache", shape).unwrap();
    let now = f.op1("read_state", "cache_now", vec![("input", (&cache).into())]).unwrap();
    let y = f.op1("identity", "y", vec![("x", (&x).into())]).unwrap();
    f.output(&now, "cache").unwrap();
    f.output(&y, "y").unwrap();
    let mut prog = ProgramBuilder::new(Target::Ios18);
    prog.add_function(f.finish().unwrap()).unwrap();
    pkg.commit(&prog.finish().unwrap()).unwrap();
}

/// Declared sizes are checked before anything is allocated: a state of 127⁵ fp16 values
/// (132 GB) and one whose element count overflows (a dimension of 2⁶⁰+16) are refused, naming
/// the state and its size, where they used to abort on the allocation or wrap to a small buffer.
#[test]
fn declared_sizes_past_the_machine_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls.json");
    fs::write(&calls, r#"[{"x": {"shape": [1], "dtype": "fp16", "data": [1.0]}}]"#).unwrap();
    for (name, shape, size) in [
        ("huge", vec![127; 5], "needs 123.1 GiB"),
        ("overflow", vec![(1 << 60) + 16, 16], "has more elements than memory can address"),
    ] {
        let pkg = dir.path().join(format!("{name}.mlpackage"));
        package_with_state(&pkg, &shape);
        let o = corelm_limited(&["predict", pkg.to_str().unwrap(), "--calls", calls.to_str().unwrap()]);
        assert_clean_error(&o, &[&format!("{name}.mlpackage"), "state `keyCache`", size]);
    }
}

/// A server on localhost that answers every request by reading its headers, then `respond`.
fn hostile_server(respond: fn(&mut std::net::TcpStream)) -> String {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    line.clear();
                }
                respond(&mut stream);
            });
        }
    });
    format!("http://{addr}/model.tar")
}

/// A server that streams without end is stopped at --max-size, and what arrived is discarded;
/// one that stalls is given up on after --timeout per attempt (4 attempts), in seconds.
#[test]
fn fetch_is_bounded_in_size_and_time() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let sha = "0".repeat(64);
    let endless = hostile_server(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let chunk = vec![b'x'; 1 << 16];
        while s.write_all(&chunk).is_ok() {}
    });
    let o =
        corelm_limited(&["fetch", &endless, "--sha256", &sha, "-o", cache.to_str().unwrap(), "--max-size", "1048576"]);
    assert_clean_error(&o, &[&endless, "1048576-byte limit (--max-size)"]);
    assert!(o.elapsed < Duration::from_secs(20), "{:?}", o.elapsed);
    let partial = cache.join(".partial");
    assert!(fs::read_dir(&partial).map(|d| d.count()).unwrap_or(0) == 0, "the oversized download was kept");

    let announced = hostile_server(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\nConnection: close\r\n\r\n");
    });
    let o = corelm_limited(&[
        "fetch",
        &announced,
        "--sha256",
        &sha,
        "-o",
        cache.to_str().unwrap(),
        "--max-size",
        "1048576",
    ]);
    assert_clean_error(&o, &["announces 99999999999 bytes", "--max-size"]);

    let stalled = hostile_server(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc");
        std::thread::sleep(Duration::from_secs(120));
    });
    let o = corelm_limited(&["fetch", &stalled, "--sha256", &sha, "-o", cache.to_str().unwrap(), "--timeout", "1"]);
    assert_clean_error(&o, &[&stalled, "kept breaking off (4 attempts", "timeout"]);
    assert!(o.elapsed < Duration::from_secs(20), "{:?}", o.elapsed);
}

/// A bundle folder `corelm bundle` wrote for the coremltools fixture package, and its manifest.
fn written_bundle(dir: &Path) -> (PathBuf, Value) {
    let pkg = root().join("tests/fixtures/coremltools/stateful_torch.mlpackage");
    let bundle = dir.join("bundle");
    let o = corelm_limited(&["bundle", pkg.to_str().unwrap(), "-o", bundle.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}", o.text);
    let manifest = serde_json::from_slice(&fs::read(bundle.join("bundle.json")).unwrap()).unwrap();
    (bundle, manifest)
}

/// Bundle paths have one spelling and every tar entry is accounted for: a manifest listing
/// `a/./b`, and a tar with a directory entry outside the bundle, are refused by `bundle --verify`.
#[test]
fn bundle_aliases_and_stray_entries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, manifest) = written_bundle(dir.path());
    let first = manifest["files"][0]["path"].as_str().unwrap().to_string();
    // The folder, its first file listed as an alias of itself.
    let mut aliased = manifest.clone();
    let alias = first.replacen('/', "/./", 1);
    aliased["files"][0]["path"] = json!(alias);
    fs::write(bundle.join("bundle.json"), aliased.to_string()).unwrap();
    let o = corelm_limited(&["bundle", "--verify", bundle.to_str().unwrap()]);
    assert_clean_error(&o, &["unsafe path", &alias]);
    // A tar of the sound manifest and files, with a directory entry `../escape/` among them.
    let tar_path = dir.path().join("stray.tar");
    let mut tar = tar::Builder::new(fs::File::create(&tar_path).unwrap());
    let json = manifest.to_string();
    let mut append = |name: &str, kind: tar::EntryType, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        tar.append(&h, data).unwrap();
    };
    append("bundle.json", tar::EntryType::Regular, json.as_bytes());
    append("../escape/", tar::EntryType::Directory, b"");
    for f in manifest["files"].as_array().unwrap() {
        let path = f["path"].as_str().unwrap();
        append(path, tar::EntryType::Regular, &fs::read(bundle.join(path)).unwrap());
    }
    tar.finish().unwrap();
    drop(tar);
    let o = corelm_limited(&["bundle", "--verify", tar_path.to_str().unwrap()]);
    assert_clean_error(&o, &["stray.tar", "`../escape/` is not listed"]);
}

/// A folder planted in the cache under the SHA-256 asked for is not served: with the server
/// unreachable, fetch fails (naming the URL) instead of printing the planted package.
#[test]
fn a_planted_cache_folder_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, _) = written_bundle(dir.path());
    let sha = "ab".repeat(32);
    let cache = dir.path().join("cache");
    fs::create_dir_all(&cache).unwrap();
    copy_dir(&bundle, &cache.join(&sha));
    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/model.tar");
    let o = corelm_limited(&["fetch", &url, "--sha256", &sha, "-o", cache.to_str().unwrap(), "--timeout", "2"]);
    assert_clean_error(&o, &[&url]);
    assert!(!o.text.contains(".mlpackage"), "the planted package was served:\n{}", o.text);
}

/// Gemma 4's per-layer embedding table lies beside the program: a truncated one, or metadata
/// that lies about its size, is refused by name before any prediction, not read out of bounds.
#[test]
fn a_per_layer_table_of_the_wrong_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("g.mlpackage");
    let src = root().join("tests/fixtures/tiny/gemma4_text");
    let o = corelm_limited(&["convert", src.to_str().unwrap(), "-o", pkg.to_str().unwrap(), "--context", "16"]);
    assert_eq!(o.code, 0, "{}", o.text);
    let o = corelm_limited(&["run", pkg.to_str().unwrap(), "--ids", "5,6", "--max-new-tokens", "2"]);
    assert_eq!(o.code, 0, "{}", o.text);
    let table = pkg.join("Data/ai.corelm/per_layer_embeddings.bin");
    let bytes = fs::read(&table).unwrap();
    fs::write(&table, &bytes[..bytes.len() - 2]).unwrap();
    let o = corelm_limited(&["run", pkg.to_str().unwrap(), "--ids", "5,6", "--max-new-tokens", "2"]);
    assert_clean_error(&o, &["per_layer_embeddings.bin", "fp16 table"]);
    fs::remove_file(&table).unwrap();
    let o = corelm_limited(&["run", pkg.to_str().unwrap(), "--ids", "5,6", "--max-new-tokens", "2"]);
    assert_clean_error(&o, &["per_layer_embeddings.bin", "does not exist"]);
}
