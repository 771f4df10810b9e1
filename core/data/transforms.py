"""Turning uint8 pixel batches into model input, and the standard training augmentation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x/255 - mean) / std``; the defaults mean no normalisation beyond ``x/255``."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if any(s <= 0 for s in self.std):
            raise ValueError("every std must be positive")


def to_model_input(
    x: torch.Tensor | np.ndarray,
    norm: Normalization,
    device: torch.device | str | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 ``N×H×W×C`` pixels -> normalised float32 ``N×C×H×W`` on ``device``.

    The conversion happens on the target device so that a batch travels as uint8 (4x less traffic).
    """
    t = torch.as_tensor(x)
    if device is not None:
        t = t.to(device, non_blocking=True)
    t = t.permute(0, 3, 1, 2).float().div_(255.0)
    c = t.shape[1]
    mean = torch.tensor(_per_channel(norm.mean, c), device=t.device).view(1, c, 1, 1)
    std = torch.tensor(_per_channel(norm.std, c), device=t.device).view(1, c, 1, 1)
    t = (t - mean) / std
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.contiguous() if not channels_last else t


def _per_channel(values: tuple[float, ...], channels: int) -> list[float]:
    if len(values) == channels:
        return list(values)
    if len(values) == 1:
        return list(values) * channels
    raise ValueError(f"normalisation has {len(values)} values for {channels} channels")


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None,
                     flip: bool = True) -> torch.Tensor:
    """The CIFAR training augmentation on a float ``N×C×H×W`` batch: random crop after zero padding, and a
    horizontal flip with probability 1/2 (``flip=False``: none, e.g. for digits), all on the batch's device
    without a Python loop per image."""
    n, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h, device=dev).view(1, h))  # n×h
    cols = (dx.view(n, 1) + torch.arange(w, device=dev).view(1, w))  # n×w
    if flip:
        flipped = torch.rand(n, device=dev, generator=generator) < 0.5
        cols = torch.where(flipped.view(n, 1), cols.flip(1), cols)
    idx_n = torch.arange(n, device=dev).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]  # n×h×w×c
    out = out.permute(0, 3, 1, 2)
    return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
        memory_format=torch.channels_last
    ) and not x.is_contiguous() else out.contiguous()
