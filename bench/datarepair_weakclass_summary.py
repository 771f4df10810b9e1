"""Summary of the ``weak_flags="class_test"`` probe (bench/datarepair_lowprec_probe.py with the variants
``retain[act0.95 keep]``, ``retain[act0.95 drop]``, ``retain[act0.95 class_test]``): per row and seed group the mean
ACC (ASR) of each and the paired differences class_test − keep and class_test − drop (mean ± standard error over
seeds), ACC and ASR in points, and how often the class test fired (dropped the weak flags of some class).

    python -m bench.datarepair_weakclass_summary --design 0,1,2 bench/results/datarepair_weakclass_probe_*.json
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
    args = ap.parse_args()
    design = set(map(int, args.design.split(",")))
    by: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for path in args.paths:
        for r in json.loads(path.read_text()):
            by[(f'{r.get("dataset", "fmnist")} {r["row"]}', r["seed"])][r["variant"]] = r
    rows = list(dict.fromkeys(k[0] for k in by))
    print("| row | seeds | fired | ACC % keep / drop / class_test | ASR % keep / drop / class_test | "
          "class_test − keep ACC | class_test − drop ACC | class_test − keep ASR | class_test − drop ASR |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for group, pick in (("design", lambda s: s in design), ("held out", lambda s: s not in design),
                            ("all", lambda s: True)):
            cells = [by[k] for k in sorted(by) if k[0] == row and pick(k[1]) and all(v in by[k] for v in
                                                                                     (KEEP, DROP, TEST))]
            if not cells:
                continue
            seeds = ",".join(str(c[TEST]["seed"]) for c in cells)
            fired = sum(bool(c[TEST].get("weak_dropped_classes")) for c in cells)
            acc = {v: [c[v]["acc"] for c in cells] for v in (KEEP, DROP, TEST)}
            has_asr = cells[0][TEST]["asr"] is not None
            asr = {v: [c[v]["asr"] for c in cells] for v in (KEEP, DROP, TEST)} if has_asr else None
            d = {b: [t - k for t, k in zip(acc[TEST], acc[b], strict=True)] for b in (KEEP, DROP)}
            a_cells = (" / ".join(f"{100 * np.mean(asr[v]):.1f}" for v in (KEEP, DROP, TEST)) if asr else "–")
            da = ({b: mean_se([t - k for t, k in zip(asr[TEST], asr[b], strict=True)]) for b in (KEEP, DROP)} if asr
                  else {KEEP: "–", DROP: "–"})
            print(f"| {row} | {group} ({seeds}) | {fired}/{len(cells)} | "
                  f"{' / '.join(f'{100 * np.mean(acc[v]):.2f}' for v in (KEEP, DROP, TEST))} | {a_cells} | "
                  f"{mean_se(d[KEEP])} | {mean_se(d[DROP])} | {da[KEEP]} | {da[DROP]} |")


if __name__ == "__main__":
    main()
