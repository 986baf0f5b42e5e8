"""Where a bench result came from: the commit (and whether the tree was modified), the SHA-256 of
the corelm binary that ran, the machine (CPU model, cores, memory, OS) and the date. Every bench
script stores `provenance(binary)` under "provenance" in its result file; bench/report.py refuses
a result file without it.
"""

import datetime
import hashlib
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git(*args):
    r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return r.stdout.rstrip() if r.returncode == 0 else None


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def provenance(binary):
    """The record for a run of `binary` (the corelm executable) made now."""
    modified = _git("status", "--porcelain", "--untracked-files=no")
    binary = Path(binary).resolve()
    return {
        "commit": _git("rev-parse", "HEAD"),
        "modified_files": modified.splitlines() if modified else [],
        "binary": str(binary.relative_to(REPO)) if binary.is_relative_to(REPO) else str(binary),
        "binary_sha256": _sha256(binary),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "memory_bytes": _memory_bytes(),
            "os": platform.platform(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
