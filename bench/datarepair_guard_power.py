"""Probe for issue 11: would a held-out-clean guard (keep the original model unless the repaired one is better on
a held-out part of the clean set, by McNemar's paired test) have power at the CPU profile's sizes? One corrupted
model and one ``retain`` repair of the bench (``bench/datarepair_bench.py``); both models' per-image correctness
on the test set gives the discordant pairs (b: only the repaired is right, c: only the original); the exact
McNemar test on the whole test set, and the power of the same one-sided test at level 0.05 on held-out sets of n
images drawn from the test set (2,000 bootstrap draws), i.e. how often a guard of that size would accept the
repair (reject "not better").

    nice -n 10 python -m bench.datarepair_guard_power --profile cpu_cnn --dataset cifar10 --row corrupt20 --seed 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest

from bench.datarepair_bench import NORMS, PROFILES, build, corrupt, split
from core.datarepair.registry import repair_data
from core.defenses.runtime import DeviceImages, runtime_for
from core.training import train_classifier


@torch.no_grad()
def correct(model: torch.nn.Module, data, norm) -> np.ndarray:
    """Per test image: whether ``model`` classifies it right."""
    rt = runtime_for("cpu")
    d = DeviceImages(data, norm, rt)
    model.eval()
    out = []
    for i in range(0, len(d), 500):
        idx = torch.arange(i, min(i + 500, len(d)))
        out.append((model(d.inputs(idx)).argmax(1) == d.y[idx]).numpy())
    return np.concatenate(out)


def mcnemar_greater(b: int, c: int) -> float:
    """One-sided exact McNemar p-value for "the repaired model is better" (b = only it is right)."""
    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="greater").pvalue)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu_cnn")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--row", default="corrupt20")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sizes", default="200,500,1000")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    profile, norm = PROFILES[args.profile], NORMS[args.dataset]
    train, clean, test = split(args.dataset, profile, args.seed)
    data, _, _ = corrupt(args.dataset, args.row, train, args.seed)
    model = train_classifier(build(profile.arch, train.image_shape, args.seed), data, norm, profile.train_epochs,
                             profile.train_lr, 128, "cpu", augment=profile.train_augment, seed=args.seed)
    params = next(p for label, _, p in profile.methods if label == "retain")
    repaired = repair_data("retain", model, data, clean, norm, params, "cpu", 10, seed=args.seed).model
    before, after = correct(model, test, norm), correct(repaired, test, norm)
    b, c = int((after & ~before).sum()), int((before & ~after).sum())
    rng = np.random.default_rng(0)
    power = {}
    for n in map(int, args.sizes.split(",")):
        draws = rng.integers(0, len(test), (2000, n))
        bs, cs = (after & ~before)[draws].sum(1), (before & ~after)[draws].sum(1)
        power[n] = float(np.mean([mcnemar_greater(int(x), int(y)) < 0.05 for x, y in zip(bs, cs, strict=True)]))
    rec = {"profile": args.profile, "dataset": args.dataset, "row": args.row, "seed": args.seed,
           "acc_before": float(before.mean()), "acc_after": float(after.mean()), "n_test": len(test),
           "b_only_repaired_right": b, "c_only_original_right": c, "discordance": (b + c) / len(test),
           "mcnemar_p_repaired_better": mcnemar_greater(b, c), "mcnemar_p_repaired_worse": mcnemar_greater(c, b),
           "power_accept_at_0.05": power}
    print(json.dumps(rec, indent=1))
    if args.out:
        args.out.write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
