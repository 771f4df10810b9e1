"""Probe for issue 11 (not a method): can a per-class out-of-distribution score in the penultimate features see
the corrupted inputs (and BadNets samples) that the loss scores miss?

Per row of the CPU profile (Fashion-MNIST, MLP, seed 0): the corrupted model's penultimate features; class means
and a tied covariance from half of the clean set; the Mahalanobis distance of each training sample to its
*given* class's clean mean; null = the other clean half; flag above the null's 0.95 quantile. Prints AUROC,
flagged, precision, recall (and the label-free distance to the nearest class mean). Results: BENCHMARKS.md §7.

    nice -n 10 python -m bench.datarepair_ood_probe
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from bench.datarepair_bench import NORMS, PROFILES, build, corrupt, split
from core.data.imageset import ImageSet
from core.defenses.runtime import DeviceImages, runtime_for
from core.training import train_classifier


def features(body: torch.nn.Module, data: ImageSet) -> np.ndarray:
    """Penultimate features of ``data`` (float64)."""
    d = DeviceImages(data, NORMS["fmnist"], runtime_for("cpu"))
    with torch.inference_mode():
        return torch.cat([body(d.inputs(slice(i, min(i + 512, len(d))))) for i in range(0, len(d), 512)]
                         ).double().numpy()


def main() -> None:
    torch.set_num_threads(1)
    train, clean, _ = split("fmnist", PROFILES["cpu"], 0)
    for row in ("corrupt20", "badnets10"):
        data, bad, _ = corrupt("fmnist", row, train, 0)
        model = train_classifier(build("mlp", train.image_shape, 0), data, NORMS["fmnist"], 30, 0.05, 128, "cpu",
                                 augment=False, seed=0)
        f_tr, f_cl = features(model[:-1], data), features(model[:-1], clean)
        fit = np.arange(len(clean)) % 2 == 0
        mu = np.stack([f_cl[fit & (clean.y == k)].mean(0) for k in range(10)])
        r = f_cl[fit] - mu[clean.y[fit]]
        prec = np.linalg.inv(r.T @ r / len(r) + 1e-3 * np.eye(r.shape[1]))

        def dist(f: np.ndarray, y: np.ndarray, mu: np.ndarray = mu, prec: np.ndarray = prec) -> np.ndarray:
            d = f - mu[y]
            return np.einsum("ij,jk,ik->i", d, prec, d)

        score, null = dist(f_tr, data.y), dist(f_cl[~fit], clean.y[~fit])
        flagged = score > np.quantile(null, 0.95)
        nearest = np.min(np.stack([dist(f_tr, np.full(len(data), k)) for k in range(10)]), 0)
        tp = int((bad & flagged).sum())
        print(f"{row}: given-class Mahalanobis AUROC {roc_auc_score(bad, score):.3f}, flagged {int(flagged.sum())}, "
              f"precision {tp / max(1, flagged.sum()):.3f}, recall {tp / bad.sum():.3f}; nearest-class "
              f"Mahalanobis AUROC {roc_auc_score(bad, nearest):.3f}", flush=True)
        if row == "corrupt20":  # the two halves of the corrupted samples: Gaussian noise, then blur
            chosen = np.random.default_rng(0).choice(len(data), round(0.2 * len(data)), replace=False)  # as corrupt()
            for name, part in (("noise", chosen[: len(chosen) // 2]), ("blur", chosen[len(chosen) // 2:])):
                auc = roc_auc_score(np.r_[np.ones(len(part)), np.zeros((~bad).sum())], np.r_[score[part], score[~bad]])
                print(f"  {name}: recall {flagged[part].mean():.3f}, AUROC against the harmless samples {auc:.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
