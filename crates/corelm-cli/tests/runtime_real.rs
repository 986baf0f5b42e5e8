//! The text runtime against transformers on real tokenizers and weights (references from
//! python/make_fixtures.py): tokenizer parity for SmolLM2 and Gemma 3, chat-template parity,
//! and the default model answering through `corelm run --prompt` with transformers' greedy ids.

use std::path::{Path, PathBuf};
use std::process::Command;

use corelm_runtime::chat::{ChatTemplate, Message};
use corelm_runtime::tokenizer::Tokenizer;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn reference(name: &str) -> Value {
    serde_json::from_slice(
        &std::fs::read(root().join("tests/fixtures/real").join(name).join("reference.json")).unwrap(),
    )
    .unwrap()
}

fn model(name: &str) -> PathBuf {
    let p = root().join(".cache/models").join(name);
    assert!(p.exists(), "{} missing: run scripts/fetch-models.sh", p.display());
    p
}

/// Writes the tokenizer files corelm builds from a GGUF into `dir`.
fn tokenizer_files(gguf: &str, dir: &Path) -> (Tokenizer, PathBuf) {
    let file = corelm_convert::gguf::GgufFile::open(model(gguf)).unwrap();
    for (name, bytes) in corelm_convert::gguf_source::extras(&file).unwrap() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    (Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap(), dir.join("tokenizer_config.json"))
}

fn check_tokenizer(fixture: &str, gguf: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (tok, _) = tokenizer_files(gguf, dir.path());
    let r = reference(fixture);
    let cases = r["tokenizer_cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{fixture}: encoding {text:?}");
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{fixture}: decoding {text:?}"
        );
    }
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    check_tokenizer("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf");
}

#[test]
fn gemma3_tokenizer_matches_transformers() {
    check_tokenizer("gemma3_270m", "gemma-3-270m-q4_k_m.gguf");
}

#[test]
fn chat_template_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, config) = tokenizer_files("SmolLM2-135M-Instruct.Q4_1.gguf", dir.path());
    let template = ChatTemplate::from_tokenizer_config(&config).unwrap().expect("SmolLM2 ships a chat template");
    let r = reference("smollm2");
    let chat = &r["chat_template"];
    let messages: Vec<Message> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(template.render(&messages, true).unwrap(), chat["rendered"].as_str().unwrap());
    // The single-question prompt (the template adds its default system message) tokenizes to
    // exactly transformers' prompt ids.
    let prompt = &r["prompts"][0];
    let text = template.render(&[Message::new("user", "What is the capital of France?")], true).unwrap();
    assert_eq!(text, prompt["prompt_text"].as_str().unwrap());
    let want: Vec<u32> = prompt["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(tok.encode(&text, false).unwrap(), want);
}

#[test]
fn the_default_model_answers_with_transformers_greedy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("smollm2.mlpackage");
    let corelm = env!("CARGO_BIN_EXE_corelm");
    let gguf = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = Command::new(corelm)
        .args(["convert", gguf.to_str().unwrap(), "-o", pkg.to_str().unwrap(), "--context", "512"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(corelm)
        .args([
            "run",
            pkg.to_str().unwrap(),
            "--prompt",
            "What is the capital of France?",
            "--max-new-tokens",
            "32",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let g: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("{g}");
    let r = reference("smollm2");
    let prompt = &r["prompts"][0];
    assert_eq!(g["prompt_ids"], prompt["prompt_ids"]);
    let want: Vec<u64> = prompt["greedy_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let got: Vec<u64> = g["generated_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    // Generation stops at the end-of-turn token (id 2); transformers' reference was forced on past it.
    assert_eq!(g["stop_reason"], "eos");
    assert!(got.len() >= 5 && want.starts_with(&got) && want[got.len()] == 2, "{got:?} vs {want:?}");
    assert!(g["text"].as_str().unwrap().contains("Paris"), "{}", g["text"]);

    // `run --ids` stops at the package's end-of-sequence id too, unless told to go on.
    let ids: Vec<String> = prompt["prompt_ids"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
    let ids = ids.join(",");
    let run_ids = |extra: &[&str]| -> Value {
        let out = Command::new(corelm)
            .args(["run", pkg.to_str().unwrap(), "--ids", &ids, "--max-new-tokens", "32", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let stopped = run_ids(&[]);
    assert_eq!(stopped["stop_reason"], "eos");
    assert_eq!(stopped["generated_ids"], g["generated_ids"]);
    let forced = run_ids(&["--ignore-eos"]);
    assert_eq!(forced["stop_reason"], "max_new_tokens");
    assert_eq!(forced["generated_ids"], prompt["greedy_ids"]);
}

/// `corelm chat` in a pseudo-terminal: two turns, the second referring to the first.
#[test]
fn chat_in_a_terminal_remembers_the_first_turn() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("smollm2.mlpackage");
    let corelm = env!("CARGO_BIN_EXE_corelm");
    let gguf = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = Command::new(corelm)
        .args(["convert", gguf.to_str().unwrap(), "-o", pkg.to_str().unwrap(), "--context", "512"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let python =
        std::env::var("CORELM_PYTHON").map(PathBuf::from).unwrap_or_else(|_| root().join(".cache/venv/bin/python"));
    let out = Command::new(python)
        .arg(root().join("python/chat_session.py"))
        .args([
            corelm,
            pkg.to_str().unwrap(),
            "What is the capital of France?",
            "What is the name of that city? Answer with one word.",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("{t}");
    assert_eq!(t["exit_status"], 0);
    let turns = t["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2);
    assert!(turns[0]["assistant"].as_str().unwrap().contains("Paris"), "{t}");
    // Only the first turn names the city: answering with it shows the conversation was kept.
    assert!(turns[1]["assistant"].as_str().unwrap().contains("Paris"), "{t}");
}
