"""Mean (± standard deviation over seeds) of the ekfac comparison runs: python bench/results/ekfac/aggregate.py"""
import json
import sys
from pathlib import Path

import numpy as np

here = Path(__file__).parent
recs = [r | {"seed": int(p.stem.split("seed")[-1])} for p in sorted(here.glob("datarepair_cpu_ekfac_seed*.json"))
        for r in json.loads(p.read_text())]
for line in (here / "loss_noscratch.txt").read_text().splitlines():  # identification only (loss_noscratch.py)
    w = line.split()
    recs.append({"seed": int(w[1]), "row": w[2], "method": "loss, no scratch ref. (ident. only)", "acc": None,
                 "auroc": float(w[6]), "precision": float(w[8]), "recall": float(w[10]), "time_s": None})
seeds = sorted({r["seed"] for r in recs})
groups = {"0-2": {0, 1, 2}, "4-6": {4, 5, 6}}
if len(sys.argv) > 1:
    recs = [r for r in recs if r["seed"] in groups[sys.argv[1]]]
    seeds = sorted(groups[sys.argv[1]])
print(f"seeds {seeds}\n")
print("| row | method | n | P % | R % | AUROC % | ACC % | ASR % | time s | peak MB |")
print("|---|---|---|---|---|---|---|---|---|---|")
rows = list(dict.fromkeys(r["row"] for r in recs))
methods = list(dict.fromkeys(r["method"] for r in recs if "ident. only" not in r["method"]))
methods.insert(2, "loss, no scratch ref. (ident. only)")


def cell(vals, pct=True):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    k = 100 if pct else 1
    m, s = k * float(np.mean(vals)), k * float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}" if len(vals) > 1 else f"{m:.1f}"


for row in rows:
    for m in methods:
        rs = [r for r in recs if r["row"] == row and r["method"] == m]
        if not rs:
            continue
        print(f"| {row} | {m} | {len(rs)} | {cell([r.get('precision') for r in rs])} | "
              f"{cell([r.get('recall') for r in rs])} | {cell([r.get('auroc') for r in rs])} | "
              f"{cell([r['acc'] for r in rs])} | {cell([r.get('asr') for r in rs])} | "
              f"{cell([r['time_s'] for r in rs], False)} | {cell([r.get('peak_mb') for r in rs], False)} |")
print("\nPaired AUROC differences, points (mean ± standard error over seeds):")
for row in rows:
    for other in ("retain", "loss, no scratch ref. (ident. only)", "retain[tracin]"):
        d = []
        for sd in seeds:
            a = [r["auroc"] for r in recs if r["seed"] == sd and r["row"] == row and r["method"] == "retain[ekfac]"]
            b = [r["auroc"] for r in recs if r["seed"] == sd and r["row"] == row and r["method"] == other]
            if a and b and a[0] is not None and b[0] is not None:
                d.append(100 * (a[0] - b[0]))
        if len(d) > 1:
            se = np.std(d, ddof=1) / np.sqrt(len(d))
            print(f"  {row} ekfac - {other}: {np.mean(d):+.1f} ± {se:.1f} (n={len(d)})")
