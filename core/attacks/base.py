"""The attack interface and the two data operations every attack shares: poisoning a training set and
building a backdoor test set (BackdoorBench conventions, docs/methods.md)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from core.data.imageset import ImageSet
from core.ranges import Flag, check_fields

MIN_SIDE = 8  # smallest H and W an attack accepts; every trigger here is defined for it
NOT_PARAMS = ("image_shape", "target", "seed")  # fields given by the spec's other fields, not by attack.params


@dataclass(frozen=True, kw_only=True)
class Attack(ABC):
    """A backdoor trigger plus its label rule. Concrete attacks are frozen dataclasses.

    ``target`` is the attacker's label for all-to-one attacks (BackdoorBench default 0); with
    ``all_to_all`` a label ``y`` becomes ``(y + 1) % num_classes`` (BackdoorBench's ``all2all`` shift).
    Triggers are applied to uint8 ``N×H×W×C`` pixels of exactly ``image_shape`` = ``(H, W, C)``.
    """

    name: ClassVar[str]
    clean_label: ClassVar[bool] = False  # True: poisons target-class training images, keeps their labels
    image_shape: tuple[int, int, int]
    target: int = 0
    all_to_all: Flag = False

    def __post_init__(self) -> None:
        # the attack's own parameters against their declared ranges (core/ranges.py); the rest is checked here
        check_fields(self, skip=NOT_PARAMS)
        shape = tuple(self.image_shape)
        if len(shape) != 3 or shape[2] not in (1, 3) or min(shape[:2]) < MIN_SIDE:
            raise ValueError(
                f"image_shape must be (H, W, C) with H, W >= {MIN_SIDE} and C in {{1, 3}}, "
                f"got {self.image_shape}"
            )
        object.__setattr__(self, "image_shape", tuple(int(s) for s in shape))
        if isinstance(self.target, bool) or not isinstance(self.target, int | np.integer) or self.target < 0:
            raise ValueError(f"target must be a non-negative integer, got {self.target!r}")
        if self.clean_label and self.all_to_all:
            # BackdoorBench: clean-label selection "only in all2one case can be used".
            raise ValueError(f"{self.name} is a clean-label attack and has no all-to-all variant")

    def apply_trigger(self, x: np.ndarray) -> np.ndarray:
        """Triggered copies of uint8 ``N×H×W×C`` images (deterministic; the input is not modified)."""
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError("images must be a uint8 N×H×W×C array")
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{self.name} was built for images of shape {self.image_shape}, got {tuple(x.shape[1:])}"
            )
        if len(x) == 0:
            return x.copy()
        return self._trigger(x)

    @abstractmethod
    def _trigger(self, x: np.ndarray) -> np.ndarray:
        """The trigger itself, on a validated non-empty batch."""

    def target_labels(self, y: np.ndarray, num_classes: int) -> np.ndarray:
        """The labels the attacker wants for images whose true labels are ``y`` (int64)."""
        y = np.asarray(y)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
        if self.all_to_all:
            return ((y.astype(np.int64) + 1) % num_classes).astype(np.int64)
        if self.target >= num_classes:
            raise ValueError(f"target {self.target} is not a class of a {num_classes}-class problem")
        return np.full(len(y), self.target, dtype=np.int64)

    def noise_samples(
        self, data: ImageSet, poisoned_index: np.ndarray, rng: np.random.Generator
    ) -> ImageSet | None:
        """Extra samples some attacks append to a poisoned training set (WaNet's noise mode); none here."""
        return None


@dataclass(frozen=True)
class PoisonedTrainingSet:
    """A training set after poisoning: same order and size as the clean one, then any appended noise samples
    (``data[n_clean:]``, WaNet only). ``poisoned_index`` lists the triggered samples, sorted."""

    data: ImageSet
    poisoned_index: np.ndarray


@dataclass(frozen=True)
class BackdoorTestSet:
    """Triggered test images with the attacker's labels (for ASR) and their true labels (for RA)."""

    x: np.ndarray
    y_target: np.ndarray
    y_true: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or not len(self.x) == len(self.y_target) == len(self.y_true):
            raise ValueError("x, y_target and y_true must hold the same number of images")

    def __len__(self) -> int:
        return len(self.y_true)


def poison_training_set(
    attack: Attack, data: ImageSet, ratio: float, num_classes: int, seed: int
) -> PoisonedTrainingSet:
    """Trigger ``round(ratio * N)`` seeded random samples and relabel them to the attacker's labels.

    Dirty-label attacks draw from the whole set, as BackdoorBench does for training data (so a few drawn
    images may already carry the target label). Clean-label attacks (SIG) draw only target-class images,
    still ``round(ratio * N)`` with ``N`` the whole set but capped at the class size, and keep their labels.
    """
    if len(data) == 0:
        raise ValueError("cannot poison an empty training set")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio}")
    attack.target_labels(data.y, num_classes)  # validates labels and target against num_classes
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(data.y == attack.target) if attack.clean_label else np.arange(len(data))
    n_poison = min(round(ratio * len(data)), len(candidates))
    index = np.sort(rng.choice(candidates, size=n_poison, replace=False)).astype(np.int64)

    x = data.x.copy()
    y = data.y.astype(np.int64, copy=True)
    if n_poison:
        x[index] = attack.apply_trigger(data.x[index])
        if not attack.clean_label:
            y[index] = attack.target_labels(data.y[index], num_classes)
    poisoned = ImageSet(x, y)
    extra = attack.noise_samples(data, index, rng)
    if extra is not None and len(extra):
        poisoned = ImageSet.concat(poisoned, extra)
    return PoisonedTrainingSet(poisoned, index)


def make_backdoor_test_set(attack: Attack, data: ImageSet, num_classes: int) -> BackdoorTestSet:
    """Every test image triggered, with attacker and true labels.

    All-to-one: images whose true label is the target are left out, BackdoorBench's ASR convention
    (they would count as successes without any backdoor).
    """
    keep = np.ones(len(data), dtype=bool) if attack.all_to_all else data.y != attack.target
    if not keep.any():
        raise ValueError("no test images to trigger (empty set, or every image is of the target class)")
    y_true = data.y[keep].astype(np.int64)
    return BackdoorTestSet(
        x=attack.apply_trigger(data.x[keep]),
        y_target=attack.target_labels(y_true, num_classes),
        y_true=y_true,
    )


def add_clipped(x: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``clip(round(x + delta), 0, 255)`` as uint8, for additive triggers (``delta`` broadcasts over x).

    BackdoorBench truncates with ``astype(uint8)``; rounding is the unbiased choice and changes no attack.
    """
    return np.clip(np.rint(x.astype(np.float32) + delta.astype(np.float32)), 0, 255).astype(np.uint8)
