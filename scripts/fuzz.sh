#!/usr/bin/env bash
# Bounded fuzz run of every reader (manifest, model protobuf, blob storage), seeded with the
# sample packages. Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]
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
cd "$root/fuzz"
for target in manifest model_proto blob_storage; do
  echo "fuzzing $target for ${seconds}s"
  "${fuzz[@]}" run "$target" -- -max_total_time="$seconds" -rss_limit_mb=4096 2>&1 | tail -n 2
done
