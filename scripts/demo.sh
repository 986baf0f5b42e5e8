#!/usr/bin/env bash
# The main job on the built-in default. Today: write the sample packages, validate them with
# corelm and with coremltools' loader, and inspect one. (Becomes "convert SmolLM2" with issue 3.)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-python.sh
out="$root/.cache/demo"
rm -rf "$out"
cargo build --release --quiet -p corelm-cli -p corelm-format --examples --bins
mapfile -t packages < <(cargo run --release --quiet -p corelm-format --example write_samples -- "$out")
./target/release/corelm validate "${packages[@]}"
"$root/.cache/venv/bin/python" python/coremltools_oracle.py validate "${packages[@]}" \
  | "$root/.cache/venv/bin/python" -c 'import json,sys; [print(p["path"] + ": coremltools " + ("loads and validates it" if p["ok"] else "REJECTS it: " + str(p["error"]))) for p in json.load(sys.stdin)["packages"]]'
./target/release/corelm inspect "${packages[0]}"
