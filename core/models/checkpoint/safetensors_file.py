"""safetensors: the header is validated here before the safetensors library sees the file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from core.models.checkpoint.errors import CheckpointError, LoadedCheckpoint, is_nonneg_int
from core.models.checkpoint.tensors import check_tensors

SAFETENSORS_EXTENSIONS = (".safetensors",)

MAX_SAFETENSORS_HEADER_BYTES = 16 * 1024 * 1024
MAX_SAFETENSORS_ENTRIES = 100_000
MAX_TENSOR_DIMS = 32

_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def looks_like_safetensors(head: bytes) -> bool:
    """True when the first 9 bytes of a file are a safetensors header's length and its opening brace."""
    return head[:4] != b"PK\x03\x04" and len(head) == 9 and head[8:9] == b"{"


def load_safetensors(path: Path) -> LoadedCheckpoint:
    """The tensors of a safetensors file, after :func:`validate_safetensors_header`."""
    header = validate_safetensors_header(path)
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - the library's parser of hostile bytes: its errors are the file's fault
        raise CheckpointError(f"safetensors file could not be read: {e}") from e
    check_tensors(state_dict, "safetensors")
    meta = header.get("__metadata__") or {}
    return LoadedCheckpoint(state_dict=dict(state_dict), format="safetensors", meta=dict(meta))


def validate_safetensors_header(path: Path) -> dict[str, Any]:
    """Check the header before the safetensors library sees the file: sizes, entry count, dtypes, offsets."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise CheckpointError(
                f"safetensors file is truncated: {size} bytes, shorter than its 8-byte header length"
            )
        n = int.from_bytes(first, "little")
        if n > MAX_SAFETENSORS_HEADER_BYTES:
            raise CheckpointError(
                f"safetensors header length {n} exceeds the limit of {MAX_SAFETENSORS_HEADER_BYTES} bytes"
            )
        if n > size - 8:
            raise CheckpointError(
                f"safetensors file is truncated or corrupt: header length {n} exceeds the "
                f"{size - 8} bytes after it"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"safetensors header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError("safetensors __metadata__ must be an object of strings")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(entries) > MAX_SAFETENSORS_ENTRIES:
        raise CheckpointError(
            f"safetensors header has {len(entries)} tensors, over the limit of {MAX_SAFETENSORS_ENTRIES}"
        )
    if not entries:
        raise CheckpointError("safetensors file holds no tensors")
    data_len = size - 8 - n
    spans = []
    for name, e in entries.items():
        if not isinstance(e, dict):
            raise CheckpointError(f"safetensors entry {name!r} is not an object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPE_BYTES:
            raise CheckpointError(f"safetensors entry {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(is_nonneg_int(d) for d in shape):
            raise CheckpointError(f"safetensors entry {name!r} has an invalid shape {shape!r}")
        if len(shape) > MAX_TENSOR_DIMS:
            raise CheckpointError(f"safetensors entry {name!r} has {len(shape)} dimensions")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_nonneg_int(o) for o in offsets)):
            raise CheckpointError(f"safetensors entry {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not begin <= end <= data_len:
            raise CheckpointError(
                f"safetensors entry {name!r} has data_offsets [{begin}, {end}] outside the "
                f"{data_len}-byte data section"
            )
        needed = math.prod(shape) * _SAFETENSORS_DTYPE_BYTES[dtype]
        if end - begin != needed:
            raise CheckpointError(
                f"safetensors entry {name!r}: data_offsets span {end - begin} bytes, "
                f"but {dtype} {shape} needs {needed}"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev_name), (begin, end, name) in zip(spans, spans[1:], strict=False):
        if begin < prev_end and end > begin:
            raise CheckpointError(f"safetensors entries {prev_name!r} and {name!r} overlap")
    return header
