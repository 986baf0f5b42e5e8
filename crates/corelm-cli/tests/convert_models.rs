//! Every supported architecture (tiny random checkpoints made with transformers) and the two real
//! models (SmolLM2-135M and Gemma-3-270M from their GGUF registry packages) convert into
//! packages that pass our validator and coremltools' loader, with the interface `inspect`
//! should show: inputs, states, ops, metadata and the shipped tokenizer.
//!
//! Needs the coremltools venv (scripts/setup-python.sh) and the models (scripts/fetch-models.sh);
//! scripts/test.sh provides both.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn corelm(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_corelm")).args(args).output().unwrap();
    (o.status.code().unwrap(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

fn convert(src: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["convert", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json", "--force"];
    args.extend(extra);
    let (code, stdout, stderr) = corelm(&args);
    assert_eq!(code, 0, "convert {}: {stderr}", src.display());
    serde_json::from_str(&stdout).unwrap()
}

fn inspect(pkg: &Path) -> Value {
    let (code, stdout, stderr) = corelm(&["inspect", "--json", pkg.to_str().unwrap()]);
    assert_eq!(code, 0, "inspect {}: {stdout}{stderr}", pkg.display());
    serde_json::from_str(&stdout).unwrap()
}

fn python() -> PathBuf {
    std::env::var("CORELM_PYTHON").map(PathBuf::from).unwrap_or_else(|_| {
        let p = root().join(".cache/venv/bin/python");
        assert!(p.exists(), "coremltools venv missing: run scripts/setup-python.sh (or set CORELM_PYTHON)");
        p
    })
}

/// coremltools' milproto loader and `prog.validate()` accept every package.
fn coremltools_accepts(packages: &[PathBuf]) {
    let out = Command::new(python())
        .arg(root().join("python/coremltools_oracle.py"))
        .arg("validate")
        .args(packages)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("oracle printed no JSON: {}", String::from_utf8_lossy(&out.stderr)));
    for (p, r) in packages.iter().zip(report["packages"].as_array().unwrap()) {
        assert_eq!(r["ok"], true, "coremltools rejects {}: {}", p.display(), r["error"]);
    }
    assert!(out.status.success());
}

/// The KV states a config's layers need, as transformers' config describes them: one cache per
/// shape of layer (Gemma 4's global layers are wider, in `per_layer_config`), holding only the
/// layers that do not reuse an earlier layer's keys and values (the last `num_kv_shared_layers`).
fn expected_caches(config: &Value, context: usize) -> Vec<(String, Vec<usize>)> {
    let layers = config["num_hidden_layers"].as_u64().or(config["n_layer"].as_u64()).unwrap() as usize;
    let heads = config["num_attention_heads"].as_u64().or(config["n_head"].as_u64()).unwrap() as usize;
    let kv = config["num_key_value_heads"].as_u64().map_or(heads, |v| v as usize);
    let hidden = config["hidden_size"].as_u64().or(config["n_embd"].as_u64()).unwrap() as usize;
    let head_dim = config["head_dim"].as_u64().map_or(hidden / heads, |v| v as usize);
    let shared = config["num_kv_shared_layers"].as_u64().unwrap_or(0) as usize;
    let mut groups: Vec<((usize, usize), usize)> = Vec::new();
    for l in 0..layers - shared {
        let o = &config["per_layer_config"][l.to_string()];
        let shape = (
            o["num_key_value_heads"].as_u64().map_or(kv, |v| v as usize),
            o["head_dim"].as_u64().map_or(head_dim, |v| v as usize),
        );
        match groups.iter_mut().find(|g| g.0 == shape) {
            Some(g) => g.1 += 1,
            None => groups.push((shape, 1)),
        }
    }
    let mut caches = Vec::new();
    for base in ["keyCache", "valueCache"] {
        for (i, ((kv, hd), n)) in groups.iter().enumerate() {
            let name = if i == 0 { base.to_string() } else { format!("{base}Global") };
            caches.push((name, vec![*n, 1, *kv, context, *hd]));
        }
    }
    caches
}

/// The stateful interface for a config: inputs, states and outputs with their shapes.
fn check_interface(report: &Value, config: &Value, context: usize) {
    let f = &report["functions"]["main"];
    let config = if config["text_config"].is_object() { &config["text_config"] } else { config };
    let layers = config["num_hidden_layers"].as_u64().or(config["n_layer"].as_u64()).unwrap() as usize;
    let ids = &f["inputs"][0];
    assert_eq!((ids["name"].as_str(), ids["dtype"].as_str()), (Some("inputIds"), Some("int32")));
    assert_eq!(ids["flexibility"]["ranges"], serde_json::json!([[1, 1], [1, context]]));
    let mask = &f["inputs"][1];
    assert_eq!((mask["name"].as_str(), mask["dtype"].as_str()), (Some("causalMask"), Some("fp16")));
    assert_eq!(mask["flexibility"]["ranges"], serde_json::json!([[1, 1], [1, 1], [1, context], [1, context]]));
    let caches = expected_caches(config, context);
    let states = f["states"].as_array().unwrap();
    assert_eq!(states.len(), caches.len(), "{states:?}");
    for (state, (name, shape)) in states.iter().zip(&caches) {
        assert_eq!(state["name"], name.as_str());
        assert_eq!(state["dtype"], "fp16");
        assert_eq!(state["shape"], serde_json::json!(shape));
    }
    let cached_layers: usize = caches.iter().filter(|c| c.0.starts_with("key")).map(|c| c.1[0]).sum();
    assert_eq!(f["outputs"][0]["name"], "logits");
    // Declared without a shape (flexible); inspect derives it from the program.
    let vocab: u64 = report["metadata"]["user_defined"]["corelm.vocab_size"].as_str().unwrap().parse().unwrap();
    let derived = &f["outputs"][0]["from_program"];
    assert_eq!(derived["shape"], serde_json::json!([1, 1, vocab]));
    assert_eq!(derived["flexibility"]["ranges"], serde_json::json!([[1, 1], [1, context], [vocab, vocab]]));
    let ops = &f["op_histogram"];
    for op in ["read_state", "slice_update", "write_state", "gather", "linear"] {
        assert!(ops[op].as_u64().unwrap_or(0) > 0, "no {op} in {ops}");
    }
    assert_eq!(ops["read_state"].as_u64(), Some(2 * cached_layers as u64), "one cache read per layer and cache");
    let softcapped = config["attn_logit_softcapping"].as_f64().is_some();
    let attention = if softcapped { "softmax" } else { "scaled_dot_product_attention" };
    assert_eq!(ops[attention].as_u64(), Some(layers as u64), "{attention} per layer: {ops}");
    assert!(report["issues"].as_array().unwrap().is_empty(), "{}", report["issues"]);
}

/// A hybrid model's interface (LFM2, Qwen3.5): KV caches for its attention layers only, a
/// convolution window per recurrent layer (`convState`, channels-first) and for Gated DeltaNet a
/// key × value state per value head (`recurrentState`), fp16, in every function; Qwen3.5's functions
/// have the fixed lengths its unrolled chunks take (up to the context). The package names its
/// recurrent states for the driver.
fn check_hybrid_interface(report: &Value, config: &Value, context: usize) {
    let types: Vec<&str> = config["layer_types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let attention = types.iter().filter(|&&t| t == "full_attention").count();
    let recurrent = types.len() - attention;
    let n = |k: &str| config[k].as_u64().unwrap() as usize;
    let heads = n("num_attention_heads");
    let head_dim = config["head_dim"].as_u64().map_or(n("hidden_size") / heads, |v| v as usize);
    let kv = vec![attention, 1, n("num_key_value_heads"), context, head_dim];
    let lfm2 = config["model_type"] == "lfm2";
    let mut states = vec![("keyCache", kv.clone()), ("valueCache", kv)];
    let fixed = vec!["length_1", "length_16", "length_4", "length_64"];
    let (functions, recurrent_names) = if lfm2 {
        states.push(("convState", vec![recurrent, 1, n("hidden_size"), 1, n("conv_L_cache") - 1]));
        (vec!["main"], "convState")
    } else if config["model_type"] == "granitemoehybrid" {
        let (heads, groups, state) = (n("mamba_n_heads"), n("mamba_n_groups"), n("mamba_d_state"));
        let values = n("mamba_expand") * n("hidden_size");
        states.push(("convState", vec![recurrent, 1, values + 2 * groups * state, 1, n("mamba_d_conv") - 1]));
        states.push(("recurrentState", vec![recurrent, 1, heads, state, values / heads]));
        (fixed, "convState,recurrentState")
    } else {
        let (kh, vh, kd, vd) = (
            n("linear_num_key_heads"),
            n("linear_num_value_heads"),
            n("linear_key_head_dim"),
            n("linear_value_head_dim"),
        );
        states.push(("convState", vec![recurrent, 1, 2 * kh * kd + vh * vd, 1, n("linear_conv_kernel_dim") - 1]));
        states.push(("recurrentState", vec![recurrent, 1, vh, kd, vd]));
        (fixed, "convState,recurrentState")
    };
    let mut names: Vec<&str> = report["functions"].as_object().unwrap().keys().map(|k| k.as_str()).collect();
    names.sort();
    assert_eq!(names, functions);
    for name in functions {
        let f = &report["functions"][name];
        let declared: Vec<(String, Vec<usize>)> = f["states"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                assert_eq!(s["dtype"], "fp16");
                (s["name"].as_str().unwrap().to_string(), serde_json::from_value(s["shape"].clone()).unwrap())
            })
            .collect();
        let want: Vec<(String, Vec<usize>)> = states.iter().map(|(n, s)| (n.to_string(), s.clone())).collect();
        assert_eq!(declared, want, "{name}");
        let ops = &f["op_histogram"];
        assert_eq!(ops["conv"].as_u64(), Some(recurrent as u64), "{name}: a convolution per recurrent layer: {ops}");
        assert_eq!(ops["scaled_dot_product_attention"].as_u64(), Some(attention as u64), "{name}: {ops}");
    }
    assert_eq!(report["metadata"]["user_defined"]["corelm.recurrent_states"], recurrent_names);
    assert!(report["issues"].as_array().unwrap().is_empty(), "{}", report["issues"]);
}

#[test]
fn every_tiny_architecture_converts_and_loads_in_coremltools() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(root().join("tests/fixtures/tiny")).unwrap().flatten().map(|e| e.path()).collect();
    dirs.sort();
    assert!(dirs.len() >= 9);
    let mut packages = Vec::new();
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let config: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let out = tmp.path().join(format!("{name}.mlpackage"));
        let summary = convert(dir, &out, &["--context", "64"]);
        let text = if config["text_config"].is_object() { &config["text_config"] } else { &config };
        assert_eq!(summary["layers"].as_u64(), text["num_hidden_layers"].as_u64().or(text["n_layer"].as_u64()));
        // A multimodal checkpoint's towers are left out, and the summary says so.
        let notes = summary["notes"].to_string();
        for tower in ["vision", "audio"] {
            let present = config[format!("{tower}_config")].is_object();
            assert_eq!(notes.contains(&format!("the {tower} tower")), present, "{name}: {notes}");
        }
        let report = inspect(&out);
        if text["layer_types"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t != "full_attention" && t != "sliding_attention"))
        {
            check_hybrid_interface(&report, text, 64);
        } else {
            check_interface(&report, &config, 64);
        }
        assert_eq!(report["spec_version"], 9);
        assert_eq!(report["metadata"]["user_defined"]["corelm.context_length"], "64");
        packages.push(out);
    }
    // The other interfaces, on one model: fixed lengths (multifunction), decomposed attention,
    // fp32 compute, and KV caches as inputs/outputs for iOS 17 and 16.
    let llama = root().join("tests/fixtures/tiny/llama_rope_llama3");
    for (tag, extra) in [
        ("lengths", vec!["--query-lengths", "1,8"]),
        ("decomposed", vec!["--attention", "decomposed"]),
        ("fp32", vec!["--precision", "fp32"]),
        ("ios17", vec!["--target", "ios17"]),
        ("ios16", vec!["--target", "ios16"]),
        ("int8", vec!["--quantize", "int8"]),
        ("int4", vec!["--quantize", "int4", "--block-size", "16"]),
        ("int4-offset", vec!["--quantize", "int4", "--block-size", "16", "--offset"]),
        ("lut4", vec!["--quantize", "lut4", "--lut-group", "4"]),
        ("lut6", vec!["--quantize", "lut6", "--quantize-embeddings", "int8"]),
        ("lut8", vec!["--quantize", "lut8", "--lut-group", "8"]),
        ("mixed", vec!["--quantize", "mixed", "--block-size", "16", "--keep", "layers.0.mlp"]),
    ] {
        let out = tmp.path().join(format!("llama-{tag}.mlpackage"));
        let mut args = vec!["--context", "32"];
        args.extend(extra);
        convert(&llama, &out, &args);
        let report = inspect(&out);
        assert!(report["issues"].as_array().unwrap().is_empty(), "{tag}: {}", report["issues"]);
        match tag {
            "lengths" => {
                assert_eq!(report["default_function"], "length_1");
                let names: Vec<&String> = report["functions"].as_object().unwrap().keys().collect();
                assert_eq!(names, ["length_1", "length_8"]);
                let f = &report["functions"]["length_8"];
                assert_eq!(f["inputs"][1]["shape"], serde_json::json!([1, 1, 8, 32]));
                assert_eq!(f["inputs"][2]["name"], "position");
            }
            "int8" | "int4" | "int4-offset" | "lut4" | "lut6" | "lut8" | "mixed" => {
                let ops = &report["functions"]["main"]["op_histogram"];
                let count = |op: &str| ops[op].as_u64().unwrap_or(0);
                let (shift_scale, lut) = (count("constexpr_blockwise_shift_scale"), count("constexpr_lut_to_dense"));
                let bytes = |dtype: &str| report["weights"]["bytes_by_dtype"][dtype].as_u64().unwrap_or(0);
                match tag {
                    "lut4" | "lut8" => {
                        assert!(lut >= 7 && shift_scale == 0 && bytes(&format!("uint{}", &tag[3..])) > 0, "{ops}")
                    }
                    // Layers as tables, the embedding and LM head as int8.
                    "lut6" => assert!(
                        lut >= 7 && (1..=2).contains(&shift_scale) && bytes("uint6") > 0 && bytes("int8") > 0,
                        "{ops}"
                    ),
                    // int4 layers, int8 embedding, and layer 0's three MLP matrices kept as they are.
                    "mixed" => assert!(bytes("int4") > 0 && bytes("int8") > 0 && bytes("fp16") > 0, "{ops}"),
                    _ => assert!(shift_scale >= 7 && bytes(tag.trim_end_matches("-offset")) > 0, "{ops}"),
                }
            }
            "ios17" | "ios16" => {
                let f = &report["functions"]["main"];
                assert!(f["states"].as_array().unwrap().is_empty());
                assert_eq!(f["inputs"][2]["name"], "keyCache");
                assert_eq!(f["outputs"][1]["name"], "keyCacheOut");
                assert_eq!(report["spec_version"], if tag == "ios17" { 8 } else { 7 });
            }
            _ => {}
        }
        packages.push(out);
    }
    // A hybrid model in the Neural Engine profile: LFM2's convolutions channels-first, in fp16,
    // in fixed lengths up to 64 with 1 among them (its state takes no padding).
    let lfm2 = tmp.path().join("lfm2-ane.mlpackage");
    convert(&root().join("tests/fixtures/tiny/lfm2"), &lfm2, &["--context", "64", "--profile", "ane"]);
    let report = inspect(&lfm2);
    let mut names: Vec<&String> = report["functions"].as_object().unwrap().keys().collect();
    names.sort();
    assert_eq!(names, ["length_1", "length_16", "length_4", "length_64"]);
    assert!(report["issues"].as_array().unwrap().is_empty(), "{}", report["issues"]);
    // Its window state is as wide as the Neural Engine aligns rows (the tiny model's 16-wide heads
    // leave the KV caches unaligned, real models' are not).
    let f = &report["functions"]["length_1"];
    let conv = f["states"].as_array().unwrap().iter().find(|s| s["name"] == "convState").unwrap();
    assert_eq!(conv["shape"], serde_json::json!([3, 1, 64, 1, 32]));
    assert!(!f["ane_fallbacks"].to_string().contains("convState"), "{}", f["ane_fallbacks"]);
    packages.push(lfm2);
    coremltools_accepts(&packages);
}

