"""Loading untrusted checkpoints without running anything they hold, and writing repaired weights.

Formats: safetensors (header validated here first), zip-format torch files via
``torch.load(weights_only=True)``, and BackdoorBench results, whose pickled dataset objects ``weights_only``
refuses: for those an allowlist unpickler rebuilds tensors and containers and turns every other global
into an inert placeholder.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

CheckpointFormat = Literal["safetensors", "torch", "backdoorbench"]

TORCH_EXTENSIONS = (".pt", ".pth", ".bin")
SAFETENSORS_EXTENSIONS = (".safetensors",)

MAX_SAFETENSORS_HEADER_BYTES = 16 * 1024 * 1024
MAX_SAFETENSORS_ENTRIES = 100_000
MAX_PICKLE_BYTES = 256 * 1024 * 1024
MAX_TENSOR_DIMS = 32

# the top-level keys of a BackdoorBench attack_result.pt / defense_result.pt besides ``model``
_BACKDOORBENCH_KEYS = ("model_name", "num_classes", "bd_train", "bd_test", "clean_data")

_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# the storage classes torch.save names in its persistent ids
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded; the message says why and, where possible, what to do."""


class UnsupportedFormatError(CheckpointError):
    """A checkpoint format Antidote does not load (the API answers 415)."""


@dataclass
class LoadedCheckpoint:
    """The tensors of a checkpoint and what the file said about them (BackdoorBench's ``model_name``,
    ``num_classes``; safetensors' ``__metadata__``)."""

    state_dict: dict[str, torch.Tensor]
    format: CheckpointFormat
    meta: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(path: str | Path, filename: str | None = None) -> LoadedCheckpoint:
    """Load the weights in ``path``; ``filename`` is the client's name for it (its extension picks the format
    when ``path`` is a temporary file). Raises :class:`CheckpointError` / :class:`UnsupportedFormatError`."""
    path = Path(path)
    suffix = Path(filename or path.name).suffix.lower()
    if suffix in SAFETENSORS_EXTENSIONS:
        return _load_safetensors(path)
    if suffix in TORCH_EXTENSIONS:
        with open(path, "rb") as f:
            head = f.read(9)
        if head[:4] != b"PK\x03\x04" and len(head) == 9 and head[8:9] == b"{":
            # a safetensors file under a torch name: its content decides
            return _load_safetensors(path)
        return _load_torch_zip(path)
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


# ------------------------------------------------------------------------------------ safetensors


def _load_safetensors(path: Path) -> LoadedCheckpoint:
    header = _validate_safetensors_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(path), device="cpu")
    except (SafetensorError, RuntimeError, ValueError, TypeError, OSError) as e:
        raise CheckpointError(f"safetensors file could not be read: {e}") from e
    meta = header.get("__metadata__") or {}
    return LoadedCheckpoint(state_dict=dict(state_dict), format="safetensors", meta=dict(meta))


def _validate_safetensors_header(path: Path) -> dict[str, Any]:
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
        if dtype not in _SAFETENSORS_DTYPE_BYTES:
            raise CheckpointError(f"safetensors entry {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_nonneg_int(d) for d in shape):
            raise CheckpointError(f"safetensors entry {name!r} has an invalid shape {shape!r}")
        if len(shape) > MAX_TENSOR_DIMS:
            raise CheckpointError(f"safetensors entry {name!r} has {len(shape)} dimensions")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_nonneg_int(o) for o in offsets)):
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


def _is_nonneg_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# ------------------------------------------------------------------------------------ torch zip


def _load_torch_zip(path: Path) -> LoadedCheckpoint:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise CheckpointError(
            "not a zip-format PyTorch checkpoint: legacy (pre-1.6) torch files and plain pickles are "
            "refused; re-save the state dict with torch.save on torch >= 1.6, or better, as .safetensors"
        )
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"PyTorch checkpoint is not a readable zip archive: {e}") from e
    with zf:
        prefix = _archive_prefix(zf)
        # a first look that reads no tensor data: is this a BackdoorBench result?
        top, _ = _SafeUnpickler.run(zf, prefix, read_storages=False)
        if _looks_like_backdoorbench(top):
            return _extract_backdoorbench(zf, prefix)
    return _load_weights_only(path)


