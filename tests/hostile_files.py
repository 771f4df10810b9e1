"""Builders of hostile uploads (bombs, lying zip headers, hand-made pickles), shared by the unit, fuzz and API
tests. Each writes a small file that would cost far more than its size if a loader trusted it."""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_CHUNK = 1024 * 1024


class StorageRef:
    """Pickled through persistent_id as torch does for a storage of ``numel`` float32s under ``key``."""

    def __init__(self, numel: int, key: str = "0") -> None:
        self.numel, self.key = numel, key


class RawTensor:
    """Pickles as ``torch._utils._rebuild_tensor_v2`` over a :class:`StorageRef`, as torch.save writes it."""

    def __init__(self, storage: StorageRef, size: tuple[int, ...], stride: tuple[int, ...] | None = None) -> None:
        self.storage, self.size = storage, size
        self.stride = stride if stride is not None else _contiguous_stride(size)

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol's own signature
        args = (self.storage, 0, self.size, self.stride, False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


class StatefulTensor(RawTensor):
    """A :class:`RawTensor` followed by a BUILD with ``state``: ``Tensor.__setstate__`` would ``set_`` a
    4-tuple, i.e. re-point the tensor at any storage, size and stride."""

    def __init__(self, storage: StorageRef, size: tuple[int, ...], state: object) -> None:
        super().__init__(storage, size)
        self.state = state

    def __reduce__(self):  # noqa: ANN204
        rebuild, args = super().__reduce__()
        return (rebuild, args, self.state)


class ShadowedOrderedDict:
    """Pickles as an ``OrderedDict`` holding ``items`` whose BUILD then sets attributes named like its methods."""

    def __init__(self, items: dict[str, object]) -> None:
        self.items_ = items

    def __reduce__(self):  # noqa: ANN204
        state = {"get": 1, "items": 2, "keys": 3, "values": 4, "__contains__": 5, "_metadata": {}}
        return (collections.OrderedDict, (), state, None, iter(self.items_.items()))


class TorchLikePickler(pickle.Pickler):
    """Writes :class:`StorageRef` as torch's ``("storage", FloatStorage, key, "cpu", numel)`` record."""

    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, StorageRef):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def _contiguous_stride(size: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(size):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


def torch_pickle(obj: object) -> bytes:
    """``obj`` pickled as torch.save's ``data.pkl`` would be."""
    buf = io.BytesIO()
    TorchLikePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def torch_like_zip(
    path: Path, pkl: bytes, storages: dict[str, int], compression: int = zipfile.ZIP_STORED
) -> Path:
    """A torch.save-shaped archive: ``data.pkl``, ``byteorder``, ``version`` and one zero-filled record of
    ``n`` bytes per storage key (streamed, so a bomb of gigabytes costs the test no memory)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
        for key, nbytes in storages.items():
            info = zipfile.ZipInfo(f"archive/data/{key}")
            info.compress_type = compression
            with zf.open(info, "w", force_zip64=nbytes > 2**31) as f:
                _write_zeros(f, nbytes)
    return path


def deflated_storage_bomb(path: Path, numel: int) -> Path:
    """A plain state dict whose one float32 storage record is DEFLATE-compressed zeros (~1000-fold)."""
    pkl = torch_pickle({"w": RawTensor(StorageRef(numel), (numel,))})
    return torch_like_zip(path, pkl, {"0": 4 * numel}, zipfile.ZIP_DEFLATED)


def small_state_dict_zip(path: Path) -> Path:
    """A valid hand-built torch archive of ``{"w": zeros(4)}`` (the base the header-patching tests alter)."""
    return torch_like_zip(path, torch_pickle({"w": RawTensor(StorageRef(4), (4,))}), {"0": 16})


def npz_bomb(path: Path, nbytes: int, side: int = 32) -> Path:
    """An .npz whose ``x`` is ``nbytes`` of zero pixels, deflated (~1000-fold), with matching labels."""
    n = max(nbytes // (side * side * 3), 1)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (n, side, side, 3)}
            )
            _write_zeros(f, n * side * side * 3)
        buf = io.BytesIO()
        np.save(buf, np.zeros(n, dtype=np.int64))
        zf.writestr("y.npy", buf.getvalue())
    return path


def small_npz(path: Path, n: int = 4) -> Path:
    """A valid .npz of ``n`` 8x8 RGB images, stored (so headers can be patched)."""
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), y=np.arange(n) % 2)
    return path


def png(size: tuple[int, int], mode: str = "RGB", value: int = 7) -> bytes:
    """A PNG of one colour (which compresses about a thousand-fold)."""
    buf = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value,) * len(mode)).save(buf, format="PNG")
    return buf.getvalue()


def image_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    """A zip of the given member names and bytes."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def huge_png_zip(path: Path, count: int = 20, side: int = 4096) -> Path:
    """``count`` one-colour PNGs of ``side``² pixels (about 16 KB each, 48 MB each decoded)."""
    big = png((side, side))
    return image_zip(path, {f"0/{i}.png": big for i in range(count)})


def many_globals_pickle(count: int, base: object | None = None) -> bytes:
    """``base`` (a dict; default a BackdoorBench result with a 4-float model) pickled with a ``bd_train``
    list that names ``count`` distinct globals, added by hand: no such module exists, so no pickler would
    write them."""
    if base is None:
        base = {"model": {"w": RawTensor(StorageRef(4), (4,))}, "model_name": "x"}
    head = torch_pickle(base)
    assert head.endswith(b".")
    names = b"".join(b"cevil_module_%d\nName%d\n" % (i, i) for i in range(count))
    # the top dict is on the stack before STOP: push the key and a list of the globals, then SETITEM
    return head[:-1] + b"X\x08\x00\x00\x00bd_train](" + names + b"es."


def tiny_objects_pickle(count: int) -> bytes:
    """A list of ``count`` empty lists: one byte of pickle per object, about 64 bytes of memory each."""
    return b"\x80\x02(" + b"]" * count + b"l."


def backdoorbench_zip(path: Path, pkl: bytes) -> Path:
    """An archive for a pickle whose tensors use one 4-float storage ``"0"``."""
    return torch_like_zip(path, pkl, {"0": 16})


def directory_flood_zip(path: Path, entries: int) -> Path:
    """A zip of one empty local member and ``entries`` central directory entries that all point at it (47 bytes
    each, zip64 past 65,535): zipfile builds a ZipInfo of ~450 bytes for each before anything can count them."""
    local = struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"x"
    directory = b"".join(struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0,
                                     0, 0, 0, 0) + b"%07x" % i for i in range(entries))
    small = min(entries, 0xFFFF)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, small, small, len(directory), len(local), 0)
    zip64 = b""
    if entries > 0xFFFF:
        zip64 = (struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, len(directory),
                             len(local))
                 + struct.pack("<4sLQL", b"PK\x06\x07", 0, len(local) + len(directory), 1))
    path.write_bytes(local + directory + zip64 + end)
    return path


def patch_zip_member(path: Path, member: str, *, method: int | None = None, flag_bits: int = 0) -> Path:
    """Rewrite ``member``'s compression method and OR ``flag_bits`` into its flags, in the local header and
    the central directory both, leaving the data as it is (what a hand-edited or hostile archive holds)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    local = info.header_offset
    assert data[local : local + 4] == b"PK\x03\x04"
    _patch(data, local + 6, local + 8, method, flag_bits)
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46 : pos + 46 + name_len]) == member.encode():
            _patch(data, pos + 8, pos + 10, method, flag_bits)
        pos = data.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(data))
    return path


def _patch(data: bytearray, flags_at: int, method_at: int, method: int | None, flag_bits: int) -> None:
    flags = struct.unpack_from("<H", data, flags_at)[0] | flag_bits
    struct.pack_into("<H", data, flags_at, flags)
    if method is not None:
        struct.pack_into("<H", data, method_at, method)


def _write_zeros(f: io.BufferedIOBase | object, nbytes: int) -> None:
    zeros = bytes(_CHUNK)
    left = nbytes
    while left > 0:
        f.write(zeros[: min(left, _CHUNK)])  # type: ignore[attr-defined]
        left -= _CHUNK
