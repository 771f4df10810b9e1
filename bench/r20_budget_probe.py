"""Which training budget makes the ``cpu_resnet20`` profile's backdoors take (issue 10): trains the BadNets
(or any) ResNet-20 of ``bench/repair_bench.py`` exactly as the bench does (same split, seeds, poisoning,
``train_classifier``) under profile variants and prints clean ACC, ASR and training seconds per variant.
The models go to ``--model-cache`` under the bench's own names, so a chosen variant's models are reused.
Variants change the profile as it stands (each row of ``--out`` records the resolved n, epochs, augment, lr,
batch); ``--curve`` adds ACC, ASR and the fit of the poisoned training images after every epoch.

    OMP_NUM_THREADS=1 nice -n 10 python bench/r20_budget_probe.py --variants lr0.05,lr0.02,n2500_e20 --curve
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.repair_bench import CIFAR_NORM, CLEAN_MODEL, PROFILES, build_model, load_data, model_cache_path, split_data  # noqa: E402
from core.attacks.base import make_backdoor_test_set, poison_training_set  # noqa: E402
from core.attacks.registry import create_attack  # noqa: E402
from core.metrics import evaluate, predict  # noqa: E402
from core.progress import Progress  # noqa: E402
from core.training import train_classifier  # noqa: E402


class EpochCurve(Progress):
    """A progress reporter that, at each epoch's end (``train_classifier`` calls ``update`` then), measures
    ACC on up to 1,000 test images, ASR on their triggered copies and the share of the poisoned training images
    answered with their poisoned label, so a run shows whether the backdoor is still being learned."""

    def __init__(self, measure) -> None:
        super().__init__()
        self.measure = measure
        self.rows: list[dict[str, float]] = []
        self.seconds = 0.0  # spent measuring, left out of the variant's training time

    def update(self, fraction: float) -> None:
        super().update(fraction)
        t0 = time.perf_counter()
        self.rows.append({"frac": round(fraction, 3), **self.measure()})
        self.seconds += time.perf_counter() - t0
        print("  epoch", json.dumps(self.rows[-1]), flush=True)


def parse_variant(spec: str, base):
    """``n5000_e10_aug0_lr0.05_b32``: any subset of n (training images), e (epochs), aug, lr, b (batch)."""
    keys = {"n": ("n_train", int), "e": ("epochs", int), "aug": ("augment", lambda s: bool(int(s))),
            "lr": ("lr", float), "b": ("batch_size", int)}
    changes = {}
    for part in spec.split("_"):
        for k in sorted(keys, key=len, reverse=True):
            if part.startswith(k):
                field, conv = keys[k]
                changes[field] = conv(part[len(k):])
                break
        else:
            raise SystemExit(f"unknown variant part {part!r}")
    return dataclasses.replace(base, **changes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", required=True, help="comma-separated; each changes the cpu_resnet20 profile")
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-cache", default=str(Path.home() / ".cache/antidote/models"))
    ap.add_argument("--out", help="append one JSON line per variant here")
    ap.add_argument("--curve", action="store_true", help="also measure ACC/ASR/poisoned fit after every epoch")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = PROFILES["cpu_resnet20"]
    train_all, test_all = load_data(base, None)
    for spec in args.variants.split(","):
        prof = parse_variant(spec, base)
        train, _, test, _ = split_data(train_all, test_all, prof, args.seed)
        clean = args.attack == CLEAN_MODEL
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)  # as bench/repair_bench.py, so that the cached model is the bench's
        model = build_model(prof, 3, 10)
        attack = create_attack("badnets" if clean else args.attack, target=0, image_shape=train.image_shape,
                               seed=args.seed)
        cached = model_cache_path(args.model_cache, prof, args.attack, args.seed, len(train))
        poisoned = poison_training_set(attack, train, 0.0 if clean else 0.1, 10, args.seed)
        curve = None
        if cached.exists():
            model.load_state_dict(torch.load(cached, map_location="cpu"))
            status = "cached"
            curve_rows = None
        else:
            if args.curve:
                small = test.subset(np.arange(min(1000, len(test))))
                small_bd = make_backdoor_test_set(attack, small, 10)
                px, py = poisoned.data.x[poisoned.poisoned_index], poisoned.data.y[poisoned.poisoned_index]

                def measure(_m=model, _s=small, _b=small_bd, _px=px, _py=py) -> dict[str, float]:
                    ev = evaluate(_m, _s, _b, CIFAR_NORM, "cpu")
                    fit = float((predict(_m, _px, CIFAR_NORM, "cpu") == _py).mean()) if len(_px) else None
                    return {"acc": round(ev.acc, 4), "asr": round(ev.asr, 4), "fit_poisoned": fit}

                curve = EpochCurve(measure)
            train_classifier(model, poisoned.data, CIFAR_NORM, prof.epochs, prof.lr, prof.batch_size, "cpu",
                             augment=prof.augment, seed=args.seed, progress=curve)
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, cached)
            status = "trained"
            curve_rows = curve.rows if curve is not None else None
        train_s = time.perf_counter() - t0 - (curve.seconds if status == "trained" and curve is not None else 0.0)
        e = evaluate(model, test, make_backdoor_test_set(attack, test, 10), CIFAR_NORM, "cpu")
        # how far the model fitted its own (poisoned) training set: the relabelled images it answers with their
        # poisoned label, and the accuracy on the rest (no augmentation)
        pred = predict(model, poisoned.data.x, CIFAR_NORM, "cpu")
        is_p = np.zeros(len(pred), bool)
        is_p[poisoned.poisoned_index] = True
        hit = pred == poisoned.data.y
        row = {"variant": spec, "attack": args.attack, "seed": args.seed, "n_train": prof.n_train,
               "epochs": prof.epochs, "augment": prof.augment, "lr": prof.lr, "batch_size": prof.batch_size,
               "acc": e.acc, "asr": e.asr, "train_s": train_s,
               "status": status, "img_steps": prof.n_train * prof.epochs,
               "train_fit_poisoned": float(hit[is_p].mean()) if is_p.any() else None,
               "train_fit_clean": float(hit[~is_p].mean()), "curve": curve_rows}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
