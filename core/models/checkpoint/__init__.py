"""Loading untrusted checkpoints without running anything they hold, and writing repaired weights.

Formats: safetensors (``safetensors_file``: header validated first), zip-format torch files via
``torch.load(weights_only=True)`` (``torch_zip``, after ``archive`` has audited every record), and
BackdoorBench results, whose pickled dataset objects ``weights_only`` refuses (``backdoorbench``: an
allowlist unpickler that rebuilds tensors and containers and turns every other global into one inert
placeholder). Every loaded tensor passes ``tensors.check_tensors``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from core.models.checkpoint.errors import (
    CheckpointError,
    CheckpointFormat,
    CheckpointLimits,
    LoadedCheckpoint,
    UnsupportedFormatError,
)
from core.models.checkpoint.safetensors_file import (
    SAFETENSORS_EXTENSIONS,
    load_safetensors,
    looks_like_safetensors,
)
from core.models.checkpoint.torch_zip import TORCH_EXTENSIONS, load_torch_zip

__all__ = [
    "SAFETENSORS_EXTENSIONS",
    "TORCH_EXTENSIONS",
    "CheckpointError",
    "CheckpointFormat",
    "CheckpointLimits",
    "LoadedCheckpoint",
    "UnsupportedFormatError",
    "load_checkpoint",
    "save_safetensors",
]


def load_checkpoint(
    path: str | Path, filename: str | None = None, *, limits: CheckpointLimits = CheckpointLimits()
) -> LoadedCheckpoint:
    """Load the weights in ``path``; ``filename`` is the client's name for it (its extension picks the format
    when ``path`` is a temporary file). Raises :class:`CheckpointError` / :class:`UnsupportedFormatError`."""
    path = Path(path)
    suffix = Path(filename or path.name).suffix.lower()
    if suffix in SAFETENSORS_EXTENSIONS:
        return load_safetensors(path)
    if suffix in TORCH_EXTENSIONS:
        with open(path, "rb") as f:
            head = f.read(9)
        if looks_like_safetensors(head):
            # a safetensors file under a torch name: its content decides
            return load_safetensors(path)
        return load_torch_zip(path, limits)
    raise UnsupportedFormatError(
        f"unsupported checkpoint format {suffix or '(no extension)'!r}: upload a .safetensors file "
        "(preferred) or a PyTorch state dict saved with torch.save (.pt, .pth, .bin); ONNX, Keras, "
        "TorchScript and plain pickle files are not accepted"
    )


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write ``state_dict`` as safetensors (CPU, contiguous, no shared memory, as the format requires)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata=metadata)
