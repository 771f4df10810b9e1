"""Choosing the neuron ratio ``n`` from the clean subset alone (no poisoned data, no trigger, no target).

The rule ("reset until the clean function collapses"), run after stage 1 at the cost of forward passes only:

1. For every candidate ``c`` of the reference's sweep (0.01 ... 0.9), zero the weights stage 1c would zero
   for ``n = c`` on the *original* model and measure its eval-mode accuracy on the clean subset (no
   fine-tuning; 11 candidates cost 11 forward passes over the subset, ~0.3 s for PreAct-ResNet18 + 2,500
   images on an H100).
2. The collapse point is the smallest ``c`` whose zeroed model keeps at most ``auto_collapse_fraction`` (10%)
   of its above-chance accuracy (chance = the best constant prediction on the subset).
3. ``n = clip(auto_safety_factor x collapse point, auto_min_n, auto_max_n)`` = clip(collapse, 0.2, 0.5),
   rounded up to a candidate; 0.5 when nothing collapses.

Why. TSBD's two observations are that the channels clean unlearning moves most (top NWC) contain the backdoor
channels, and that backdoor channels are the *most active* ones. Zeroing only part of the high-NWC set leaves
a working network in which the surviving trigger path is re-strengthened by fine-tuning (the reference: n=0.05
zeroes 70% of the weights of 195 channels and still leaves 34% ASR). Once the zeroed network has lost its clean
function, the set of reset channels covers what unlearning singled out, and the trigger path has nothing
left to ride on; fine-tuning then rebuilds the clean function from the clean subset, which carries no
trigger. Zeroing further than the collapse costs clean accuracy for no more coverage. The clip encodes the
reference's measurements (RESEARCH.md §1, PreAct-ResNet18 BadNets): n <= 0.1 left 30-34% ASR, n in 0.2-0.3
gave 4-5%, n = 0.5 2% for 1.6 more ACC points; it bounds a noisy collapse point from below (a small model
can collapse after a few channels) and keeps the ACC cost bounded above. The whole choice is one sweep of
forward passes, so an automatic repair costs one unlearning + one fine-tuning, like a single reference run.

Evidence (CPU, measured here; poisoned data only measure): see the report of the session that wrote this
and ``bench/repair_bench.py --profile cpu``; the NWC half-mass fraction is recorded next to the choice so that
GPU runs can refine the rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from core.defenses.runtime import DeviceImages, score
from core.defenses.tsbd.config import TSBDConfig
from core.defenses.tsbd.nwc import NWC
from core.defenses.tsbd.reinit import apply_zero_masks, zero_masks
from core.defenses.tsbd.unlearn import chance_accuracy


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
    reference_accuracy: float  # the unzeroed model's accuracy on the clean subset
    collapse_accuracy: float  # the accuracy at or below which the zeroed model counts as collapsed
    collapse_n: float | None  # the smallest candidate that collapsed (None: none did)
    nwc_half_mass_n: float  # the fraction of channels holding half the total NWC (recorded, not used)
    sweep: tuple[SweepPoint, ...]

    def as_dict(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["sweep"] = [dataclasses.asdict(p) for p in self.sweep]
        return out


def nwc_mass_fraction(nwc: NWC, mass: float) -> float:
    """The smallest fraction of channels (largest NWC first) holding ``mass`` of the total NWC."""
    desc = torch.sort(nwc.flat().double(), descending=True).values
    total = float(desc.sum())
    if total <= 0:
        return 1.0
    k = int(torch.searchsorted(torch.cumsum(desc, 0), torch.tensor(mass * total, dtype=torch.float64)))
    return min(1.0, (k + 1) / len(desc))


def choose_neuron_ratio(model: nn.Module, nwc: NWC, data: DeviceImages, cfg: TSBDConfig,
                        num_classes: int) -> AutoChoice:
    """Choose ``n`` from the clean subset alone (the rule is described in this module's docstring)."""
    base = score(model, data).accuracy
    chance = chance_accuracy(data.y, num_classes)
    floor = chance + cfg.auto_collapse_fraction * max(0.0, base - chance)
    candidates = tuple(sorted(cfg.auto_candidates))
    points = zeroing_sweep(model, nwc, data, candidates, cfg.weight_ratio)
    collapse = next((p.n for p in points if p.accuracy <= floor), None)
    raw = candidates[-1] if collapse is None else collapse * cfg.auto_safety_factor
    target = min(max(raw, cfg.auto_min_n), cfg.auto_max_n)
    # the smallest candidate at or above the target (the candidates are the values the sweep measured)
    n = next((c for c in candidates if c >= target - 1e-9), candidates[-1])
    rule = (f"n = clip({cfg.auto_safety_factor} x smallest n whose zeroed model's clean accuracy <= "
            f"chance + {cfg.auto_collapse_fraction} x (accuracy - chance), "
            f"[{cfg.auto_min_n}, {cfg.auto_max_n}]), rounded up to a candidate")
    return AutoChoice(n=n, rule=rule, reference_accuracy=base, collapse_accuracy=floor, collapse_n=collapse,
                      nwc_half_mass_n=nwc_mass_fraction(nwc, 0.5), sweep=tuple(points))
