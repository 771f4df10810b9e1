"""Static inspection of checkpoints: code-carrying pickles get high findings, with their location, and are
refused by load_inputs before any loader opens them; a canary proves nothing was run."""

from __future__ import annotations

import builtins
import os
import pickle
import runpy
import timeit
from pathlib import Path

import numpy as np
import pytest
import torch

from core.data.formats import DataLimits
from core.data.imageset import ImageSet
from core.inputs import InputError, ScanInputs, UploadedFile, load_inputs
from core.models.checkpoint import CheckpointLimits
from core.models.checkpoint.inspect import high_findings, inspect_checkpoint, inspect_pickle
from core.models.registry import create_model
from core.spec import ScanSpec
from tests.helpers import spec_json, write_npz


class _Call:
    """Pickles as ``func(*args)``: what a hostile checkpoint asks its loader to run."""

    def __init__(self, func: object, args: tuple[object, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol's own signature
        return (self.func, self.args)


def _payloads(canary: Path) -> dict[str, object]:
    touch = f"open({str(canary)!r}, 'w').close()"
    return {
        "os.system": _Call(os.system, (f"touch {canary}",)),
        "builtins.exec": _Call(builtins.exec, (touch,)),
        "timeit.timeit": _Call(timeit.timeit, (touch,)),
        "runpy._run_code": _Call(runpy._run_code, (touch, {})),
        # getattr(__import__('os'), 'system'): a call whose argument is another call's result
        "nested __reduce__": _Call(getattr, (_Call(builtins.__import__, ("os",)), "system")),
    }


@pytest.fixture
def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("resnet20", 10, 1).state_dict()


@pytest.mark.parametrize("which", ["os.system", "builtins.exec", "timeit.timeit", "runpy._run_code",
                                   "nested __reduce__"])
def test_code_carrying_checkpoint_has_high_findings(tmp_path: Path, state_dict: dict[str, torch.Tensor],
                                                     which: str) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state_dict, "extra": _payloads(canary)[which]}, path)
    high = high_findings(inspect_checkpoint(path))
    assert high, which
    assert all(f.member.endswith("data.pkl") and isinstance(f.offset, int) and f.offset > 0 for f in high)
    assert not canary.exists()


def test_benign_state_dict_has_no_high_finding(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "model.pt"
    torch.save(state_dict, path)
    findings = inspect_checkpoint(path)
    assert not high_findings(findings)
    assert {f.as_dict()["location"]["member"] for f in findings} == {"model/data.pkl"}
    assert "imports torch._utils._rebuild_tensor_v2" in {f.message for f in findings}


def test_reduce_of_an_unknown_global_is_high_outside_backdoorbench() -> None:
    data = pickle.dumps(_Call(np.zeros, ((2,),)), protocol=2)
    findings = inspect_pickle(data, "data.pkl")
    assert [f.rule_id for f in findings if f.severity == "high"] == ["AD102"]


def test_backdoorbench_globals_are_medium_not_high() -> None:
    data = pickle.dumps({"model": {}, "bd_train": _Call(np.zeros, ((2,),)), "model_name": "r"}, protocol=2)
    findings = inspect_pickle(data, "data.pkl")
    assert not high_findings(findings)
    assert any(f.rule_id == "AD201" and f.severity == "medium" for f in findings)


def test_opcode_scan_is_capped_by_the_pickle_limits() -> None:
    with pytest.raises(ValueError, match="over the limit"):
        inspect_pickle(b"\x80\x02N." * 100, "data.pkl", CheckpointLimits(max_pickle_bytes=64))


def test_load_inputs_refuses_code_with_its_findings(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    canary = tmp_path / "canary"
    model = tmp_path / "evil.pt"
    torch.save({"state_dict": state_dict, "x": _payloads(canary)["os.system"]}, model)
    rng = np.random.default_rng(0)
    clean = write_npz(tmp_path / "c.npz", ImageSet(rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8),
                                                   rng.integers(0, 10, 4)))
    spec = ScanSpec.model_validate_json(spec_json())
    inputs = ScanInputs(UploadedFile(model, "evil.pt"), UploadedFile(clean, "c.npz"))
    with pytest.raises(InputError) as info:
        load_inputs(spec, inputs, DataLimits())
    assert info.value.field == "model" and "carries code" in info.value.message
    assert info.value.findings and info.value.findings[0]["severity"] == "high"
    assert "system" in info.value.findings[0]["message"]
    assert not canary.exists()
