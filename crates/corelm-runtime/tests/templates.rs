//! Real chat templates render byte for byte what transformers' `apply_chat_template` renders, and
//! fail where it fails (tests/fixtures/templates, written by python/make_template_fixtures.py):
//! Qwen3's (system prompt, tools, tool calls and responses, reasoning, `enable_thinking`), Gemma
//! 3's and Gemma 3n's (system folded into the first turn, content as a list of parts, media
//! tokens, the alternation check), Gemma 4's (thinking, tool declarations, calls and responses,
//! reasoning kept or stripped) and SmolLM3's (`/think` and `/no_think`, `/system_override`,
//! `strftime_now`, tools written with Python's `str`, `{% generation %}` blocks).

use std::path::PathBuf;

use corelm_runtime::chat::{ChatTemplate, Message, TemplateArgs};
use serde_json::{Map, Value};

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/templates")
}

fn fixture(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixtures_dir().join(name)).unwrap()).unwrap()
}

/// Every fixture that holds a template and its cases.
fn template_fixtures() -> Vec<(String, Value)> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    names.into_iter().map(|n| (n.clone(), fixture(&n))).filter(|(_, doc)| doc.get("template").is_some()).collect()
}

#[test]
fn real_templates_render_as_transformers_does() {
    let mut rendered = 0;
    let mut failed = Vec::new();
    let fixtures = template_fixtures();
    let names: Vec<&str> = fixtures.iter().map(|(n, _)| n.as_str()).collect();
    for expected in ["qwen3.json", "gemma3.json", "gemma3n.json", "gemma4.json", "gemma4_31b.json", "smollm3.json"] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    for (name, doc) in &fixtures {
        let specials: Map<String, Value> = ["bos_token", "eos_token", "unk_token", "pad_token"]
            .iter()
            .filter_map(|k| doc.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        let mut template = ChatTemplate::new(doc["template"].as_str().unwrap().to_string(), specials, name).unwrap();
        template.set_now(doc.get("now").and_then(Value::as_i64));
        for (i, case) in doc["cases"].as_array().unwrap().iter().enumerate() {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let args = TemplateArgs {
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
                tools: case.get("tools").map(|t| t.as_array().unwrap().clone()),
                documents: None,
                variables: case.get("kwargs").and_then(Value::as_object).cloned().unwrap_or_default(),
            };
            let got = template.render_with(&messages, &args);
            match (case.get("rendered").and_then(Value::as_str), case.get("error").and_then(Value::as_str), got) {
                (Some(want), _, Ok(got)) if got == want => {}
                (Some(want), _, got) => failed.push(format!("{name} case {i}: want\n{want}\n--- got\n{got:?}")),
                (None, Some(message), Err(e)) if e.to_string().contains(message) => {}
                (None, Some(message), got) => {
                    failed.push(format!("{name} case {i}: want an error with {message:?}, got {got:?}"))
                }
                _ => panic!("{name} case {i} has neither `rendered` nor `error`"),
            }
            rendered += 1;
        }
    }
    assert!(failed.is_empty(), "{} of {rendered} cases differ:\n\n{}", failed.len(), failed.join("\n\n"));
    assert!(rendered >= 40);
}

/// One-line templates for the Python behaviours of Jinja2 that minijinja does not share: `str()`
/// of values (`{{ }}`, `string`, `join`, `upper`, `lower`), `repr` of strings, `{% generation %}`
/// blocks, loop controls, namespaces, string methods, `raise_exception`.
#[test]
fn python_behaviours_match_transformers() {
    let doc = fixture("jinja_py.json");
    let mut failed = Vec::new();
    let cases = doc["cases"].as_array().unwrap();
    for case in cases {
        let source = case["template"].as_str().unwrap();
        let got = ChatTemplate::new(source.to_string(), Map::new(), "snippet").and_then(|t| {
            let variables = case["variables"].as_object().unwrap().clone();
            t.render_with(&[], &TemplateArgs { variables, ..TemplateArgs::default() })
        });
        match (case.get("rendered").and_then(Value::as_str), got) {
            (Some(want), Ok(got)) if got == want => {}
            (None, Err(e)) if e.to_string().contains(case["error"].as_str().unwrap()) => {}
            (want, got) => failed.push(format!("{source:?}\n want {want:?}\n  got {got:?}")),
        }
    }
    assert!(failed.is_empty(), "{} of {} differ:\n{}", failed.len(), cases.len(), failed.join("\n"));
    assert!(cases.len() >= 9);
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
