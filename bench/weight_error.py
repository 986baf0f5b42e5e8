#!/usr/bin/env python3
"""How closely each compressed package rebuilds the fp16 weights: corelm's int8 / int4 quantization
against coremltools' `linear_quantize_weights` of the same fp16 package, weight by weight. Unlike
perplexity or KL on a text, this has no sampling noise: at equal size, a smaller reconstruction
error is strictly better. Nothing asserts on the numbers; it prints a table and writes
bench/results/weight-error-smollm2.json.

    .cache/venv/bin/python bench/weight_error.py

Runs in the coremltools venv (scripts/setup-python.sh). Packages: `corelm convert <gguf> --context 256 --dequantize`
(fp16), then `corelm compress` of it with `--quantize int8|int4` and coremltools' compression of the same
fp16 package with the configs of
bench/quality.py (CT_ROWS, imported from it). Every package is read with coremltools' own milproto
loader; each `linear` op's weight is materialized by coremltools (constexpr ops'
`materialized_val_inference`, i.e. its decompression, in the op's fp16 output type) and compared with
the fp16 package's weight for the same op. Reported per package: the relative squared error
sum((w - w16)^2) / sum(w16^2) over all linear weights, and, against corelm's package of the same
scheme, the share of weight rows where corelm's row error is at most coremltools'.
"""

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import provenance

import numpy as np
import coremltools as ct
import coremltools.optimize.coreml as cto
from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
from coremltools.models.utils import _try_get_weights_dir_path

REPO = Path(__file__).resolve().parent.parent
CORELM = REPO / "target" / "release" / "corelm"
GGUF = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = REPO / "bench" / "results" / "weight-error-smollm2.json"

# The schemes compared: `corelm compress` flags and the matching bench/quality.py coremltools row. Both
# tools compress the same fp16 package, so the comparison is like for like.
SCHEMES = [("int8", ["--quantize", "int8"], "ct-int8"), ("int4-b32", ["--quantize", "int4"], "ct-int4-b32")]


def quality_rows():
    spec = importlib.util.spec_from_file_location("quality", REPO / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    return {row[0]: row for row in quality.CT_ROWS}


def linear_weights(path):
    """{linear op name: float64 weight matrix} as coremltools materializes them."""
    spec = ct.utils.load_spec(str(path))
    prog = milproto_load(model_spec=spec, specification_version=spec.specificationVersion,
                         file_weights_dir=_try_get_weights_dir_path(str(path)))
    weights = {}
    for op in prog.functions["main"].operations:
        if op.op_type != "linear":
            continue
        producer = op.weight.op
        if producer.op_type == "const":
            value = producer.val.val
        else:
            value = producer.materialized_val_inference()
        weights[op.name] = np.asarray(value, dtype=np.float64)
    return weights


def compress_with_coremltools(fp16, out, row):
    _, _, function, kwargs = row
    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(**kwargs))
    model = ct.models.MLModel(str(fp16), skip_model_load=True)
    getattr(cto, function)(model, config=config).save(str(out))


def main():
    rows = quality_rows()
    results = {"model": GGUF.name, "schemes": [], "provenance": provenance(CORELM)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def convert(name, extra):
            out = tmp / f"{name}.mlpackage"
            subprocess.run([str(CORELM), "convert", str(GGUF), "-o", str(out), "--context", "256", "--json",
                            "--force", *extra], check=True, capture_output=True)
            return out

        fp16 = convert("fp16", ["--dequantize"])
        reference = linear_weights(fp16)
        for name, flags, ct_row in SCHEMES:
            ours_pkg = tmp / f"{name}.mlpackage"
            subprocess.run([str(CORELM), "compress", str(fp16), "-o", str(ours_pkg), "--json", *flags],
                           check=True, capture_output=True)
            ours = linear_weights(ours_pkg)
            ct_pkg = tmp / f"{ct_row}.mlpackage"
            compress_with_coremltools(tmp / "fp16.mlpackage", ct_pkg, rows[ct_row])
            theirs = linear_weights(ct_pkg)
            total = {"corelm": 0.0, "coremltools": 0.0}
            norm = 0.0
            rows_ok = rows_all = 0
            for op, w16 in reference.items():
                e_ours = ((ours[op] - w16) ** 2).sum(axis=-1)
                e_theirs = ((theirs[op] - w16) ** 2).sum(axis=-1)
                total["corelm"] += e_ours.sum()
                total["coremltools"] += e_theirs.sum()
                norm += (w16 ** 2).sum()
                rows_ok += int((e_ours <= e_theirs).sum())
                rows_all += e_ours.size
            entry = {
                "scheme": name,
                "coremltools_config": rows[ct_row][3],
                "relative_squared_error": {k: v / norm for k, v in total.items()},
                "rows_where_corelm_is_at_most_coremltools": rows_ok / rows_all,
                "rows": rows_all,
                "linear_weights": len(reference),
            }
            results["schemes"].append(entry)
            print(f"{name:9} relative squared error: corelm {entry['relative_squared_error']['corelm']:.4e}, "
                  f"coremltools {entry['relative_squared_error']['coremltools']:.4e}; corelm's row error <= "
                  f"coremltools' in {100 * rows_ok / rows_all:.2f}% of {rows_all} rows")
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main())
