"""The scan spec's validation: each bad field is named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.spec import ScanSpec

MODEL = {"architecture": "resnet20", "num_classes": 10}


def _error(spec: dict) -> str:
    with pytest.raises(ValidationError) as info:
        ScanSpec.model_validate(spec)
    err = info.value.errors()[0]
    return ".".join(str(x) for x in err["loc"]) + ": " + err["msg"]


def test_defaults() -> None:
    spec = ScanSpec.model_validate({"mode": "scan", "model": MODEL})
    assert spec.model.in_channels == 3 and spec.repair.method == "tsbd" and spec.seed == 0 and spec.attack is None
    assert spec.model.normalization().mean == (0.0,) and spec.model.normalization().std == (1.0,)


@pytest.mark.parametrize(("spec", "where"), [
    ({"mode": "audit", "model": MODEL}, "mode"),
    ({"mode": "scan"}, "model"),
    ({"mode": "scan", "model": {**MODEL, "num_classes": 1}}, "model.num_classes"),
    ({"mode": "scan", "model": {**MODEL, "in_channels": 2}}, "model.in_channels"),
    ({"mode": "scan", "model": {**MODEL, "architecture": "lenet"}}, "model.architecture"),
    ({"mode": "scan", "model": {**MODEL, "architecture": "torchvision.nope"}}, "model.architecture"),
    ({"mode": "scan", "model": {**MODEL, "mean": [0.1, 0.2]}}, "model: Value error, mean must have 1 or"),
    ({"mode": "scan", "model": {**MODEL, "std": [0.0]}}, "std value must be positive"),
    ({"mode": "scan", "model": MODEL, "attack": {"type": "trojannn"}}, "attack.type"),
    ({"mode": "scan", "model": MODEL, "attack": {"type": "badnets", "target": 10}}, "attack.target 10"),
    ({"mode": "scan", "model": MODEL, "surprise": 1}, "surprise"),
    ({"mode": "scan", "model": MODEL, "seed": -1}, "seed"),
])
def test_bad_fields_are_named(spec: dict, where: str) -> None:
    assert where in _error(spec)


def test_torchvision_names_are_accepted() -> None:
    spec = ScanSpec.model_validate({"mode": "scan", "model": {**MODEL, "architecture": "torchvision.resnet18"}})
    assert spec.model.architecture == "torchvision.resnet18"


def test_repair_params_are_checked_against_the_method() -> None:
    assert "repair.method" in _error({"mode": "repair", "model": MODEL, "repair": {"method": "magic"}})
    assert "bogus" in _error({"mode": "repair", "model": MODEL, "repair": {"method": "tsbd", "params": {"bogus": 1}}})


def test_robust_hparams_is_a_parameter_of_every_method() -> None:
    for method in ("tsbd", "tsbd_fixed", "finetune", "fine_pruning"):
        spec = ScanSpec.model_validate({"mode": "repair", "model": MODEL, "repair": {
            "method": method, "params": {"robust_hparams": True, "robust_model": "bilevel"}}})
        assert spec.repair.params["robust_hparams"] is True
    assert "robust_hparams" in _error({"mode": "repair", "model": MODEL, "repair": {
        "method": "tsbd", "params": {"robust_hparams": "yes"}}})
    assert "robust_model" in _error({"mode": "repair", "model": MODEL, "repair": {
        "method": "finetune", "params": {"robust_model": "quadlevel"}}})
