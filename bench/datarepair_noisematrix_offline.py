"""Offline check behind ``relabel_prior="noise_matrix"`` (issue 11, docs/datarepair.md "The noise's structure"):
before any repair, does the confident-learning noise matrix make the relabelling of the strong flags more precise?
Fashion-MNIST CPU profile, per (row, seed) one corrupted model and one identification at null quantile 0.6 (as
bench/datarepair_lowprec_probe.py); step 2 with ``act_quantile`` 0.95 and ``weak_flags="keep"`` (the default), with
and without the prior; no repair. Prints per reference the estimated noise matrix's largest off-diagonal entries
(against the planted flips), and per variant the relabelled strong flags split by truth: true flips relabelled to
their clean label, relabelled wrong, benign flags relabelled (always wrong), and the relabel precision (fraction
relabelled to the clean label). Also (option b, identification only) the AUROC against the corrupted samples of each
reference's loss of the given label, plain and under the noise matrix's posterior.

    nice -n 10 python -m bench.datarepair_noisematrix_offline --rows asym20,sym20 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from bench.datarepair_bench import ASYM_FLIPS, NORMS, PROFILES, build, corrupt, split
from core.datarepair.identify import IdentifyConfig, _flags_at, identify, label_flags_at, null_scaled
from core.datarepair.separate import noise_matrix, separate
from core.defenses.runtime import runtime_for
from core.progress import Progress
from core.training import train_classifier


def relabel_counts(sep, strong: np.ndarray, bad: np.ndarray, true_y: np.ndarray) -> dict[str, object]:
    rel = sep.relabelled
    right = rel & (sep.new_labels == true_y)
    return {"relabelled": int(rel.sum()), "bad_right": int((rel & bad & right).sum()),
            "bad_wrong": int((rel & bad & ~right).sum()), "benign": int((rel & ~bad).sum()),
            "precision": float(right.sum() / max(1, rel.sum())), "bad_strong": int((strong & bad).sum()),
            "dropped_bad": int((sep.dropped & bad).sum()), "unlearned": int(sep.unlearn.sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="asym20,sym20")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quantile", type=float, default=0.6)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    norm, profile, rt = NORMS["fmnist"], PROFILES["cpu"], runtime_for("cpu")
    records = []
    for seed in map(int, args.seeds.split(",")):
        train, clean, _ = split("fmnist", profile, seed)
        for row in args.rows.split(","):
            data, bad, _ = corrupt("fmnist", row, train, seed)
            true_y = train.y.astype(np.int64)
            y = data.y.astype(np.int64)
            model = train_classifier(build(profile.arch, train.image_shape, seed), data, norm, profile.train_epochs,
                                     profile.train_lr, 128, "cpu", augment=profile.train_augment, seed=seed)
            ident = identify(model, data, clean, norm, IdentifyConfig(null_quantile=args.quantile,
                                                                    calib_augment=False, seed=seed), rt, 10,
                             Progress())
            strong = label_flags_at(ident, 0.95)
            flagged = ident.label_flagged
            print(f"{row} seed {seed}: flagged {int(flagged.sum())} strong {int((flagged & strong).sum())} "
                  f"(bad {int((flagged & strong & bad).sum())})", flush=True)
            rec: dict[str, object] = {"row": row, "seed": seed}
            planted = ASYM_FLIPS["fmnist"] if row == "asym20" else {}
            for r, p in enumerate(ident.reference_probs):
                t = noise_matrix(y, p, 10)
                off = t - np.diag(np.diag(t))
                top = np.dstack(np.unravel_index(np.argsort(-off, axis=None)[:8], off.shape))[0]
                print(f"  ref {r} T[given, true] top: "
                      + ", ".join(f"{j}->{i} {off[i, j]:.3f}{'*' if planted.get(int(j)) == i else ''}"
                                  for i, j in top), flush=True)
                post = p * t[y]
                post = post[np.arange(len(y)), y] / post.sum(1)
                plain = p[np.arange(len(y)), y]
                au_plain = roc_auc_score(bad, -np.log(plain + 1e-12))
                au_post = roc_auc_score(bad, -np.log(post + 1e-12))
                print(f"  ref {r} AUROC (given-label loss) plain {au_plain:.4f}  noise-matrix posterior "
                      f"{au_post:.4f}", flush=True)
                rec[f"ref{r}_T"] = t.tolist()
                rec[f"ref{r}_auroc"] = [au_plain, au_post]
            # option b: the flag score as -log of the posterior that the given label is the true one, each reference
            # with its own matrix and its own clean null scored the same way (the clean labels, the same matrix)
            cy = clean.y.astype(np.int64)
            refs_post = []
            for r, p in enumerate(ident.reference_probs):
                t = np.asarray(rec[f"ref{r}_T"])
                pc = ident.reference_clean_probs[r].astype(np.float64)
                post = (p * t[y])[np.arange(len(y)), y] / (p * t[y]).sum(1)
                post_c = (pc * t[cy])[np.arange(len(cy)), cy] / (pc * t[cy]).sum(1)
                refs_post.append((-np.log(post + 1e-12), -np.log(post_c + 1e-12)))
            for level in (args.quantile, 0.95):
                plain_f = _flags_at(ident, level)[0]
                q = 1 - (1 - level) / max(1, ident.n_split)
                post_f = np.max([null_scaled(s, nl, q)[0] for s, nl in refs_post], axis=0) > 1.0
                for name, f in (("plain", plain_f), ("posterior", post_f)):
                    tp = int((f & bad).sum())
                    rec[f"flags_{name}_{level:g}"] = [int(f.sum()), tp]
                    print(f"  flags at {level:g} {name:9s}: {int(f.sum())} flagged, P {tp / max(1, f.sum()):.3f} "
                          f"R {tp / max(1, bad.sum()):.3f}", flush=True)
            for prior in ("none", "noise_matrix"):
                sep = separate(flagged, y, ident.probs, ident.clean_probs, clean.y, 0.9, 10, ident.reference,
                               ident.reference_clean_probs, None, ident.input_flagged, strong=strong,
                               weak_flags="keep", relabel_prior=prior, prior_probs=ident.reference_probs)
                c = relabel_counts(sep, flagged & strong, bad, true_y)
                rec[prior] = c
                print(f"  {prior:13s} {c}", flush=True)
            records.append(rec)
            if args.out:
                args.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
