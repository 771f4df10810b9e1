"""The feature-space inversion: the hooked layer on the project's architectures (and no hook left behind), and
on a tiny model with a planted feature-space backdoor the batched search gives the target the smallest shift,
with one forward pass per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.detect import DETECTORS, ConfigError, DetectConfig, scan_model
from core.detect.feature_inversion import candidate_layers, feature_layer
from core.models.registry import create_model

NORM = Normalization((0.5,), (0.5,))
K, B = 6, 8


def _small_cnn() -> nn.Module:
    """bench/repair_bench.py's six-layer CNN (conv-BN-ReLU x 6, two max-pools, global pooling, linear)."""
    def block(a: int, b: int) -> list[nn.Module]:
        return [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(1, 4), *block(4, 4), nn.MaxPool2d(2), *block(4, 8), *block(8, 8), nn.MaxPool2d(2),
                         *block(8, 8), *block(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(("arch", "channels", "size", "expected", "shape"), [
    ("small_cnn", 1, 28, "19", (8, 7, 7)),  # the last ReLU, before AdaptiveAvgPool2d
    ("resnet20", 3, 32, "layer3", (64, 8, 8)),  # the last stage, before avgpool
    ("preactresnet18", 3, 32, "layer4", (512, 4, 4)),
    ("torchvision.resnet18", 3, 64, "layer4", (512, 2, 2)),
    ("torchvision.resnet18", 3, 32, "layer3", (256, 2, 2)),  # its layer4 is 1x1 there: no spatial map
])
def test_the_layer_is_the_feature_map_before_global_pooling(arch: str, channels: int, size: int, expected: str,
                                                            shape: tuple[int, int, int]) -> None:
    model = _small_cnn() if arch == "small_cnn" else create_model(arch, 10, channels)
    model.eval()
    x = torch.rand(1, channels, size, size)
    layer = feature_layer(model, x)
    assert (layer.name, layer.shape, layer.index) == (expected, shape, layer.candidates - 1)
    assert _no_hooks(model)  # the probing hooks are removed
    names = [n for n, _, _ in candidate_layers(model, x)]
    if arch == "resnet20":  # a block's ReLU runs twice per forward pass: never a candidate
        assert "layer1.0.relu" not in names and "layer1.0" in names
    assert feature_layer(model, x, depth=0.0).name == names[0]  # fi_depth picks an earlier map


def test_a_model_without_a_feature_map_is_refused() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="4-D feature map"):
        feature_layer(mlp, torch.rand(1, 1, 4, 4))
    assert _no_hooks(mlp)


def test_a_scan_of_a_model_without_a_feature_map_skips_the_feature_inversion() -> None:
    """It runs by default (evidence): an MLP's scan must still succeed, the detector saying why it saw nothing."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()
    rng = np.random.default_rng(0)
    clean = ImageSet(rng.integers(0, 256, (20, 4, 4, 1), dtype=np.uint8), np.arange(20) % 4)
    cfg = DetectConfig(detectors=("neural_cleanse", "feature_inversion"), voting_detectors=("neural_cleanse",),
                       nc_steps=2, nc_batch_size=2, fi_steps=2)
    res = scan_model(mlp, clean, NORM, cfg, "cpu", 4)
    fi = res.detectors["feature_inversion"]
    assert res.verdict == "clean" and fi.statistic == 1.0 and not fi.flagged
    assert "4-D feature map" in fi.details["skipped"]
    assert _no_hooks(mlp)


class _Planted(nn.Module):
    """conv -> ReLU -> global pooling -> linear, by hand: channel k < K carries class k's clean evidence
    (logit k = its pooled value less its mean on random images), channel K is never active on clean images
    (bias -10) and drives class 0 (weight 20): a feature-space backdoor, its trigger a one-channel shift."""

    def __init__(self, skip: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, K + 1, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(K + 1, K)
        self.skip = skip  # adds a term of the input after the layer (the hook's expansion cannot serve it)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(K + 1, 1, 3, 3, generator=gen) / 3)
            self.conv.weight[K] = 0
            self.conv.bias.copy_(torch.tensor([0.0] * K + [-10.0]))
            self.fc.weight.zero_()
            self.fc.weight[:, :K] = torch.eye(K)
            self.fc.weight[0, K] = 20.0
            # centred logits: no class is the natural answer to most images (each needs a real change)
            x = torch.rand(256, 1, 8, 8, generator=gen).sub(0.5).div(0.5)
            self.fc.bias.copy_(-self.pool(self.relu(self.conv(x))).flatten(1)[:, :K].mean(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(self.pool(self.relu(self.conv(x))).flatten(1))
        return out + 1e-3 * x.mean((1, 2, 3))[:, None] if self.skip else out


def _images(model: nn.Module, n: int = 64) -> ImageSet:
    x = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    with torch.no_grad():
        y = model(torch.as_tensor(x).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)).argmax(1)
    return ImageSet(x, y.numpy().astype(np.int64))


@pytest.mark.parametrize("skip", [False, True])
def test_the_planted_feature_backdoor_has_the_smallest_shift(skip: bool) -> None:
    model = _Planted(skip).eval()
    clean = _images(model)
    seen: dict[str, list[int]] = {"conv": [], "fc": []}
    hooks = [model.conv.register_forward_hook(lambda _m, i, _o: seen["conv"].append(i[0].shape[0])),
             model.fc.register_forward_hook(lambda _m, i, _o: seen["fc"].append(i[0].shape[0]))]
    cfg = DetectConfig(detectors=("feature_inversion",), voting_detectors=("feature_inversion",),
                       fi_steps=150, fi_batch_size=B)
    try:
        res = scan_model(model, clean, NORM, cfg, "cpu", K)
    finally:
        for h in hooks:
            h.remove()
    assert _no_hooks(model)
    fi = res.detectors["feature_inversion"]
    steps = fi.details["steps"]
    assert len(fi.per_class) == K and fi.details["classes_never_reaching_target_success"] == []
    assert fi.details["layer"] == "relu" and fi.details["kept_non_negative"]
    assert int(np.argmin(fi.per_class)) == 0 and fi.per_class[0] < 0.5 * sorted(fi.per_class)[1], fi.per_class
    assert fi.flagged and fi.suspected_targets == [0] and res.verdict != "clean"
    assert res.trigger_images[0].shape == (8, 8, 1) and res.trigger_images[0].dtype == np.uint8  # the bars
    # every step is one forward pass of all K classes: K x B activations past the layer; without a skip the
    # B images run up to the layer once, with one they are copied K times (the fallback, after one failed try)
    assert seen["fc"].count(K * B) == steps + (1 if skip else 0)
    assert seen["conv"].count(K * B if skip else B) >= steps
    assert DETECTORS["feature_inversion"] is not None


def test_fi_settings_are_ranged() -> None:
    for params, field in (({"fi_depth": 1.5}, "fi_depth"), ({"fi_steps": 0}, "fi_steps"),
                          ({"fi_batch_size": 0}, "fi_batch_size"), ({"fi_lr": 0.0}, "fi_lr")):
        with pytest.raises(ConfigError) as err:
            DetectConfig(**params)
        assert err.value.field == field
