"""The poisoned-subset filter: it drops images planted in the defender's subset and keeps the clean ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.repair_bench import small_cnn
from core.attacks.base import poison_training_set
from core.attacks.registry import create_attack
from core.defenses.runtime import runtime_for
from core.defenses.subset_filter import SubsetFilterConfig, filter_poisoned, outlier_scores, robust_z
from core.training import train_classifier
from tests.unit.test_tsbd import NORM, digits, tiny_cnn


def test_robust_z_ignores_the_outliers_it_scores() -> None:
    v = torch.cat([torch.linspace(-1, 1, 50), torch.tensor([30.0, 40.0])])
    z = robust_z(v)
    assert z[-2:].min() > 20 and z[:50].abs().max() < 2.5
    assert torch.equal(robust_z(torch.ones(5)), torch.zeros(5))  # no spread: nobody is an outlier


def test_outlier_scores_are_relative_to_each_class() -> None:
    """Two classes far apart; in class 1 three rows sit apart from the rest in both layers. Only they score
    high, although class 0 as a whole is far from class 1; a 4-image class is too small and scores 0."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=g)
    b = torch.randn(40, 6, generator=g) + 50.0
    b[:3] += 8.0
    small = torch.randn(4, 6, generator=g) - 50.0
    feats = torch.cat([a, b, small])
    labels = torch.tensor([0] * 40 + [1] * 40 + [2] * 4)
    scores, skipped = outlier_scores([feats, 2 * feats], labels, min_class_size=10)
    assert skipped == [2] and torch.equal(scores[80:], torch.zeros(4))
    assert scores[40:43].min() > 3.5 and scores[43:80].max() < 3.5 and scores[:40].max() < 3.5


@pytest.fixture(scope="module")
def digits_split():
    torch.set_num_threads(2)
    return digits()


@pytest.mark.parametrize("attack_name", ["blended", "sig"])
def test_filter_ranks_planted_poisoned_images_first_and_keeps_clean_ones(digits_split, attack_name: str) -> None:
    """A small CNN backdoored on 8x8 digits; the defender's 300 'clean' images hold 2-3% poisoned ones of the
    same attack (SIG: triggered target-class images that keep their label). The planted images score highest,
    and the default rule drops almost no clean image, with or without them. (On these 8x8 images the planted
    ones' scores, 2-4, stay under the default cut of 3.5 — they are dropped on MNIST, BENCHMARKS.md §2.8 — so
    the drop itself is checked with a cut at the planted images' level, 2.)"""
    train, test = digits_split
    attack = create_attack(attack_name, target=0, image_shape=train.image_shape, seed=0)
    poisoned = poison_training_set(attack, train, 0.1, 10, seed=0)
    torch.manual_seed(1)
    model = train_classifier(small_cnn(1, 10, width=8), poisoned.data, NORM, epochs=10, lr=0.05, batch_size=64,
                             device="cpu", augment=False)
    defender = test.subset(np.arange(300))
    mixed = poison_training_set(attack, defender, 0.03 if attack.clean_label else 0.02, 10, seed=1)
    subset = mixed.data.subset(np.arange(len(defender)))
    planted = np.zeros(len(subset), dtype=bool)
    planted[mixed.poisoned_index] = True
    rt = runtime_for("cpu")
    res = filter_poisoned(model, subset, NORM, rt)
    top = np.argsort(-res.scores)[: int(planted.sum())]
    assert planted[top].sum() >= planted.sum() - 1, (res.scores[planted], np.sort(res.scores)[-10:])
    assert (~res.keep[~planted]).sum() <= 0.03 * (~planted).sum(), res.details
    assert res.details["dropped"] == int((~res.keep).sum())
    assert set(res.details["dropped_index"]) == set(np.flatnonzero(~res.keep).tolist())
    cut = filter_poisoned(model, subset, NORM, rt, SubsetFilterConfig(z_threshold=2.0))
    assert (~cut.keep[planted]).sum() >= planted.sum() - 1 and (~cut.keep[~planted]).sum() <= 0.05 * len(subset)
    on_clean = filter_poisoned(model, defender, NORM, rt)
    assert on_clean.details["fraction_dropped"] <= 0.03, on_clean.details


def test_the_cap_bounds_what_one_filtering_drops(digits_split) -> None:
    train, test = digits_split
    model = tiny_cnn(seed=2).eval()  # untrained: its features say nothing, the cap must hold anyway
    cfg = SubsetFilterConfig(z_threshold=1.0, max_drop_ratio=0.05)
    res = filter_poisoned(model, test.subset(np.arange(200)), NORM, runtime_for("cpu"), cfg)
    assert res.details["dropped"] <= 10 and res.keep.sum() >= 190
    assert res.details["capped_at_max_drop_ratio"] is True
