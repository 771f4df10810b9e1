"""Summary of the ``weak_flags="class_test"`` probe (bench/datarepair_lowprec_probe.py with the variants
``retain[act0.95 keep]``, ``retain[act0.95 drop]``, ``retain[act0.95 class_test]``): per row and seed group the mean
ACC (ASR) of each and the paired differences class_test − keep and class_test − drop (mean ± standard error over
seeds), ACC and ASR in points, and how often the class test fired (dropped the weak flags of some class).

    python -m bench.datarepair_weakclass_summary --design 0,1,2 bench/results/datarepair_weakclass_probe_*.json

``--test "retain[act0.95 class_null]"`` summarises another tested variant the same way, with its difference to
``class_test`` as a further column (records of several files are merged by row, seed and variant: the probe is
deterministic, so a variant rerun in another file gives the same record).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

KEEP, DROP, TEST = "retain[act0.95 keep]", "retain[act0.95 drop]", "retain[act0.95 class_test]"


def mean_se(values: list[float]) -> str:
    v = 100 * np.asarray(values, dtype=float)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return f"{v.mean():+.2f} ± {se:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--design", default="0,1,2", help="the seeds the rule was designed on (shown apart)")
    ap.add_argument("--test", default=TEST, help="the tested variant")
    args = ap.parse_args()
    test = args.test
    bases = (KEEP, DROP) if test == TEST else (KEEP, DROP, TEST)
    names = {KEEP: "keep", DROP: "drop", TEST: "class_test", test: test.split()[-1].rstrip("]")}
    design = set(map(int, args.design.split(",")))
    by: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for path in args.paths:
        for r in json.loads(path.read_text()):
            by[(f'{r.get("dataset", "fmnist")} {r["row"]}', r["seed"])][r["variant"]] = r
    rows = list(dict.fromkeys(k[0] for k in by))
    cols = " / ".join(names[v] for v in (*bases, test))
    diffs = [f"{names[test]} − {names[b]} {m}" for m in ("ACC", "ASR") for b in bases]
    print(f"| row | seeds | fired | ACC % {cols} | ASR % {cols} | " + " | ".join(diffs) + " |")
    print("|---" * (5 + len(diffs)) + "|")
    for row in rows:
        for group, pick in (("design", lambda s: s in design), ("held out", lambda s: s not in design),
                            ("all", lambda s: True)):
            cells = [by[k] for k in sorted(by) if k[0] == row and pick(k[1]) and all(v in by[k] for v in
                                                                                     (*bases, test))]
            if not cells:
                continue
            seeds = ",".join(str(c[test]["seed"]) for c in cells)
            fired = sum(bool(c[test].get("weak_dropped_classes")) for c in cells)
            acc = {v: [c[v]["acc"] for c in cells] for v in (*bases, test)}
            has_asr = cells[0][test]["asr"] is not None
            asr = {v: [c[v]["asr"] for c in cells] for v in (*bases, test)} if has_asr else None
            d = {b: [t - k for t, k in zip(acc[test], acc[b], strict=True)] for b in bases}
            a_cells = (" / ".join(f"{100 * np.mean(asr[v]):.1f}" for v in (*bases, test)) if asr else "–")
            da = ({b: mean_se([t - k for t, k in zip(asr[test], asr[b], strict=True)]) for b in bases} if asr
                  else dict.fromkeys(bases, "–"))
            print(f"| {row} | {group} ({seeds}) | {fired}/{len(cells)} | "
                  f"{' / '.join(f'{100 * np.mean(acc[v]):.2f}' for v in (*bases, test))} | {a_cells} | "
                  + " | ".join(mean_se(d[b]) for b in bases) + " | " + " | ".join(da[b] for b in bases) + " |")


if __name__ == "__main__":
    main()
