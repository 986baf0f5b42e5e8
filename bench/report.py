#!/usr/bin/env python3
"""The README's measured figures, rendered from the result files the bench scripts write, so that no
figure in the README can be typed by hand or go stale without a trace. Each table names the result
file it comes from and that run's provenance (commit, binary SHA-256, machine, date); a result file
without provenance is an error. Rows where corelm loses say so.

    bench/report.py           # print the section
    bench/report.py --write   # replace the section between the markers in README.md
    bench/report.py --check   # exit 1 when README.md differs from what the result files say

Standard library only: scripts/test.sh runs `--check`.
"""

import functools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"
BEGIN = "<!-- bench/report.py: begin (generated from bench/results; do not edit by hand) -->"
END = "<!-- bench/report.py: end -->"


class ReportError(Exception):
    pass


def load(name):
    path = RESULTS / name
    data = json.loads(path.read_text())
    p = data.get("provenance")
    if not p or not all(p.get(k) for k in ("commit", "binary_sha256", "machine", "date")):
        raise ReportError(f"{path.relative_to(REPO)} has no provenance (commit, binary SHA-256, machine, date): rerun its bench")
    return data


def source(name, data):
    p = data["provenance"]
    m = p["machine"]
    dirty = " (modified tree)" if p["modified_files"] else ""
    return (f"<sub>`bench/results/{name}`: commit {p['commit'][:10]}{dirty}, corelm binary SHA-256 "
            f"{p['binary_sha256'][:12]}…, {m['cpu']}, {m['cores']} cores, {p['date'][:10]}</sub>")


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def ratio(a, b):
    return f"{a / b:.1f}×"


def convert_section():
    name = "convert-smollm2.json"
    d = load(name)
    s = d["summary"]
    rows = [[tool, f"{s[tool]['wall_seconds']:.2f}", f"{s[tool]['cpu_seconds']:.2f}", f"{s[tool]['peak_rss_mb']:.0f}",
             f"{s[tool]['output_bytes'] / 1e6:.1f}"] for tool in ("corelm", "coremltools")]
    wall = s["coremltools"]["wall_seconds"] / s["corelm"]["wall_seconds"]
    mem = s["coremltools"]["peak_rss_mb"] / s["corelm"]["peak_rss_mb"]
    return [
        f"**Conversion** (`bench/convert_vs_coremltools.py`): {d['model']}, the same fp32 safetensors folder, context "
        f"{d['context']}, best of {d['repeats']} runs each.",
        "",
        *table(["tool", "wall s", "CPU s", "peak RSS MB", "package MB"], rows),
        "",
        f"corelm is {wall:.0f}× faster and peaks at {1 / mem:.2f}× coremltools' memory"
        f" ({'ahead' if wall > 1 and mem > 1 else 'a loss on one of them'}).",
        "",
        source(name, d),
    ]


