"""Bombs and malformed archives, loaded in a fresh process whose peak memory is measured: each is refused
with the right error, and no load grows the process by more than 2x the file's size + 100 MB."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests import hostile_files as hf
from tests.peak_memory import run_fresh

_MB = 1024 * 1024


def _bound(file_bytes: int) -> int:
    return 2 * file_bytes + 100 * _MB


def _meta(path: Path) -> Path:
    torch.save({"w": torch.empty(1000, device="meta")}, path)
    return path


def _sparse(path: Path) -> Path:
    torch.save({"w": torch.eye(3).to_sparse()}, path)
    return path


@pytest.mark.filterwarnings("ignore::UserWarning")
def _quantized(path: Path) -> Path:
    torch.save({"w": torch.quantize_per_tensor(torch.rand(3), 0.1, 0, torch.qint8)}, path)
    return path


# (name, kind, builder, error class, message): each amplification bomb gets its own fresh process
_BOMBS: list[tuple[str, str, Callable[[Path], Path], str, str]] = [
    ("deflated_storage.pt", "model", lambda p: hf.deflated_storage_bomb(p, 64 * _MB),
     "CheckpointError", r"record 'archive/data/0' is compressed \(deflate\)"),
    ("npz_bomb.npz", "data", lambda p: hf.npz_bomb(p, 256 * _MB), "DataFormatError", r"array 'x' expands \d+-fold"),
    ("huge_pngs.zip", "data", hf.huge_png_zip, "DataFormatError",
     r"zip's 20 images of 4096x4096 hold \d+ pixels together, over the limit|zip's images expands \d+-fold"),
    ("globals.pt", "model", lambda p: hf.backdoorbench_zip(p, hf.many_globals_pickle(200_000)),
     "CheckpointError", "names more than 1000 distinct globals"),
    ("tiny_objects.pt", "model", lambda p: hf.backdoorbench_zip(p, hf.tiny_objects_pickle(5_000_000)),
     "CheckpointError", r"data.pkl \(5000005 bytes\) would build more than"),
]  # fmt: skip

# small malformed files, measured one after another in one process
_MALFORMED: list[tuple[str, str, Callable[[Path], Path], str, str]] = [
    ("encrypted.pt", "model",
     lambda p: hf.patch_zip_member(hf.small_state_dict_zip(p), "archive/data.pkl", flag_bits=1),
     "CheckpointError", "record 'archive/data.pkl' is encrypted"),
    ("method99.pt", "model", lambda p: hf.patch_zip_member(hf.small_state_dict_zip(p), "archive/data/0", method=99),
     "CheckpointError", r"record 'archive/data/0' is compressed \(unknown method 99\)"),
    ("encrypted.npz", "data", lambda p: hf.patch_zip_member(hf.small_npz(p), "x.npy", flag_bits=1),
     "DataFormatError", "array 'x' is encrypted"),
    ("method99.npz", "data", lambda p: hf.patch_zip_member(hf.small_npz(p), "y.npy", method=99),
     "DataFormatError", "array 'y' uses zip compression method 99"),
    ("encrypted.zip", "data",
     lambda p: hf.patch_zip_member(hf.image_zip(p, {"0/a.png": hf.png((8, 8))}), "0/a.png", flag_bits=1),
     "DataFormatError", "'0/a.png' is encrypted"),
    ("method99.zip", "data",
     lambda p: hf.patch_zip_member(hf.image_zip(p, {"0/a.png": hf.png((8, 8))}), "0/a.png", method=99),
     "DataFormatError", "'0/a.png' uses the unknown zip compression method 99"),
    ("meta.pt", "model", _meta, "CheckpointError", "tensor 'w' is on the 'meta' device"),
    ("sparse.pt", "model", _sparse, "CheckpointError", "tensor 'w' has the sparse_coo layout"),
    ("quantized.pt", "model", _quantized, "CheckpointError", "unsupported type torch.QInt8Storage"),
    ("class_index.zip", "data",
     lambda p: hf.image_zip(p, {"0/a.png": hf.png((8, 8)), "99999999999999999999/b.png": hf.png((8, 8))}),
     "DataFormatError", "class folder '99999999999999999999'"),
    ("class_digits.zip", "data",
     lambda p: hf.image_zip(p, {"0/a.png": hf.png((8, 8)), "9" * 5000 + "/b.png": hf.png((8, 8))}),
     "DataFormatError", "class folder '9999"),
]  # fmt: skip


def _check(result: dict[str, object], name: str, error: str, message: str) -> None:
    import re

    assert result["error"] is not None, f"{name} was loaded"
    assert error in result["error"], (name, result)  # type: ignore[operator]
    assert re.search(message, str(result["message"])), (name, result["message"])
    growth, size = int(result["growth_bytes"]), int(result["file_bytes"])  # type: ignore[call-overload]
    assert growth <= _bound(size), f"{name}: the load grew the process by {growth / _MB:.0f} MB for a " \
        f"{size / _MB:.1f} MB file"


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each bomb built once for the module (building them is most of the cost)."""
    folder = tmp_path_factory.mktemp("bombs")
    return {name: build(folder / name) for name, _, build, _, _ in _BOMBS}


