#!/usr/bin/env python3
"""What weight compression costs in quality: corelm's schemes against coremltools' compression of the
same fp16 weights, for SmolLM2-135M-Instruct, measured in one run. Nothing here asserts on the
numbers: it prints a markdown table and writes bench/results/quality-smollm2.json.

    bench/quality.py            # whole evaluation text (bench/data/eval.txt, ~6k tokens)
    bench/quality.py --quick    # its first 512 tokens, for a smoke run

Every package is scored by the same command against the same reference, the fp16 package:

    corelm verify PKG --against fp16.mlpackage --text TEXT --json
      -> positions, top1_agreement, max_abs_logit_error, mean_kl, perplexity_package, perplexity_reference

(the whole text, in windows of the package's context), and the fp16 package itself by
`corelm eval fp16.mlpackage --text TEXT --json` (-> tokens, windows, perplexity).

Rows:
  * corelm: `corelm convert <gguf> -o PKG --context N [--quantize ...] --force --json`, one conversion
    per scheme from the GGUF file (fp16, int8, int4 block 32 / 64, int4 block 32 with offset, lut4,
    lut6, mixed, each from the dequantized weights, and int4 keeping the GGUF's own Q4_1 grid).
  * coremltools: the fp16 package corelm wrote is loaded with `ct.models.MLModel(path,
    skip_model_load=True)`, compressed with `ct.optimize.coreml.linear_quantize_weights` or
    `palettize_weights` (configs in CT_ROWS below, also written to the JSON) and `save()`d. corelm
    keeps its RoPE cos/sin tables in fp16, so they are excluded from coremltools' compression too
    (op_name_configs None; --ct-all-consts compresses them as well). coremltools' save keeps only its
    own package items, so the tokenizer files corelm ships under Data/ai.corelm/ are copied over
    afterwards (ModelPackage.addItem), which corelm verify needs to tokenize the text; the weights are
    untouched by that.
  * --check-decompress: each coremltools package is also verified against coremltools' own
    decompression of it (ct.optimize.coreml.decompress_weights -> plain fp16 constants), which shows
    how exactly corelm's interpreter follows coremltools' dequantization.

Each compression runs in a child process of its own; the driver reaps it with os.wait4() and records
wall time, user+system CPU and peak RSS. Note what each clock covers: corelm's is a whole conversion
from the GGUF file (read, dequantize, quantize, write); coremltools' is load of the fp16 package +
compression + save (the child also reports that split). Size is the bytes of the package's weights
folder (Data/com.apple.CoreML/weights); the whole package is recorded too.

The driver needs only the standard library; the coremltools children run in .cache/venv
(scripts/setup-python.sh) and need scikit-learn for k-means palettization (bench/requirements-quality.txt,
installed into that venv on first use unless --no-install). Intermediate packages live in a temporary
folder removed at the end (--keep keeps it and prints where).
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
RESULTS = REPO / "bench" / "results"
WEIGHTS_DIR = Path("Data") / "com.apple.CoreML" / "weights"

MODEL = {
    "name": "SmolLM2-135M-Instruct",
    "gguf": CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
}

# corelm rows: (name, description, extra `corelm convert` arguments).
# The GGUF's own Q4_1 grid is kept unless --dequantize: every row but the grid row starts
# from the fp16 weights, as the reference does.
COREL_ROWS = [
    ("fp16", "fp16 weights (the reference)", ["--dequantize"]),
    ("int8", "int8 per output channel, symmetric", ["--dequantize", "--quantize", "int8"]),
    ("int4-b32", "int4 per block of 32 input columns, symmetric", ["--dequantize", "--quantize", "int4", "--block-size", "32"]),
    ("int4-b64", "int4 per block of 64 input columns, symmetric", ["--dequantize", "--quantize", "int4", "--block-size", "64"]),
    ("int4-b32-offset", "int4 per block of 32, with zero points",
     ["--dequantize", "--quantize", "int4", "--block-size", "32", "--offset"]),
    ("lut4", "4-bit palettization (per-grouped-channel LUTs, k-means)", ["--dequantize", "--quantize", "lut4"]),
    ("lut6", "6-bit palettization (per-grouped-channel LUTs, k-means)", ["--dequantize", "--quantize", "lut6"]),
    ("mixed", "embeddings/LM head int8, everything else int4 block 32", ["--dequantize", "--quantize", "mixed"]),
    ("int4-gguf-grid", "int4 block 32, the GGUF's Q4_1 grid carried over (no re-quantization)",
     ["--quantize", "int4"]),
]

# corelm rows made by `corelm compress` from the fp16 package: the very weights coremltools gets,
# and a compression clock comparable with coremltools' (load + compress + save of that package).
COMPRESS_ROWS = [
    ("compress-int8", "corelm compress of the fp16 package: int8 per channel, symmetric", ["--quantize", "int8"]),
    ("compress-int4-b32", "corelm compress of the fp16 package: int4 per block 32, symmetric",
     ["--quantize", "int4", "--block-size", "32"]),
    ("compress-int4-b64", "corelm compress of the fp16 package: int4 per block 64, symmetric",
     ["--quantize", "int4", "--block-size", "64"]),
    ("compress-int4-b32-offset", "corelm compress of the fp16 package: int4 per block 32, with zero points",
     ["--quantize", "int4", "--block-size", "32", "--offset"]),
    ("compress-lut4", "corelm compress of the fp16 package: lut4 per 16 channels", ["--quantize", "lut4"]),
    ("compress-lut6", "corelm compress of the fp16 package: lut6 per 16 channels", ["--quantize", "lut6"]),
] + [
    # Calibrated: the package reads bench/data/calibration.txt (chapters III-IV of the book the
    # evaluation text's chapters I-II come from; no overlap) and the layers' integers are rounded
    # with error feedback. Same scales, same size as the uncalibrated row.
    (f"calibrated-{name}", f"corelm compress of the fp16 package, calibrated: {what}",
     [*flags, "--calibrate", str(REPO / "bench" / "data" / "calibration.txt")])
    for name, what, flags in [
        ("int8", "int8 per channel, symmetric", ["--quantize", "int8"]),
        ("int4-b32", "int4 per block 32, symmetric", ["--quantize", "int4", "--block-size", "32"]),
        ("int4-b64", "int4 per block 64, symmetric", ["--quantize", "int4", "--block-size", "64"]),
        ("int4-b32-offset", "int4 per block 32, with zero points",
         ["--quantize", "int4", "--block-size", "32", "--offset"]),
    ]
]

# coremltools rows: (name, description, function, config kwargs). weight_threshold is coremltools'
# default (2048 elements): every weight tensor of the model (linears and the embedding) is larger.
CT_ROWS = [
    ("ct-int8", "linear_quantize_weights int8 per channel, symmetric", "linear_quantize_weights",
     {"mode": "linear_symmetric", "dtype": "int8", "granularity": "per_channel", "weight_threshold": 2048}),
    ("ct-int4-b32", "linear_quantize_weights int4 per block 32, symmetric", "linear_quantize_weights",
     {"mode": "linear_symmetric", "dtype": "int4", "granularity": "per_block", "block_size": 32,
      "weight_threshold": 2048}),
    ("ct-int4-b64", "linear_quantize_weights int4 per block 64, symmetric", "linear_quantize_weights",
     {"mode": "linear_symmetric", "dtype": "int4", "granularity": "per_block", "block_size": 64,
      "weight_threshold": 2048}),
    ("ct-int4-b32-offset", "linear_quantize_weights int4 per block 32, with zero points (mode linear)",
     "linear_quantize_weights",
     {"mode": "linear", "dtype": "int4", "granularity": "per_block", "block_size": 32, "weight_threshold": 2048}),
    ("ct-lut4", "palettize_weights kmeans 4-bit, per_grouped_channel group 16", "palettize_weights",
     {"mode": "kmeans", "nbits": 4, "granularity": "per_grouped_channel", "group_size": 16,
      "weight_threshold": 2048}),
    ("ct-lut6", "palettize_weights kmeans 6-bit, per_grouped_channel group 16", "palettize_weights",
     {"mode": "kmeans", "nbits": 6, "granularity": "per_grouped_channel", "group_size": 16,
      "weight_threshold": 2048}),
]

# Which coremltools row each corelm row is compared with: like for like, both compress the same fp16
# package with the same scheme (so near-equal size). The `corelm convert --quantize` rows start from
# the GGUF's f32 values instead, so they are listed but not set against coremltools.
PEERS = {
    "compress-int8": "ct-int8",
    "compress-int4-b32": "ct-int4-b32",
    "compress-int4-b64": "ct-int4-b64",
    "compress-int4-b32-offset": "ct-int4-b32-offset",
    "compress-lut4": "ct-lut4",
    "compress-lut6": "ct-lut6",
    "calibrated-int8": "ct-int8",
    "calibrated-int4-b32": "ct-int4-b32",
    "calibrated-int4-b64": "ct-int4-b64",
    "calibrated-int4-b32-offset": "ct-int4-b32-offset",
}


class BenchError(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# children (run inside .cache/venv)


def quiet_coremltools():
    import logging
    import warnings

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def child_ct_compress(args):
    """Load the fp16 package, compress it with one CT_ROWS config, save it; print phases as JSON."""
    t0 = time.perf_counter()
    quiet_coremltools()
    import coremltools as ct
    import numpy as np
    from coremltools.optimize import coreml as cto

    row = {r[0]: r for r in CT_ROWS}[args.row]
    _, _, function, kwargs = row
    kwargs = dict(kwargs)
    if function == "palettize_weights":
        import sklearn  # noqa: F401  (k-means needs it; fail here with a clear import error)

        kwargs["num_kmeans_workers"] = args.kmeans_workers
        op_config = cto.OpPalettizerConfig(**kwargs)
    else:
        op_config = cto.OpLinearQuantizerConfig(**kwargs)
    t1 = time.perf_counter()

    model = ct.models.MLModel(args.input, skip_model_load=True)
    # corelm's RoPE cos/sin tables are constants like the weights (1024 x 64 each, above coremltools'
    # 2048-element threshold); corelm leaves them fp16, so they are excluded here too (op_name_configs
    # None) and only weights are compressed, unless --all-consts.
    excluded = []
    if not args.all_consts:
        for fn in model.get_spec().mlProgram.functions.values():
            for block in fn.block_specializations.values():
                for op in block.operations:
                    if (op.type == "const" and op.outputs[0].name.startswith("rope_")
                            and op.outputs[0].name.endswith("_table")):
                        excluded.append(op.outputs[0].name)
    excluded = sorted(set(excluded))
    config = cto.OptimizationConfig(global_config=op_config, op_name_configs={n: None for n in excluded})
    t2 = time.perf_counter()
    compressed = getattr(cto, function)(model, config=config)
    t3 = time.perf_counter()
    compressed.save(args.output)
    t4 = time.perf_counter()

    # Carry corelm's own package items (tokenizer files) over; coremltools' save drops them.
    from coremltools.libmodelpackage import ModelPackage

    copied = []
    src_manifest = json.loads((Path(args.input) / "Manifest.json").read_text())
    dst = ModelPackage(args.output)
    for entry in src_manifest["itemInfoEntries"].values():
        if entry["author"] == "com.apple.CoreML":
            continue
        if (Path(args.output) / "Data" / entry["path"]).exists():
            continue
        dst.addItem(str(Path(args.input) / "Data" / entry["path"]), entry["name"], entry["author"],
                    entry["description"])
        copied.append(entry["path"])

    import sklearn

    print(json.dumps({
        "phases": {"import": t1 - t0, "load": t2 - t1, "compress": t3 - t2, "save": t4 - t3},
        "function": f"ct.optimize.coreml.{function}",
        "config": {"class": type(op_config).__name__, **kwargs},
        "excluded_consts": excluded,
        "copied_items": copied,
        "versions": {"coremltools": ct.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__},
    }))


def child_ct_decompress(args):
    """Expand a compressed package back to plain fp16 constants with coremltools' own
    decompress_weights, for checking corelm's interpreter against coremltools' dequantization."""
    quiet_coremltools()
    import coremltools as ct
    from coremltools.optimize import coreml as cto

    model = ct.models.MLModel(args.input, skip_model_load=True)
    cto.decompress_weights(model).save(args.output)
    src = Path(args.input) / "Data" / "ai.corelm"
    if src.is_dir():
        shutil.copytree(src, Path(args.output) / "Data" / "ai.corelm")
    print(json.dumps({"output": args.output}))


# ------------------------------------------------------------------------------------------------
# driver


def run(cmd, what, env=None, timed=False):
    """Run cmd; on a non-zero exit raise BenchError naming the command and quoting its stderr.
    Returns (stdout, measures) where measures has wall/cpu seconds and peak RSS when timed."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc
        err.seek(0)
        stderr = err.read()
    if rc != 0:
        tail = "\n".join(stderr.strip().splitlines()[-25:]) or "(no stderr)"
        raise BenchError(f"{what} failed (exit {rc}):\n  $ {' '.join(str(c) for c in cmd)}\n{tail}")
    measures = {"wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "peak_rss_mb": usage.ru_maxrss / 1024.0} if timed else {}
    return out, measures


def parse_json(text, what):
    """The JSON object a child printed: its whole stdout, or its last line starting with "{"."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    raise BenchError(f"{what} printed no JSON object; its stdout was:\n{text[-2000:]}")


def dir_bytes(path):
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def require_keys(obj, keys, what):
    missing = [k for k in keys if k not in obj]
    if missing:
        raise BenchError(f"{what}: JSON lacks {', '.join(missing)}; got {json.dumps(obj)[:500]}")


def check_python(python, install):
    probe = [python, "-c", "import coremltools, numpy, sklearn"]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return
    req = REPO / "bench" / "requirements-quality.txt"
    if not install:
        raise BenchError(f"{python} cannot import coremltools, numpy and scikit-learn; run "
                         f"scripts/setup-python.sh and `{python} -m pip install -r {req}`")
    print(f"installing {req.name} into {python}", file=sys.stderr)
    run([python, "-m", "pip", "install", "--quiet", "-r", req], "pip install")
    if subprocess.run(probe, capture_output=True).returncode != 0:
        raise BenchError(f"{python} still cannot import coremltools, numpy and scikit-learn")


def fmt_mb(n):
    return f"{n / 1e6:.1f}"


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def markdown(result):
    rows = result["rows"]
    text = result["text"]
    limit = f", first {text['max_tokens']} tokens only" if text["quick"] else ""
    lines = [
        f"### {result['model']}: weight compression quality, context {result['context']}",
        "",
        f"Text: `{text['path']}` ({text['bytes']} bytes{limit}); "
        f"{rows[0]['quality'].get('positions', '?')} scored positions. Reference for agreement and KL: corelm's fp16 package.",
        "",
        "| tool | scheme | weights MB | size vs fp16 | perplexity | top-1 agreement | mean KL | max abs logit err | compress s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        q = r["quality"]
        lines.append(
            f"| {r['tool']} | {r['name']} | {fmt_mb(r['weights_bytes'])} | {r['size_ratio_vs_fp16']:.3f} | "
            f"{fmt(q.get('perplexity'), '.3f')} | {fmt(q.get('top1_agreement'), '.4f')} | "
            f"{fmt(q.get('mean_kl'), '.5f')} | {fmt(q.get('max_abs_logit_error'), '.3f')} | "
            f"{r['compress']['wall_seconds']:.1f} |")
    lines += ["", "Schemes:", ""]
    for r in rows:
        lines.append(f"* `{r['name']}`: {r['description']} — {r['how']}")
    lines += [
        "",
        "compress s: corelm = whole conversion from the GGUF file; coremltools = load the fp16 package + "
        "compress + save (its child process, wall time). Sizes: bytes of Data/com.apple.CoreML/weights.",
    ]
    checks = [r for r in rows if "decompress_check" in r]
    if checks:
        lines += ["", "Interpreter vs coremltools' own dequantization (each package verified against "
                  "`decompress_weights` of itself):", ""]
        for r in checks:
            c = r["decompress_check"]
            lines.append(f"* `{r['name']}`: top-1 agreement {c['top1_agreement']:.4f}, max abs logit error "
                         f"{c['max_abs_logit_error']:.4g}, mean KL {c['mean_kl']:.3g}")
    comparisons = result.get("comparisons") or []
    if comparisons:
        lines += ["", "| corelm | coremltools | size ratio (corelm / ct) | perplexity corelm / ct | top-1 corelm / ct | mean KL corelm / ct |",
                  "|---|---|---:|---:|---:|---:|"]
        for c in comparisons:
            lines.append(f"| {c['corelm']} | {c['coremltools']} | {c['size_ratio']:.3f} | "
                         f"{c['perplexity'][0]:.3f} / {c['perplexity'][1]:.3f} | "
                         f"{c['top1_agreement'][0]:.4f} / {c['top1_agreement'][1]:.4f} | "
                         f"{c['mean_kl'][0]:.5f} / {c['mean_kl'][1]:.5f} |")
    return "\n".join(lines)


def main_driver(args):
    corelm = Path(args.corelm)
    python = args.python
    gguf = Path(args.gguf)
    text_path = Path(args.text)
    if not corelm.exists():
        raise BenchError(f"{corelm} not found: build it with `cargo build --release -p corelm-cli`")
    if not gguf.exists():
        raise BenchError(f"{gguf} not found: run scripts/fetch-models.sh")
    if not text_path.exists():
        raise BenchError(f"{text_path} not found")
    only = set(args.only.split(",")) if args.only else None
    corelm_rows = [r for r in COREL_ROWS if not only or r[0] in only or r[0] == "fp16"]
    ct_rows = [] if args.skip_coremltools else [r for r in CT_ROWS if not only or r[0] in only]
    if ct_rows:
        check_python(python, not args.no_install)

    version = run([corelm, "--version"], "corelm --version")[0].strip()
    load_start = os.getloadavg()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="corelm-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    keep = args.keep or bool(args.work)
    child_env = dict(os.environ)
    rows = []
    try:
        # ---- conversions (corelm)
        packages = {}
        for name, description, extra in corelm_rows:
            out = work / f"{name}.mlpackage"
            cmd = [corelm, "convert", gguf, "-o", out, "--context", args.context, *extra, "--force", "--json"]
            print(f"corelm convert {name} ...", file=sys.stderr, flush=True)
            stdout, measures = run(cmd, f"corelm convert ({name})", timed=True)
            summary = parse_json(stdout, f"corelm convert ({name})")
            packages[name] = out
            rows.append({"tool": "corelm", "name": name, "description": description,
                         "how": "`" + " ".join(["corelm convert GGUF --context", str(args.context), *extra]) + "`",
                         "command": [str(c) for c in cmd], "package": out,
                         "compress": {**measures, "convert_json": summary}})
        fp16 = packages["fp16"]
        for name, description, extra in COMPRESS_ROWS:
            if only and name not in only:
                continue
            out = work / f"{name}.mlpackage"
            cmd = [corelm, "compress", fp16, "-o", out, *extra, "--force", "--json"]
            print(f"corelm compress {name} ...", file=sys.stderr, flush=True)
            stdout, measures = run(cmd, f"corelm compress ({name})", timed=True)
            summary = parse_json(stdout, f"corelm compress ({name})")
            rows.append({"tool": "corelm", "name": name, "description": description,
                         "how": "`" + " ".join(["corelm compress fp16.mlpackage", *extra]) + "`",
                         "command": [str(c) for c in cmd], "package": out,
                         "compress": {**measures, "compress_json": summary}})

        # ---- the text: whole, or its first --max-tokens / --quick tokens (corelm's --max-tokens)
        max_tokens = args.max_tokens or (512 if args.quick else None)
        limit = ["--max-tokens", max_tokens] if max_tokens else []
        text_info = {"path": str(text_path.relative_to(REPO) if text_path.is_relative_to(REPO) else text_path),
                     "bytes": text_path.stat().st_size,
                     "sha256": hashlib.sha256(text_path.read_bytes()).hexdigest(),
                     "quick": bool(max_tokens), "max_tokens": max_tokens}
        score_text = text_path

        # ---- compressions (coremltools, on corelm's fp16 package)
        for name, description, function, kwargs in ct_rows:
            out = work / f"{name}.mlpackage"
            cmd = [python, Path(__file__).resolve(), "_ct-compress", "--row", name, "--input", fp16,
                   "--output", out, "--kmeans-workers", args.kmeans_workers,
                   *(["--all-consts"] if args.ct_all_consts else [])]
            print(f"coremltools {name} ...", file=sys.stderr, flush=True)
            stdout, measures = run(cmd, f"coremltools compression ({name})", env=child_env, timed=True)
            report = parse_json(stdout, f"coremltools compression ({name})")
            cfg = ", ".join(f"{k}={v!r}" for k, v in report["config"].items() if k != "class")
            rows.append({"tool": "coremltools", "name": name, "description": description,
                         "how": f"`{report['function']}(model, OptimizationConfig(global_config="
                                f"{report['config']['class']}({cfg}), op_name_configs="
                                f"{{{', '.join(repr(n) + ': None' for n in report['excluded_consts'])}}}))`",
                         "command": [str(c) for c in cmd], "package": out,
                         "compress": {**measures, "child": report}})

        # ---- quality: every package against the fp16 package, by the same command
        evaluated, _ = run([corelm, "eval", fp16, "--text", score_text, *limit, "--json"], "corelm eval (fp16)")
        fp16_eval = parse_json(evaluated, "corelm eval (fp16)")
        require_keys(fp16_eval, ["tokens", "windows", "perplexity"], "corelm eval")
        fp16_weights = dir_bytes(fp16 / WEIGHTS_DIR)
        for row in rows:
            pkg = row["package"]
            row["weights_bytes"] = dir_bytes(pkg / WEIGHTS_DIR)
            row["package_bytes"] = dir_bytes(pkg)
            if row["weights_bytes"] is None:
                raise BenchError(f"{pkg} has no {WEIGHTS_DIR}")
            row["size_ratio_vs_fp16"] = row["weights_bytes"] / fp16_weights
            if row["name"] == "fp16":
                row["quality"] = {"positions": fp16_eval.get("scored", fp16_eval["tokens"]),
                                  "perplexity": fp16_eval["perplexity"], "top1_agreement": 1.0,
                                  "mean_kl": 0.0, "max_abs_logit_error": 0.0, "eval": fp16_eval}
                continue
            print(f"corelm verify {row['name']} ...", file=sys.stderr, flush=True)
            cmd = [corelm, "verify", pkg, "--against", fp16, "--text", score_text, *limit, "--json"]
            stdout, measures = run(cmd, f"corelm verify ({row['name']})", timed=True)
            v = parse_json(stdout, f"corelm verify ({row['name']})")
            require_keys(v, ["positions", "top1_agreement", "max_abs_logit_error", "mean_kl",
                             "perplexity_package", "perplexity_reference"], "corelm verify")
            row["quality"] = {"positions": v["positions"], "perplexity": v["perplexity_package"],
                              "top1_agreement": v["top1_agreement"], "mean_kl": v["mean_kl"],
                              "max_abs_logit_error": v["max_abs_logit_error"], "verify": v,
                              "verify_seconds": measures["wall_seconds"]}
            ref = v["perplexity_reference"]
            if abs(ref - fp16_eval["perplexity"]) > 1e-3 * max(1.0, abs(ref)):
                row["quality"]["warning"] = (f"verify's reference perplexity {ref} differs from "
                                             f"corelm eval's {fp16_eval['perplexity']}")
                print(f"warning: {row['name']}: {row['quality']['warning']}", file=sys.stderr)
        if args.check_decompress:
            for row in rows:
                if row["tool"] != "coremltools":
                    continue
                pkg = row["package"]
                dec = work / f"{row['name']}-decompressed.mlpackage"
                print(f"decompress check {row['name']} ...", file=sys.stderr, flush=True)
                run([python, Path(__file__).resolve(), "_ct-decompress", "--input", pkg, "--output", dec],
                    f"coremltools decompress_weights ({row['name']})")
                stdout, _ = run([corelm, "verify", pkg, "--against", dec, "--text", score_text, *limit, "--json"],
                                f"corelm verify ({row['name']} against its decompression)")
                v = parse_json(stdout, f"corelm verify ({row['name']} against its decompression)")
                row["decompress_check"] = v
                shutil.rmtree(dec, ignore_errors=True)
        if len(rows) > 1:  # the fp16 row scores the same positions as every verify
            rows[0]["quality"]["positions"] = rows[1]["quality"]["positions"]

        by_name = {r["name"]: r for r in rows}
        comparisons = []
        for ours, theirs in PEERS.items():
            if ours in by_name and theirs in by_name:
                a, b = by_name[ours], by_name[theirs]
                comparisons.append({
                    "corelm": ours, "coremltools": theirs,
                    "size_ratio": a["weights_bytes"] / b["weights_bytes"],
                    "perplexity": [a["quality"]["perplexity"], b["quality"]["perplexity"]],
                    "top1_agreement": [a["quality"]["top1_agreement"], b["quality"]["top1_agreement"]],
                    "mean_kl": [a["quality"]["mean_kl"], b["quality"]["mean_kl"]],
                })

        ct_versions = next((r["compress"]["child"]["versions"] for r in rows if r["tool"] == "coremltools"), None)
        for row in rows:
            row["package"] = row["package"].name
        result = {
            "model": MODEL["name"],
            "source": str(gguf.relative_to(REPO) if gguf.is_relative_to(REPO) else gguf),
            "context": args.context,
            "text": text_info,
            "rows": rows,
            "comparisons": comparisons,
            "versions": {"corelm": version, **(ct_versions or {}), "python": platform.python_version()},
            "provenance": provenance(args.corelm),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                        "kmeans_workers": args.kmeans_workers},
        }
        table = markdown(result)
        print(table)
        out_json = Path(args.json_out)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out_json}", file=sys.stderr)
    finally:
        if keep:
            print(f"packages kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_ct-compress":
        p = argparse.ArgumentParser(prog="quality.py _ct-compress")
        p.add_argument("--row", required=True, choices=[r[0] for r in CT_ROWS])
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
        p.add_argument("--kmeans-workers", type=int, default=1)
        p.add_argument("--all-consts", action="store_true")
        return child_ct_compress(p.parse_args(argv[1:]))
    if argv and argv[0] == "_ct-decompress":
        p = argparse.ArgumentParser(prog="quality.py _ct-decompress")
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
        return child_ct_decompress(p.parse_args(argv[1:]))

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="score only the first 512 tokens of the text")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text")
    p.add_argument("--context", type=int, default=1024, help="context of every package (default 1024)")
    p.add_argument("--text", default=str(REPO / "bench" / "data" / "eval.txt"))
    p.add_argument("--gguf", default=str(MODEL["gguf"]))
    p.add_argument("--corelm", default=str(REPO / "target" / "release" / "corelm"))
    p.add_argument("--python", default=str(CACHE / "venv" / "bin" / "python"),
                   help="python with coremltools 9 + scikit-learn (default .cache/venv)")
    p.add_argument("--kmeans-workers", type=int, default=os.cpu_count() or 1,
                   help="coremltools palettize_weights num_kmeans_workers (default: all cores, like corelm)")
    p.add_argument("--ct-all-consts", action="store_true",
                   help="let coremltools compress every constant above its threshold, RoPE tables included")
    p.add_argument("--check-decompress", action="store_true",
                   help="also verify each coremltools package against coremltools' own decompression of it "
                        "(ct.optimize.coreml.decompress_weights): how closely corelm's interpreter follows "
                        "coremltools' dequantization")
    p.add_argument("--only", help="comma-separated row names (fp16 is always included)")
    p.add_argument("--skip-coremltools", action="store_true")
    p.add_argument("--no-install", action="store_true", help="do not pip-install bench/requirements-quality.txt")
    p.add_argument("--work", help="folder for the packages (kept)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--json-out", help="default bench/results/quality-smollm2.json "
                                      "(quality-smollm2-quick.json with --quick / --max-tokens)")
    args = p.parse_args(argv)
    if not args.json_out:
        quick = args.quick or args.max_tokens
        args.json_out = str(RESULTS / ("quality-smollm2-quick.json" if quick else "quality-smollm2.json"))
    try:
        main_driver(args)
    except BenchError as e:
        print(f"quality.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