def _archive_prefix(zf: zipfile.ZipFile) -> str:
    names = zf.namelist()
    pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise UnsupportedFormatError(
            "TorchScript archives are programs and are refused: upload model.state_dict() saved with "
            "torch.save, or as .safetensors"
        )
    if len(pkls) != 1:
        raise CheckpointError(
            f"not a PyTorch checkpoint: expected one '<archive>/data.pkl' in the zip, found {len(pkls)}"
        )
    prefix = pkls[0][: -len("data.pkl")]
    order = _read_member(zf, prefix + "byteorder", 16, missing_ok=True)
    if order is not None and order.strip() not in (b"little", b""):
        raise CheckpointError(
            f"PyTorch checkpoint was saved on a {order.decode(errors='replace')!r}-endian machine"
        )
    return prefix


def _read_member(zf: zipfile.ZipFile, name: str, limit: int, missing_ok: bool = False) -> bytes | None:
    """The bytes of member ``name``, refusing more than ``limit`` whatever the zip's directory declares."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        if missing_ok:
            return None
        raise CheckpointError(f"PyTorch checkpoint is missing its record {name!r}") from None
    if info.compress_type != zipfile.ZIP_STORED:
        # torch.save never compresses; a compressed record could expand far beyond the upload's size
        raise CheckpointError(
            f"PyTorch checkpoint record {name!r} is compressed; torch.save writes records uncompressed"
        )
    if info.file_size > limit:
        raise CheckpointError(
            f"PyTorch checkpoint record {name!r} is {info.file_size} bytes, over the limit of {limit}"
        )
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
        raise CheckpointError(f"PyTorch checkpoint record {name!r} is unreadable: {e}") from e
    if len(data) > limit:
        raise CheckpointError(f"PyTorch checkpoint record {name!r} expands past the limit of {limit} bytes")
    return data


def _looks_like_backdoorbench(top: object) -> bool:
    return (
        isinstance(top, dict)
        and _is_state_dict(top.get("model"))
        and any(k in top for k in _BACKDOORBENCH_KEYS)
    )


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor | _TensorStub) for k, v in obj.items())
    )


def _extract_backdoorbench(zf: zipfile.ZipFile, prefix: str) -> LoadedCheckpoint:
    top, ignored = _SafeUnpickler.run(zf, prefix, read_storages=True)
    if not _looks_like_backdoorbench(top):  # the same bytes as the first look; checked, not assumed
        raise CheckpointError("BackdoorBench result holds no state dict under 'model'")
    meta: dict[str, Any] = {}
    name = top.get("model_name")
    if isinstance(name, str):
        meta["model_name"] = name
    num_classes = top.get("num_classes")
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        meta["num_classes"] = num_classes
    # which globals were neutralised: a finding for the report, never executed
    meta["ignored_globals"] = sorted(ignored)
    return LoadedCheckpoint(state_dict=dict(top["model"]), format="backdoorbench", meta=meta)


def _load_weights_only(path: Path) -> LoadedCheckpoint:
    # This variable can turn weights_only off for callers that do not pass it; we always pass it, and removing
    # it also avoids torch's error when both FORCE variables are set. It changes the process environment.
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        hits = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
        detail = (hits or lines or ["?"])[0]
        raise CheckpointError(
            "PyTorch checkpoint refused: the file holds objects other than tensors and plain containers, "
            f"which could run code when loaded ({detail.strip()}); save only model.state_dict(), "
            "or use .safetensors"
        ) from e
    except (RuntimeError, ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"PyTorch checkpoint could not be read: {e}") from e
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in ("state_dict", "model"):
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        raise CheckpointError(
            "PyTorch checkpoint holds no state dict: expected a dict of parameter names to tensors "
            f"(model.state_dict()), or a dict holding one under 'state_dict' or 'model'; got {_describe(obj)}"
        )
    return LoadedCheckpoint(state_dict=dict(obj), format="torch")


def _describe(obj: object) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        return f"a dict with keys {keys}{', ...' if len(obj) > 5 else ''}" if obj else "an empty dict"
    return type(obj).__name__


# ------------------------------------------------------------------------------------ safe unpickler


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` and friends become: only a dtype, not callable."""

    dtype: torch.dtype


@dataclass(frozen=True)
class _StorageStub:
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _TensorStub:
    """A tensor's description when storages are not read (the first look at a file)."""

    dtype: torch.dtype
    shape: tuple[int, ...]


