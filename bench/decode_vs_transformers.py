#!/usr/bin/env python3
"""Prefill and decode speed of corelm's reference interpreter against transformers on CPU, on the same
model, the same prompts and the same cores, measured in one run, with the fraction of the
memory-bandwidth roofline each reaches. Nothing here asserts on time: it prints a table and writes
bench/results/decode-smollm2.json.

    bench/decode_vs_transformers.py --context 1024

The driver needs only the standard library. Everything measured runs in a child process of its own:

  * corelm: the package variants (fp16, int8, int4: `corelm convert <gguf> --context N [--quantize
    SCHEME]`) are converted once, untimed; then `corelm run PKG --ids ... --max-new-tokens N --json`
    reports prefill_seconds (one call over the whole prompt) and decode_seconds (the N-1 greedy steps
    after the first generated token). Model loading happens before either clock starts.
  * transformers: `<ref python> bench/decode_vs_transformers.py _transformers ...` loads the same
    weights (the fp32 safetensors folder made from the same GGUF, or the GGUF itself), warms up, then
    times one forward over the prompt with use_cache (prefill) and N-1 greedy one-token forwards
    reusing the KV cache (decode), under torch.inference_mode() with torch.set_num_threads(cores).
  * bandwidth: `<ref python> bench/decode_vs_transformers.py _bandwidth` copies a 512 MB float32
    array (numpy, one thread; torch, all threads) and sums it (read only), at the start and at the end.

Roofline: a decode step has to read every weight once plus the KV rows attention looks at, so
tokens/s can be at most bandwidth / bytes-per-token; the fraction reported is measured decode tokens/s
divided by that bound.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
RESULTS = REPO / "bench" / "results"

MODEL = {
    "name": "SmolLM2-135M-Instruct",
    "gguf": CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
    # The fp32 safetensors folder bench/convert_vs_coremltools.py prepares from the same GGUF.
    "folder": CACHE / "models" / "smollm2-135m-hf",
    "reference": REPO / "tests" / "fixtures" / "real" / "smollm2" / "reference.json",
}

# corelm package variants: name and the extra `corelm convert` arguments. A variant whose arguments
# name a flag the binary does not have is reported as n/a instead of failing the run.
# Every weight form the interpreter decodes: the fp16 weights and their re-quantizations (which
# dequantize the GGUF first), and the GGUF's own Q4_1 grid as corelm carries it by default.
VARIANTS = [
    ("fp16", ["--dequantize"]),
    ("int8", ["--dequantize", "--quantize", "int8"]),
    ("int4", ["--dequantize", "--quantize", "int4"]),
    ("int4-offset", ["--dequantize", "--quantize", "int4", "--offset"]),
    ("lut4", ["--dequantize", "--quantize", "lut4"]),
    ("lut6", ["--dequantize", "--quantize", "lut6"]),
    ("gguf-q4_1", []),
]

# transformers rows: name and torch dtype name. fp32 is the main peer.
TRANSFORMERS_DTYPES = [("fp32", "float32"), ("bf16", "bfloat16")]

ARRAY_MB = 512


# ------------------------------------------------------------------------------------------------
# children (run inside the reference venv)


def child_bandwidth(args):
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    n = args.array_mb * 2**20 // 4
    a = np.full(n, 1.0, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)  # fault every page in before timing
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)

    def timed(fn, repeats):
        fn()
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    nbytes = a.nbytes
    runs = {
        # copy: read + write counted (2 x bytes / time); write-allocate traffic is not counted.
        "numpy_copy_1_thread": [2 * nbytes / t / 1e9 for t in timed(lambda: np.copyto(b, a), args.repeats)],
        "torch_copy_all_threads": [2 * nbytes / t / 1e9 for t in timed(lambda: tb.copy_(ta), args.repeats)],
        # read only: bytes / time.
        "numpy_sum_1_thread": [nbytes / t / 1e9 for t in timed(lambda: a.sum(), args.repeats)],
        "torch_sum_all_threads": [nbytes / t / 1e9 for t in timed(lambda: ta.sum(), args.repeats)],
    }
    print(json.dumps({"array_bytes": nbytes, "threads": args.threads, "gb_per_s": runs,
                      "numpy": np.__version__, "torch": torch.__version__}))


def child_transformers(args):
    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    t1 = time.perf_counter()
    if args.gguf:
        gguf = Path(args.gguf)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=dtype)
    model.eval()
    t2 = time.perf_counter()

    import inspect

    # transformers 5 calls the KV cache argument `cache` (4.x: past_key_values).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def cache_of(out):
        c = getattr(out, "cache", None)
        return c if c is not None else out.past_key_values

    def generate(ids, new_tokens):
        """Prefill, then new_tokens-1 greedy one-token steps; the same split as `corelm run`."""
        x = torch.tensor([ids], dtype=torch.long)
        start = time.perf_counter()
        # logits_to_keep=1 as generate() does: only the last position's logits are computed.
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        nxt = out.logits[0, -1].argmax()
        generated = [int(nxt)]
        prefill = time.perf_counter() - start
        cache = cache_of(out)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt.view(1, 1), use_cache=True, **{cache_arg: cache})
            cache = cache_of(out)
            nxt = out.logits[0, -1].argmax()
            generated.append(int(nxt))
        decode = time.perf_counter() - start
        return {"prompt_len": len(ids), "prefill_seconds": prefill, "decode_seconds": decode,
                "decode_steps": new_tokens - 1, "generated_ids": generated}

    with torch.inference_mode():
        # Warm-up (untimed): first calls pay one-off allocation and kernel selection.
        generate(args.short, 4)
        generate(args.long, 1)
        results = {"short": generate(args.short, args.new_tokens), "long": generate(args.long, args.new_tokens)}

    cfg = model.config
    params = {id(p): p for p in model.parameters()}  # tied embeddings counted once
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    print(json.dumps({
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "import_seconds": t1 - t0,
        "load_seconds": t2 - t1,
        "parameters": sum(p.numel() for p in params.values()),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params.values()),
        "kv": {"layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads, "head_dim": head_dim,
               "bytes_per_element": torch.finfo(dtype).bits // 8},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "runs": results,
    }))


# ------------------------------------------------------------------------------------------------
# driver


def run_measured(cmd, log_path):
    """Run cmd as one child; return (rc, wall seconds, rusage extract, stdout)."""
    with open(log_path, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        out = [line for line in proc.stdout]
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    # Involuntary context switches: how often the child was pushed off a core (by other processes
    # or by its own threads outnumbering the free cores), a direct sign of interference.
    use = {"peak_rss_mb": usage.ru_maxrss / 1024.0, "cpu_seconds": usage.ru_utime + usage.ru_stime,
           "involuntary_context_switches": usage.ru_nivcsw}
    return os.waitstatus_to_exitcode(status), wall, use, "".join(out)


def binary_identity(path):
    """The corelm binary measured: it may be newer or older than the checked-out commit."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"path": str(p), "sha256": h.hexdigest(),
            "modified": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(p.stat().st_mtime))}


