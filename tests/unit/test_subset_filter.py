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
from core.defenses.tsbd import TSBDConfig, tsbd_repair
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


@pytest.fixture(scope="module")
def badnets_digits(digits_split):
    """A 6-layer CNN (width 16) with a BadNets backdoor (10% of the training images, target 0) on 8x8 digits;
    the defender's 539 'clean' images, of which 2% (11) are replaced by poisoned ones; the mask of those."""
    train, test = digits_split
    attack = create_attack("badnets", target=0, image_shape=train.image_shape, seed=0)
    poisoned = poison_training_set(attack, train, 0.1, 10, seed=0)
    torch.manual_seed(1)
    model = train_classifier(small_cnn(1, 10), poisoned.data, NORM, epochs=15, lr=0.05, batch_size=64,
                             device="cpu", augment=False)
    mixed = poison_training_set(attack, test, 0.02, 10, seed=1)
    planted = np.zeros(len(test), dtype=bool)
    planted[mixed.poisoned_index] = True
    return model, test, mixed.data.subset(np.arange(len(test))), planted


def test_filter_drops_planted_poisoned_images_and_keeps_clean_ones(badnets_digits) -> None:
    """The planted images score above nearly every clean one and the rule drops almost no clean image. On
    these 8x8 images the planted ones' scores sit near the default cut of 3.5 (how many of the 11 pass it
    changed with the thread count while the score was being designed: 4 to 10), where on MNIST they sit far
    above it and all are dropped (BENCHMARKS.md §2.8); so the default rule is held to a few of them and to what
    it keeps, and the ranking is checked on its own."""
    model, clean, subset, planted = badnets_digits
    rt = runtime_for("cpu")
    res = filter_poisoned(model, subset, NORM, rt)
    k = int(planted.sum())
    clean_scores = res.scores[~planted]
    info = (np.sort(res.scores[planted]).round(1), np.quantile(clean_scores, [0.5, 0.9, 0.98]).round(1))
    assert res.scores[planted].min() > np.quantile(clean_scores, 0.9), info
    assert np.median(res.scores[planted]) > np.quantile(clean_scores, 0.98), info
    assert planted[np.argsort(-res.scores)[:k]].sum() >= k // 2, info
    assert (~res.keep[planted]).sum() >= 3 and (~res.keep[~planted]).sum() <= 0.02 * (~planted).sum(), info
    assert res.details["dropped"] == int((~res.keep).sum())
    assert set(res.details["dropped_index"]) == set(np.flatnonzero(~res.keep).tolist())
    assert res.details["dropped_per_class"]["0"] >= 3  # the planted images carry the target's label
    on_clean = filter_poisoned(model, clean, NORM, rt)  # the same subset without the planted images
    assert on_clean.details["fraction_dropped"] <= 0.02, on_clean.details


def test_tsbd_repair_filters_by_default_and_reports_it(badnets_digits) -> None:
    model, _, subset, planted = badnets_digits
    cfg = TSBDConfig(lr_unlearn=0.01, batch_size=128, augment=False, finetune_epochs=1, neuron_ratio=0.3,
                     unlearn_max_epochs=2)
    res = tsbd_repair(model, subset, NORM, cfg, "cpu", num_classes=10)
    filt = res.details["subset_filter"]
    assert filt["applied"] and filt["examined"] == len(subset) and filt["kept"] == len(subset) - filt["dropped"]
    assert filt["dropped"] <= 0.05 * len(subset)
    off = tsbd_repair(model, subset, NORM, cfg, "cpu", num_classes=10, subset_filter=None)
    assert off.details["subset_filter"] == {"applied": False}


def test_the_cap_bounds_what_one_filtering_drops(digits_split) -> None:
    train, test = digits_split
    model = tiny_cnn(seed=2).eval()  # untrained: its features say nothing, the cap must hold anyway
    cfg = SubsetFilterConfig(z_threshold=1.0, max_drop_ratio=0.05)
    res = filter_poisoned(model, test.subset(np.arange(200)), NORM, runtime_for("cpu"), cfg)
    assert res.details["dropped"] <= 10 and res.keep.sum() >= 190
    assert res.details["capped_at_max_drop_ratio"] is True


def test_a_conv_that_never_runs_is_left_out_of_the_features() -> None:
    """GoogLeNet's auxiliary heads never run in eval mode: their empty feature lists failed torch.cat, which
    failed every TSBD repair of a GoogLeNet (subset_filter is on by default)."""
    from core.data.imageset import ImageSet
    from core.defenses.runtime import DeviceImages
    from core.defenses.subset_filter import conv_features

    class WithDeadHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.dead = torch.nn.Conv2d(4, 4, 1)  # registered, never called
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    rt = runtime_for("cpu")
    images = ImageSet(np.zeros((6, 8, 8, 1), np.uint8), np.arange(6) % 2)
    feats = conv_features(WithDeadHead().eval(), DeviceImages(images, NORM, rt))
    assert [tuple(f.shape) for f in feats] == [(6, 4), (6, 4)]
