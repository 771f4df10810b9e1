"""spec -> stages -> report: load, evaluate before, detect, (repair or repair_data, evaluate after, detect
after), report.

The worker calls ``run_pipeline`` with files on local disk and a :class:`core.progress.Progress` whose sink
it owns (progress to the database, the cancel flag, the deadline); nothing here knows about HTTP, queues or
databases. Evaluation goes through :func:`core.metrics.evaluate`, as the benchmarks' does.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.data.formats import DataLimits
from core.data.imageset import ImageSet
from core.inputs import InputError, LoadedInputs, ScanInputs, evaluation_split, load_inputs
from core.metrics import evaluate
from core.models.registry import create_model
from core.models.weights import load_weights
from core.progress import Progress
from core.spec import ScanSpec

# share of the whole scan that each stage takes, for the progress bar (a repair method splits its own span)
_STAGE_SPANS = {
    "scan": {"load": (0.0, 0.1), "evaluate_before": (0.1, 0.3), "detect": (0.3, 0.95), "report": (0.95, 1.0)},
    "repair": {"load": (0.0, 0.05), "evaluate_before": (0.05, 0.1), "detect": (0.1, 0.3), "repair": (0.3, 0.7),
               "evaluate_after": (0.7, 0.75), "detect_after": (0.75, 0.95), "report": (0.95, 1.0)},
    # scoring and retraining on the whole training set dominate; the detector runs on the small clean part only
    "repair_data": {"load": (0.0, 0.05), "evaluate_before": (0.05, 0.08), "detect": (0.08, 0.18),
                    "repair_data": (0.18, 0.85), "evaluate_after": (0.85, 0.88), "detect_after": (0.88, 0.97),
                    "report": (0.97, 1.0)},
}
# the per-sample CSV artifact of repair_data (index, label, score, flagged, new_label[, input_flagged][, is_corrupt])
SAMPLE_SCORES_ARTIFACT = "sample_scores"


def available_modes() -> tuple[str, ...]:
    """Modes this build can run; the API answers 422 for the others."""
    modes = ["scan"]
    if _repair_registry() is not None:
        modes.append("repair")
    if _data_repair_registry() is not None:
        modes.append("repair_data")
    return tuple(modes)


def _repair_registry() -> Any:
    try:
        from core.defenses import registry
    except ImportError:
        return None
    return registry if hasattr(registry, "repair") else None


def _data_repair_registry() -> Any:
    try:
        from core.datarepair import registry
    except ImportError:
        return None
    return registry if hasattr(registry, "repair_data") else None


@dataclass
class PipelineResult:
    report: dict[str, Any]
    artifacts: dict[str, Path] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_pipeline(spec: ScanSpec, inputs: ScanInputs, work_dir: Path, device: str = "auto",
                 progress: Progress | None = None, limits: DataLimits | None = None) -> PipelineResult:
    """Run one scan; raises ``InputError`` for unusable inputs, ``StopRequested`` when ``progress``'s sink
    asks to stop; anything else is a bug or an outside failure."""
    if spec.mode not in available_modes():
        raise InputError("spec.mode", f"mode {spec.mode!r} is not available yet")
    dev = resolve_device(device)
    progress = progress or Progress()
    spans = _STAGE_SPANS[spec.mode]
    torch.manual_seed(spec.seed)

    progress.stage("load", *spans["load"])
    limits = limits or DataLimits()
    loaded = load_inputs(spec, inputs, limits)
    # the operator's allocation bound, which the upload's checks held the detector's steps to, holds at run time too
    step_bytes = limits.max_expanded_bytes
    model = create_model(spec.model.architecture, spec.model.num_classes, spec.model.in_channels)
    load_weights(model, loaded.checkpoint.state_dict)
    model.to(dev).eval()
    eval_set, train_set, acc_source = evaluation_split(loaded, spec.seed)
    backdoor = _backdoor_set(spec, loaded, eval_set)
    norm = spec.model.normalization()
    _check_finite_logits(model, eval_set.x[:FINITE_CHECK_IMAGES], norm, dev)

    before = evaluate(model, eval_set, backdoor, norm, dev,
                      progress=progress.stage("evaluate_before", *spans["evaluate_before"])).scores()
    findings = loaded.checkpoint.findings()
    report: dict[str, Any] = {
        "mode": spec.mode,
        "model": {
            "sha256": _sha256(inputs.model.path),
            "architecture": spec.model.architecture,
            "num_classes": spec.model.num_classes,
            "in_channels": spec.model.in_channels,
            "format": loaded.checkpoint.format,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            # BackdoorBench files: the names of the pickle's globals that were replaced by an inert
            # placeholder instead of being imported (sorted, the list capped; empty for every other format)
            "neutralised_globals": findings.get("ignored_globals", []),
            "neutralised_globals_count": findings.get("ignored_globals_count", 0),
        },
        # static inspection of the model file before it was loaded (rule, severity, member and offset)
        "file_findings": list(loaded.file_findings),
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
    report["verdict"] = _detect(spec, model, train_set, norm, dev, progress.stage("detect", *spans["detect"]),
                                work_dir, artifacts, "trigger_class", step_bytes)
    repaired: torch.nn.Module | None = None  # the model a repair mode returns; a scan has none
    final_scan: Any = None  # the detector's result on the repaired model where the repair already scanned it
    if spec.mode == "repair":
        repaired, final_scan = _repair(spec, model, train_set, norm, dev, progress.stage("repair", *spans["repair"]),
                                       report, step_bytes)
    elif spec.mode == "repair_data":
        assert loaded.training is not None  # load_inputs requires training_data in this mode
        report["data"]["training_images"] = len(loaded.training)
        report["data"]["training_is_corrupt"] = (None if loaded.training_is_corrupt is None
                                                 else int(loaded.training_is_corrupt.sum()))
        repaired = _repair_data(spec, model, loaded, train_set, norm, dev,
                                progress.stage("repair_data", *spans["repair_data"]), report, work_dir, artifacts)
    if repaired is not None:
        after = evaluate(repaired, eval_set, backdoor, norm, dev,
                         progress=progress.stage("evaluate_after", *spans["evaluate_after"])).scores()
        report["after"] = after
        after["verdict"] = _detect(spec, repaired, train_set, norm, dev,
                                   progress.stage("detect_after", *spans["detect_after"]), work_dir, artifacts,
                                   "repaired_trigger_class", step_bytes, reuse=final_scan)
        if before["asr"] is not None and after["asr"] is not None:
            from core.metrics import defense_effectiveness_rating

            report["der"] = defense_effectiveness_rating(before["acc"], before["asr"], after["acc"], after["asr"])
        path = work_dir / "repaired_model.safetensors"
        _save_like_upload(repaired, loaded.checkpoint.state_dict, path)
        artifacts["repaired_model"] = path

    progress.stage("report", *spans["report"]).update(1.0)
    progress.close()
    report["timings"] = dict(progress.timings)
    report["versions"] = versions()
    return PipelineResult(report=report, artifacts=artifacts)


def _repair(spec: ScanSpec, model: torch.nn.Module, train_set: ImageSet, norm: Any, dev: torch.device,
            stage: Progress, report: dict[str, Any], step_bytes: int) -> tuple[torch.nn.Module, Any]:
    """Mode repair: the backdoor repair on the clean part; its account goes to ``report["repair"]``. Returns the
    repaired model and the detector's result on it where the repair scanned it with the spec's detect config
    (tsbd's escalation), else ``None``."""
    try:
        # the detector's verdict lets the automatic tsbd keep a clean model or repair it gently (its
        # clean_check); its own scans (clean_check "scan", the gentle repair's escalation) use the same config
        from core.spec import detect_config

        dcfg = detect_config(spec.detect.params) if spec.detect.enabled else None
        result = _repair_registry().repair(spec.repair.method, model, train_set, norm, spec.repair.params, dev,
                                           spec.model.num_classes, spec.seed, progress=stage,
                                           verdict=report["verdict"].get("label"), detect_config=dcfg,
                                           detect_step_bytes=step_bytes)
    except ValueError as exc:  # parameters the method's config refuses
        raise InputError("spec.repair.params", str(exc)) from exc
    report["repair"] = {"method": result.method, "params": result.params, "chosen": result.chosen,
                        "details": result.details, "timings": result.timings}
    return result.model, (result.final_scan if dcfg is not None else None)


def _repair_data(spec: ScanSpec, model: torch.nn.Module, loaded: LoadedInputs, clean: ImageSet, norm: Any,
                 dev: torch.device, stage: Progress, report: dict[str, Any], work_dir: Path,
                 artifacts: dict[str, Path]) -> torch.nn.Module:
    """Mode repair_data: find the harmful samples of ``training_data`` with the clean part (never the evaluation
    set) and repair the model; the account goes to ``report["repair_data"]``, every sample's score, flag and new
    label to the CSV artifact ``sample_scores``."""
    training = loaded.training
    assert training is not None
    try:
        result = _data_repair_registry().repair_data(
            spec.repair_data.method, model, training, clean, norm, spec.repair_data.params, dev,
            spec.model.num_classes, spec.seed, progress=stage)
    except ValueError as exc:  # parameters the method refuses, or scores that are not finite (the cause named)
        raise InputError("spec.repair_data", str(exc)) from exc
    scores, flagged, new_labels, input_flagged = _checked_sample_arrays(result, len(training))
    section: dict[str, Any] = {
        "method": result.method, "params": result.params,
        "training_images": len(training),
        "n_flagged": int(flagged.sum()),
        # a relabelled sample keeps its input and trains on another label; a dropped one (-1) is not learnt from
        "n_relabelled": int(((new_labels >= 0) & (new_labels != training.y)).sum()),
        "n_dropped": int((new_labels < 0).sum()),
        # flagged because the input is not drawn like the clean inputs (None: the method did not look)
        "n_input_flagged": None if input_flagged is None else int(input_flagged.sum()),
        "identification": None,
        "details": result.details, "timings": result.timings,
    }
    if loaded.training_is_corrupt is not None:
        from core.metrics import identification_quality

        section["identification"] = identification_quality(scores, flagged, loaded.training_is_corrupt)
    report["repair_data"] = section
    artifacts[SAMPLE_SCORES_ARTIFACT] = write_sample_scores(
        work_dir / f"{SAMPLE_SCORES_ARTIFACT}.csv", training.y, scores, flagged, new_labels,
        loaded.training_is_corrupt, input_flagged)
    return result.model


def _checked_sample_arrays(result: Any, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(scores, flagged, new_labels, input_flagged or None) of a data repair, one per training sample; the
    method promised finite scores, so anything else is a bug here, never a silently kept NaN."""
    scores = np.asarray(result.scores, dtype=np.float64)
    flagged = np.asarray(result.flagged, dtype=bool)
    new_labels = np.asarray(result.new_labels, dtype=np.int64)
    input_flagged = None if result.input_flagged is None else np.asarray(result.input_flagged, dtype=bool)
    arrays = (("scores", scores), ("flagged", flagged), ("new_labels", new_labels), ("input_flagged", input_flagged))
    for name, arr in arrays:
        if arr is not None and arr.shape != (n,):
            raise RuntimeError(f"data repair {result.method!r} returned {name} of shape {arr.shape}, not ({n},)")
    if not np.isfinite(scores).all():
        raise RuntimeError(f"data repair {result.method!r} returned {int((~np.isfinite(scores)).sum())} "
                           "non-finite scores")
    return scores, flagged, new_labels, input_flagged


def write_sample_scores(path: Path, labels: np.ndarray, scores: np.ndarray, flagged: np.ndarray,
                        new_labels: np.ndarray, is_corrupt: np.ndarray | None = None,
                        input_flagged: np.ndarray | None = None) -> Path:
    """The ``sample_scores`` CSV: one row per training sample in upload order, ``index,label,score,flagged,
    new_label`` (flags 0/1, ``new_label`` -1 for a dropped sample), then ``input_flagged`` (0/1: flagged because
    the input is not drawn like the clean inputs) when the method scored input quality, and ``is_corrupt`` when it
    was uploaded."""
    import csv

    extra_cols = [(name, arr.astype(np.int64).tolist()) for name, arr in
                  (("input_flagged", input_flagged), ("is_corrupt", is_corrupt)) if arr is not None]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["index", "label", "score", "flagged", "new_label", *(name for name, _ in extra_cols)])
        for i, (label, score, flag, new) in enumerate(zip(labels.tolist(), scores.tolist(),
                                                          flagged.astype(np.int64).tolist(), new_labels.tolist(),
                                                          strict=True)):
            out.writerow([i, label, repr(score), flag, new, *(values[i] for _, values in extra_cols)])
    return path


# evaluation images the uploaded model's logits are checked finite on before anything is measured
FINITE_CHECK_IMAGES = 256


def _check_finite_logits(model: torch.nn.Module, images: np.ndarray, norm: Any, dev: torch.device) -> None:
    """``InputError`` at ``model`` when its logits on ``images`` are NaN or infinite: finite weights can still
    overflow (3e38 in a float32 layer), and every score of the report would be NaN (the detectors' verdict
    'clean' on them), a report PostgreSQL's jsonb refuses to store after the whole run."""
    from core.data.transforms import to_model_input

    with torch.inference_mode():
        logits = model(to_model_input(images, norm, dev))
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits).all(dim=1)).sum())
        raise InputError("model", f"the model's logits are NaN or infinite on {bad} of {len(images)} clean "
                                  "images (finite weights that overflow?); nothing can be measured on it")