def decode_section(name="decode-smollm2.json"):
    d = load(name)
    short, long = (len(d["prompts"][k]["ids"]) for k in ("short", "long"))
    best = lambda v: f"{max(v):.0f}" if v else "n/a"  # noqa: E731
    measured = [r for r in d["summary"] if not r.get("note")]
    rows = [[r["label"], best(r["prefill_short"]), best(r["prefill_long"]), f"{max(r['decode_short']):.1f}",
             f"{max(r['decode_long']):.1f}", f"{r['bytes_per_token_pkg'] / 1e6:.0f}",
             f"{100 * r['roofline_pkg']:.0f}%" if r.get("roofline_pkg") else "n/a"] for r in measured]
    fp16 = next((r for r in measured if r["label"] == "corelm fp16"), None)
    by_label = {r["label"]: r for r in d["summary"]}
    # Each loss once: a column and a peer, with every corelm row that trails it.
    notes = []
    columns = {"prefill_short": f"prefill {short}", "prefill_long": f"prefill {long}",
               "decode_short": f"decode after {short}", "decode_long": f"decode after {long}"}
    for what, column in columns.items():
        for peer in ("transformers fp32", "transformers bf16"):
            if peer not in by_label:
                continue
            theirs = max(by_label[peer][what])
            behind = [f"{r['label'].removeprefix('corelm ')} {max(r[what]):.1f}" for r in measured
                      if r["label"].startswith("corelm") and max(r[what]) < theirs]
            if behind:
                notes.append(f"{column}, {peer} {theirs:.1f} ahead of corelm {', '.join(behind)}")
    return [
        f"**Prefill and decode** (`bench/decode_vs_transformers.py`): {d['model']}, context {d['context']}, "
        f"{d['threads']} thread{'s' if d['threads'] != 1 else ''}, best of {d['repeats']}, transformers measured in "
        f"the same run; tokens/s.",
        "",
        *table(["", f"prefill {short}", f"prefill {long}", f"decode after {short}", f"decode after {long}",
                "MB read per token", "of roofline"], rows),
        "",
        f"MB read per token: the package's weights plus the KV rows attention reads (averaged over the decode "
        f"after {short}); of roofline: that decode's tok/s × MB per token ÷ the copy bandwidth measured in the same "
        f"run ({d['bandwidth']['copy_gb_per_s_used']:.1f} GB/s).",
        *([f"Decode after {short} against corelm fp16: " + ", ".join(
            f"{r['label'].removeprefix('corelm ')} {max(r['decode_short']) / max(fp16['decode_short']):.2f}×"
            for r in measured if r["label"].startswith("corelm") and r is not fp16) + "."] if fp16 else []),
        "",
        *(["Losses: " + "; ".join(notes) + "."] if notes else ["corelm is ahead in every column."]),
        "",
        source(name, d),
    ]


def quality_section():
    name = "quality-smollm2.json"
    d = load(name)
    rows = []
    for r in d["rows"]:
        q = r["quality"]
        seconds = r["compress"].get("wall_seconds")
        rows.append([r["tool"], r["name"], f"{r['size_ratio_vs_fp16']:.3f}", f"{q['perplexity']:.2f}",
                     f"{100 * q['top1_agreement']:.1f}%", f"{q['mean_kl']:.4f}",
                     f"{seconds:.1f}" if seconds is not None else "n/a"])
    versus = []
    for c in d["comparisons"]:
        kl_ours, kl_theirs = c["mean_kl"]
        verdict = "corelm ahead" if kl_ours < kl_theirs else "**coremltools ahead**"
        versus.append([c["corelm"], c["coremltools"], f"{c['size_ratio']:.3f}", f"{kl_ours:.4f} / {kl_theirs:.4f}",
                       f"{100 * c['top1_agreement'][0]:.1f}% / {100 * c['top1_agreement'][1]:.1f}%",
                       f"{c['perplexity'][0]:.2f} / {c['perplexity'][1]:.2f}", verdict])
    fp16 = next(r for r in d["rows"] if r["name"] == "fp16")
    return [
        f"**Compression quality** (`bench/quality.py`): {d['model']}, every package scored against the fp16 "
        f"package on `bench/data/eval.txt` ({fp16['quality']['positions']} positions, windows of {d['context']}); "
        "calibrated rows read `bench/data/calibration.txt`, which does not overlap it.",
        "",
        *table(["tool", "package", "size vs fp16", "perplexity", "top-1 agreement", "mean KL", "seconds"], rows),
        "",
        "Like for like, both tools compressing the same fp16 package (corelm / coremltools):",
        "",
        *table(["corelm", "coremltools", "size ratio", "mean KL", "top-1 agreement", "perplexity", ""], versus),
        "",
        source(name, d),
    ]


