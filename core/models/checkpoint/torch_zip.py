"""Zip-format torch files: a state dict through ``torch.load(weights_only=True)``, or a BackdoorBench result
through our allowlist unpickler, after the archive's records have been audited."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from core.models.checkpoint.archive import archive_prefix, open_archive, read_record
from core.models.checkpoint.backdoorbench import (
    SafeUnpickler,
    extract_backdoorbench,
    is_state_dict,
    looks_like_backdoorbench,
)
from core.models.checkpoint.errors import CheckpointError, CheckpointLimits, LoadedCheckpoint
from core.models.checkpoint.pickle_budget import check_pickle_budget
from core.models.checkpoint.tensors import check_tensors

TORCH_EXTENSIONS = (".pt", ".pth", ".bin")


def load_torch_zip(path: Path, limits: CheckpointLimits) -> LoadedCheckpoint:
    """A state dict or a BackdoorBench result from a zip-format torch file."""
    with open_archive(path) as zf:
        prefix = archive_prefix(zf)
        data = read_record(zf, prefix + "data.pkl", limits.max_pickle_bytes) or b""
        # both unpicklers (ours, then torch's) build what data.pkl describes: bound it before either runs
        check_pickle_budget(data, limits.max_pickle_memory_ratio, limits.pickle_memory_slack_bytes)
        # a first look that reads no tensor data: is this a BackdoorBench result?
        top, _ = SafeUnpickler.run(zf, prefix, data, read_storages=False, limits=limits)
        if looks_like_backdoorbench(top):
            return extract_backdoorbench(zf, prefix, data, limits)
    return _load_weights_only(path)


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
            f"which could run code when loaded ({detail.strip()[:300]}); save only model.state_dict(), "
            "or use .safetensors"
        ) from e
    except Exception as e:  # noqa: BLE001 - torch's parser of hostile bytes: whatever it raises is the file's fault
        raise CheckpointError(f"PyTorch checkpoint could not be read: {type(e).__name__}: {str(e)[:300]}") from e
    # an OrderedDict may carry attributes (torch allows BUILD on it) that shadow its methods: use the class's
    if isinstance(obj, dict) and not is_state_dict(obj):
        for key in ("state_dict", "model"):
            inner = dict.get(obj, key)
            if is_state_dict(inner):
                obj = inner
                break
    if not is_state_dict(obj):
        raise CheckpointError(
            "PyTorch checkpoint holds no state dict: expected a dict of parameter names to tensors "
            f"(model.state_dict()), or a dict holding one under 'state_dict' or 'model'; got {_describe(obj)}"
        )
    state_dict = dict(dict.items(obj))
    check_tensors(state_dict, "PyTorch checkpoint")
    return LoadedCheckpoint(state_dict=state_dict, format="torch")


def _describe(obj: object) -> str:
    if isinstance(obj, dict):
        keys = list(dict.keys(obj))
        shown = ", ".join(repr(k)[:80] for k in keys[:5])
        return f"a dict with keys {shown}{', ...' if len(keys) > 5 else ''}" if keys else "an empty dict"
    return type(obj).__name__
