#!/usr/bin/env python3
"""GGUF grids carried into Core ML, per ggml type, on the registry GGUFs in .cache/models
(scripts/fetch-models.sh): bytes in the GGUF and in the package, how each type was carried and
its largest weight error, and what carrying does to the model against the `--dequantize` package
of the same file: mean KL and top-1 agreement on bench/data/eval.txt (windows of the context),
and greedy continuations of a few prompts, for fp16 packages and for fp32 ones (scales and
offsets in fp32, no fp16 rounding in the computation: only the weight forms differ); and both fp16 packages against a
float32 conversion of the GGUF, the noise floor of fp16 computation.

    python3 bench/gguf_grids.py [--context N] [--max-tokens N]

Writes bench/results/gguf-grids.json (with provenance). Uses target/release/corelm.
"""

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from provenance import provenance

REPO = Path(__file__).resolve().parent.parent
CORELM = REPO / "target" / "release" / "corelm"
MODELS = {
    "Gemma-3-270M Q4_K_M": REPO / ".cache" / "models" / "gemma-3-270m-q4_k_m.gguf",
    "SmolLM2-135M-Instruct Q4_1": REPO / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
}
PROMPTS = ["The capital of France is", "Water boils at", "def fibonacci(n):", "Once upon a time"]


def corelm(*args):
    r = subprocess.run([str(CORELM), *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"corelm {' '.join(map(str, args))}: {r.stderr}")
    return json.loads(r.stdout)


def greedy(pkg, prompt, tokens):
    out = corelm("run", pkg, "--prompt", prompt, "--raw", "--temperature", "0", "--max-new-tokens", tokens,
                 "--ignore-eos", "--json")
    return out["generated_ids"]


def pair(gguf, context, max_tokens, work, precision):
    """The carried and the `--dequantize` package of `gguf` in `precision`, the one scored
    against the other, and their greedy continuations."""
    carried, dequantized = (work / f"{gguf.stem}.{precision}.{label}.mlpackage" for label in ("carried", "dequantized"))
    common = ["--context", context, "--precision", precision, "--json", "--force"]
    summary = corelm("convert", gguf, "-o", carried, *common)
    corelm("convert", gguf, "-o", dequantized, *common, "--dequantize")
    text = ["--text", REPO / "bench" / "data" / "eval.txt", "--json"] + (["--max-tokens", max_tokens] if max_tokens else [])
    continuations = [{"prompt": p, "carried": greedy(carried, p, 32), "dequantized": greedy(dequantized, p, 32)}
                     for p in PROMPTS]
    return {
        "summary": summary,
        "packages": (carried, dequantized),
        "text": text,
        "against_dequantized": corelm("verify", carried, "--against", dequantized, *text),
        "greedy": {"prompts": len(PROMPTS), "tokens": 32,
                   "identical": sum(c["carried"] == c["dequantized"] for c in continuations),
                   "continuations": continuations},
    }


def measure(name, gguf, context, max_tokens, work):
    fp16 = pair(gguf, context, max_tokens, work, "fp16")
    # In fp32 packages scales and offsets are fp32 and computation adds no fp16 rounding: what is
    # left is the difference of the weight forms alone.
    fp32 = pair(gguf, context, max_tokens, work, "fp32")
    # The noise floor: both fp16 packages against a float32 conversion of the GGUF (the source's
    # exact dequantized values), so the carried package's distance from the dequantized one can
    # be read against how far fp16 computation alone moves either from the truth.
    truth = {label: corelm("verify", pkg, "--against", gguf, *fp16["text"])
             for label, pkg in zip(("carried", "dequantized"), fp16["packages"])}
    types = fp16["summary"]["grid_types"]
    source = sum(t["source_bytes"] for t in types)
    package = sum(t["package_bytes"] for t in types)
    return {
        "model": name,
        "gguf": gguf.name,
        "types": types,
        "weights": {"gguf_bytes": source, "package_bytes": package, "ratio": package / source},
        "package_bytes": {"carried": fp16["summary"]["output_bytes"]},
        "against_dequantized": fp16["against_dequantized"],
        "greedy": fp16["greedy"],
        "fp32_packages": {"against_dequantized": fp32["against_dequantized"], "greedy": fp32["greedy"]},
        "against_fp32": truth,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, path, args.context, args.max_tokens, Path(tmp)) for name, path in MODELS.items()]
    out = {"context": args.context, "text": "bench/data/eval.txt", "models": rows, "provenance": provenance(CORELM)}
    path = REPO / "bench" / "results" / "gguf-grids.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        for label, p in (("fp16", r), ("fp32", r["fp32_packages"])):
            v = p["against_dequantized"]
            print(f"{r['model']} {label}: weights {r['weights']['ratio']:.3f}x the GGUF's, KL {v['mean_kl']:.2e}, "
                  f"top-1 {100 * v['top1_agreement']:.2f}%, greedy identical {p['greedy']['identical']}/{len(PROMPTS)}")
    print(f"-> {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
