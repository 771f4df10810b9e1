"""The plain training loop used by tests and benchmarks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.metrics import accuracy, predict
from core.training import train_classifier


def _digits() -> tuple[ImageSet, ImageSet]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * 16).clip(0, 255).astype(np.uint8)[..., None]
    return ImageSet(x, d.target.astype(np.int64)).split(0.3, seed=0)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 10))


def test_training_learns_and_is_reproducible() -> None:
    train, test = _digits()
    # crop+flip augmentation is on by default: it wrecks 8x8 digits, so it is covered by the TSBD tests
    a = train_classifier(_model(0), train, Normalization(), epochs=12, lr=0.05, batch_size=64, device="cpu",
                         seed=1, augment=False)
    assert not a.training
    assert accuracy(predict(a, test.x, Normalization()), test.y) > 0.8
    b = train_classifier(_model(0), train, Normalization(), epochs=2, lr=0.05, batch_size=64, device="cpu",
                         seed=1)
    c = train_classifier(_model(0), train, Normalization(), epochs=2, lr=0.05, batch_size=64, device="cpu",
                         seed=1)
    for (k, va), vb in zip(c.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("kwargs", [{"epochs": -1}, {"lr": 0.0}, {"batch_size": 0}])
def test_training_rejects_bad_settings(kwargs: dict) -> None:
    train, _ = _digits()
    args = {"epochs": 1, "lr": 0.1, "batch_size": 8, **kwargs}
    with pytest.raises(ValueError):
        train_classifier(_model(0), train, Normalization(), device="cpu", **args)
