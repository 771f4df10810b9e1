"""Poisoned-subset filter: drop the images of the defender's "clean" subset that sit apart from their own class.

Why: a repair fine-tunes on the clean subset, so a few poisoned images in it (2% is enough, BENCHMARKS.md §3)
teach the backdoor back. Every poisoned image carries the trigger and the attacker's label: dirty-label ones
(BadNets, Blended, ...) show another class's content under the target's label, clean-label ones (SIG, CLB) the
target's content plus a trigger the clean images of that class do not have. Either way the backdoored model's
intermediate features place them away from the other images *of the label they carry*, while its last layers map
them onto the target (so a score read at the output or the penultimate layer misses Blended). The score is
therefore per class and per layer, and the rule reads the subset's own distribution — a robust z-score against
the class's median and MAD, cut at 3.5 (Iglewicz & Hoaglin's outlier rule for modified z-scores) — not a fixed
drop rate: a clean subset loses about 1% of its images or less (0.6–1.0%, BENCHMARKS.md §2.8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.runtime import DeviceImages, Runtime, forward_all
from core.ranges import check_fields, float_in, int_in

_MAD_TO_SIGMA = 1.4826  # MAD * 1.4826 estimates the standard deviation of a normal distribution
# per-channel scales are floored at 30% of the layer's mean scale: a spatial max that is nearly constant over a
# class (the background's level) would otherwise blow tiny deviations up; set on the MNIST CPU profile, where a
# floor of 0.1% dropped ~19% of a clean subset through the max features and 30% drops <= 1% (BENCHMARKS.md §2.8)
_SCALE_FLOOR = 0.3


@dataclass(frozen=True)
class SubsetFilterConfig:
    """The outlier rule. ``z_threshold``: modified z-score above which an image is dropped; classes with fewer
    than ``min_class_size`` images are kept whole (a median and MAD of a handful of images mean little);
    ``max_drop_ratio`` bounds what one filtering may remove (the highest scores first) so that a model whose
    features are noise cannot empty the subset."""

    z_threshold: float_in(1.0, 100.0) = 3.5
    min_class_size: int_in(3, 1_000_000) = 10
    max_drop_ratio: float_in(0.0, 0.5) = 0.2
    batch_size: int_in(1, 4096) = 512

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class FilterResult:
    """``keep``: boolean mask over the subset; ``scores``: each image's outlier score (:func:`outlier_scores`;
    0 for images of classes too small to judge); ``details``: JSON-ready account."""

    keep: np.ndarray
    scores: np.ndarray
    details: dict[str, object] = field(default_factory=dict)


def conv_features(model: nn.Module, data: DeviceImages, batch_size: int = 512) -> list[torch.Tensor]:
    """For every ``Conv2d`` of ``model`` (module order) that runs in the eval-mode forward, its output averaged
    over positions, then (a second list of the same length) its maximum over positions: ``N×C_layer`` float32
    tensors, computed without gradients. Why both: a global trigger (Blended, SIG) moves the means, a small patch
    (BadNets) hardly moves a mean over a 28x28 map but lights up the maximum where it sits. A conv that never
    runs there (GoogLeNet's auxiliary heads) has no output to score: it is left out (its empty list failed
    ``torch.cat``, and TSBD with it)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    chunks: list[list[torch.Tensor]] = [[] for _ in convs]
    peaks: list[list[torch.Tensor]] = [[] for _ in convs]

    def hook(i: int) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def record(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            o = out.detach().float()
            chunks[i].append(o.mean(dim=(2, 3)))
            peaks[i].append(o.amax(dim=(2, 3)))
        return record

    hooks = [conv.register_forward_hook(hook(i)) for i, conv in enumerate(convs)]
    try:
        forward_all(model, data, batch_size)
    finally:
        for h in hooks:
            h.remove()
    ran = [i for i, c in enumerate(chunks) if c]
    return [torch.cat(chunks[i]) for i in ran] + [torch.cat(peaks[i]) for i in ran]


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """``(v - median) / (1.4826 * MAD)`` (the modified z-score); zeros when the MAD is 0."""
    med = values.median()
    mad = (values - med).abs().median() * _MAD_TO_SIGMA
    if float(mad) <= 0:
        return torch.zeros_like(values)
    return (values - med) / mad


def _standardise(feats: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``feats`` centred on ``ref``'s per-channel median and divided by its per-channel MAD (floored)."""
    med = ref.median(dim=0).values
    scale = (ref - med).abs().median(dim=0).values * _MAD_TO_SIGMA
    return (feats - med) / scale.clamp_min(_SCALE_FLOOR * float(scale.mean()) + 1e-12)


def class_core(feats: torch.Tensor) -> torch.Tensor:
    """The half of the rows nearest the rows' per-channel median (RMS of the MAD-scaled differences): one
    concentration step, as in the minimum covariance determinant, so that a cluster of poisoned images up to
    about half the class neither moves the centre nor widens the scales."""
    first = _standardise(feats, feats).pow(2).mean(dim=1)
    return feats[torch.argsort(first)[: max(2, (len(feats) + 1) // 2)]]


def class_outlier_z(feats: torch.Tensor) -> torch.Tensor:
    """How far each row of one class sits from the class along the class's main direction of spread in one
    layer: the rows standardised by :func:`class_core`'s median and MAD, projected on their top principal
    direction, as an absolute modified z-score. Why the top direction (the spectral signature of Tran et al.,
    NeurIPS 2018): poisoned images of a class share the trigger, so together they pull that direction towards
    themselves, while a clean class's odd images each stray their own way."""
    x = _standardise(feats, class_core(feats))
    _, _, vh = torch.linalg.svd(x - x.mean(dim=0), full_matrices=False)
    return robust_z(x @ vh[0]).abs()


def outlier_scores(layer_feats: list[torch.Tensor], labels: torch.Tensor, min_class_size: int
                   ) -> tuple[torch.Tensor, list[int]]:
    """Per image, the mean over feature sets (layers) of :func:`class_outlier_z` within its class; and the
    classes too small to score (their images score 0)."""
    n = int(labels.shape[0])
    per_layer = torch.zeros(len(layer_feats), n, device=labels.device)
    skipped: list[int] = []
    for c in torch.unique(labels).tolist():
        members = labels == c
        if int(members.sum()) < min_class_size:
            skipped.append(int(c))
            continue
        for li, feats in enumerate(layer_feats):
            per_layer[li, members] = class_outlier_z(feats[members])
    return per_layer.mean(dim=0), skipped


def filter_poisoned(model: nn.Module, clean: ImageSet, norm: Normalization, rt: Runtime,
                    cfg: SubsetFilterConfig | None = None) -> FilterResult:
    """Score every image of ``clean`` with :func:`outlier_scores` on ``model``'s :func:`conv_features` and mark for
    dropping those above ``cfg.z_threshold`` (at most ``cfg.max_drop_ratio`` of the subset, highest first).
    ``model`` (already on ``rt``'s device) is left as it was."""
    cfg = cfg or SubsetFilterConfig()
    n = len(clean)
    data = DeviceImages(clean, norm, rt)
    feats = conv_features(model, data, cfg.batch_size)
    if not feats:
        return FilterResult(np.ones(n, dtype=bool), np.zeros(n, dtype=np.float32),
                            {"applied": False, "reason": "the model has no Conv2d layer to read features from"})
    scores_t, skipped = outlier_scores(feats, data.y, cfg.min_class_size)
    scores = scores_t.cpu().numpy().astype(np.float32)
    flagged = np.flatnonzero(scores > cfg.z_threshold)
    cap = int(cfg.max_drop_ratio * n)
    capped = len(flagged) > cap
    if capped:
        flagged = flagged[np.argsort(-scores[flagged], kind="stable")[:cap]]
    keep = np.ones(n, dtype=bool)
    keep[flagged] = False
    labels = np.asarray(clean.y)
    per_class = {str(int(c)): int(k) for c, k in zip(*np.unique(labels[flagged], return_counts=True), strict=True)}
    order = flagged[np.argsort(-scores[flagged], kind="stable")]
    details: dict[str, object] = {
        "applied": True,
        "rule": (f"dropped the images whose mean over {len(feats) // 2} conv layers (spatial mean and max of each) "
                 f"of the robust z-score of their features along their class's main direction exceeds "
                 f"{cfg.z_threshold}"),
        "examined": n, "dropped": int(len(flagged)), "kept": int(keep.sum()),
        "fraction_dropped": float(len(flagged) / n), "dropped_per_class": per_class,
        "classes_too_small": skipped, "capped_at_max_drop_ratio": capped,
        "score_quantiles": {q: float(np.quantile(scores, float(q))) for q in ("0.5", "0.9", "0.99")},
        "dropped_index": [int(i) for i in order[:100]],  # subset positions, highest score first
        "dropped_scores": [round(float(scores[i]), 2) for i in order[:100]],
    }
    return FilterResult(keep, scores, details)
