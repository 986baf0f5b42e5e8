#!/usr/bin/env python3
"""A stateful Core ML model made by coremltools from a traced PyTorch module, plus torch's outputs.

    .cache/venv-ref/bin/python python/make_coremltools_fixture.py

Writes tests/fixtures/coremltools/:
  stateful_torch.mlpackage        compute precision FLOAT16 (int32 ids, fp16 mask and logits)
  stateful_torch_fp32.mlpackage   compute precision FLOAT32 (int32 ids, fp32 mask and logits)
  calls.json                      a sequence of calls sharing one KV cache, in `corelm predict` format
                                  (fp16 mask; the fp32 package gets calls_fp32.json)
  expected.json                   torch's logits for each call (float32 compute, fp16 KV cache)

The module follows the KV-cache pattern of coremltools' stateful-model guide: fp16 buffers
k_cache / v_cache shaped (layers, 1, kv_heads, context, head_dim) that forward() writes at
[end - q_len, end) (slice assignment, i.e. slice_update in MIL), where end is the causal mask's
last dimension. The query length and the mask's key length are flexible (RangeDim).
Everything is seeded and runs on one CPU thread; the specs are re-serialized deterministically and
the manifests get name-derived ids, so re-running the script reproduces the files byte for byte.
"""

import json
import logging
import shutil
import uuid
from pathlib import Path

logging.getLogger("coremltools").setLevel(logging.ERROR)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import coremltools as ct  # noqa: E402
from coremltools.proto import Model_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "coremltools"

SEED = 7
VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, CONTEXT = 64, 32, 4, 2, 8, 64, 2, 16
# Query lengths of the calls: prefill 4, decode 1, a chunk of 3, then two decode steps.
SCHEDULE = [4, 1, 3, 1, 1]


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Block(nn.Module):
    """Pre-norm attention + MLP. Even layers: LayerNorm and a GELU MLP; odd: RMSNorm and SwiGLU."""

    def __init__(self, index):
        super().__init__()
        self.index = index
        gated = index % 2 == 1
        self.norm1 = RMSNorm(HIDDEN) if gated else nn.LayerNorm(HIDDEN)
        self.norm2 = RMSNorm(HIDDEN) if gated else nn.LayerNorm(HIDDEN)
        self.q = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=True)
        self.k = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=True)
        self.v = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=True)
        self.o = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.gated = gated
        self.up = nn.Linear(HIDDEN, FFN, bias=not gated)
        self.gate = nn.Linear(HIDDEN, FFN, bias=False) if gated else None
        self.down = nn.Linear(FFN, HIDDEN, bias=not gated)

    def forward(self, h, cos, sin, mask, k_cache, v_cache, begin, end):
        b, n, _ = h.shape
        x = self.norm1(h)
        q = self.q(x).view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(x).view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(x).view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # The cache update: slice assignment into the fp16 state buffers.
        k_cache[self.index, :, :, begin:end, :] = k.to(torch.float16)
        v_cache[self.index, :, :, begin:end, :] = v.to(torch.float16)
        keys = k_cache[self.index, :, :, :end, :].to(torch.float32)
        values = v_cache[self.index, :, :, :end, :].to(torch.float32)
        # Grouped-query attention: each kv head serves HEADS // KV_HEADS query heads.
        keys = keys.repeat_interleave(HEADS // KV_HEADS, dim=1)
        values = values.repeat_interleave(HEADS // KV_HEADS, dim=1)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        h = h + self.o(a.transpose(1, 2).reshape(b, n, HEADS * HEAD_DIM))
        x = self.norm2(h)
        if self.gated:
            x = F.silu(self.gate(x)) * self.up(x)
        else:
            x = F.gelu(self.up(x))
        return h + self.down(x)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Block(i) for i in range(LAYERS))
        self.norm = RMSNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        shape = (LAYERS, 1, KV_HEADS, CONTEXT, HEAD_DIM)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))

    def forward(self, input_ids, causal_mask):
        n = input_ids.shape[-1]
        end = causal_mask.shape[-1]
        begin = end - n
        positions = torch.arange(begin, end, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        h = self.embed(input_ids)
        mask = causal_mask.to(torch.float32)
        for block in self.blocks:
            h = block(h, cos, sin, mask, self.k_cache, self.v_cache, begin, end)
        return self.head(self.norm(h))


def build():
    torch.manual_seed(SEED)
    model = TinyLM().eval()
    with torch.no_grad():
        # Non-trivial norm weights and biases (the defaults are ones and zeros).
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, RMSNorm)):
                m.weight.copy_(1.0 + 0.2 * torch.randn_like(m.weight))
            if isinstance(m, nn.LayerNorm):
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
    return model


