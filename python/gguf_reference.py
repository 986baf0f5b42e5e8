#!/usr/bin/env python3
"""Writes the GGUF test fixtures of corelm-convert, from an independent implementation.

    python python/gguf_reference.py [OUT_DIR] [--hf-tokenizers]

OUT_DIR defaults to crates/corelm-convert/tests/fixtures/gguf. Everything is generated with a
fixed seed and is byte-for-byte reproducible with the pinned `gguf` package (requirements.txt).

quants.gguf
    Random tensors of every type the PyPI `gguf` package can quantize (F32, F16, BF16, Q4_0, Q4_1,
    Q5_0, Q5_1, Q8_0), quantized with `gguf.quants.quantize`; and random but valid blocks (finite
    f16 scales, random bits everywhere else) for the types it can only dequantize: K-quants (Q2_K,
    Q3_K, Q4_K, Q5_K, Q6_K), IQ4_NL, IQ4_XS, and (last) the lattice i-quants (IQ1_S, IQ1_M,
    IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S), TQ1_0, TQ2_0, MXFP4 and NVFP4. Also a 3-d tensor, a
    Q/K-permuted tensor and one metadata entry of every value type. The data section is aligned to
    64 (general.alignment).
quants.expected.f32 / quants.expected.json
    `gguf.quants.dequantize` of every tensor, as little-endian f32 concatenated in manifest order;
    the manifest gives name, type, shape (row-major) and the offset in floats.
grids.gguf
    A small llama whose matrices use every block type corelm carries into Core ML (see
    write_grid_model): converted with and without --dequantize by the CLI tests.
tiny_<fixture>.gguf
    tests/fixtures/tiny/<fixture> as llama.cpp's convert_hf_to_gguf.py writes it, for GPT-2,
    SmolLM3, Granite, Granite 4 dense (written as `granite`; see granite4_hparams) and hybrid
    (Granite 4.0-H, `granitehybrid`; granite_hybrid_checkpoint_tensors), OLMo 2,
    OLMo 3, Phi-4-mini's LongRoPE, Gemma 3n and Gemma 4 (text; see write_tiny_gguf and
    gemma3n_hparams / gemma4_hparams), and the hybrids LFM2 and Qwen3.5 (qwen3_5_text; see
    lfm2_hparams / qwen35_hparams).
tok_*.gguf
    Vocabulary-only files for the tokenizer builders (byte-level BPE, SentencePiece with scores,
    Gemma 3, Phi-3).
tok_*.tokenizer.json (only with --hf-tokenizers)
    What transformers' GGUF loader builds from those files (`AutoTokenizer.from_pretrained(dir,
    gguf_file=...)`, backend tokenizer serialized). Needs `pip install transformers`; works
    without torch (a stub module stands in for it, only metadata is read).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from statistics import NormalDist

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "crates" / "corelm-convert" / "tests" / "fixtures" / "gguf"
SEED = 20240611


def f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def random_k_blocks(rng: np.random.Generator, qtype: T, n_blocks: int, scale: float = 0.02) -> np.ndarray:
    """Random blocks with random bits and finite f16 scales (normal, std `scale`) at the places
    the layout keeps them."""
    from gguf.constants import GGML_QUANT_SIZES

    _, size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    d = f16_bytes(rng.normal(0, scale, size=n_blocks))
    dmin = f16_bytes(np.abs(rng.normal(0, scale, size=n_blocks)))
    if qtype == T.Q2_K:  # scales[16] qs[64] d dmin
        b[:, 80:82], b[:, 82:84] = d, dmin
    elif qtype == T.Q3_K:  # hmask[32] qs[64] scales[12] d
        b[:, 108:110] = d
    elif qtype in (T.Q4_K, T.Q5_K):  # d dmin scales[12] ...
        b[:, 0:2], b[:, 2:4] = d, dmin
    elif qtype == T.Q6_K:  # ql[128] qh[64] scales[16] d
        b[:, 208:210] = d
    elif qtype in (T.IQ4_NL, T.IQ4_XS):  # d ... (IQ4_XS: d scales_h scales_l[4] qs[128])
        b[:, 0:2] = d
    elif qtype in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S):  # d ...
        b[:, 0:2] = d
    elif qtype == T.IQ1_M:  # qs[32] qh[16] scales[4 x u16]: d's 4 nibbles top the 4 words
        bits = d.view("<u2").reshape(n_blocks)
        for k in range(4):
            nibble = ((bits >> (4 * k)) & 0xF).astype(np.uint8)
            b[:, 49 + 2 * k] = (b[:, 49 + 2 * k] & 0x0F) | (nibble << 4)
    elif qtype == T.TQ1_0:  # qs[48] qh[4] d
        b[:, 52:54] = d
    elif qtype == T.TQ2_0:  # qs[64] d
        b[:, 64:66] = d
    elif qtype == T.MXFP4:  # e8m0 exponent, qs[16]: 2^(e-128), here 2^-18..2^7, and the two
        # sub-f32-normal codes 0 and 1 (gguf's e8m0_to_fp32_half special-cases them)
        b[:, 0] = rng.integers(110, 136, size=n_blocks, dtype=np.uint8)
        b[:2, 0] = [0, 1]
    elif qtype == T.NVFP4:  # 4 ue4m3 scales, qs[32]: every byte is a valid scale (0x7F: zero)
        pass
    else:
        raise ValueError(qtype)
    return b


LATTICE_TYPES = (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M, T.TQ1_0, T.TQ2_0, T.MXFP4, T.NVFP4)


def write_quants(out: Path) -> None:
    rng = np.random.default_rng(SEED)
    w = GGUFWriter(str(out / "quants.gguf"), "llama")
    w.add_custom_alignment(64)
    # One metadata entry of every value type.
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.1)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo 😀")
    w.add_uint64("test.u64", 18000000000000000000)
    w.add_int64("test.i64", -9000000000000000000)
    w.add_float64("test.f64", 1e300)
    w.add_key_value("test.array_u8", [1, 2, 255], V.ARRAY, sub_type=V.UINT8)
    w.add_key_value("test.array_i16", [-1, 2, -3], V.ARRAY, sub_type=V.INT16)
    w.add_key_value("test.array_f32", [0.5, -1.5], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("test.array_f64", [0.25], V.ARRAY, sub_type=V.FLOAT64)
    w.add_key_value("test.array_bool", [True, False], V.ARRAY, sub_type=V.BOOL)
    w.add_key_value("test.array_u64", [2**63], V.ARRAY, sub_type=V.UINT64)
    w.add_array("test.array_str", ["a", "", "ü"])
    w.add_array("test.nested", [[1, 2], [3]])

    manifest = []
    expected = []

    def add(name: str, data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> None:
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (T.F32, T.F16) else None)
        values = dequantize(data, qtype).astype(np.float32).reshape(shape)
        offset = sum(len(e) for e in expected)
        manifest.append({"name": name, "type": qtype.name, "shape": list(shape), "offset": offset})
        expected.append(values.ravel())

    # Plain types, with special values mixed in.
    specials = np.array([0.0, -0.0, np.inf, -np.inf, 6.1e-5, 3e-8, -2.5e-7, 65504.0, 1e-40, 1.5], dtype=np.float32)
    for qtype, cols in ((T.F32, 40), (T.F16, 40), (T.BF16, 40)):
        x = rng.normal(0, 1, size=(3, cols)).astype(np.float32)
        x[0, : len(specials)] = specials
        data = quantize(x, qtype)
        add(f"plain.{qtype.name}", data, qtype, x.shape)

    # Types gguf can quantize: random weights through its quantizer.
    for qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        x = rng.normal(0, 0.05, size=(4, 128)).astype(np.float32)
        x[1, :32] = 0.0  # an all-zero block
        x[2, 32:64] = np.linspace(-1, 1, 32)
        add(f"quant.{qtype.name}", quantize(x, qtype), qtype, x.shape)

    # K-quants and IQ4: random valid blocks (gguf can dequantize but not quantize them).
    from gguf.constants import GGML_QUANT_SIZES

    for qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS):
        rows, cols = 3, 512
        blocks = random_k_blocks(rng, qtype, rows * cols // GGML_QUANT_SIZES[qtype][0])
        data = blocks.reshape(rows, -1)
        add(f"kquant.{qtype.name}", data, qtype, (rows, cols))

    # A 3-d tensor: GGUF stores ne = (64, 3, 2); the row-major shape is (2, 3, 64).
    x = rng.normal(0, 0.05, size=(2, 3, 64)).astype(np.float32)
    add("shape3d.Q8_0", quantize(x, T.Q8_0), T.Q8_0, x.shape)

    # llama.cpp's Q/K permutation (convert_hf_to_gguf.py LlamaModel.permute) of a known tensor:
    # the reader must undo it to get `permute.original` back.
    n_head, rows, cols = 4, 32, 8
    hf = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    permuted = hf.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    add("permute.original", hf, T.F32, hf.shape)
    add("permute.stored", np.ascontiguousarray(permuted), T.F32, hf.shape)

    # Lattice i-quants, ternary and fp4 types: random valid blocks too. Added last, so the rng
    # draws (and bytes) of everything above stay as they were.
    for qtype in LATTICE_TYPES:
        rows, cols = 4, 512
        blocks = random_k_blocks(rng, qtype, rows * cols // GGML_QUANT_SIZES[qtype][0])
        add(f"lattice.{qtype.name}", blocks.reshape(rows, -1), qtype, (rows, cols))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    np.concatenate(expected).astype("<f4").tofile(out / "quants.expected.f32")
    (out / "quants.expected.json").write_text(json.dumps({"seed": SEED, "tensors": manifest}, indent=1) + "\n")


def byte_alphabet() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_vocab(path: Path, arch: str, model: str, tokens, types, scores=None, merges=None, ids=None, flags=None, pre=None):
    w = GGUFWriter(str(path), arch)
    # Enough of a config for transformers to pick a tokenizer class.
    w.add_uint32(f"{arch}.block_count", 1)
    w.add_uint32(f"{arch}.context_length", 128)
    w.add_uint32(f"{arch}.embedding_length", 64)
    w.add_uint32(f"{arch}.feed_forward_length", 128)
    w.add_uint32(f"{arch}.attention.head_count", 2)
    w.add_uint32(f"{arch}.attention.head_count_kv", 1)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_uint32(f"{arch}.vocab_size", len(tokens))
    w.add_string("tokenizer.ggml.model", model)
    if pre:
        w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_key_value("tokenizer.ggml.token_type", types, V.ARRAY, sub_type=V.INT32)
    if scores is not None:
        w.add_key_value("tokenizer.ggml.scores", scores, V.ARRAY, sub_type=V.FLOAT32)
    if merges is not None:
        w.add_array("tokenizer.ggml.merges", merges)
    for key, value in (ids or {}).items():
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    for key, value in (flags or {}).items():
        w.add_bool(f"tokenizer.ggml.{key}", value)
    w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tokenizers(out: Path) -> list[str]:
    names = []
    # Byte-level BPE (Llama 3 style): alphabet, merges, specials, a user-defined token, a control
    # token outside the byte alphabet (skipped) and a token stored in plain UTF-8 (respelled).
    alpha = byte_alphabet()
    words = ["Ġt", "he", "Ġthe", "in", "Ġa", "an", "Ġan", "er", "ĠĠ", "ĠĠĠĠ", "Ċ", "ĊĊ", "12", "123"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a n", "Ġa n", "e r", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ", "1 2", "12 3"]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tokens = alpha + words + specials + ["<think>", "<｜User｜>", "é"]
    types = [1] * (len(alpha) + len(words)) + [3, 3, 3, 4, 3, 1]
    bos = tokens.index("<|begin_of_text|>")
    eos = tokens.index("<|eot_id|>")
    write_vocab(out / "tok_gpt2.gguf", "llama", "gpt2", tokens, types, merges=merges,
                ids={"bos": bos, "eos": eos}, flags={"add_bos_token": True}, pre="llama-bpe")
    names.append("tok_gpt2")

    # SentencePiece BPE with scores and no merges (Llama 2 / Mistral style).
    pieces = ["▁", "▁t", "he", "▁the", "▁a", "an", "▁an", "in", "▁in", "er", "▁▁", "▁▁▁▁", "ab", "abc", "bc"]
    letters = list("abcdefghijklmnopqrstuvwxyzTHE")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + letters + ["<tool>"]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) + len(letters)) + [4]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))] + [-100.0 - i for i in range(len(letters))] + [0.0]
    write_vocab(out / "tok_llama.gguf", "llama", "llama", tokens, types, scores=scores,
                ids={"bos": 1, "eos": 2, "unknown": 0})
    names.append("tok_llama")
    write_vocab(out / "tok_phi3.gguf", "phi3", "llama", tokens, types, scores=scores,
                ids={"bos": 1, "eos": 2, "unknown": 0}, flags={"add_bos_token": False})
    names.append("tok_phi3")

    # Gemma 3: space-only tokens stored with real spaces, merges from the token order.
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)] + ["\n", "\n\n", "  ", "   ", "▁", "▁t", "he", "▁the"] + letters
    types = [3, 3, 3, 3, 3, 4, 3, 3] + [6] * 256 + [1] * (8 + len(letters))
    scores = [-1000.0] * 8 + [0.0] * 256 + [-float(i) for i in range(8 + len(letters))]
    write_vocab(out / "tok_gemma3.gguf", "gemma3", "llama", tokens, types, scores=scores,
                ids={"bos": 2, "eos": 1, "unknown": 3, "padding": 0}, flags={"add_bos_token": True, "add_eos_token": False})
    names.append("tok_gemma3")
    return names


# grids.gguf: one tensor of every block type Core ML carries, in a small llama model.
GRID_LAYERS = [
    {"attn_q": T.Q2_K, "attn_k": T.Q3_K, "attn_v": T.Q4_K, "attn_output": T.Q5_K,
     "ffn_gate": T.Q6_K, "ffn_up": T.IQ4_NL, "ffn_down": T.IQ4_XS},
    {"attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.Q5_0, "attn_output": T.Q5_1,
     "ffn_gate": T.Q8_0, "ffn_up": T.IQ4_XS, "ffn_down": T.Q4_K},
    {"attn_q": T.IQ2_XXS, "attn_k": T.IQ2_XS, "attn_v": T.IQ2_S, "attn_output": T.IQ3_XXS,
     "ffn_gate": T.IQ3_S, "ffn_up": T.IQ1_S, "ffn_down": T.IQ1_M},
    {"attn_q": T.TQ1_0, "attn_k": T.TQ2_0, "attn_v": T.MXFP4, "attn_output": T.NVFP4,
     "ffn_gate": T.IQ2_XXS, "ffn_up": T.TQ2_0, "ffn_down": T.MXFP4},
]


def write_grid_model(out: Path) -> None:
    """A 2-layer llama (hidden 256, 4 heads, 2 KV heads, MLP 256) whose matrices use every block
    type corelm carries into Core ML (GRID_LAYERS; the embedding is Q6_K): random valid blocks
    with small scales for the types gguf cannot quantize, gguf's quantizer on random weights for
    the others, and the tok_llama SentencePiece vocabulary."""
    from gguf.constants import GGML_QUANT_SIZES

    rng = np.random.default_rng(SEED + 1)
    hidden, ffn, heads, kv_heads = 256, 256, 4, 2
    letters = list("abcdefghijklmnopqrstuvwxyzTHE")
    pieces = ["▁", "▁t", "he", "▁the", "▁a", "an", "▁an", "in", "▁in", "er", "▁▁", "▁▁▁▁", "ab", "abc", "bc"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + letters
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) + len(letters))
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))] + [-100.0 - i for i in range(len(letters))]
    w = GGUFWriter(str(out / "grids.gguf"), "llama")
    w.add_block_count(len(GRID_LAYERS))
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_key_value("tokenizer.ggml.token_type", types, V.ARRAY, sub_type=V.INT32)
    w.add_key_value("tokenizer.ggml.scores", scores, V.ARRAY, sub_type=V.FLOAT32)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)

    def matrix(name: str, qtype: T, rows: int, cols: int) -> None:
        if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
            data = quantize(rng.normal(0, 0.05, size=(rows, cols)).astype(np.float32), qtype)
        else:
            block = GGML_QUANT_SIZES[qtype][0]
            # The block scale that makes weights of about 0.05 (random bits give integers and
            # sub-block scales of these typical sizes), so activations stay in range.
            typical = {T.Q2_K: 12, T.Q3_K: 32, T.Q4_K: 240, T.Q5_K: 480, T.Q6_K: 1000, T.IQ4_NL: 60, T.IQ4_XS: 1000,
                       T.IQ2_XXS: 50, T.IQ2_XS: 50, T.IQ2_S: 50, T.IQ3_XXS: 120, T.IQ3_S: 128, T.IQ1_S: 8,
                       T.IQ1_M: 8, T.TQ1_0: 1, T.TQ2_0: 1, T.MXFP4: 1, T.NVFP4: 1}
            data = random_k_blocks(rng, qtype, rows * cols // block, scale=0.05 / typical[qtype])
            # The fp4 types' scales are exponents (ue4m3 for NVFP4): ones that make weights of
            # about 0.05 (2^-8..2^-4 times values up to 6).
            if qtype == T.MXFP4:
                data[:, 0] = rng.integers(120, 125, size=len(data), dtype=np.uint8)
            elif qtype == T.NVFP4:
                data[:, 0:4] = rng.integers(8, 24, size=(len(data), 4), dtype=np.uint8)
            data = data.reshape(rows, -1)
        w.add_tensor(name, data, raw_dtype=qtype)

    matrix("token_embd.weight", T.Q6_K, len(tokens), hidden)
    w.add_tensor("output_norm.weight", (1 + rng.normal(0, 0.1, size=hidden)).astype(np.float32))
    for layer, kinds in enumerate(GRID_LAYERS):
        p = f"blk.{layer}"
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"{p}.{norm}.weight", (1 + rng.normal(0, 0.1, size=hidden)).astype(np.float32))
        head_dim = hidden // heads
        shapes = {"attn_q": (hidden, hidden), "attn_k": (kv_heads * head_dim, hidden),
                  "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, hidden),
                  "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
        for kind, qtype in kinds.items():
            matrix(f"{p}.{kind}.weight", qtype, *shapes[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors (F32, F16 or BF16), parsed by hand: no torch needed."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        data = raw[8 + n + start : 8 + n + end]
        if t["dtype"] == "BF16":
            a = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(data, dtype={"F32": "<f4", "F16": "<f2"}[t["dtype"]]).astype(np.float32)
        out[name] = a.reshape(t["shape"])
    return out


def rope_parameters(c: dict) -> dict:
    """The rope parameters as convert_hf_to_gguf's TextModel reads them: `rope_parameters`
    (transformers 5: flat, or keyed by layer type), else the older rope_theta + rope_scaling."""
    if "rope_parameters" in c:
        return c["rope_parameters"]
    theta = {"rope_theta": c["rope_theta"]} if "rope_theta" in c else {}
    return {**(c.get("rope_scaling") or {}), **theta}


def text_hparams(w: GGUFWriter, c: dict) -> None:
    """TextModel.set_gguf_parameters, for the keys these configs have."""
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    rope = rope_parameters(c)
    full = rope.get("full_attention", rope)
    if full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    elif full.get("rope_type", "default") != "default":
        raise ValueError(f"rope type {full['rope_type']} is not written here")
    w.add_rope_freq_base(full["rope_theta"])
    if (local := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(local)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    if "head_dim" in c:
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])


def gpt2_hparams(w: GGUFWriter, c: dict) -> list:
    """GPT2Model.set_gguf_parameters."""
    w.add_block_count(c["n_layer"])
    w.add_context_length(c["n_positions"])
    w.add_embedding_length(c["n_embd"])
    w.add_feed_forward_length(c["n_inner"])
    w.add_head_count(c["n_head"])
    w.add_layer_norm_eps(c["layer_norm_epsilon"])
    return []


def llama_hparams(w: GGUFWriter, c: dict) -> list:
    """LlamaModel.set_gguf_parameters (SmolLM3Model adds nothing: llama.cpp hard-codes NoPE on
    every fourth layer)."""
    text_hparams(w, c)
    w.add_vocab_size(c["vocab_size"])
    w.add_rope_dimension_count(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    return []


def granite_hparams(w: GGUFWriter, c: dict) -> list:
    """GraniteModel.set_gguf_parameters: head_dim dropped, the multipliers as scales (each only
    when non-zero)."""
    llama_hparams(w, {k: v for k, v in c.items() if k != "head_dim"})
    granite_scales(w, c)
    return []


def granite_scales(w: GGUFWriter, c: dict) -> None:
    """GraniteModel's multipliers, as scales, each only when non-zero."""
    for key, add in (("attention_multiplier", w.add_attention_scale), ("embedding_multiplier", w.add_embedding_scale),
                     ("residual_multiplier", w.add_residual_scale), ("logits_scaling", w.add_logit_scale)):
        if c.get(key):
            add(c[key])