def weight_error_section():
    name = "weight-error-smollm2.json"
    d = load(name)
    rows = []
    for s in d["schemes"]:
        e = s["relative_squared_error"]
        verdict = "corelm ahead" if e["corelm"] < e["coremltools"] else "**coremltools ahead**"
        rows.append([s["scheme"], f"{e['corelm']:.3e}", f"{e['coremltools']:.3e}",
                     f"{100 * s['rows_where_corelm_is_at_most_coremltools']:.1f}%", verdict])
    return [
        "**Weight reconstruction** (`bench/weight_error.py`): relative squared error of the rebuilt linear weights "
        "against the fp16 package's, both tools compressing that package (no sampling noise).",
        "",
        *table(["scheme", "corelm", "coremltools", "rows where corelm ≤ coremltools", ""], rows),
        "",
        source(name, d),
    ]


def paired_section():
    name = "paired-smollm2.json"
    d = load(name)
    rows = []
    for s in d["schemes"]:
        diff, se = s["mean_kl_difference_corelm_minus_coremltools"], s["standard_error"]
        verdict = ("corelm ahead" if diff < -2 * se else "**coremltools ahead**" if diff > 2 * se
                   else "within two standard errors")
        rows.append([s["scheme"], f"{s['mean_kl']['corelm']:.5f}", f"{s['mean_kl']['coremltools']:.5f}",
                     f"{diff:+.5f} ± {se:.5f}", f"{s['top1_only_corelm']} / {s['top1_only_coremltools']}", verdict])
    return [
        "**Paired per-position KL** (`bench/paired.py`, `corelm verify --positions`): both compressions of the "
        "fp16 package scored position by position on the same text.",
        "",
        *table(["scheme", "KL corelm", "KL coremltools", "difference ± s.e.", "top-1 kept only by corelm / coremltools",
                ""], rows),
        "",
        source(name, d),
    ]


def gguf_grids_section():
    name = "gguf-grids.json"
    d = load(name)
    out = [f"**GGUF grids** (`bench/gguf_grids.py`): each registry GGUF converted keeping its grids (the default) "
           f"and with `--dequantize`; the carried package scored against the dequantized one on `{d['text']}` "
           f"(windows of {d['context']}), and 32 greedy tokens after each of a few prompts: fp16 packages, and fp32 "
           "ones, where scales and offsets are fp32 and computation adds no fp16 rounding, so that only the weight "
           "forms differ. Targets: KL ≤ 1e-4, top-1 ≥ 99.9 %, greedy identical, weights ≤ 1.3× the GGUF's.", ""]
    for m in d["models"]:
        rows = []
        for t in m["types"]:
            how = ", ".join(f"{t[k]} {label}" for k, label in (("exact", "exact"), ("scale_rounded", "fp16 scales"),
                                                               ("dequantized", "dequantized"),
                                                               ("requantized", "re-quantized")) if t[k])
            rows.append([t["source_type"], t["tensors"], how, f"{t['max_error']:.1e}", f"{t['source_bytes'] / 1e6:.1f}",
                         f"{t['package_bytes'] / 1e6:.1f}", f"{t['package_bytes'] / t['source_bytes']:.2f}×"])
        w, floor = m["weights"], m["against_fp32"]
        scored = []
        for label, p in (("fp16", m), ("fp32", m["fp32_packages"])):
            v, g = p["against_dequantized"], p["greedy"]
            met = v["mean_kl"] <= 1e-4 and v["top1_agreement"] >= 0.999 and g["identical"] == g["prompts"]
            scored.append([f"{label} packages", f"{v['mean_kl']:.1e}", f"{100 * v['top1_agreement']:.2f}%",
                           f"{v['max_abs_logit_error']:.2g}", f"{g['identical']}/{g['prompts']}",
                           "meets the targets" if met else "**misses a target**"])
        out += [f"{m['model']}: weights {w['ratio']:.3f}× the GGUF's "
                f"({'meets' if w['ratio'] <= 1.3 else '**misses**'} the target).", "",
                *table(["type", "tensors", "carried", "max error", "GGUF MB", "package MB", "ratio"], rows), "",
                f"Carried against `--dequantize`, {m['against_dequantized']['positions']} positions:", "",
                *table(["", "mean KL", "top-1", "max logit error", "greedy identical", ""], scored), "",
                f"The fp16 floor, against a float32 conversion of the GGUF: carried KL {floor['carried']['mean_kl']:.1e}, "
                f"top-1 {100 * floor['carried']['top1_agreement']:.2f}%; dequantized fp16 KL "
                f"{floor['dequantized']['mean_kl']:.1e}, top-1 {100 * floor['dequantized']['top1_agreement']:.2f}%.", ""]
    return out + [source(name, d)]


