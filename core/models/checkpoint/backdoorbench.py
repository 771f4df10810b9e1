"""BackdoorBench results (``attack_result.pt``): an allowlist unpickler for the pickled datasets that
``weights_only`` refuses.

Tensors and containers are rebuilt by our own code; every other global becomes the one inert placeholder
class, so nothing named in the file runs, and a file naming too many distinct globals is refused before it
costs memory or time.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from core.models.checkpoint.archive import read_record
from core.models.checkpoint.errors import (
    CheckpointError,
    CheckpointLimits,
    LoadedCheckpoint,
    check_global_name,
    is_nonneg_int,
)
from core.models.checkpoint.safetensors_file import MAX_TENSOR_DIMS
from core.models.checkpoint.tensors import check_tensors

# the top-level keys of a BackdoorBench attack_result.pt / defense_result.pt besides ``model``
_BACKDOORBENCH_KEYS = ("model_name", "num_classes", "bd_train", "bd_test", "clean_data")

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


def looks_like_backdoorbench(top: object) -> bool:
    """True for a dict with a state dict under ``model`` and at least one other BackdoorBench key."""
    # dict methods through the class: an instance attribute cannot shadow them
    return (
        isinstance(top, dict)
        and is_state_dict(dict.get(top, "model"))
        and any(dict.__contains__(top, k) for k in _BACKDOORBENCH_KEYS)
    )


def is_state_dict(obj: object) -> bool:
    """A non-empty dict of string keys to tensors (or, on a first look, tensor descriptions)."""
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor | _TensorStub) for k, v in dict.items(obj))
    )


def extract_backdoorbench(
    zf: zipfile.ZipFile, prefix: str, data: bytes, limits: CheckpointLimits
) -> LoadedCheckpoint:
    """The state dict under ``model`` of the result whose ``data.pkl`` is ``data``, what the result says
    about it, and the neutralised globals."""
    top, ignored = SafeUnpickler.run(zf, prefix, data, read_storages=True, limits=limits)
    if not looks_like_backdoorbench(top):  # the same bytes as the first look; checked, not assumed
        raise CheckpointError("BackdoorBench result holds no state dict under 'model'")
    state_dict = dict(dict.items(dict.get(top, "model")))
    check_tensors(state_dict, "BackdoorBench model")
    meta: dict[str, Any] = {}
    name = dict.get(top, "model_name")
    if isinstance(name, str):
        meta["model_name"] = name
    num_classes = dict.get(top, "num_classes")
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        meta["num_classes"] = num_classes
    # which globals were neutralised: a finding for the report, never executed
    meta["ignored_globals"] = sorted(ignored)[: limits.max_listed_globals]
    meta["ignored_globals_count"] = len(ignored)
    return LoadedCheckpoint(state_dict=state_dict, format="backdoorbench", meta=meta)


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` and friends become: only a dtype (``None`` for one we do not load, named
    by ``name``), not callable."""

    dtype: torch.dtype | None
    name: str = ""


@dataclass(frozen=True)
class _StorageStub:
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _TensorStub:
    """A tensor's description when storages are not read (the first look at a file)."""

    dtype: torch.dtype
    shape: tuple[int, ...]


class Inert:
    """Stands in for every global outside the allowlist (one class for all of them): building, calling,
    filling or setting state on it does nothing and calls nothing."""

    __slots__ = ()

    def __new__(cls, *args: object, **kwargs: object) -> Inert:
        return object.__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> Inert:
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
        return "<inert>"


