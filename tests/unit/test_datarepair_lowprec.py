"""Acting needs stronger evidence than flagging (issue 11, low-precision flags): label flags below the acting level
(``act_quantile``) are kept with their label or dropped, never relabelled or unlearned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.datarepair.identify import IdentifyConfig, identify, label_flags_at, null_label_flags_at
from core.datarepair.registry import repair_data, validate_params
from core.datarepair.separate import concentrated_classes, separate
from core.defenses.runtime import runtime_for
from core.progress import Progress
from core.training import train_classifier

NORM = Normalization()
FAST = {"calib_epochs": 3, "calib_augment": False, "scratch_epochs": 20, "epochs": 2, "augment": False}


@pytest.fixture(scope="module")
def digits() -> dict[str, object]:
    """8x8 digits: 500 training images with 20% of the labels flipped, a clean set of 300."""
    torch.set_num_threads(1)
    d = load_digits()
    x = (d.images * 255 / 16).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(3)
    order = rng.permutation(len(y))
    tr, cl = order[:500], order[500:800]
    noisy = y[tr].copy()
    bad = rng.random(len(tr)) < 0.2
    noisy[bad] = (noisy[bad] + rng.integers(1, 10, bad.sum())) % 10
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    training = ImageSet(x[tr], noisy)
    model = train_classifier(net, training, NORM, 15, 0.05, 64, "cpu", augment=False)
    return {"model": model, "training": training, "clean": ImageSet(x[cl], y[cl]), "bad": bad}


def test_weak_flags_are_kept_or_dropped_and_never_relabelled_or_unlearned() -> None:
    y = np.array([0, 0, 0, 1])
    probs = np.array([[0.005, 0.995], [0.005, 0.995], [0.4, 0.6], [0.5, 0.5]], dtype=np.float32)
    clean = np.tile(np.array([[0.99, 0.01], [0.01, 0.99]], dtype=np.float32), (10, 1))
    clean_y = np.tile([0, 1], 10)
    flagged = np.array([True, True, True, False])
    every = separate(flagged, y, probs, clean, clean_y, 0.9, 2)
    assert every.relabelled.tolist() == [True, True, False, False] and every.unlearn[2]
    strong = np.array([True, False, False, False])  # only the first flag holds at the acting level
    keep = separate(flagged, y, probs, clean, clean_y, 0.9, 2, strong=strong, weak_flags="keep")
    assert keep.new_labels.tolist() == [1, 0, 0, 1]  # the weak ones keep their (given) label
    assert keep.weak.tolist() == [False, True, True, False]
    assert not keep.unlearn.any() and keep.relabelled.tolist() == [True, False, False, False]
    assert (keep.weights == 1).all() and keep.details["n_weak_flags"] == 2
    drop = separate(flagged, y, probs, clean, clean_y, 0.9, 2, strong=strong, weak_flags="drop")
    assert drop.new_labels.tolist() == [1, -1, -1, 1] and not drop.unlearn.any()
    assert drop.dropped.tolist() == [False, True, True, False] and drop.weights[1:3].tolist() == [0, 0]


def test_class_test_drops_the_weak_flags_of_a_class_that_holds_the_strong_flags_only() -> None:
    """Four classes of 50 samples (and 10 clean ones each, none strongly flagged): 20 strong flags all under label 0
    (an all-to-one backdoor's target) and one weak flag in every class: only class 0's weak flag is dropped. With the
    strong flags spread (label noise), no class is rejected and every weak flag is kept."""
    k = 4
    y = np.repeat(np.arange(k), 50)
    probs = np.full((len(y), k), 0.25, dtype=np.float32)  # never confident: strong flags are dropped, not relabelled
    clean = np.tile(np.eye(k, dtype=np.float32) * 0.97 + 0.01, (10, 1))
    clean_y = np.tile(np.arange(k), 10)
    none = np.zeros(len(clean_y), dtype=bool)
    strong = np.zeros(len(y), dtype=bool)
    strong[:20] = True  # label 0
    weak = np.zeros(len(y), dtype=bool)
    weak[[30, 60, 110, 160]] = True  # one per class
    sep = separate(strong | weak, y, probs, clean, clean_y, 0.9, k, strong=strong, weak_flags="class_test",
                   clean_strong=none)
    assert sep.details["weak_dropped_classes"] == [0]
    assert sep.new_labels[[30, 60, 110, 160]].tolist() == [-1, 1, 2, 3]
    rejected, pvals = concentrated_classes(y, strong, k, 0.05)
    assert rejected.tolist() == [True, False, False, False] and pvals[0] < 0.05 / k
    spread = np.zeros(len(y), dtype=bool)
    spread[[0, 1, 2, 3, 4, 50, 51, 52, 53, 54, 100, 101, 102, 103, 104, 150, 151, 152, 153, 154]] = True
    kept = separate(spread | weak, y, probs, clean, clean_y, 0.9, k, strong=spread, weak_flags="class_test",
                    clean_strong=none)
    assert kept.details["weak_dropped_classes"] == [] and kept.details["n_weak_dropped"] == 0
    assert kept.new_labels[[30, 60, 110, 160]].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="clean_strong"):
        separate(strong | weak, y, probs, clean, clean_y, 0.9, k, strong=strong, weak_flags="class_test")


def test_class_test_spares_a_hard_class_and_symmetric_noise() -> None:
    """Four classes of 100 training and 100 clean samples. Class 0 (a backdoor's target): 40% of its training samples
    strongly flagged, 2% of its clean ones. Class 1 (a hard class): 30% flagged, and its clean samples are flagged
    30% of the time too. The share test alone rejects both; against the clean null's rate only the target is
    rejected; class_test asks both, so the hard class keeps its weak flags. Under symmetric noise the clean-rate test
    alone rejects every class; class_test asks for concentration too and rejects none."""
    k = 4
    y = np.repeat(np.arange(k), 100)
    clean_y = np.repeat(np.arange(k), 100)
    strong = np.zeros(len(y), dtype=bool)
    for c, n in enumerate((40, 30, 2, 2)):
        strong[100 * c:100 * c + n] = True
    clean_strong = np.zeros(len(clean_y), dtype=bool)
    for c, n in enumerate((2, 30, 2, 2)):
        clean_strong[100 * c:100 * c + n] = True
    share, _ = concentrated_classes(y, strong, k, 0.05)
    assert share.tolist() == [True, True, False, False]
    rejected, pvals = concentrated_classes(y, strong, k, 0.05, clean_y, clean_strong)
    assert rejected.tolist() == [True, False, False, False] and pvals[1] > 0.4
    probs = np.full((len(y), k), 0.25, dtype=np.float32)
    clean = np.repeat(np.eye(k, dtype=np.float32) * 0.97 + 0.01, 100, axis=0)  # in clean_y's order
    weak = np.zeros(len(y), dtype=bool)
    weak[[90, 190, 290, 390]] = True  # one per class
    sep = separate(strong | weak, y, probs, clean, clean_y, 0.9, k, strong=strong, weak_flags="class_test",
                   clean_strong=clean_strong)
    assert sep.details["weak_dropped_classes"] == [0]
    assert sep.new_labels[[90, 190, 290, 390]].tolist() == [-1, 1, 2, 3]
    noisy = np.zeros(len(y), dtype=bool)
    for c in range(k):
        noisy[100 * c:100 * c + 20] = True
    clean_low = np.zeros(len(clean_y), dtype=bool)
    clean_low[[0, 1, 100, 101, 200, 201, 300, 301]] = True
    assert concentrated_classes(y, noisy, k, 0.05, clean_y, clean_low)[0].all()
    spread = separate(noisy | weak, y, probs, clean, clean_y, 0.9, k, strong=noisy, weak_flags="class_test",
                      clean_strong=clean_low)
    assert spread.details["weak_dropped_classes"] == [] and spread.new_labels[[90, 190, 290, 390]].tolist() == [
        0, 1, 2, 3]


def test_flags_at_another_level_follow_the_same_rule_and_nest(digits: dict) -> None:
    cfg = IdentifyConfig(null_quantile=0.6, calib_epochs=3, calib_augment=False, scratch_epochs=20)
    ident = identify(digits["model"], digits["training"], digits["clean"], NORM, cfg, runtime_for("cpu"), 10,
                     Progress())
    assert np.array_equal(label_flags_at(ident, 0.6), ident.label_flagged)  # the configured level reproduced
    strict = label_flags_at(ident, 0.95)
    for q in (0.6, 0.95):  # the clean null's own flags by the same rule: at most 1 - q of the clean samples
        null = null_label_flags_at(ident, q)
        assert null is not None and null.shape == (len(digits["clean"]),) and null.mean() <= 1 - q + 1e-9
    assert not (null_label_flags_at(ident, 0.95) & ~null_label_flags_at(ident, 0.6)).any()
    assert strict.sum() < ident.label_flagged.sum() and not (strict & ~ident.label_flagged).any()
    bad = digits["bad"]
    # the stricter level is more precise: what it leaves out of the loose flags is mostly benign
    assert (bad & strict).sum() / strict.sum() > (bad & ident.label_flagged).sum() / ident.label_flagged.sum()


def test_retain_with_loose_flags_keeps_the_weak_ones_with_their_label(digits: dict) -> None:
    training = digits["training"]
    params = {**FAST, "null_quantile": 0.6, "input_quality": False}
    loose = repair_data("retain", digits["model"], training, digits["clean"], NORM, params, "cpu", 10)
    assert loose.params["act_quantile"] == 0.95 and loose.params["weak_flags"] == "keep"  # the defaults
    n_weak = loose.details["n_weak_flags"]
    assert n_weak > 0
    kept_as_given = loose.flagged & (loose.new_labels == training.y)
    assert kept_as_given.sum() >= n_weak
    every = repair_data("retain", digits["model"], training, digits["clean"], NORM, {**params, "act_quantile": 0.6},
                        "cpu", 10)
    assert "n_weak_flags" not in every.details  # at or below the flagging level every flag acts
    assert every.details["n_relabelled"] + every.details["n_dropped"] > loose.details["n_relabelled"] + \
        loose.details["n_dropped"]
    # the registry passes the clean null's flags through for the per-class test
    by_class = repair_data("retain", digits["model"], training, digits["clean"], NORM,
                           {**params, "weak_flags": "class_test"}, "cpu", 10)
    assert by_class.details["weak_flags"] == "class_test" and "weak_dropped_classes" in by_class.details
    assert by_class.details["n_weak_flags"] == n_weak  # the same identification, only the weak flags' fate differs
    assert validate_params("retain", {"weak_flags": "class_test"})["weak_flags"] == "class_test"
    for gone in ("erase", "class_null", "class_both"):  # the single-test variants were folded into class_test
        with pytest.raises(ValueError):
            validate_params("retain", {"weak_flags": gone})
    with pytest.raises(ValueError):
        validate_params("retain", {"act_quantile": 1.0})


def test_retain_through_the_registry_with_the_noise_matrix(digits: dict) -> None:
    """relabel_prior and act_score reach step 2: the noise matrices are reported, the acting flags are the posterior's
    (the weak flags differ from the loss's), the flags themselves (step 1) do not change."""
    training = digits["training"]
    params = {**FAST, "null_quantile": 0.6, "input_quality": False}
    plain = repair_data("retain", digits["model"], training, digits["clean"], NORM, {**params, "act_score": "loss"},
                        "cpu", 10)
    nm = repair_data("retain", digits["model"], training, digits["clean"], NORM,
                     {**params, "relabel_prior": "noise_matrix", "act_score": "noise_posterior"}, "cpu", 10)
    assert nm.params["relabel_prior"] == "noise_matrix" and nm.params["act_score"] == "noise_posterior"
    assert nm.details["relabel_prior"] == "noise_matrix" and len(nm.details["noise_matrices"]) == 2
    assert np.array_equal(nm.flagged, plain.flagged)
    assert "relabel_prior" not in plain.details
    assert nm.details["n_weak_flags"] != plain.details["n_weak_flags"]
