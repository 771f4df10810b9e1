"""Where a benchmark ran: the machine and the commit, written next to every figure in BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """CPU model, core count, Python and torch versions (torch only when it is already imported)."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    text = f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
    import sys

    torch = sys.modules.get("torch")
    return text + (f", torch {torch.__version__}" if torch is not None else "")


def commit() -> str:
    """The short HEAD commit, marked ``+uncommitted`` when the work tree differs from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return sha + ("+uncommitted" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