@pytest.mark.parametrize(("name", "kind", "error", "message"), [(b[0], b[1], b[3], b[4]) for b in _BOMBS],
                         ids=[b[0] for b in _BOMBS])
def test_bomb_refused_within_memory_bound(
    bombs: dict[str, Path], name: str, kind: str, error: str, message: str
) -> None:
    [result] = run_fresh((kind, bombs[name]))
    _check(result, name, error, message)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_malformed_archives_refused_within_memory_bound(tmp_path: Path) -> None:
    paths = [build(tmp_path / name) for name, _, build, _, _ in _MALFORMED]
    results = run_fresh(*[(kind, path) for (_, kind, *_), path in zip(_MALFORMED, paths, strict=True)])
    assert len(results) == len(_MALFORMED)
    for (name, _, _, error, message), result in zip(_MALFORMED, results, strict=True):
        _check(result, name, error, message)


def test_globals_bomb_is_refused_by_the_cap_not_by_time(tmp_path: Path) -> None:
    # the same file under a cap it fits: every name is recorded once, none runs, the count is complete
    from core.models.checkpoint import CheckpointLimits, load_checkpoint

    path = hf.backdoorbench_zip(tmp_path / "g.pt", hf.many_globals_pickle(5000))
    loaded = load_checkpoint(path, limits=CheckpointLimits(max_pickle_globals=10_000))
    assert loaded.meta["ignored_globals_count"] == 5000
    assert len(loaded.meta["ignored_globals"]) == 100
    assert loaded.meta["ignored_globals"] == sorted(loaded.meta["ignored_globals"])
    with pytest.raises(Exception, match="more than 4999 distinct globals"):
        load_checkpoint(path, limits=CheckpointLimits(max_pickle_globals=4999))


def test_bomb_builders_really_are_bombs(bombs: dict[str, Path]) -> None:
    # what makes the bombs above meaningful: each expands far past the memory bound if trusted
    with zipfile.ZipFile(bombs["deflated_storage.pt"]) as zf:
        assert zf.getinfo("archive/data/0").file_size > _bound(bombs["deflated_storage.pt"].stat().st_size)
    with zipfile.ZipFile(bombs["npz_bomb.npz"]) as zf:
        assert zf.getinfo("x.npy").file_size > _bound(bombs["npz_bomb.npz"].stat().st_size)
    assert _bound(bombs["huge_pngs.zip"].stat().st_size) < 20 * 4096 * 4096 * 3
    assert bombs["globals.pt"].stat().st_size < 10 * _MB
    # 5 M empty lists: about 64 bytes of memory for each byte of pickle
    assert _bound(bombs["tiny_objects.pt"].stat().st_size) < 64 * 5_000_000
