#!/usr/bin/env bash
# SHA-256 of the model spec and weight files of every package a set of conversions writes (every
# tiny fixture, each interface and profile, compression, chunking, and the default GGUF model),
# as JSON. A refactor that must not change what corelm writes compares this before and after:
#   scripts/package-hashes.sh before.json; (change); scripts/package-hashes.sh after.json; diff
# Manifest.json is left out: its item identifiers are random UUIDs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?usage: scripts/package-hashes.sh OUT.json}"
cd "$root"
cargo build --release --quiet -p corelm-cli
corelm="${CARGO_TARGET_DIR:-$root/target}/release/corelm"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
variants=(
  "default|--context 64"
  "ios17|--context 64 --target ios17"
  "lengths|--context 64 --query-lengths 1,8"
  "ane|--context 64 --profile ane --query-lengths 1,8"
  "int4|--context 64 --quantize int4"
  "lut4|--context 64 --quantize lut4"
  "chunks|--context 64 --chunks 2"
  "fp32|--context 64 --precision fp32"
)
for src in tests/fixtures/tiny/*/; do
  name="$(basename "$src")"
  for v in "${variants[@]}"; do
    # shellcheck disable=SC2086
    "$corelm" convert "$src" -o "$work/$name.${v%%|*}.mlpackage" ${v#*|} --no-check >/dev/null 2>&1 \
      || echo "$name ${v%%|*}: does not convert" >&2
  done
done
# Compression of existing packages: ours (default and Neural Engine layouts) and coremltools'.
for v in default ane; do
  for scheme in int4 lut4 mixed; do
    "$corelm" compress "$work/qwen3.$v.mlpackage" -o "$work/qwen3.$v.compress-$scheme.mlpackage" --quantize "$scheme" \
      >/dev/null 2>&1 || echo "qwen3 $v: compress $scheme fails" >&2
  done
done
"$corelm" compress tests/fixtures/coremltools/stateful_torch.mlpackage -o "$work/coremltools.compress-int8.mlpackage" \
  --quantize int8 >/dev/null
if [[ -f .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
  "$corelm" convert .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf -o "$work/smollm2.gguf.mlpackage" --context 256 >/dev/null
  "$corelm" convert .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf -o "$work/smollm2.fp16.mlpackage" --context 256 --dequantize >/dev/null
fi
python3 - "$work" "$out" <<'PY'
import hashlib, json, os, sys
work, out = sys.argv[1:3]
hashes = {}
for pkg in sorted(os.listdir(work)):
    for dirpath, _, files in os.walk(os.path.join(work, pkg)):
        for f in sorted(files):
            if f == "Manifest.json":
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, work)
            hashes[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
json.dump(hashes, open(out, "w"), indent=1, sort_keys=True)
print(f"{len(hashes)} files from {len(os.listdir(work))} packages -> {out}")
PY
