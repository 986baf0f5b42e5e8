#!/usr/bin/env bash
# Bounded fuzz run of every reader of untrusted bytes, each seeded with inputs the repository has
# (fuzz/seeds.py): package manifest, model protobuf, blob storage, GGUF, safetensors, config.json,
# tokenizer files, bundle.json, bundle tars, predict calls, chat templates and package planning.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]
# A target that crashes, hangs (10 s per input) or passes 4 GB fails the run after the others ran;
# its input is under fuzz/artifacts/TARGET/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${1:-20}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz needs nightly flags; use the nightly toolchain when the machine has one.
if rustup toolchain list | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi
targets=(manifest model_proto blob_storage gguf safetensors config_json tokenizer bundle_json bundle_tar predict_calls
  chat_template package_plan)
# The interpreter refuses tensors past this (1 GiB), well inside libFuzzer's 4 GB limit: a declared
# shape beyond it must be an error, not an allocation.
export CORELM_MAX_TENSOR_BYTES=$((1 << 30))

seeds="$root/target/fuzz-seeds"
rm -rf "$seeds"
cargo run --quiet --manifest-path "$root/Cargo.toml" -p corelm-format --example write_samples -- "$seeds/packages" >/dev/null
mkdir -p "$root/fuzz/corpus/manifest" "$root/fuzz/corpus/model_proto" "$root/fuzz/corpus/blob_storage"
for pkg in "$seeds"/packages/*.mlpackage; do
  name="$(basename "$pkg" .mlpackage)"
  cp "$pkg/Manifest.json" "$root/fuzz/corpus/manifest/$name"
  cp "$pkg/Data/com.apple.CoreML/model.mlmodel" "$root/fuzz/corpus/model_proto/$name"
  cp "$pkg/Data/com.apple.CoreML/weights/weight.bin" "$root/fuzz/corpus/blob_storage/$name"
done
python3 "$root/fuzz/seeds.py" "$seeds/packages" "$root/fuzz/corpus"

# Targets reading paths write their input into scratch folders under here.
export CORELM_FUZZ_TMP="$root/target/fuzz-tmp"
rm -rf "$CORELM_FUZZ_TMP"
mkdir -p "$CORELM_FUZZ_TMP"
cd "$root/fuzz"
# One build for every target, so each target's seconds are spent fuzzing.
"${fuzz[@]}" build
failed=()
for target in "${targets[@]}"; do
  echo "fuzzing $target for ${seconds}s"
  log="$CORELM_FUZZ_TMP/$target.log"
  if "${fuzz[@]}" run "$target" -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 >"$log" 2>&1; then
    grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1
  else
    tail -n 40 "$log"
    failed+=("$target")
  fi
done
rm -rf "$CORELM_FUZZ_TMP"
if ((${#failed[@]})); then
  echo "fuzz: ${failed[*]} failed; inputs under fuzz/artifacts/" >&2
  exit 1
fi
