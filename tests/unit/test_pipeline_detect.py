"""The detect stage of the pipeline: a verdict with evidence and trigger PNGs on a BadNets digits model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.inputs import ScanInputs, UploadedFile
from core.pipeline import run_pipeline
from core.progress import Progress, StopRequested
from core.spec import ScanSpec
from tests.helpers import backdoored_digits, spec_json, write_npz, write_safetensors


def _inputs(tmp: Path) -> ScanInputs:
    state, clean, test = backdoored_digits()
    return ScanInputs(model=UploadedFile(write_safetensors(tmp / "m.safetensors", state), "m.safetensors"),
                      clean_data=UploadedFile(write_npz(tmp / "clean.npz", clean), "clean.npz"),
                      test_data=UploadedFile(write_npz(tmp / "test.npz", test), "test.npz"))


# a shorter search than the default keeps this test to a few seconds on 2 cores; same code path
CHEAP_DETECT = {"enabled": True, "params": {"detectors": ["neural_cleanse"], "nc_steps": 60, "max_images": 200}}


def _spec(**extra: object) -> ScanSpec:
    return ScanSpec.model_validate(json.loads(spec_json("scan", **{"detect": CHEAP_DETECT, **extra})))


def test_scan_reports_a_verdict_with_evidence_and_writes_triggers_as_png(tmp_path: Path) -> None:
    result = run_pipeline(_spec(), _inputs(tmp_path), tmp_path, device="cpu")
    verdict = result.report["verdict"]
    # on 8x8 digits the 3x3 patch is 14% of the image, no smaller than a natural class's mask: Neural Cleanse
    # does not single class 0 out, and its outlier test must then not convict a wrong class either; what the
    # pipeline owes is a verdict with its evidence and one trigger PNG per suspected class
    assert verdict["label"] in ("clean", "suspicious", "backdoored"), verdict
    assert verdict["label"] != "backdoored" or 0 in verdict["suspected_targets"], verdict
    assert verdict["label"] == verdict["evidence"]["verdict"] and verdict["score"] == verdict["evidence"]["score"]
    print("timings", result.report["timings"])
    assert verdict["evidence"]["detectors"]["neural_cleanse"]["votes"] is True
    assert "detect" in result.report["timings"]
    assert sorted(result.artifacts) == sorted(f"trigger_class_{k}" for k in verdict["suspected_targets"])
    for png in result.artifacts.values():
        assert png.suffix == ".png"
        image = np.asarray(Image.open(png))
        assert image.shape[:2] == (8, 8) and image.dtype == np.uint8


def test_disabled_detection_is_reported_as_skipped(tmp_path: Path) -> None:
    result = run_pipeline(_spec(detect={"enabled": False}), _inputs(tmp_path), tmp_path, device="cpu")
    assert result.report["verdict"] == {"label": None, "skipped": True, "reason": "spec.detect.enabled is false"}
    assert not result.artifacts


class _StopDuringDetect:
    """A sink that asks to stop once the detect stage is running (as a client's cancel would)."""

    def report(self, stage: str, fraction: float, timings: dict) -> None:
        self.stage = stage

    def stop_reason(self) -> str | None:
        return "canceled" if getattr(self, "stage", "") == "detect" else None


def test_a_stop_request_ends_the_detect_stage(tmp_path: Path) -> None:
    with pytest.raises(StopRequested):
        run_pipeline(_spec(), _inputs(tmp_path), tmp_path, device="cpu", progress=Progress(_StopDuringDetect()))


def test_repair_judges_the_uploaded_and_the_repaired_model(tmp_path: Path) -> None:
    spec = ScanSpec.model_validate(json.loads(spec_json(
        "repair", detect=CHEAP_DETECT, repair={"method": "finetune", "params": {"epochs": 1}})))
    result = run_pipeline(spec, _inputs(tmp_path), tmp_path, device="cpu")
    before, after = result.report["verdict"], result.report["after"]["verdict"]
    assert before["evidence"]["clean_images"] == after["evidence"]["clean_images"] == 200  # max_images
    assert {"detect", "repair", "detect_after"} <= set(result.report["timings"])
    assert set(result.artifacts) == ({"repaired_model"} | {f"trigger_class_{k}" for k in before["suspected_targets"]}
                                     | {f"repaired_trigger_class_{k}" for k in after["suspected_targets"]})


def test_clean_data_the_detector_cannot_use_is_an_input_error_naming_the_field(tmp_path: Path) -> None:
    """scan_model's ValueError (here: 6 clean images, fewer than the 10 it needs) reaches the client as an
    InputError at ``clean_data`` (a 4xx answer), not as a failed scan."""
    from core.inputs import InputError

    state, clean, test = backdoored_digits()
    inputs = ScanInputs(model=UploadedFile(write_safetensors(tmp_path / "m.safetensors", state), "m.safetensors"),
                        clean_data=UploadedFile(write_npz(tmp_path / "c.npz", clean.subset(np.arange(6))), "c.npz"),
                        test_data=UploadedFile(write_npz(tmp_path / "t.npz", test), "t.npz"))
    with pytest.raises(InputError) as err:
        run_pipeline(_spec(), inputs, tmp_path, device="cpu")
    assert err.value.field == "clean_data" and "at least 10 clean images" in err.value.message


def test_the_repairs_own_scans_use_the_specs_detect_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An escalating gentle repair scans the repaired model itself: with the spec's detect settings, not the
    detector's defaults (300 images, four detectors), its attempts are in the report, and the last attempt's scan
    is the report's after-verdict (not scanned again)."""
    import core.detect

    seen: list[object] = []
    real = core.detect.scan_model

    def spy(model, clean, norm, config, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(config)
        return real(model, clean, norm, config, *args, **kwargs)

    monkeypatch.setattr(core.detect, "scan_model", spy)
    params = {"clean_check": "given", "clean_action": "gentle", "gentle_verdicts": "all", "escalate": True,
              "escalate_max_repairs": 2, "finetune_epochs": 1, "finetune_min_epochs": 1}
    spec = ScanSpec.model_validate(json.loads(spec_json("repair", detect=CHEAP_DETECT,
                                                        repair={"method": "tsbd", "params": params})))
    result = run_pipeline(spec, _inputs(tmp_path), tmp_path, device="cpu")
    escalation = result.report["repair"]["details"]["escalation"]
    assert escalation["attempts"], escalation
    assert seen, "the escalation ran no scan"
    for config in seen:
        assert config.detectors == ("neural_cleanse",) and config.max_images == 200
    # the detector runs once before the repair and once per escalation attempt; the report's after-verdict is the
    # last attempt's scan of the returned model, not a rerun of it
    assert len(seen) == 1 + len(escalation["attempts"]), (len(seen), escalation["attempts"])
    after = result.report["after"]["verdict"]
    assert "reused" in after and after["label"] == escalation["attempts"][-1]["verdict"]
    assert after["score"] == escalation["attempts"][-1]["score"]


def test_the_operators_allocation_bound_sizes_the_detectors_chunks(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator who lowers ANTIDOTE_MAX_ZIP_EXPANDED_BYTES lowers the bytes one detector step may take at run
    time too, not only at upload: every step's chunking is sized by the limits the pipeline was given, and a
    step over that bound (10 classes x 64 images of 8x8 with their logits: 189 KB against 120 KB) runs in chunks."""
    import core.detect.inversion as inversion
    from core.data.limits import DataLimits

    bound, calls = 120_000, []
    real = inversion.class_chunks

    def recording(k: int, per_class: int, item_bytes: int, max_items: int | None, max_bytes: int
                  ) -> list[tuple[int, int]]:
        chunks = real(k, per_class, item_bytes, max_items, max_bytes)
        calls.append((max_bytes, len(chunks)))
        return chunks

    monkeypatch.setattr(inversion, "class_chunks", recording)
    detect = {"enabled": True, "params": {"detectors": ["neural_cleanse"], "nc_steps": 3, "nc_batch_size": 64,
                                          "max_images": 200}}
    result = run_pipeline(_spec(detect=detect), _inputs(tmp_path), tmp_path, device="cpu",
                          limits=DataLimits(max_expanded_bytes=bound))
    assert result.report["verdict"]["label"] in ("clean", "suspicious", "backdoored")
    assert calls and {b for b, _ in calls} == {bound}
    assert min(n for _, n in calls) > 1  # 10 classes of 18.9 KB in chunks of at most 6


def test_the_repairs_own_scans_get_the_same_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The automatic tsbd's own detector scans (clean_check "scan", escalation) run with the bound the registry
    is given: it reaches ``tsbd_repair`` and, through ``detector_scan``, ``scan_model``."""
    import core.defenses.registry as registry
    import core.defenses.tsbd.repair as tsbd_repair_module
    from core.data.imageset import ImageSet
    from core.data.transforms import Normalization

    seen: dict[str, object] = {}

    def fake_scan_model(*args: object, **kwargs: object) -> object:
        seen["scan_model"] = kwargs.get("max_step_bytes")
        raise RuntimeError("stop here")

    def capture(*args: object, **kwargs: object) -> object:
        seen["tsbd_repair"] = kwargs.get("detect_step_bytes")
        raise RuntimeError("stop here")

    monkeypatch.setattr("core.detect.scan_model", fake_scan_model)
    clean = ImageSet(np.zeros((12, 4, 4, 1), np.uint8), np.arange(12) % 2)
    scan = tsbd_repair_module.detector_scan(clean, Normalization((0.5,), (0.5,)), "cpu", 2, 0, None, 77_000)
    with pytest.raises(RuntimeError, match="stop here"):
        scan(torch.nn.Identity(), Progress())
    monkeypatch.setattr(registry, "tsbd_repair", capture)
    with pytest.raises(RuntimeError, match="stop here"):
        registry.repair("tsbd", torch.nn.Identity(), clean, Normalization((0.5,), (0.5,)), {}, "cpu", 2,
                        detect_step_bytes=88_000)
    assert seen == {"scan_model": 77_000, "tsbd_repair": 88_000}


def test_a_model_with_overflowing_logits_is_invalid_input_before_any_measurement(tmp_path: Path) -> None:
    # finite weights (so the upload took them) whose logits overflow: the detector's scores were NaN, its verdict
    # 'clean', and PostgreSQL's jsonb refused the report at the end of the run
    from core.inputs import InputError

    inputs = _inputs(tmp_path)
    state = dict(backdoored_digits()[0])  # a copy: the helper's dict is cached
    state["fc.weight"] = torch.full_like(state["fc.weight"], 3e38)
    state["fc.weight"][::2] *= -1
    write_safetensors(inputs.model.path, state)
    with pytest.raises(InputError, match="logits are NaN or infinite on") as err:
        run_pipeline(_spec(), inputs, tmp_path, device="cpu")
    assert err.value.field == "model"
