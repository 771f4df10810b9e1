"""The zip container of a torch checkpoint, audited before anything reads a record from it.

``torch.save`` writes every record stored (uncompressed), unencrypted, one after the other; a file that
deviates could make ``torch.load`` inflate a small upload into gigabytes, so every member is checked against
that shape first, from the central directory alone.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from core.models.checkpoint.errors import CheckpointError, UnsupportedFormatError
from core.models.checkpoint.safetensors_file import MAX_SAFETENSORS_ENTRIES

# a state dict's records (one per storage, plus data.pkl, version, byteorder, serialization_id): as many tensors
# as a safetensors file may hold
MAX_ARCHIVE_RECORDS = MAX_SAFETENSORS_ENTRIES + 16

# per member, a local header (30 bytes + name + extra) and a central entry (46 bytes + name + extra + comment)
_PER_MEMBER_OVERHEAD = 30 + 46
_KNOWN_METHODS = {
    zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}  # fmt: skip


def count_zip_entries(path: Path, stop_after: int) -> int:
    """How many entries the central directory of the zip at ``path`` holds, counted up to ``stop_after + 1``
    without building them. ``zipfile.ZipFile`` makes a ``ZipInfo`` of ~450 bytes for every entry (47 bytes of
    directory each: all may point at one local header) before anyone can count them, so a 53 MB upload of a
    million entries held 466 MB; this walk holds none. 0 where the directory cannot be found (zipfile then says
    why). It reads the end record as zipfile does (its ``_EndRecData``, zip64 included)."""
    with open(path, "rb") as fp:
        try:
            end = zipfile._EndRecData(fp)  # type: ignore[attr-defined]
        except (OSError, zipfile.BadZipFile):
            return 0
        if not end:
            return 0
        size = end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
        start = end[zipfile._ECD_LOCATION] - size  # type: ignore[attr-defined]
        if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
            start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
        if start < 0:
            return 0
        fp.seek(start)
        count = walked = 0
        while walked < size and count <= stop_after:
            head = fp.read(46)  # a central directory entry: 46 bytes, then its name, extra field and comment
            if len(head) < 46 or head[:4] != b"PK\x01\x02":
                break
            tail = sum(struct.unpack("<3H", head[28:34]))
            fp.seek(tail, 1)
            walked += 46 + tail
            count += 1
    return count


def open_archive(path: Path) -> zipfile.ZipFile:
    """The zip archive of a torch checkpoint, after :func:`audit_records`; the caller closes it."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise CheckpointError(
            "not a zip-format PyTorch checkpoint: legacy (pre-1.6) torch files and plain pickles are "
            "refused; re-save the state dict with torch.save on torch >= 1.6, or better, as .safetensors"
        )
    if (records := count_zip_entries(path, MAX_ARCHIVE_RECORDS)) > MAX_ARCHIVE_RECORDS:
        raise CheckpointError(f"PyTorch checkpoint has at least {records} records, over the limit of "
                              f"{MAX_ARCHIVE_RECORDS}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"PyTorch checkpoint is not a readable zip archive: {e}") from e
    try:
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist()):
            raise UnsupportedFormatError(
                "TorchScript archives are programs and are refused: upload model.state_dict() saved with "
                "torch.save, or as .safetensors"
            )
        audit_records(zf, path.stat().st_size)
    except BaseException:
        zf.close()
        raise
    return zf


def audit_records(zf: zipfile.ZipFile, file_size: int) -> None:
    """Refuse encrypted or compressed records and sizes the file cannot hold, naming the record."""
    declared = 0
    for info in zf.infolist():
        name = info.filename
        if info.flag_bits & 0x1:
            raise CheckpointError(f"PyTorch checkpoint record {name!r} is encrypted; torch.save never encrypts")
        if info.compress_type != zipfile.ZIP_STORED:
            method = _KNOWN_METHODS.get(info.compress_type, f"unknown method {info.compress_type}")
            raise CheckpointError(
                f"PyTorch checkpoint record {name!r} is compressed ({method}); torch.save writes records "
                "uncompressed, and a compressed record could expand far beyond the upload's size"
            )
        if info.file_size != info.compress_size:
            raise CheckpointError(
                f"PyTorch checkpoint record {name!r} declares {info.file_size} bytes but stores "
                f"{info.compress_size}"
            )
        declared += info.file_size + _PER_MEMBER_OVERHEAD + len(info.orig_filename.encode("utf-8", "replace"))
    if declared > file_size + 1024:
        raise CheckpointError(
            f"PyTorch checkpoint's records declare {declared} bytes, more than the {file_size}-byte file holds"
        )


def archive_prefix(zf: zipfile.ZipFile) -> str:
    """The ``<archive>/`` folder that holds ``data.pkl``; refuses files saved big-endian."""
    names = zf.namelist()
    pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pkls) != 1:
        raise CheckpointError(
            f"not a PyTorch checkpoint: expected one '<archive>/data.pkl' in the zip, found {len(pkls)}"
        )
    prefix = pkls[0][: -len("data.pkl")]
    order = read_record(zf, prefix + "byteorder", 16, missing_ok=True)
    if order is not None and order.strip() not in (b"little", b""):
        raise CheckpointError(
            f"PyTorch checkpoint was saved on a {order.decode(errors='replace')!r}-endian machine"
        )
    return prefix


def read_record(zf: zipfile.ZipFile, name: str, limit: int, missing_ok: bool = False) -> bytes | None:
    """The bytes of record ``name``, refusing more than ``limit`` whatever the zip's directory declares."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        if missing_ok:
            return None
        raise CheckpointError(f"PyTorch checkpoint is missing its record {name!r}") from None
    if info.compress_type != zipfile.ZIP_STORED:
        # audit_records has refused these already; checked again where the bytes are read
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
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"PyTorch checkpoint record {name!r} is unreadable: {e}") from e
    if len(data) > limit:
        raise CheckpointError(f"PyTorch checkpoint record {name!r} expands past the limit of {limit} bytes")
    return data