class _StatelessDict(dict):  # type: ignore[type-arg]
    """What ``collections.OrderedDict`` becomes: a dict that drops the state pickle's BUILD gives it (a state
    dict's ``_metadata``), so no instance attribute can shadow ``get``/``items``/``keys``."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        pass


_UNPICKLING_ERRORS = (
    pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError,
    RecursionError, MemoryError, RuntimeError, OverflowError, UnicodeDecodeError, LookupError,
    ArithmeticError, NotImplementedError, zipfile.BadZipFile, OSError,
)  # fmt: skip


class SafeUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch zip with an allowlist: tensors and containers are rebuilt by our own
    code; any other global becomes :class:`Inert`, so nothing named in the file runs."""

    def __init__(
        self, zf: zipfile.ZipFile, prefix: str, data: bytes, read_storages: bool, limits: CheckpointLimits
    ) -> None:
        super().__init__(io.BytesIO(data))
        self._zf = zf
        self._prefix = prefix
        self._read_storages = read_storages
        self._limits = limits
        self._storages: dict[str, torch.Tensor | _StorageStub] = {}
        self.ignored: set[str] = set()
        self._allowed: dict[tuple[str, str], Callable[..., Any]] = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("collections", "OrderedDict"): _StatelessDict,
        }

    @classmethod
    def run(
        cls, zf: zipfile.ZipFile, prefix: str, data: bytes, read_storages: bool, limits: CheckpointLimits
    ) -> tuple[Any, set[str]]:
        """The object ``data`` (the archive's ``data.pkl``) unpickles to, and the names of the globals that
        were made inert."""
        unpickler = cls(zf, prefix, data, read_storages, limits)
        try:
            obj = unpickler.load()
        except CheckpointError:
            raise
        except _UNPICKLING_ERRORS as e:
            raise CheckpointError(
                f"PyTorch checkpoint's data.pkl is corrupt or hostile: {type(e).__name__}: {str(e)[:200]}"
            ) from e
        return obj, unpickler.ignored

    def find_class(self, module: str, name: str) -> Any:
        allowed = self._allowed.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name.endswith("Storage"):
            # quantized and complex storages: named in the refusal, not made inert
            return _StorageType(None, f"torch.{name}"[:80])
        qualified = f"{module}.{name}"[:200]
        if qualified not in self.ignored:
            check_global_name(qualified)
            if len(self.ignored) >= self._limits.max_pickle_globals:
                raise CheckpointError(
                    f"PyTorch checkpoint's data.pkl names more than {self._limits.max_pickle_globals} distinct "
                    "globals (classes or functions); a BackdoorBench result names a few dozen"
                )
            self.ignored.add(qualified)
        return Inert

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"PyTorch checkpoint has an unknown persistent record {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or storage_type.dtype is None:
            what = storage_type.name if isinstance(storage_type, _StorageType) else "(not a storage class)"
            raise CheckpointError(
                f"PyTorch checkpoint has a storage of the unsupported type {what}: quantized, complex and "
                "other exotic tensors are not loaded; save the float model's state dict"
            )
        if not isinstance(key, str) or "/" in key or ".." in key or not is_nonneg_int(numel):
            raise CheckpointError(f"PyTorch checkpoint has an invalid storage record {str(pid)[:80]}")
        cached = self._storages.get(key)
        if cached is not None:
            return cached
        dtype = storage_type.dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not self._read_storages:
            storage: torch.Tensor | _StorageStub = _StorageStub(dtype, numel)
        else:
            name = f"{self._prefix}data/{key}"
            raw = read_record(self._zf, name, numel * itemsize) or b""
            if len(raw) != numel * itemsize:
                raise CheckpointError(
                    f"PyTorch checkpoint storage {key!r} has {len(raw)} bytes, expected {numel * itemsize}"
                )
            # a private, writable copy: the tensor owns its memory and never aliases the archive
            buf = bytearray(raw)
            storage = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        self._storages[key] = storage
        return storage

    def _rebuild_tensor(
        self, storage: object, offset: object, size: object, stride: object, *_ignored: object
    ) -> torch.Tensor | _TensorStub:
        if not isinstance(storage, torch.Tensor | _StorageStub):
            raise CheckpointError("PyTorch checkpoint rebuilds a tensor from something that is not a storage")
        if not (
            is_nonneg_int(offset)
            and isinstance(size, tuple | list)
            and isinstance(stride, tuple | list)
            and len(size) == len(stride) <= MAX_TENSOR_DIMS
            and all(is_nonneg_int(s) for s in (*size, *stride))
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
