"""core/datarepair/quality.py: the input-quality reference ranks planted blurred and noisy inputs above clean
ones and flags them at the clean null; a non-finite statistic raises naming it; step 2 keeps the uncontested
labels of flagged inputs at input_weight; the sample_scores CSV carries the input flags."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from core.data.imageset import ImageSet
from core.datarepair import quality
from core.datarepair.identify import fold_index, null_scaled, population_test
from core.datarepair.quality import STATISTICS, input_quality_scores, statistics_of
from core.datarepair.separate import separate
from core.pipeline import write_sample_scores


def _blur3(x: np.ndarray) -> np.ndarray:
    pad = np.pad(x.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    return np.rint(sum(pad[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9).astype(np.uint8)


@pytest.fixture(scope="module")
def planted() -> dict[str, object]:
    """Digits upsampled to 16x16: 400 training images of which 40 blurred and 40 with Gaussian noise (labels
    kept), a clean set of 300 untouched ones."""
    d = load_digits()
    x = np.kron((d.images * 255 / 16).astype(np.uint8)[..., None], np.ones((1, 2, 2, 1), np.uint8))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, clean = x[order[:400]].copy(), x[order[400:700]]
    blurred, noisy = np.arange(0, 40), np.arange(40, 80)
    train[blurred] = _blur3(train[blurred])
    train[noisy] = np.clip(train[noisy] + rng.normal(0, 0.3 * 255, train[noisy].shape), 0, 255).astype(np.uint8)
    return {"train": ImageSet(train, d.target[order[:400]]), "clean": ImageSet(clean, d.target[order[400:700]]),
            "blurred": blurred, "noisy": noisy}


def test_planted_blurred_and_noisy_inputs_rank_above_clean_ones_and_are_flagged(planted: dict) -> None:
    train, clean = planted["train"], planted["clean"]
    s, null = input_quality_scores(statistics_of(train), statistics_of(clean), fold_index(len(clean), 2, 0))
    good = np.ones(len(train), bool)
    good[planted["blurred"]] = good[planted["noisy"]] = False
    for part in (planted["blurred"], planted["noisy"]):  # two-sided: too little and too much high frequency
        assert roc_auc_score(np.r_[np.ones(len(part)), np.zeros(good.sum())], np.r_[s[part], s[good]]) > 0.95
    u, nu = null_scaled(s, null, 0.95)
    flagged = u > 1
    assert flagged[planted["blurred"]].mean() > 0.8 and flagged[planted["noisy"]].mean() > 0.8
    assert flagged[good].mean() < 0.12 and (nu > 1).mean() <= 0.06  # the clean null's level, not a fitted one
    assert population_test(s, null, 0.95, 0.05)["corrupted_inputs"]
    clean_only = population_test(s[good], null, 0.95, 0.05)  # training inputs drawn like the clean ones
    assert not clean_only["corrupted_inputs"] and clean_only["p_value"] > 0.05


def test_statistics_are_streamed_alike_and_grey_images_have_no_chroma(planted: dict) -> None:
    train = planted["train"]
    whole = statistics_of(train, batch_size=len(train))
    assert np.array_equal(statistics_of(train, batch_size=7), whole)
    assert whole.shape == (len(train), len(STATISTICS)) and np.all(whole[:, -1] == 0)
    rgb = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    assert np.all(np.isfinite(statistics_of(ImageSet(rgb, np.zeros(5, np.int64)))))


def test_a_non_finite_statistic_raises_naming_it(planted: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    real = quality.image_statistics

    def broken(x: np.ndarray) -> np.ndarray:
        out = real(x)
        out[3, STATISTICS.index("log_total_variation")] = np.nan
        return out

    monkeypatch.setattr(quality, "image_statistics", broken)
    with pytest.raises(ValueError, match=r"'log_total_variation' is not finite .*first index 3"):
        statistics_of(planted["clean"])


def _confident_clean_set() -> tuple[np.ndarray, np.ndarray]:
    """20 held-out clean samples of two classes, each predicted right at 0.99: the relabelling threshold is low."""
    return np.tile([0, 1], 10), np.tile(np.array([[0.99, 0.01], [0.01, 0.99]], dtype=np.float32), (10, 1))


def test_flagged_inputs_keep_an_uncontested_label_at_input_weight() -> None:
    """Sample 0: input flagged only -> kept with its label at the weight (dropped at 0); sample 1: input and label
    flagged -> separated as a label flag (relabelled: the references are confident in class 1)."""
    y = np.array([0, 0, 0])
    probs = np.array([[0.9, 0.1], [0.005, 0.995], [0.9, 0.1]], dtype=np.float32)
    clean_y, clean_probs = _confident_clean_set()
    label_flagged = np.array([False, True, False])
    input_flagged = np.array([True, True, False])
    sep = separate(label_flagged, y, probs, clean_probs, clean_y, 0.9, 2, input_flagged=input_flagged,
                   input_weight=0.25)
    assert sep.new_labels.tolist() == [0, 1, 0] and sep.weights.tolist() == [0.25, 1.0, 1.0]
    assert sep.input_kept.tolist() == [True, False, False] and sep.details["n_input_kept"] == 1
    drop = separate(label_flagged, y, probs, clean_probs, clean_y, 0.9, 2, input_flagged=input_flagged,
                    input_weight=0.0)
    assert drop.new_labels.tolist() == [-1, 1, 0] and not drop.unlearn.any()


def test_drop_both_flagged_drops_what_would_be_relabelled_from_a_flagged_input() -> None:
    """Sample 1 (input and label flagged, references confident in class 1) is dropped, not relabelled, with
    drop_both_flagged; the label-only flag (sample 2) is still relabelled and the input-only one still kept."""
    y = np.array([0, 0, 0])
    probs = np.array([[0.9, 0.1], [0.005, 0.995], [0.005, 0.995]], dtype=np.float32)
    clean_y, clean_probs = _confident_clean_set()
    label_flagged = np.array([False, True, True])
    input_flagged = np.array([True, True, False])
    sep = separate(label_flagged, y, probs, clean_probs, clean_y, 0.9, 2, input_flagged=input_flagged,
                   drop_both_flagged=True)
    assert sep.new_labels.tolist() == [0, -1, 1]
    assert sep.dropped.tolist() == [False, True, False] and sep.relabelled.tolist() == [False, False, True]
    assert sep.unlearn.tolist() == [False, True, False]  # its given label is less likely than chance
    assert sep.details["n_both_flagged"] == 1 and sep.details["drop_both_flagged"] is True
    kept = separate(label_flagged, y, probs, clean_probs, clean_y, 0.9, 2, input_flagged=input_flagged)
    assert kept.new_labels.tolist() == [0, 1, 1]


def test_sample_scores_csv_has_the_input_flags_column(tmp_path: Path) -> None:
    path = write_sample_scores(tmp_path / "s.csv", np.array([2, 0]), np.array([0.5, 3.0]), np.array([False, True]),
                               np.array([2, 0]), np.array([False, True]), np.array([False, True]))
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["index", "label", "score", "flagged", "new_label", "input_flagged", "is_corrupt"]
    assert [int(r["input_flagged"]) for r in rows] == [0, 1]
    bare = list(csv.reader(write_sample_scores(tmp_path / "b.csv", np.array([1]), np.array([0.1]),
                                               np.array([False]), np.array([1])).open()))
    assert bare[0] == ["index", "label", "score", "flagged", "new_label"]
