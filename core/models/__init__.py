"""Architectures, strict weight loading and safe checkpoint loading."""

from core.models.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    UnsupportedFormatError,
    load_checkpoint,
    save_safetensors,
)
from core.models.registry import (
    ARCHITECTURES,
    UnknownArchitectureError,
    create_model,
    is_known_architecture,
    torchvision_classification_models,
)
from core.models.weights import (
    ArchitectureMismatchError,
    NonFiniteWeightsError,
    WeightsError,
    check_state_dict,
    load_weights,
    strip_module_prefix,
)

__all__ = [
    "ARCHITECTURES",
    "ArchitectureMismatchError",
    "CheckpointError",
    "LoadedCheckpoint",
    "NonFiniteWeightsError",
    "UnknownArchitectureError",
    "UnsupportedFormatError",
    "WeightsError",
    "check_state_dict",
    "create_model",
    "is_known_architecture",
    "load_checkpoint",
    "load_weights",
    "save_safetensors",
    "strip_module_prefix",
    "torchvision_classification_models",
]
