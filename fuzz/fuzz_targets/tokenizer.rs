//! Arbitrary bytes as the tokenizer files a package ships and the runtime loads:
//! - starting with `GGUF`: a GGUF file whose `tokenizer.ggml.*` metadata the converter rebuilds
//!   as tokenizer.json and tokenizer_config.json, which then go through the runtime as below;
//! - anything else: both a `tokenizer.json` (`Tokenizer::from_file`, then encode and decode) and a
//!   `tokenizer_config.json` (`ChatTemplate::from_tokenizer_config`: JSON, template parsed; not
//!   rendered, see the chat_template target).
//!
//! Ok or an error, never a panic (but for one known panic in tokenizers, see `any_tokenizer`).
#![no_main]
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use corelm_convert::gguf::{self, GgufFile};
use corelm_fuzz::Known;
use corelm_runtime::chat::ChatTemplate;
use corelm_runtime::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

const TEXTS: &[&str] = &["Hello, world! What is the capital of France?", " 12 345\n\t<s>é中文😀 ", ""];

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| corelm_fuzz::scratch("tokenizer"))
}

/// Loads, encodes and decodes; whether it loaded.
fn tokenizer(path: &Path) -> bool {
    let Ok(t) = Tokenizer::from_file(path) else { return false };
    use_tokenizer(&t);
    true
}

/// Loads what may not be a tokenizer.json at all. tokenizers 0.22 panics (`expect`) on some
/// malformed JSON inside `decoder` (e.g. `{"decoder": {1: 2}}`), which `Tokenizer::from_file`
/// does not catch yet: tolerated here, so the rest keeps being fuzzed.
fn any_tokenizer(path: &Path) {
    if let Some(Ok(t)) = corelm_fuzz::tolerating(TOKENIZERS_EXPECT, || Tokenizer::from_file(path)) {
        use_tokenizer(&t);
    }
}

const TOKENIZERS_EXPECT: Known = Known { file: "/tokenizers-", frame: None };

fn use_tokenizer(t: &Tokenizer) {
    for text in TEXTS {
        for special in [false, true] {
            if let Ok(ids) = t.encode(text, special) {
                let _ = t.decode(&ids, false);
                let _ = t.decode(&ids, true);
            }
        }
    }
    let _ = t.decode(&[0, 1, 2, 3, 100, 1_000_000, u32::MAX], false);
}

/// Tokens all different, and every merge `a b` of two tokens whose concatenation is a token.
fn consistent(f: &GgufFile) -> bool {
    let Ok(Some(tokens)) = f.get_str_array("tokenizer.ggml.tokens") else { return false };
    let vocab: HashSet<&str> = tokens.iter().map(String::as_str).collect();
    if vocab.len() != tokens.len() {
        return false;
    }
    let Ok(merges) = f.get_str_array("tokenizer.ggml.merges") else { return false };
    merges.unwrap_or_default().iter().all(|m| {
        let mut parts = m.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => {
                vocab.contains(a) && vocab.contains(b) && vocab.contains(format!("{a}{b}").as_str())
            }
            _ => false,
        }
    })
}

fn tokenizer_config(path: &Path) {
    let _ = ChatTemplate::from_tokenizer_config(path);
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    let (tok, config) = (dir.join("tokenizer.json"), dir.join("tokenizer_config.json"));
    if data.starts_with(b"GGUF") {
        let Ok(f) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else { return };
        // What `corelm convert` ships in the package (gguf_source::extras).
        if let Ok(json) = gguf::tokenizer_json(&f) {
            corelm_fuzz::write(&tok, &serde_json::to_vec_pretty(&json).expect("JSON values serialize"));
            // A conversion ships this file: the runtime must be able to load what it built, at
            // least when the vocabulary is consistent. (The builder passes on duplicate tokens and
            // merges of tokens not in the vocabulary, which the runtime then refuses: reported.)
            let loaded = tokenizer(&tok);
            assert!(loaded || !consistent(&f), "the tokenizer.json built from the GGUF metadata does not load");
        }
        if let Ok(json) = gguf::tokenizer_config_json(&f) {
            corelm_fuzz::write(&config, &serde_json::to_vec_pretty(&json).expect("JSON values serialize"));
            tokenizer_config(&config);
        }
        return;
    }
    // The same file read both ways (neither reader cares about its name).
    corelm_fuzz::write(&tok, data);
    any_tokenizer(&tok);
    tokenizer_config(&tok);
});
