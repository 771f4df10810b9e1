"""Tables of bench/proxy_trigger_probe.py's JSON files (BENCHMARKS.md §2.11).

    python bench/proxy_trigger_summary.py bench/results/proxy_probe_s0_*.json > bench/results/proxy_probe_s0.md

Per model and repaired ``n``: clean ACC and real ASR (test set), and per trigger family the proxy ASR of the
most anomalous class's inverted trigger on the defender subset, beside the median of the other classes'
triggers on the same model (the natural level the method could see) and the same trigger with its pixels
shuffled; then Spearman's rank correlation over ``n`` between real ASR and each family's proxy ASR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr


def _proxy(row: dict, key: str, k: int) -> tuple[float, float]:
    per = {int(c): float(v) for c, v in row[key].items()}
    return per[k], float(np.median([v for c, v in per.items() if c != k]))


def _rho(a: list[float], b: list[float]) -> str:
    if len(set(a)) < 2 or len(set(b)) < 2:
        return "—"
    return f"{spearmanr(a, b)[0]:.2f}"


def tables(files: list[str]) -> str:
    lines = ["| model (seed) | anomalous class: patch / additive (p) | n | ACC | real ASR | proxy patch: target / "
             "others' median / shuffled | proxy additive: target / others' median / shuffled | amplified x2, x4: "
             "patch / additive (target vs others' median) |",
             "|---|---|---|---|---|---|---|---|"]
    corr = ["", "| model (seed) | rho(real ASR, proxy patch) over repaired n | rho(real ASR, proxy additive) | "
            "rho over the zeroing sweep: patch / additive | zeroed models at chance (ACC < 0.2) |",
            "|---|---|---|---|---|"]
    for f in files:
        rep = json.loads(Path(f).read_text())
        for name, m in rep["models"].items():
            an, det = m["anomalous"], m["detector"]
            head = (f"{an['patch']} / {an['additive']} ({det['patch']['p_value']:.2g} / "
                    f"{det['additive']['p_value']:.2g})")
            rows = [m["before"] | {"n": 0.0}] + m["repairs"]
            for i, row in enumerate(rows):
                cells = []
                for fam in ("patch", "additive"):
                    t, o = _proxy(row, f"proxy_{fam}_all", an[fam])
                    cells.append(f"{100 * t:.1f} / {100 * o:.1f} / {100 * row[f'proxy_{fam}_shuffled']:.1f}")
                amp = []
                for fac in ("2", "4"):
                    parts = []
                    for fam in ("patch", "additive"):
                        key = f"proxy_{fam}_x{fac}_all"
                        if key in row:
                            t, o = _proxy(row, key, an[fam])
                            parts.append(f"{100 * t:.0f} vs {100 * o:.0f}")
                    if parts:
                        amp.append(f"x{fac}: " + ", ".join(parts))
                asr = "—" if name == "clean" else f"{100 * row['asr']:.1f}"
                lines.append(f"| {name} ({rep['seed']}) | {head if i == 0 else ''} | "
                             f"{'before' if i == 0 else row['n']} | {100 * row['acc']:.1f} | {asr} | {cells[0]} | "
                             f"{cells[1]} | {'; '.join(amp)} |")
            rs = m["repairs"]
            asr = [r["asr"] for r in rs]
            pp = [_proxy(r, "proxy_patch_all", an["patch"])[0] for r in rs]
            pa = [_proxy(r, "proxy_additive_all", an["additive"])[0] for r in rs]
            sw = m["sweep"]
            sweep_rho = "—"
            if sw:
                sa = [r["asr"] for r in sw]
                sweep_rho = (f"{_rho(sa, [_proxy(r, 'proxy_patch_all', an['patch'])[0] for r in sw])} / "
                             f"{_rho(sa, [_proxy(r, 'proxy_additive_all', an['additive'])[0] for r in sw])}")
            chance = ", ".join(f"{r['n']:g}" for r in sw if r["acc"] < 0.2) or "none"
            corr.append(f"| {name} ({rep['seed']}) | {_rho(asr, pp)} | {_rho(asr, pa)} | {sweep_rho} | "
                        f"{chance if sw else '(no sweep)'} |")
    return "\n".join(lines + corr) + "\n"


if __name__ == "__main__":
    print(tables(sys.argv[1:]), end="")