def mask_for(begin, n):
    """Causal mask for queries at positions [begin, begin + n) over keys [0, begin + n)."""
    end = begin + n
    m = np.zeros((1, 1, n, end), dtype=np.float32)
    for i in range(n):
        m[0, 0, i, begin + i + 1 :] = -np.inf
    return m


def calls():
    rng = np.random.default_rng(SEED)
    begin, out = 0, []
    for n in SCHEDULE:
        ids = rng.integers(0, VOCAB, size=(1, n), dtype=np.int64).astype(np.int32)
        out.append((ids, mask_for(begin, n)))
        begin += n
    return out


def tensor_json(a, dtype):
    flat = a.reshape(-1).tolist()
    if dtype != "int32":
        flat = ["-inf" if x == -np.inf else "inf" if x == np.inf else x for x in flat]
    return {"shape": list(a.shape), "dtype": dtype, "data": flat}


def write_json(path, obj):
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n")


def convert(model, precision, float_type, path):
    ids, mask = calls()[0]
    traced = torch.jit.trace(model, (torch.from_numpy(ids), torch.from_numpy(mask)))
    q_len = ct.RangeDim(lower_bound=1, upper_bound=CONTEXT, default=1)
    end_len = ct.RangeDim(lower_bound=1, upper_bound=CONTEXT, default=1)
    state_type = ct.TensorType(shape=tuple(model.k_cache.shape), dtype=np.float16)
    mlmodel = ct.convert(
        traced,
        inputs=[
            ct.TensorType(name="input_ids", shape=(1, q_len), dtype=np.int32),
            ct.TensorType(name="causal_mask", shape=(1, 1, q_len, end_len), dtype=float_type),
        ],
        outputs=[ct.TensorType(name="logits", dtype=float_type)],
        states=[
            ct.StateType(wrapped_type=state_type, name="k_cache"),
            ct.StateType(wrapped_type=state_type, name="v_cache"),
        ],
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=precision,
        skip_model_load=True,
    )
    # Date- and version-dependent metadata would make every run differ.
    mlmodel.user_defined_metadata.clear()
    mlmodel.short_description = "corelm fixture: stateful KV cache from a traced torch module"
    if path.exists():
        shutil.rmtree(path)
    mlmodel.save(str(path))
    # protobuf writes map fields in no fixed order; rewrite the spec with sorted map keys.
    spec_path = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    # Manifest item ids are random UUIDs; derive them from the package and item names instead.
    manifest = path / "Manifest.json"
    info = json.loads(manifest.read_text())
    ids = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, f"corelm/{path.name}/{item['path']}")).upper()
           for old, item in info["itemInfoEntries"].items()}
    info["itemInfoEntries"] = {ids[k]: v for k, v in info["itemInfoEntries"].items()}
    info["rootModelIdentifier"] = ids[info["rootModelIdentifier"]]
    manifest.write_text(json.dumps(info, indent=4, sort_keys=True) + "\n")


def main():
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    model = build()
    convert(model, ct.precision.FLOAT16, np.float16, OUT / "stateful_torch.mlpackage")
    model = build()  # fresh, zeroed caches (tracing ran forward once)
    convert(model, ct.precision.FLOAT32, np.float32, OUT / "stateful_torch_fp32.mlpackage")

    model = build()
    expected, calls16, calls32 = [], [], []
    with torch.no_grad():
        for ids, mask in calls():
            logits = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
            expected.append({"logits": tensor_json(logits, "fp32")})
            ids_json = tensor_json(ids, "int32")
            calls16.append({"input_ids": ids_json, "causal_mask": tensor_json(mask, "fp16")})
            calls32.append({"input_ids": ids_json, "causal_mask": tensor_json(mask, "fp32")})
    write_json(OUT / "calls.json", calls16)
    write_json(OUT / "calls_fp32.json", calls32)
    write_json(OUT / "expected.json", expected)
    print(f"wrote {OUT}: {len(SCHEDULE)} calls, query lengths {SCHEDULE}")


if __name__ == "__main__":
    main()
