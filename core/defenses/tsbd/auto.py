"""Choosing the neuron ratio ``n`` from the clean subset alone (no poisoned data, no trigger, no target).

RULE PLACEHOLDER (filled in from the evidence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from core.defenses.runtime import DeviceImages, score
from core.defenses.tsbd.config import TSBDConfig
from core.defenses.tsbd.nwc import NWC
from core.defenses.tsbd.reinit import apply_zero_masks, zero_masks


@dataclass(frozen=True)
class SweepPoint:
    """Clean held-out behaviour of the original model with the top-``n`` channels zeroed (before any
    fine-tuning); forward passes only."""

    n: float
    accuracy: float
    loss: float
    weights_zeroed: int


def zeroing_sweep(model: nn.Module, nwc: NWC, data: DeviceImages, candidates: tuple[float, ...],
                  m: float, batch_size: int = 1024) -> list[SweepPoint]:
    """For each candidate ``n``, zero the TSBD-selected weights of ``model`` and score it on ``data`` in eval
    mode. Works in place on ``model``'s covered conv weights and restores them afterwards (one copy of the
    covered conv weights, not of the model, per sweep)."""
    modules = dict(model.named_modules())
    saved = [modules[name].weight.detach().clone() for name in nwc.layer_names]
    points = []
    try:
        for n in candidates:
            masks, summary = zero_masks(nwc, n, m)
            apply_zero_masks(model, nwc.layer_names, masks)
            s = score(model, data, batch_size)
            points.append(SweepPoint(n=n, accuracy=s.accuracy, loss=s.loss, weights_zeroed=summary.weights_zeroed))
            with torch.no_grad():
                for name, w in zip(nwc.layer_names, saved, strict=True):
                    modules[name].weight.copy_(w)
    finally:
        with torch.no_grad():
            for name, w in zip(nwc.layer_names, saved, strict=True):
                modules[name].weight.copy_(w)
    return points


@dataclass(frozen=True)
class AutoChoice:
    """The chosen ``n``, the rule that chose it, and the evidence it looked at."""

    n: float
    rule: str
    reference_accuracy: float
    sweep: tuple[SweepPoint, ...]

    def as_dict(self) -> dict[str, object]:
        return {"n": self.n, "rule": self.rule, "reference_accuracy": self.reference_accuracy,
                "sweep": [p.__dict__ for p in self.sweep]}


def choose_neuron_ratio(model: nn.Module, nwc: NWC, data: DeviceImages, cfg: TSBDConfig) -> AutoChoice:
    """PLACEHOLDER: largest candidate whose zeroed model keeps half its above-chance clean accuracy."""
    base = score(model, data).accuracy
    points = zeroing_sweep(model, nwc, data, cfg.auto_candidates, cfg.weight_ratio)
    n = cfg.auto_candidates[0]
    for p in points:
        if p.accuracy >= 0.5 * base:
            n = max(n, p.n)
    return AutoChoice(n=n, rule="placeholder", reference_accuracy=base, sweep=tuple(points))
