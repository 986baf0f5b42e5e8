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

/// The largest tokenizer_config.json read: templates are kilobytes, added-token tables megabytes.
pub const MAX_TOKENIZER_CONFIG_BYTES: u64 = 64 << 20;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Where the template came from, for messages.
    origin: String,
}

/// Instructions one rendering may execute. Real templates take a few hundred per message (a
/// 1000-message conversation through SmolLM2's template takes about 0.3 M); a template that
/// loops without end stops here, in well under a second.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// What one rendering may produce beyond the messages themselves: the template's own text
/// stays far below this.
pub const TEMPLATE_OUTPUT_SLACK: usize = 1 << 20;

/// Writes into a string, refusing to grow past `limit` bytes.
struct CappedText {
    text: Vec<u8>,
    limit: usize,
}

impl std::io::Write for CappedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.limit {
            return Err(std::io::Error::other(format!("the rendered prompt would exceed {} bytes", self.limit)));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
        let text = corelm_format::package::read_capped(path, MAX_TOKENIZER_CONFIG_BYTES)?;
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
        // The template is a stranger's program: bound its run time (docs/security.md).
        env.set_fuel(Some(TEMPLATE_FUEL));
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
            origin: path.display().to_string(),
        }))
    }

    /// The prompt text for a conversation, as `apply_chat_template(..., tokenize=False)` gives it.
    /// A template that runs past [`TEMPLATE_FUEL`] instructions or writes more than the messages
    /// plus [`TEMPLATE_OUTPUT_SLACK`] (four times over) is stopped with an error naming it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").expect("added at construction");
        let content: usize = messages.iter().map(|m| m.content.len() + m.role.len()).sum();
        let mut out = CappedText { text: Vec::new(), limit: 4 * content + TEMPLATE_OUTPUT_SLACK };
        let context = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        template.render_captured_to(context, &mut out).map_err(|e| {
            let why = match e.kind() {
                ErrorKind::OutOfFuel => {
                    format!("it ran past {TEMPLATE_FUEL} instructions (an endless or runaway loop?)")
                }
                ErrorKind::WriteFailure => format!("its output would exceed {} bytes", out.limit),
                _ => e.to_string(),
            };
            Error::invalid(format!("chat template of {} cannot be rendered: {why}", self.origin))
        })?;
        String::from_utf8(out.text)
            .map_err(|_| Error::invalid(format!("chat template of {}: output is not UTF-8", self.origin)))
    }
}
