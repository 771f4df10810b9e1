"""The noise's structure (issue 11): with the confident-learning noise matrix, a flagged label is relabelled to the
class its flips come from (``relabel_prior="noise_matrix"``; under symmetric noise nothing changes), and the acting
flags can score the posterior of the given label (``act_score="noise_posterior"``)."""

from __future__ import annotations

import numpy as np
import pytest

from core.datarepair.identify import Identification, label_flags_at, posterior_label_flags_at
from core.datarepair.registry import default_params, validate_params
from core.datarepair.separate import alternative_confidence, noise_matrix, separate

K = 4


def _probs_of(true: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A calibrated model's probabilities: about 0.85 on the true class, the rest spread."""
    p = np.full((len(true), K), 0.05) + rng.uniform(0, 0.01, (len(true), K))
    p[np.arange(len(true)), true] = 0.85 + rng.uniform(0, 0.05, len(true))
    return p / p.sum(1, keepdims=True)


def _clean(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Held-out clean samples all predicted right at 0.9-0.95: the relabelling confidence is about 0.9."""
    clean_y = np.tile(np.arange(K), 10)
    p = np.full((len(clean_y), K), 0.02)
    p[np.arange(len(clean_y)), clean_y] = rng.uniform(0.9, 0.95, len(clean_y))
    return p / p.sum(1, keepdims=True), clean_y


def test_a_planted_class_pair_flip_is_relabelled_to_its_source_class() -> None:
    rng = np.random.default_rng(0)
    true = np.repeat(np.arange(K), 100)
    given = true.copy()
    given[:30] = 1  # 30% of class 0 flipped to 1: the only noise
    probs = _probs_of(true, rng)
    t = noise_matrix(given, probs, K)
    assert t[1, 0] > 0.1 and t[1, 0] > 10 * max(t[1, 2], t[1, 3])  # the flip 0 -> 1 is found
    assert np.allclose(t.sum(0), 1.0)
    # flagged samples labelled 1 whose content the model reads as "0 or 2", 2 slightly ahead: the plain rule is not
    # confident in any class (dropped), the prior knows that wrong labels 1 come from class 0
    hard = np.tile([[0.42, 0.03, 0.53, 0.02]], (5, 1))
    probs_all = np.vstack([probs, hard])
    y = np.concatenate([given, np.ones(5, dtype=np.int64)])
    flagged = np.zeros(len(y), dtype=bool)
    flagged[-5:] = True
    clean_probs, clean_y = _clean(rng)
    plain = separate(flagged, y, probs_all, clean_probs, clean_y, 0.9, K)
    prior = separate(flagged, y, probs_all, clean_probs, clean_y, 0.9, K, relabel_prior="noise_matrix")
    assert not plain.relabelled[-5:].any() and plain.dropped[-5:].all()
    assert probs_all[-5:].argmax(1).tolist() == [2] * 5  # the plain argmax is the wrong class
    assert prior.relabelled[-5:].all() and (prior.new_labels[-5:] == 0).all()
    assert (prior.new_labels[:-5] == y[:-5]).all()  # unflagged samples keep their label either way
    assert prior.details["relabel_prior"] == "noise_matrix" and len(prior.details["noise_matrices"]) == 1
    # a flagged sample with a confident other class the flips never come from is not forced onto the source
    other = np.array([[0.02, 0.02, 0.02, 0.94]])
    sep = separate(np.r_[np.zeros(len(given), bool), True], np.r_[given, 1], np.vstack([probs, other]),
                   clean_probs, clean_y, 0.9, K, relabel_prior="noise_matrix")
    assert not (sep.relabelled[-1] and sep.new_labels[-1] == 2)


def test_symmetric_noise_changes_nothing() -> None:
    rng = np.random.default_rng(1)
    true = np.repeat(np.arange(K), 120)
    given = true.copy()
    for j in range(K):  # exactly 10 of each class to every other class: a flat off-diagonal
        idx = np.flatnonzero(true == j)[:30]
        given[idx] = [(j + 1 + m // 10) % K for m in range(30)]
    probs = np.full((len(true), K), 0.02)
    probs[np.arange(len(true)), true] = 0.94
    t = noise_matrix(given, probs, K)
    off = t[~np.eye(K, dtype=bool)]
    assert np.allclose(off, off[0]) and off[0] > 0
    # flagged: the noisy ones and a few uncertain ones; the relabelling is identical with and without the prior
    extra = np.array([[0.30, 0.05, 0.60, 0.05], [0.02, 0.03, 0.05, 0.90], [0.10, 0.80, 0.05, 0.05]])
    probs_all = np.vstack([probs, extra])
    y = np.concatenate([given, [1, 1, 0]])
    flagged = np.concatenate([given != true, [True, True, True]])
    clean_probs, clean_y = _clean(rng)
    plain = separate(flagged, y, probs_all, clean_probs, clean_y, 0.9, K)
    prior = separate(flagged, y, probs_all, clean_probs, clean_y, 0.9, K, relabel_prior="noise_matrix")
    assert plain.relabelled.sum() > 100  # the rule does relabel here, so "identical" is not vacuous
    for field in ("new_labels", "relabelled", "confirmed", "dropped", "unlearn"):
        assert (getattr(plain, field) == getattr(prior, field)).all(), field
    # and the confidence itself is the model's probability under any flat off-diagonal
    flat = np.full((K, K), 0.1) + np.eye(K) * 0.6
    assert np.allclose(alternative_confidence(probs_all, y, flat), probs_all)


def test_the_prior_is_per_reference_and_a_retain_parameter() -> None:
    rng = np.random.default_rng(2)
    true = np.repeat(np.arange(K), 100)
    given = true.copy()
    given[:30] = 1
    probs = _probs_of(true, rng)
    clean_probs, clean_y = _clean(rng)
    hard = np.array([[0.42, 0.03, 0.53, 0.02]])
    y = np.r_[given, 1]
    flagged = np.r_[np.zeros(len(given), bool), True]
    p_all = np.vstack([probs, hard])
    fits = _probs_of(given, rng)  # a second reference that fits the given labels: its matrix sees no flip
    prior_probs = [p_all, np.vstack([fits, hard])]
    for flagger, relabelled in ((0, True), (1, False)):  # each sample gets the matrix of the reference that flagged it
        ref = np.r_[np.zeros(len(given), np.int8), flagger]
        sep = separate(flagged, y, p_all, clean_probs, clean_y, 0.9, K, ref, [clean_probs, clean_probs],
                       relabel_prior="noise_matrix", prior_probs=prior_probs)
        assert len(sep.details["noise_matrices"]) == 2 and sep.relabelled[-1] == relabelled
        assert sep.new_labels[-1] == (0 if relabelled else -1)
    assert default_params("retain")["relabel_prior"] == "none"
    assert validate_params("retain", {"relabel_prior": "noise_matrix"})["relabel_prior"] == "noise_matrix"
    with pytest.raises(ValueError):
        validate_params("retain", {"relabel_prior": "bayes"})


def _ident(probs: np.ndarray, y: np.ndarray, clean_probs: np.ndarray, clean_y: np.ndarray) -> Identification:
    """A one-reference identification of these probabilities (the label loss against its clean null)."""
    loss = -np.log(probs[np.arange(len(y)), y])
    null = -np.log(clean_probs[np.arange(len(clean_y)), clean_y])
    return Identification(scores=loss, flagged=np.zeros(len(y), bool), probs=probs.astype(np.float32),
                          clean_probs=clean_probs.astype(np.float32), null_scores=null, details={},
                          label_flagged=np.zeros(len(y), bool), label_refs=[(loss, null)], n_split=1)


def test_the_posterior_flags_a_doubted_label_of_a_flip_destination_and_spare_a_class_without_noise() -> None:
    rng = np.random.default_rng(3)
    true = np.repeat(np.arange(K), 100)
    given = true.copy()
    given[:30] = 1  # flips 0 -> 1 only
    probs = _probs_of(true, rng)
    # two doubted samples, the same probability of their given label (0.3): one labelled 1 (a flip destination)
    # that looks like a 0, one labelled 2 (a class no flip reaches) that looks like a 3
    doubted = np.array([[0.62, 0.30, 0.04, 0.04], [0.04, 0.04, 0.30, 0.62]])
    p_all = np.vstack([probs, doubted])
    y = np.r_[given, 1, 2]
    clean_y = np.repeat(np.arange(K), 50)
    clean_probs = _probs_of(clean_y, rng)
    clean_probs[::10] = np.roll(clean_probs[::10], 1, axis=1)  # a few hard clean samples give the null a tail
    clean_probs[5::10] = np.full(K, 1 / K)
    ident = _ident(p_all, y, clean_probs, clean_y)
    plain = label_flags_at(ident, 0.95)
    post = posterior_label_flags_at(ident, y, clean_y, 0.95)
    assert plain[-1] == plain[-2]  # the loss cannot tell them apart
    assert post[-2] and not post[-1]
    assert post[:30].mean() > 0.9  # the planted flips stay flagged
    assert validate_params("retain", {"act_score": "noise_posterior"})["act_score"] == "noise_posterior"
    assert validate_params("retain", {"act_score": "loss"})["act_score"] == "loss"
    assert default_params("retain")["act_score"] == "noise_posterior"
