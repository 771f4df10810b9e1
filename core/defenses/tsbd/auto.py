"""Choosing the neuron ratio ``n`` from the clean subset alone (no poisoned data, no trigger, no target).

The ``recovery`` rule (issue 10; selectable, not the default) reads the model's own evidence instead of its
size: how much of a reset its clean function recovers from.

1. Hold out ``auto_holdout`` (20%) of the clean subset.
2. For ``n`` in ``auto_probes`` (0.1, 0.3, 0.5, 0.7), smallest first: zero the original model for that ``n``
   (stage 1c), run ``auto_probe_epochs`` (2) epochs of stage 2 on the rest with the learning rate stage 2
   itself would use (``finetune.stage2_schedule``), and score the held-out part.
3. Stop at the first ``n`` whose held-out accuracy falls more than ``max(auto_tolerance, one binomial
   standard error)`` below the best probe so far; ``n`` = the last probe that held.

Why: a larger ``n`` resets more of the channels clean unlearning moved most — where TSBD finds the backdoor —
so the largest reset the clean function shrugs off is the strongest repair that does not cost accuracy. It
reads the one thing the width rule guessed from the channel count: whether this network can spare the reset
(issue 10: on a CIFAR ResNet-20 the width rule's n = 0.5 cost 6-11 points where n = 0.05-0.3 removed the same
backdoors). The held-out part has never been trained on by the probes, so a drop there is lost clean function, not noise
(below one standard error it is treated as noise, and ties go to the larger ``n``: erring large leaves no
backdoor). Cost: at most ``len(auto_probes) * auto_probe_epochs`` short epochs on 80% of the subset, on top
of the one full stage 2 (the report's ``details.auto.probe_steps``).

Why it is not the default (BENCHMARKS.md §2.7): held-out clean accuracy sees what a reset costs, not what it
removes. Where the backdoor goes at a small reset it keeps 1-3 points more accuracy than ``width`` (digits
ResNet-20, MNIST BadNets), but on backdoors that need a costly reset it stops early and leaves them: a
24-channel digits CNN's BadNets (n = 0.3, 24% ASR; width's 0.7: 7%), MNIST Blended (96%) and SIG (39%; width
1%). On small subsets 2 probe epochs are a handful of steps and the probes sit near chance (noise).

The sweep rules below (``width``, the default; ``collapse``, ``retention``) cost forward passes only.

Everything here runs after stage 1 at the cost of forward passes only (~0.5 s for PreAct-ResNet18 + 2,500
images on an H200, against one fine-tuning per tried ``n`` in the reference's loop):

1. Zeroing sweep: for every candidate ``c`` of the reference's sweep (0.01 ... 0.9), zero the weights stage
   1c would zero for ``n = c`` on the *original* model and measure its eval-mode accuracy on the clean
   subset, without fine-tuning.
2. Collapse point: the smallest ``c`` whose zeroed model keeps at most ``auto_collapse_fraction`` (10%) of
   its above-chance accuracy (chance = the best constant prediction on the subset).
3. Two rules read the sweep:

   * ``collapse``: ``n = clip(collapse point, 0.5, 0.7)``, rounded up to a candidate (0.7 if nothing
     collapses) — reset a lot;
   * ``retention``: the largest candidate whose zeroed model keeps >= 75% of its above-chance accuracy,
     clipped to [0.05, 0.3] — reset what the clean function can spare.

4. ``width`` (the default) picks between them: ``retention`` when the network is wide (>= 1,000 output
   channels in the covered conv layers) and its clean function survives zeroing (collapse point >= 0.2),
   ``collapse`` otherwise.

Why (poisoned data used only to measure; BENCHMARKS.md §2):

* Wide networks want small ``n``. PreAct-ResNet18 on CIFAR-10 (3,904 channels, collapse points 0.25-0.7):
  in the reference loop on BadNets every n from 0.01 to 0.4 left 2.3-3.9% ASR for 2.9-4.8 ACC points, while
  0.5 / 0.7 / 0.9 cost 7.3 / 9.7 / 22.9; over five attacks the retention rule (n = 0.05-0.25) gave mean ASR
  2.3% for -2.6 ACC (DER 0.944), where the collapse rule (n = 0.5-0.7) had cost 16.9 ACC points in an
  earlier run (§2.5).
* Narrow networks want large ``n``. A 6-layer CNN on MNIST (224 channels, collapse 0.01-0.15): Blended kept
  37-99% ASR for n <= 0.1 and fell to 2-4% only at 0.5; SIG kept 19% at 0.3 and 96% at the retention
  rule's 0.05; the collapse rule's 0.5 removed all five backdoors (mean ASR 0.6-1.1%) for 1-3 ACC points. A
  24-channel CNN on 8x8 digits collapses late (0.7) yet kept 99% BadNets ASR at the retention rule's 0.1:
  the collapse point alone does not tell a narrow network from a wide one, the channel count does.
* Where the rules disagree, erring large is the safe side: it costs accuracy, which the report shows,
  while erring small leaves a working backdoor behind a "repaired" label.

The width threshold is an evidence-based prior from these three architectures, not a law: the report records
the channel count, the collapse point, the branch taken, both rules' ``n`` and the whole sweep, so a run on
another architecture can check it; ``auto_rule`` selects either rule directly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.runtime import DeviceImages, runtime_for, score
from core.defenses.tsbd.config import TSBDConfig
from core.defenses.tsbd.nwc import NWC
from core.defenses.tsbd.reinit import apply_zero_masks, zero_masks, zero_reinitialize
from core.defenses.tsbd.unlearn import chance_accuracy
from core.progress import Progress


@dataclass(frozen=True)
class SweepPoint:
    """Clean held-out behaviour of the original model with the top-``n`` channels zeroed (before any
    fine-tuning); forward passes only."""

    n: float
    accuracy: float
    loss: float
    weights_zeroed: int
    images: int = 0  # images scored: the whole subset, or fewer where the collapse verdict was settled early


# a zeroing-sweep point's collapse verdict read from a random part of the subset differs from the whole subset's
# with probability at most this (Serfling's bound for sampling without replacement); 1 in 1,000 per candidate
SWEEP_VERDICT_DELTA = 1e-3
SWEEP_BATCH = 256  # images per step of that sequential read


def settled_score(model: nn.Module, data: DeviceImages, floor: float, order: torch.Tensor,
                  delta: float = SWEEP_VERDICT_DELTA, batch_size: int = SWEEP_BATCH) -> tuple[float, float, int]:
    """Eval-mode (accuracy, mean loss, images read) of ``model`` on ``data`` read batch by batch in the random
    ``order``, stopping as soon as the whole subset's accuracy is on one side of ``floor`` with probability at
    least ``1 - delta``: after ``k`` of ``N`` images, Serfling's inequality bounds the gap between the part's and
    the whole subset's accuracy by ``sqrt(ln(2 L / delta) (1 - (k - 1) / N) / (2k))``, ``L`` the number of looks
    (batches; a union bound over them). Why: the collapse rule only
    asks whether each zeroed model collapsed; most candidates are far from the floor and are settled by the
    first few hundred images instead of a full forward pass (issue 10: the sweep was the automatic repair's
    only cost beyond a fixed-n run)."""
    was_training = model.training
    model.eval()
    total = len(data)
    correct, loss_sum, seen = 0, 0.0, 0
    # union bound over the looks (one per batch), so the sequential stop keeps the 1 - delta guarantee
    log_term = math.log(2.0 * max(1, math.ceil(total / batch_size)) / delta)
    with torch.inference_mode(), data.rt.autocast():
        for start in range(0, total, batch_size):
            idx = order[start:start + batch_size]
            logits = model(data.inputs(idx)).float()
            y = data.y[idx]
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            seen += len(idx)
            if seen < total:
                acc = correct / seen
                eps = math.sqrt(log_term * (1.0 - (seen - 1) / total) / (2.0 * seen))
                if acc - eps > floor or acc + eps < floor:
                    break
    model.train(was_training)
    return correct / seen, loss_sum / seen, seen


def zeroing_sweep(model: nn.Module, nwc: NWC, data: DeviceImages, candidates: tuple[float, ...],
                  m: float, batch_size: int = 1024, progress: Progress | None = None,
                  stop: Callable[[list[SweepPoint]], bool] | None = None,
                  settle_floor: float | None = None, seed: int = 0) -> list[SweepPoint]:
    """For each candidate ``n``, zero the TSBD-selected weights of ``model`` and score it on ``data`` in eval
    mode. Works in place on ``model``'s covered conv weights and restores them afterwards (one copy of the
    covered conv weights, not of the model, per sweep). ``stop(points)``, asked after each point: end the
    sweep there (the caller's rule no longer depends on the candidates left). ``settle_floor``: the caller
    only needs to know whether each point's accuracy is at or below it, so each point is read with
    :func:`settled_score` (a random order drawn from ``seed``) instead of a whole forward pass."""
    modules = dict(model.named_modules())
    saved = [modules[name].weight.detach().clone() for name in nwc.layer_names]
    points = []
    progress = progress or Progress()
    order = None
    if settle_floor is not None:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(data), generator=gen).to(data.y.device)
    try:
        for i, n in enumerate(candidates):
            progress.check()
            progress.update(i / len(candidates))
            masks, summary = zero_masks(nwc, n, m)
            apply_zero_masks(model, nwc.layer_names, masks)
            if settle_floor is None:
                s = score(model, data, batch_size)
                acc, loss, seen = s.accuracy, s.loss, len(data)
            else:
                acc, loss, seen = settled_score(model, data, settle_floor, order)
            points.append(SweepPoint(n=n, accuracy=acc, loss=loss, weights_zeroed=summary.weights_zeroed,
                                     images=seen))
            with torch.no_grad():
                for name, w in zip(nwc.layer_names, saved, strict=True):
                    modules[name].weight.copy_(w)
            if stop is not None and stop(points):
                break
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
    n_retention_rule: float  # what each sweep rule gives on the points measured (no extra cost)
    n_collapse_rule: float
    reference_accuracy: float  # the unzeroed model's accuracy on the clean subset
    collapse_accuracy: float  # the accuracy at or below which the zeroed model counts as collapsed
    collapse_n: float | None  # the smallest candidate that collapsed (None: none did)
    nwc_half_mass_n: float  # the fraction of channels holding half the total NWC (recorded, not used)
    sweep: tuple[SweepPoint, ...]
    # why the sweep ended before the last candidate ("" when it measured them all): the rule's n could no
    # longer change, so the remaining forward passes were skipped (n_retention_rule then reads fewer points)
    sweep_stopped: str = ""

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


def sweep_stop(cfg: TSBDConfig, channels: int, floor: float) -> Callable[[list[SweepPoint]], bool] | None:
    """When the zeroing sweep (candidates in increasing order) can end without changing the chosen ``n``:
    the collapse rule reads only the first collapsed candidate and clips it to ``auto_max_n``, so it needs
    nothing past the first candidate that collapsed or that reached ``auto_max_n``; the width rule on a narrow
    network (below ``auto_wide_channels``) always takes that branch; on a wide one it takes it when a candidate
    below ``auto_redundant_from`` collapsed. The retention rule (and a wide network whose clean function has
    not collapsed early) reads every point. ``None``: measure them all. Why: each point is one forward pass
    over the clean subset, the automatic repair's only work beyond the fixed-n run (issue 10)."""
    if cfg.auto_rule not in ("width", "collapse"):
        return None
    wide = cfg.auto_rule == "width" and channels >= cfg.auto_wide_channels

    def stop(points: list[SweepPoint]) -> bool:
        last = points[-1]
        collapsed = last.accuracy <= floor
        if wide:
            return collapsed and last.n < cfg.auto_redundant_from - 1e-9
        return collapsed or last.n >= cfg.auto_max_n - 1e-9

    return stop


def choose_neuron_ratio(model: nn.Module, nwc: NWC, data: DeviceImages, cfg: TSBDConfig,
                        num_classes: int, progress: Progress | None = None,
                        base_accuracy: float | None = None) -> AutoChoice:
    """Choose ``n`` from the clean subset alone (the rules are described in this module's docstring).
    ``base_accuracy``: ``model``'s eval-mode accuracy on ``data`` when the caller has it already (one forward
    pass saved); the sweep ends as soon as the rule's ``n`` is settled (:func:`sweep_stop`)."""
    base = score(model, data).accuracy if base_accuracy is None else base_accuracy
    chance = chance_accuracy(data.y, num_classes)
    floor = chance + cfg.auto_collapse_fraction * max(0.0, base - chance)
    candidates = tuple(sorted(cfg.auto_candidates))
    channels = len(nwc.flat())
    stop = sweep_stop(cfg, channels, floor)
    # the collapse branch for certain (collapse rule, or width on a narrow network) reads only "collapsed or
    # not" from each point, so each is read until that is settled (settled_score); the others read every image
    settle = cfg.auto_rule == "collapse" or (cfg.auto_rule == "width" and channels < cfg.auto_wide_channels)
    points = zeroing_sweep(model, nwc, data, candidates, cfg.weight_ratio, progress=progress, stop=stop,
                           settle_floor=floor if settle else None, seed=cfg.seed)
    stopped = ""
    if len(points) < len(candidates):
        at = "the first collapsed candidate" if points[-1].accuracy <= floor else "the first candidate >= auto_max_n"
        stopped = (f"stopped at n = {points[-1].n:g}, {at}: the {cfg.auto_rule} rule's n cannot change with the "
                   f"{len(candidates) - len(points)} candidates left")
    collapse = next((p.n for p in points if p.accuracy <= floor), None)
    n_retention, text_retention = _retention_rule(candidates, points, base, chance, cfg)
    n_collapse, text_collapse = _collapse_rule(candidates, collapse, cfg)
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
                      collapse_n=collapse, nwc_half_mass_n=nwc_mass_fraction(nwc, 0.5), sweep=tuple(points),
                      sweep_stopped=stopped)


