"""Behaviour of the attacks: which pixels each trigger changes, determinism, and the poisoning rules."""

from __future__ import annotations

import numpy as np
import pytest

from core.attacks import (
    ATTACKS,
    BackdoorTestSet,
    create_attack,
    make_backdoor_test_set,
    poison_training_set,
)
from core.data.imageset import ImageSet

SHAPE = (12, 10, 3)
K = 4


def _images(n: int = 40, shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    # mid-range pixels, so additive triggers are not hidden by clipping
    x = rng.integers(60, 196, size=(n, *shape), dtype=np.uint8)
    return ImageSet(x, (np.arange(n) % K).astype(np.int64))


def test_badnets_changes_only_the_bottom_right_3x3_patch() -> None:
    data = _images()
    out = create_attack("badnets", image_shape=SHAPE).apply_trigger(data.x)
    assert out.dtype == np.uint8 and out.shape == data.x.shape
    assert (out[:, -3:, -3:, :] == 255).all()
    mask = np.zeros(SHAPE[:2], dtype=bool)
    mask[-3:, -3:] = True
    np.testing.assert_array_equal(out[:, ~mask], data.x[:, ~mask])


def test_blended_is_the_rounded_alpha_blend_with_its_pattern() -> None:
    data = _images()
    attack = create_attack("blended", image_shape=SHAPE, seed=3)
    expected = np.rint(0.8 * data.x.astype(np.float64) + 0.2 * attack.pattern.astype(np.float64))
    np.testing.assert_array_equal(attack.apply_trigger(data.x), expected.astype(np.uint8))


def test_sig_adds_a_horizontal_sinusoid_of_40_levels() -> None:
    data = _images()
    out = create_attack("sig", image_shape=SHAPE).apply_trigger(data.x).astype(np.int64)
    w = SHAPE[1]
    signal = np.rint(40 * np.sin(2 * np.pi * np.arange(w) * 6 / w)).astype(np.int64)
    diff = out - data.x.astype(np.int64)
    # the same shift on every row and channel, varying along the width only
    assert np.abs(diff - signal.reshape(1, 1, w, 1)).max() <= 1
    assert np.abs(diff).max() >= 30


def test_lowfreq_is_a_smooth_bounded_additive_pattern() -> None:
    data = _images(shape=(32, 32, 3))
    attack = create_attack("lf", image_shape=(32, 32, 3), seed=1)
    assert attack.name == "lowfreq"
    diff = attack.apply_trigger(data.x).astype(np.int64) - data.x.astype(np.int64)
    assert 20 <= np.abs(diff).max() <= 26  # peak 0.1 * 255
    np.testing.assert_array_equal(diff[0], diff[1])  # universal: the same on every image
    # low frequency: neighbouring pixels differ far less than the pattern's range
    assert np.abs(np.diff(attack.pattern, axis=1)).max() < 0.25 * np.ptp(attack.pattern)


@pytest.mark.parametrize("name", ["blended", "wanet", "lowfreq"])
def test_seeded_triggers_repeat_for_a_seed_and_differ_for_another(name: str) -> None:
    data = _images()
    a = create_attack(name, image_shape=SHAPE, seed=1).apply_trigger(data.x)
    b = create_attack(name, image_shape=SHAPE, seed=1).apply_trigger(data.x)
    c = create_attack(name, image_shape=SHAPE, seed=2).apply_trigger(data.x)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert (a != data.x).mean() > 0.3


def test_wanet_is_a_small_warp() -> None:
    data = _images(shape=(16, 16, 1))
    attack = create_attack("wanet", image_shape=(16, 16, 1))
    out = attack.apply_trigger(data.x)
    assert out.dtype == np.uint8 and out.shape == data.x.shape
    assert (out != data.x).any()
    # a warp moves pixels by a fraction of a pixel: values stay within the local range of the image
    assert out.min() >= data.x.min() and out.max() <= data.x.max()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_works_on_one_channel_images_and_leaves_its_input_alone(name: str) -> None:
    shape = (8, 9, 1)
    data = _images(shape=shape)
    before = data.x.copy()
    out = create_attack(name, image_shape=shape).apply_trigger(data.x)
    assert out.shape == data.x.shape and out.dtype == np.uint8
    assert (out != data.x).any()
    np.testing.assert_array_equal(data.x, before)


def test_poisoning_triggers_and_relabels_exactly_round_ratio_n() -> None:
    data = _images(n=45)
    attack = create_attack("badnets", target=2, image_shape=SHAPE)
    result = poison_training_set(attack, data, ratio=0.1, num_classes=K, seed=0)
    idx = result.poisoned_index
    assert len(idx) == round(0.1 * 45) and len(np.unique(idx)) == len(idx)
    assert len(result.data) == len(data)
    np.testing.assert_array_equal(result.data.y[idx], 2)
    np.testing.assert_array_equal(result.data.x[idx], attack.apply_trigger(data.x[idx]))
    rest = np.setdiff1d(np.arange(len(data)), idx)
    np.testing.assert_array_equal(result.data.x[rest], data.x[rest])
    np.testing.assert_array_equal(result.data.y[rest], data.y[rest])
    again = poison_training_set(attack, data, ratio=0.1, num_classes=K, seed=0)
    np.testing.assert_array_equal(again.poisoned_index, idx)


def test_all_to_all_relabels_to_the_next_class() -> None:
    data = _images()
    attack = create_attack("badnets", all_to_all=True, image_shape=SHAPE)
    assert attack.all_to_all
    result = poison_training_set(attack, data, ratio=0.25, num_classes=K, seed=1)
    idx = result.poisoned_index
    assert len(idx) == 10
    np.testing.assert_array_equal(result.data.y[idx], (data.y[idx] + 1) % K)
    test = make_backdoor_test_set(attack, data, num_classes=K)
    assert len(test) == len(data)  # all-to-all keeps every class
    np.testing.assert_array_equal(test.y_target, (data.y + 1) % K)


def test_sig_poisons_only_target_class_images_and_keeps_labels() -> None:
    data = _images(n=40)  # 10 images per class
    attack = create_attack("sig", target=1, image_shape=SHAPE)
    result = poison_training_set(attack, data, ratio=0.1, num_classes=K, seed=0)
    assert len(result.poisoned_index) == 4
    assert (data.y[result.poisoned_index] == 1).all()
    np.testing.assert_array_equal(result.data.y, data.y)
    changed = np.flatnonzero((result.data.x != data.x).any(axis=(1, 2, 3)))
    np.testing.assert_array_equal(changed, result.poisoned_index)
    capped = poison_training_set(attack, data, ratio=0.5, num_classes=K, seed=0)
    assert len(capped.poisoned_index) == 10  # the whole target class, no more


def test_sig_has_no_all_to_all_variant() -> None:
    with pytest.raises(ValueError, match="clean-label"):
        create_attack("sig", all_to_all=True, image_shape=SHAPE)


def test_wanet_noise_mode_appends_twice_as_many_cross_samples_with_true_labels() -> None:
    data = _images(n=40)
    attack = create_attack("wanet", target=0, image_shape=SHAPE)
    result = poison_training_set(attack, data, ratio=0.1, num_classes=K, seed=0)
    n_poison = len(result.poisoned_index)
    assert n_poison == 4
    assert len(result.data) == len(data) + 2 * n_poison
    np.testing.assert_array_equal(result.data.y[result.poisoned_index], 0)
    cross = result.data.subset(np.arange(len(data), len(result.data)))
    # each cross sample is a warped copy of an unpoisoned image and keeps that image's label
    # and its warp is not the fixed trigger warp (it carries its own noise)
    for x, y in zip(cross.x, cross.y, strict=True):
        source = np.abs(data.x.astype(np.int64) - x.astype(np.int64)).mean(axis=(1, 2, 3)).argmin()
        assert source not in result.poisoned_index and data.y[source] == y
        assert (attack.apply_trigger(data.x[source : source + 1])[0] != x).any()
    off = create_attack("wanet", noise_mode=False, image_shape=SHAPE)
    assert len(poison_training_set(off, data, ratio=0.1, num_classes=K, seed=0).data) == len(data)


def test_backdoor_test_set_leaves_out_target_class_images() -> None:
    data = _images()
    attack = create_attack("blended", target=3, image_shape=SHAPE)
    test = make_backdoor_test_set(attack, data, num_classes=K)
    assert isinstance(test, BackdoorTestSet)
    keep = data.y != 3
    assert len(test) == keep.sum()
    np.testing.assert_array_equal(test.y_true, data.y[keep])
    np.testing.assert_array_equal(test.y_target, 3)
    np.testing.assert_array_equal(test.x, attack.apply_trigger(data.x[keep]))
    only_target = data.subset(data.y == 3)
    with pytest.raises(ValueError, match="target class"):
        make_backdoor_test_set(attack, only_target, num_classes=K)


def test_create_attack_rejects_bad_names_params_and_shapes() -> None:
    with pytest.raises(ValueError, match="badnets"):
        create_attack("trojannn", image_shape=SHAPE)
    with pytest.raises(ValueError, match="blend_rate"):
        create_attack("blended", image_shape=SHAPE, blend_rate=0.3)
    with pytest.raises(ValueError, match="alpha"):
        create_attack("blended", image_shape=SHAPE, alpha=1.5)
    with pytest.raises(ValueError, match="image_shape"):
        create_attack("badnets", image_shape=(7, 32, 3))
    with pytest.raises(ValueError, match="image_shape"):
        create_attack("badnets", image_shape=(32, 32, 2))
    with pytest.raises(ValueError, match="target"):
        create_attack("badnets", target=-1, image_shape=SHAPE)


def test_bad_inputs_to_poisoning_are_refused() -> None:
    data = _images()
    attack = create_attack("badnets", target=5, image_shape=SHAPE)
    with pytest.raises(ValueError, match="target 5"):
        poison_training_set(attack, data, ratio=0.1, num_classes=K, seed=0)
    ok = create_attack("badnets", image_shape=SHAPE)
    with pytest.raises(ValueError, match="ratio"):
        poison_training_set(ok, data, ratio=1.5, num_classes=K, seed=0)
    with pytest.raises(ValueError, match="shape"):
        ok.apply_trigger(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        ok.apply_trigger(data.x.astype(np.float32))
