"""How much of its accuracy a cached cpu_resnet20 bench model keeps on shifted images (BENCHMARKS.md §2.14).

    python bench/crop_invariance_probe.py [--cache ~/.cache/antidote/models]

For every ``resnet20_cifar10_*.pt`` of ``bench/repair_bench.py``'s model cache: accuracy on the first 1,000
CIFAR-10 test images, plain, after the repair's random crop (zero padding 1, 2, 4; no flip) and mirrored, with
the share of the above-chance accuracy each keeps (the measure ``flip_sensible`` reads for flips).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.datasets import load_cifar10
from bench.repair_bench import CIFAR_NORM
from core.data.transforms import random_crop_flip, to_model_input
from core.models.registry import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/antidote/models").expanduser())
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, test = load_cifar10()
    x = to_model_input(test.x[:1000], CIFAR_NORM, "cpu")
    y = torch.as_tensor(test.y[:1000])
    for path in sorted(args.cache.glob("resnet20_cifar10_*.pt")):
        model = create_model("resnet20", 10, 3)
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            plain = (model(x).argmax(1) == y).float().mean().item()
            views = {f"p{p}": random_crop_flip(x, p, g, flip=False) for p in (1, 2, 4)} | {"mirror": x.flip(3)}
            cells = [f"{path.stem}: plain {100 * plain:.1f}"]
            for name, view in views.items():
                acc = (model(view).argmax(1) == y).float().mean().item()
                cells.append(f"{name} {100 * acc:.1f} (keeps {(acc - 0.1) / (plain - 0.1):.2f})")
        print("; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
