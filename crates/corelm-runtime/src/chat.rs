//! Chat templates with Hugging Face semantics: the Jinja template from `tokenizer_config.json`,
//! rendered with `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and
//! `raise_exception`, in a Jinja environment configured as transformers configures it
//! (trim_blocks, lstrip_blocks, Python string methods).

use std::path::Path;

use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

use crate::{Error, Result};

/// Where conversions store tokenizer_config.json inside a package.
pub const TOKENIZER_CONFIG_PATH: &str = "Data/ai.corelm/tokenizer_config.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

fn special(config: &serde_json::Value, key: &str) -> String {
    match &config[key] {
        serde_json::Value::String(s) => s.clone(),
        // AddedToken objects: {"content": "<s>", ...}
        v => v["content"].as_str().unwrap_or_default().to_string(),
    }
}

impl ChatTemplate {
    /// Reads the template from a tokenizer_config.json; `Ok(None)` if it has none.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<ChatTemplate>> {
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let config: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| Error::malformed(path, format!("not valid JSON: {e}")))?;
        let source = match &config["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            // A list of named templates: use "default".
            serde_json::Value::Array(list) => match list.iter().find(|t| t["name"] == "default") {
                Some(t) => t["template"].as_str().unwrap_or_default().to_string(),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source)
            .map_err(|e| Error::malformed(path, format!("chat template does not parse: {e}")))?;
        Ok(Some(ChatTemplate {
            env,
            bos_token: special(&config, "bos_token"),
            eos_token: special(&config, "eos_token"),
        }))
    }

    /// The prompt text for a conversation, as `apply_chat_template(..., tokenize=False)` gives it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").expect("added at construction");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| Error::invalid(format!("chat template: {e}")))
    }
}
