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
    ({"mode": "scan", "model": {**MODEL, "std": [0.0]}}, "model.std.0: Input should be greater than"),
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


def _loc(spec: dict) -> tuple[str, str]:
    """(where the first error is, its message), as the API turns them into ``field`` and ``detail``."""
    with pytest.raises(ValidationError) as info:
        ScanSpec.model_validate(spec)
    err = info.value.errors()[0]
    return ".".join(str(x) for x in err["loc"]), err["msg"]


def _repair(method: str, **params: object) -> dict:
    return {"mode": "repair", "model": MODEL, "repair": {"method": method, "params": params}}


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("spec", "where", "says"), [
    (_repair("finetune", epochs=1_000_000_000), "repair.params.epochs", "less than or equal to 300"),
    (_repair("ft_sam", epochs=-1), "repair.params.epochs", "greater than or equal to 0"),
    (_repair("tsbd", finetune_epochs=2.5), "repair.params.finetune_epochs", "valid integer"),
    (_repair("tsbd", unlearn_max_epochs=0), "repair.params.unlearn_max_epochs", "greater than or equal to 1"),
    (_repair("tsbd", batch_size=0), "repair.params.batch_size", "greater than or equal to 1"),
    (_repair("fine_pruning", batch_size=10**6), "repair.params.batch_size", "less than or equal to 4096"),
    (_repair("finetune", lr=0), "repair.params.lr", "greater than or equal to 0.0000000001"),
    # a denormal step size: a repair that changes nothing and would still be reported as one
    (_repair("tsbd", lr_finetune=5e-324), "repair.params.lr_finetune", "greater than or equal to 0.0000000001"),
    ({"mode": "repair_data", "model": MODEL, "repair_data": {"method": "retain", "params": {"scratch_lr": 1e-300}}},
     "repair_data.params.scratch_lr", "greater than or equal to 0.0000000001"),
    (_repair("finetune", lr=NAN), "repair.params.lr", "finite"),
    (_repair("tsbd", lr_finetune=INF), "repair.params.lr_finetune", "finite"),
    (_repair("tsbd", lr_unlearn=5.0), "repair.params.lr_unlearn", "less than or equal to 1"),
    (_repair("finetune", momentum=1.0), "repair.params.momentum", "less than 1"),
    (_repair("ft_sam", weight_decay=-0.1), "repair.params.weight_decay", "greater than or equal to 0"),
    (_repair("tsbd_fixed", neuron_ratio=1.5), "repair.params.neuron_ratio", "less than or equal to 1"),
    (_repair("tsbd", alpha=-0.1), "repair.params.alpha", "greater than or equal to 0"),
    (_repair("fine_pruning", prune_step_ratio=0.0001), "repair.params.prune_step_ratio", "greater than"),
    (_repair("tsbd", auto_candidates=[0.1, 2.0]), "repair.params.auto_candidates.1", "less than or equal to 1"),
    (_repair("tsbd", auto_candidates=[]), "repair.params.auto_candidates", "at least 1"),
    # candidates are JSON numbers and distinct (a repeat repeats a pass over the clean subset)
    (_repair("tsbd", auto_candidates=["0.5"]), "repair.params.auto_candidates.0", "valid number"),
    (_repair("tsbd", auto_candidates=[True]), "repair.params.auto_candidates.0", "valid number"),
    (_repair("tsbd", auto_candidates=[0.5, 0.1, 0.5]), "repair.params", "auto_candidates must not repeat a value"),
    (_repair("tsbd", escalate=True), "repair.params", "escalate acts on the detector's verdict"),
    (_repair("tsbd", gentle_verdicts="all"), "repair.params", "gentle_verdicts 'all' acts on the detector's verdict"),
    (_repair("tsbd", auto_probes=[0.3, 0.3]), "repair.params", "auto_probes must not repeat a value"),
    # "" is in every layer name: it would exclude every Conv2d, and the repair would fail after its first stage
    (_repair("tsbd", layer_exclude=["shortcut", ""]), "repair.params.layer_exclude.1", "at least 1 character"),
    ({**_repair("tsbd", clean_check="given"), "detect": {"enabled": False}}, "",
     "clean_check 'given' reads the detector's verdict on the uploaded model, but detect.enabled is false"),
    (_repair("tsbd", auto_rule="biggest"), "repair.params.auto_rule", "'recovery', 'width', 'collapse' or 'retention'"),
    (_repair("tsbd", auto_min_n=0.9), "repair.params", "auto_min_n <= auto_max_n"),
    (_repair("tsbd", augment=1), "repair.params.augment", "valid boolean"),
    (_repair("tsbd", lr_unlaern=0.1), "repair.params.lr_unlaern", "unknown parameter 'lr_unlaern'"),
    # whole numbers of the spec itself are JSON integers, as the parameters' are
    ({"mode": "scan", "model": MODEL, "seed": True}, "seed", "valid integer"),
    ({"mode": "scan", "model": MODEL, "seed": 1.5}, "seed", "valid integer"),
    ({"mode": "scan", "model": {**MODEL, "num_classes": 10.0}}, "model.num_classes", "valid integer"),
    ({"mode": "scan", "model": {**MODEL, "in_channels": True}}, "model.in_channels", "JSON integer 1 or 3"),
    ({"mode": "scan", "model": {**MODEL, "in_channels": 1.0}}, "model.in_channels", "JSON integer 1 or 3"),
    ({"mode": "scan", "model": MODEL, "attack": {"type": "badnets", "target": True}}, "attack.target", "valid integer"),
    ({"mode": "scan", "model": {**MODEL, "mean": [NAN]}}, "model.mean.0", "finite"),
    ({"mode": "scan", "model": {**MODEL, "std": [INF]}}, "model.std.0", "finite"),
    ({"mode": "scan", "model": {**MODEL, "mean": [125.3]}}, "model.mean.0", "less than or equal to 1"),
    ({"mode": "scan", "model": {**MODEL, "std": [-0.2]}}, "model.std.0", "greater than or equal to 0.001"),
    # a string and a boolean were coerced (true became a mean of 1.0); model.mean is a list of numbers
    ({"mode": "scan", "model": {**MODEL, "mean": ["0.5"]}}, "model.mean.0", "valid number"),
    ({"mode": "scan", "model": {**MODEL, "std": [True]}}, "model.std.0", "valid number"),
    ({"mode": "scan", "model": MODEL, "attack": {"type": "badnets", "params": {"patch_size": 2.5}}},
     "attack.params.patch_size", "valid integer"),
    ({"mode": "scan", "model": MODEL, "attack": {"type": "badnets", "params": {"value": 300}}},
     "attack.params.value", "less than or equal to 255"),
    ({"mode": "scan", "model": MODEL, "attack": {"type": "blended", "params": {"alpha": NAN}}},
     "attack.params.alpha", "finite"),
    ({"mode": "scan", "model": MODEL, "attack": {"type": "wanet", "params": {"noise_mode": "yes"}}},
     "attack.params.noise_mode", "valid boolean"),
    ({"mode": "scan", "model": MODEL, "attack": {"type": "sig", "params": {"size": 3}}},
     "attack.params.size", "unknown parameter 'size' for attack 'sig'; valid: all_to_all, delta, frequency"),
    ({"mode": "scan", "model": MODEL, "attack": {"type": "badnets", "params": {"seed": 3}}},
     "attack.params.seed", "unknown parameter 'seed'"),  # the spec's own seed is the one used
])
def test_numeric_fields_have_ranges_checked_at_submission(spec: dict, where: str, says: str) -> None:
    loc, msg = _loc(spec)
    assert loc == where and says in msg


