"""core/datarepair/influence.py, the ``ekfac`` scorer: EK-FAC influence on the clean loss ranks planted label
noise first, flags against the clean null, reports progress, removes its factor files, raises on NaN, names the
extra when kronfluence is missing, and keeps memory bounded in the training set's size."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score

from core.data.imageset import ImageSet
from core.datarepair.identify import IdentifyConfig, identify
from core.datarepair.registry import repair_data
from core.defenses.runtime import runtime_for
from core.progress import Progress
from tests.unit.test_datarepair import FAST, NORM, _kib, _Sink, noisy_digits, tiny_net  # noqa: F401 (fixture)

pytest.importorskip("kronfluence")


def test_ekfac_ranks_planted_label_noise_first_and_cleans_up(noisy_digits: dict, tmp_path: Path,  # noqa: F811
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sink = _Sink()
    cfg = IdentifyConfig(scorer="ekfac", calib_epochs=4, calib_augment=False)
    ident = identify(noisy_digits["model"], noisy_digits["training"], noisy_digits["clean"], NORM, cfg,
                     runtime_for("cpu"), 10, Progress(sink))
    bad = noisy_digits["bad"]
    # a wrong sign gives ~0.02, scores unrelated to the labels ~0.5; measured 0.98
    assert roc_auc_score(bad, ident.scores) > 0.9
    assert ident.scores.dtype == np.float64 and np.isfinite(ident.scores).all()
    assert ident.flagged.sum() > 0.5 * bad.sum()
    assert (bad & ident.flagged).sum() / ident.flagged.sum() > 0.8
    assert ident.details["null_flag_rate"] <= 1 - cfg.null_quantile + 0.01
    assert np.isfinite(ident.null_scores).all() and len(ident.null_scores) == len(noisy_digits["clean"])
    fractions = [f for _, f in sink.reports]
    assert len(fractions) >= 4 and fractions == sorted(fractions) and fractions[-1] > 0.99
    assert list(tmp_path.iterdir()) == []  # kronfluence's factors and scores went with the temporary directory


def test_ekfac_non_finite_model_raises_naming_the_cause(noisy_digits: dict) -> None:  # noqa: F811
    broken = tiny_net()
    with torch.no_grad():
        broken[-1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="harm scores are not finite"):
        repair_data("retain", broken, noisy_digits["training"], noisy_digits["clean"], NORM,
                    {**FAST, "scorer": "ekfac"}, "cpu", 10)


def test_missing_kronfluence_names_the_extra(noisy_digits: dict, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setitem(sys.modules, "kronfluence", None)  # import kronfluence -> ImportError
    with pytest.raises(ValueError, match=r"antidote\[influence\]"):
        repair_data("retain", noisy_digits["model"], noisy_digits["training"], noisy_digits["clean"], NORM,
                    {**FAST, "scorer": "ekfac"}, "cpu", 10)


def test_ekfac_memory_is_bounded_in_the_training_set_size() -> None:
    """2,000 training images and a 300k-parameter model: their per-sample gradients as one N x P matrix would be
    2.4 GB; batched scoring with an aggregated query gradient stays within a few hundred MB."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))  # layers of at most 513 inputs: cheap eigendecompositions
    assert sum(p.numel() for p in model.parameters()) > 290_000
    rng = np.random.default_rng(0)
    training = ImageSet(rng.integers(0, 256, (2_000, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, 2_000))
    clean = ImageSet(rng.integers(0, 256, (100, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, 100))
    Path("/proc/self/clear_refs").write_text("5")
    before = _kib("VmRSS")
    ident = identify(model, training, clean, NORM, IdentifyConfig(
        scorer="ekfac", calib_epochs=1, checkpoints=2, calib_augment=False, ekfac_factor_examples=500),
        runtime_for("cpu"), 10, Progress())
    growth_mb = (_kib("VmHWM") - before) / 1024
    assert np.isfinite(ident.scores).all() and len(ident.scores) == 2_000
    print(f"growth {growth_mb:.0f} MB")
    assert growth_mb < 700, growth_mb