# Bytes the interpreter holds per stored element, by package dtype (crates/corelm-interp,
# value::Packed): fp16 matrices stay fp16; blockwise int8/int4 matrices and 4-bit palettes stay as
# stored (int4 two values a byte) with f32 scales or palettes; other palette indices (lut6, lut8)
# are expanded to fp16 matrices. Update this table when the interpreter's layout changes.
def interpreter_weight_bytes(bytes_by_dtype):
    quantized = any(k in bytes_by_dtype for k in ("int8", "int4", "uint4", "uint6", "uint8"))
    total = 0.0
    for dtype, nbytes in bytes_by_dtype.items():
        if dtype in ("int8", "int4", "uint4"):
            total += nbytes  # held as stored
        elif dtype in ("uint6", "uint8"):
            total += nbytes * 16 / int(dtype[4:])  # palette indices, expanded to fp16
        elif dtype == "fp16":
            # Without integer weights the fp16 bytes are the matrices (kept fp16; the few small
            # vectors that become f32 are negligible); with them, they are mostly the scales (f32).
            total += 2 * nbytes if quantized else nbytes
        elif dtype == "fp32":
            total += nbytes
        else:
            bits = {"uint8": 8, "int16": 16, "uint16": 16, "bf16": 16, "uint1": 1, "uint2": 2, "uint3": 3,
                    "uint6": 6}.get(dtype, 32)
            total += nbytes * 32 / bits
    return total


def last_json(text):
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def tail(path, n=5):
    try:
        return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def machine():
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_kb"] = int(line.split()[1])
    except OSError:
        pass
    return info


def git_state():
    def git(*a):
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "modified_files": dirty.splitlines() if dirty else []}