@pytest.mark.parametrize("spec", [
    _repair("finetune", epochs=300, lr=1, momentum=0, weight_decay=0.1, batch_size=4096),
    _repair("ft_sam", epochs=0, rho=0.0, label_smoothing=0.0),
    _repair("tsbd", finetune_epochs=21, lr_unlearn=1e-4, auto_candidates=[0.05, 0.3], finetune_schedule="cosine"),
    _repair("tsbd_fixed", neuron_ratio=0, weight_ratio=1),
    _repair("fine_pruning", prune_step_ratio=0.01, max_prune_ratio=1.0, epochs=1),
    {"mode": "scan", "model": {**MODEL, "in_channels": 3, "mean": [0.4914, 0.4822, 0.4465],
                               "std": [0.2470, 0.2435, 0.2616]}},
    {"mode": "scan", "model": {**MODEL, "mean": [0.0], "std": [1 / 255]}},
    {"mode": "scan", "model": MODEL, "attack": {"type": "badnets", "params": {"patch_size": 4, "all_to_all": True}}},
    {"mode": "scan", "model": MODEL, "attack": {"type": "wanet", "params": {"k": 4, "s": 1, "cross_ratio": 0}}},
    {"mode": "scan", "model": MODEL, "attack": {"type": "lf", "params": {"amplitude": 20, "max_frequency": 2}}},
])
def test_sane_values_are_accepted(spec: dict) -> None:
    ScanSpec.model_validate(spec)


