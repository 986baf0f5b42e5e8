//! Real chat templates (Qwen3's: system prompt, tools, tool calls and responses, reasoning, the
//! `enable_thinking` switch; Gemma 3's: system folded into the first turn, content as a list of
//! parts) render byte for byte what transformers' `apply_chat_template` renders
//! (tests/fixtures/templates, written by python/make_template_fixtures.py).

use std::path::PathBuf;

use corelm_runtime::chat::{ChatTemplate, Message, TemplateArgs};
use serde_json::{Map, Value};

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/templates").join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn real_templates_render_as_transformers_does() {
    let mut rendered = 0;
    for name in ["qwen3.json", "gemma3.json"] {
        let doc = fixture(name);
        let specials: Map<String, Value> = ["bos_token", "eos_token", "unk_token", "pad_token"]
            .iter()
            .filter_map(|k| doc.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        let template = ChatTemplate::new(doc["template"].as_str().unwrap().to_string(), specials, name).unwrap();
        for (i, case) in doc["cases"].as_array().unwrap().iter().enumerate() {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let args = TemplateArgs {
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
                tools: case.get("tools").map(|t| t.as_array().unwrap().clone()),
                documents: None,
                variables: case.get("kwargs").and_then(Value::as_object).cloned().unwrap_or_default(),
            };
            let got = template.render_with(&messages, &args).unwrap();
            assert_eq!(got, case["rendered"].as_str().unwrap(), "{name} case {i}");
            rendered += 1;
        }
    }
    assert!(rendered >= 10);
}

/// `tojson` writes what `json.dumps` writes: Python's spacing, escapes and float forms, with
/// each argument transformers' filter takes.
#[test]
fn tojson_is_pythons_json_dumps() {
    let doc = fixture("tojson.json");
    for case in doc["cases"].as_array().unwrap() {
        let args: Vec<String> = case["kwargs"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| match v {
                Value::Array(pair) => format!("{k}=({}, {})", pair[0], pair[1]),
                other => format!("{k}={}", other.to_string().replace("true", "True")),
            })
            .collect();
        let source = format!("{{{{ value | tojson({}) }}}}", args.join(", "));
        let template = ChatTemplate::new(source.clone(), Map::new(), "tojson").unwrap();
        let variables = Map::from_iter([("value".to_string(), doc["value"].clone())]);
        let got = template.render_with(&[], &TemplateArgs { variables, ..TemplateArgs::default() }).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "{source}");
    }
}
