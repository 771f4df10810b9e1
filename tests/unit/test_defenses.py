"""The repair-method registry: names, parameter checking, and every method end to end on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.baselines import FinePruningConfig, FinetuneConfig, fine_pruning, last_conv_layer
from core.defenses.registry import REPAIR_METHODS, repair, validate_params
from core.metrics import predict
from core.progress import Progress
from core.training import train_classifier
from tests.unit.test_progress import RecordingSink

NORM = Normalization()


def _digits() -> tuple[ImageSet, ImageSet]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * 16).clip(0, 255).astype(np.uint8)[..., None]
    return ImageSet(x, d.target.astype(np.int64)).split(0.3, seed=0)


@pytest.fixture(scope="module")
def model_and_clean() -> tuple[nn.Module, ImageSet]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    train, test = _digits()
    train_classifier(model, train, NORM, epochs=8, lr=0.05, batch_size=64, device="cpu", augment=False)
    return model, test.subset(np.arange(160))


def test_registry_lists_every_method() -> None:
    assert {"tsbd", "tsbd_fixed", "finetune", "fine_pruning"} <= set(REPAIR_METHODS)
    assert all(m.description for m in REPAIR_METHODS.values())


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("nope", {}, "unknown repair method 'nope'"),
        ("tsbd", {"lr_unlaern": 0.1}, "unknown parameter 'lr_unlaern'"),
        ("tsbd", {"neuron_ratio": 0.3}, "unknown parameter 'neuron_ratio'"),  # automatic: n is not an input
        ("tsbd_fixed", {"neuron_ratio": "0.3"}, r"\nneuron_ratio\b"),
        ("tsbd_fixed", {"finetune_epochs": 2.5}, r"\nfinetune_epochs\b"),
        ("tsbd_fixed", {"augment": 1}, r"\naugment\b"),
        ("finetune", {"epochs": True}, r"\nepochs\b"),
        ("fine_pruning", {"accuracy_drop_tolerance": None}, r"\naccuracy_drop_tolerance\b"),
        ("tsbd", {"auto_candidates": [0.1, "x"]}, r"\nauto_candidates\b"),
    ],
)
def test_bad_params_name_the_culprit(method: str, params: dict, message: str) -> None:
    """Unknown names get a message listing the valid ones; bad values are located at the parameter's name."""
    with pytest.raises(ValueError, match=message):
        validate_params(method, params)


def test_good_params_pass_and_lists_become_tuples() -> None:
    assert validate_params("tsbd", {"lr_unlearn": 1, "auto_candidates": [0.1, 0.2]}) == {
        "lr_unlearn": 1, "auto_candidates": (0.1, 0.2)}
    assert validate_params("fine_pruning", {"epochs": 3, "accuracy_drop_tolerance": 0.1})


def test_out_of_range_values_are_rejected(model_and_clean) -> None:
    model, clean = model_and_clean
    with pytest.raises(ValueError, match="neuron_ratio"):
        repair("tsbd_fixed", model, clean, NORM, {"neuron_ratio": 1.5}, "cpu", 10)


@pytest.mark.parametrize("method", ["tsbd", "tsbd_fixed", "finetune", "fine_pruning"])
def test_every_method_repairs_a_copy(model_and_clean, method: str) -> None:
    model, clean = model_and_clean
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sink = RecordingSink()
    params = {"finetune_epochs": 1} if method.startswith("tsbd") else {"epochs": 1}
    if method.startswith("tsbd"):
        params |= {"lr_unlearn": 0.01, "unlearn_margin": 0.05, "batch_size": 64, "augment": False}
    res = repair(method, model, clean, NORM, params, "cpu", num_classes=10, seed=1, progress=Progress(sink))
    assert res.method == method
    fractions = [f for _, f in sink.reports]
    assert res.timings["total"] > 0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert {"setup", "finetune"} <= set(res.timings) and "finetune" in {s for s, _ in sink.reports}
    new = res.model.state_dict()
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.isfinite(v.float()).all() for v in new.values())
    if method == "tsbd":
        assert res.chosen["neuron_ratio"] == res.params["neuron_ratio"]
        assert res.details["auto"]["sweep"]