def test_worst_case_work_is_bounded_by_the_ranges() -> None:
    """The largest accepted epochs and the smallest accepted pruning step keep a repair's passes over the clean
    subset bounded (the time limit still applies inside: the methods poll core.progress)."""
    from core.defenses.registry import REPAIR_METHODS
    from core.ranges import MAX_EPOCHS

    for name, method in REPAIR_METHODS.items():
        for key, tp in method.param_types.items():
            if "epochs" in key:
                bounds = {type(m).__name__: m for m in getattr(tp, "__metadata__", ())[-1].metadata}
                assert bounds["Le"].le <= MAX_EPOCHS, (name, key)


def test_the_parameter_reference_in_docs_is_the_code_s() -> None:
    """docs/parameters.md is generated; regenerate it with
    ``python -c "from core.spec import parameter_reference as r; print(r(), end='')" > docs/parameters.md``."""
    from pathlib import Path

    from core.spec import parameter_reference

    docs = Path(__file__).resolve().parents[2] / "docs" / "parameters.md"
    assert docs.read_text() == parameter_reference()


def test_range_checks_reuse_one_validator_per_config() -> None:
    """Configs are built on every repair and every attack: the checker must not build a new model each time."""
    from core.attacks.registry import create_attack
    from core.defenses.tsbd.config import TSBDConfig
    from core.ranges import _model

    TSBDConfig()
    create_attack("wanet", image_shape=(8, 8, 1))
    size = _model.cache_info().currsize
    for _ in range(5):
        TSBDConfig(finetune_epochs=3)
        create_attack("wanet", image_shape=(8, 8, 1), k=3)
    assert _model.cache_info().currsize == size


@pytest.mark.parametrize("detect, where, says", [
    ({"params": {"nc_steps": 0}}, "detect.params.nc_steps", "greater than or equal to 1"),
    ({"params": {"nc_steps": 2.5}}, "detect.params.nc_steps", "whole number"),
    ({"params": {"nc_stps": 3}}, "detect.params.nc_stps", "unknown detect parameter"),
    ({"params": {"detectors": ["strip"]}}, "detect.params.detectors", "unknown detector"),
    ({"params": {"voting_detectors": ["strip"]}}, "detect.params.voting_detectors", "unknown detector"),
    # a detector named twice would run twice (16 names: 16 x the search) for the same result
    ({"params": {"detectors": ["neural_cleanse"] * 16}}, "detect.params.detectors", "at most once"),
    ({"params": {"voting_detectors": ["neural_cleanse", "neural_cleanse"]}}, "detect.params.voting_detectors",
     "at most once"),
    ({"params": {"p_value": NAN}}, "detect.params.p_value", "finite number"),
    ({"enabled": "no"}, "detect.enabled", "valid boolean"),
    ({"enable": False}, "detect.enable", "Extra inputs"),
])
def test_detect_section_is_checked_at_submission(detect: dict, where: str, says: str) -> None:
    loc, msg = _loc({"mode": "scan", "model": MODEL, "detect": detect})
    assert loc == where and says in msg


def test_detect_section_defaults_on_and_takes_known_params() -> None:
    spec = ScanSpec.model_validate({"mode": "scan", "model": MODEL,
                                    "detect": {"params": {"nc_steps": 5, "detectors": ["neural_cleanse"]}}})
    assert spec.detect.enabled and spec.detect.params["nc_steps"] == 5
    assert ScanSpec.model_validate({"mode": "scan", "model": MODEL}).detect.enabled
