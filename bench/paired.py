#!/usr/bin/env python3
"""Is corelm's compression of SmolLM2-135M better or worse than coremltools' beyond the noise of the
evaluation text? Both packages are scored position by position against the same fp16 package on the
same tokens (`corelm verify --positions`), and the per-position differences are paired: their mean
with its standard error, and the positions where only one of the two keeps the fp16 package's top
token (a sign test). Nothing asserts; it prints the figures and writes
bench/results/paired-smollm2.json.

    bench/paired.py [--schemes int8,int4-b32] [--max-tokens N]

Packages are made as bench/quality.py makes its like-for-like rows: `corelm compress` of corelm's fp16
package (`corelm convert <gguf> --context 1024 --dequantize`), and coremltools' compression of the same package by quality.py's
`_ct-compress` child (same configs, same excluded RoPE tables, tokenizer items copied over).
Positions within one window are correlated, so the standard error (computed as if they were
independent) is a lower bound; a difference inside two of them is not evidence either way.
"""

import argparse
import json
import math
import subprocess
import tempfile
from pathlib import Path

from provenance import provenance

REPO = Path(__file__).resolve().parent.parent
CORELM = REPO / "target" / "release" / "corelm"
PYTHON = REPO / ".cache" / "venv" / "bin" / "python"
GGUF = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = REPO / "bench" / "data" / "eval.txt"
OUT = REPO / "bench" / "results" / "paired-smollm2.json"

# scheme: `corelm compress` flags, bench/quality.py coremltools row; both compress the same fp16 package.
SCHEMES = {
    "int8": (["--quantize", "int8"], "ct-int8"),
    "int4-b32": (["--quantize", "int4"], "ct-int4-b32"),
}


def run(cmd):
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def positions(pkg, reference, out, max_tokens):
    cmd = [CORELM, "verify", pkg, "--against", reference, "--text", TEXT, "--positions", out, "--json"]
    if max_tokens:
        cmd += ["--max-tokens", max_tokens]
    run(cmd)
    return json.loads(Path(out).read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default="int8", help="comma-separated: " + ", ".join(SCHEMES))
    p.add_argument("--max-tokens", type=int)
    args = p.parse_args()
    results = {"model": GGUF.name, "text": TEXT.name, "schemes": [], "provenance": provenance(CORELM)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp16 = tmp / "fp16.mlpackage"
        run([CORELM, "convert", GGUF, "-o", fp16, "--context", "1024", "--dequantize", "--json"])
        for scheme in args.schemes.split(","):
            flags, ct_row = SCHEMES[scheme]
            ours, theirs = tmp / f"{scheme}.mlpackage", tmp / f"{ct_row}.mlpackage"
            run([CORELM, "compress", fp16, "-o", ours, "--json", *flags])
            run([PYTHON, REPO / "bench" / "quality.py", "_ct-compress", "--row", ct_row, "--input", fp16,
                 "--output", theirs])
            a = positions(ours, fp16, tmp / "ours.json", args.max_tokens)
            b = positions(theirs, fp16, tmp / "theirs.json", args.max_tokens)
            assert len(a) == len(b), "both packages are scored on the same positions"
            n = len(a)
            diff = [x["kl"] - y["kl"] for x, y in zip(a, b)]
            mean = sum(diff) / n
            sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1))
            only_ours = sum(x["top1"] and not y["top1"] for x, y in zip(a, b))
            only_theirs = sum(y["top1"] and not x["top1"] for x, y in zip(a, b))
            # Sign test on the discordant positions: z of only_ours among only_ours + only_theirs.
            discordant = only_ours + only_theirs
            z = (only_ours - discordant / 2) / math.sqrt(discordant / 4) if discordant else 0.0
            entry = {
                "scheme": scheme,
                "coremltools_row": ct_row,
                "positions": n,
                "mean_kl": {"corelm": sum(x["kl"] for x in a) / n, "coremltools": sum(y["kl"] for y in b) / n},
                "mean_kl_difference_corelm_minus_coremltools": mean,
                "standard_error": sd / math.sqrt(n),
                "top1_only_corelm": only_ours,
                "top1_only_coremltools": only_theirs,
                "top1_sign_test_z": z,
            }
            results["schemes"].append(entry)
            print(f"{scheme}: mean KL corelm {entry['mean_kl']['corelm']:.5f} vs coremltools "
                  f"{entry['mean_kl']['coremltools']:.5f}; paired difference {mean:+.5f} ± {sd / math.sqrt(n):.5f} "
                  f"(standard error, {n} positions); top-1 kept by only corelm at {only_ours} positions, only "
                  f"coremltools at {only_theirs} (sign test z = {z:+.2f})")
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
