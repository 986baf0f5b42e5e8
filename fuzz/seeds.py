#!/usr/bin/env python3
"""Seeds the fuzz corpora from inputs the repository has, plus a few small crafted files.

    python3 fuzz/seeds.py PACKAGES_DIR CORPUS_DIR

PACKAGES_DIR holds the sample packages (`cargo run -p corelm-format --example write_samples`);
CORPUS_DIR gets one folder per fuzz target. Standard library only: the GGUF, safetensors and tar
files are written by hand here, small, so mutations stay cheap. Deterministic.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny"
GGUF_FIXTURES = ROOT / "crates" / "corelm-convert" / "tests" / "fixtures" / "gguf"
COREMLTOOLS = ROOT / "tests" / "fixtures" / "coremltools"
MODELS = ROOT / ".cache" / "models"
TEMPLATES = ROOT / "tests" / "fixtures" / "templates"
# In write_all's order: the package_plan target picks a sample by its first byte.
SAMPLES = ["kv_cache", "palettized", "multifunction", "op_zoo"]

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
    "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def put(corpus: Path, target: str, name: str, data: bytes) -> None:
    d = corpus / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# --- GGUF ---------------------------------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}
# ggml type: (id, elements per block, bytes per block)
GGML = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q8_0": (8, 32, 34),
        "BF16": (30, 1, 2)}


def gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(ty: int, v) -> bytes:
    if ty == STR:
        return gguf_str(v)
    if ty == ARR:
        elem, items = v
        return struct.pack("<IQ", elem, len(items)) + b"".join(gguf_value(elem, x) for x in items)
    return struct.pack("<" + SCALAR[ty], v)


def f16(x: float) -> bytes:
    return struct.pack("<e", x)


def tensor_bytes(rng: random.Random, kind: str, n: int) -> bytes:
    _, block, _ = GGML[kind]
    small = lambda: rng.uniform(-0.1, 0.1)
    if kind == "F32":
        return b"".join(struct.pack("<f", small()) for _ in range(n))
    if kind == "F16":
        return b"".join(f16(small()) for _ in range(n))
    if kind == "BF16":
        return b"".join(struct.pack("<f", small())[2:] for _ in range(n))
    out = b""
    for _ in range(n // block):
        if kind == "Q4_0":
            out += f16(0.01) + bytes(rng.randrange(256) for _ in range(16))
        elif kind == "Q4_1":
            out += f16(0.01) + f16(-0.08) + bytes(rng.randrange(256) for _ in range(16))
        elif kind == "Q8_0":
            out += f16(0.001) + bytes(rng.randrange(256) for _ in range(32))
    return out


def gguf_file(kvs: list, tensors: list, alignment: int = 32) -> bytes:
    """kvs: (key, type, value); tensors: (name, ggml dims (row length first), kind)."""
    rng = random.Random(20240611)
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, ty, v in kvs:
        out += gguf_str(key) + struct.pack("<I", ty) + gguf_value(ty, v)
    data, offsets = b"", []
    for name, ne, kind in tensors:
        data += b"\0" * (-len(data) % alignment)
        offsets.append(len(data))
        n = 1
        for d in ne:
            n *= d
        data += tensor_bytes(rng, kind, n)
    for (name, ne, kind), off in zip(tensors, offsets):
        out += gguf_str(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", GGML[kind][0], off)
    out += b"\0" * (-len(out) % alignment)
    return out + data


def tiny_llama_gguf() -> bytes:
    """A whole one-layer llama (32 wide, 4 heads, 2 KV heads) with a byte-level BPE vocabulary of
    16 tokens and a ChatML template; F32/F16/BF16/Q4_0/Q4_1/Q8_0 weights. `corelm convert` takes it."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "d", "e", "h", "l", "o",
              "Ġ", "Ċ", "ab", "Ġa", "he"]
    kvs = [
        ("general.architecture", STR, "llama"),
        ("general.name", STR, "fuzz-tiny-llama"),
        ("llama.context_length", U32, 64),
        ("llama.embedding_length", U32, 32),
        ("llama.feed_forward_length", U32, 64),
        ("llama.block_count", U32, 1),
        ("llama.attention.head_count", U32, 4),
        ("llama.attention.head_count_kv", U32, 2),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("llama.rope.freq_base", F32, 10000.0),
        ("tokenizer.ggml.model", STR, "gpt2"),
        ("tokenizer.ggml.pre", STR, "smollm"),
        ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        ("tokenizer.ggml.token_type", ARR, (I32, [3, 3, 3] + [1] * (len(tokens) - 3))),
        ("tokenizer.ggml.merges", ARR, (STR, ["a b", "Ġ a", "h e"])),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.padding_token_id", U32, 0),
        ("tokenizer.ggml.add_bos_token", BOOL, False),
        ("tokenizer.chat_template", STR, CHATML),
    ]
    h, ffn, kv = 32, 64, 16
    tensors = [
        ("token_embd.weight", [h, len(tokens)], "Q8_0"),
        ("output_norm.weight", [h], "F32"),
        ("blk.0.attn_norm.weight", [h], "F32"),
        ("blk.0.attn_q.weight", [h, h], "Q4_0"),
        ("blk.0.attn_k.weight", [h, kv], "Q4_1"),
        ("blk.0.attn_v.weight", [h, kv], "Q8_0"),
        ("blk.0.attn_output.weight", [h, h], "F16"),
        ("blk.0.ffn_norm.weight", [h], "F32"),
        ("blk.0.ffn_gate.weight", [h, ffn], "Q4_0"),
        ("blk.0.ffn_up.weight", [h, ffn], "BF16"),
        ("blk.0.ffn_down.weight", [ffn, h], "Q8_0"),
    ]
    return gguf_file(kvs, tensors)


