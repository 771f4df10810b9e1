"""The proxy-trigger probe's measurement (bench/proxy_trigger_probe.py, BENCHMARKS.md §2.11): a fixed inverted
trigger's success rate on clean images, its shuffled and scaled variants, on a model whose answer is known."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from bench.proxy_triggers import ProxyTriggers, proxy_success
from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.runtime import runtime_for


class CornerModel(nn.Module):
    """Answers class 3 when the 3x3 top-left corner is bright (mean > 0.5), else class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x[:, :, :3, :3].mean(dim=(1, 2, 3)) > 0.5).float()
        out = torch.zeros(x.shape[0], 5)
        out[:, 3] = bright
        out[:, 1] = 1 - bright
        return out


def _images(n: int = 40) -> ImageSet:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, size=(n, 8, 8, 1), dtype=np.uint8)  # dark images: the corner is never bright
    return ImageSet(x, np.arange(n) % 5)


def _corner_patch() -> ProxyTriggers:
    mask = torch.zeros(5, 1, 8, 8)
    mask[3, :, :3, :3] = 1.0  # class 3's trigger: a white corner; the other classes' masks are empty
    return ProxyTriggers("patch", [mask, torch.ones(5, 1, 8, 8)], raw=False)


def test_a_trigger_the_model_answers_succeeds_and_its_shuffled_pixels_do_not() -> None:
    rt, images, trig = runtime_for("cpu"), _images(), _corner_patch()
    rates = proxy_success(CornerModel(), trig, images, Normalization(), rt)
    assert rates[3] == 1.0  # every image not of class 3 goes to 3
    assert rates[0] == rates[2] == rates[4] == 0.0 and rates[1] == 1.0  # empty masks: the model's own answer
    perm = torch.arange(63, -1, -1)  # the corner moved to the opposite corner
    assert proxy_success(CornerModel(), trig.shuffled(perm), images, Normalization(), rt, classes=[3]) == {3: 0.0}


def test_scaling_weakens_or_strengthens_the_trigger() -> None:
    rt, images = runtime_for("cpu"), _images()
    weak = _corner_patch()
    weak.tensors[0][3] *= 0.3  # 30% of white over a dark image stays below the model's 0.5
    assert proxy_success(CornerModel(), weak, images, Normalization(), rt, classes=[3]) == {3: 0.0}
    assert proxy_success(CornerModel(), weak.scaled(4.0), images, Normalization(), rt, classes=[3]) == {3: 1.0}
    additive = ProxyTriggers("additive", [torch.zeros(5, 1, 8, 8)])
    additive.tensors[0][3, :, :3, :3] = 0.2
    assert proxy_success(CornerModel(), additive, images, Normalization(), rt, classes=[3]) == {3: 0.0}
    assert proxy_success(CornerModel(), additive.scaled(4.0), images, Normalization(), rt, classes=[3]) == {3: 1.0}


def test_raw_patch_parameters_are_read_in_tanh_space() -> None:
    raw = ProxyTriggers("patch", [torch.full((2, 1, 4, 4), 20.0), torch.full((2, 1, 4, 4), -20.0)])
    assert torch.allclose(raw.tensors[0], torch.ones(2, 1, 4, 4)) and torch.allclose(raw.tensors[1],
                                                                                     torch.zeros(2, 1, 4, 4))
