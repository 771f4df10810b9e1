"""BadNets (Gu et al. 2017): a small white patch stamped on the image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from core.attacks.base import Attack
from core.ranges import int_in


@dataclass(frozen=True, kw_only=True)
class BadNets(Attack):
    """A ``patch_size``×``patch_size`` white square in the bottom-right corner.

    Defaults from BackdoorBench (docs/methods.md): 3×3, white (255), all-to-one target 0; the patch is not
    scaled with the image size.
    """

    name: ClassVar[str] = "badnets"
    patch_size: int_in(1, 4096) = 3  # BackdoorBench: 3x3 (at most the image's side, checked below)
    value: int_in(0, 255) = 255  # BackdoorBench: white

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.patch_size <= min(self.image_shape[:2]):
            side = min(self.image_shape[:2])
            raise ValueError(f"patch_size must lie in [1, {side}], got {self.patch_size}")

    def _trigger(self, x: np.ndarray) -> np.ndarray:
        out = x.copy()
        out[:, -self.patch_size :, -self.patch_size :, :] = self.value
        return out
