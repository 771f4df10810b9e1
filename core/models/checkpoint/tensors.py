"""The one check every loaded state dict passes: plain dense CPU tensors of ordinary dtypes.

Meta, sparse, quantized and nested tensors load without error but break (or mislead) every later step that
reads their values, so they are refused here with the key that holds them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from core.models.checkpoint.errors import CheckpointError

# dtypes a weight or buffer of a classifier can have; complex, float8 and quantized dtypes are not among them
WEIGHT_DTYPES = frozenset({
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
})  # fmt: skip


def tensor_problem(t: torch.Tensor) -> str | None:
    """Why ``t`` cannot be a loaded weight, or ``None`` when it can."""
    if t.is_nested:
        return "is a nested tensor"
    if t.layout != torch.strided:
        return f"has the {str(t.layout).removeprefix('torch.')} layout; only dense (strided) tensors are loaded"
    if t.is_quantized:
        return "is quantized; save the float model's state dict"
    if t.device.type != "cpu":
        return f"is on the {t.device.type!r} device" + (" and holds no values" if t.device.type == "meta" else "")
    if t.dtype not in WEIGHT_DTYPES:
        return f"has the unsupported dtype {str(t.dtype).removeprefix('torch.')}"
    # a view reaching more elements than its storage holds (stride 0) multiplies memory in whole-tensor ops
    if t.numel() > 0 and t.numel() * t.element_size() > max(t.untyped_storage().nbytes(), 1):
        return "has more elements than its storage (a repeated view)"
    return None


def check_tensors(state_dict: Mapping[str, object], kind: str) -> None:
    """Raise :class:`CheckpointError` naming the first entry of ``state_dict`` that is not a usable tensor;
    ``kind`` names the file format in the message."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{kind} entry {key!r} is a {type(value).__name__}, not a tensor")
        problem = tensor_problem(value)
        if problem is not None:
            raise CheckpointError(f"{kind} tensor {key!r} {problem}")
