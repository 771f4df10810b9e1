"""The scan specification clients send as the ``spec`` part (docs/api.md), validated field by field."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator, model_validator

from core.data.transforms import Normalization
from core.ranges import has_control_character

# mean and std are of x/255, so they lie in [0, 1]; a std below 1e-3 would blow inputs up past any weight's
# range (1/255, which turns x/255 back into x, is still allowed). JSON's NaN/Infinity are refused, and so are
# "0.5" and true (strict: a JSON number, as every parameter's)
Mean = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)]
Std = Annotated[float, Field(ge=1e-3, le=1.0, allow_inf_nan=False, strict=True)]


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    architecture: str = Field(description="preactresnet18, resnet20, vgg19_bn or torchvision.<name>")
    num_classes: int = Field(ge=2, le=100_000, strict=True)  # a JSON integer: 10.0 and true are refused
    in_channels: Literal[1, 3] = 3
    mean: list[Mean] | None = Field(None, min_length=1, max_length=3,
                                    description="per-channel mean of x/255, each in [0, 1]; default: none")
    std: list[Std] | None = Field(None, min_length=1, max_length=3,
                                  description="per-channel std of x/255, each in [0.001, 1]; default: none")

    @field_validator("in_channels", mode="before")
    @classmethod
    def _integer_channels(cls, v: Any) -> Any:
        if isinstance(v, bool | float):  # true == 1.0 == 1 to a Literal; neither is a JSON integer
            raise ValueError(f"in_channels must be the JSON integer 1 or 3, got {v!r}")
        return v

    @field_validator("architecture")
    @classmethod
    def _known(cls, v: str) -> str:
        from core.models.registry import ARCHITECTURES, is_known_architecture

        if not is_known_architecture(v):
            raise ValueError(f"unknown architecture {v!r}; known: {', '.join(ARCHITECTURES)} or torchvision.<name>")
        return v

    @model_validator(mode="after")
    def _normalisation(self) -> ModelSpec:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) not in (1, self.in_channels):
                raise ValueError(f"{name} must have 1 or in_channels={self.in_channels} values, got {len(values)}")
        return self

    def normalization(self) -> Normalization:
        return Normalization(tuple(self.mean or [0.0]), tuple(self.std or [1.0]))


class AttackSpec(BaseModel):
    """A built-in trigger used to build triggered test inputs when no ``poisoned_data`` is uploaded."""

    model_config = ConfigDict(extra="forbid")

    type: str
    target: int = Field(0, ge=0, le=100_000, strict=True)
    params: dict[str, Any] = Field(default_factory=dict, description="the attack's own settings (docs/)")

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        from core.attacks.registry import ATTACKS

        if v not in ATTACKS:
            raise ValueError(f"unknown attack {v!r}; known: {', '.join(sorted(ATTACKS))}")
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Names, types and ranges of the attack's parameters (errors located at ``attack.params.<name>``)."""
        from core.attacks.registry import check_attack_params

        if "type" in info.data:  # an unknown type is already an error of its own
            check_attack_params(info.data["type"], v)
        return v


class RepairSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = "tsbd"
    params: dict[str, Any] = Field(default_factory=dict, description="the method's settings (docs/)")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        methods = _repair_methods()
        if methods is not None and v not in methods:
            raise ValueError(f"repair.method {v!r} is unknown; known: {', '.join(methods)}")
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Names, types and ranges of the method's parameters (errors located at ``repair.params.<name>``)."""
        if "method" in info.data and _repair_methods() is not None:
            from core.defenses.registry import validate_params

            validate_params(info.data["method"], v)
        return v


def _repair_methods() -> tuple[str, ...] | None:
    """The repair methods of this build (``None`` without them: the API answers that the mode is not
    available)."""
    try:
        from core.defenses.registry import REPAIR_METHODS
    except ImportError:
        return None
    return tuple(REPAIR_METHODS)


def _data_repair_methods() -> tuple[str, ...] | None:
    """The data-repair methods of this build (``None`` without them: mode repair_data is not available)."""
    try:
        from core.datarepair.registry import DATA_REPAIR_METHODS
    except ImportError:
        return None
    return tuple(DATA_REPAIR_METHODS)


def _default_data_repair_method() -> str:
    try:
        from core.datarepair.registry import DEFAULT_DATA_REPAIR_METHOD
    except ImportError:
        return ""
    return str(DEFAULT_DATA_REPAIR_METHOD)


class RepairDataSpec(BaseModel):
    """Mode ``repair_data``: which detrimental-data repair runs on ``training_data`` (docs/datarepair.md)."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(default_factory=_default_data_repair_method,
                        description="a data-repair method (docs/parameters.md); default: the recommended one")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's settings (docs/parameters.md)")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        methods = _data_repair_methods()
        if methods is not None and v not in methods:
            raise ValueError(f"repair_data.method {v!r} is unknown; known: {', '.join(methods)}")
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Names, types and ranges of the method's parameters (errors located at ``repair_data.params.<name>``)."""
        if "method" in info.data and _data_repair_methods() is not None:
            from core.datarepair.registry import validate_params

            validate_params(info.data["method"], v)
        return v


