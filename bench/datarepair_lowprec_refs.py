"""Probe for issue 11 (seed 0, Fashion-MNIST CPU profile): which reference raised the label flags of benign and of
corrupted samples, what step 2 did with them (relabelled / unlearned) and whether the *other* reference confidently
agrees with the given label; and each reference's rate of confidently wrong predictions on the held-out clean set.
Step 2 here is the old rule (every flag acts), to show where the false alarms come from.

    nice -n 10 python -m bench.datarepair_lowprec_refs sym20,corrupt20,badnets10
"""

from __future__ import annotations

import sys

import torch

from bench.datarepair_bench import NORMS, PROFILES, build, corrupt, split
from core.datarepair.identify import IdentifyConfig, identify
from core.datarepair.separate import relabel_threshold, separate
from core.defenses.runtime import runtime_for
from core.progress import Progress
from core.training import train_classifier


def main() -> None:
    torch.set_num_threads(1)
    norm, profile, rt, seed = NORMS["fmnist"], PROFILES["cpu"], runtime_for("cpu"), 0
    train, clean, _ = split("fmnist", profile, seed)
    for row in sys.argv[1].split(","):
        data, bad, _ = corrupt("fmnist", row, train, seed)
        model = train_classifier(build("mlp", train.image_shape, seed), data, norm, 30, 0.05, 128, "cpu",
                                 augment=False, seed=seed)
        for q in (0.6, 0.95):
            ident = identify(model, data, clean, norm, IdentifyConfig(null_quantile=q, calib_augment=False, seed=seed),
                             rt, 10, Progress())
            lf = ident.label_flagged
            sep = separate(lf, data.y, ident.probs, ident.clean_probs, clean.y, 0.9, 10, ident.reference,
                           ident.reference_clean_probs, None, ident.input_flagged)
            taus = [relabel_threshold(cp, clean.y, 0.9) for cp in ident.reference_clean_probs]
            probs = ident.reference_probs
            for group, mask in (("benign", lf & ~bad), ("bad", lf & bad)):
                parts = []
                for r in (0, 1):
                    m = mask & (ident.reference == r)
                    o = 1 - r
                    agree = (probs[o].argmax(1) == data.y) & (probs[o].max(1) >= taus[o])
                    parts.append(f"{['fine-tuned', 'scratch'][r]}: {m.sum()} flagged, {(m & sep.relabelled).sum()} "
                                 f"relabelled, {(m & sep.unlearn).sum()} unlearned, other reference confidently "
                                 f"agrees with the label on {(m & agree).sum()}")
                print(f"{row} q{q:g} {group} label flags: " + " | ".join(parts), flush=True)
            for r in (0, 1):
                cp = ident.reference_clean_probs[r]
                wrong = (cp.argmax(1) != clean.y) & (cp.max(1) >= taus[r])
                print(f"  held-out clean, {['fine-tuned', 'scratch'][r]} reference: relabel confidence {taus[r]:.3f}, "
                      f"confidently wrong on {wrong.mean():.3f}, confident on {(cp.max(1) >= taus[r]).mean():.3f}")


if __name__ == "__main__":
    main()