@dataclass(frozen=True)
class ProbePoint:
    """One probe of the recovery rule: ``n`` zeroed, a short stage 2 on the fit part, scored on the held-out
    part (``accuracy``, ``loss``); ``kept`` whether it stayed within tolerance of the best probe so far."""

    n: float
    accuracy: float
    loss: float
    lr: float
    kept: bool


@dataclass(frozen=True)
class RecoveryChoice:
    """The recovery rule's ``n``, its text, and the probes it ran (in order; it stops at the first that falls)."""

    n: float
    rule: str
    held_out_images: int
    fit_images: int
    tolerance: float  # the accuracy drop from the best probe so far that still counts as "held"
    probe_epochs: int
    probe_steps: int  # optimiser steps spent probing (each is two forward and two backward passes)
    probes: tuple[ProbePoint, ...]

    def as_dict(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["probes"] = [dataclasses.asdict(p) for p in self.probes]
        return out


def recovery_tolerance(best_accuracy: float, held_out: int, floor: float) -> float:
    """The drop in held-out accuracy that still counts as "held": ``floor`` or one binomial standard error of
    the best accuracy on ``held_out`` images, whichever is larger (below one standard error a drop is noise)."""
    p = min(max(best_accuracy, 0.0), 1.0)
    return max(floor, math.sqrt(p * (1.0 - p) / max(1, held_out)))


def escalate(probes: tuple[float, ...], probe: Callable[[float], tuple[float, float, float]], held_out: int,
             floor: float) -> tuple[float, list[ProbePoint], float]:
    """Raise ``n`` through ``probes`` (sorted) while the clean function recovers: ``probe(n)`` returns
    (held-out accuracy, loss, lr) after the short stage 2; stop at the first ``n`` whose accuracy falls more
    than :func:`recovery_tolerance` below the best so far and keep the last one that held. Returns (the
    chosen n, the probes run, the tolerance at the end)."""
    points: list[ProbePoint] = []
    best, chosen, tol = -1.0, probes[0], floor
    for n in probes:
        acc, loss, lr = probe(n)
        best = max(best, acc)
        tol = recovery_tolerance(best, held_out, floor)
        kept = acc >= best - tol - 1e-12
        points.append(ProbePoint(n=n, accuracy=acc, loss=loss, lr=lr, kept=kept))
        if not kept:
            break
        chosen = n
    return chosen, points, tol


def split_holdout(n_images: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices): a seeded random ``fraction`` of the subset held out (at least one
    image on each side)."""
    order = np.random.default_rng(seed).permutation(n_images)
    k = min(n_images - 1, max(1, round(fraction * n_images)))
    return np.sort(order[k:]), np.sort(order[:k])


def choose_by_recovery(original: nn.Module, nwc: NWC, clean: ImageSet, norm: Normalization, cfg: TSBDConfig,
                       num_classes: int, device: torch.device | str, flip: bool,
                       progress: Progress | None = None) -> RecoveryChoice:
    """The ``recovery`` rule (this module's docstring): hold out ``cfg.auto_holdout`` of the clean subset; for
    ``n`` in ``cfg.auto_probes`` (increasing), zero ``original`` for that ``n``, run ``cfg.auto_probe_epochs``
    of stage 2 on the rest with the learning rate stage 2 itself would use, score the held-out part, and
    stop where its accuracy falls (:func:`escalate`). ``original`` is not modified."""
    from core.defenses.tsbd.finetune import activeness_aware_finetune, stage2_schedule

    progress = progress or Progress()
    rt = runtime_for(device)
    fit_idx, held_idx = split_holdout(len(clean), cfg.auto_holdout, cfg.seed + 5)
    fit, held = DeviceImages(clean.subset(fit_idx), norm, rt), DeviceImages(clean.subset(held_idx), norm, rt)
    side = int(min(clean.x.shape[1], clean.x.shape[2]))
    loss_original = score(original, fit).loss
    probes = tuple(sorted(cfg.auto_probes))
    probe_cfg = dataclasses.replace(cfg, finetune_schedule="constant")
    steps = 0

    def probe(n: float) -> tuple[float, float, float]:
        nonlocal steps
        i = probes.index(n)
        model, _ = zero_reinitialize(original, nwc, n, cfg.weight_ratio)
        sched = stage2_schedule(len(fit), side, loss_original, score(model, fit).loss, num_classes, cfg, flip)
        sched = dataclasses.replace(sched, epochs=cfg.auto_probe_epochs)
        ft = activeness_aware_finetune(model, fit, norm, probe_cfg, device,
                                       progress.span(i / len(probes), (i + 1) / len(probes)), sched)
        steps += ft.steps
        s = score(model, held)
        return s.accuracy, s.loss, sched.lr

    n, points, tol = escalate(probes, probe, len(held), cfg.auto_tolerance)
    progress.update(1.0)
    text = (f"recovery: n raised through {list(probes)}, each zeroed and fine-tuned for {cfg.auto_probe_epochs} "
            f"epoch(s) on {len(fit)} images, scored on {len(held)} held-out ones; kept the largest n whose "
            f"held-out accuracy stayed within max({cfg.auto_tolerance:g}, one standard error) = {tol:.3f} of the "
            f"best so far")
    return RecoveryChoice(n=n, rule=text, held_out_images=len(held), fit_images=len(fit), tolerance=tol,
                          probe_epochs=cfg.auto_probe_epochs, probe_steps=steps, probes=tuple(points))