# transformers 5 names of the layer types GraniteHybridModel.get_attn_layers reads.
LEGACY_LAYER_TYPES = {"full_attention": "attention", "linear_attention": "mamba"}


def granite4_config(c: dict) -> dict:
    """A Granite 4 config as its Hugging Face release spells it, which is what llama.cpp's
    converter reads (GraniteHybridModel, as Mamba2Model, takes config.json as it is, without
    transformers): layer types `attention` / `mamba` (transformers 5 saves them as
    `full_attention` / `linear_attention`, which get_attn_layers does not match: it would take
    every layer for Mamba-2), and, without experts, num_experts_per_tok 0 (transformers' default
    is 2; any non-zero value makes the converter pick `granitemoe`, which has no ffn_gate/ffn_up/
    ffn_down, and fail, and llama.cpp's loader wants no experts used when there are none)."""
    c = dict(c)
    if "layer_types" in c:
        c["layer_types"] = [LEGACY_LAYER_TYPES.get(t, t) for t in c["layer_types"]]
    if not c.get("num_local_experts"):
        c["num_experts_per_tok"] = 0
    return c


def granite_find(c: dict, *keys, optional=False):
    """GraniteHybridModel.find_hparam: the keys, then each under the `mamba_` prefix."""
    for k in list(keys) + [f"mamba_{k}" for k in keys]:
        if k in c:
            return c[k]
    assert optional, keys
    return None


