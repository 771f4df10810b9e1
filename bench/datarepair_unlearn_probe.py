"""Probe for issue 11: why ``retain`` falls below ``erase_flagged`` on low-precision flags, and what the
``unlearn_when_all_agree`` option trades. CPU profile model (Fashion-MNIST MLP, seed 0) of one row, then retain
with the row's null quantile under a few variants; prints ACC, ASR, precision, relabelled and unlearned counts.

    nice -n 10 python -m bench.datarepair_unlearn_probe sym20 0.6
    nice -n 10 python -m bench.datarepair_unlearn_probe badnets10 0.95
"""

from __future__ import annotations

import sys

import torch

from bench.datarepair_bench import NORMS, PROFILES, build, corrupt, split
from core.attacks.base import make_backdoor_test_set
from core.datarepair.registry import repair_data
from core.metrics import evaluate
from core.training import train_classifier

VARIANTS = {"default": {}, "unlearn_when_all_agree": {"unlearn_when_all_agree": True},
            "no scratch reference": {"scratch_reference": False}, "unlearn_weight 0": {"unlearn_weight": 0.0}}


def main() -> None:
    row, quantile = sys.argv[1], float(sys.argv[2])
    torch.set_num_threads(1)
    norm = NORMS["fmnist"]
    train, clean, test = split("fmnist", PROFILES["cpu"], 0)
    data, bad, attack = corrupt("fmnist", row, train, 0)
    backdoor = make_backdoor_test_set(attack, test, 10) if attack is not None else None
    model = train_classifier(build("mlp", train.image_shape, 0), data, norm, 30, 0.05, 128, "cpu", augment=False,
                             seed=0)
    for name, extra in VARIANTS.items():
        params = {"calib_augment": False, "augment": False, "null_quantile": quantile, **extra}
        result = repair_data("retain", model, data, clean, norm, params, "cpu", 10)
        after = evaluate(result.model, test, backdoor, norm, "cpu")
        f = result.flagged
        print(f"{row} q{quantile:g} {name}: ACC {after.acc:.4f} ASR {after.asr} P {(bad & f).sum() / f.sum():.3f} "
              f"relabelled {result.details['n_relabelled']} unlearned {result.details['n_unlearned']}", flush=True)


if __name__ == "__main__":
    main()
