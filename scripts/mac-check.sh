#!/usr/bin/env bash
# The Apple path, checked on a real Mac (docs/mac-check.md): converts the default model
# (SmolLM2-135M-Instruct from its GGUF registry package) with each interface corelm writes,
# compiles and runs each on Core ML with every compute unit, and compares the greedy tokens and
# the last prompt position's logits with corelm's reference interpreter on the same package.
# Writes one JSON report; exits 1 if any run fails or disagrees.
# Usage: scripts/mac-check.sh [REPORT.json]   (default: mac-check-report.json)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
report="${1:-$root/mac-check-report.json}"
if [[ "$(uname -s)" != Darwin ]]; then
  echo "mac-check runs on macOS (Core ML); this is $(uname -s)" >&2
  exit 2
fi
bash scripts/fetch-models.sh
cargo build --release --quiet -p corelm-cli
corelm="$root/target/release/corelm"
work="$root/.cache/mac-check"
rm -rf "$work"
mkdir -p "$work/runs"
# A fresh compile cache, so the check includes compiling.
export CORELM_CACHE="$work/compiled"
source_model=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
# A fixed prompt (token ids of "The capital of France is" and some context) and greedy decoding.
ids="504,3575,282,4649,314,253,1345,2630,30,378,3575,282,4649,314"
new_tokens=32

# name | convert flags: the stateful iOS 18 package, KV caches as inputs/outputs (iOS 17), and
# the Neural Engine profile (fixed query lengths, multifunction).
interfaces=(
  "stateful|--target ios18"
  "kv-io|--target ios17"
  "ane|--target ios18 --profile ane --query-lengths 1,16"
)
units=(all cpu-only cpu-and-gpu cpu-and-neural-engine)
for entry in "${interfaces[@]}"; do
  name="${entry%%|*}"
  flags="${entry#*|}"
  pkg="$work/$name.mlpackage"
  # shellcheck disable=SC2086
  "$corelm" convert "$source_model" -o "$pkg" --context 512 $flags --force >"$work/runs/$name.convert.log" 2>&1 \
    || { echo "convert $name failed: see $work/runs/$name.convert.log" >&2; exit 1; }
  run() { # backend units output
    local started ended
    started=$(python3 -c 'import time; print(time.time())')
    if "$corelm" run "$pkg" --ids "$ids" --max-new-tokens "$new_tokens" --ignore-eos --logits --json \
      --backend "$1" --compute-units "$2" >"$3" 2>"$3.err"; then
      ended=$(python3 -c 'import time; print(time.time())')
      python3 -c 'import sys; print(float(sys.argv[2]) - float(sys.argv[1]))' "$started" "$ended" >"$3.seconds"
    else
      echo "{\"error\": $(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read()))' "$3.err")}" >"$3"
    fi
  }
  run reference all "$work/runs/$name.reference.json"
  for u in "${units[@]}"; do
    run coreml "$u" "$work/runs/$name.coreml.$u.json"
  done
done

python3 - "$work/runs" "$report" "$(git rev-parse HEAD)" "$(sw_vers -productVersion)" "$(sysctl -n machdep.cpu.brand_string)" <<'PY'
import json, math, os, sys, datetime
runs, report, commit, os_version, chip = sys.argv[1:6]
interfaces = ["stateful", "kv-io", "ane"]
units = ["all", "cpu-only", "cpu-and-gpu", "cpu-and-neural-engine"]
def load(path):
    with open(path) as f:
        out = json.load(f)
    seconds = path + ".seconds"
    if os.path.exists(seconds):
        out["seconds"] = float(open(seconds).read())
    return out
rows, failed = [], False
for name in interfaces:
    ref = load(os.path.join(runs, f"{name}.reference.json"))
    for u in units:
        got = load(os.path.join(runs, f"{name}.coreml.{u}.json"))
        row = {"interface": name, "compute_units": u}
        if "error" in got or "error" in ref:
            row["error"] = got.get("error") or ref.get("error")
            failed = True
        else:
            a, b = ref["generated_ids"], got["generated_ids"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            la, lb = ref["logits"], got["logits"]
            # NaN and infinities come through JSON as null.
            finite = all(isinstance(x, (int, float)) and math.isfinite(x) for x in lb)
            diff = max(abs(x - y) for x, y in zip(la, lb)) if finite else None
            row.update({
                "same_tokens": a == b,
                "tokens_agreeing_before_first_difference": same,
                "tokens": len(a),
                "last_prompt_logits_max_abs_error": diff,
                "last_prompt_top1_agrees": finite and la.index(max(la)) == lb.index(max(lb)),
                "logits_finite": finite,
                # Wall time includes compiling the package (a fresh cache) and loading it.
                "wall_seconds": got.get("seconds"),
                "prefill_seconds": got["prefill_seconds"],
                "decode_seconds": got["decode_seconds"],
                "reference_prefill_seconds": ref["prefill_seconds"],
                "reference_decode_seconds": ref["decode_seconds"],
            })
            # fp16 on the GPU and the Neural Engine rounds differently from the reference:
            # greedy tokens may part after a near tie, but the first position must agree.
            failed |= not finite or not row["last_prompt_top1_agrees"]
        rows.append(row)
out = {
    "commit": commit, "macos": os_version, "chip": chip,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "model": "SmolLM2-135M-Instruct Q4_1 GGUF", "new_tokens": 32, "runs": rows,
}
with open(report, "w") as f:
    json.dump(out, f, indent=2)
for r in rows:
    status = r.get("error", "").splitlines()[0:1] or [
        f"tokens {'same' if r['same_tokens'] else 'differ after ' + str(r['tokens_agreeing_before_first_difference'])}, "
        f"logit error {r['last_prompt_logits_max_abs_error']}, decode {r['decode_seconds']:.2f}s "
        f"(reference {r['reference_decode_seconds']:.2f}s)"
    ]
    print(f"{r['interface']:9} {r['compute_units']:22} {status[0]}")
print(f"report: {report}")
sys.exit(1 if failed else 0)
PY
