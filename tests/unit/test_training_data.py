"""training_data of repair_data: the optional is_corrupt mask, its own image limit, its class folders, and the
identification quality measured against the mask."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data.formats import DataFormatError, DataLimits, load_image_set, load_training_set
from core.metrics import auroc, identification_quality
from core.pipeline import write_sample_scores


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez_compressed(path, **arrays)
    return path


def _images(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), "y": rng.integers(0, 3, n)}


@pytest.mark.parametrize("mask", [np.array([1, 0, 0, 1, 0], np.uint8), np.array([True, False, False, True, False])])
def test_is_corrupt_is_read_as_bool_from_bool_or_uint8(tmp_path: Path, mask: np.ndarray) -> None:
    data, names, flags = load_training_set(_npz(tmp_path / "t.npz", **_images(5), is_corrupt=mask), num_classes=3)
    assert len(data) == 5 and names is None
    assert flags is not None and flags.dtype == bool and flags.tolist() == [True, False, False, True, False]


def test_training_data_without_a_mask_has_none(tmp_path: Path) -> None:
    assert load_training_set(_npz(tmp_path / "t.npz", **_images(5)), num_classes=3)[2] is None


@pytest.mark.parametrize(("mask", "text"), [
    (np.zeros(4, bool), "must have shape (5,)"),
    (np.zeros((5, 1), bool), "must have shape (5,)"),
    (np.zeros(5, np.float32), "must be bool or uint8"),
    (np.zeros(5, np.int64), "must be bool or uint8"),
    (np.array([0, 1, 2, 0, 1], np.uint8), "only 0 and 1"),
])
def test_a_bad_mask_is_refused_naming_it(tmp_path: Path, mask: np.ndarray, text: str) -> None:
    with pytest.raises(DataFormatError, match="is_corrupt") as info:
        load_training_set(_npz(tmp_path / "t.npz", **_images(5), is_corrupt=mask), num_classes=3)
    assert text in str(info.value)


def test_other_parts_ignore_an_is_corrupt_array(tmp_path: Path) -> None:
    path = _npz(tmp_path / "c.npz", **_images(5), is_corrupt=np.zeros(3, np.float32))
    assert len(load_image_set(path, num_classes=3)) == 5


def test_training_data_has_its_own_image_limit(tmp_path: Path) -> None:
    path = _npz(tmp_path / "t.npz", **_images(12))
    limits = DataLimits(max_images=100, max_training_images=10)
    with pytest.raises(DataFormatError, match="12 images, over the limit of 10"):
        load_training_set(path, limits=limits, num_classes=3)
    assert len(load_image_set(path, limits=limits, num_classes=3)) == 12  # the other parts keep max_images


def test_an_image_folder_carries_its_class_names_and_no_mask(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    path = tmp_path / "t.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("cat/a.png", "dog/b.png", "dog/c.png"):
            zf.writestr(name, buf.getvalue())
    data, names, flags = load_training_set(path, num_classes=3)
    assert names == ["cat", "dog"] and data.y.tolist() == [0, 1, 1] and flags is None


def test_auroc_counts_ties_half_and_is_undefined_for_one_class() -> None:
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([True, True, False, False])) == 1.0
    assert auroc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([True, True, False, False])) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5]), np.array([True, False, False])) is None  # nothing ranked
    # one positive above one of two negatives and tied with the other: (1 + 0.5) / 2
    assert auroc(np.array([0.5, 0.5, 0.1]), np.array([True, False, False])) == 0.75
    assert auroc(np.array([0.1, 0.2]), np.array([False, False])) is None


def test_auroc_is_scikit_learn_s_on_scores_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    positive = rng.random(500) < 0.2
    scores = np.round(rng.normal(size=500) + positive, 1)  # rounded: many ties
    assert auroc(scores, positive) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)


def test_identification_quality_against_the_mask() -> None:
    scores = np.array([0.9, 0.7, 0.6, 0.2, 0.1])
    flagged = np.array([True, True, True, False, False])
    corrupt = np.array([True, False, True, True, False])
    q = identification_quality(scores, flagged, corrupt)
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 3)
    assert q["auroc"] == pytest.approx(4 / 6)  # positives 0.9, 0.6, 0.2 against negatives 0.7, 0.1
    assert (q["n_corrupt"], q["n_flagged"], q["n_flagged_corrupt"]) == (3, 3, 2)
    none = identification_quality(scores, np.zeros(5, bool), np.zeros(5, bool))
    assert none["precision"] is None and none["recall"] is None and none["auroc"] is None


def test_sample_scores_csv_has_one_row_per_sample(tmp_path: Path) -> None:
    import csv

    path = write_sample_scores(tmp_path / "s.csv", np.array([2, 0, 1]), np.array([0.25, -1.5, 3e-9]),
                               np.array([True, False, True]), np.array([1, 0, -1]), np.array([True, False, False]))
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["index", "label", "score", "flagged", "new_label", "is_corrupt"]
    assert [(int(r["index"]), int(r["label"]), float(r["score"]), int(r["flagged"]), int(r["new_label"]),
             int(r["is_corrupt"])) for r in rows] == [(0, 2, 0.25, 1, 1, 1), (1, 0, -1.5, 0, 0, 0),
                                                       (2, 1, 3e-9, 1, -1, 0)]