def _detect(spec: ScanSpec, model: torch.nn.Module, clean: ImageSet, norm: Any, dev: torch.device,
            stage: Progress, work_dir: Path, artifacts: dict[str, Path], prefix: str, step_bytes: int,
            reuse: Any = None) -> dict[str, Any]:
    """The detector's verdict on ``model`` from the clean data the repair may learn from (never the evaluation
    set, so ACC/ASR stay independent of it); each inverted trigger becomes a PNG artifact ``<prefix>_<k>``.
    ``reuse``: a result of the same scan of ``model`` already run (the repair's own), reported instead of a rerun."""
    if not spec.detect.enabled:
        return {"label": None, "skipped": True, "reason": "spec.detect.enabled is false"}
    if reuse is not None:
        stage.update(1.0)
        return _verdict(reuse, work_dir, artifacts, prefix) | {
            "reused": "the repair's last escalation scan of this model (same clean data and detect config)"}
    from core.detect import scan_model
    from core.spec import detect_config

    def should_stop() -> bool:
        stage.check()  # raises StopRequested itself: the worker maps cancel and the time limit as elsewhere
        return False

    from core.detect.config import ConfigError

    try:
        result = scan_model(model, clean, norm, detect_config(spec.detect.params), dev, spec.model.num_classes,
                            spec.seed, progress=stage.update, should_stop=should_stop, max_step_bytes=step_bytes)
    except ConfigError as exc:  # a setting refused only once the data are known
        raise InputError(f"spec.detect.params.{exc.field}", str(exc)) from exc
    except ValueError as exc:  # data the detector cannot use (too few clean images, labels out of range)
        raise InputError("clean_data", f"trigger-free detection: {exc}") from exc
    return _verdict(result, work_dir, artifacts, prefix)


def _verdict(result: Any, work_dir: Path, artifacts: dict[str, Path], prefix: str) -> dict[str, Any]:
    """A detector result as the report's verdict; each inverted trigger becomes a PNG artifact ``<prefix>_<k>``."""
    for cls, image in sorted(result.trigger_images.items()):
        artifacts[f"{prefix}_{cls}"] = _write_png(image, work_dir / f"{prefix}_{cls}.png")
    return {"label": result.verdict, "score": result.score, "suspected_targets": list(result.suspected_targets),
            "evidence": result.evidence}


def _write_png(image: np.ndarray, path: Path) -> Path:
    """A uint8 H×W×C trigger as a PNG (one channel as greyscale)."""
    from PIL import Image

    pixels = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(path, format="PNG")
    return path


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
