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


def inputs_only(args: argparse.Namespace, profile: object) -> None:
    """Per data set and row: the input-quality distance's AUROC against the corrupted samples, the population
    test, and the input flags' precision / recall at the level retain uses (three-way Bonferroni)."""
    from sklearn.metrics import roc_auc_score

    from core.datarepair.identify import fold_index, null_scaled, population_test
    from core.datarepair.quality import input_quality_scores, statistics_of

    level = 1 - 0.05 / 3
    for name in args.datasets.split(","):
        train, clean, _ = split(name, profile, args.seed)
        cs = statistics_of(clean)
        for row in args.rows.split(","):
            data, bad, _ = corrupt(name, row, train, args.seed)
            s, null = input_quality_scores(statistics_of(data), cs, fold_index(len(clean), 2, args.seed))
            gate = population_test(s, null, level, 0.05)
            flags = (null_scaled(s, null, level)[0] > 1) & gate["corrupted_inputs"]
            tp = int((flags & bad).sum())
            print(f"{name} {row}: AUROC {roc_auc_score(bad, s):.4f}; population test p {gate['p_value']:.3g} "
                  f"(train exceed {gate['train_exceed_rate']:.4f}, clean {gate['clean_exceed_rate']:.4f}) -> "
                  f"{'input flags' if gate['corrupted_inputs'] else 'no input flags'}: {int(flags.sum())} flagged, "
                  f"P {tp / max(1, flags.sum()):.3f} R {tp / bad.sum():.3f}", flush=True)
            if row == "corrupt20":  # the halves as corrupt() draws them: Gaussian noise, then blur
                chosen = np.random.default_rng(args.seed).choice(len(data), round(0.2 * len(data)), replace=False)
                for half, part in (("noise", chosen[: len(chosen) // 2]), ("blur", chosen[len(chosen) // 2:])):
                    auc = roc_auc_score(np.r_[np.ones(len(part)), np.zeros((~bad).sum())], np.r_[s[part], s[~bad]])
                    print(f"  {half}: AUROC against the harmless samples {auc:.4f}, recall {flags[part].mean():.3f}",
                          flush=True)


def fractions(args: argparse.Namespace, profile: object) -> None:
    """How small a corrupted fraction the population test notices: k of corrupt20's corrupted images (half noise,
    half blur, as drawn) put into the otherwise clean training set, the rest untouched."""
    from core.datarepair.identify import fold_index, null_scaled, population_test
    from core.datarepair.quality import input_quality_scores, statistics_of

    level = 1 - 0.05 / 3
    for name in args.datasets.split(","):
        train, clean, _ = split(name, profile, args.seed)
        data, bad, _ = corrupt(name, "corrupt20", train, args.seed)
        cs, corrupted, original = statistics_of(clean), statistics_of(data), statistics_of(train)
        idx, rng = np.flatnonzero(bad), np.random.default_rng(args.seed)
        for frac in (0.005, 0.01, 0.02, 0.05):
            k = round(frac * len(train))
            pick = rng.choice(idx, k, replace=False)
            stats, b = original.copy(), np.zeros(len(train), bool)
            stats[pick], b[pick] = corrupted[pick], True
            s, null = input_quality_scores(stats, cs, fold_index(len(clean), 2, args.seed))
            gate = population_test(s, null, level, 0.05)
            fl = (null_scaled(s, null, level)[0] > 1) & gate["corrupted_inputs"]
            print(f"{name} corrupted inputs {frac:.1%} ({k}): p {gate['p_value']:.3g} -> "
                  f"{'flags' if gate['corrupted_inputs'] else 'no flags'}; flagged {int(fl.sum())} "
                  f"P {(fl & b).sum() / max(1, fl.sum()):.3f} R {(fl & b).sum() / k:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    ap.add_argument("--datasets", default="fmnist")
    ap.add_argument("--rows", default="corrupt20,sym20")
    ap.add_argument("--variants", default=",".join(str(i) for i in range(len(VARIANTS))))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--inputs-only", action="store_true",
                    help="only the input-quality reference per row (no model: it does not depend on one)")
    ap.add_argument("--fractions", action="store_true",
                    help="the population test's power: 0.5-5%% of the images corrupted (drawn from corrupt20's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    profile = PROFILES[args.profile]
    if args.inputs_only:
        inputs_only(args, profile)
        return
    if args.fractions:
        fractions(args, profile)
        return
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