def prompts(long_tokens):
    ref = json.loads(MODEL["reference"].read_text())
    short = ref["prompts"][0]["prompt_ids"]
    base = ref["prompts"][1]["prompt_ids"]
    long = (base * (long_tokens // len(base) + 1))[:long_tokens]
    return short, long, ref["prompts"][0]["name"], ref["prompts"][1]["name"]


def best_median(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return max(values), statistics.median(values)


def tok_s(tokens, seconds):
    return tokens / seconds if seconds and seconds > 0 else None


def kv_row_bytes(kv, bytes_per_element):
    """K and V of one position over all layers."""
    return 2 * kv["layers"] * kv["kv_heads"] * kv["head_dim"] * bytes_per_element


def avg_kv_rows(prompt_len, new_tokens):
    """Decode steps feed positions prompt_len .. prompt_len+new_tokens-2; the step at position p
    attends over p+1 rows, so the mean is prompt_len + new_tokens/2."""
    return prompt_len + new_tokens / 2


def fmt(v, spec=".1f", width=10):
    if v is None:
        return "n/a".rjust(width)
    return format(v, spec).rjust(width)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("_transformers", help="(child) time transformers prefill and decode")
    p.add_argument("--dtype", required=True)
    p.add_argument("--folder")
    p.add_argument("--gguf")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--short", type=lambda s: [int(x) for x in s.split(",")], required=True)
    p.add_argument("--long", type=lambda s: [int(x) for x in s.split(",")], required=True)

    p = sub.add_parser("_bandwidth", help="(child) memory copy bandwidth")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--array-mb", type=int, default=ARRAY_MB)
    p.add_argument("--repeats", type=int, default=5)

    parser.add_argument("--context", type=int, default=1024, help="KV cache length of the packages")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row (best and median)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--long-tokens", type=int, default=256, help="length of the long prompt")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads of both: torch's, and corelm's rayon pool (RAYON_NUM_THREADS)")
    parser.add_argument("--variants", default=",".join(v for v, _ in VARIANTS),
                        help="corelm package variants to run")
    parser.add_argument("--transformers-dtypes", default=",".join(d for d, _ in TRANSFORMERS_DTYPES))
    parser.add_argument("--from-gguf", action="store_true",
                        help="transformers loads the GGUF even if the fp32 folder exists")
    parser.add_argument("--ref-python", default=str(CACHE / "venv-ref" / "bin" / "python"),
                        help="python with torch, transformers and numpy")
    parser.add_argument("--corelm", default=str(REPO / "target" / "release" / "corelm"))
    parser.add_argument("--build", action="store_true", help="cargo build --release -p corelm-cli first")
    parser.add_argument("--work", default=None, help="where packages and logs go (default: temp dir, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--output", default=str(RESULTS / "decode-smollm2.json"))
    args = parser.parse_args(argv)

    if args.command == "_transformers":
        return child_transformers(args)
    if args.command == "_bandwidth":
        return child_bandwidth(args)

    script = str(Path(__file__).resolve())
    # corelm's children inherit this: its rayon pool gets as many threads as torch.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    if args.build:
        subprocess.run(["cargo", "build", "--release", "-p", "corelm-cli"], cwd=REPO, check=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="corelm-decode-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # Run a private copy: a rebuild of target/release during the run would otherwise mix binaries.
    corelm = str(work / "corelm")
    shutil.copy2(args.corelm, corelm)
    load_start = os.getloadavg()
    started = time.time()

    short, long, short_name, long_name = prompts(args.long_tokens)
    if max(len(short), len(long)) + args.new_tokens > args.context:
        raise SystemExit(f"prompt + {args.new_tokens} new tokens does not fit a context of {args.context}")
    prompt_set = {"short": short, "long": long}
    version = subprocess.run([corelm, "--version"], capture_output=True, text=True).stdout.strip()
    convert_help = subprocess.run([corelm, "convert", "--help"], capture_output=True, text=True).stdout
    print(f"{version}; {machine().get('cpu', '?')}, {os.cpu_count()} cores; load average {load_start}")
    print(f"prompts: short {len(short)} tokens ({short_name}), long {len(long)} tokens ({long_name} repeated); "
          f"{args.new_tokens} new tokens; {args.repeats} repeats")

    # ---- bandwidth (start)
    bandwidth = []

    def measure_bandwidth(when):
        rc, wall, use, out = run_measured([args.ref_python, script, "_bandwidth", "--threads", str(args.threads)],
                                          work / f"bandwidth-{when}.log")
        if rc != 0:
            print(f"bandwidth measurement failed: {tail(work / f'bandwidth-{when}.log')}")
            return
        rec = last_json(out)
        rec["when"] = when
        bandwidth.append(rec)

    measure_bandwidth("start")

    # ---- corelm packages (untimed conversion)
    variants = {}
    wanted = args.variants.split(",") if args.variants else []
    for name, extra in VARIANTS:
        if name not in wanted:
            continue
        rec = {"convert_args": extra}
        variants[name] = rec
        missing = [a for a in extra if a.startswith("--") and a not in convert_help]
        if missing:
            rec["na"] = "compression not implemented yet"
            continue
        pkg = work / f"smollm2-{name}.mlpackage"
        cmd = [corelm, "convert", str(MODEL["gguf"]), "-o", str(pkg), "--context", str(args.context),
               "--force", "--json", *extra]
        rc, wall, use, out = run_measured(cmd, work / f"convert-{name}.log")
        if rc != 0:
            rec["na"] = f"conversion failed: {tail(work / f'convert-{name}.log', 2)}"
            continue
        rec["convert"] = last_json(out)
        insp = subprocess.run([corelm, "inspect", "--json", str(pkg)], capture_output=True, text=True)
        info = json.loads(insp.stdout)
        state = info["functions"][info["default_function"] if info.get("default_function") else "main"]["states"][0]
        layers, _, kv_heads, _, head_dim = state["shape"]
        rec.update(package=str(pkg), weights=info["weights"], state_dtype=state["dtype"],
                   kv={"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim}, runs=[])

    # ---- transformers source
    if MODEL["folder"].is_dir() and not args.from_gguf:
        tf_source = ["--folder", str(MODEL["folder"])]
    else:
        tf_source = ["--gguf", str(MODEL["gguf"])]
    tf = {}
    for name, dtype in TRANSFORMERS_DTYPES:
        if name in args.transformers_dtypes.split(","):
            tf[name] = {"dtype": dtype, "source": tf_source[1], "runs": []}

    # ---- measured runs, interleaved so load changes hit every row alike
    for rep in range(args.repeats):
        for name, rec in variants.items():
            if "na" in rec:
                continue
            run = {"repeat": rep}
            for which, ids in prompt_set.items():
                cmd = [corelm, "run", rec["package"], "--ids", ",".join(map(str, ids)),
                       "--max-new-tokens", str(args.new_tokens), "--ignore-eos", "--json"]
                log = work / f"corelm-{name}-{which}-{rep}.log"
                rc, wall, use, out = run_measured(cmd, log)
                if rc != 0:
                    run[which] = {"error": tail(log)}
                    continue
                r = last_json(out)
                r["decode_steps"] = max(len(r["generated_ids"]) - 1, 0)
                r["prompt_len"] = len(r["prompt_ids"])
                del r["prompt_ids"]
                r.update(wall_seconds=wall, **use)
                run[which] = r
            rec["runs"].append(run)
            print(f"  [{rep + 1}/{args.repeats}] corelm {name}: " + ", ".join(
                f"{w} prefill {tok_s(run[w].get('prompt_len', 0), run[w].get('prefill_seconds')) or 0:.1f} tok/s "
                f"decode {tok_s(run[w].get('decode_steps', 0), run[w].get('decode_seconds')) or 0:.1f} tok/s"
                for w in prompt_set), flush=True)
        for name, rec in tf.items():
            if "na" in rec:
                continue
            cmd = [args.ref_python, script, "_transformers", "--dtype", rec["dtype"], *tf_source,
                   "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                   "--short", ",".join(map(str, short)), "--long", ",".join(map(str, long))]
            log = work / f"transformers-{name}-{rep}.log"
            rc, wall, use, out = run_measured(cmd, log)
            if rc != 0:
                rec["na"] = f"transformers {name} failed: {tail(log, 2)}"
                continue
            r = last_json(out)
            r.update(repeat=rep, wall_seconds=wall, **use)
            for k in ("parameters", "parameter_bytes", "kv", "versions", "cpu_capability", "attn_implementation"):
                rec[k] = r.pop(k)
            runs = r.pop("runs")
            rec["runs"].append({**r, **runs})
            print(f"  [{rep + 1}/{args.repeats}] transformers {name}: " + ", ".join(
                f"{w} prefill {tok_s(runs[w]['prompt_len'], runs[w]['prefill_seconds']):.1f} tok/s "
                f"decode {tok_s(runs[w]['decode_steps'], runs[w]['decode_seconds']):.1f} tok/s"
                for w in prompt_set), flush=True)

    measure_bandwidth("end")
    load_end = os.getloadavg()

    # ---- bandwidth used for the roofline: the best copy figure (read + write) of any run.
    copy_gbs = max((max(b["gb_per_s"][k]) for b in bandwidth for k in b["gb_per_s"] if "copy" in k), default=None)
    read_gbs = max((max(b["gb_per_s"][k]) for b in bandwidth for k in b["gb_per_s"] if "sum" in k), default=None)

    # ---- summary rows
    rows = []

    def summarise(label, runs, weight_bytes_pkg, weight_bytes_mem, kv, kv_pkg_bpe, kv_mem_bpe, note=None):
        row = {"label": label, "note": note}
        if runs is None:
            rows.append(row)
            return
        for which in prompt_set:
            ok = [r[which] for r in runs if which in r and "error" not in r[which]]
            row[f"prefill_{which}"] = best_median([tok_s(r["prompt_len"], r["prefill_seconds"]) for r in ok])
            row[f"decode_{which}"] = best_median([tok_s(r["decode_steps"], r["decode_seconds"]) for r in ok])
        rows_read = avg_kv_rows(len(short), args.new_tokens)
        row["bytes_per_token_pkg"] = weight_bytes_pkg + rows_read * kv_row_bytes(kv, kv_pkg_bpe)
        row["bytes_per_token_mem"] = weight_bytes_mem + rows_read * kv_row_bytes(kv, kv_mem_bpe)
        best_decode = row["decode_short"][0]
        for key in ("pkg", "mem"):
            row[f"roofline_{key}"] = (best_decode * row[f"bytes_per_token_{key}"] / (copy_gbs * 1e9)
                                      if best_decode and copy_gbs else None)
        rows.append(row)

    for name, rec in variants.items():
        if "na" in rec:
            summarise(f"corelm {name}", None, 0, 0, None, 0, 0, note=rec["na"])
            continue
        state_bpe = {"fp16": 2, "fp32": 4}.get(rec["state_dtype"], 2)
        # Package bytes: what the weights weigh in the package (what a runtime keeping them as stored
        # reads per token), fp16 KV. Interpreter bytes: the layout it holds them in (see
        # interpreter_weight_bytes) and its f32 KV cache.
        rec["interpreter_weight_bytes"] = interpreter_weight_bytes(rec["weights"]["bytes_by_dtype"])
        summarise(f"corelm {name}", rec["runs"], rec["weights"]["total_bytes"], rec["interpreter_weight_bytes"],
                  rec["kv"], state_bpe, 4)
    for name, rec in tf.items():
        if "na" in rec or not rec["runs"]:
            summarise(f"transformers {name}", None, 0, 0, None, 0, 0, note=rec.get("na", "no runs"))
            continue
        bpe = rec["kv"]["bytes_per_element"]
        tf_runs = [{w: r[w] for w in prompt_set} for r in rec["runs"]]
        summarise(f"transformers {name}", tf_runs, rec["parameter_bytes"], rec["parameter_bytes"], rec["kv"], bpe, bpe)

    # ---- greedy agreement with transformers fp32 (a sanity check that both run the same model)
    agreement = {}
    ref_ids = {w: tf["fp32"]["runs"][0][w]["generated_ids"] for w in prompt_set} if tf.get("fp32", {}).get("runs") else None
    for label, runs in [(f"corelm {n}", r.get("runs")) for n, r in variants.items()] + \
                       [(f"transformers {n}", r.get("runs")) for n, r in tf.items() if n != "fp32"]:
        if not runs or ref_ids is None:
            continue
        agreement[label] = {}
        for w in prompt_set:
            ids = runs[0].get(w, {}).get("generated_ids", [])
            same = next((i for i, (a, b) in enumerate(zip(ids, ref_ids[w])) if a != b), min(len(ids), len(ref_ids[w])))
            agreement[label][w] = same

    # ---- print
    cols = [("prefill_short", f"prefill {len(short)}"), ("prefill_long", f"prefill {len(long)}"),
            ("decode_short", f"decode @{len(short)}"), ("decode_long", f"decode @{len(long)}")]

    def table(pick, title):
        print(f"\n{title}")
        print(f"{'tokens/s':<20}" + "".join(f"{h:>13}" for _, h in cols)
              + f"{'MB/token':>11}{'roofline':>10}{'(in RAM)':>10}")
        for row in rows:
            if row.get("note"):
                print(f"{row['label']:<20}  n/a ({row['note']})")
                continue
            line = f"{row['label']:<20}" + "".join(fmt(row[k][pick], ".1f", 13) for k, _ in cols)
            if pick == 0:
                line += fmt(row["bytes_per_token_pkg"] / 1e6, ".0f", 11)
                line += fmt(100 * row["roofline_pkg"] if row["roofline_pkg"] else None, ".1f", 9) + "%"
                line += fmt(100 * row["roofline_mem"] if row["roofline_mem"] else None, ".1f", 9) + "%"
            print(line)

    print(f"\n{MODEL['name']}, context {args.context}, {args.threads} threads, {args.new_tokens} new tokens; "
          f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    table(0, f"best of {args.repeats} (min time)")
    table(1, f"median of {args.repeats}")

    by_label = {r["label"]: r for r in rows}
    print("\nratios corelm / transformers (best of each; > 1 means corelm is faster)")
    for peer in ("transformers fp32", "transformers bf16"):
        p = by_label.get(peer)
        if not p or p.get("note"):
            continue
        for name in variants:
            c = by_label.get(f"corelm {name}")
            if not c or c.get("note"):
                continue
            print(f"{'corelm ' + name + ' / ' + peer.split()[1]:<20}" + "".join(
                fmt(c[k][0] / p[k][0] if c[k][0] and p[k][0] else None, ".2f", 12) + "x" for k, _ in cols))
    print(f"\nbandwidth: copy {copy_gbs:.1f} GB/s (best; 2 x 512 MB / time, numpy 1 thread and torch "
          f"{args.threads} threads), read-only sum {read_gbs:.1f} GB/s" if copy_gbs else "\nbandwidth: n/a")
    print(f"roofline = decode tok/s @{len(short)} x bytes per token / copy bandwidth. MB/token = weights as "
          f"stored (package; transformers: its parameters) + KV rows at the mean decode position "
          f"({avg_kv_rows(len(short), args.new_tokens):.0f}). '(in RAM)' counts the bytes in the layout the "
          f"interpreter holds (interpreter_weight_bytes; f32 KV cache).")
    if agreement:
        print("greedy tokens equal to transformers fp32 before the first difference: " + "; ".join(
            f"{k} {v['short']}/{args.new_tokens} (short), {v['long']}/{args.new_tokens} (long)"
            for k, v in agreement.items()))

    # ---- JSON
    out = {
        "model": MODEL["name"],
        "gguf": str(MODEL["gguf"].relative_to(REPO)) if MODEL["gguf"].is_relative_to(REPO) else str(MODEL["gguf"]),
        "context": args.context,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "prompts": {"short": {"name": short_name, "ids": short}, "long": {"name": long_name + " repeated", "ids": long}},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "load_average": {"start": load_start, "end": load_end},
        "machine": machine(),
        "versions": {"corelm": version, "git": git_state(),
                     "corelm_binary": {**binary_identity(corelm), "copied_from": args.corelm},
                     "transformers_side": next((r["versions"] for r in tf.values() if "versions" in r), None)},
        "bandwidth": {"runs": bandwidth, "copy_gb_per_s_used": copy_gbs, "read_gb_per_s_best": read_gbs,
                      "definition": "copy: 2 x bytes / time (read + write, write-allocate not counted); "
                                    "sum: bytes / time; the roofline uses the best copy figure"},
        "roofline": {"bytes_per_token": "weights (package bytes; or as held in RAM by the interpreter: fp16 "
                                        "matrices as fp16, int8/int4 one byte a value + f32 scales) + KV rows "
                                        "read at the mean decode position (package: fp16, interpreter: f32)",
                     "fraction": "best decode tok/s after the short prompt x bytes_per_token / best copy bandwidth",
                     "mean_kv_rows": avg_kv_rows(len(short), args.new_tokens)},
        "summary": rows,
        "greedy_agreement_with_transformers_fp32": agreement,
        "corelm": variants,
        "transformers": tf,
        "provenance": provenance(corelm),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {args.output}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    elif args.keep:
        print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
