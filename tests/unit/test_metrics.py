"""Metric values on hand-made predictions, and ``predict``/``evaluate`` on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.attacks import BackdoorTestSet
from core.data.imageset import ImageSet
from core.data.transforms import Normalization, to_model_input
from core.metrics import (
    accuracy,
    attack_success_rate,
    defense_effectiveness_rating,
    evaluate,
    predict,
    robust_accuracy,
)

NORM = Normalization(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 5)]
    return nn.Sequential(*layers)


def _images(n: int = 37) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


def test_rates_on_hand_made_predictions() -> None:
    pred = np.array([0, 0, 1, 2, 0])
    assert accuracy(pred, np.array([0, 1, 1, 2, 3])) == pytest.approx(0.6)
    assert attack_success_rate(pred, np.zeros(5, dtype=np.int64)) == pytest.approx(0.6)
    assert robust_accuracy(pred, np.array([1, 2, 1, 2, 3])) == pytest.approx(0.4)


def test_der_worked_example() -> None:
    # ACC 0.90 -> 0.85 (drop 0.05), ASR 1.00 -> 0.10 (drop 0.90): DER = (0.90 - 0.05 + 1) / 2 = 0.925
    assert defense_effectiveness_rating(0.90, 1.00, 0.85, 0.10) == pytest.approx(0.925)
    # gains are not rewarded: accuracy up and ASR up count as no drop
    assert defense_effectiveness_rating(0.80, 0.50, 0.85, 0.60) == pytest.approx(0.5)
    assert defense_effectiveness_rating(0.9, 1.0, 0.9, 0.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="fraction"):
        defense_effectiveness_rating(90.0, 100.0, 85.0, 10.0)


def test_empty_or_mismatched_inputs_are_refused() -> None:
    empty = np.array([], dtype=np.int64)
    with pytest.raises(ValueError, match="empty"):
        accuracy(empty, empty)
    with pytest.raises(ValueError, match="empty"):
        attack_success_rate(empty, empty)
    with pytest.raises(ValueError, match="same length"):
        robust_accuracy(np.array([1, 2]), np.array([1]))
    with pytest.raises(ValueError, match="no images"):
        predict(_model(), np.zeros((0, 8, 8, 3), dtype=np.uint8), NORM)


def test_predict_is_argmax_of_the_model_in_eval_mode_batched() -> None:
    model, x = _model(), _images()
    model.eval()
    with torch.no_grad():
        expected = model(to_model_input(x, NORM)).argmax(dim=1).numpy()
    pred = predict(model, x, NORM, batch_size=8)
    assert pred.dtype == np.int64
    np.testing.assert_array_equal(pred, expected)


def test_predict_restores_train_mode() -> None:
    model, x = _model(), _images()
    model.train()
    model[2].eval()  # a mixed state must come back exactly
    first = predict(model, x, NORM)
    assert model.training and model[1].training and not model[2].training
    np.testing.assert_array_equal(predict(model, x, NORM), first)  # dropout and batch stats were off


def test_evaluate_reports_acc_asr_ra_and_counts() -> None:
    model, x = _model(), _images()
    pred = predict(model, x, NORM)
    clean = ImageSet(x, pred.copy())  # every label right: ACC 1
    y_other = (pred + 1) % 5
    backdoor = BackdoorTestSet(x=x[:10], y_target=pred[:10].copy(), y_true=y_other[:10])
    result = evaluate(model, clean, backdoor, NORM)
    assert (result.acc, result.asr, result.ra) == (1.0, 1.0, 0.0)
    assert (result.n_clean, result.n_backdoor) == (37, 10)
    only_clean = evaluate(model, clean, None, NORM)
    assert only_clean.asr is None and only_clean.ra is None and only_clean.n_backdoor == 0


def test_evaluate_takes_an_uploaded_poisoned_set_and_reports_progress() -> None:
    """The scan pipeline's path: triggered images without true labels give ASR but no RA; the progress bar
    covers both passes and keeps the caller's stage label."""
    from dataclasses import dataclass

    from core.progress import Progress
    from tests.unit.test_progress import RecordingSink

    @dataclass(frozen=True)
    class Uploaded:
        x: np.ndarray
        y_target: np.ndarray
        y_true: np.ndarray | None = None

    model, x = _model(), _images()
    pred = predict(model, x, NORM)
    sink = RecordingSink()
    stage = Progress(sink).stage("evaluate_before", 0.0, 0.5)
    result = evaluate(model, ImageSet(x, pred.copy()), Uploaded(x[:10], pred[:10].copy()), NORM, batch_size=4,
                      progress=stage)
    assert (result.acc, result.asr, result.ra) == (1.0, 1.0, None)
    assert result.scores() == {"acc": 1.0, "asr": 1.0, "ra": None}
    assert {s for s, _ in sink.reports} == {"evaluate_before"} and 0.4 < sink.reports[-1][1] <= 0.5
