"""Summary of bench/datarepair_lowprec_probe.py outputs: per row and variant the mean ACC (ASR) over seeds and the
paired difference to ``erase`` (and to the default ``retain``) as mean ± standard error over seeds.

    python -m bench.datarepair_lowprec_summary bench/results/datarepair_lowprec_probe_q0.6*.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def mean_se(values: list[float]) -> str:
    v = 100 * np.asarray(values)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return f"{v.mean():+.2f} ± {se:.2f}"


def main() -> None:
    records = [r for path in sys.argv[1:] for r in json.loads(Path(path).read_text())]
    by = defaultdict(dict)  # (row, seed) -> variant -> record
    for r in records:
        by[(r["row"], r["seed"])][r["variant"]] = r
    rows = list(dict.fromkeys(r["row"] for r in records))
    variants = [v for v in dict.fromkeys(r["variant"] for r in records) if v not in ("erase",)]
    print("| row | seeds | flag precision % | variant | ACC % (mean) | ASR % (mean) | − erase (pts, mean ± s.e.) | "
          "wins vs erase | − retain default (pts) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [by[k] for k in sorted(by) if k[0] == row and "erase" in by[k]]
        seeds = [c["erase"]["seed"] for c in cells]
        prec = [c["erase"]["precision"] for c in cells]
        for v in variants + ["erase"]:
            have = [c for c in cells if v in c]
            if not have:
                continue
            acc = [c[v]["acc"] for c in have]
            asr = [c[v]["asr"] for c in have if c[v]["asr"] is not None]
            d_erase = [c[v]["acc"] - c["erase"]["acc"] for c in have]
            d_def = [c[v]["acc"] - c["retain (default)"]["acc"] for c in have if "retain (default)" in c]
            wins = sum(d > 0 for d in d_erase)
            print(f"| {row} | {','.join(map(str, seeds))} | {100 * min(prec):.0f}-{100 * max(prec):.0f} | {v} | "
                  f"{100 * np.mean(acc):.2f} | {f'{100 * np.mean(asr):.1f}' if asr else '–'} | "
                  f"{mean_se(d_erase) if v != 'erase' else ''} | {f'{wins}/{len(have)}' if v != 'erase' else ''} | "
                  f"{mean_se(d_def) if d_def and v != 'retain (default)' else ''} |")


if __name__ == "__main__":
    main()
