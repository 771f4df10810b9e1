"""ACC, ASR, RA and DER as BackdoorBench defines them (docs/methods.md), and batched prediction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from core.attacks.base import BackdoorTestSet
from core.data.imageset import ImageSet
from core.data.transforms import Normalization, to_model_input
from core.progress import Progress


class TriggeredImages(Protocol):
    """Triggered images with the attacker's labels and, when known, their true labels: a
    ``BackdoorTestSet``, or an uploaded poisoned set (whose true labels are not known, so RA is not)."""

    @property
    def x(self) -> np.ndarray: ...

    @property
    def y_target(self) -> np.ndarray: ...

    @property
    def y_true(self) -> np.ndarray | None: ...


def predict(
    model: nn.Module,
    x: np.ndarray,
    norm: Normalization,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
    progress: Progress | None = None,
) -> np.ndarray:
    """Predicted labels (int64) for uint8 ``N×H×W×C`` images; the model must already be on ``device``.

    Runs in eval mode under ``torch.inference_mode()``; on CUDA with bf16 autocast and channels-last input
    (docs/methods.md). Every submodule's train/eval flag is restored afterwards, so a caller mid-training is
    unaffected. ``progress``, when given, is polled and advanced batch by batch.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError("images must be a uint8 N×H×W×C array")
    if len(x) == 0:
        raise ValueError("no images to predict")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    preds = []
    try:
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda)
        with torch.inference_mode(), autocast:
            for i in range(0, len(x), batch_size):
                if progress is not None:
                    progress.check()
                    progress.update(i / len(x))
                batch = to_model_input(x[i : i + batch_size], norm, device, channels_last=cuda)
                preds.append(model(batch).argmax(dim=1).cpu())
    finally:
        for module, training in modes:
            module.training = training
    return torch.cat(preds).numpy().astype(np.int64)


def _fraction_equal(pred: np.ndarray, labels: np.ndarray, what: str) -> float:
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape or pred.ndim != 1:
        raise ValueError(
            f"{what}: predictions and labels must be 1-D of the same length, "
            f"got {pred.shape} and {labels.shape}"
        )
    if len(pred) == 0:
        raise ValueError(f"{what} of an empty set is undefined")
    return float(np.mean(pred == labels))


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """ACC: the fraction of clean images classified as their true label."""
    return _fraction_equal(pred, y, "accuracy")


def attack_success_rate(pred: np.ndarray, y_target: np.ndarray) -> float:
    """ASR: the fraction of triggered images classified as the attacker's label. Pass predictions on a
    ``BackdoorTestSet``, which already leaves out target-class images (BackdoorBench)."""
    return _fraction_equal(pred, y_target, "attack success rate")


def robust_accuracy(pred: np.ndarray, y_true: np.ndarray) -> float:
    """RA: the fraction of triggered images still classified as their true label."""
    return _fraction_equal(pred, y_true, "robust accuracy")


def defense_effectiveness_rating(
    acc_before: float, asr_before: float, acc_after: float, asr_after: float
) -> float:
    """DER = [max(0, dASR) - max(0, dACC) + 1] / 2 with d the drop after the defence (BackdoorBench).

    In [0, 1]: 1 removes the backdoor at no accuracy cost, 0.5 changes nothing. Inputs are fractions in
    [0, 1], not percentages.
    """
    values = {
        "acc_before": acc_before,
        "asr_before": asr_before,
        "acc_after": acc_after,
        "asr_after": asr_after,
    }
    for key, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{key} must be a fraction in [0, 1], got {value}")
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` (higher = more likely positive) against the boolean ``positive``:
    the chance that a random positive scores above a random negative, ties counting half (Mann-Whitney U).
    ``None`` when either class is empty, where it is undefined, and when every score is the same (a method that
    does not score, whose 0.5 would read as a ranking no better than chance)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0 or np.ptp(scores) == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid_ranks = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank, averaged over ties
    rank_sum = float(mid_ranks[inverse][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def identification_quality(scores: np.ndarray, flagged: np.ndarray, is_corrupt: np.ndarray) -> dict[str, Any]:
    """How well harmful training samples were found, against the user's known-bad mask: precision and recall of
    the flags (``None`` where nothing was flagged / nothing is corrupt), AUROC of the scores, and the counts."""
    flagged, is_corrupt = np.asarray(flagged, dtype=bool), np.asarray(is_corrupt, dtype=bool)
    if not len(scores) == len(flagged) == len(is_corrupt):
        raise ValueError(f"scores, flags and is_corrupt differ in length: {len(scores)}, {len(flagged)}, "
                         f"{len(is_corrupt)}")
    hits = int((flagged & is_corrupt).sum())
    n_flagged, n_corrupt = int(flagged.sum()), int(is_corrupt.sum())
    return {"precision": hits / n_flagged if n_flagged else None,
            "recall": hits / n_corrupt if n_corrupt else None,
            "auroc": auroc(scores, is_corrupt),
            "n_corrupt": n_corrupt, "n_flagged": n_flagged, "n_flagged_corrupt": hits}


@dataclass(frozen=True)
class Evaluation:
    """ACC on clean data; ASR and RA on triggered data (``None`` without a backdoor test set)."""

    acc: float
    asr: float | None
    ra: float | None
    n_clean: int
    n_backdoor: int

    def scores(self) -> dict[str, float | None]:
        """ACC, ASR and RA as the scan report's ``before`` and ``after`` blocks hold them."""
        return {"acc": self.acc, "asr": self.asr, "ra": self.ra}


def evaluate(
    model: nn.Module,
    clean: ImageSet,
    backdoor: BackdoorTestSet | TriggeredImages | None,
    norm: Normalization,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
    progress: Progress | None = None,
) -> Evaluation:
    """ACC on ``clean`` and, given triggered images, ASR on them and RA where their true labels are known;
    ``progress`` (optional) covers both passes, in proportion to their sizes."""
    if len(clean) == 0:
        raise ValueError("clean test set is empty")
    n_bd = 0 if backdoor is None else len(backdoor.x)
    split = len(clean) / (len(clean) + n_bd)
    part = None if progress is None else progress.span(0.0, split)
    acc = accuracy(predict(model, clean.x, norm, device, batch_size, part), clean.y)
    if backdoor is None:
        return Evaluation(acc=acc, asr=None, ra=None, n_clean=len(clean), n_backdoor=0)
    if n_bd == 0:
        raise ValueError("backdoor test set is empty")
    part = None if progress is None else progress.span(split, 1.0)
    pred = predict(model, backdoor.x, norm, device, batch_size, part)
    return Evaluation(
        acc=acc,
        asr=attack_success_rate(pred, backdoor.y_target),
        ra=robust_accuracy(pred, backdoor.y_true) if backdoor.y_true is not None else None,
        n_clean=len(clean),
        n_backdoor=len(backdoor.x),
    )