class _Inert:
    """Stands in for every global outside the allowlist: building, calling, filling or setting state on it
    does nothing and calls nothing."""

    global_name = "?"

    def __new__(cls, *args: object, **kwargs: object) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> _Inert:
        return self

    def __setstate__(self, state: object) -> None:
        pass

    def __setattr__(self, name: str, value: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass

    def add(self, item: object) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"


_UNPICKLING_ERRORS = (
    pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError,
    RecursionError, MemoryError, RuntimeError, OverflowError, UnicodeDecodeError,
)  # fmt: skip


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch zip with an allowlist: tensors and containers are rebuilt by our own
    code; any other global becomes an :class:`_Inert` subclass, so nothing named in the file runs."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, data: bytes, read_storages: bool) -> None:
        super().__init__(io.BytesIO(data))
        self._zf = zf
        self._prefix = prefix
        self._read_storages = read_storages
        self._storages: dict[str, torch.Tensor | _StorageStub] = {}
        self._inert: dict[str, type[_Inert]] = {}
        self._allowed: dict[tuple[str, str], Callable[..., Any]] = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("collections", "OrderedDict"): collections.OrderedDict,
        }

    @classmethod
    def run(cls, zf: zipfile.ZipFile, prefix: str, read_storages: bool) -> tuple[Any, set[str]]:
        """The unpickled object and the names of the globals that were made inert."""
        data = _read_member(zf, prefix + "data.pkl", MAX_PICKLE_BYTES) or b""
        unpickler = cls(zf, prefix, data, read_storages)
        try:
            obj = unpickler.load()
        except CheckpointError:
            raise
        except _UNPICKLING_ERRORS as e:
            raise CheckpointError(
                f"PyTorch checkpoint's data.pkl is corrupt or hostile: {type(e).__name__}: {e}"
            ) from e
        return obj, set(unpickler._inert)

    def find_class(self, module: str, name: str) -> Any:
        allowed = self._allowed.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        qualified = f"{module}.{name}"
        inert = self._inert.get(qualified)
        if inert is None:
            inert = type(f"Inert[{qualified}]", (_Inert,), {"global_name": qualified})
            self._inert[qualified] = inert
        return inert

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"PyTorch checkpoint has an unknown persistent record {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"PyTorch checkpoint has a storage of unsupported type {storage_type!r}")
        if not isinstance(key, str) or "/" in key or ".." in key or not _is_nonneg_int(numel):
            raise CheckpointError(f"PyTorch checkpoint has an invalid storage record {str(pid)[:80]}")
        cached = self._storages.get(key)
        if cached is not None:
            return cached
        itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
        if not self._read_storages:
            storage: torch.Tensor | _StorageStub = _StorageStub(storage_type.dtype, numel)
        else:
            name = f"{self._prefix}data/{key}"
            raw = _read_member(self._zf, name, numel * itemsize) or b""
            if len(raw) != numel * itemsize:
                raise CheckpointError(
                    f"PyTorch checkpoint storage {key!r} has {len(raw)} bytes, expected {numel * itemsize}"
                )
            # a private, writable copy: the tensor owns its memory and never aliases the archive
            buf = bytearray(raw)
            dtype = storage_type.dtype
            storage = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        self._storages[key] = storage
        return storage

    def _rebuild_tensor(
        self, storage: object, offset: object, size: object, stride: object, *_ignored: object
    ) -> torch.Tensor | _TensorStub:
        if not isinstance(storage, torch.Tensor | _StorageStub):
            raise CheckpointError("PyTorch checkpoint rebuilds a tensor from something that is not a storage")
        if not (
            _is_nonneg_int(offset)
            and isinstance(size, tuple | list)
            and isinstance(stride, tuple | list)
            and len(size) == len(stride) <= MAX_TENSOR_DIMS
            and all(_is_nonneg_int(s) for s in (*size, *stride))
        ):
            raise CheckpointError("PyTorch checkpoint has a tensor with an invalid offset, size or stride")
        numel = storage.numel if isinstance(storage, _StorageStub) else storage.numel()
        # the last element the view reaches must lie inside the storage
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if math.prod(size) > 0 and last >= numel:
            raise CheckpointError("PyTorch checkpoint has a tensor that reaches past the end of its storage")
        # a view with more elements than its storage repeats memory (stride 0); later whole-tensor
        # operations would then allocate far more than the file holds
        if math.prod(size) > max(numel, 1):
            raise CheckpointError("PyTorch checkpoint has a tensor with more elements than its storage")
        if isinstance(storage, _StorageStub):
            return _TensorStub(storage.dtype, tuple(size))
        # a view, not a copy: a pickle that reuses one storage many times must not multiply memory
        return torch.as_strided(storage, tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: object, *_ignored: object) -> object:
    return data
