"""Fuzzing the upload loaders: small valid files, mutated byte by byte, only ever load or raise the loaders'
own errors (which the API answers with a 4xx) — never anything that would surface as a 500."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.data.formats import DataFormatError, DataLimits, load_image_set
from core.models.checkpoint import CheckpointError, load_checkpoint, save_safetensors
from tests import hostile_files as hf

# CI runs a fixed, small sample; ANTIDOTE_FUZZ_EXAMPLES=5000 explores further by hand
_EXAMPLES = int(os.environ.get("ANTIDOTE_FUZZ_EXAMPLES", "40"))
_FIXED = "ANTIDOTE_FUZZ_EXAMPLES" not in os.environ  # CI: the same sample every run
_LIMITS = DataLimits(max_images=1000, max_pixels_per_image=4096, max_expanded_bytes=16 * 1024 * 1024)


def _seed_pt() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(3)}, buf)
    return buf.getvalue()


def _seed_backdoorbench() -> bytes:
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(3)}, "model_name": "x", "num_classes": 2, "bd_train": [1, 2]}, buf)
    return buf.getvalue()


def _seed_safetensors() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        save_safetensors({"w": torch.ones(2, 2), "b": torch.zeros(3)}, Path(d) / "m.safetensors")
        return (Path(d) / "m.safetensors").read_bytes()


def _seed_npz(compressed: bool) -> bytes:
    buf = io.BytesIO()
    x = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    (np.savez_compressed if compressed else np.savez)(buf, x=x, y=np.array([0, 1, 0]))
    return buf.getvalue()


def _seed_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/a.png", hf.png((4, 4)))
        zf.writestr("dog/b.png", hf.png((4, 4), mode="L"))
    return buf.getvalue()


_SEEDS: dict[str, tuple[bytes, Callable[[Path, str], object], type[Exception]]] = {
    "model.pt": (_seed_pt(), lambda p, n: load_checkpoint(p, n), CheckpointError),
    "attack_result.pt": (_seed_backdoorbench(), lambda p, n: load_checkpoint(p, n), CheckpointError),
    "model.safetensors": (_seed_safetensors(), lambda p, n: load_checkpoint(p, n), CheckpointError),
    "stored.npz": (_seed_npz(False), lambda p, n: load_image_set(p, n, limits=_LIMITS), DataFormatError),
    "deflated.npz": (_seed_npz(True), lambda p, n: load_image_set(p, n, limits=_LIMITS), DataFormatError),
    "images.zip": (_seed_zip(), lambda p, n: load_image_set(p, n, limits=_LIMITS), DataFormatError),
}


@st.composite
def _mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few bytes overwritten (often in the headers at either end), or cut short."""
    data = bytearray(seed)
    n = len(data)
    position = st.one_of(st.integers(0, n - 1), st.integers(0, min(n, 96) - 1), st.integers(max(0, n - 400), n - 1))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(position)
        data[at] = draw(st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 0x7F, 0x80, 0xFF])))
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:
        del data[draw(st.integers(1, n)) :]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(_SEEDS))
def test_mutated_uploads_raise_only_loader_errors(name: str, tmp_path: Path) -> None:
    seed, load, error = _SEEDS[name]
    load(_write(tmp_path, seed), name)  # the seed itself is valid

    @settings(max_examples=_EXAMPLES, deadline=None, derandomize=_FIXED, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(_mutated(seed))
    def check(data: bytes) -> None:
        with contextlib.suppress(error):
            load(_write(tmp_path, data), name)

    check()


def _write(folder: Path, data: bytes) -> Path:
    path = folder / "upload.tmp"
    path.write_bytes(data)
    return path
