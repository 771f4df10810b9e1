"""Offline check behind ``weak_flags="class_test"`` (issue 11, docs/datarepair.md "Which weak flags to drop"): before
building, is an all-to-one backdoor visible in *which classes* the flags fall in? Fashion-MNIST CPU profile, per
(row, seed) one corrupted model and one identification at null quantile 0.6 (as bench/datarepair_lowprec_probe.py);
no repair. Prints per given label: the weak flags (flagged at the configured level, not at 0.95) against the class's
share of the training set, and against that share scaled by the class's clean-null flag rate, with the poisons/noisy
among them; then the strong flags by class with :func:`core.datarepair.separate.concentrated_classes`' test, and its
clean-null form (``weak_flags="class_null"``: per class, Fisher against the held-out clean samples' flag rate).

    nice -n 10 python -m bench.datarepair_weakclass_offline --rows badnets10,sym20,asym20,corrupt20 --seeds 0,1,2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import binom

from bench.datarepair_bench import NORMS, PROFILES, build, corrupt, split
from core.datarepair.identify import IdentifyConfig, identify, label_flags_at, null_label_flags_at
from core.datarepair.separate import concentrated_classes
from core.defenses.runtime import runtime_for
from core.progress import Progress
from core.training import train_classifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="badnets10,sym20,asym20,corrupt20")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quantile", type=float, default=0.6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    norm, profile, rt = NORMS["fmnist"], PROFILES["cpu"], runtime_for("cpu")
    for seed in map(int, args.seeds.split(",")):
        train, clean, _ = split("fmnist", profile, seed)
        for row in args.rows.split(","):
            data, bad, _ = corrupt("fmnist", row, train, seed)
            model = train_classifier(build(profile.arch, train.image_shape, seed), data, norm, profile.train_epochs,
                                     profile.train_lr, 128, "cpu", augment=profile.train_augment, seed=seed)
            ident = identify(model, data, clean, norm, IdentifyConfig(null_quantile=args.quantile,
                                                                    calib_augment=False, seed=seed), rt, 10,
                             Progress())
            y = data.y.astype(np.int64)
            strong = ident.label_flagged & label_flags_at(ident, 0.95)
            weak = ident.label_flagged & ~strong
            n_c = np.bincount(y, minlength=10)
            k_c = np.bincount(y[weak], minlength=10)
            share = weak.sum() * n_c / n_c.sum()
            r_c = np.bincount(clean.y[ident.null_scores > 1], minlength=10) / np.bincount(clean.y, minlength=10)
            pi = n_c * r_c / (n_c * r_c).sum()
            p_adj = binom.sf(k_c - 1, weak.sum(), pi)
            rejected, _ = concentrated_classes(y, strong, 10, 0.05)
            print(f"{row} seed {seed}: weak {int(weak.sum())} (bad {int((weak & bad).sum())}), "
                  f"strong {int(strong.sum())}")
            print(f"  weak by class        {k_c.tolist()}")
            print(f"  of which bad         {np.bincount(y[weak & bad], minlength=10).tolist()}")
            print(f"  expected (share)     {np.round(share).astype(int).tolist()}")
            print(f"  expected (share x clean-null flag rate) {np.round(weak.sum() * pi).astype(int).tolist()}, "
                  f"rejected at 0.05/10: {np.flatnonzero(p_adj < 0.005).tolist()}")
            print(f"  strong by class      {np.bincount(y[strong], minlength=10).tolist()}, "
                  f"class test rejects {np.flatnonzero(rejected).tolist()}: their weak flags "
                  f"{int(k_c[rejected].sum())}, bad among them {int((weak & bad & rejected[y]).sum())}", flush=True)
            clean_strong = null_label_flags_at(ident, 0.95)
            rej_null, p_null = concentrated_classes(y, strong, 10, 0.05, clean.y, clean_strong)
            s_c = np.bincount(y[strong], minlength=10)
            print(f"  train strong rate %  {np.round(100 * s_c / n_c, 1).tolist()}")
            print(f"  clean strong m_c/l_c {np.bincount(clean.y[clean_strong], minlength=10).tolist()} / "
                  f"{np.bincount(clean.y, minlength=10).tolist()}")
            print(f"  clean-null Fisher p  {[float(f'{p:.2g}') for p in p_null]}, "
                  f"rejects {np.flatnonzero(rej_null).tolist()}"
                  f": their weak flags {int(k_c[rej_null].sum())}, bad among them "
                  f"{int((weak & bad & rej_null[y]).sum())}", flush=True)


if __name__ == "__main__":
    main()
