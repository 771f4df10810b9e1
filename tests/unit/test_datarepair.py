"""core/datarepair: harm scores rank planted harmful samples first, the separation keeps relabelled inputs,
parameters are checked, non-finite scores raise, memory stays bounded with the training set's size."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.datarepair.identify import IdentifyConfig, checkpoint_epochs, identify
from core.datarepair.registry import (
    DATA_REPAIR_METHODS,
    DEFAULT_DATA_REPAIR_METHOD,
    default_params,
    repair_data,
    validate_params,
)
from core.datarepair.repair import complementary_loss, kept_set
from core.datarepair.separate import relabel_threshold, separate
from core.defenses.runtime import runtime_for
from core.metrics import accuracy, predict
from core.progress import Progress
from core.training import train_classifier

NORM = Normalization()
FAST = {"calib_epochs": 4, "calib_augment": False, "epochs": 3, "augment": False}


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 32), nn.ReLU(),
                         nn.Linear(32, 10))


@pytest.fixture(scope="module")
def noisy_digits() -> dict[str, object]:
    """8x8 digits: 600 training images with 25% of the labels flipped, a clean set of 300, a test set."""
    torch.set_num_threads(1)
    d = load_digits()
    x = (d.images * 255 / 16).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    tr, cl, te = order[:600], order[600:900], order[900:]
    noisy = y[tr].copy()
    bad = rng.random(len(tr)) < 0.25
    noisy[bad] = (noisy[bad] + rng.integers(1, 10, bad.sum())) % 10
    training = ImageSet(x[tr], noisy)
    model = train_classifier(tiny_net(), training, NORM, 25, 0.05, 64, "cpu", augment=False)
    return {"model": model, "training": training, "clean": ImageSet(x[cl], y[cl]), "test": ImageSet(x[te], y[te]),
            "bad": bad, "true": y[tr]}


@pytest.mark.parametrize("scorer", ["loss", "tracin"])
def test_scores_rank_planted_label_noise_first(noisy_digits: dict, scorer: str) -> None:
    cfg = IdentifyConfig(scorer=scorer, calib_epochs=4, calib_augment=False)
    ident = identify(noisy_digits["model"], noisy_digits["training"], noisy_digits["clean"], NORM, cfg,
                     runtime_for("cpu"), 10, Progress())
    bad = noisy_digits["bad"]
    assert roc_auc_score(bad, ident.scores) > (0.95 if scorer == "loss" else 0.75)
    assert ident.scores.dtype == np.float64 and np.isfinite(ident.scores).all()
    # the null threshold flags mostly planted samples, without being told how many there are
    assert ident.flagged.sum() > 0.5 * bad.sum()
    assert (bad & ident.flagged).sum() / ident.flagged.sum() > (0.8 if scorer == "loss" else 0.5)
    assert ident.details["null_flag_rate"] <= 1 - cfg.null_quantile + 0.01


def test_retain_repairs_and_reports_every_sample(noisy_digits: dict) -> None:
    training, test = noisy_digits["training"], noisy_digits["test"]
    model = noisy_digits["model"]
    before = accuracy(predict(model, test.x, NORM), test.y)
    first_weight = next(model.parameters()).detach().clone()
    result = repair_data("retain", model, training, noisy_digits["clean"], NORM, FAST, "cpu", 10, seed=0)
    assert torch.equal(next(model.parameters()), first_weight)  # the input model is left untouched
    n = len(training)
    assert result.scores.shape == (n,) and result.flagged.dtype == bool and result.new_labels.dtype == np.int64
    relab = result.flagged & (result.new_labels >= 0) & (result.new_labels != training.y)
    assert result.details["n_relabelled"] == relab.sum() > 0
    assert result.details["n_dropped"] == (result.new_labels == -1).sum()
    assert (result.new_labels[~result.flagged] == training.y[~result.flagged]).all()
    # relabelled samples mostly get their true label back
    assert (result.new_labels[relab] == noisy_digits["true"][relab]).mean() > 0.85
    assert result.params["relabel_precision"] == 0.9 and result.params["scorer"] == "loss"  # defaults filled
    assert "total" in result.timings
    after = accuracy(predict(result.model, test.x, NORM), test.y)
    assert after > before + 0.02


def test_separation_keeps_the_inputs_of_relabelled_samples() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    y = np.array([0, 1, 2, 3])
    probs = np.array([[0.05, 0.95, 0, 0], [0.3, 0.3, 0.2, 0.2], [0.02, 0.02, 0.94, 0.02], [0.9, 0.0, 0.05, 0.05]],
                     dtype=np.float32)
    flagged = np.array([True, True, True, False])
    clean_probs = np.tile(np.eye(4, dtype=np.float32) * 0.6 + 0.1, (5, 1))  # 20 confident (0.7) correct ones
    sep = separate(flagged, y, probs, clean_probs, np.tile(np.arange(4), 5), 0.9, 4)
    assert sep.new_labels.tolist() == [1, -1, 2, 3]  # relabelled, dropped, confirmed, untouched
    assert sep.relabelled.tolist() == [True, False, False, False] and sep.confirmed[2] and sep.dropped[1]
    assert not sep.unlearn[1]  # dropped, but its given label (0.3) is not less likely than chance (0.25)
    kept = kept_set(ImageSet(x, y), sep.new_labels)
    assert len(kept) == 3
    assert np.array_equal(kept.x[0], x[0]) and kept.y[0] == 1  # the input kept, the label replaced


def test_unlearn_only_labels_less_likely_than_chance() -> None:
    probs = np.array([[0.5, 0.5], [0.1, 0.9]], dtype=np.float32)
    clean = np.tile(np.array([[0.99, 0.01], [0.01, 0.99]], dtype=np.float32), (10, 1))
    sep = separate(np.array([True, True]), np.array([0, 0]), probs, clean, np.tile([0, 1], 10), 1.0, 2)
    assert sep.relabelled.tolist() == [False, False]  # 0.9 < the threshold 0.99 needed for precision 1.0
    assert sep.unlearn.tolist() == [False, True]  # p(y=0) = 0.5 is chance, 0.1 is below


def test_relabel_threshold_reaches_the_precision_on_the_clean_set() -> None:
    conf = np.linspace(0.5, 1.0, 100)
    probs = np.stack([conf, 1 - conf], 1)  # always predicts class 0
    y = np.zeros(100, dtype=np.int64)
    y[:50] = 1  # the 50 least confident predictions are wrong
    tau = relabel_threshold(probs, y, 0.9)
    kept = conf >= tau
    assert (probs[kept].argmax(1) == y[kept]).mean() >= 0.9 and kept.sum() == 55  # 50 right + 5 wrong
    assert relabel_threshold(probs, np.ones(100, dtype=np.int64), 0.9) == float("inf")


def test_complementary_loss_is_bounded() -> None:
    logits = torch.tensor([[100.0, -100.0], [0.0, 0.0]])
    loss = complementary_loss(logits, torch.tensor([0, 0]))
    assert torch.isfinite(loss) and loss <= -np.log(1e-4)


def test_checkpoints_end_at_the_calibrated_model() -> None:
    assert checkpoint_epochs(10, 3) == [0, 5, 10]
    assert checkpoint_epochs(10, 1) == [10]


def test_params_are_validated_and_named() -> None:
    assert DEFAULT_DATA_REPAIR_METHOD in DATA_REPAIR_METHODS
    assert {"retain", "drop_flagged", "erase_flagged", "retrain_without", "finetune_clean"} <= set(DATA_REPAIR_METHODS)
    with pytest.raises(ValueError, match="unknown data-repair method 'nope'"):
        validate_params("nope", {})
    for params, where in (({"lr": -1.0}, "lr"), ({"scorer": "magic"}, "scorer"), ({"null_quantile": 1.0},
                          "null_quantile"), ({"epochs": 2.5}, "epochs"), ({"bogus": 1}, "bogus"),
                          ({"folds": 1}, "folds")):
        with pytest.raises(ValidationError) as err:
            validate_params("retain", params)
        assert err.value.errors()[0]["loc"] == (where,)
    with pytest.raises(ValidationError):
        validate_params("finetune_clean", {"scorer": "loss"})  # it does not identify
    assert validate_params("retain", {"scorer": "tracin", "lr": 0.02}) == {"scorer": "tracin", "lr": 0.02}
    for method, entry in DATA_REPAIR_METHODS.items():  # every parameter has a default, and the defaults are valid
        defaults = default_params(method)
        assert set(defaults) == set(entry.param_types)
        validate_params(method, defaults)


def test_bad_data_is_refused_before_work(noisy_digits: dict) -> None:
    training, clean, model = noisy_digits["training"], noisy_digits["clean"], noisy_digits["model"]
    with pytest.raises(ValueError, match=r"training labels must lie in \[0, 5\)"):
        repair_data("retain", model, training, clean, NORM, {}, "cpu", 5)
    wide = ImageSet(np.zeros((3, 9, 9, 1), np.uint8), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="training images are"):
        repair_data("retain", model, wide, clean, NORM, {}, "cpu", 10)
    headless = nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())
    with pytest.raises(ValueError, match="nn.Linear"):
        repair_data("retain", headless, training, clean, NORM, {}, "cpu", 10)


def test_non_finite_scores_raise_and_name_the_cause(noisy_digits: dict) -> None:
    broken = tiny_net()
    with torch.no_grad():
        broken[-1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="harm scores are not finite"):
        repair_data("retain", broken, noisy_digits["training"], noisy_digits["clean"], NORM, FAST, "cpu", 10)


@pytest.mark.parametrize("method", ["drop_flagged", "erase_flagged", "retrain_without", "finetune_clean"])
def test_baselines_run_and_report(noisy_digits: dict, method: str) -> None:
    params = {"finetune_clean": {"epochs": 2, "augment": False},
              "erase_flagged": {"calib_epochs": 2, "epochs": 2, "augment": False},
              "retrain_without": {"calib_epochs": 2, "retrain_epochs": 15, "retrain_augment": False},
              "drop_flagged": {"calib_epochs": 2, "epochs": 2, "augment": False}}[method]
    training = noisy_digits["training"]
    result = repair_data(method, noisy_digits["model"], training, noisy_digits["clean"], NORM, params, "cpu", 10)
    assert result.method == method and result.scores.shape == (len(training),)
    if method == "finetune_clean":
        assert not result.flagged.any() and (result.new_labels == training.y).all()
    else:
        assert result.flagged.any() and (result.new_labels[result.flagged] == -1).all()
    assert accuracy(predict(result.model, noisy_digits["test"].x, NORM), noisy_digits["test"].y) > 0.5


def _kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def test_scoring_memory_is_bounded_in_the_training_set_size() -> None:
    """20,000 training images and a 270k-parameter model: an N x P gradient matrix would be 21 GB; the streamed
    head gradients stay within a few hundred MB."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    assert sum(p.numel() for p in model.parameters()) > 250_000
    rng = np.random.default_rng(0)
    training = ImageSet(rng.integers(0, 256, (20_000, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, 20_000))
    clean = ImageSet(rng.integers(0, 256, (100, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, 100))
    Path("/proc/self/clear_refs").write_text("5")
    before = _kib("VmRSS")
    ident = identify(model, training, clean, NORM, IdentifyConfig(calib_epochs=1, checkpoints=2,
                     calib_augment=False), runtime_for("cpu"), 10, Progress())
    growth_mb = (_kib("VmHWM") - before) / 1024
    assert np.isfinite(ident.scores).all() and len(ident.scores) == 20_000
    assert growth_mb < 400, growth_mb


class _Sink:
    def __init__(self, stop_after: int | None = None) -> None:
        self.reports: list[tuple[str, float]] = []
        self.stop_after = stop_after

    def report(self, stage: str, fraction: float, timings: object) -> None:
        self.reports.append((stage, fraction))

    def stop_reason(self) -> str | None:
        return "canceled" if self.stop_after is not None and len(self.reports) >= self.stop_after else None


def test_progress_goes_through_the_stages_and_stops_when_asked(noisy_digits: dict) -> None:
    from core.progress import StopRequested

    sink = _Sink()
    args = (noisy_digits["model"], noisy_digits["training"], noisy_digits["clean"], NORM)
    repair_data("retain", *args, {**FAST, "calib_epochs": 2, "epochs": 1}, "cpu", 10, progress=Progress(sink))
    stages = [s for s, _ in sink.reports]
    assert [s for s in ("identify", "separate", "repair") if s in stages] == ["identify", "separate", "repair"]
    fractions = [f for _, f in sink.reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    with pytest.raises(StopRequested):
        repair_data("retain", *args, FAST, "cpu", 10, progress=Progress(_Sink(stop_after=3)))


@pytest.fixture(scope="module")
def poisoned_digits() -> dict[str, object]:
    """8x8 digits, 600 training images of which 10% carry a BadNets trigger relabelled to class 0."""
    from core.attacks.base import make_backdoor_test_set, poison_training_set
    from core.attacks.registry import create_attack

    torch.set_num_threads(1)
    d = load_digits()
    x = (d.images * 255 / 16).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    tr, cl, te = order[:600], order[600:900], order[900:]
    attack = create_attack("badnets", target=0, image_shape=(8, 8, 1))
    poisoned = poison_training_set(attack, ImageSet(x[tr], y[tr]), 0.1, 10, 0)
    bad = np.zeros(600, bool)
    bad[poisoned.poisoned_index] = True
    model = train_classifier(tiny_net(), poisoned.data, NORM, 25, 0.05, 64, "cpu", augment=False)
    test = ImageSet(x[te], y[te])
    return {"model": model, "training": poisoned.data, "clean": ImageSet(x[cl], y[cl]), "test": test, "bad": bad,
            "backdoor": make_backdoor_test_set(attack, test, 10)}


def _asr(model: nn.Module, backdoor: object) -> float:
    return float((predict(model, backdoor.x, NORM) == backdoor.y_target).mean())


def test_scratch_reference_flags_planted_backdoor_samples_and_retain_removes_the_backdoor(
        poisoned_digits: dict) -> None:
    """The fine-tuned reference keeps the backdoor (poisoned samples score low); the from-scratch one does not."""
    p = poisoned_digits
    without = identify(p["model"], p["training"], p["clean"], NORM, IdentifyConfig(
        calib_epochs=4, calib_augment=False, scratch_reference=False, input_quality=False), runtime_for("cpu"), 10,
        Progress())
    ident = identify(p["model"], p["training"], p["clean"], NORM, IdentifyConfig(
        calib_epochs=4, calib_augment=False), runtime_for("cpu"), 10, Progress())
    bad = p["bad"]
    assert roc_auc_score(bad, without.scores) < 0.5  # the blind spot: the backdoored copy fits its poison
    assert roc_auc_score(bad, ident.scores) > 0.85
    assert (bad & ident.flagged).sum() > 0.5 * bad.sum()
    assert ident.reference is not None and ident.reference[bad & ident.flagged].mean() > 0.9  # scratch raised them
    assert ident.details["null_flag_rate"] <= 1 - 0.95 + 0.01
    before = _asr(p["model"], p["backdoor"])
    result = repair_data("retain", p["model"], p["training"], p["clean"], NORM, FAST,
                         "cpu", 10, seed=0)
    assert before > 0.8 and _asr(result.model, p["backdoor"]) < 0.5 * before


def test_separation_uses_the_flagging_reference_and_can_require_every_reference_to_unlearn() -> None:
    """Sample 0 was flagged by the scratch reference (1): relabelled with its probabilities and threshold although
    the fine-tuned reference "confirms" it; sample 1 is dropped and unlearned only if both find y < chance."""
    y = np.array([0, 0])
    fine = np.array([[0.99, 0.01], [0.6, 0.4]], dtype=np.float32)
    scratch = np.array([[0.05, 0.95], [0.4, 0.6]], dtype=np.float32)
    reference = np.array([1, 1])
    composite = np.where(reference[:, None] == 1, scratch, fine)
    clean_y = np.tile([0, 1], 10)
    clean_fine = np.tile(np.array([[0.99, 0.01], [0.01, 0.99]], dtype=np.float32), (10, 1))
    clean_scratch = np.tile(np.array([[0.1, 0.9], [0.1, 0.9]], dtype=np.float32), (10, 1))  # 50% right at 0.9
    clean_scratch[::2] = [0.9, 0.1]  # right on every class-0 sample at 0.9 as well: precision 1.0 from 0.9 on
    flagged = np.array([True, True])
    sep = separate(flagged, y, composite, clean_fine, clean_y, 0.9, 2, reference, [clean_fine, clean_scratch])
    assert sep.new_labels.tolist() == [1, -1] and sep.unlearn.tolist() == [False, True]
    strict = separate(flagged, y, composite, clean_fine, clean_y, 0.9, 2, reference, [clean_fine, clean_scratch],
                      [fine, scratch])
    assert strict.new_labels.tolist() == [1, -1] and strict.unlearn.tolist() == [False, False]


def test_images_too_small_for_the_input_statistics_skip_that_reference_and_still_repair() -> None:
    """input_quality is on by default; 3x3 images cannot be measured by it (a 3x3 noise mask, four frequency
    bands): the repair runs on the label references and says why the input reference was skipped."""
    rng = np.random.default_rng(0)
    training = ImageSet(rng.integers(0, 256, (60, 3, 3, 1), dtype=np.uint8), np.arange(60) % 4)
    clean = ImageSet(rng.integers(0, 256, (24, 3, 3, 1), dtype=np.uint8), np.arange(24) % 4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 4))
    result = repair_data("retain", model, training, clean, NORM, {**FAST, "calib_epochs": 1, "epochs": 1}, "cpu", 4)
    assert "too small for the input-quality statistics" in result.details["input_quality_test"]["skipped"]
    assert not result.input_flagged.any() and len(result.scores) == 60
