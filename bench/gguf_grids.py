#!/usr/bin/env python3
"""GGUF grids carried into Core ML, per ggml type, on the registry GGUFs in .cache/models
(scripts/fetch-models.sh): bytes in the GGUF and in the package, how each type was carried and
its largest weight error, and what carrying does to the model against the `--dequantize` package
of the same file: mean KL and top-1 agreement on bench/data/eval.txt (windows of the context),
and greedy continuations of a few prompts; and both packages against a float32 conversion of the
GGUF, the noise floor of fp16 computation.

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


def measure(name, gguf, context, max_tokens, work):
    carried, fp16 = work / f"{gguf.stem}.carried.mlpackage", work / f"{gguf.stem}.fp16.mlpackage"
    summary = corelm("convert", gguf, "-o", carried, "--context", context, "--json", "--force")
    corelm("convert", gguf, "-o", fp16, "--context", context, "--dequantize", "--json", "--force")
    verify = ["verify", carried, "--against", fp16, "--text", REPO / "bench" / "data" / "eval.txt", "--json"]
    if max_tokens:
        verify += ["--max-tokens", max_tokens]
    v = corelm(*verify)
    # The noise floor: both fp16 packages against a float32 conversion of the GGUF (the source's
    # exact dequantized values), so the carried package's distance from the dequantized one can
    # be read against how far fp16 computation alone moves either from the truth.
    truth = {label: corelm("verify", pkg, "--against", gguf, *verify[4:])
             for label, pkg in (("carried", carried), ("dequantized", fp16))}
    continuations = [{"prompt": p, "carried": greedy(carried, p, 32), "dequantized": greedy(fp16, p, 32)}
                     for p in PROMPTS]
    types = summary["grid_types"]
    source = sum(t["source_bytes"] for t in types)
    package = sum(t["package_bytes"] for t in types)
    return {
        "model": name,
        "gguf": gguf.name,
        "types": types,
        "weights": {"gguf_bytes": source, "package_bytes": package, "ratio": package / source},
        "package_bytes": {"carried": summary["output_bytes"]},
        "against_dequantized": v,
        "against_fp32": truth,
        "greedy": {"prompts": len(PROMPTS), "tokens": 32,
                   "identical": sum(c["carried"] == c["dequantized"] for c in continuations),
                   "continuations": continuations},
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
        v = r["against_dequantized"]
        print(f"{r['model']}: weights {r['weights']['ratio']:.3f}x the GGUF's, KL {v['mean_kl']:.2e}, "
              f"top-1 {100 * v['top1_agreement']:.2f}%, greedy identical {r['greedy']['identical']}/{len(PROMPTS)}")
    print(f"-> {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
