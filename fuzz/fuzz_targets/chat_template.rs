//! A Jinja chat template and a conversation, as `corelm run --prompt` / `corelm chat` use them:
//! the input is `TEMPLATE \0 MESSAGES_JSON` (a list of `{"role", "content"}`; a fixed
//! conversation when there is no `\0`). The template goes into a tokenizer_config.json, read
//! with `ChatTemplate::from_tokenizer_config`, and rendered with and without the generation
//! prompt. Ok or an error, never a panic, never a hang or unbounded memory.
//!
//! Runs only with CORELM_FUZZ_EXTRA=1 for now: rendering has no limits on loops and output yet.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use corelm_runtime::chat::{ChatTemplate, Message};
use libfuzzer_sys::fuzz_target;

fn file() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| corelm_fuzz::scratch("chat_template").join("tokenizer_config.json"))
}

fn messages(json: &[u8]) -> Option<Vec<Message>> {
    let value: serde_json::Value = serde_json::from_slice(json).ok()?;
    value
        .as_array()?
        .iter()
        .map(|m| Some(Message::new(m.get("role")?.as_str()?, m.get("content")?.as_str()?)))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (template, messages) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], messages(&data[i + 1..])),
        None => (
            data,
            Some(vec![
                Message::new("system", "You are helpful."),
                Message::new("user", "What is the capital of France?"),
                Message::new("assistant", "Paris."),
                Message::new("user", "And of Italy?"),
            ]),
        ),
    };
    let (Ok(template), Some(messages)) = (std::str::from_utf8(template), messages) else { return };
    let config = serde_json::json!({
        "chat_template": template,
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "special": true},
    });
    let path = file();
    corelm_fuzz::write(path, &serde_json::to_vec(&config).expect("JSON values serialize"));
    let Ok(Some(t)) = ChatTemplate::from_tokenizer_config(path) else { return };
    for add_generation_prompt in [false, true] {
        let _ = t.render(&messages, add_generation_prompt);
    }
});
