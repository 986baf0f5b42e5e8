#!/usr/bin/env bash
# Creates the Python venv used as an external validator (coremltools) at .cache/venv.
# Idempotent: a venv that already imports what we need is kept.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.cache/venv"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import coremltools, numpy" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -r "$root/python/requirements.txt"
