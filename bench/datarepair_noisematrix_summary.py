"""Summary of the ``relabel_prior="noise_matrix"`` probe (bench/datarepair_lowprec_probe.py with the variants
``retain[act0.95 keep]`` (the default, "old"), ``retain[act0.95 keep noise_matrix]`` ("new") and the ``erase``
baseline, all on one identification per (row, seed)): per row and seed group the mean ACC (ASR) of each, the paired
differences new − old, new − erase and old − erase (points, mean ± standard error over seeds, and on how many seeds
new > old), and the relabel precision (fraction of the relabelled samples that got their clean label, pooled over
the seeds) with the relabelled counts.

    python -m bench.datarepair_noisematrix_summary --design 0,1,2 bench/results/datarepair_noisematrix_probe_*.json

``--new`` / ``--old`` compare two other variants the same way (records of several files are merged by row, seed and
variant: the probe is deterministic on one machine, so a variant rerun in another file gives the same record).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

OLD, NEW, ERASE = "retain[act0.95 keep]", "retain[act0.95 keep noise_matrix]", "erase"


def mean_se(values: list[float]) -> str:
    v = 100 * np.asarray(values, dtype=float)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return f"{v.mean():+.2f} ± {se:.2f}"


def relabel(cells: list[dict], variant: str) -> tuple[int, int, int]:
    """(relabelled to the clean label, relabelled in all, of them benign) pooled over ``cells``."""
    right = sum(c[variant]["fates"][k]["relabelled_true"] for c in cells for k in ("benign", "bad"))
    total = sum(c[variant]["fates"][k]["relabelled_true"] + c[variant]["fates"][k]["relabelled_wrong"]
                for c in cells for k in ("benign", "bad"))
    benign = sum(c[variant]["fates"]["benign"]["relabelled_wrong"] for c in cells)
    return right, total, benign


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--design", default="0,1,2", help="the seeds the choice was made on (shown apart)")
    ap.add_argument("--new", default=NEW)
    ap.add_argument("--old", default=OLD)
    args = ap.parse_args()
    new, old = args.new, args.old
    print(f"new = {new}, old = {old}\n")
    design = set(map(int, args.design.split(",")))
    by: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for path in args.paths:
        for r in json.loads(path.read_text()):
            by[(r["row"], r["seed"])][r["variant"]] = r
    rows = list(dict.fromkeys(k[0] for k in by))
    print("| row | seeds | flag P % | ACC % old / new / erase | new − old | wins | new − erase | old − erase | "
          "relabel precision old → new (right / relabelled; benign relabelled) | ASR % old / new / erase |")
    print("|---" * 10 + "|")
    for row in rows:
        for group, pick in (("design", lambda s: s in design), ("held out", lambda s: s not in design),
                            ("all", lambda s: True)):
            cells = [by[k] for k in sorted(by) if k[0] == row and pick(k[1]) and all(v in by[k]
                                                                                     for v in (old, new, ERASE))]
            if not cells:
                continue
            seeds = ",".join(str(c[new]["seed"]) for c in cells)
            acc = {v: np.array([c[v]["acc"] for c in cells]) for v in (old, new, ERASE)}
            wins = int((acc[new] > acc[old]).sum())
            ties = int((acc[new] == acc[old]).sum())
            prec = [100 * np.mean([c[new]["precision"] for c in cells])]
            ro, rn = relabel(cells, old), relabel(cells, new)
            asr = (" / ".join(f"{100 * np.mean([c[v]['asr'] for c in cells]):.1f}" for v in (old, new, ERASE))
                   if cells[0][new]["asr"] is not None else "–")
            print(f"| {row} | {group} ({seeds}) | {prec[0]:.0f} | "
                  f"{' / '.join(f'{100 * acc[v].mean():.2f}' for v in (old, new, ERASE))} | "
                  f"{mean_se(list(acc[new] - acc[old]))} | {wins}/{len(cells)} ({ties} tied) | "
                  f"{mean_se(list(acc[new] - acc[ERASE]))} | {mean_se(list(acc[old] - acc[ERASE]))} | "
                  f"{100 * ro[0] / max(1, ro[1]):.1f}% ({ro[0]}/{ro[1]}; {ro[2]}) → "
                  f"{100 * rn[0] / max(1, rn[1]):.1f}% ({rn[0]}/{rn[1]}; {rn[2]}) | {asr} |")


if __name__ == "__main__":
    main()
