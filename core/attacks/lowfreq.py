"""A universal low-frequency additive trigger, after LF (Zeng et al. 2021, "Rethinking the backdoor attacks'
triggers: a frequency perspective")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from core.attacks.base import Attack, add_clipped
from core.ranges import float_in, int_in


@dataclass(frozen=True, kw_only=True)
class LowFrequency(Attack):
    """``x' = clip(round(x + p))`` with ``p`` a fixed smooth pattern of peak amplitude ``amplitude``.

    ``p`` is seeded Gaussian noise (independent per channel) low-pass filtered in the Fourier domain: only
    spatial frequencies of at most ``max_frequency`` cycles per image along each axis are kept, the mean (DC)
    removed, and the result scaled to ``max |p| = amplitude``.

    Not BackdoorBench's LF trigger: that one is a universal adversarial perturbation optimised against a
    clean model under a low-pass constraint and then added the same way (``SimpleAdditiveTrigger``). This one
    shares its form (additive, universal, low-frequency, clipped) but is random, so no model is needed; it is
    somewhat easier to detect and to learn than the optimised one.
    """

    name: ClassVar[str] = "lowfreq"
    # peak perturbation in pixel levels; ~0.1 of the range, a typical LF budget
    amplitude: float_in(0.0, 255.0, open_low=True) = 0.1 * 255
    max_frequency: int_in(1, 4096) = 3  # cycles per image kept per axis; low enough to be smooth on 32x32
    seed: int = 0
    pattern: np.ndarray = field(init=False, repr=False, compare=False)  # float32 H×W×C

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "pattern", self._low_frequency_pattern())

    def _low_frequency_pattern(self) -> np.ndarray:
        h, w, c = self.image_shape
        noise = np.random.default_rng(self.seed).standard_normal((h, w, c))
        spectrum = np.fft.rfft2(noise, axes=(0, 1))
        fy = np.abs(np.fft.fftfreq(h) * h)[:, None]  # cycles per image
        fx = (np.fft.rfftfreq(w) * w)[None, :]
        keep = (fy <= self.max_frequency) & (fx <= self.max_frequency)
        keep[0, 0] = False  # no DC: a constant brightness shift is not a pattern
        p = np.fft.irfft2(spectrum * keep[:, :, None], s=(h, w), axes=(0, 1))
        p = (p * (self.amplitude / np.abs(p).max())).astype(np.float32)
        p.setflags(write=False)
        return p

    def _trigger(self, x: np.ndarray) -> np.ndarray:
        return add_clipped(x, self.pattern)
