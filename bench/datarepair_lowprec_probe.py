"""Probe for issue 11: what ``retain`` does with the *wrongly* flagged (benign) samples when the flags are loose,
and what that costs against ``erase_flagged``. CPU profile (Fashion-MNIST MLP, bench/datarepair_bench.py;
``--profile cpu_cnn --dataset cifar10`` for the small CNN on CIFAR-10); per (row, seed) one corrupted model and one
identification at the given null quantile, shared by every variant, so the variants differ only in what is done
with the flags. Prints, per row, the fate of the flagged samples split by truth (benign = label right and input
clean; bad = the corrupted ones): relabelled to the true label, relabelled to a wrong one, confirmed, dropped,
unlearned; then ACC (ASR) of each variant and of drop / erase.

    nice -n 10 python -m bench.datarepair_lowprec_probe --rows sym20,asym20 --seeds 0,1 --quantile 0.6
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.datarepair_bench import NORMS, PROFILES, build, corrupt, split
from core.attacks.base import make_backdoor_test_set
from core.datarepair.identify import (
    IdentifyConfig,
    identify,
    label_flags_at,
    null_label_flags_at,
    posterior_label_flags_at,
)
from core.datarepair.repair import EraseConfig, RepairTrainConfig, anchored_finetune, gradient_ascent, kept_set
from core.datarepair.separate import separate
from core.defenses.baselines import FinetuneConfig, vanilla_finetune
from core.defenses.runtime import prepare_model, runtime_for
from core.metrics import evaluate
from core.progress import Progress
from core.training import train_classifier

# separation variants: keyword arguments of core.datarepair.separate.separate on top of the defaults
VARIANTS: dict[str, dict] = {
    "retain (default)": {},
    "retain[all_agree]": {"all_agree": True},
    "retain[no_unlearn]": {"unlearn_weight": 0.0},
    "retain[act0.95 keep]": {"act": 0.95, "weak_flags": "keep"},
    "retain[act0.95 drop]": {"act": 0.95, "weak_flags": "drop"},
    # the two-test rule (share and clean null). Result files before it replaced them name it `class_both`, and
    # `class_test` there is the share test alone, `class_null` the clean-null test alone (BENCHMARKS.md 7.0c)
    "retain[act0.95 class_test]": {"act": 0.95, "weak_flags": "class_test"},
    "retain[act0.95 keep noise_matrix]": {"act": 0.95, "weak_flags": "keep", "relabel_prior": "noise_matrix"},
    # exploratory (BENCHMARKS.md 7.0d): a relabelled sample whose given label is below chance also has that label
    # unlearned (as a dropped one would), with and without the noise matrix
    "retain[act0.95 keep unlearn_relabelled]": {"act": 0.95, "weak_flags": "keep", "unlearn_relabelled": True},
    "retain[act0.95 keep noise_matrix unlearn_relabelled]": {"act": 0.95, "weak_flags": "keep",
                                                             "relabel_prior": "noise_matrix",
                                                             "unlearn_relabelled": True},
    # BENCHMARKS.md 7.0d, options b/c: the acting flags by the noise-matrix posterior of the given label
    # (core.datarepair.identify.posterior_label_flags_at, retain's act_score="noise_posterior"), with the plain
    # relabelling or with the noise-matrix one
    "retain[act0.95 keep strong_posterior]": {"act": 0.95, "weak_flags": "keep", "strong_posterior": True},
    "retain[act0.95 keep noise_matrix strong_posterior]": {"act": 0.95, "weak_flags": "keep",
                                                           "relabel_prior": "noise_matrix", "strong_posterior": True},
}


def fates(sep, flagged: np.ndarray, benign: np.ndarray, true_y: np.ndarray) -> dict[str, dict[str, int]]:
    """Counts of what step 2 did with the flagged samples, benign and bad apart."""
    out = {}
    for name, part in (("benign", flagged & benign), ("bad", flagged & ~benign)):
        out[name] = {"flagged": int(part.sum()),
                     "relabelled_true": int((part & sep.relabelled & (sep.new_labels == true_y)).sum()),
                     "relabelled_wrong": int((part & sep.relabelled & (sep.new_labels != true_y)).sum()),
                     "confirmed": int((part & sep.confirmed).sum()),
                     "dropped_only": int((part & sep.dropped & ~sep.unlearn).sum()),
                     "kept_weak": int((part & sep.weak & ~sep.dropped).sum()) if sep.weak is not None else 0,
                     "unlearned": int((part & sep.unlearn).sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu", help="a bench/datarepair_bench.py profile (cpu: MLP, cpu_cnn: CNN)")
    ap.add_argument("--dataset", default="fmnist")
    ap.add_argument("--rows", default="sym20,asym20,corrupt20,badnets10")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--quantile", type=float, default=0.6)
    ap.add_argument("--variants", default=";".join(VARIANTS), help="variant names, separated by ;")
    ap.add_argument("--baselines", default="drop,erase")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    norm, profile, rt = NORMS[args.dataset], PROFILES[args.profile], runtime_for("cpu")
    aug = profile.arch != "mlp"  # the MLP profile runs every method without crop+flip (bench/datarepair_bench.py)
    records = []
    for seed in map(int, args.seeds.split(",")):
        train, clean, test = split(args.dataset, profile, seed)
        for row in args.rows.split(","):
            data, bad, attack = corrupt(args.dataset, row, train, seed)
            true_y = train.y.astype(np.int64)
            benign = ~bad
            backdoor = make_backdoor_test_set(attack, test, 10) if attack is not None else None
            model = train_classifier(build(profile.arch, train.image_shape, seed), data, norm, profile.train_epochs,
                                     profile.train_lr, 128, "cpu", augment=profile.train_augment, seed=seed)
            before = evaluate(model, test, backdoor, norm, "cpu")
            t = time.perf_counter()
            ident = identify(model, data, clean, norm, IdentifyConfig(null_quantile=args.quantile,
                                                                    calib_augment=aug, seed=seed),
                             rt, 10, Progress())
            t_ident = time.perf_counter() - t
            flagged = ident.flagged
            tp = int((flagged & bad).sum())
            print(f"{args.dataset} seed {seed} {row} q{args.quantile:g}: corrupted ACC {before.acc:.4f} "
                  f"ASR {before.asr} "
                  f"flagged {int(flagged.sum())} P {tp / max(1, flagged.sum()):.3f} R {tp / max(1, bad.sum()):.3f}"
                  f" (identify {t_ident:.0f}s)", flush=True)
            train_cfg = RepairTrainConfig(augment=aug)
            label_flagged = ident.flagged if ident.label_flagged is None else ident.label_flagged
            for name in args.variants.split(";"):
                v = dict(VARIANTS[name])
                all_agree = v.pop("all_agree", False)
                unlearn_weight = v.pop("unlearn_weight", 0.5)
                act = v.pop("act", None)
                unlearn_relabelled = v.pop("unlearn_relabelled", False)
                strong_posterior = v.pop("strong_posterior", False)
                if act is not None and act > args.quantile:
                    v["strong"] = (posterior_label_flags_at(ident, data.y, clean.y, act) if strong_posterior
                                   else label_flags_at(ident, act))
                    if v.get("weak_flags") == "class_test":
                        v["clean_strong"] = null_label_flags_at(ident, act)
                if v.get("relabel_prior") == "noise_matrix":  # the noise matrix of each reference (separate.py)
                    v["prior_probs"] = ident.reference_probs
                sep = separate(label_flagged, data.y, ident.probs, ident.clean_probs, clean.y, 0.9, 10,
                               ident.reference, ident.reference_clean_probs,
                               ident.reference_probs if all_agree else None, ident.input_flagged, **v)
                if unlearn_relabelled:
                    below = ident.probs[np.arange(len(data.y)), data.y.astype(np.int64)] < 0.1
                    sep.unlearn = sep.unlearn | (sep.relabelled & below)
                repaired = prepare_model(copy.deepcopy(model), rt)
                weights = None if sep.weights is None else sep.weights[sep.new_labels >= 0]
                anchored_finetune(repaired, kept_set(data, sep.new_labels), clean,
                                  data.subset(np.flatnonzero(sep.unlearn)), norm, train_cfg, unlearn_weight, rt,
                                  seed, Progress(), kept_weights=weights)
                after = evaluate(repaired, test, backdoor, norm, "cpu")
                f = fates(sep, flagged, benign, true_y)
                records.append({"dataset": args.dataset, "seed": seed, "row": row, "q": args.quantile, "variant": name,
                                "acc": after.acc,
                                "asr": after.asr, "before": before.acc, "fates": f, "n_flagged": int(flagged.sum()),
                                "precision": tp / max(1, flagged.sum()),
                                "weak_dropped_classes": sep.details.get("weak_dropped_classes")})
                print(f"  {name:24s} ACC {after.acc:.4f} ASR {after.asr}  benign {f['benign']}  bad {f['bad']}",
                      flush=True)
            for name in args.baselines.split(",") if args.baselines else []:
                repaired = prepare_model(copy.deepcopy(model), rt)
                if name == "drop":
                    labels = np.where(flagged, -1, data.y).astype(np.int64)
                    anchored_finetune(repaired, kept_set(data, labels), clean, None, norm, train_cfg, 0.0, rt, seed,
                                      Progress())
                else:
                    ft = FinetuneConfig(augment=aug, seed=seed)
                    gradient_ascent(repaired, data.subset(np.flatnonzero(flagged)), norm, EraseConfig(),
                                    ft.batch_size, rt, ft.seed, Progress())
                    repaired = vanilla_finetune(repaired, clean, norm, ft, "cpu").model
                after = evaluate(repaired, test, backdoor, norm, "cpu")
                records.append({"dataset": args.dataset, "seed": seed, "row": row, "q": args.quantile, "variant": name,
                                "acc": after.acc,
                                "asr": after.asr, "before": before.acc, "n_flagged": int(flagged.sum()),
                                "precision": tp / max(1, flagged.sum())})
                print(f"  {name:24s} ACC {after.acc:.4f} ASR {after.asr}", flush=True)
            if args.out:
                args.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
