//! Chat templates with Hugging Face semantics: the Jinja template from `tokenizer_config.json`,
//! rendered as transformers' `apply_chat_template` renders it: with `messages`, `tools`,
//! `documents`, `add_generation_prompt`, the special tokens and any extra template variables
//! (`enable_thinking`, ...), in a Jinja environment configured as transformers configures it
//! (trim_blocks, lstrip_blocks, Python string methods and `str()`, its `tojson`,
//! `raise_exception`, `strftime_now` and `{% generation %}` blocks).

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::{Error, Result};

/// Where conversions store tokenizer_config.json inside a package.
pub const TOKENIZER_CONFIG_PATH: &str = "Data/ai.corelm/tokenizer_config.json";

/// One message of a conversation: a role, its content (text, or a list of parts such as
/// `{"type": "text", "text": ...}`), and whatever else the template may read (`tool_calls`,
/// `reasoning_content`, `name`, ...). A message may have no content (an assistant turn that only
/// calls tools): null or missing, the template sees no `content` key, as with transformers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Json,
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: Json::String(content.into()), extra: Map::new() }
    }
}

/// What a rendering passes the template besides the messages.
#[derive(Clone, Debug, Default)]
pub struct TemplateArgs {
    pub add_generation_prompt: bool,
    /// JSON schemas of the tools the model may call.
    pub tools: Option<Vec<Json>>,
    pub documents: Option<Vec<Json>>,
    /// Extra variables (`enable_thinking`, ...), which may also override the special tokens.
    pub variables: Map<String, Json>,
}

/// Names a message's reasoning travels under; transformers copies the first one given to
/// `reasoning_content` (which most templates read) and `thinking` (which gpt-oss's reads).
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// A message as the template sees it: keys whose value is null dropped (templates handle a
/// missing key, not a None), reasoning under its aliases.
fn template_message(m: &Message) -> Json {
    let mut out = Map::new();
    out.insert("role".into(), Json::String(m.role.clone()));
    out.insert("content".into(), m.content.clone());
    out.extend(m.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    out.retain(|_, v| !v.is_null());
    let reasoning = REASONING_FIELDS.iter().find_map(|k| out.get(*k)).cloned();
    if let Some(r) = reasoning {
        out.entry("thinking").or_insert(r.clone());
        out.insert("reasoning_content".into(), r);
    }
    Json::Object(out)
}

/// The largest tokenizer_config.json read: templates are kilobytes, added-token tables megabytes.
pub const MAX_TOKENIZER_CONFIG_BYTES: u64 = 64 << 20;

pub struct ChatTemplate {
    env: Environment<'static>,
    /// The special tokens transformers hands every template (`bos_token`, ...).
    special_tokens: Map<String, Json>,
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

/// The special tokens of a tokenizer_config.json, as strings (AddedToken objects give their
/// `content`); `bos_token` and `eos_token` always, empty when the config has none.
fn special_tokens(config: &Json) -> Map<String, Json> {
    let mut out = Map::new();
    for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        let token = match &config[key] {
            Json::String(s) => Some(s.clone()),
            v => v["content"].as_str().map(str::to_string),
        };
        match token {
            Some(t) => {
                out.insert(key.into(), Json::String(t));
            }
            None if key == "bos_token" || key == "eos_token" => {
                out.insert(key.into(), Json::String(String::new()));
            }
            None => {}
        }
    }
    out
}

impl ChatTemplate {
    /// Reads the template from a tokenizer_config.json; `Ok(None)` if it has none.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<ChatTemplate>> {
        let text = corelm_format::package::read_capped(path, MAX_TOKENIZER_CONFIG_BYTES)?;
        let config: Json =
            serde_json::from_slice(&text).map_err(|e| Error::malformed(path, format!("not valid JSON: {e}")))?;
        let source = match &config["chat_template"] {
            Json::String(s) => s.clone(),
            // A list of named templates: use "default".
            Json::Array(list) => match list.iter().find(|t| t["name"] == "default") {
                Some(t) => t["template"].as_str().unwrap_or_default().to_string(),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        ChatTemplate::new(source, special_tokens(&config), &path.display().to_string()).map(Some)
    }

    /// A template from its source; `special_tokens` as transformers passes them (`bos_token`, ...).
    pub fn new(source: String, special_tokens: Map<String, Json>, origin: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // The template is a stranger's program: bound its run time (docs/security.md).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_filter("tojson", crate::jinja_py::tojson);
        // Values become text as Python's str() writes them.
        env.set_formatter(crate::jinja_py::formatter);
        env.add_filter("string", crate::jinja_py::string);
        env.add_filter("upper", crate::jinja_py::upper);
        env.add_filter("lower", crate::jinja_py::lower);
        env.add_filter("join", crate::jinja_py::join);
        env.add_function(crate::jinja_py::GENERATION_CALLEE, crate::jinja_py::generation_block);
        let source = crate::jinja_py::rewrite_generation_blocks(&source);
        env.add_template_owned("chat", source)
            .map_err(|e| Error::invalid(format!("chat template of {origin} does not parse: {e}")))?;
        let mut template = ChatTemplate { env, special_tokens, origin: origin.to_string() };
        template.set_now(None);
        Ok(template)
    }

    /// Pins the instant `strftime_now` reads (Unix seconds, formatted as UTC), so that a dated
    /// template renders the same prompt every time; `None` goes back to the system clock.
    pub fn set_now(&mut self, unix: Option<i64>) {
        self.env.add_function("strftime_now", move |format: String| {
            let now = unix.unwrap_or_else(|| {
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64
            });
            crate::jinja_py::strftime(&format, now)
        });
    }

    /// The prompt text for a conversation, as `apply_chat_template(..., tokenize=False)` gives it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, &TemplateArgs { add_generation_prompt, ..TemplateArgs::default() })
    }

    /// [`render`](Self::render) with tools, documents and extra variables. A template that runs
    /// past [`TEMPLATE_FUEL`] instructions or writes more than its inputs plus
    /// [`TEMPLATE_OUTPUT_SLACK`] (four times over) is stopped with an error naming it.
    pub fn render_with(&self, messages: &[Message], args: &TemplateArgs) -> Result<String> {
        let template = self.env.get_template("chat").expect("added at construction");
        let messages: Vec<Json> = messages.iter().map(template_message).collect();
        let mut vars = self.special_tokens.clone();
        vars.insert("messages".into(), Json::Array(messages));
        vars.insert("tools".into(), args.tools.clone().map_or(Json::Null, Json::Array));
        vars.insert("documents".into(), args.documents.clone().map_or(Json::Null, Json::Array));
        vars.insert("add_generation_prompt".into(), Json::Bool(args.add_generation_prompt));
        vars.extend(args.variables.iter().map(|(k, v)| (k.clone(), v.clone())));
        let input = serde_json::to_string(&vars).map(|s| s.len()).unwrap_or(0);
        let mut out = CappedText { text: Vec::new(), limit: 4 * input + TEMPLATE_OUTPUT_SLACK };
        template.render_captured_to(Value::from_serialize(&vars), &mut out).map_err(|e| {
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