def test_fine_pruning_keeps_pruned_channels_at_zero(model_and_clean) -> None:
    model, clean = model_and_clean
    cfg = FinePruningConfig(accuracy_drop_tolerance=0.5, finetune=FinetuneConfig(epochs=2, batch_size=64))
    res = fine_pruning(model, clean, NORM, cfg, "cpu")
    layer = last_conv_layer(model)
    assert layer == "3" and res.chosen["pruned_channels"] > 0
    conv = dict(res.model.named_modules())[layer]
    dead = (conv.weight.detach().flatten(1).abs().sum(1) == 0) & (conv.bias.detach() == 0)
    assert int(dead.sum()) == res.chosen["pruned_channels"]


def test_adaptive_sam_perturbation_has_the_right_size_and_direction() -> None:
    from core.defenses.ft_sam import adaptive_sam_perturbation

    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 4, generator=g)), nn.Parameter(torch.randn(5, generator=g))]
    grads = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    shifts = adaptive_sam_perturbation(params, grads, rho=2.0)
    # ||T^-1 e|| = rho with T = |w|, and e is T^2 g scaled (elementwise same sign as g)
    inv = torch.cat([(e / p.detach().abs()).flatten() for p, e in zip(params, shifts, strict=True)])
    assert float(inv.norm()) == pytest.approx(2.0, rel=1e-5)
    for p, e, gr in zip(params, shifts, grads, strict=True):
        ratio = e / (p.detach().abs().square() * gr)
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.flatten()[0])))
    assert adaptive_sam_perturbation(params, [None, grads[1]], 1.0)[0] is None


def test_ft_sam_runs_through_the_registry_and_keeps_clean_accuracy() -> None:
    from tests.unit.test_tsbd import NORM, digits, tiny_cnn

    train, test = digits()
    model = train_classifier(tiny_cnn(seed=2), train, NORM, epochs=6, lr=0.05, batch_size=64, device="cpu",
                             augment=False)
    before = (predict(model, test.x, NORM) == test.y).mean()
    res = repair("ft_sam", model, test.subset(np.arange(200)), NORM,
                 {"epochs": 3, "batch_size": 64, "augment": False}, "cpu", 10)
    after = (predict(res.model, test.x[200:], NORM) == test.y[200:]).mean()
    assert res.method == "ft_sam" and res.params["rho"] == 2.0 and res.params["epochs"] == 3
    assert after > before - 0.1 and "finetune" in res.timings
    with pytest.raises(ValueError, match="rho"):
        repair("ft_sam", model, test.subset(np.arange(50)), NORM, {"rho": -1.0}, "cpu", 10)


@pytest.mark.parametrize(("n", "batch_size", "sizes"), [
    (33, 32, [33]), (65, 32, [32, 33]), (64, 32, [32, 32]), (1, 32, [1]), (3, 1, [1, 1, 1]), (5, 2, [2, 3]),
])
def test_a_single_image_left_over_joins_the_batch_before_it(n: int, batch_size: int, sizes: list[int]) -> None:
    from core.defenses.runtime import DeviceImages, runtime_for

    images = ImageSet(np.zeros((n, 2, 2, 1), np.uint8), np.zeros(n, np.int64))
    data = DeviceImages(images, Normalization((0.0,), (1.0,)), runtime_for("cpu"))
    batches = list(data.batches(batch_size, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == sizes
    assert sorted(torch.cat(batches).tolist()) == list(range(n))


def test_fine_tuning_a_model_with_batch_norm_on_a_1x1_map_takes_33_images_in_batches_of_32() -> None:
    """Before: the last batch of one image failed batch norm's training ('Expected more than 1 value per channel
    when training'), so every repair of a torchvision ResNet on 33 32x32 images failed in the worker."""
    from core.defenses.runtime import DeviceImages, runtime_for, sgd_finetune

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    data = DeviceImages(ImageSet(np.zeros((33, 4, 4, 1), np.uint8), np.arange(33) % 2), Normalization((0.0,), (1.0,)),
                        runtime_for("cpu"))
    sgd_finetune(model, data, epochs=1, lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=32, augment=False, seed=0)
