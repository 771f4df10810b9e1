"""Proxy triggers (bench only, BENCHMARKS.md §2.11): the detector's inverted triggers of the ORIGINAL model,
kept fixed and applied to clean images.

The trigger-free detector (core/detect/inversion.py) searches, per class ``k``, the smallest trigger of one
family that sends clean images to ``k``: a Neural Cleanse patch ``(1 - m) x + m p`` or a universal additive
perturbation ``clip(x + d, 0, 1)``. Kept fixed after a repair, class ``k``'s trigger asks "does the repaired
model still answer ``k`` to what the original model answered ``k`` to?" — a proxy poisoned set that needs no
poisoned data (issue 10). Its success rate is the fraction of clean images *not* of class ``k`` sent to ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization, to_model_input
from core.defenses.runtime import Runtime


@dataclass
class ProxyTriggers:
    """One family's K triggers in pixel space ([0, 1], ``C x H x W`` per class): ``patch`` holds the mask
    (``K x 1 x H x W``) and pattern (``K x C x H x W``), ``additive`` the perturbation (``K x C x H x W``).
    Built from the inversion's raw parameters (tanh space for the patch, as :class:`core.detect.inversion.Patch`)
    or from ready ``mask``/``pattern``/``delta`` tensors (``raw=False``)."""

    family: str
    tensors: list[torch.Tensor]
    raw: bool = True

    def __post_init__(self) -> None:
        if self.family not in ("patch", "additive"):
            raise ValueError(f"unknown trigger family {self.family!r}")
        t = [x.detach().float().cpu() for x in self.tensors]
        if self.family == "patch" and self.raw:
            t = [torch.tanh(t[0]) / 2 + 0.5, torch.tanh(t[1]) / 2 + 0.5]
        self.tensors = t
        self.raw = False

    @property
    def num_classes(self) -> int:
        return int(self.tensors[0].shape[0])

    def apply(self, k: int, x01: torch.Tensor) -> torch.Tensor:
        """Class ``k``'s trigger on ``N x C x H x W`` pixels in [0, 1]."""
        if self.family == "patch":
            mask, pattern = self.tensors[0][k].to(x01.device), self.tensors[1][k].to(x01.device)
            return (1 - mask) * x01 + mask * pattern
        return (x01 + self.tensors[0][k].to(x01.device)).clamp(0, 1)

    def scaled(self, factor: float) -> ProxyTriggers:
        """The same triggers ``factor`` times as strong: the perturbation times ``factor`` (additive) or the mask
        times ``factor``, clipped to 1 (patch). The inversion finds the *smallest* trigger that works on the
        original model; a real trigger is usually stronger than that."""
        if self.family == "additive":
            return ProxyTriggers(self.family, [self.tensors[0] * factor], raw=False)
        return ProxyTriggers(self.family, [(self.tensors[0] * factor).clamp(0, 1), self.tensors[1]], raw=False)

    def shuffled(self, perm: torch.Tensor) -> ProxyTriggers:
        """The same triggers with their pixel positions permuted by ``perm`` (a permutation of ``H * W``;
        mask and pattern moved together): the same amount of change without the trigger's shape."""

        def move(t: torch.Tensor) -> torch.Tensor:
            k, c, h, w = t.shape
            return t.reshape(k, c, h * w)[:, :, perm].reshape(k, c, h, w)

        return ProxyTriggers(self.family, [move(t) for t in self.tensors], raw=False)


def proxy_success(model: nn.Module, triggers: ProxyTriggers, images: ImageSet, norm: Normalization, rt: Runtime,
                  classes: list[int] | None = None, batch_size: int = 512) -> dict[int, float]:
    """Per class ``k`` (``classes``, default all): the fraction of ``images`` whose label is not ``k`` that
    ``model`` (eval mode) sends to ``k`` with class ``k``'s trigger applied. Forward passes only."""
    ks = list(range(triggers.num_classes)) if classes is None else list(classes)
    was = model.training
    model.eval()
    y_all = torch.as_tensor(images.y, dtype=torch.int64)
    out: dict[int, float] = {}
    c = images.x.shape[3]
    mean = torch.tensor((list(norm.mean) * c)[:c] if len(norm.mean) == 1 else list(norm.mean)).view(1, c, 1, 1)
    std = torch.tensor((list(norm.std) * c)[:c] if len(norm.std) == 1 else list(norm.std)).view(1, c, 1, 1)
    mean, std = mean.to(rt.device), std.to(rt.device)
    with torch.inference_mode(), rt.autocast():
        for k in ks:
            idx = torch.nonzero(y_all != k).flatten()
            hits = 0
            for start in range(0, len(idx), batch_size):
                part = idx[start:start + batch_size].numpy()
                x01 = to_model_input(images.x[part], Normalization(), rt.device)
                x = (triggers.apply(k, x01) - mean) / std
                if rt.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                hits += int((model(x).float().argmax(1) == k).sum())
            out[k] = hits / max(1, len(idx))
    model.train(was)
    return out