def hybrid_section():
    name = "hybrid-prefill.json"
    d = load(name)
    rows = []
    for r in d["rows"]:
        n = r["prompt_tokens"]
        rows.append([r["model"], f"{n / r['corelm_prefill_seconds']:.1f}", f"{n / r['corelm_steps_seconds']:.1f}",
                     ratio(r["corelm_steps_seconds"], r["corelm_prefill_seconds"]),
                     "meets" if r["corelm_speedup"] >= 4 else "**misses**",
                     f"{n / r['transformers_fp32_prefill_seconds']:.1f}", f"{n / r['transformers_fp32_steps_seconds']:.1f}",
                     ratio(r["transformers_fp32_prefill_seconds"], r["corelm_prefill_seconds"])
                     + (" (**corelm slower**)" if r["corelm_prefill_seconds"] > r["transformers_fp32_prefill_seconds"] else "")])
    return [f"**Hybrid prefill** (`bench/hybrid_prefill.py`): random-weight checkpoints with the layer widths of "
            f"Qwen3.5-0.8B and LFM2-350M, and Granite 4.0-H's layer kinds (Mamba-2) at widths of our choosing (8 layers, "
            f"vocabulary 8192), fp16 packages on the interpreter; a "
            f"{d['rows'][0]['prompt_tokens']}-token prompt in one driver feed against as many one-token calls "
            f"(target: ≥ 4×), and transformers float32 on the same checkpoint ({d['threads']} threads); tokens/s.", "",
            *table(["model", "corelm prefill", "corelm one-token calls", "speed-up", "target",
                    "transformers prefill", "transformers one-token calls", "corelm prefill vs transformers"], rows),
            "", source(name, d)]


def ios_section():
    name = "ios-lib-size.json"
    d = load(name)
    rows = [[label, f"{r['bytes_with_interpreter'] / 1e6:.2f}", f"{r['bytes_without'] / 1e6:.2f}",
             f"{(r['bytes_with_interpreter'] - r['bytes_without']) / 1e6:.2f}"]
            for label, r in (("static library as built", d), ("debug info stripped", d["debug_stripped"]),
                             ("linked into an app, stripped", d["linked"]))]
    return [f"**iOS library** (`bench/ios_lib_size.sh`): `libcorelm_ffi.a` for {d['target']}, with the reference "
            "interpreter (default features) and without it (`--no-default-features`, Core ML only); MB.", "",
            *table(["", "with interpreter", "Core ML only", "interpreter adds"], rows), "", source(name, d)]


def render():
    lines = [BEGIN, ""]
    decode_one_thread = functools.partial(decode_section, "decode-smollm2-1-thread.json")
    for section in (convert_section, decode_section, decode_one_thread, quality_section, weight_error_section,
                    gguf_grids_section, hybrid_section, ios_section):
        lines += section() + [""]
    return "\n".join(lines + [END])


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in ("", "--write", "--check"):
        sys.exit(__doc__)
    try:
        text = render()
    except (ReportError, OSError, KeyError, ValueError) as e:
        sys.exit(f"bench/report.py: {e}")
    if not mode:
        print(text)
        return
    readme = README.read_text()
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        sys.exit(f"bench/report.py: README.md must hold the markers once each:\n{BEGIN}\n{END}")
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    if mode == "--write":
        README.write_text(readme[:start] + text + readme[end:])
    elif readme[start:end] != text:
        sys.exit("bench/report.py: README.md's measured figures differ from bench/results: run bench/report.py --write")


if __name__ == "__main__":
    main()
