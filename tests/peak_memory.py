"""Load uploads in this (fresh) process and report, per file, the outcome and the peak RSS growth of the load.

Run as ``python -m tests.peak_memory model|data PATH [model|data PATH ...]``; prints one JSON object per
file. The peak is reset (``/proc/self/clear_refs``) after the imports and before each load, so the figure is
what that load alone made the process hold at its worst, which is what a bomb inflates.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from store.settings import Settings


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    assert match is not None, key
    return int(match.group(1))


def measure(kind: str, path: Path) -> dict[str, object]:
    """The outcome of loading ``path`` as a model or a data part with the settings' limits, its peak RSS
    growth in bytes and its duration in seconds."""
    from core.data.formats import DataLimits, load_image_set
    from core.models.checkpoint import load_checkpoint

    limits = DataLimits(**Settings().data_limits())
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    outcome: dict[str, object] = {"error": None, "message": None}
    try:
        if kind == "model":
            load_checkpoint(path, limits=limits.checkpoint)
        else:
            load_image_set(path, limits=limits)
    except Exception as e:  # noqa: BLE001 - the class is the finding, reported to the test
        outcome = {"error": [c.__name__ for c in type(e).__mro__], "message": str(e)}
    outcome["seconds"] = time.perf_counter() - start
    outcome["growth_bytes"] = (_status_kib("VmHWM") - before) * 1024
    outcome["file_bytes"] = path.stat().st_size
    return outcome


def run_fresh(*jobs: tuple[str, Path], timeout: float = 120) -> list[dict[str, object]]:
    """:func:`measure` for each ``(kind, path)`` in one fresh interpreter (imports warmed first)."""
    args = [a for kind, path in jobs for a in (kind, str(path))]
    done = subprocess.run(
        [sys.executable, "-m", "tests.peak_memory", *args], capture_output=True, text=True, timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str]) -> None:
    """Entry point of the child process."""
    import core.data.formats  # noqa: F401 - imported before the baseline, as the API has it loaded
    import core.models.checkpoint  # noqa: F401

    for kind, path in zip(argv[::2], argv[1::2], strict=True):
        print(json.dumps(measure(kind, Path(path))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
