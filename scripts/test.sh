#!/usr/bin/env bash
# The whole test suite, exactly what CI runs (.ci/run calls this script).
# Installs what it needs: the coremltools venv (external validator) and cargo-fuzz.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-python.sh
export CORELM_PYTHON="$root/.cache/venv/bin/python"
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
bash scripts/fuzz.sh "${CORELM_FUZZ_SECONDS:-30}"
