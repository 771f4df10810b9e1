"""WaNet (Nguyen & Tran 2021): an imperceptible smooth warp of the image, with "noise mode" cross samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from core.attacks.base import Attack
from core.data.imageset import ImageSet
from core.ranges import Flag, float_in, int_in

_CHUNK = 2048  # images warped per grid_sample call, to bound the float32 copy


@dataclass(frozen=True, kw_only=True)
class WaNet(Attack):
    """Warps every image with one fixed smooth field drawn from ``seed``.

    The field follows BackdoorBench: ``k×k`` uniform noise in [-1, 1], normalised to mean absolute value 1,
    upsampled bicubically to ``H×W``, scaled by ``s / H`` (``s / W`` along the width), added to the identity
    grid, multiplied by ``grid_rescale`` and clamped to [-1, 1]. Defaults (BackdoorBench, docs/methods.md): k 4, s 0.5,
    grid_rescale 1, noise mode with cross_ratio 2.

    BackdoorBench trains WaNet with its own loop that warps each batch on the fly; here it is data poisoning:
    the poisoned samples are warped once, and noise mode appends ``cross_ratio`` × as many cross samples, each
    warped by the fixed field plus its own random noise (``uniform(-1, 1) / H``) and keeping its true label,
    so the model learns that only the exact field means the target.
    """

    name: ClassVar[str] = "wanet"
    k: int_in(2, 4096) = 4  # BackdoorBench: k 4 (at most the image's side, checked below)
    s: float_in(0.0, 100.0, open_low=True) = 0.5  # BackdoorBench: s 0.5
    grid_rescale: float_in(0.0, 100.0, open_low=True) = 1.0  # BackdoorBench: grid_rescale 1
    cross_ratio: float_in(0.0, 10.0) = 2.0  # BackdoorBench: cross_ratio 2
    noise_mode: Flag = True  # BackdoorBench: noise mode on
    seed: int = 0
    grid: torch.Tensor = field(init=False, repr=False, compare=False)  # 1×H×W×2, grid_sample's (x, y) order

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.k <= min(self.image_shape[:2]):
            raise ValueError(f"k must lie in [2, {min(self.image_shape[:2])}], got {self.k}")
        object.__setattr__(self, "grid", self._warping_grid())

    def _warping_grid(self) -> torch.Tensor:
        h, w, _ = self.image_shape
        gen = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=gen, dtype=torch.float64) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        grid = (self._identity_grid() + self.s * noise / self._scale()) * self.grid_rescale
        return grid.clamp(-1, 1).float()

    def _identity_grid(self) -> torch.Tensor:
        h, w, _ = self.image_shape
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, h, dtype=torch.float64),
            torch.linspace(-1, 1, w, dtype=torch.float64),
            indexing="ij",
        )
        return torch.stack((xs, ys), dim=2)[None]

    def _scale(self) -> torch.Tensor:
        """Per-axis divisor of the noise: BackdoorBench's ``input_height`` (square images), per side here."""
        h, w, _ = self.image_shape
        return torch.tensor([w, h], dtype=torch.float64)

    def _trigger(self, x: np.ndarray) -> np.ndarray:
        return _warp(x, self.grid.expand(len(x), -1, -1, -1))

    def cross_warp(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Images warped by the fixed field plus fresh per-image noise (the noise-mode cross samples)."""
        h, w, _ = self.image_shape
        noise = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(len(x), h, w, 2)))
        grid = (self.grid.double() + noise / self._scale()).clamp(-1, 1).float()
        return _warp(x, grid)

    def noise_samples(
        self, data: ImageSet, poisoned_index: np.ndarray, rng: np.random.Generator
    ) -> ImageSet | None:
        """``round(cross_ratio × #poisoned)`` cross samples (capped at the unpoisoned count), drawn from the
        unpoisoned images and kept with their true labels."""
        if not self.noise_mode or len(poisoned_index) == 0:
            return None
        clean = np.setdiff1d(np.arange(len(data)), poisoned_index)
        n_cross = min(round(self.cross_ratio * len(poisoned_index)), len(clean))
        if n_cross == 0:
            return None
        index = np.sort(rng.choice(clean, size=n_cross, replace=False))
        return ImageSet(self.cross_warp(data.x[index], rng), data.y[index].astype(np.int64))


def _warp(x: np.ndarray, grid: torch.Tensor) -> np.ndarray:
    """Bilinear ``grid_sample`` of uint8 ``N×H×W×C`` images on float pixels, rounded back to uint8."""
    out = np.empty_like(x)
    for i in range(0, len(x), _CHUNK):
        batch = torch.from_numpy(x[i : i + _CHUNK]).permute(0, 3, 1, 2).float()
        warped = F.grid_sample(batch, grid[i : i + _CHUNK], mode="bilinear", align_corners=True)
        out[i : i + _CHUNK] = warped.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out
