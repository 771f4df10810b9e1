"""Small real things the tests share: a backdoored model on scikit-learn's digits, and file writers."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.attacks import poison_training_set
from core.attacks.registry import create_attack
from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.models.registry import create_model

NORM = Normalization((0.5,), (0.5,))
SPEC_MODEL = {"architecture": "resnet20", "num_classes": 10, "in_channels": 1, "mean": [0.5], "std": [0.5]}


def digits() -> ImageSet:
    """The 1,797 real 8x8 handwritten digits that ship with scikit-learn, as uint8 N×8×8×1."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255 / 16)), 0, 255).astype(np.uint8)[..., None]
    return ImageSet(x, d.target.astype(np.int64))


@lru_cache(maxsize=1)
def backdoored_digits() -> tuple[dict[str, torch.Tensor], ImageSet, ImageSet]:
    """(state dict of a ResNet-20 with a BadNets backdoor to class 0, a clean subset, a clean test set)."""
    from core.training import train_classifier

    data = digits()
    order = np.random.default_rng(0).permutation(len(data))
    train, clean, test = (data.subset(order[:1200]), data.subset(order[1200:1500]), data.subset(order[1500:]))
    attack = create_attack("badnets", target=0, image_shape=train.image_shape)
    poisoned = poison_training_set(attack, train, 0.1, 10, seed=0).data
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1)
    train_classifier(model, poisoned, NORM, epochs=8, lr=0.05, batch_size=64, device="cpu", augment=False)
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, clean, test


def write_npz(path: Path, data: ImageSet) -> Path:
    np.savez(path, x=data.x, y=data.y)
    return path


def write_safetensors(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def spec_json(mode: str = "scan", **extra: Any) -> str:
    return json.dumps({"mode": mode, "model": SPEC_MODEL, **extra})
