"""Loading and cross-checking one scan's uploads; the API runs this at upload time, the worker again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.data.formats import DataFormatError, DataLimits, UnsupportedDataFormatError, load_image_set
from core.data.imageset import ImageSet
from core.models.checkpoint import CheckpointError, LoadedCheckpoint, UnsupportedFormatError, load_checkpoint
from core.models.checkpoint.inspect import high_findings, inspect_checkpoint
from core.models.weights import WeightsError, check_state_dict
from core.spec import ScanSpec

DATA_PARTS = ("clean_data", "test_data", "poisoned_data", "training_data")


class InputError(ValueError):
    """An upload that cannot be used, with the part or field it concerns; ``unsupported`` means wrong format."""

    def __init__(self, field: str, message: str, unsupported: bool = False,
                 findings: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.unsupported = field, message, unsupported
        self.findings = findings  # a refused code-carrying checkpoint: what it would have run


@dataclass(frozen=True)
class UploadedFile:
    path: Path
    filename: str


@dataclass(frozen=True)
class ScanInputs:
    """Where each uploaded part lies on local disk (``None`` when not uploaded)."""

    model: UploadedFile
    clean_data: UploadedFile
    test_data: UploadedFile | None = None
    poisoned_data: UploadedFile | None = None
    training_data: UploadedFile | None = None


@dataclass(frozen=True)
class LoadedInputs:
    checkpoint: LoadedCheckpoint
    clean: ImageSet
    test: ImageSet | None
    poisoned: ImageSet | None
    training: ImageSet | None
    file_findings: tuple[dict[str, Any], ...] = ()


def load_inputs(spec: ScanSpec, inputs: ScanInputs, limits: DataLimits) -> LoadedInputs:
    """Load every part and check it against the spec and the other parts; raises ``InputError``."""
    if inputs.training_data is not None and spec.mode != "repair_data":
        raise InputError("training_data", "is only used by mode repair_data")
    if spec.mode == "repair_data" and inputs.training_data is None:
        raise InputError("training_data", "is required by mode repair_data")
    try:
        # static inspection first: a file that would run code is refused before any loader opens it
        findings = inspect_checkpoint(inputs.model.path, inputs.model.filename, limits=limits.checkpoint)
        if high := high_findings(findings):
            raise InputError("model", "checkpoint carries code and is refused, never loaded: "
                             + "; ".join(f.message for f in high[:5]), findings=[f.as_dict() for f in high])
        checkpoint = load_checkpoint(inputs.model.path, inputs.model.filename, limits=limits.checkpoint)
    except UnsupportedFormatError as exc:
        raise InputError("model", str(exc), unsupported=True) from exc
    except CheckpointError as exc:
        raise InputError("model", str(exc)) from exc
    m = spec.model
    try:
        check_state_dict(m.architecture, m.num_classes, m.in_channels, checkpoint.state_dict)
    except WeightsError as exc:  # wrong keys or shapes, or non-finite weights
        raise InputError("model", str(exc)) from exc

    sets: dict[str, ImageSet | None] = {}
    for part in DATA_PARTS:
        uploaded: UploadedFile | None = getattr(inputs, part)
        sets[part] = None if uploaded is None else _load_data(part, uploaded, spec, limits)
    clean = sets["clean_data"]
    assert clean is not None
    if len(clean) < 2:
        raise InputError("clean_data", "needs at least 2 images")
    for part in DATA_PARTS[1:]:
        other = sets[part]
        if other is not None and other.image_shape[:2] != clean.image_shape[:2]:
            raise InputError(part, f"images are {other.image_shape[0]}x{other.image_shape[1]} but clean_data's "
                                   f"are {clean.image_shape[0]}x{clean.image_shape[1]}")
    if spec.attack is not None and sets["poisoned_data"] is None:
        from core.attacks.registry import create_attack

        try:
            create_attack(spec.attack.type, target=spec.attack.target, image_shape=clean.image_shape,
                          seed=spec.seed, **spec.attack.params)
        except (ValueError, TypeError) as exc:
            raise InputError("spec.attack", str(exc)) from exc
    return LoadedInputs(checkpoint, clean, sets["test_data"], sets["poisoned_data"], sets["training_data"],
                        tuple(f.as_dict() for f in findings))


def _load_data(part: str, uploaded: UploadedFile, spec: ScanSpec, limits: DataLimits) -> ImageSet:
    try:
        data = load_image_set(uploaded.path, uploaded.filename, limits=limits, num_classes=spec.model.num_classes)
    except UnsupportedDataFormatError as exc:
        raise InputError(part, str(exc), unsupported=True) from exc
    except DataFormatError as exc:
        raise InputError(part, str(exc)) from exc
    channels = data.image_shape[2]
    if channels != spec.model.in_channels:
        raise InputError(part, f"images have {channels} channel(s) but spec.model.in_channels is "
                               f"{spec.model.in_channels}")
    return data
