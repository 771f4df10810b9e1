"""The verdict's rules compared offline on scans the detection benchmark already made: each model's detector
p-values and untargeted flip map go through :func:`core.detect.verdict.combine` under every rule below, so the
numbers are the shipped code's, without scanning again.

    python bench/detect_verdict_table.py --out bench/results/detect_cpu_verdict.md \
        --original bench/results/detect_cpu_feat.json,bench/results/detect_cpu_a2a_steps1.json \
        --held-out bench/results/detect_cpu_heldout_clean.json,bench/results/detect_cpu_heldout_bd.json

Several JSONs of one group are merged per model label (a later file fills the fields an earlier one lacks: the
feature inversion's p-value from one run, the untargeted map from another — the detectors are seeded, so
Neural Cleanse's and the universal perturbation's p-values agree between runs). ``--original`` is the set the
rules were chosen on, ``--held-out`` models trained afterwards with other seeds (``detect_bench.py --seeds``),
``--retrained`` (optional) the default seeds trained again (its own table, not in the pooled one).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.detect_bench import auroc  # noqa: E402
from core.detect.base import DetectorResult  # noqa: E402
from core.detect.untargeted import spread_limit  # noqa: E402
from core.detect.verdict import combine  # noqa: E402

# name -> (combination, voting detectors, the dominant-label rule on)
RULES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "Bonf NC+UP (old default)": ("bonferroni", ("nc", "up"), False),
    "Bonf NC+UP+FI": ("bonferroni", ("nc", "up", "fi"), False),
    "ACAT NC+UP": ("cauchy", ("nc", "up"), False),
    "ACAT NC+UP+FI": ("cauchy", ("nc", "up", "fi"), False),
    "Bonf NC+UP + spread": ("bonferroni", ("nc", "up"), True),
    "ACAT NC+UP+FI + spread (new default)": ("cauchy", ("nc", "up", "fi"), True),
}
DEFAULT_RULE = "ACAT NC+UP+FI + spread (new default)"
SPREAD_FRACTION = 0.5  # DetectConfig().ut_spread_fraction


def load(paths: list[str]) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for r in data.get("models", [data]):  # a report, or one kept scan (.scan-*.json)
            merged = rows.setdefault(r["label"], {})
            for k, v in r.items():
                merged.setdefault(k, v)
            if "untargeted" in r.get("evidence", {}).get("detectors", {}):
                merged["ut_evidence"] = r["evidence"]["detectors"]["untargeted"]
    return rows


def results_of(row: dict, num_classes: int = 10) -> dict[str, DetectorResult]:
    out = {}
    for key in ("nc", "up", "fi"):
        if f"{key}_p" in row:
            out[key] = DetectorResult(key, 0.0, False, row[f"{key}_p"], "p_value", 0.05, [], row[f"{key}_targets"],
                                      details={"smallest_class": row[f"{key}_min_class"]})
    ut = row.get("ut_evidence")
    if ut is not None:
        fam = ut["families"][ut["family"]]
        limit = spread_limit(num_classes, SPREAD_FRACTION)
        spread = bool(fam["comparable"] and fam["distinct_targets"] > limit)
        targets = sorted({m["to"] for s, m in fam["mapping"].items() if m["to"] != int(s)}) if spread else []
        out["untargeted"] = DetectorResult("untargeted", 0.0, False, ut["p_value"], "p_value", 0.05, [], targets,
                                           details={"no_dominant_label": spread,
                                                    "spread_targets": fam["distinct_targets"],
                                                    "spread_limit": limit})
    return out


def judge(row: dict) -> dict:
    res = results_of(row)
    out = {}
    for name, (comb, voting, spread) in RULES.items():
        given = [res[v] for v in voting if v in res] + ([res["untargeted"]] if spread and "untargeted" in res else [])
        verdict, _, p, targets, _ = combine(given, 0.05, 0.01, voting, comb)
        out[name] = {"verdict": verdict, "p": p, "targets": targets}
    return out


def summary(rows: list[dict], rule: str) -> dict:
    bd = [r for r in rows if r["attack"] is not None]
    cl = [r for r in rows if r["attack"] is None]

    def nlp(r: dict) -> float:
        return -math.log10(max(r["rules"][rule]["p"], 1e-300))

    def flagged(r: dict) -> bool:
        return r["rules"][rule]["verdict"] != "clean"

    return {"auroc_p": auroc([nlp(r) for r in bd], [nlp(r) for r in cl]),
            "flagged_bd": sum(map(flagged, bd)), "n_bd": len(bd),
            "backdoored_bd": sum(r["rules"][rule]["verdict"] == "backdoored" for r in bd),
            "flagged_clean": sum(map(flagged, cl)), "n_clean": len(cl),
            "min_clean_p": min((r["rules"][rule]["p"] for r in cl), default=float("nan")),
            "missed": [r["label"] for r in bd if not flagged(r)]}


def table(name: str, rows: list[dict]) -> list[str]:
    lines = [f"### {name}", "", "| model | NC p | UP p | FI p | UT map distinct | " +
             " | ".join(RULES) + " |", "|---|---|---|---|---|" + "---|" * len(RULES)]
    for r in rows:
        ut = r.get("ut_evidence")
        distinct = "—" if ut is None else str(ut["families"][ut["family"]]["distinct_targets"])
        cells = []
        for rule in RULES:
            v = r["rules"][rule]
            mark = {"clean": "clean", "suspicious": "**S**", "backdoored": "**B**"}[v["verdict"]]
            cells.append(f"{v['p']:.2g} {mark}")
        lines.append(f"| {r['label']} | {r['nc_p']:.2g} | {r['up_p']:.2g} | "
                     f"{r['fi_p']:.2g} | {distinct} | " + " | ".join(cells) + " |")
    lines += ["", "| rule | ROC-AUC of combined p | flagged backdoored | of which `backdoored` | false alarms "
              "(clean flagged) | smallest clean p | missed |", "|---|---|---|---|---|---|---|"]
    for rule in RULES:
        s = summary(rows, rule)
        au = "n/a" if s["auroc_p"] is None else f"{s['auroc_p']:.3f}"
        lines.append(f"| {rule} | {au} | {s['flagged_bd']}/{s['n_bd']} | {s['backdoored_bd']}/{s['n_bd']} | "
                     f"{s['flagged_clean']}/{s['n_clean']} | {s['min_clean_p']:.3g} | "
                     f"{', '.join(s['missed']) or '—'} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", required=True, help="comma-separated bench JSONs: the models the rule was chosen on")
    ap.add_argument("--held-out", required=True, help="comma-separated bench JSONs: models trained afterwards")
    ap.add_argument("--retrained", help="comma-separated bench JSONs: the default seeds trained again")
    ap.add_argument("--out", default="bench/results/detect_cpu_verdict.md")
    args = ap.parse_args(argv)
    groups = {"original (the rules were chosen on these)": args.original.split(","),
              "held-out (new seeds, trained after the rules were fixed)": args.held_out.split(",")}
    if args.retrained:
        groups["retrained (default seeds, a second training of the recipe)"] = args.retrained.split(",")
    report: dict[str, list[dict]] = {}
    lines = ["# The verdict's rules on the CPU detection benchmark", "",
             f"Command: `python bench/detect_verdict_table.py {' '.join(argv or sys.argv[1:])}`. Each model's "
             "p-values and untargeted flip map from the benchmark's scans, through core.detect.verdict.combine. "
             "S = suspicious (p < 0.05 or the spread rule), B = backdoored (p < 0.01). Bonf = min(1, m x min p); "
             "ACAT = the Cauchy combination; spread = suspicious when the untargeted trigger sends the sources to "
             f"more than {SPREAD_FRACTION} x K distinct labels (no dominant label).", ""]
    for name, paths in groups.items():
        rows = list(load(paths).values())
        for r in rows:
            r["rules"] = judge(r)
        report[name] = rows
        lines += table(name, rows)
    both = [r for rows in list(report.values())[:2] for r in rows]
    lines += table("original and held-out together", both)
    out = Path(args.out)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(["python", "bench/detect_verdict_table.py", *(argv or sys.argv[1:])]),
         "groups": {g: [{k: r[k] for k in ("label", "attack", "nc_p", "up_p", "fi_p", "rules")} |
                        {"ut_distinct": r["ut_evidence"]["families"][r["ut_evidence"]["family"]]["distinct_targets"]
                         if r.get("ut_evidence") else None} for r in rows] for g, rows in report.items()},
         "summary": {g: {rule: summary(rows, rule) for rule in RULES} for g, rows in
                     [*report.items(), ("all", both)]}}, indent=2, default=float))
    print(out.read_text())


if __name__ == "__main__":
    main()
