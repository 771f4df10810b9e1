"""Architectures the benchmarks never used (SqueezeNet, MobileNetV3, ViT, Swin, VGG; docs/formats.md#architectures):
the repairs find the layers they mean on them, and refuse, naming the cause, where a method cannot apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.data.formats import DataLimits
from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.baselines import FinePruningConfig, FinetuneConfig, fine_pruning, last_conv_layer
from core.defenses.tsbd import NWC, TSBDConfig, covered_conv_layers, tsbd_repair, zero_masks
from core.inputs import InputError, _check_model_takes
from core.models.registry import create_model, shape_model
from core.spec import ScanSpec


@pytest.mark.parametrize(("architecture", "side"), [("torchvision.googlenet", 32), ("torchvision.inception_v3", 75)])
def test_models_with_auxiliary_heads_answer_plain_logits_in_training(architecture: str, side: int) -> None:
    """In training mode GoogLeNet and Inception v3 answered a namedtuple with their auxiliary logits, and every
    repair's cross-entropy failed on it with a TypeError (internal_error, after the upload was accepted); their
    state dict keeps the auxiliary heads, so uploads trained with them still load."""
    import torchvision

    model = create_model(architecture, 10, 3).train()
    reference = torchvision.models.get_model(architecture.removeprefix("torchvision."), weights=None, num_classes=10)
    assert model.state_dict().keys() == reference.state_dict().keys()
    out = model(torch.zeros(2, 3, side, side))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()


@pytest.mark.parametrize(("architecture", "layer"), [
    ("torchvision.squeezenet1_1", "features.12.expand3x3"),  # classifier.1 is the logits conv, after it no Linear
    ("torchvision.squeezenet1_0", "features.12.expand3x3"),
    ("resnet20", "layer3.2.conv2"),  # unchanged where the last conv is a feature layer
    ("torchvision.mobilenet_v3_small", "features.12.0"),
    ("vgg19_bn", "features.49"),
    ("torchvision.googlenet", "inception5b.branch4.1.conv"),  # not aux2.conv.conv: the auxiliary heads never run
])
def test_fine_pruning_prunes_the_last_feature_conv_never_the_logits_conv(architecture: str, layer: str) -> None:
    assert last_conv_layer(shape_model(architecture, 10, 3)) == layer


def test_fine_pruning_leaves_squeezenets_classes_on() -> None:
    torch.manual_seed(0)
    model = create_model("torchvision.squeezenet1_1", 3, 3).eval()
    rng = np.random.default_rng(0)
    clean = ImageSet(rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), np.arange(24) % 3)
    cfg = FinePruningConfig(finetune=FinetuneConfig(epochs=1, batch_size=24, augment=False))
    res = fine_pruning(model, clean, Normalization(), cfg, "cpu")
    assert res.params["layer"] == "features.12.expand3x3"
    head = dict(res.model.named_modules())["classifier.1"].weight
    assert bool((head.flatten(1).abs().sum(1) > 0).all())  # before the fix: up to 2 of the 3 classes' rows zeroed


@pytest.mark.parametrize("architecture", ["torchvision.vit_b_16", "torchvision.swin_t"])
def test_fine_pruning_refuses_a_model_whose_only_conv_is_a_patch_embedding(architecture: str) -> None:
    with pytest.raises(ValueError, match="patch embedding"):
        last_conv_layer(shape_model(architecture, 10, 3))


def test_a_logits_only_conv_model_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="makes the logits"):
        last_conv_layer(model)


def test_fine_pruning_on_a_vit_is_422_at_submission() -> None:
    spec = ScanSpec.model_validate({
        "mode": "repair", "model": {"architecture": "torchvision.vit_b_16", "num_classes": 10, "in_channels": 3},
        "detect": {"enabled": False}, "repair": {"method": "fine_pruning", "params": {"epochs": 1}}})
    with pytest.raises(InputError, match="patch embedding") as info:
        _check_model_takes(spec, (224, 224, 3), DataLimits())
    assert info.value.field == "spec.repair.method"


def _layers_nwc(changes: list[torch.Tensor]) -> NWC:
    return NWC([f"l{i}" for i in range(len(changes))], [d.flatten(1).sum(1) for d in changes], changes)


def test_zeroing_never_picks_channels_or_weights_unlearning_did_not_move() -> None:
    # unlearning moved nothing (a model at chance stops it before its first step): nothing is zeroed, where the
    # stable tie order used to select the first layer's channels and zero every weight in them (threshold 0)
    still = _layers_nwc([torch.zeros(8, 3, 3, 3), torch.zeros(16, 8, 3, 3)])
    masks, summary = zero_masks(still, 0.5, 0.7)
    assert summary.channels_selected == 0 and summary.weights_zeroed == 0
    assert not any(bool(m.any()) for m in masks)
    # one moved channel whose weights mostly did not move: n = 0.5 selects it alone, only its moved weights go
    d = torch.zeros(4, 2, 3, 3)
    d[1, 0, 0, 0], d[1, 1, 2, 2] = 0.5, 0.25
    masks, summary = zero_masks(_layers_nwc([d]), 0.5, 0.7)
    assert summary.channels_selected == 1 and summary.weights_zeroed == 2
    assert torch.equal(masks[0], d > 0)


def test_tsbd_on_a_model_at_chance_says_it_zeroed_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    with torch.no_grad():  # a constant prediction: accuracy 1/2 on balanced labels, chance
        model[4].weight.zero_()
        model[4].bias.copy_(torch.tensor([1.0, 0.0]))
    clean = ImageSet(np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8), np.arange(20) % 2)
    cfg = TSBDConfig(neuron_ratio=0.5, unlearn_max_epochs=1, finetune_epochs=1, batch_size=20, augment=False,
                     subset_filter=False)
    res = tsbd_repair(model, clean, Normalization(), cfg, "cpu", num_classes=2, subset_filter=None,
                      scan=lambda *a, **k: None)
    assert res.details["unlearn"]["epochs"] == 0
    assert res.details["zero_reinit"]["weights_zeroed"] == 0
    assert "moved no weight" in res.chosen["note"]
    assert covered_conv_layers(model) == ["0"]
