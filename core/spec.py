"""The scan specification clients send as the ``spec`` part (CONTRACT.md), validated field by field."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from core.data.transforms import Normalization

# mean and std are of x/255, so they lie in [0, 1]; a std below 1e-3 would blow inputs up past any weight's
# range (1/255, which turns x/255 back into x, is still allowed). JSON's NaN/Infinity are refused.
Mean = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Std = Annotated[float, Field(ge=1e-3, le=1.0, allow_inf_nan=False)]


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    architecture: str = Field(description="preactresnet18, resnet20, vgg19_bn or torchvision.<name>")
    num_classes: int = Field(ge=2, le=100_000)
    in_channels: Literal[1, 3] = 3
    mean: list[Mean] | None = Field(None, min_length=1, max_length=3,
                                    description="per-channel mean of x/255, each in [0, 1]; default: none")
    std: list[Std] | None = Field(None, min_length=1, max_length=3,
                                  description="per-channel std of x/255, each in [0.001, 1]; default: none")

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
    target: int = Field(0, ge=0, le=100_000)
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


class ScanSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["scan", "repair", "repair_data"]
    model: ModelSpec
    attack: AttackSpec | None = None
    repair: RepairSpec = Field(default_factory=RepairSpec)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _target_in_range(self) -> ScanSpec:
        if self.attack is not None and self.attack.target >= self.model.num_classes:
            raise ValueError(f"attack.target {self.attack.target} is not a class of a "
                             f"{self.model.num_classes}-class model")
        return self