fn model(name: &str) -> PathBuf {
    let p = root().join(".cache/models").join(name);
    assert!(p.exists(), "{} missing: run scripts/fetch-models.sh", p.display());
    p
}

#[test]
fn real_gguf_models_convert_and_load_in_coremltools() {
    let tmp = tempfile::tempdir().unwrap();
    let smol = tmp.path().join("smollm2.mlpackage");
    let s = convert(&model("SmolLM2-135M-Instruct.Q4_1.gguf"), &smol, &["--context", "512"]);
    assert_eq!((s["architecture"].as_str(), s["layers"].as_u64()), (Some("llama"), Some(30)));
    let gemma = tmp.path().join("gemma3.mlpackage");
    let g = convert(&model("gemma-3-270m-q4_k_m.gguf"), &gemma, &["--context", "1024"]);
    assert_eq!((g["architecture"].as_str(), g["layers"].as_u64()), (Some("gemma3_text"), Some(18)));
    // Peak memory: the largest tensor is Gemma's 262144×640 embedding (671 MB as f32); the
    // converter holds it once as f32 and once encoded, plus mapped input pages.
    let peak = g["peak_memory_bytes"].as_u64().unwrap();
    let largest = 262_144u64 * 640 * 4;
    println!(
        "Gemma-3-270M: {:.1} s, peak {:.0} MB = {:.2} × the largest tensor",
        g["seconds"],
        peak as f64 / 1e6,
        peak as f64 / largest as f64
    );
    assert!(peak < 3 * largest, "peak memory {peak} is more than 3× the largest tensor");
    // Quantizing streams too: one tensor and its compressed form at a time.
    let int4 = tmp.path().join("gemma3-int4.mlpackage");
    let q = convert(&model("gemma-3-270m-q4_k_m.gguf"), &int4, &["--context", "1024", "--quantize", "int4"]);
    let q_peak = q["peak_memory_bytes"].as_u64().unwrap();
    println!(
        "Gemma-3-270M int4: {:.1} s ({:.0} MB/s of f32 weights), peak {:.0} MB = {:.2} × the largest tensor, {:.0} MB on disk",
        q["seconds"],
        q["megabytes_per_second"],
        q_peak as f64 / 1e6,
        q_peak as f64 / largest as f64,
        q["output_bytes"].as_f64().unwrap() / 1e6
    );
    assert!(q_peak < 3 * largest, "quantizing: peak memory {q_peak} is more than 3× the largest tensor");

    for (pkg, config) in [
        (
            &smol,
            serde_json::json!({"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}),
        ),
        (
            &gemma,
            serde_json::json!({"num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "hidden_size": 640, "head_dim": 256}),
        ),
    ] {
        let report = inspect(pkg);
        let context = if pkg == &smol { 512 } else { 1024 };
        check_interface(&report, &config, context);
        let md = &report["metadata"]["user_defined"];
        assert!(md["co.huggingface.exporters.name"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(md["corelm.eos_token_ids"].as_str().is_some_and(|s| !s.is_empty()));
        let tokenizer = pkg.join("Data/ai.corelm/tokenizer.json");
        let tok: Value = serde_json::from_slice(&std::fs::read(&tokenizer).unwrap()).unwrap();
        assert!(tok["model"]["vocab"].as_object().is_some_and(|v| v.len() > 40_000));
    }
    let smol_cfg: Value =
        serde_json::from_slice(&std::fs::read(smol.join("Data/ai.corelm/tokenizer_config.json")).unwrap()).unwrap();
    assert!(smol_cfg["chat_template"].as_str().is_some_and(|t| t.contains("im_start")));
    // verify: the fp16 package against a float32 conversion of the same GGUF.
    let (code, stdout, stderr) = corelm(&[
        "verify",
        smol.to_str().unwrap(),
        "--against",
        model("SmolLM2-135M-Instruct.Q4_1.gguf").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    println!("verify SmolLM2 fp16 vs fp32: {v}");
    assert!(v["positions"].as_u64().unwrap() > 100);
    assert!(v["top1_agreement"].as_f64().unwrap() >= 0.97, "{v}");
    assert!(v["mean_kl"].as_f64().unwrap() < 1e-3, "{v}");
    let (p, r) = (v["perplexity_package"].as_f64().unwrap(), v["perplexity_reference"].as_f64().unwrap());
    assert!((p / r - 1.0).abs() < 0.02, "{v}");
    coremltools_accepts(&[smol, gemma]);
}

/// A GGUF's tensors per ggml type, as gguf-py reads the file: matrices (2-d) and their bytes.
fn gguf_py_matrix_types(src: &Path) -> std::collections::BTreeMap<String, (usize, u64)> {
    let script = "import collections, json, sys, gguf\n\
        r = gguf.GGUFReader(sys.argv[1])\n\
        out = collections.defaultdict(lambda: [0, 0])\n\
        for t in r.tensors:\n\
        \x20   if len(t.shape) == 2:\n\
        \x20       out[t.tensor_type.name][0] += 1\n\
        \x20       out[t.tensor_type.name][1] += int(t.n_bytes)\n\
        print(json.dumps(out))";
    let out = Command::new(python()).args(["-c", script]).arg(src).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let raw: std::collections::BTreeMap<String, (usize, u64)> = serde_json::from_slice(&out.stdout).unwrap();
    raw
}

/// Per-type rows of a conversion summary: (tensors, source bytes, package bytes, how carried).
fn grid_types(summary: &Value) -> std::collections::BTreeMap<String, &Value> {
    summary["grid_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["source_type"].as_str().unwrap().to_string(), t))
        .collect()
}

/// A GGUF converts keeping its grids (what you downloaded is what you get): on Gemma-3 Q4_K_M
/// every matrix stays on its grid — Q5_0 and Q8_0 exactly, Q4_K and Q6_K with fp16-rounded
/// derived scales — counted and sized per type as gguf-py reads the file, and the package's
/// weights stay within 1.3× of the file's. `--dequantize` stores fp16 and says so per type;
/// `--quantize int4` keeps the Q4_K grid (already int4 in blocks of 32) and re-quantizes the rest.
#[test]
fn gguf_grids_are_carried_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let src = model("gemma-3-270m-q4_k_m.gguf");
    let want = gguf_py_matrix_types(&src);
    assert!(want.contains_key("Q4_K") && want.contains_key("Q6_K"), "{want:?}");
    let pkg = tmp.path().join("g.mlpackage");
    let summary = convert(&src, &pkg, &["--context", "64"]);
    let types = grid_types(&summary);
    assert_eq!(types.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    let (mut source_bytes, mut package_bytes) = (0, 0);
    for (name, &(tensors, bytes)) in &want {
        let t = types[name];
        assert_eq!((t["tensors"].as_u64(), t["source_bytes"].as_u64()), (Some(tensors as u64), Some(bytes)), "{t}");
        let exact = ["Q4_0", "Q5_0", "Q8_0"].contains(&name.as_str());
        let carried = if exact { &t["exact"] } else { &t["scale_rounded"] };
        assert_eq!(carried.as_u64(), Some(tensors as u64), "{t}");
        source_bytes += bytes;
        package_bytes += t["package_bytes"].as_u64().unwrap();
    }
    let ratio = package_bytes as f64 / source_bytes as f64;
    println!("Gemma-3 Q4_K_M: {package_bytes} package bytes for {source_bytes} GGUF bytes ({ratio:.3}×)");
    assert!(ratio <= 1.3, "{ratio}");
    for g in summary["source_grids"].as_array().unwrap() {
        assert!(g["reason"].is_null() && g["max_error"].as_f64().unwrap() < 1e-3, "{g}");
    }

    // The ane profile splits the 262k-row embedding into blocks of 65536 rows: the grid splits
    // with it, and the package says what the default one does.
    let ane = tmp.path().join("ane.mlpackage");
    let summary = convert(&src, &ane, &["--context", "64", "--profile", "ane"]);
    assert!(summary["source_grids"].as_array().unwrap().iter().all(|g| g["reason"].is_null()), "{summary}");
    coremltools_accepts(std::slice::from_ref(&ane));
    let (code, stdout, stderr) =
        corelm(&["verify", ane.to_str().unwrap(), "--against", pkg.to_str().unwrap(), "--max-tokens", "64", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert!(v["mean_kl"].as_f64().unwrap() < 1e-2 && v["top1_agreement"].as_f64().unwrap() >= 0.95, "{v}");

    let (code, stdout, stderr) = corelm(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        pkg.to_str().unwrap(),
        "--json",
        "--force",
        "--context",
        "64",
        "--dequantize",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    for (name, t) in grid_types(&summary) {
        assert_eq!(t["dequantized"], t["tensors"], "{t}");
        let n = want[&name].0;
        assert!(
            stderr.contains(&format!("warning: {n} {name} tensor(s) stored as fp16, not on their grid: --dequantize")),
            "{stderr}"
        );
    }

    let summary = convert(&src, &pkg, &["--context", "64", "--quantize", "int4"]);
    for (name, t) in grid_types(&summary) {
        let field = if name == "Q4_K" { "scale_rounded" } else { "requantized" };
        assert_eq!(t[field], t["tensors"], "{t}");
    }

    // A safetensors folder has no grids: asking to dequantize one is an error, not a no-op.
    let tiny = root().join("tests/fixtures/tiny/qwen3");
    let (code, _, stderr) =
        corelm(&["convert", tiny.to_str().unwrap(), "-o", pkg.to_str().unwrap(), "--force", "--dequantize"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--dequantize applies to GGUF files"), "{stderr}");
}

/// Every block type corelm carries, one tensor each (the grids.gguf fixture, made by
/// python/gguf_reference.py): the package passes coremltools' loader, each type is reported
/// carried with the per-type form, and its logits equal those of the --dequantize package up to
/// fp16 rounding (KL ≤ 1e-4, greedy tokens the same).
#[test]
fn every_carried_grid_loads_in_coremltools_and_matches_dequantization() {
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join("crates/corelm-convert/tests/fixtures/gguf/grids.gguf");
    let (carried, dequantized) = (tmp.path().join("carried.mlpackage"), tmp.path().join("fp16.mlpackage"));
    let summary = convert(&src, &carried, &[]);
    convert(&src, &dequantized, &["--dequantize"]);
    let want = gguf_py_matrix_types(&src);
    let types = grid_types(&summary);
    let all = [
        "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "IQ4_XS", "IQ2_XXS",
        "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4",
    ];
    assert_eq!(types.len(), all.len(), "{summary}");
    for name in all {
        let t = types[name];
        assert_eq!(t["tensors"].as_u64(), Some(want[name].0 as u64), "{t}");
        // Block scales that are fp16 values already, and no minimum: the grid is carried exactly.
        let exact = ["Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4"].contains(&name);
        assert_eq!(t[if exact { "exact" } else { "scale_rounded" }], t["tensors"], "{t}");
    }
    coremltools_accepts(std::slice::from_ref(&carried));
    let (code, stdout, stderr) =
        corelm(&["verify", carried.to_str().unwrap(), "--against", dequantized.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    println!("carried vs dequantized grids.gguf: {v}");
    assert!(v["mean_kl"].as_f64().unwrap() <= 1e-4, "{v}");
    assert!(v["top1_agreement"].as_f64().unwrap() >= 0.99, "{v}");
    let ids = ["--ids", "1,40,50,60", "--max-new-tokens", "12", "--ignore-eos"];
    let run = |p: &Path| {
        let mut args = vec!["run", p.to_str().unwrap()];
        args.extend(ids);
        let (code, stdout, stderr) = corelm(&args);
        assert_eq!(code, 0, "{stderr}");
        stdout
    };
    assert_eq!(run(&carried), run(&dequantized));
}

/// On the registry GGUFs, the carried package computes what the `--dequantize` package does.
/// In fp32 packages the carried forms' scales are exact, and only the weight forms differ: top-1
/// agreement ≥ 99.9 %, KL ≤ 1e-6, the same greedy tokens. In fp16 packages the derived scales of
/// the K-quants are rounded to fp16, which fp16 computation amplifies as it does any fp16
/// rounding (bench/results/gguf-grids.json has the fp16-versus-fp32 floor): KL ≤ 1e-4 and the
/// same greedy tokens.
#[test]
fn carried_gguf_grids_compute_what_dequantization_does() {
    let tmp = tempfile::tempdir().unwrap();
    let text = root().join("bench/data/eval.txt");
    for name in ["gemma-3-270m-q4_k_m.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"] {
        for (precision, min_top1, max_kl) in [("fp32", 0.999, 1e-6), ("fp16", 0.99, 1e-4)] {
            let pkg = |label: &str| tmp.path().join(format!("{name}.{precision}.{label}.mlpackage"));
            let (carried, dequantized) = (pkg("carried"), pkg("dequantized"));
            let args = ["--context", "256", "--precision", precision];
            convert(&model(name), &carried, &args);
            convert(&model(name), &dequantized, &[&args[..], &["--dequantize"]].concat());
            let (code, stdout, stderr) = corelm(&[
                "verify",
                carried.to_str().unwrap(),
                "--against",
                dequantized.to_str().unwrap(),
                "--text",
                text.to_str().unwrap(),
                "--max-tokens",
                "768",
                "--json",
            ]);
            assert_eq!(code, 0, "{stderr}");
            let v: Value = serde_json::from_str(&stdout).unwrap();
            println!("{name} {precision} carried vs dequantized: {v}");
            assert!(v["positions"].as_u64().unwrap() >= 700, "{v}");
            assert!(v["top1_agreement"].as_f64().unwrap() >= min_top1, "{name} {precision}: {v}");
            assert!(v["mean_kl"].as_f64().unwrap() <= max_kl, "{name} {precision}: {v}");
            let greedy = |p: &Path| {
                let args = ["run", p.to_str().unwrap(), "--prompt", "The capital of France is", "--raw"];
                let (code, stdout, stderr) =
                    corelm(&[&args[..], &["--temperature", "0", "--max-new-tokens", "24", "--ignore-eos"]].concat());
                assert_eq!(code, 0, "{stderr}");
                stdout
            };
            assert_eq!(greedy(&carried), greedy(&dequantized), "{name} {precision}");
        }
    }
}

#[test]
fn gguf_q4_1_grid_is_carried_over_without_requantizing() {
    use corelm_convert::checkpoint::Checkpoint;
    use corelm_format::mil::program::Binding;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grid.mlpackage");
    let src = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    convert(&src, &out, &["--context", "64"]);
    let pkg = corelm_format::Package::open(&out).unwrap();
    let (ck, _) = corelm_convert::gguf_source::GgufCheckpoint::open(&src).unwrap();
    let main = pkg.model().program.functions.values().next().unwrap();
    let mut files = pkg.blob_files();
    let mut checked = 0;
    for (op_name, hf) in [
        ("layers_0_q", "model.layers.0.self_attn.q_proj.weight"),
        ("layers_0_k", "model.layers.0.self_attn.k_proj.weight"),
        ("layers_29_down", "model.layers.29.mlp.down_proj.weight"),
    ] {
        let op = main.block.operations.iter().find(|o| o.outputs.first().is_some_and(|x| x.name == op_name)).unwrap();
        assert_eq!(op.op_type, "constexpr_blockwise_shift_scale", "{op_name}");
        let mut read = |p: &str| match op.input(p) {
            Some(Binding::Value(v)) => files.read(v).unwrap(),
            other => panic!("{op_name}.{p}: {other:?}"),
        };
        let (data, scale, offset) = (read("data"), read("scale"), read("offset"));
        assert_eq!(data.dtype(), corelm_format::DType::Uint4, "{op_name}");
        let (q, s, o) = (data.to_i64().unwrap(), scale.to_f64().unwrap(), offset.to_f64().unwrap());
        let cols = data.shape()[1];
        let want = ck.read_f32(hf).unwrap();
        assert_eq!(want.len(), q.len());
        for (i, &w) in want.iter().enumerate() {
            let b = (i / cols) * (cols / 32) + (i % cols) / 32;
            let got = (s[b] * (q[i] as f64 - o[b])) as f32;
            let m = (s[b] * o[b]).abs() as f32;
            let bound = m * 2f32.powi(-11) * 1.01 + 4.0 * f32::EPSILON * w.abs().max(m);
            assert!((got - w).abs() <= bound, "{op_name}[{i}]: {got} vs {w}");
            checked += 1;
        }
    }
    assert!(checked > 500_000);
    // Q4_1's fractional offsets are fp16 next to uint4 data: coremltools' loader takes them.
    coremltools_accepts(&[out]);
}

/// `--max-weight-file` splits the weights over several files (none above the limit unless one
/// tensor is); the sharded package loads in coremltools and computes exactly the same logits.
#[test]
fn sharded_weights_load_everywhere_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let (whole, sharded) = (tmp.path().join("whole.mlpackage"), tmp.path().join("sharded.mlpackage"));
    // fp16 weights (270 MB): enough for four 64 MB files.
    convert(&src, &whole, &["--context", "64", "--dequantize"]);
    convert(&src, &sharded, &["--context", "64", "--dequantize", "--max-weight-file", "64M"]);
    let files: Vec<(String, u64)> = inspect(&sharded)["weights"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f["bytes"].as_u64().unwrap()))
        .collect();
    assert!(files.len() >= 4, "{files:?}");
    assert!(files.iter().all(|(_, b)| *b <= 64 << 20), "{files:?}");
    assert_eq!(inspect(&whole)["weights"]["files"].as_array().unwrap().len(), 1);
    let logits = |pkg: &Path| {
        let (code, out, err) = corelm(&[
            "run",
            pkg.to_str().unwrap(),
            "--ids",
            "1,504,3575,282",
            "--max-new-tokens",
            "4",
            "--json",
            "--logits",
            "--ignore-eos",
        ]);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        (
            v["generated_ids"].clone(),
            v["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>(),
        )
    };
    let (a, b) = (logits(&whole), logits(&sharded));
    assert_eq!(a.0, b.0, "same greedy tokens");
    assert!(a.1 == b.1, "bit-identical logits");
    coremltools_accepts(&[sharded]);
    for (size, problem) in [("3G", "2 GiB"), ("10X", "unit"), ("0", "between")] {
        let (code, _, err) = corelm(&[
            "convert",
            src.to_str().unwrap(),
            "-o",
            tmp.path().join("x.mlpackage").to_str().unwrap(),
            "--max-weight-file",
            size,
        ]);
        assert!(code != 0 && err.contains(problem), "{size}: {err}");
    }
}

/// Each tiny checkpoint as llama.cpp's convert_hf_to_gguf.py writes it (tiny_<fixture>.gguf,
/// from python/gguf_reference.py: F32 tensors under gguf-py's names, Q/K rows permuted where
/// llama.cpp permutes them, GPT-2's Conv1D weights transposed, Phi-3's fused qkv and gate_up,
/// LongRoPE's factors as tensors) converts, in fp32 and in the default precision, into a package
/// that generates what the package from the safetensors folder does, with last-position logits
/// equal up to the f32 rounding of GGUF's float metadata; and coremltools loads it. Where
/// llama.cpp computes otherwise than transformers, the folder is read as llama.cpp reads the
/// model (`as_llama_cpp_reads_it`). Phi-4-mini's LongRoPE runs with both factor sets: the
/// default context (128) passes the trained 64, `--context 64` does not. Gemma 3n's file holds
/// its AltUp projections stacked and its per-layer table padded with zero rows (the prompt's 99
/// lies past the table's 96 rows); Gemma 4's its proportional RoPE as `rope_freqs` factors.
#[test]
fn tiny_checkpoints_convert_from_gguf_as_from_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = [
        "gpt2",
        "smollm3",
        "granite",
        "granite4",
        "granite4_h",
        "olmo2",
        "olmo3",
        "phi3_longrope",
        "gemma3n_text",
        "gemma4_text",
        "lfm2",
        "qwen3_5_text",
    ];
    let ids = [1, 17, 42, 99, 5];
    let mut from_gguf = vec![];
    for fixture in fixtures {
        let folder = as_llama_cpp_reads_it(fixture, tmp.path());
        let gguf = root().join(format!("crates/corelm-convert/tests/fixtures/gguf/tiny_{fixture}.gguf"));
        let mut variants = vec![vec!["--precision", "fp32"], vec![]];
        if fixture == "phi3_longrope" {
            variants.push(vec!["--context", "64"]);
        }
        for (i, extra) in variants.iter().enumerate() {
            let (pkg, st) = (tmp.path().join(format!("{fixture}{i}.mlpackage")), tmp.path().join("st.mlpackage"));
            let summary = convert(&gguf, &pkg, extra);
            let reference = convert(&folder, &st, extra);
            assert_eq!(summary["architecture"], reference["architecture"], "{fixture}: {summary}");
            let ((got, got_logits), (want, want_logits)) = (run_greedy(&pkg, &ids, 12), run_greedy(&st, &ids, 12));
            assert_eq!(got, want, "{fixture} {extra:?}: greedy ids");
            let scale = want_logits.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            let diff = got_logits.iter().zip(&want_logits).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            println!(
                "{fixture} {extra:?}: {} ids equal, max |Δ logit| {diff:.2e} of max |logit| {scale:.2}",
                got.len()
            );
            assert!(got_logits.len() == want_logits.len() && diff <= 1e-4 * scale, "{fixture} {extra:?}: {diff}");
            from_gguf.push(pkg);
        }
    }
    coremltools_accepts(&from_gguf);
}

/// A copy of tests/fixtures/tiny/<fixture> whose config says what llama.cpp computes for the
/// model where that differs from what transformers does: SmolLM3 without RoPE on every fourth
/// layer (llama.cpp's fixed `n_no_rope_layer_step`) and no sliding window; OLMo 3's sliding
/// layers on the full layers' theta (llama.cpp's olmo2 graph ropes them with the global base).
fn as_llama_cpp_reads_it(fixture: &str, tmp: &Path) -> PathBuf {
    let src = root().join("tests/fixtures/tiny").join(fixture);
    let dir = tmp.join(format!("{fixture}.llama_cpp"));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut config: Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    match fixture {
        "smollm3" => {
            let layers = config["num_hidden_layers"].as_u64().unwrap();
            config["no_rope_layers"] = (0..layers).map(|l| u64::from((l + 1) % 4 != 0)).collect();
            config["use_sliding_window"] = false.into();
        }
        "olmo3" => {
            let rope = &mut config["rope_parameters"];
            rope["sliding_attention"]["rope_theta"] = rope["full_attention"]["rope_theta"].clone();
        }
        _ => {}
    }
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    dir
}

/// A Phi-3 GGUF whose LongRoPE factor tensor is one factor short (tiny_phi3_longrope.gguf with
/// the tensor's length in its header lowered) is refused with an error that names the tensor.
#[test]
fn gguf_rope_factors_of_the_wrong_length_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes =
        std::fs::read(root().join("crates/corelm-convert/tests/fixtures/gguf/tiny_phi3_longrope.gguf")).unwrap();
    let name = b"rope_factors_short.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).expect("the tensor's info") + name.len();
    // Tensor info: name, n_dims (u32), then ne[0] (u64).
    let ne0 = at + 4..at + 12;
    assert_eq!(u64::from_le_bytes(bytes[ne0.clone()].try_into().unwrap()), 6);
    bytes[ne0].copy_from_slice(&5u64.to_le_bytes());
    let bad = tmp.path().join("bad.gguf");
    std::fs::write(&bad, bytes).unwrap();
    let (code, _, err) =
        corelm(&["convert", bad.to_str().unwrap(), "-o", tmp.path().join("x.mlpackage").to_str().unwrap()]);
    assert!(code != 0 && err.contains("rope_factors_short.weight") && err.contains("holds 5"), "{err}");
}

/// Greedy ids and last-position logits of `corelm run` on `pkg`.
fn run_greedy(pkg: &Path, ids: &[u64], new_tokens: usize) -> (Vec<u64>, Vec<f64>) {
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let (code, stdout, stderr) = corelm(&[
        "run",
        pkg.to_str().unwrap(),
        "--ids",
        &ids.join(","),
        "--max-new-tokens",
        &new_tokens.to_string(),
        "--json",
        "--logits",
        "--ignore-eos",
    ]);
    assert_eq!(code, 0, "run {}: {stderr}", pkg.display());
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let list = |k: &str| -> Vec<Value> { v[k].as_array().unwrap().clone() };
    (
        list("generated_ids").iter().map(|t| t.as_u64().unwrap()).collect(),
        list("logits").iter().map(|t| t.as_f64().unwrap()).collect(),
    )
}

/// `--profile ane`: fixed-length decode and prefill functions, fp16 throughout, Gemma's 262k
/// vocabulary split in blocks of 65536 and its sliding-window layers on ring-buffer caches; no
/// op on the Neural Engine fallback list, coremltools loads it, and it generates what the
/// default profile (full caches) does. The Gemma prompt (625 tokens, then 16 generated) runs
/// past its 512-token window, so the ring wraps around. `--chunks` splits the layer stack into
/// packages that run in sequence, and they generate the same.
#[test]
fn ane_profile_matches_the_default_profile() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ane_packages = Vec::new();
    // (model, fixture, LM-head blocks, parts for --chunks, attention heads × layers)
    for (gguf, fixture, vocab_blocks, chunks, head_layers) in [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2", 1, 2, 9 * 30),
        ("gemma-3-270m-q4_k_m.gguf", "gemma3_270m", 4, 3, 4 * 18),
    ] {
        let default = tmp.path().join(format!("{fixture}.mlpackage"));
        convert(&model(gguf), &default, &["--context", "1024"]);
        let ane = tmp.path().join(format!("{fixture}-ane.mlpackage"));
        // 1000 is padded to 1024, a multiple of 32.
        convert(&model(gguf), &ane, &["--context", "1000", "--profile", "ane"]);
        // The same split in parts that run in sequence (the runtime opens the siblings).
        let split = tmp.path().join(format!("{fixture}-ane-split.mlpackage"));
        let chunk_arg = chunks.to_string();
        let summary = convert(&model(gguf), &split, &["--context", "1000", "--profile", "ane", "--chunks", &chunk_arg]);
        let parts: Vec<PathBuf> =
            summary["packages"].as_array().unwrap().iter().map(|p| PathBuf::from(p.as_str().unwrap())).collect();
        assert_eq!(parts.len(), chunks);
        assert!(!split.exists(), "parts are named NAME_iofK.mlpackage");
        for (i, part) in parts.iter().enumerate() {
            assert!(part.ends_with(format!("{fixture}-ane-split_{}of{chunks}.mlpackage", i + 1)), "{part:?}");
            let r = inspect(part);
            for (name, f) in r["functions"].as_object().unwrap() {
                assert_eq!(f["ane_fallbacks"], serde_json::json!([]), "{part:?} {name}");
                let first_input = f["inputs"][0]["name"].as_str().unwrap();
                assert_eq!(first_input, if i == 0 { "inputIds" } else { "hiddenStates" });
                let last_output = f["outputs"][0]["name"].as_str().unwrap();
                assert!(
                    (i + 1 == chunks) == last_output.starts_with("logits"),
                    "{part:?}: {last_output} (only the last part ends in logits)"
                );
            }
        }

        let report = inspect(&ane);
        assert!(report["issues"].as_array().unwrap().is_empty(), "{}", report["issues"]);
        let functions = report["functions"].as_object().unwrap();
        assert_eq!(functions.keys().collect::<Vec<_>>(), ["length_1", "length_64"]);
        for (name, f) in functions {
            assert_eq!(f["ane_fallbacks"], serde_json::json!([]), "{fixture} {name}");
            assert!(f["op_histogram"].get("cast").is_none(), "{fixture} {name}: casts mean fp32 compute");
            // Linear layers are 1×1 convolutions over channels-first activations.
            assert!(f["op_histogram"].get("linear").is_none(), "{fixture} {name}: {}", f["op_histogram"]);
            assert!(f["op_histogram"]["conv"].as_u64().unwrap() > 0);
            // Attention head by head.
            assert_eq!(f["op_histogram"]["scaled_dot_product_attention"], head_layers, "{fixture} {name}");
            // Full caches span the context, padded to a multiple of 32; Gemma's sliding-window
            // layers get ring buffers of window + prefill chunk = 576 slots.
            let states: Vec<(&str, u64)> = f["states"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["name"].as_str().unwrap(), s["shape"][3].as_u64().unwrap()))
                .collect();
            let want: &[(&str, u64)] = if fixture == "gemma3_270m" {
                &[("keyCacheLocal", 576), ("keyCache", 1024), ("valueCacheLocal", 576), ("valueCache", 1024)]
            } else {
                &[("keyCache", 1024), ("valueCache", 1024)]
            };
            assert_eq!(states, want, "{fixture} {name}");
            // The logits blocks, and with a split head the greedy token as `argmax`.
            let outputs: Vec<&str> =
                f["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
            let want: Vec<String> = match vocab_blocks {
                1 => vec!["logits".into()],
                n => (0..n).map(|i| format!("logits_{i}")).chain(["argmax".into()]).collect(),
            };
            assert_eq!(outputs, want, "{fixture} {name}");
            assert!(f["outputs"].as_array().unwrap().iter().all(|o| o["shape"][2].as_u64().unwrap_or(0) <= 65536));
        }
        // The check is live: the default profile's flexible shapes are on the list.
        let flexible = &inspect(&default)["functions"]["main"]["ane_fallbacks"];
        assert!(flexible.as_array().unwrap().iter().any(|f| f["rule"] == "ane-flexible-shape"), "{flexible}");

        let reference: Value = serde_json::from_slice(
            &std::fs::read(root().join("tests/fixtures/real").join(fixture).join("reference.json")).unwrap(),
        )
        .unwrap();
        if vocab_blocks > 1 {
            // The in-graph argmax across blocks equals the argmax of the joined logits, for a
            // prefill chunk of the real prompt.
            let ids = &reference["prompts"][0]["prompt_ids"].as_array().unwrap()[..64];
            let mask: Vec<f32> =
                (0..64).flat_map(|i| (0..1024).map(move |j| if j <= i { 0.0 } else { -65504.0 })).collect();
            let calls = serde_json::json!([{
                "inputIds": {"shape": [1, 64], "dtype": "int32", "data": ids},
                "causalMask": {"shape": [1, 1, 64, 1024], "dtype": "fp16", "data": mask},
                "position": {"shape": [1], "dtype": "int32", "data": [0]},
            }]);
            let calls_file = tmp.path().join("calls.json");
            std::fs::write(&calls_file, calls.to_string()).unwrap();
            let (code, stdout, stderr) = corelm(&[
                "predict",
                ane.to_str().unwrap(),
                "--calls",
                calls_file.to_str().unwrap(),
                "--function",
                "length_64",
                "--json",
            ]);
            assert_eq!(code, 0, "{stderr}");
            let out: Value = serde_json::from_str(&stdout).unwrap();
            let floats =
                |v: &Value| -> Vec<f64> { v["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
            let blocks: Vec<Vec<f64>> = (0..vocab_blocks).map(|i| floats(&out[0][format!("logits_{i}")])).collect();
            let argmax = floats(&out[0]["argmax"]);
            for (row, &got) in argmax.iter().enumerate() {
                let joined: Vec<f64> = blocks.iter().flat_map(|b| b[row * 65536..(row + 1) * 65536].to_vec()).collect();
                let want =
                    joined.iter().enumerate().fold((0, f64::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
                assert_eq!(got as usize, want, "{fixture}: in-graph argmax at row {row}");
            }
        }
        for prompt in reference["prompts"].as_array().unwrap() {
            let ids: Vec<u64> = prompt["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            let (want, want_logits) = run_greedy(&default, &ids, 16);
            // The split model runs from any of its parts.
            for (label, pkg) in [("ane", &ane), ("ane split", &parts[0]), ("ane split", &parts[chunks - 1])] {
                let (got, got_logits) = run_greedy(pkg, &ids, 16);
                let range = want_logits.iter().cloned().fold(f64::MIN, f64::max)
                    - want_logits.iter().cloned().fold(f64::MAX, f64::min);
                let err = want_logits.iter().zip(&got_logits).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                println!(
                    "{fixture} {} ({} tokens): {label} vs default max|Δ| {err:.3e} ({:.2e} of range), greedy {}",
                    prompt["name"],
                    ids.len(),
                    err / range,
                    if got == want { "equal" } else { "differs" }
                );
                assert_eq!(got_logits.len(), want_logits.len());
                assert_eq!(got, want, "{fixture}: {label} generates differently");
                assert!(err < 1e-2 * range, "{fixture} {label}: logits differ by {err} (range {range})");
            }
        }
        ane_packages.push(ane);
        ane_packages.extend(parts);
    }
    coremltools_accepts(&ane_packages);
}

/// Without --context the cache holds 2048 tokens or, when fewer, the positions the model was
/// trained for: the tiny GPT-2 has a learned table of 64, and converts (it used to fail on 2048).
/// An explicit --context past learned positions stays an error; RoPE models take the default.
#[test]
fn default_context_is_what_the_model_can_address() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = root().join("tests/fixtures/tiny");
    let gpt2 = tmp.path().join("gpt2.mlpackage");
    let (code, stdout, stderr) =
        corelm(&["convert", tiny.join("gpt2").to_str().unwrap(), "-o", gpt2.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("context 64 (default: the 64 positions the model was trained for)"), "{stdout}");
    assert_eq!(inspect(&gpt2)["metadata"]["user_defined"]["corelm.context_length"], "64");
    let (code, _, stderr) = corelm(&[
        "convert",
        tiny.join("gpt2").to_str().unwrap(),
        "-o",
        gpt2.to_str().unwrap(),
        "--force",
        "--context",
        "65",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("gpt2 has learned positions for 64 tokens; --context 65 is too long"), "{stderr}");
    // max_position_embeddings 64 bounds the default of a RoPE model too (what it was trained for).
    let llama = tmp.path().join("llama.mlpackage");
    let s = convert(&tiny.join("llama_rope_linear"), &llama, &[]);
    assert_eq!(s["context"], 64);
}
