"""The scan specification clients send as the ``spec`` part (docs/api.md), validated field by field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.data.transforms import Normalization


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    architecture: str = Field(description="preactresnet18, resnet20, vgg19_bn or torchvision.<name>")
    num_classes: int = Field(ge=2, le=100_000)
    in_channels: Literal[1, 3] = 3
    mean: list[float] | None = Field(None, description="per-channel mean of x/255; default: none")
    std: list[float] | None = Field(None, description="per-channel std of x/255; default: none")

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
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("every std value must be positive")
        return self

    def normalization(self) -> Normalization:
        return Normalization(tuple(self.mean or [0.0]), tuple(self.std or [1.0]))


class AttackSpec(BaseModel):
    """A built-in trigger used to build triggered test inputs when no ``poisoned_data`` is uploaded."""

    model_config = ConfigDict(extra="forbid")

    type: str
    target: int = Field(0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        from core.attacks.registry import ATTACKS

        if v not in ATTACKS:
            raise ValueError(f"unknown attack {v!r}; known: {', '.join(sorted(ATTACKS))}")
        return v


class RepairSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = "tsbd"
    params: dict[str, Any] = Field(default_factory=dict)


class ScanSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["scan", "repair", "repair_data"]
    model: ModelSpec
    attack: AttackSpec | None = None
    repair: RepairSpec = Field(default_factory=RepairSpec)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _repair_params(self) -> ScanSpec:
        if self.mode != "repair":
            return self
        try:
            from core.defenses.registry import REPAIR_METHODS, validate_params
        except ImportError:
            return self  # the API answers that the mode is not available
        if self.repair.method not in REPAIR_METHODS:
            raise ValueError(f"repair.method {self.repair.method!r} is unknown; known: {', '.join(REPAIR_METHODS)}")
        try:
            validate_params(self.repair.method, self.repair.params)
        except ValueError as exc:
            raise ValueError(f"repair.params: {exc}") from exc
        return self

    @model_validator(mode="after")
    def _target_in_range(self) -> ScanSpec:
        if self.attack is not None and self.attack.target >= self.model.num_classes:
            raise ValueError(f"attack.target {self.attack.target} is not a class of a "
                             f"{self.model.num_classes}-class model")
        return self
