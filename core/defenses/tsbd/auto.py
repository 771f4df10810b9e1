"""Choosing the neuron ratio ``n`` from the clean subset alone (no poisoned data, no trigger, no target).

The rule, run after stage 1 at the cost of forward passes only (~1 s for PreAct-ResNet18 + 2,500 images on
a GPU, against one fine-tuning per tried ``n`` in the reference's loop):

1. Zeroing sweep: for every candidate ``c`` of the reference's sweep (0.01 ... 0.9), zero the weights stage
   1c would zero for ``n = c`` on the *original* model and measure its eval-mode accuracy on the clean
   subset, without fine-tuning.
2. Collapse point: the smallest ``c`` whose zeroed model keeps at most ``auto_collapse_fraction`` (10%) of
   its above-chance accuracy (chance = the best constant prediction on the subset).
3. ``n = clip(collapse point, auto_min_n, auto_max_n) = clip(collapse, 0.5, 0.7)``, rounded up to a
   candidate; 0.7 when nothing collapses.

Why (evidence, poisoned data used only to measure; RESEARCH.md §1 and the CPU runs of
``bench/repair_bench.py --profile cpu``, a 6-layer CNN on MNIST, 500 defender images):

* The loss is asymmetric. Resetting too little leaves most of the backdoor: PreAct-ResNet18 BadNets kept
  34% / 30% ASR at n = 0.05 / 0.1 (RESEARCH.md); MNIST Blended kept 99% / 74% / 40% / 60% at n = 0.05 / 0.1 /
  0.2 / 0.3 and fell to 1.9% only at 0.5; MNIST SIG kept 17% at 0.2. Resetting more than needed costs little
  accuracy, because fine-tuning rebuilds the clean function: MNIST BadNets ACC 97.2 / 96.2 / 94.6 / 94.8 at
  n = 0.1 / 0.3 / 0.5 / 0.7; PreAct-ResNet18 83.8 at 0.3 against 82.2 at 0.5 (ASR 3.6% against 2.1%). With
  DER weighting an ASR point like an ACC point, erring large wins.
* Which ``n`` a backdoor needs is invisible in the clean signals measured here: the collapse point of the
  zeroing sweep came early and in the wrong order (MNIST BadNets collapsed at 0.1 and needed ~0.1, Blended
  collapsed at 0.05 and needed 0.5), and the fraction of channels holding half the NWC was the same for both
  (0.28 / 0.29). So ``n`` does not go below 0.5, the value that removed every backdoor measured.
* The sweep is still used upwards: a network whose clean function survives zeroing half of its high-NWC
  channels is redundant enough that a trigger path can survive too, so ``n`` rises to the collapse point,
  capped at 0.7 (8x8 digits with a 24-channel CNN: collapse at 0.7, best ASR at 0.5-0.9).

Every number the rule looked at (the sweep, the collapse point, the NWC half-mass fraction) is returned in
:class:`AutoChoice` and lands in the repair report, so GPU runs can check and refine the rule.
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
    rule: str  # the rule as text, with the branch taken and why
    branch: str  # "collapse" or "retention": the sweep rule that set n
    channels: int  # output channels of the covered conv layers (the width rule reads it)
    n_retention_rule: float  # what each sweep rule gives (both cost nothing more once the sweep is done)
    n_collapse_rule: float
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


def _collapse_rule(candidates: tuple[float, ...], collapse: float | None, cfg: TSBDConfig) -> tuple[float, str]:
    raw = candidates[-1] if collapse is None else collapse
    target = min(max(raw, cfg.auto_min_n), cfg.auto_max_n)
    # the smallest candidate at or above the target (the candidates are the values the sweep measured)
    n = next((c for c in candidates if c >= target - 1e-9), candidates[-1])
    return n, (f"n = clip(collapse point, {cfg.auto_min_n}, {cfg.auto_max_n}) rounded up to a candidate; "
               f"collapse point = smallest n whose zeroed model keeps <= {cfg.auto_collapse_fraction:g} of its "
               f"above-chance clean accuracy")


def _retention_rule(candidates: tuple[float, ...], points: list[SweepPoint], base: float, chance: float,
                    cfg: TSBDConfig) -> tuple[float, str]:
    keep = chance + cfg.auto_retention * max(0.0, base - chance)
    kept = [p.n for p in points if p.accuracy >= keep]
    raw = max(kept) if kept else candidates[0]
    target = min(max(raw, cfg.auto_retention_min_n), cfg.auto_retention_max_n)
    # the largest candidate at or below the target
    n = max((c for c in candidates if c <= target + 1e-9), default=candidates[0])
    return n, (f"n = clip(largest n whose zeroed model keeps >= {cfg.auto_retention:g} of its above-chance "
               f"clean accuracy, {cfg.auto_retention_min_n}, {cfg.auto_retention_max_n})")


def choose_neuron_ratio(model: nn.Module, nwc: NWC, data: DeviceImages, cfg: TSBDConfig,
                        num_classes: int) -> AutoChoice:
    """Choose ``n`` from the clean subset alone (the rules are described in this module's docstring)."""
    base = score(model, data).accuracy
    chance = chance_accuracy(data.y, num_classes)
    floor = chance + cfg.auto_collapse_fraction * max(0.0, base - chance)
    candidates = tuple(sorted(cfg.auto_candidates))
    points = zeroing_sweep(model, nwc, data, candidates, cfg.weight_ratio)
    collapse = next((p.n for p in points if p.accuracy <= floor), None)
    n_retention, text_retention = _retention_rule(candidates, points, base, chance, cfg)
    n_collapse, text_collapse = _collapse_rule(candidates, collapse, cfg)
    channels = len(nwc.flat())
    if cfg.auto_rule == "width":
        wide = channels >= cfg.auto_wide_channels
        redundant = collapse is None or collapse >= cfg.auto_redundant_from - 1e-9
        branch = "retention" if wide and redundant else "collapse"
        why = (f"width: {channels} covered channels ({'>=' if wide else '<'} {cfg.auto_wide_channels}), "
               f"collapse point {'none' if collapse is None else f'{collapse:g}'} "
               f"({'>=' if redundant else '<'} {cfg.auto_redundant_from:g}) -> {branch} rule: ")
    else:
        branch, why = cfg.auto_rule, ""
    n, text = (n_collapse, text_collapse) if branch == "collapse" else (n_retention, text_retention)
    return AutoChoice(n=n, rule=why + text, branch=branch, channels=channels, n_retention_rule=n_retention,
                      n_collapse_rule=n_collapse, reference_accuracy=base, collapse_accuracy=floor,
                      collapse_n=collapse, nwc_half_mass_n=nwc_mass_fraction(nwc, 0.5), sweep=tuple(points))