def granite4_hparams(w: GGUFWriter, c: dict) -> list:
    """GraniteHybridModel.set_gguf_parameters (GraniteMoeHybridForCausalLM) for a Granite 4
    without experts, on granite4_config(c). Without Mamba-2 layers the converter renames the
    architecture `granite` (`granitemoe` when num_experts_per_tok is set) before writing any key,
    so every key is `granite.*`; with them (Granite 4.0-H) it stays `granitehybrid`.
    GraniteMoeModel's keys first: TextModel's (feed_forward_length is intermediate_size, not the
    MLP's width; expert_count and expert_used_count, 0 here), then LlamaModel's vocab size (for a
    hybrid padded by Mamba2Model.set_vocab to a multiple of 8; to 1 without Mamba-2 layers) and
    rope dimension count (head_dim dropped by GraniteModel: hidden / heads), Granite's scales and
    shared_intermediate_size as expert_shared_feed_forward_length; then the Mamba-2 keys (ssm.*,
    found under a `mamba_` prefix: conv_kernel = taps, state_size = B/C size, group_count =
    groups, inner_size = expand x hidden, time_step_rank = heads), the KV head count again, now
    one per layer (0 marks a Mamba-2 layer; the key keeps its place and takes the array), and
    rope.scaling.finetuned, llama.cpp's RoPE switch for Granite: true for every model without
    Mamba-2 layers (and for Bamba), whatever position_embedding_type says; when false the context
    length is overwritten (in place) with 2**20. Nothing of time_step_limit is written (llama.cpp's
    scan bounds no time step)."""
    c = granite4_config(c)

    def find(*keys, optional=False):
        return granite_find(c, *keys, optional=optional)

    block_count = c["num_hidden_layers"]
    attn = [i for i, t in enumerate(c["layer_types"]) if t == "attention"]
    ssm = [i for i in range(block_count) if i not in attn]
    assert not c.get("num_local_experts"), "only Granite 4's dense and hybrid models are written here"
    assert w.arch == ("granitehybrid" if ssm else "granite")
    d_model = find("mamba_head_dim", "hidden_size", "d_model")
    d_inner = find("expand", "num_heads") * d_model
    hp = {k: v for k, v in c.items() if k != "head_dim"}  # GraniteModel pops it
    text_hparams(w, hp)
    w.add_expert_count(find("num_local_experts", "num_experts", "n_routed_experts"))
    w.add_expert_used_count(find("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))
    pad = 8 if ssm else 1  # GraniteHybridModel.set_vocab, then Mamba2Model.set_vocab
    assert -(hp["vocab_size"] // -pad) * pad == hp["vocab_size"], "a padded vocabulary is not written here"
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(hp["hidden_size"] // hp["num_attention_heads"])
    granite_scales(w, c)
    if c.get("shared_intermediate_size"):
        w.add_expert_shared_feed_forward_length(c["shared_intermediate_size"])
    w.add_ssm_conv_kernel(find("conv_kernel", "d_conv"))
    w.add_ssm_state_size(find("state_size", "d_state", "state_dim", "ssm_state_size"))
    w.add_ssm_group_count(find("n_groups", "num_groups"))
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_time_step_rank(find("n_heads", "num_heads"))
    kv = find("num_key_value_heads", "n_head_kv")
    assert not c.get("attn_rotary_emb")
    w.add_head_count_kv([kv if i in attn else 0 for i in range(block_count)])
    use_rope = "BambaForCausalLM" in c["architectures"] or not ssm
    w.add_rope_scaling_finetuned(use_rope)
    if not use_rope:
        w.add_context_length(2**20)
    assert c.get("hidden_act") in (None, "silu")
    assert d_inner % (find("d_head", optional=True) or 64) == 0
    return []


def granite4_checkpoint_tensors(tensors: dict[str, np.ndarray], c: dict):
    """GraniteMoeModel.modify_tensors without experts: each fused shared_mlp.input_linear split
    into its gate rows and its up rows (ffn_gate, ffn_up), shared_mlp.output_linear as ffn_down;
    names llama.cpp gives itself (format_tensor_name) come back as GGUF names. The attention
    tensors go on to LlamaModel's (Q/K rows permuted, in gguf_tensor)."""
    n = c["shared_intermediate_size"]
    for name, t in tensors.items():
        if name.endswith("shared_mlp.input_linear.weight"):
            assert t.shape[0] == 2 * n
            bid = int(name.split(".")[2])
            yield f"blk.{bid}.ffn_gate.weight", t[:n]
            yield f"blk.{bid}.ffn_up.weight", t[n:]
        elif name.endswith("shared_mlp.output_linear.weight"):
            yield f"blk.{int(name.split('.')[2])}.ffn_down.weight", t
        else:
            yield name, t


def granite_hybrid_checkpoint_tensors(tensors: dict[str, np.ndarray], c: dict):
    """Mamba2Model.filter_tensors and modify_tensors, which GraniteHybridModel applies to its
    Mamba-2 layers' tensors: dt_bias renamed dt_proj.bias (ssm_dt.bias), the conv kernel
    (channels, 1, taps) squeezed to (channels, taps) (its bias kept as it is), A_log and D
    reshaped to (heads, 1) and A_log stored as -exp(A_log) (computed in float64 and rounded once,
    as for Qwen3.5), the gated norm's gain reshaped to (n_groups, d_inner / n_groups). The
    projections (and their biases, when mamba_proj_bias) go as they are: in_proj's rows stay
    z, xBC, dt."""
    c = granite4_config(c)
    # GraniteHybridModel.__init__'s n_group and d_inner
    n_group = granite_find(c, "n_groups", "num_groups")
    d_inner = granite_find(c, "expand", "num_heads") * granite_find(c, "mamba_head_dim", "hidden_size", "d_model")
    for name, t in tensors.items():
        if ".mamba." in name:
            if name.endswith(".dt_bias"):
                name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
            elif name.endswith(".conv1d.weight"):
                t = t.squeeze()
            elif name.endswith((".A_log", ".D")):
                t = t.reshape(*t.shape, 1)
            elif name.endswith(".norm.weight"):
                t = t.reshape(n_group, d_inner // n_group)
            if name.endswith(".A_log"):
                t = (-np.exp(t.astype(np.float64))).astype(np.float32)
        yield name, t


def olmo2_hparams(w: GGUFWriter, c: dict) -> list:
    """Olmo2Model.set_gguf_parameters (OLMo 2 and 3): the window and a per-layer pattern when the
    config has a sliding_window."""
    text_hparams(w, c)
    if "sliding_window" in c:
        w.add_sliding_window(c["sliding_window"])
        if "layer_types" in c:
            pattern = [t == "sliding_attention" for t in c["layer_types"]]
        else:
            pattern = [(i + 1) % 4 != 0 for i in range(c["num_hidden_layers"])]
        w.add_sliding_window_pattern(pattern)
    return []


def phi3_hparams(w: GGUFWriter, c: dict) -> list:
    """Phi3MiniModel.set_gguf_parameters and generate_extra_tensors: partial rotary as a rope
    dimension count, LongRoPE as an attention factor and two f32 tensors of factors."""
    rope = rope_parameters(c)
    n_embd, n_head = c["hidden_size"], c["num_attention_heads"]
    max_pos, orig = c["max_position_embeddings"], rope["original_max_position_embeddings"]
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    w.add_context_length(max_pos)
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    w.add_sliding_window(c.get("sliding_window") or 0)  # 0 marks Phi-4
    if not rope.get("long_factor"):
        return []
    scale = max_pos / orig
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
    assert len(rope["long_factor"]) == len(rope["short_factor"]) == rope_dims // 2
    return [("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32)),
            ("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))]


def gemma_text_hparams(w: GGUFWriter, c: dict) -> None:
    """TextModel.set_gguf_parameters then Gemma3Model.set_gguf_parameters (Gemma3NModel and
    Gemma4Model call both first), for the keys these configs have. Each key is written once, at the
    place convert_hf_to_gguf first writes it, with the value it ends with: a GGUFWriter key written
    again keeps its place and takes the new value. general.file_type is left out as in the other
    tiny files. Neither rope type here (default; Gemma 4's proportional) writes scaling keys."""
    rope = rope_parameters(c)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])  # Gemma 3n: a per-layer list -> an array
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    assert c.get("attn_logit_softcapping") is None
    if c.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(c["final_logit_softcapping"])
    if c.get("sliding_window_pattern") != 1:
        w.add_sliding_window(c["sliding_window"])


def normal_icdf_f32(p: float) -> float:
    """torch.distributions.Normal(0, 1).icdf(torch.tensor(p, dtype=torch.float32)).item(), as
    Gemma3NModel computes the activation sparsity scale, without torch: sqrt(2) * erfinv(2p - 1)
    in float32, erfinv rounded from double (equal to torch 2.15's float32 kernel for every p in
    0.000, 0.001, ..., 1.000). p = 0 gives -inf."""
    y = np.float32(2) * np.float32(p) - np.float32(1)
    if y <= -1 or y >= 1:
        return math.copysign(math.inf, float(y))
    erfinv = np.float32(NormalDist().inv_cdf((float(y) + 1) / 2) / math.sqrt(2))
    return float(erfinv * np.float32(math.sqrt(2)))


def gemma3n_hparams(w: GGUFWriter, c: dict) -> list:
    """Gemma3NModel.set_gguf_parameters: AltUp, per-layer input width, the KV-sharing count, the
    activation sparsity pattern as normal quantiles and the sliding-window pattern per layer."""
    gemma_text_hparams(w, c)
    assert c["altup_num_inputs"] == 4, "convert_hf_to_gguf only converts 4 AltUp inputs"
    w.add_altup_active_idx(c["altup_active_idx"])
    w.add_altup_num_inputs(c["altup_num_inputs"])
    w.add_embedding_length_per_layer_input(c["hidden_size_per_layer_input"])
    w.add_shared_kv_layers(c["num_kv_shared_layers"])
    w.add_activation_sparsity_scale([normal_icdf_f32(s) for s in c["activation_sparsity_pattern"]])
    w.add_sliding_window_pattern([t == "sliding_attention" for t in c["layer_types"]])
    return []


def gemma4_global(c: dict, key: str, legacy: str):
    """A full-attention-layer value that google's configs give as global_head_dim /
    num_global_key_value_heads and transformers 5 as per_layer_config (one entry per layer that
    differs from the default): convert_hf_to_gguf reads the former."""
    if legacy in c:
        return c[legacy]
    per_layer = c.get("per_layer_config") or {}
    full = [i for i, t in enumerate(c["layer_types"]) if t == "full_attention"]
    values = {per_layer.get(str(i), {}).get(key) for i in full}
    assert len(values) == 1, f"{key} differs between full-attention layers"
    assert all(str(i) not in per_layer for i, t in enumerate(c["layer_types"]) if t != "full_attention")
    return values.pop()


def gemma4_hparams(w: GGUFWriter, c: dict) -> list:
    """Gemma4Model.set_gguf_parameters and generate_extra_tensors: head dims per layer kind (the
    full-attention one as key/value_length, the sliding one as *_swa), the double-wide MLP of the
    KV-sharing layers as a per-layer feed_forward_length, rotary dims per layer kind, and the
    proportional rope of full-attention layers as rope_freqs (1 for the rotated pairs, 1e30 for the
    rest)."""
    head_dim_full = gemma4_global(c, "head_dim", "global_head_dim") or c["head_dim"]
    kv_heads_full = gemma4_global(c, "num_key_value_heads", "num_global_key_value_heads")
    n_layer, n_shared = c["num_hidden_layers"], c["num_kv_shared_layers"]
    swa = [t == "sliding_attention" for t in c["layer_types"]]
    n_ff = c["intermediate_size"]
    if c.get("use_double_wide_mlp", False):  # overwrites TextModel's scalar in place
        n_ff = [n_ff if il < n_layer - n_shared else n_ff * 2 for il in range(n_layer)]
    kv_heads = c["num_key_value_heads"]
    if kv_heads_full is not None:  # overwrites TextModel's scalar in place
        kv_heads = [kv_heads if s else kv_heads_full for s in swa]
    gemma_text_hparams(w, {**c, "intermediate_size": n_ff, "num_key_value_heads": kv_heads, "head_dim": head_dim_full})
    w.add_shared_kv_layers(n_shared)
    w.add_embedding_length_per_layer_input(c.get("hidden_size_per_layer_input") or 0)
    w.add_sliding_window_pattern(swa)
    w.add_key_length_swa(c["head_dim"])
    w.add_value_length_swa(c["head_dim"])
    if (n_ff_exp := c.get("expert_intermediate_size", c.get("moe_intermediate_size"))) is not None:
        w.add_expert_feed_forward_length(n_ff_exp)
    w.add_rope_dimension_count(int(head_dim_full))
    w.add_rope_dimension_count_swa(int(c["head_dim"] * c.get("partial_rotary_factor", 1.0)))
    rope_full = rope_parameters(c)["full_attention"]
    assert rope_full["rope_type"] == "proportional"
    n_rot = int(head_dim_full * rope_full["partial_rotary_factor"] / 2)
    freqs = np.array([1.0] * n_rot + [1e30] * (head_dim_full // 2 - n_rot), dtype=np.float32)
    return [("rope_freqs.weight", freqs)]


def gemma_checkpoint_tensors(arch: str, tensors: dict[str, np.ndarray], c: dict):
    """Gemma3NModel / Gemma4Model.modify_tensors, up to the name lookup: `.weight` appended to the
    scalar parameters (Gemma 3n's *_scale, Gemma 4's layer_scalar); Gemma 3n's token and per-layer
    embeddings padded with zero rows to vocab_size, and its three altup_projections (and
    altup_unembed_projections) stacked into one (3, n, n) tensor, written where the last arrives.
    Norms are stored as they are (norm_shift 0: no +1). convert_hf_to_gguf reads the language model
    of the multimodal layout (model.language_model.*, which it renames to model.*); this text
    checkpoint's model.* names are that language model already."""
    stacks: dict[str, list] = {"altup_projections": [None] * 3, "altup_unembed_projections": [None] * 3}
    for name, t in tensors.items():
        if name.endswith("_scale" if arch == "gemma3n" else ("per_dim_scale", "layer_scalar")):
            name += ".weight"
        if arch == "gemma3n" and ("embed_tokens.weight" in name or "embed_tokens_per_layer" in name):
            if t.shape[0] < c["vocab_size"]:
                t = np.concatenate([t, np.zeros((c["vocab_size"] - t.shape[0], t.shape[1]), t.dtype)])
        elif arch == "gemma3n" and (stack := next((k for k in stacks if f".{k}." in name), None)):
            stacks[stack][int(name.split(f".{stack}.")[1].split(".")[0])] = t
            if all(m is not None for m in stacks[stack]):
                yield f"model.{stack}.weight", np.stack(stacks[stack])
            continue
        yield name, t


def lfm2_feed_forward_length(c: dict) -> int:
    """LFM2Model._add_feed_forward_length: the MLP's width as transformers derives it (with
    block_auto_adjust_ff_dim, two thirds times the multiplier, rounded up to block_multiple_of)."""
    ff = c.get("block_ff_dim", c["intermediate_size"])
    if c["block_auto_adjust_ff_dim"]:
        ff = int(2 * ff / 3)
        if c["block_ffn_dim_multiplier"] is not None:
            ff = int(c["block_ffn_dim_multiplier"] * ff)
        multiple = c["block_multiple_of"]
        ff = multiple * ((ff + multiple - 1) // multiple)
    return ff


def lfm2_hparams(w: GGUFWriter, c: dict) -> list:
    """LFM2Model.set_gguf_parameters (conversion/lfm2.py): TextModel's keys with the KV head
    count one per layer, 0 for a short-convolution layer (llama.cpp's only mark of which layers
    are recurrent); then the vocabulary size, `shortconv.l_cache` (the kernel's taps) and the
    norm epsilon again (`norm_eps`, which TextModel already found), and feed_forward_length
    overwritten in place with the MLP's width (lfm2_feed_forward_length). Each key is written
    once, where it first appears, with its final value. No head_dim, no rope dimension count
    (llama.cpp rotates the whole head); the conv kernel is squeezed to (channels, taps)
    (lfm2_checkpoint_tensors)."""
    rope = rope_parameters(c)
    assert rope.get("rope_type", "default") == "default" and "head_dim" not in c
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(lfm2_feed_forward_length(c))
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv([c["num_key_value_heads"] if t != "conv" else 0 for t in c["layer_types"]])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c["norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    w.add_shortconv_l_cache(c["conv_L_cache"])
    return []


def lfm2_checkpoint_tensors(tensors: dict[str, np.ndarray], c: dict):
    """LFM2Model.modify_tensors: the depthwise kernel (channels, 1, taps) squeezed to 2-d."""
    for name, t in tensors.items():
        assert not name.endswith("conv.conv.bias"), "torch's squeeze(1) fails on it in the converter"
        yield name, (t.squeeze(1) if "conv.conv" in name else t)


def qwen35_hparams(w: GGUFWriter, c: dict) -> list:
    """Qwen3_5TextModel.set_gguf_parameters (conversion/qwen.py; Qwen3NextModel's keys after
    TextModel's): the MRoPE sections padded to four, head_dim as key/value_length; the Gated
    DeltaNet sizes as `ssm.*` (conv_kernel = taps, state_size = key head size, group_count = key
    heads, time_step_rank = value heads, inner_size = value heads x value head size); which
    layers attend only as `full_attention_interval` (hparams' value, default 4, whatever
    layer_types says: asserted to agree here); the rotary dimensions as head_dim x hparams'
    partial_rotary_factor (default 0.25: a transformers 5 config keeps the factor inside
    rope_parameters, asserted to agree). No MTP layers here (mtp_num_hidden_layers would add
    blocks and nextn_predict_layers)."""
    rope = rope_parameters(c)
    layers, head_dim = c["num_hidden_layers"], c["head_dim"]
    interval = c.get("full_attention_interval", 4)
    assert [t == "full_attention" for t in c["layer_types"]] == [(i + 1) % interval == 0 for i in range(layers)]
    partial = c.get("partial_rotary_factor", 0.25)
    assert partial == rope.get("partial_rotary_factor", partial)
    assert rope.get("rope_type", "default") == "default" and not c.get("mtp_num_hidden_layers")
    w.add_block_count(layers)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_dimension_sections((list(rope["mrope_section"]) + [0] * 4)[:4])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_ssm_conv_kernel(c["linear_conv_kernel_dim"])
    w.add_ssm_state_size(c["linear_key_head_dim"])
    w.add_ssm_group_count(c["linear_num_key_heads"])
    w.add_ssm_time_step_rank(c["linear_num_value_heads"])
    w.add_ssm_inner_size(c["linear_value_head_dim"] * c["linear_num_value_heads"])
    w.add_full_attention_interval(interval)
    w.add_rope_dimension_count(int(head_dim * partial))
    return []


def reorder_v_heads(t: np.ndarray, axis: int, num_k_heads: int, num_v_per_k: int, head_dim: int) -> np.ndarray:
    """_LinearAttentionVReorderBase._reorder_v_heads: value heads along `axis` from grouped by
    key head (k0v0, k0v1, k1v0, k1v1) to tiled (k0v0, k1v0, k0v1, k1v1), for ggml's broadcast."""
    shape = list(t.shape)
    t = t.reshape(shape[:axis] + [num_k_heads, num_v_per_k, head_dim] + shape[axis + 1 :])
    return np.ascontiguousarray(np.swapaxes(t, axis, axis + 1)).reshape(shape)


def qwen35_checkpoint_tensors(tensors: dict[str, np.ndarray], c: dict):
    """Qwen3_5TextModel.modify_tensors: first _LinearAttentionVReorderBase's (when key and value
    head counts differ, every Gated DeltaNet tensor's value heads tiled: the V rows of
    in_proj_qkv and of the conv kernel, the rows of in_proj_z, in_proj_a, in_proj_b, A_log and
    dt_bias, the columns of out_proj), then Qwen3NextModel's: A_log stored as -exp(A_log) (here
    computed in float64 and rounded once: torch's float32 exp, which the converter calls, may
    differ from that in the last bit), dt_bias renamed dt_proj.bias, the conv kernel squeezed to
    (channels, taps), and every RMSNorm gain but the DeltaNet output norm's stored as 1 + w
    (float32). q_proj keeps each head's query rows then gate rows, interleaved."""
    kh, vh = c["linear_num_key_heads"], c["linear_num_value_heads"]
    kd, vd = c["linear_key_head_dim"], c["linear_value_head_dim"]
    for name, t in tensors.items():
        if kh != vh and "linear_attn." in name:
            r = vh // kh
            if ".in_proj_qkv." in name or ".conv1d" in name:
                t = t.squeeze() if ".conv1d" in name else t
                t = np.concatenate([t[: 2 * kh * kd], reorder_v_heads(t[2 * kh * kd :], 0, kh, r, vd)])
            elif ".in_proj_z." in name:
                t = reorder_v_heads(t, 0, kh, r, vd)
            elif ".in_proj_b." in name or ".in_proj_a." in name or ".A_log" in name or ".dt_bias" in name:
                t = reorder_v_heads(t, 0, kh, r, 1)
            elif ".out_proj." in name:
                t = reorder_v_heads(t, 1, kh, r, vd)
        if name.endswith(".A_log"):
            t = (-np.exp(t.astype(np.float64))).astype(np.float32)
        elif name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        elif "conv1d" in name:
            t = t.squeeze()
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            t = t + np.float32(1)
        yield name, t


# tests/fixtures/tiny/<fixture> -> the llama.cpp architecture it is written as, and its hparams.
TINY_GGUF = {
    "gpt2": ("gpt2", gpt2_hparams),
    "smollm3": ("smollm3", llama_hparams),
    "granite": ("granite", granite_hparams),
    # GraniteHybridModel writes a Granite 4 without Mamba-2 layers or experts as `granite`
    "granite4": ("granite", granite4_hparams),
    # and a Granite 4.0-H (Mamba-2 layers among the attention layers) as `granitehybrid`
    "granite4_h": ("granitehybrid", granite4_hparams),
    "olmo2": ("olmo2", olmo2_hparams),
    "olmo3": ("olmo2", olmo2_hparams),  # Olmo2Model writes OLMo 3 too
    "phi3_longrope": ("phi3", phi3_hparams),
    # Gemma3NModel / Gemma4Model (the latter registered for Gemma4ForConditionalGeneration only)
    "gemma3n_text": ("gemma3n", gemma3n_hparams),
    "gemma4_text": ("gemma4", gemma4_hparams),
    # Hybrids: LFM2Model (short-convolution layers; not lfm2_adjusted, whose conv biases the
    # converter cannot write: it squeezes dim 1 of every `conv.conv` tensor, and the 1-d bias
    # has none) and Qwen3_5TextModel (Gated DeltaNet layers)
    "lfm2": ("lfm2", lfm2_hparams),
    "qwen3_5_text": ("qwen35", qwen35_hparams),
}
# Converter classes whose modify_tensors changes tensors before the name lookup.
CHECKPOINT_TENSORS = {
    "lfm2": lfm2_checkpoint_tensors,
    "qwen35": qwen35_checkpoint_tensors,
    "granitehybrid": granite_hybrid_checkpoint_tensors,
}
GEMMA = ("gemma3n", "gemma4")
# Architectures whose converter class is a LlamaModel (undo_permute): Q/K rows permuted.
PERMUTED_QK = ("smollm3", "granite", "granitehybrid")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def llama_permute(t: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def gguf_tensor(arch: str, name: str, t: np.ndarray, c: dict) -> np.ndarray:
    """A checkpoint tensor as llama.cpp stores it."""
    if arch == "gpt2" and name.endswith(CONV1D):
        return t.T  # Conv1D stores (in, out)
    if arch in PERMUTED_QK and name.endswith("q_proj.weight"):
        return llama_permute(t, c["num_attention_heads"], c["num_attention_heads"])
    if arch in PERMUTED_QK and name.endswith("k_proj.weight"):
        return llama_permute(t, c["num_attention_heads"], c["num_key_value_heads"])
    return t


def write_tiny_gguf(out: Path, fixture: str) -> None:
    """tests/fixtures/tiny/<fixture> as llama.cpp's convert_hf_to_gguf.py writes it (TINY_GGUF),
    F32: its hparams, tensor names from gguf-py's own map, Q/K rows permuted where llama.cpp
    permutes them, GPT-2's Conv1D weights transposed to (out, in), Phi-3's fused qkv and gate_up
    kept, Granite 4's fused gate/up split (granite4_checkpoint_tensors), Gemma 3n's AltUp
    projections stacked (gemma_checkpoint_tensors), LFM2's and Qwen3.5's tensors as their classes
    store them (lfm2_checkpoint_tensors, qwen35_checkpoint_tensors); with a stand-in
    SentencePiece vocabulary of the checkpoint's size (the tests feed ids)."""
    arch, hparams = TINY_GGUF[fixture]
    src = ROOT / "tests" / "fixtures" / "tiny" / fixture
    config = json.loads((src / "config.json").read_text())
    tensors = read_safetensors(src / "model.safetensors")
    w = GGUFWriter(str(out / f"tiny_{fixture}.gguf"), arch)
    extra = hparams(w, config)
    vocab = config["vocab_size"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"▁t{i}" for i in range(vocab - 3)]
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_key_value("tokenizer.ggml.token_type", [2, 3, 3] + [1] * (vocab - 3), V.ARRAY, sub_type=V.INT32)
    w.add_key_value("tokenizer.ggml.scores", [0.0] * vocab, V.ARRAY, sub_type=V.FLOAT32)
    w.add_uint32("tokenizer.ggml.bos_token_id", config["bos_token_id"])
    w.add_uint32("tokenizer.ggml.eos_token_id", config["eos_token_id"])
    tmap = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                    config.get("num_hidden_layers") or config["n_layer"])
    for name, t in extra:  # generate_extra_tensors come first
        w.add_tensor(name, t)
    if arch in GEMMA:
        tensors = dict(gemma_checkpoint_tensors(arch, tensors, config))
    if config["model_type"] == "granitemoehybrid":
        tensors = dict(granite4_checkpoint_tensors(tensors, config))
    if arch in CHECKPOINT_TENSORS:
        tensors = dict(CHECKPOINT_TENSORS[arch](tensors, config))
    for name, t in tensors.items():
        gguf_name = name if name.startswith("blk.") else tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{fixture}: gguf-py maps no name for {name}")
        w.add_tensor(gguf_name, np.ascontiguousarray(gguf_tensor(arch, name, t, config), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_tokenizers(out: Path, names: list[str]) -> None:
    """tokenizer.json as transformers builds it from each file (tokenizer only: no torch needed)."""
    import tempfile

    stub = Path(tempfile.mkdtemp()) / "torch"
    stub.mkdir()
    (stub / "__init__.py").write_text(
        "from unittest.mock import MagicMock\n__version__ = '0.0.0'\n"
        "def __getattr__(name):\n    return MagicMock(name=name)\n"
    )
    sys.path.insert(0, str(stub.parent))
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoTokenizer

    gguf_utils.is_torch_available = lambda: True  # only the config is read, never a tensor
    for name in names:
        tok = AutoTokenizer.from_pretrained(str(out), gguf_file=f"{name}.gguf")
        data = json.loads(tok.backend_tokenizer.to_str())
        (out / f"{name}.tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
        print(f"{name}: {type(tok).__name__}, transformers {__import__('transformers').__version__}")


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = Path(args[0]) if args else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    write_quants(out)
    write_grid_model(out)
    for fixture in TINY_GGUF:
        write_tiny_gguf(out, fixture)
    names = write_tokenizers(out)
    if "--hf-tokenizers" in sys.argv:
        hf_tokenizers(out, names)
    for p in sorted(out.iterdir()):
        print(f"{p.stat().st_size:8d}  {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}")


if __name__ == "__main__":
    main()
