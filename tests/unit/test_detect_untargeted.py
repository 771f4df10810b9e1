"""The untargeted (all-to-all) test: its score and p-value equal their formulas, its objective is
``-log(1 - p_y)``, it reuses the targeted search of the same scan, and on tiny models of real digits it finds a
planted all-to-all patch (a permutation of labels) while a clean model is not flagged."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from core.attacks import create_attack, poison_training_set
from core.detect import ConfigError, DetectConfig, scan_model
from core.detect.inversion import Untargeted
from core.detect.stats import _null_maxima, outlier_p_value
from core.detect.untargeted import untargeted_p_value, untargeted_score
from core.training import train_classifier
from tests.unit.test_detect import FAST, NORM, _clean, _digits16, _model, _tiny_cnn

UT = {**FAST, "detectors": ("neural_cleanse", "untargeted"), "voting_detectors": ("untargeted",)}


@functools.cache
def _a2a_model() -> torch.nn.Module:
    """BadNets all-to-all (``y -> y + 1``) on the 16x16 digits (30% poisoned: one small net must learn ten
    source-dependent answers to one patch; at 10% its ASR stays ~0.4)."""
    train, _ = _digits16()
    attack = create_attack("badnets", image_shape=train.image_shape, target=0, all_to_all=True)
    train = poison_training_set(attack, train, 0.3, 10, 0).data
    return train_classifier(_tiny_cnn(0), train, NORM, epochs=20, lr=0.05, batch_size=64, device="cpu",
                            augment=False, seed=0)


def test_untargeted_score_puts_u_in_place_of_the_smallest_class() -> None:
    sizes = [3.0, 3.2, 2.9, 3.1, 3.3, 5.0, 3.0, 3.05, 3.15, 2.5]
    others = sorted(sizes)[1:-1]  # the smallest (2.5, replaced by u) and the largest (5.0) left out
    expected = (np.mean(others) - 1.0) / np.std(others, ddof=1)
    assert untargeted_score(1.0, sizes) == pytest.approx(expected)
    p, score = untargeted_p_value(1.0, sizes)
    null = _null_maxima(10).numpy()
    assert score == pytest.approx(expected)
    assert p == pytest.approx((1 + np.sum(null >= expected)) / (1 + len(null)))
    assert p < 0.001
    # u as large as the smallest class: exactly the targeted outlier test's evidence, nothing more
    assert untargeted_p_value(2.5, sizes)[0] == outlier_p_value(sizes)[0]
    assert untargeted_p_value(4.0, sizes)[0] == 1.0  # u above the others: no evidence
    assert untargeted_p_value(1.0, [1.0, 2.0, 3.0])[0] == 1.0  # too few classes to estimate a spread


def test_untargeted_p_value_holds_its_level_when_u_is_the_smallest_class() -> None:
    """Under its null (``u`` drawn like the smallest of K normal class sizes) at most ~5% fall below 0.05."""
    rng = np.random.default_rng(3)
    ps = []
    for _ in range(600):
        v = list(rng.normal(0.0, 1.0, 10))
        ps.append(untargeted_p_value(min(v), v)[0])
    assert np.mean(np.array(ps) < 0.05) < 0.065


def test_the_untargeted_objective_is_the_cross_entropy_of_not_the_true_label() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0], [0.5, 0.0, 2.0]])
    labels = torch.tensor([0, 2])  # two triggers x two images, trigger-major
    loss, success = Untargeted().loss_success(logits, labels, 2)
    p = logits.softmax(1)
    y = torch.tensor([0, 2, 0, 2])
    per = -torch.log(1 - p[torch.arange(4), y])
    assert loss.tolist() == pytest.approx([per[:2].mean().item(), per[2:].mean().item()])
    assert success.tolist() == [0.5, 0.0]  # image 2 answers 1 (not its 2); images 3, 4 answer their labels


def test_the_targeted_search_runs_once_per_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    import core.detect.neural_cleanse as nc

    calls = []
    real = nc.smallest_triggers
    monkeypatch.setattr(nc, "smallest_triggers", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = DetectConfig(**{**UT, "nc_steps": 5})
    res = scan_model(_model(None), _clean(), NORM, cfg, "cpu", 10)
    assert len(calls) == 1  # Neural Cleanse's search, reused by the untargeted test
    fam = res.detectors["untargeted"].details["families"]["patch"]
    assert fam["targeted_sizes"] == res.detectors["neural_cleanse"].per_class
    # alone, the untargeted test runs the targeted search itself
    alone = DetectConfig(**{**UT, "nc_steps": 5, "detectors": ("untargeted",)})
    assert scan_model(_model(None), _clean(), NORM, alone, "cpu", 10).detectors["untargeted"].details[
        "families"]["patch"]["targeted_sizes"] == fam["targeted_sizes"]


def test_the_untargeted_test_finds_a_planted_all_to_all_patch() -> None:
    res = scan_model(_a2a_model(), _clean(), NORM, DetectConfig(**UT), "cpu", 10)
    ut = res.detectors["untargeted"]
    fam = ut.details["families"]["patch"]
    assert ut.flagged and res.verdict in ("suspicious", "backdoored"), fam
    assert fam["untargeted_size"] < fam["smallest_targeted_size"]
    # the map is the planted shift y -> y + 1 for most sources: a permutation, not one sink class
    shifted = sum(m["to"] == (int(s) + 1) % 10 for s, m in fam["mapping"].items())
    assert shifted >= 6 and fam["distinct_targets"] >= 6, fam["mapping"]
    assert ut.details["suspected_mapping"] and set(res.trigger_images) == set(ut.suspected_targets)
    # no dominant label: the verdict's all-to-all rule fires too, with the map's distinct labels as targets
    assert ut.details["no_dominant_label"] and ut.details["spread_targets"] == fam["distinct_targets"]
    assert ut.details["spread_limit"] == 5.0 and any("no dominant label" in r for r in res.evidence["reasons"])
    assert set(ut.suspected_targets) <= set(res.suspected_targets)
    # every source's answers are counted: the modal one is the map's target
    for s, m in fam["mapping"].items():
        assert len(m["answers"]) == 10 and m["answers"][int(s)] == 0
        assert m["to"] == int(np.argmax(m["answers"])) or sum(m["answers"]) == 0


def test_a_clean_model_is_not_flagged_by_the_untargeted_test() -> None:
    res = scan_model(_model(None), _clean(), NORM, DetectConfig(**UT), "cpu", 10)
    ut = res.detectors["untargeted"]
    fam = ut.details["families"]["patch"]
    assert not ut.flagged and res.verdict == "clean", fam
    assert fam["ratio_to_smallest"] > 1.0  # the easiest class's own images must be moved too
    assert ut.suspected_targets == [] and res.trigger_images == {}
    assert not ut.details["no_dominant_label"] and fam["distinct_targets"] <= 5, fam["mapping"]


def test_sizes_that_never_reached_the_target_success_give_no_evidence() -> None:
    """3 targeted steps: the classes never reach 99% success (their sizes are the start's), while the untargeted
    search (one trigger, the same steps) may; the comparison is void and p is 1 (unguarded, the benchmark's 3-step
    --tiny smoke run gave p 5e-5 on its clean models)."""
    cfg = DetectConfig(**{**UT, "nc_steps": 3})
    fam = scan_model(_model(None), _clean(), NORM, cfg, "cpu", 10).detectors["untargeted"].details["families"]["patch"]
    assert fam["targeted_classes_never_reaching_target_success"] and not fam["comparable"]
    assert fam["p_value"] == 1.0


def test_ut_families_are_checked() -> None:
    for bad in (("patch", "patch"), ("blur",), ()):
        with pytest.raises(ConfigError) as err:
            DetectConfig(ut_families=bad)
        assert err.value.field == "ut_families"
    assert DetectConfig(ut_families=("additive", "patch")).ut_families == ("additive", "patch")
    assert math.isclose(DetectConfig().p_value, 0.05)