class DetectSpec(BaseModel):
    """The trigger-free backdoor detector run on the uploaded (and on the repaired) model (docs/detect.md)."""

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool = Field(True, description="run the detector; false: the verdict is skipped")
    params: dict[str, Any] = Field(default_factory=dict, description="DetectConfig fields (docs/detect.md)")

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Every key a DetectConfig field with a value in its range (errors located at
        ``detect.params.<field>``), so a bad setting is refused at submission, not minutes into the scan."""
        detect_config(v)
        return v


def detect_config(params: dict[str, Any]) -> Any:
    """The :class:`core.detect.DetectConfig` of ``params``; a refused value raises a pydantic
    ``ValidationError`` located at the field (whole-number fields must be JSON integers)."""
    import dataclasses

    from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

    from core.detect.config import ConfigError, DetectConfig

    def refuse(key: str, message: str) -> ValidationError:
        return ValidationError.from_exception_data("detect parameters", [InitErrorDetails(
            type=PydanticCustomError("invalid_parameter", "{message}", {"message": message}),
            loc=(key,), input=params.get(key))])

    defaults = {f.name: f.default for f in dataclasses.fields(DetectConfig)}
    for key, value in params.items():
        wanted = type(defaults.get(key))
        if key in defaults and wanted is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise refuse(key, f"must be a whole number (JSON integer), got {value!r}")
        if key in defaults and wanted is tuple and not (isinstance(value, list | tuple)
                                                        and all(isinstance(x, str) for x in value)):
            raise refuse(key, f"must be a list of detector names, got {value!r}")
    try:
        return DetectConfig.from_dict(params)
    except ConfigError as exc:
        raise refuse(exc.field, str(exc)) from exc


MAX_NOTIFY_URL_LENGTH = 2048  # longer URLs are refused by many servers anyway; keeps the spec row small


class NotifySpec(BaseModel):
    """Where to send the signed webhook when the scan ends; the operator's host allowlist is checked by the
    API (store/webhook_guard.py), the addresses by the worker after DNS resolution."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="http(s) URL without credentials, at most 2048 characters")

    @field_validator("url")
    @classmethod
    def _plain_http_url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        if len(v) > MAX_NOTIFY_URL_LENGTH:
            raise ValueError(f"notify.url is longer than {MAX_NOTIFY_URL_LENGTH} characters")
        if any(c.isspace() for c in v) or has_control_character(v):
            raise ValueError("notify.url must not contain spaces or control characters")
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https"):
            raise ValueError("notify.url must start with http:// or https://")
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise ValueError("notify.url must not carry credentials (user:password@); the payload is signed")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError("notify.url has an invalid port") from exc
        if not parts.hostname or port == 0:
            raise ValueError("notify.url has no host")
        if parts.fragment:
            raise ValueError("notify.url must not have a #fragment")
        return v


class ScanSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["scan", "repair", "repair_data"]
    model: ModelSpec
    attack: AttackSpec | None = None
    repair: RepairSpec = Field(default_factory=RepairSpec)
    repair_data: RepairDataSpec = Field(default_factory=RepairDataSpec)
    detect: DetectSpec = Field(default_factory=DetectSpec)
    seed: int = Field(0, ge=0, le=2**31 - 1, strict=True)
    notify: NotifySpec | None = None

    @model_validator(mode="after")
    def _target_in_range(self) -> ScanSpec:
        if self.attack is not None and self.attack.target >= self.model.num_classes:
            raise ValueError(f"attack.target {self.attack.target} is not a class of a "
                             f"{self.model.num_classes}-class model")
        if (self.mode == "repair" and self.repair.method == "tsbd" and self.repair.params.get("clean_check") == "given"
                and not self.detect.enabled):
            # without the detector there is no verdict to read: the repair would quietly fall back to the full rule
            raise ValueError("repair.params.clean_check 'given' reads the detector's verdict on the uploaded model, "
                             "but detect.enabled is false: switch the detector on, or use clean_check 'scan' (the "
                             "repair scans the model itself) or 'off'")
        return self


