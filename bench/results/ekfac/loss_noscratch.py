"""Identification only, scorer loss without the from-scratch reference (the pure scorer against ekfac / tracin), on
the same corrupted models as the bench (same seeds, same training call):
OMP_NUM_THREADS=1 PYTHONPATH=. python bench/results/ekfac/loss_noscratch.py 0,1,2,4,5,6"""
import sys

import torch
from sklearn.metrics import roc_auc_score

import bench.datarepair_bench as B
from core.datarepair.identify import IdentifyConfig, identify
from core.defenses.runtime import runtime_for
from core.progress import Progress
from core.training import train_classifier

torch.set_num_threads(1)
prof = B.PROFILES["cpu"]
for seed in [int(s) for s in sys.argv[1].split(",")]:
    train, clean, _ = B.split("fmnist", prof, seed)
    for row in ("sym20", "asym20", "badnets10"):
        data, bad, _ = B.corrupt("fmnist", row, train, seed)
        model = train_classifier(B.build(prof.arch, train.image_shape, seed), data, B.NORMS["fmnist"],
                                 prof.train_epochs, prof.train_lr, 128, "cpu", augment=False, seed=seed)
        cfg = IdentifyConfig(calib_augment=False, scratch_reference=False, seed=seed)
        ident = identify(model, data, clean, B.NORMS["fmnist"], cfg, runtime_for("cpu"), 10, Progress())
        fl = ident.label_flagged
        print(f"seed {seed} {row:9s} loss(no scratch) AUROC {roc_auc_score(bad, ident.scores):.4f} "
              f"P {(bad & fl).sum() / max(1, fl.sum()):.4f} R {(bad & fl).sum() / bad.sum():.4f}", flush=True)
