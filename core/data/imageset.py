"""The one in-memory form of image data in Antidote: uint8 pixels plus integer labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 ``N×H×W×C`` (C is 1 or 3) and labels as int64 ``N``.

    Triggers are applied in this pixel space (as BackdoorBench does); normalisation happens only when a
    batch is turned into model input (``core.data.transforms``).
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.dtype != np.uint8 or self.x.ndim != 4:
            raise ValueError(f"x must be uint8 N×H×W×C, got {self.x.dtype} with shape {self.x.shape}")
        if self.y.ndim != 1 or len(self.y) != len(self.x):
            raise ValueError(f"y must have shape ({len(self.x)},), got {self.y.shape}")
        if not np.issubdtype(self.y.dtype, np.integer):
            raise ValueError(f"y must hold integers, got {self.y.dtype}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image."""
        h, w, c = self.x.shape[1:]
        return int(h), int(w), int(c)

    def subset(self, index: np.ndarray) -> ImageSet:
        """The images at ``index`` (an integer or boolean array)."""
        return ImageSet(self.x[index], self.y[index])

    def split(self, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
        """A seeded random split into ``(rest, held_out)`` with ``round(fraction * N)`` held out (at least 1)."""
        rest, held_out = ImageSet.split_index(len(self), fraction, seed)
        return self.subset(rest), self.subset(held_out)

    @staticmethod
    def split_index(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The sorted indices ``(rest, held_out)`` of :meth:`split` on ``n`` images (its labels can be looked at
        without copying the images)."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
        if n < 2:
            raise ValueError("need at least 2 images to split")
        order = np.random.default_rng(seed).permutation(n)
        n_out = ImageSet.held_out_count(n, fraction)
        return np.sort(order[n_out:]), np.sort(order[:n_out])

    @staticmethod
    def held_out_count(n: int, fraction: float) -> int:
        """How many of ``n`` images :meth:`split` holds out: ``round(fraction * n)``, at least 1, at most n - 1."""
        return min(n - 1, max(1, round(fraction * n)))

    @staticmethod
    def concat(*sets: ImageSet) -> ImageSet:
        """The images of all ``sets`` in order."""
        return ImageSet(np.concatenate([s.x for s in sets]), np.concatenate([s.y for s in sets]).astype(np.int64))
