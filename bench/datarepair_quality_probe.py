"""Probe for issue 11: the input-quality reference (core/datarepair/quality.py) and what step 2 does with an input
flagged as corrupted whose label the references do not contest (``input_weight``), measured through ``retain``.

Per data set and row of a benchmark profile: the corrupted model is trained once (as bench.datarepair_bench does),
then ``retain`` runs without input quality, and with it at ``input_weight`` 1 (kept as is), 0.5 and 0 (dropped).
Prints and writes identification P/R/AUROC, the input flags, ACC. Results: BENCHMARKS.md §7.0.

    nice -n 10 python -m bench.datarepair_quality_probe --profile cpu --datasets fmnist --rows corrupt20,sym20
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np
import torch

from bench.datarepair_bench import NORMS, PROFILES, build, corrupt, identification, split
from core.datarepair.registry import repair_data
from core.metrics import evaluate
from core.training import train_classifier

VARIANTS = (("no input quality", {"input_quality": False}), ("input_weight 1", {"input_weight": 1.0}),
            ("input_weight 0.5", {"input_weight": 0.5}), ("input_weight 0", {"input_weight": 0.0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    ap.add_argument("--datasets", default="fmnist")
    ap.add_argument("--rows", default="corrupt20,sym20")
    ap.add_argument("--variants", default=",".join(str(i) for i in range(len(VARIANTS))))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    profile = PROFILES[args.profile]
    base = next(p for label, _m, p in profile.methods if label == "retain")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = args.out or Path("bench/results") / f"datarepair_quality_probe_{args.profile}.json"
    records = []
    for name in args.datasets.split(","):
        train, clean, test = split(name, profile, args.seed)
        for row in args.rows.split(","):
            data, bad, attack = corrupt(name, row, train, args.seed)
            model = train_classifier(build(profile.arch, train.image_shape, args.seed), data, NORMS[name],
                                     profile.train_epochs, profile.train_lr, 128, "cpu",
                                     augment=profile.train_augment, seed=args.seed)
            acc0 = evaluate(model, test, None, NORMS[name], "cpu").acc
            print(f"{name} {row}: corrupted model ACC {acc0:.4f} (commit {commit})", flush=True)
            for i in args.variants.split(","):
                label, extra = VARIANTS[int(i)]
                r = repair_data("retain", model, data, clean, NORMS[name], {**base, **extra}, "cpu", 10,
                                seed=args.seed)
                acc = evaluate(r.model, test, None, NORMS[name], "cpu").acc
                ident = identification(bad, r.flagged, r.scores)
                inp = r.input_flagged if r.input_flagged is not None else np.zeros(len(bad), bool)
                rec = {"dataset": name, "row": row, "variant": label, "acc": acc, "corrupted_acc": acc0, **ident,
                       "n_flagged": int(r.flagged.sum()), "n_input_flagged": int(inp.sum()),
                       "input_precision": float((inp & bad).sum() / max(1, inp.sum())),
                       "input_recall": float((inp & bad).sum() / max(1, bad.sum())),
                       "n_relabelled": int(r.details.get("n_relabelled", 0)),
                       "n_input_kept": int(r.details.get("n_input_kept", 0)),
                       "n_relabelled_bad": int(((r.new_labels >= 0) & (r.new_labels != data.y) & bad).sum()),
                       "input_quality_test": r.details.get("input_quality_test"),
                       "time_s": r.timings.get("total"), "commit": commit}
                records.append(rec)
                print("  " + json.dumps(rec), flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
