"""IAB and CLB on tiny models: each poisons a training set and its trigger fires on a test set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.attacks import make_backdoor_test_set
from core.attacks.clb import CLB, clb_poison_training_set
from core.attacks.iab import IAB, IABConfig, train_iab
from core.attacks.registry import ATTACKS, TRAINED_ATTACKS, create_attack
from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.metrics import evaluate
from core.training import train_classifier

NORM = Normalization((0.5,), (0.5,))


def _digits() -> tuple[ImageSet, ImageSet]:
    from cli.demo import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d))
    return d.subset(np.sort(order[:1300])), d.subset(np.sort(order[1300:]))


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10))


def test_clb_stamps_the_checkerboard_in_four_corners_only() -> None:
    x = np.full((2, 8, 8, 3), 100, dtype=np.uint8)
    out = create_attack("clb", image_shape=(8, 8, 3)).apply_trigger(x)
    board = np.array([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=np.uint8)
    for r in (slice(0, 3), slice(5, 8)):
        for c in (slice(0, 3), slice(5, 8)):
            assert (out[:, r, c, :] == board[None, :, :, None]).all()
    assert (out[:, 3:5, :, :] == 100).all() and (out[:, :, 3:5, :] == 100).all()
    with pytest.raises(ValueError, match="no all-to-all"):
        CLB(image_shape=(8, 8, 3), all_to_all=True)


def test_clb_poisons_target_images_with_pgd_and_its_trigger_fires() -> None:
    train, test = _digits()
    surrogate = train_classifier(_cnn(1), train, NORM, 5, 0.05, 64, "cpu", augment=False)
    attack = CLB(image_shape=train.image_shape, target=0)
    poisoned = clb_poison_training_set(attack, train, 0.1, 10, 0, surrogate, NORM)
    idx = poisoned.poisoned_index
    assert len(idx) > 0 and (train.y[idx] == 0).all()  # clean-label: only target images, labels kept
    np.testing.assert_array_equal(poisoned.data.y, train.y)
    rest = np.setdiff1d(np.arange(len(train)), idx)
    np.testing.assert_array_equal(poisoned.data.x[rest], train.x[rest])
    # the centre (outside the corner patches) moved by at most eps = 8/255 and not nowhere
    centre = (slice(None), slice(3, 5), slice(3, 5))
    delta = np.abs(poisoned.data.x[idx][centre].astype(int) - train.x[idx][centre].astype(int))
    assert delta.max() <= 9 and delta.max() > 0
    model = train_classifier(_cnn(0), poisoned.data, NORM, 12, 0.05, 64, "cpu", augment=False)
    ev = evaluate(model, test, make_backdoor_test_set(attack, test, 10), NORM)
    assert ev.acc > 0.8 and ev.asr > 0.5, ev


def test_iab_trains_a_generator_whose_triggers_fire_and_differ_per_input() -> None:
    train, test = _digits()
    train16 = ImageSet(np.kron(train.x, np.ones((1, 2, 2, 1), dtype=np.uint8)), train.y)
    test16 = ImageSet(np.kron(test.x, np.ones((1, 2, 2, 1), dtype=np.uint8)), test.y)

    def cnn16() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(32 * 16, 10))

    # a larger backdoored share than BackdoorBench's 0.1 so that 10 epochs of a tiny model learn it
    model, attack = train_iab(cnn16(), train16, NORM, target=0, epochs=10, lr=0.05, batch_size=64, device="cpu",
                              mask_epochs=2, config=IABConfig(p_attack=0.3))
    assert isinstance(attack, IAB) and TRAINED_ATTACKS["iab"] is train_iab and "iab" not in ATTACKS
    backdoor = make_backdoor_test_set(attack, test16, 10)
    ev = evaluate(model, test16, backdoor, NORM)
    assert ev.acc > 0.8 and ev.asr > 0.6, ev
    # input-aware: two different inputs receive different triggers
    diff = backdoor.x.astype(int) - test16.x[test16.y != 0].astype(int)
    assert np.abs(diff[0] - diff[1]).sum() > 0
    # a trigger-free IAB refuses to pretend
    with pytest.raises(ValueError, match="no trained generator"):
        IAB(image_shape=(16, 16, 1)).apply_trigger(test16.x[:2])
