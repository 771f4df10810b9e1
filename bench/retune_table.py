"""Prints BENCHMARKS.md §2.12's rows from ``bench/repair_bench.py`` JSON reports made with ``--retune``: per attack
the unrepaired model, each method and the clean baseline, with ASR after each retuning epoch count.

    python bench/retune_table.py bench/results/retune_gentle_lr3e-5_s0.json bench/results/retune_gentle_lr3e-5_s1.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def table(report: dict) -> list[str]:
    """The markdown rows of one report (its retune settings as a heading line)."""
    rt = report["retune"]
    ep = rt["epochs"]
    lines = [f"lr {rt['lr']} freeze_bn {rt['freeze_bn']} n {rt['n']}",
             "| attack | seed | row | ACC | ASR | retuned ASR " + " / ".join(map(str, ep))
             + f" ep | ACC after {ep[-1]} ep |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in report["attacks"].items():
        rows = [("unrepaired", entry["before"], entry.get("retune"))]
        rows += [(m, x, x.get("retune")) for m, x in entry["methods"].items()]
        if "clean_baseline" in entry:
            rows.append(("clean model", entry["clean_baseline"], entry["clean_baseline"]["retune"]))
        for label, x, r in rows:
            curve = " / ".join(pct(r[f"asr_{k}"]) for k in ep) if r else ""
            acc = pct(r[f"acc_{ep[-1]}"]) if r else ""
            lines.append(f"| {name} | {report['config'].get('seed', '')} | {label} | {pct(x['acc'])} | {pct(x['asr'])} "
                         f"| {curve} | {acc} |")
    return lines


def main() -> None:
    for path in sys.argv[1:]:
        print(f"\n{path}:")
        print("\n".join(table(json.loads(Path(path).read_text()))))


if __name__ == "__main__":
    main()