def gguf_chat_templates(path: Path) -> list[str]:
    """`tokenizer.chat_template` of a GGUF file, reading only its metadata."""
    found = []
    with path.open("rb") as f:

        def read(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def string():
            return f.read(read("Q")).decode("utf-8", "replace")

        def value(ty):
            if ty == STR:
                return string()
            if ty == ARR:
                elem, n = read("I"), read("Q")
                if elem in SCALAR:
                    f.seek(n * struct.calcsize("<" + SCALAR[elem]), 1)
                else:
                    for _ in range(n):
                        value(elem)
                return None
            return read(SCALAR[ty])

        if f.read(4) != b"GGUF":
            return found
        read("I")
        _, n_kv = read("Q"), read("Q")
        for _ in range(n_kv):
            key = string()
            v = value(read("I"))
            if key == "tokenizer.chat_template":
                found.append(v)
                break
    return found


# --- safetensors --------------------------------------------------------------------------------


def safetensors_file(tensors: list) -> bytes:
    """tensors: (name, dtype, shape, bytes)."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def crafted_safetensors() -> bytes:
    rng = random.Random(7)
    return safetensors_file([
        ("w.f32", "F32", [2, 3], b"".join(struct.pack("<f", rng.uniform(-1, 1)) for _ in range(6))),
        ("w.f16", "F16", [4], b"".join(f16(rng.uniform(-1, 1)) for _ in range(4))),
        ("w.bf16", "BF16", [2, 2], b"".join(struct.pack("<f", rng.uniform(-1, 1))[2:] for _ in range(4))),
        ("w.i64", "I64", [1], struct.pack("<q", 3)),
        ("empty", "F32", [0, 4], b""),
    ])


# --- bundles ------------------------------------------------------------------------------------


def package_files(pkg: Path) -> list[tuple[str, Path]]:
    """(bundle path, file), walked as bundle.rs walks: names sorted at each level."""
    out = []

    def walk(d: Path, rel: str):
        for e in sorted(d.iterdir(), key=lambda p: p.name.encode()):
            r = f"{rel}/{e.name}"
            if e.is_dir():
                walk(e, r)
            else:
                out.append((r, e))

    walk(pkg, pkg.name)
    return out


def bundle_manifest(pkg: Path) -> bytes:
    files = []
    for rel, path in package_files(pkg):
        data = path.read_bytes()
        files.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    m = {"format": 1, "model_id": f"corelm/sample-{pkg.stem}", "version": "", "minimum_os": "iOS 18",
         "package": pkg.name, "files": files}
    return json.dumps(m, indent=2).encode()


def bundle_tar(pkg: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:

        def add(name: str, data: bytes):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))

        add("bundle.json", bundle_manifest(pkg))
        for rel, path in package_files(pkg):
            add(rel, path.read_bytes())
    return buf.getvalue()


# --- calls --------------------------------------------------------------------------------------


def tensor(shape, dtype, data):
    return {"shape": shape, "dtype": dtype, "data": data}


def mask(rows: int, start: int, width: int):
    """Causal mask rows for queries at start..start+rows over width positions."""
    return [0.0 if col <= start + r else "-inf" for r in range(rows) for col in range(width)]


def kv_cache_calls() -> bytes:
    rng = random.Random(3)
    x = lambda n: [round(rng.uniform(-1, 1), 3) for _ in range(n * 8)]
    calls = [
        {"x": tensor([1, 2, 8], "fp16", x(2)), "position": tensor([1], "int32", [0]),
         "causalMask": tensor([1, 1, 2, 16], "fp16", mask(2, 0, 16))},
        {"x": tensor([1, 1, 8], "fp16", x(1)), "position": tensor([1], "int32", [2]),
         "causalMask": tensor([1, 1, 1, 16], "fp16", mask(1, 2, 16))},
    ]
    return json.dumps(calls).encode()


def other_calls() -> bytes:
    calls = [
        {"inputIds": tensor([1, 4], "int32", [1, 5, 63, 0])},
        {"inputIds": tensor([1, 1], "int32", [7])},
        {"x": tensor([4, 16], "fp32", [i / 16 - 2 for i in range(64)])},
        {"flag": tensor([2], "bool", [True, False]), "big": tensor([1], "fp32", ["inf"])},
    ]
    return json.dumps(calls).encode()


def main() -> None:
    packages, corpus = Path(sys.argv[1]), Path(sys.argv[2])
    model_gguf = tiny_llama_gguf()

    # gguf
    put(corpus, "gguf", "tiny_llama.gguf", model_gguf)
    # The small fixtures only: quants.gguf already holds a tensor of every block type, and the
    # model-sized ones (grids.gguf, tiny_gpt2.gguf, hundreds of KB) slow every exec ~10x.
    for f in sorted(GGUF_FIXTURES.glob("*.gguf")):
        if f.stat().st_size <= 64 * 1024:
            put(corpus, "gguf", f.name, f.read_bytes())

    # safetensors, config_json
    put(corpus, "safetensors", "crafted.safetensors", crafted_safetensors())
    for d in sorted(TINY.iterdir()):
        put(corpus, "safetensors", d.name, (d / "model.safetensors").read_bytes())
        put(corpus, "config_json", d.name, (d / "config.json").read_bytes())

    # tokenizer: tokenizer.json files, GGUF vocabularies, tokenizer_config.json files
    templates = [CHATML, LLAMA2, GEMMA]
    # Real templates (Qwen3, Gemma 3, 3n and 4, SmolLM3 with its {% generation %} blocks).
    for f in sorted(TEMPLATES.glob("*.json")):
        doc = json.loads(f.read_text())
        if isinstance(doc, dict) and "template" in doc:
            templates.append(doc["template"])
    for m in sorted(MODELS.glob("*.gguf")) if MODELS.is_dir() else []:
        templates += gguf_chat_templates(m)
    for f in sorted(GGUF_FIXTURES.glob("*.tokenizer.json")):
        put(corpus, "tokenizer", f.name, f.read_bytes())
    for f in sorted(GGUF_FIXTURES.glob("tok_*.gguf")):
        put(corpus, "tokenizer", f.name, f.read_bytes())
    put(corpus, "tokenizer", "tiny_llama.gguf", model_gguf)
    for i, t in enumerate(templates):
        config = {"add_bos_token": False, "bos_token": "<s>", "eos_token": {"content": "</s>", "special": True},
                  "chat_template": t, "model_max_length": 2048}
        put(corpus, "tokenizer", f"tokenizer_config_{i}.json", json.dumps(config, indent=2).encode())
    put(corpus, "tokenizer", "tokenizer_config_list.json",
        json.dumps({"chat_template": [{"name": "default", "template": CHATML}], "bos_token": "<s>"}).encode())

    # chat_template: TEMPLATE \0 MESSAGES
    for i, t in enumerate(templates):
        put(corpus, "chat_template", f"template_{i}", t.encode() + b"\0" + json.dumps(MESSAGES).encode())
        put(corpus, "chat_template", f"template_{i}_user", t.encode() + b"\0" + json.dumps(MESSAGES[1:2]).encode())

    # bundle_json, bundle_tar, package_plan
    for i, name in enumerate(SAMPLES):
        pkg = packages / f"{name}.mlpackage"
        put(corpus, "bundle_json", name, bundle_manifest(pkg))
        put(corpus, "bundle_tar", f"{name}.tar", bundle_tar(pkg))
        put(corpus, "package_plan", name, bytes([i]) + (pkg / "Data/com.apple.CoreML/model.mlmodel").read_bytes())

    # predict_calls
    for f in ["calls.json", "calls_fp32.json"]:
        put(corpus, "predict_calls", f, (COREMLTOOLS / f).read_bytes())
    put(corpus, "predict_calls", "kv_cache_calls.json", kv_cache_calls())
    put(corpus, "predict_calls", "other_calls.json", other_calls())


if __name__ == "__main__":
    main()
