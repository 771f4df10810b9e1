"""spec -> stages -> report: load, evaluate before, (repair, evaluate after), report.

The worker calls ``run_pipeline`` with files on local disk and a progress callback; nothing here knows
about HTTP, queues or databases.
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.data.formats import DataLimits
from core.data.imageset import ImageSet
from core.inputs import InputError, LoadedInputs, ScanInputs, load_inputs
from core.metrics import accuracy, attack_success_rate, predict, robust_accuracy
from core.models.registry import create_model
from core.models.weights import load_weights
from core.spec import ScanSpec

ProgressFn = Callable[[str, float], None]
HOLDOUT_FRACTION = 0.2
# share of the repair span each method sub-stage takes (fine-tuning dominates the cost)
_SUB_STAGE_SPANS = {"unlearn": (0.0, 0.3), "zero_reinit": (0.3, 0.35), "prune": (0.3, 0.35),
                    "finetune": (0.35, 1.0)}
# share of the whole scan that each stage takes, for the progress bar
_STAGE_SPANS = {
    "scan": {"load": (0.0, 0.2), "evaluate_before": (0.2, 0.95), "report": (0.95, 1.0)},
    "repair": {"load": (0.0, 0.05), "evaluate_before": (0.05, 0.15), "repair": (0.15, 0.85),
               "evaluate_after": (0.85, 0.95), "report": (0.95, 1.0)},
}


def available_modes() -> tuple[str, ...]:
    """Modes this build can run; the API answers 422 for the others."""
    modes = ["scan"]
    if _repair_registry() is not None:
        modes.append("repair")
    return tuple(modes)


def _repair_registry() -> Any:
    try:
        from core.defenses import registry
    except ImportError:
        return None
    return registry if hasattr(registry, "repair") else None


@dataclass
class PipelineResult:
    report: dict[str, Any]
    artifacts: dict[str, Path] = field(default_factory=dict)


@dataclass
class _Clock:
    """Stage timings plus progress reports scaled to the whole scan."""

    mode: str
    on_progress: ProgressFn
    timings: dict[str, float] = field(default_factory=dict)
    _stage: str | None = None
    _t0: float = 0.0
    _sub_high: float = 0.0

    def start(self, stage: str) -> None:
        self.stop()
        self._stage, self._t0 = stage, time.perf_counter()
        self.progress(0.0)

    def progress(self, fraction: float) -> None:
        lo, hi = _STAGE_SPANS["repair" if self.mode != "scan" else "scan"][self._stage or "load"]
        self.on_progress(self._stage or "load", lo + (hi - lo) * min(max(fraction, 0.0), 1.0))

    def sub_progress(self, sub_stage: str, fraction: float) -> None:
        """Progress of a repair method's own stage (``unlearn``, ``finetune``, …), shown as ``repair:<name>``.

        Methods report each sub-stage from 0 to 1; known ones get a share of the repair span, and the bar never
        moves back."""
        lo, hi = _SUB_STAGE_SPANS.get(sub_stage, (self._sub_high, self._sub_high))
        self._sub_high = max(self._sub_high, lo + (hi - lo) * min(max(fraction, 0.0), 1.0))
        lo_all, hi_all = _STAGE_SPANS["repair"]["repair"]
        self.on_progress(f"repair:{sub_stage}", lo_all + (hi_all - lo_all) * self._sub_high)

    def stop(self) -> None:
        if self._stage is not None:
            self.timings[self._stage] = round(time.perf_counter() - self._t0, 4)
            self._stage = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_pipeline(spec: ScanSpec, inputs: ScanInputs, work_dir: Path, device: str = "auto",
                 on_progress: ProgressFn | None = None, limits: DataLimits | None = None) -> PipelineResult:
    """Run one scan; raises ``InputError`` for unusable inputs, anything else is a bug or an outside failure."""
    if spec.mode not in available_modes():
        raise InputError("spec.mode", f"mode {spec.mode!r} is not available yet")
    dev = resolve_device(device)
    clock = _Clock(spec.mode, on_progress or (lambda _s, _p: None))
    torch.manual_seed(spec.seed)

    clock.start("load")
    loaded = load_inputs(spec, inputs, limits or DataLimits())
    model = create_model(spec.model.architecture, spec.model.num_classes, spec.model.in_channels)
    load_weights(model, loaded.checkpoint.state_dict)
    model.to(dev).eval()
    eval_set, train_set, acc_source = _evaluation_split(loaded, spec.seed)
    backdoor = _backdoor_set(spec, loaded, eval_set)
    norm = spec.model.normalization()

    clock.start("evaluate_before")
    before = _evaluate(model, eval_set, backdoor, norm, dev)
    report: dict[str, Any] = {
        "mode": spec.mode,
        "model": {
            "sha256": _sha256(inputs.model.path),
            "architecture": spec.model.architecture,
            "num_classes": spec.model.num_classes,
            "in_channels": spec.model.in_channels,
            "format": loaded.checkpoint.format,
            "parameters": int(sum(p.numel() for p in model.parameters())),
        },
        "data": {
            "clean_images": len(loaded.clean),
            "acc_source": acc_source,
            "acc_images": len(eval_set),
            "asr_source": backdoor.source if backdoor else None,
            "asr_images": len(backdoor.x) if backdoor else 0,
            "image_shape": list(loaded.clean.image_shape),
        },
        "before": before,
        "device": str(dev),
        "seed": spec.seed,
    }
    artifacts: dict[str, Path] = {}
    if spec.mode == "repair":
        registry = _repair_registry()
        clock.start("repair")
        try:
            result = registry.repair(spec.repair.method, model, train_set, norm, spec.repair.params, dev,
                                     spec.model.num_classes, spec.seed, on_progress=clock.sub_progress)
        except ValueError as exc:  # parameters the method's config refuses
            raise InputError("spec.repair.params", str(exc)) from exc
        repaired = result.model
        clock.start("evaluate_after")
        after = _evaluate(repaired, eval_set, backdoor, norm, dev)
        report["after"] = after
        report["repair"] = {"method": result.method, "params": result.params, "chosen": result.chosen,
                            "details": result.details, "timings": result.timings}
        if before["asr"] is not None and after["asr"] is not None:
            from core.metrics import defense_effectiveness_rating

            report["der"] = defense_effectiveness_rating(before["acc"], before["asr"], after["acc"], after["asr"])
        path = work_dir / "repaired_model.safetensors"
        _save_like_upload(repaired, loaded.checkpoint.state_dict, path)
        artifacts["repaired_model"] = path

    clock.start("report")
    clock.stop()
    report["timings"] = dict(clock.timings)
    report["versions"] = versions()
    clock.on_progress("report", 1.0)
    return PipelineResult(report=report, artifacts=artifacts)


def _evaluation_split(loaded: LoadedInputs, seed: int) -> tuple[ImageSet, ImageSet, str]:
    """(evaluation set, data the repair may learn from, where ACC comes from)."""
    if loaded.test is not None:
        return loaded.test, loaded.clean, "test_data"
    rest, held_out = loaded.clean.split(HOLDOUT_FRACTION, seed)
    return held_out, rest, f"clean_data_holdout ({HOLDOUT_FRACTION:.0%} of clean_data, seed {seed})"


@dataclass(frozen=True)
class _Backdoor:
    x: np.ndarray
    y_target: np.ndarray
    y_true: np.ndarray | None
    source: str


def _backdoor_set(spec: ScanSpec, loaded: LoadedInputs, eval_set: ImageSet) -> _Backdoor | None:
    if loaded.poisoned is not None:
        return _Backdoor(loaded.poisoned.x, loaded.poisoned.y, None, "poisoned_data")
    if spec.attack is None:
        return None
    from core.attacks import make_backdoor_test_set
    from core.attacks.registry import create_attack

    attack = create_attack(spec.attack.type, target=spec.attack.target, image_shape=eval_set.image_shape,
                           seed=spec.seed, **spec.attack.params)
    try:
        bd = make_backdoor_test_set(attack, eval_set, spec.model.num_classes)
    except ValueError as exc:  # e.g. every evaluation image already has the target label
        raise InputError("spec.attack", str(exc)) from exc
    return _Backdoor(bd.x, bd.y_target, bd.y_true, f"attack:{spec.attack.type}")


def _evaluate(model: torch.nn.Module, clean: ImageSet, backdoor: _Backdoor | None, norm: Any,
              device: torch.device) -> dict[str, float | None]:
    acc = accuracy(predict(model, clean.x, norm, device), clean.y)
    asr = ra = None
    if backdoor is not None:
        pred = predict(model, backdoor.x, norm, device)
        asr = attack_success_rate(pred, backdoor.y_target)
        ra = robust_accuracy(pred, backdoor.y_true) if backdoor.y_true is not None else None
    return {"acc": acc, "asr": asr, "ra": ra}


def _save_like_upload(model: torch.nn.Module, uploaded: dict[str, torch.Tensor], path: Path) -> None:
    """Write the repaired weights under the upload's own key names (a ``module.`` prefix included)."""
    from core.models.checkpoint import save_safetensors

    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, ref in uploaded.items():
        bare = key.removeprefix("module.")
        out[key] = state[bare].detach().to("cpu", ref.dtype).contiguous()
    save_safetensors(out, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    def ver(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {"antidote": ver("antidote"), "torch": torch.__version__, "torchvision": ver("torchvision"),
            "numpy": np.__version__, "python": platform.python_version()}