def parameter_reference() -> str:
    """docs/parameters.md: every attack and repair parameter with its default and range, from the code (a
    test keeps the file equal to this)."""
    import dataclasses

    from core.attacks.registry import ATTACKS, attack_param_types
    from core.defenses.registry import COMMON_PARAMS, REPAIR_METHODS
    from core.defenses.robust_head import RobustHeadConfig
    from core.ranges import MAX_BATCH_SIZE, MAX_EPOCHS, MAX_LEARNING_RATE, MIN_LEARNING_RATE, describe

    def row(name: str, tp: Any, default: Any) -> str:
        shown = list(default) if isinstance(default, tuple) else default
        return f"| `{name}` | {describe(tp)} | `{json.dumps(shown)}` |"

    lines = ["# Spec parameters: names, defaults and ranges", "",
             "Generated from the code (`core.spec.parameter_reference()`; a test keeps this file equal to it). "
             "Every value is checked when the scan is submitted: a bad one is answered 422 with `field` naming "
             "it, e.g. `spec.repair.params.epochs`. Whole numbers must be JSON integers (`2.5` and `true` are "
             "refused), numbers must be finite (`NaN`, `Infinity` are refused), switches JSON booleans.", "",
             f"Common bounds: epochs 0-{MAX_EPOCHS}, batch sizes 1-{MAX_BATCH_SIZE}, learning rates in "
             f"[{MIN_LEARNING_RATE:g}, {MAX_LEARNING_RATE:g}]; with at most `ANTIDOTE_MAX_IMAGES` images this bounds a "
             "repair's work, and the scan time limit (`ANTIDOTE_SCAN_TIME_LIMIT_S`) still stops it between "
             "batches.", "",
             "## `spec.model`", "", "| field | type and range | default |", "| --- | --- | --- |"]
    for name, info in ModelSpec.model_fields.items():
        if name in ("mean", "std"):
            lines.append(f"| `{name}` | list of 1 or `in_channels` values, {info.description} | `null` |")
    lines += ["", "## `spec.repair.params`", "", "Parameters every method takes:", "",
              "| parameter | type and range | default |", "| --- | --- | --- |"]
    head = RobustHeadConfig()
    for name, tp in COMMON_PARAMS.items():
        lines.append(row(name, tp, getattr(head, name, False)))
    for method, entry in REPAIR_METHODS.items():
        cfg = entry.configure({}, 0)
        lines += ["", f"### `{method}`", "", entry.description + ".", "",
                  "| parameter | type and range | default |", "| --- | --- | --- |"]
        for name, tp in entry.param_types.items():
            owner = cfg if name in {f.name for f in dataclasses.fields(cfg)} else cfg.finetune
            lines.append(row(name, tp, getattr(owner, name)))
    lines += _data_repair_reference(row)
    lines += ["", "## `spec.attack.params`", "",
              "`spec.attack.target` is a class of the model; `spec.seed` seeds the random patterns. Limits that "
              "depend on the image size (`patch_size`, `k` at most the image's side) are checked when the "
              "scan runs.", ""]
    for name, builder in ATTACKS.items():
        defaults = {f.name: f.default for f in dataclasses.fields(builder)}  # type: ignore[arg-type]
        lines += [f"### `{name}`", "", "| parameter | type and range | default |", "| --- | --- | --- |"]
        lines += [row(p, tp, defaults[p]) for p, tp in attack_param_types(name).items()] + [""]
    from core.detect.config import DetectConfig
    from core.detect.registry import DETECTORS
    from core.ranges import field_types

    detect = DetectConfig()
    lines += ["## `spec.detect.params`", "",
              "`spec.detect.enabled` (default `true`) switches the trigger-free detector on or off; `params` sets "
              f"any of these (docs/detect.md). Detector names: {', '.join(f'`{d}`' for d in DETECTORS)}; "
              "`strong_p_value` must not exceed `p_value`.", "",
              "| parameter | type and range | default |", "| --- | --- | --- |"]
    lines += [row(name, tp, getattr(detect, name)) for name, tp in field_types(DetectConfig).items()] + [""]
    return "\n".join(lines)


def _data_repair_reference(row: Any) -> list[str]:
    """docs/parameters.md's ``spec.repair_data.params`` part: each data-repair method's parameters with their
    defaults, read from the configs the method builds from no parameters (none without core/datarepair)."""
    import dataclasses

    try:
        from core.datarepair.registry import DATA_REPAIR_METHODS, DEFAULT_DATA_REPAIR_METHOD
    except ImportError:
        return []
    lines = ["", "## `spec.repair_data.params`", "",
             f"Mode `repair_data` ([datarepair.md](datarepair.md)). `spec.repair_data.method` defaults to "
             f"`{DEFAULT_DATA_REPAIR_METHOD}`."]
    for method, entry in DATA_REPAIR_METHODS.items():
        configs = entry.configure({}, 0)
        defaults = {f.name: getattr(cfg, f.name) for cfg in configs.values() for f in dataclasses.fields(cfg)}
        lines += ["", f"### `{method}`", "", entry.description + ".", "",
                  "| parameter | type and range | default |", "| --- | --- | --- |"]
        lines += [row(name, tp, defaults[name]) for name, tp in entry.param_types.items()]
    return lines
