#!/usr/bin/env python3
"""Prefill of hybrid models (recurrent state) on corelm's interpreter: one call over a 256-token
prompt against 256 one-token calls, on random-weight checkpoints shaped like the published small
models (Qwen3.5-0.8B's and LFM2-350M's layer widths, fewer layers and a smaller vocabulary; and
Granite 4.0-H's layer kinds at widths of our choosing), with
transformers (float32, CPU, its PyTorch fallback kernels: chunked gated delta rule, causal conv)
on the same checkpoints and prompt in the same run as the peer. Nothing here asserts on time: it
prints a table and writes bench/results/hybrid-prefill.json.

    bench/hybrid_prefill.py [--corelm target/release/corelm] [--threads 2]

The checkpoints are made by `<ref python> bench/hybrid_prefill.py _make DIR` (seeded, transformers'
own initialisation), converted once (fp16, context 1024, untimed). corelm: `corelm run PKG --ids
<256 ids> --max-new-tokens 1 --json` times the prefill (one driver feed; for Qwen3.5 the driver
takes its 256-token function), and `--ids <1 id> --max-new-tokens 257 --ignore-eos` the 256
single-token calls after it. The speed-up is (256 / prefill s) / (256 / steps s).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from provenance import provenance

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
RESULTS = REPO / "bench" / "results"
REF_PYTHON = CACHE / "venv-ref" / "bin" / "python"
PROMPT = 256

# Published widths (Qwen3.5-0.8B, LFM2-350M) with 8 layers and an 8192-token vocabulary.
MODELS = {
    "qwen3_5-0.8b-shaped": dict(
        model_type="qwen3_5_text",
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=16,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=10_000_000.0, partial_rotary_factor=0.25,
                             mrope_section=[11, 11, 10], mrope_interleaved=True),
    ),
    # Granite 4.0-H's layer kinds (three Mamba-2 layers to one attention layer without positions);
    # widths of a small model, not a published configuration's.
    "granite-4.0-h-like": dict(
        model_type="granitemoehybrid",
        vocab_size=8192,
        hidden_size=768,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        layer_types=["mamba", "mamba", "mamba", "attention"] * 2,
        num_local_experts=0,
        shared_intermediate_size=2048,
        position_embedding_type="nope",
        mamba_n_heads=48,
        mamba_n_groups=1,
        mamba_d_state=128,
        mamba_d_head="auto",
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=256,
        time_step_limit=[0.0, 1000.0],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    "lfm2-350m-shaped": dict(
        model_type="lfm2",
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=6656,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        layer_types=["conv", "conv", "full_attention", "conv", "conv", "full_attention", "conv", "conv"],
        conv_L_cache=3,
        block_auto_adjust_ff_dim=True,
        block_multiple_of=256,
        block_ffn_dim_multiplier=1.0,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}


def child_make(out):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    for name, spec in MODELS.items():
        spec = dict(spec)
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(Path(out) / name, safe_serialization=True)


def child_transformers(folder, threads, ids):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        def prefill():
            t = time.perf_counter()
            out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t, out

        def steps():
            out = model(input_ids=torch.tensor([[ids[0]]]), use_cache=True)
            t = time.perf_counter()
            for i in range(len(ids)):
                out = model(input_ids=torch.tensor([[ids[i]]]), cache=out.cache, use_cache=True)
            return time.perf_counter() - t

        prefill()  # warm-up
        p, _ = prefill()
        s = steps()
    print(json.dumps({"prefill_seconds": p, "steps_seconds": s}))


def run_json(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corelm", default=str(REPO / "target" / "release" / "corelm"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    models = CACHE / "bench-models" / "hybrid"
    if not all((models / n / "config.json").exists() for n in MODELS):
        subprocess.run([str(REF_PYTHON), __file__, "_make", str(models)], check=True)
    ids = [(i * 7919 + 13) % 8000 + 10 for i in range(PROMPT)]
    rows = []
    for name in MODELS:
        folder = models / name
        pkg = models / f"{name}.mlpackage"
        subprocess.run([args.corelm, "convert", str(folder), "-o", str(pkg), "--context", "1024", "--force",
                        "--no-check"], check=True, capture_output=True)
        prefill, steps = [], []
        for _ in range(args.repeats):
            p = run_json([args.corelm, "run", str(pkg), "--ids", ",".join(map(str, ids)), "--max-new-tokens", "1",
                          "--json"])
            s = run_json([args.corelm, "run", str(pkg), "--ids", str(ids[0]), "--max-new-tokens", str(PROMPT + 1),
                          "--ignore-eos", "--json"])
            prefill.append(p["prefill_seconds"])
            steps.append(s["decode_seconds"])
        t = json.loads(subprocess.run([str(REF_PYTHON), __file__, "_transformers", str(folder), str(args.threads),
                                       ",".join(map(str, ids))], check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1])
        row = {
            "model": name,
            "prompt_tokens": PROMPT,
            "corelm_prefill_seconds": min(prefill),
            "corelm_steps_seconds": min(steps),
            "corelm_speedup": min(steps) / min(prefill),
            "transformers_fp32_prefill_seconds": t["prefill_seconds"],
            "transformers_fp32_steps_seconds": t["steps_seconds"],
            "transformers_speedup": t["steps_seconds"] / t["prefill_seconds"],
        }
        rows.append(row)
        print(f"{name:<22} corelm: prefill {PROMPT / row['corelm_prefill_seconds']:7.1f} tok/s, single steps "
              f"{PROMPT / row['corelm_steps_seconds']:6.1f} tok/s, x{row['corelm_speedup']:.1f}   transformers fp32: "
              f"prefill {PROMPT / t['prefill_seconds']:7.1f} tok/s, steps {PROMPT / t['steps_seconds']:6.1f} tok/s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "hybrid-prefill.json"
    out.write_text(json.dumps({"provenance": provenance(args.corelm), "threads": args.threads, "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_make":
        child_make(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "_transformers":
        child_transformers(sys.argv[2], int(sys.argv[3]), [int(x) for x in sys.argv[4].split(",")])
    else:
        main()
