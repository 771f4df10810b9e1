"""SIG (Barni et al. 2019): a horizontal sinusoidal signal, clean-label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from core.attacks.base import Attack, add_clipped
from core.ranges import float_in


@dataclass(frozen=True, kw_only=True)
class SIG(Attack):
    """``x'[i, j] = clip(x[i, j] + delta sin(2 pi j f / W))``: the signal varies along the width only.

    Clean-label: only target-class training images are poisoned and their labels kept, so there is no
    all-to-all variant. Defaults from BackdoorBench (docs/methods.md): delta 40 pixel levels, f 6.
    """

    name: ClassVar[str] = "sig"
    clean_label: ClassVar[bool] = True
    delta: float_in(0.0, 255.0, open_low=True) = 40.0  # BackdoorBench: sig_delta 40 (of 255)
    frequency: float_in(0.0, 4096.0, open_low=True) = 6.0  # BackdoorBench: sig_f 6

    def signal(self) -> np.ndarray:
        """The additive signal, shaped ``1×W×1`` to broadcast over ``N×H×W×C``."""
        w = self.image_shape[1]
        return (self.delta * np.sin(2 * np.pi * np.arange(w) * self.frequency / w)).reshape(1, w, 1)

    def _trigger(self, x: np.ndarray) -> np.ndarray:
        return add_clipped(x, self.signal())
