"""Blended (Chen et al. 2017): a fixed full-size pattern alpha-blended into every image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from core.attacks.base import Attack
from core.ranges import float_in


@dataclass(frozen=True, kw_only=True)
class Blended(Attack):
    """``x' = round((1 - alpha) x + alpha p)`` with ``p`` uniform noise in [0, 255] drawn from ``seed``.

    BackdoorBench blends a "hello kitty" picture with alpha 0.2 (docs/methods.md); any fixed full-size pattern
    is the same attack, and seeded noise needs no image file.
    """

    name: ClassVar[str] = "blended"
    alpha: float_in(0.0, 1.0, open_low=True) = 0.2  # BackdoorBench: blended_alpha 0.2 (train and test)
    seed: int = 0
    pattern: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        p = np.random.default_rng(self.seed).integers(0, 256, size=self.image_shape, dtype=np.uint8)
        p.setflags(write=False)
        object.__setattr__(self, "pattern", p)

    def _trigger(self, x: np.ndarray) -> np.ndarray:
        blended = (1.0 - self.alpha) * x.astype(np.float64) + self.alpha * self.pattern.astype(np.float64)
        return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
