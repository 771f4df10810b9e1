"""The repair_data branch of the pipeline on the backdoored digits model: report, CSV, progress, errors."""

from __future__ import annotations

import csv
import json
from collections.abc import MutableMapping
from pathlib import Path

import numpy as np
import pytest

from core.inputs import InputError, ScanInputs, UploadedFile
from core.pipeline import run_pipeline
from core.progress import Progress
from core.spec import ScanSpec
from tests.helpers import backdoored_digits, spec_json, write_npz, write_safetensors

# a few seconds on 2 cores; the method's defaults are for real data sets
CHEAP = {"calib_epochs": 2, "checkpoints": 1, "epochs": 1, "augment": False, "calib_augment": False,
          "scratch_epochs": 2}


def _inputs(tmp: Path) -> ScanInputs:
    state, clean, test = backdoored_digits()
    training = test.subset(np.arange(150))
    return ScanInputs(model=UploadedFile(write_safetensors(tmp / "m.safetensors", state), "m.safetensors"),
                      clean_data=UploadedFile(write_npz(tmp / "clean.npz", clean), "clean.npz"),
                      training_data=UploadedFile(write_npz(tmp / "train.npz", training), "train.npz"))


def _spec(**repair_data: object) -> ScanSpec:
    return ScanSpec.model_validate(json.loads(spec_json("repair_data", repair_data={"params": CHEAP,
                                                                                     **repair_data})))


class _Sink:
    def __init__(self) -> None:
        self.seen: list[tuple[str, float]] = []

    def report(self, stage: str, fraction: float, timings: MutableMapping[str, float]) -> None:
        self.seen.append((stage, fraction))

    def stop_reason(self) -> str | None:
        return None


def test_without_is_corrupt_the_report_has_no_identification_and_the_csv_no_mask(tmp_path: Path) -> None:
    sink = _Sink()
    result = run_pipeline(_spec(), _inputs(tmp_path), tmp_path, device="cpu", progress=Progress(sink))
    report = result.report
    section = report["repair_data"]
    assert section["identification"] is None and report["data"]["training_is_corrupt"] is None
    assert set(result.artifacts) == {"repaired_model", "sample_scores"}
    rows = list(csv.reader(result.artifacts["sample_scores"].open()))
    assert rows[0] == ["index", "label", "score", "flagged", "new_label", "input_flagged"] and len(rows) == 151
    assert section["n_flagged"] == sum(int(r[3]) for r in rows[1:])
    assert section["n_input_flagged"] == sum(int(r[5]) for r in rows[1:])
    assert all(int(r[3]) >= int(r[5]) for r in rows[1:])  # an input flag is a flag
    assert "after" in report and report["data"]["acc_source"].startswith("clean_data_holdout")
    stages = [stage for stage, _ in sink.seen]
    assert "repair_data" in stages and any(s.startswith("repair_data:") for s in stages)
    fractions = [f for _, f in sink.seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_value_the_method_refuses_when_it_runs_fails_as_invalid_input(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from core.datarepair import registry

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("harm scores are not finite: the model's loss diverged on 3 training samples")

    monkeypatch.setattr(registry, "repair_data", refuse)
    with pytest.raises(InputError, match="not finite") as info:
        run_pipeline(_spec(), _inputs(tmp_path), tmp_path, device="cpu")
    assert info.value.field == "spec.repair_data"
