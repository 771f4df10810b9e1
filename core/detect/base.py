"""What every detector receives and returns: the scan context (model, clean pixels, callbacks) and a result."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.detect.config import DetectConfig
from core.ranges import MAX_BATCH_SIZE

ProgressFn = Callable[[float], None]
StopFn = Callable[[], bool]

STEP_IMAGES = MAX_BATCH_SIZE  # the most full images one detector forward pass holds (every batch's bound)
STEP_BYTES = 4 * 1024**3  # the most float32 bytes one pass's stamped inputs and logits take by default: the service's
# default ANTIDOTE_MAX_ZIP_EXPANDED_BYTES (store/settings.py); the pipeline passes the operator's value (scan_model)
"""The bounds a detector step's one forward pass keeps to: the K classes' stamped batches are split into chunks
of whole classes that fit both (:func:`class_chunks`); one pass when everything fits, as before."""


class DetectionStopped(Exception):
    """Raised between optimisation steps when the caller's ``should_stop()`` answers True."""


@dataclass
class DetectContext:
    """One scan's shared inputs. ``pixels`` are the clean images as float ``N×C×H×W`` in [0, 1] on the device
    (triggers are searched in pixel space and normalised only on the way into the model)."""

    model: nn.Module
    clean: ImageSet
    pixels: torch.Tensor
    labels: torch.Tensor
    norm: Normalization
    device: torch.device
    num_classes: int
    seed: int
    config: DetectConfig
    progress: ProgressFn | None = None
    should_stop: StopFn | None = None
    _span: tuple[float, float] = (0.0, 1.0)
    memo: dict[str, Any] = field(default_factory=dict)  # results one detector computes and another reuses
    max_step_images: int = STEP_IMAGES  # a forward pass's full images at most (chunks of classes beyond it)
    max_step_bytes: int = STEP_BYTES  # a forward pass's stamped inputs' float32 bytes at most

    @property
    def amp(self) -> bool:
        """bf16 autocast on CUDA (as the rest of Antidote); fp32 on the CPU, where bf16 is slower."""
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel for [0, 1] pixels, differentiable."""
        c = x01.shape[1]
        mean = _per_channel(self.norm.mean, c, x01)
        std = _per_channel(self.norm.std, c, x01)
        return (x01 - mean) / std

    def logits(self, x01: torch.Tensor) -> torch.Tensor:
        """The model's float32 logits on [0, 1] pixels (channels-last and bf16 on CUDA)."""
        x = self.normalize(x01)
        if self.amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = self.model(x)
        return out.float()

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per scan under ``key``: the targeted inversions the untargeted test reuses."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def step(self, fraction: float) -> None:
        """Report ``fraction`` of the current detector done and honour a stop request."""
        if self.should_stop is not None and self.should_stop():
            raise DetectionStopped("detection stopped on request")
        if self.progress is not None:
            lo, hi = self._span
            self.progress(lo + (hi - lo) * min(1.0, max(0.0, fraction)))

    @contextlib.contextmanager
    def span(self, lo: float, hi: float) -> Iterator[None]:
        """Map the next detector's progress fractions onto ``[lo, hi]`` of the whole scan."""
        old, self._span = self._span, (lo, hi)
        try:
            yield
        finally:
            self._span = old


def class_chunks(k: int, per_class: int, item_bytes: int, max_items: int | None, max_bytes: int
                 ) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering the ``k`` classes (or triggers) in chunks of whole classes whose stamped
    batch, ``per_class`` items of ``item_bytes`` each per class, holds at most ``max_items`` items (``None``: no
    count bound) and ``max_bytes`` bytes; one chunk when all fit. A class is never split: one class's batch over
    the bounds runs alone (the upload check refuses that case, core/inputs.py)."""
    n = k
    if max_items is not None:
        n = min(n, max_items // max(1, per_class))
    n = max(1, min(n, max_bytes // max(1, per_class * item_bytes)))
    return [(a, min(a + n, k)) for a in range(0, k, n)]


def _per_channel(values: tuple[float, ...], c: int, like: torch.Tensor) -> torch.Tensor:
    vals = list(values) * c if len(values) == 1 else list(values)
    if len(vals) != c:
        raise ValueError(f"normalisation has {len(values)} values for {c} channels")
    return torch.tensor(vals, dtype=like.dtype, device=like.device).view(1, c, 1, 1)


@dataclass
class DetectorResult:
    """One detector's answer. ``score`` is the detector's statistic over its own threshold (> 1 flags), so
    that scores of different detectors compare and combine; ``per_class`` is each class's raw statistic."""

    name: str
    score: float
    flagged: bool
    statistic: float
    statistic_name: str
    threshold: float
    per_class: list[float]
    suspected_targets: list[int]
    details: dict[str, Any] = field(default_factory=dict)
    trigger_images: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    def evidence(self) -> dict[str, Any]:
        """A JSON-ready summary (no images)."""
        return {"score": self.score, "flagged": self.flagged, self.statistic_name: self.statistic,
                "threshold": self.threshold, "per_class": self.per_class,
                "suspected_targets": self.suspected_targets, "seconds": round(self.seconds, 3),
                **self.details}


def frozen_model(model: nn.Module) -> contextlib.AbstractContextManager:
    """Eval mode with parameter gradients off for the duration, restoring both afterwards: the detectors
    differentiate with respect to inputs only."""

    @contextlib.contextmanager
    def ctx() -> Iterator[nn.Module]:
        modes = [(m, m.training) for m in model.modules()]
        grads = [(p, p.requires_grad) for p in model.parameters()]
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        try:
            yield model
        finally:
            for m, t in modes:
                m.training = t
            for p, g in grads:
                p.requires_grad_(g)

    return ctx()
