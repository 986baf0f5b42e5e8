//! The whole workflow on hybrid models (recurrent state: LFM2, Qwen3.5): `run` with a prompt
//! and with ids (greedy ids against transformers'), `chat` across turns, `verify` against the
//! float32 conversion of the source, `eval`, and calibrated compression, on the tiny fixtures
//! given a character-level tokenizer (their 128-token vocabulary) and a chat template.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn corelm(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_corelm")).args(args).output().unwrap();
    (o.status.code().unwrap(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

fn ok(args: &[&str]) -> String {
    let (code, stdout, stderr) = corelm(args);
    assert_eq!(code, 0, "corelm {args:?}: {stderr}");
    stdout
}

fn ok_json(args: &[&str]) -> Value {
    let stdout = ok(args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("corelm {args:?}: {e}: {stdout}"))
}

/// ids 0..3 are special (pad, bos, eos, unk); 3.. printable ASCII from the space on, one each.
fn char_tokenizer() -> Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<pad>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for (i, c) in (b' '..=b'~').enumerate() {
        vocab.insert((c as char).to_string(), json!(3 + i));
    }
    vocab.insert("<unk>".into(), json!(98));
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// The fixture with the tokenizer and a chat template beside it, in `tmp`.
fn with_tokenizer(name: &str, tmp: &Path) -> PathBuf {
    let src = root().join("tests/fixtures/tiny").join(name);
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(file), dir.join(file)).unwrap();
    }
    std::fs::write(dir.join("tokenizer.json"), char_tokenizer().to_string()).unwrap();
    let config = json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_workflow_runs_on_hybrid_models() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(12);
    let text_file = tmp.path().join("text.txt");
    std::fs::write(&text_file, &text).unwrap();
    for name in ["lfm2", "qwen3_5_text"] {
        let dir = with_tokenizer(name, tmp.path());
        let pkg = tmp.path().join(format!("{name}.mlpackage"));
        ok(&["convert", path(&dir), "-o", path(&pkg), "--context", "256"]);

        // Greedy ids from the fixture's prompt: transformers' continuation (cached decode).
        let reference: Value = serde_json::from_slice(
            &std::fs::read(root().join("tests/fixtures/tiny").join(name).join("reference.json")).unwrap(),
        )
        .unwrap();
        let ids: Vec<String> = reference["prompt_ids"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
        let out = ok(&["run", path(&pkg), "--ids", &ids.join(","), "--max-new-tokens", "16"]);
        let got: Vec<u64> =
            out.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
        let want: Vec<u64> = reference["greedy_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert!(got.ends_with(&want), "{name}: run --ids gave {got:?}, transformers {want:?}");

        // A prompt through the template, sampled.
        let (code, _, stderr) = corelm(&[
            "run",
            path(&pkg),
            "--prompt",
            "Hello there",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0.8",
            "--seed",
            "7",
        ]);
        assert_eq!(code, 0, "{name}: {stderr}");

        // Two turns of chat: the second feeds only the new turn onto the state the first left.
        let mut child = Command::new(env!("CARGO_BIN_EXE_corelm"))
            .args(["chat", path(&pkg), "--max-new-tokens", "8"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"Hi\nAnd again\n").unwrap();
        let o = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{name}: chat: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(stdout.matches("assistant> ").count(), 2, "{name}: {stdout}");
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains("error"),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );

        // The fp16 package against the float32 conversion of its source, and perplexity.
        let v = ok_json(&["verify", path(&pkg), "--against", path(&dir), "--text", path(&text_file), "--json"]);
        let top1 = v["top1_agreement"].as_f64().unwrap();
        let kl = v["mean_kl"].as_f64().unwrap();
        println!("{name}: fp16 vs fp32 top-1 {top1:.4}, KL {kl:.2e}");
        assert!(top1 >= 0.97 && kl < 1e-3, "{name}: {v}");
        let e = ok_json(&["eval", path(&pkg), "--text", path(&text_file), "--json"]);
        let ppl = e["perplexity"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{name}: {e}");

        // int8, plain and calibrated: the calibration reads the text through the recurrent layers.
        let mut agreement = Vec::new();
        for calibrated in [false, true] {
            let int8 = tmp.path().join(format!("{name}-int8-{calibrated}.mlpackage"));
            let mut args = vec!["compress", path(&pkg), "-o", path(&int8), "--quantize", "int8"];
            if calibrated {
                args.extend(["--calibrate", path(&text_file)]);
            }
            ok(&args);
            let c = ok_json(&["verify", path(&int8), "--against", path(&pkg), "--text", path(&text_file), "--json"]);
            agreement.push((c["top1_agreement"].as_f64().unwrap(), c["mean_kl"].as_f64().unwrap()));
        }
        println!("{name}: int8 vs fp16 (top-1, KL): plain {:?}, calibrated {:?}", agreement[0], agreement[1]);
        // Calibration changed the rounding, and both stay close (these random tiny models' flat
        // logits flip top-1 easily; the grams' coverage of every layer is tested in corelm-interp).
        assert_ne!(agreement[0], agreement[1], "{name}: calibration changed nothing");
        assert!(agreement.iter().all(|&(top1, kl)| top1 >= 0.85 && kl < 1e-2), "{name}: {agreement:?}");
    }
}

/// A hybrid package whose metadata names a recurrent state its functions do not declare is
/// refused with the key named; one whose metadata lost the key is still driven as recurrent
/// (its states' names say so): the same greedy ids as the intact package. (Qwen3.5's fixed
/// lengths would otherwise pad the 8-token prompt into a 16-token call, and the padding would
/// enter its state.)
#[test]
fn recurrent_state_metadata_is_checked() {
    use corelm_format::proto;
    use prost::Message;
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_tokenizer("qwen3_5_text", tmp.path());
    let pkg = tmp.path().join("qwen3_5_text.mlpackage");
    ok(&["convert", path(&dir), "-o", path(&pkg), "--context", "64"]);
    let ids = "5,17,42,99,3,77,20,61";
    let want = ok(&["run", path(&pkg), "--ids", ids, "--max-new-tokens", "8"]);
    let spec = pkg.join("Data/com.apple.CoreML/model.mlmodel");
    let original = std::fs::read(&spec).unwrap();
    let edit = |value: Option<&str>| {
        let mut model = proto::Model::decode(original.as_slice()).unwrap();
        let ud = &mut model.description.as_mut().unwrap().metadata.as_mut().unwrap().user_defined;
        match value {
            Some(v) => ud.insert("corelm.recurrent_states".into(), v.into()),
            None => ud.remove("corelm.recurrent_states"),
        };
        std::fs::write(&spec, model.encode_to_vec()).unwrap();
    };
    edit(Some("convState,recurrentState,lostState"));
    let (code, _, stderr) = corelm(&["run", path(&pkg), "--ids", ids, "--max-new-tokens", "8"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("corelm.recurrent_states names the state `lostState`"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    edit(None);
    assert_eq!(ok(&["run", path(&pkg), "--ids", ids, "--max-new-tokens", "8"]), want);
}
