"""``.npz`` uploads: uint8 ``x`` (N×H×W×C) and integer ``y`` (and, for ``training_data``, an optional
``is_corrupt`` mask of the samples the user knows to be bad), read without pickles and without trusting the
zip's or the arrays' own size declarations."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from core.data.imageset import ImageSet
from core.data.limits import DataFormatError, DataLimits
from core.data.zip_checks import (
    ZIP_READ_ERRORS,
    check_count_and_pixels,
    check_labels,
    check_ratio,
    open_zip,
)

# the optional per-sample mask of training data: which samples the user knows to be harmful (for the report's
# identification quality); bool, or uint8 0/1 as many tools write masks
MASK_ARRAY = "is_corrupt"
_MASK_DTYPES = (np.dtype(np.bool_), np.dtype(np.uint8))


def load_npz(path: Path, limits: DataLimits, num_classes: int | None) -> ImageSet:
    """The images of an ``.npz``; every member and array header is checked before an array is read."""
    return load_npz_with_mask(path, limits, num_classes, mask=None)[0]


def load_npz_with_mask(path: Path, limits: DataLimits, num_classes: int | None,
                       mask: str | None = MASK_ARRAY) -> tuple[ImageSet, np.ndarray | None]:
    """The images of an ``.npz`` and its optional boolean array ``mask`` (length N; ``None`` when absent or
    not asked for), checked like ``x`` and ``y`` before anything is read."""
    zf = open_zip(path, ".npz", limits.max_zip_members)
    with zf:
        names = zf.namelist()
        if len(names) > limits.max_zip_members:
            raise DataFormatError(f".npz has {len(names)} arrays, over the limit of {limits.max_zip_members}")
        for key in ("x", "y"):
            if f"{key}.npy" not in names:
                found = ", ".join(repr(n.removesuffix(".npy"))[:80] for n in names[:10]) or "none"
                raise DataFormatError(f".npz has no array {key!r} (it needs 'x' and 'y'; found {found})")
        x_info, y_info = zf.getinfo("x.npy"), zf.getinfo("y.npy")
        for info in (x_info, y_info):
            _check_npz_member(info, limits)
        x_shape, x_dtype = _npy_header(zf, x_info, limits)
        y_shape, y_dtype = _npy_header(zf, y_info, limits)
        # the headers are checked before any array is read, so nothing large is decompressed for a bad file
        if x_dtype != np.uint8:
            raise DataFormatError(
                f"x must be uint8 pixels 0..255, got {x_dtype}; scale and convert it, e.g. "
                "(x * 255).round().astype(np.uint8) for values in [0, 1]"
            )
        if len(x_shape) not in (3, 4) or (len(x_shape) == 4 and x_shape[3] not in (1, 3)):
            raise DataFormatError(f"x must have shape N×H×W×C with C 1 or 3, or N×H×W; got {x_shape}")
        n = x_shape[0]
        check_count_and_pixels(n, x_shape[1], x_shape[2], limits)
        if not np.issubdtype(y_dtype, np.integer):
            raise DataFormatError(f"y must hold integer labels, got {y_dtype}")
        if y_shape != (n,):
            raise DataFormatError(f"y must have shape ({n},) to match x's {n} images, got {y_shape}")
        mask_info = zf.getinfo(f"{mask}.npy") if mask is not None and f"{mask}.npy" in names else None
        if mask_info is not None:
            _check_mask_header(zf, mask_info, n, limits)
        x = _read_npy(zf, x_info)
        y = _read_npy(zf, y_info)
        flags = _read_npy(zf, mask_info) if mask_info is not None else None
    if x.ndim == 3:
        x = x[..., None]
    check_labels(y, num_classes)  # before the cast: a uint64 label of 2**64 - 1 became -1, and was reported so
    y = y.astype(np.int64)
    if flags is not None:
        flags = _mask_values(flags, str(mask))
    return ImageSet(np.ascontiguousarray(x), y), flags


def _check_mask_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, n: int, limits: DataLimits) -> None:
    """A mask member is bool or uint8 with one entry per image, refused from its header before it is read."""
    name = info.filename.removesuffix(".npy")
    _check_npz_member(info, limits)
    shape, dtype = _npy_header(zf, info, limits)
    if dtype not in _MASK_DTYPES:
        raise DataFormatError(f".npz array {name!r} must be bool or uint8 0/1, got {dtype}")
    if shape != (n,):
        raise DataFormatError(f".npz array {name!r} must have shape ({n},), one flag per image of x, got {shape}")


def _mask_values(flags: np.ndarray, name: str) -> np.ndarray:
    """A uint8 mask as bool, refused when it holds anything but 0 and 1."""
    if flags.dtype == np.uint8:
        bad = int((flags > 1).sum())
        if bad:
            raise DataFormatError(f".npz array {name!r} must hold only 0 and 1, but {bad} of {len(flags)} values "
                                  f"are other (largest {int(flags.max())})")
    return flags.astype(bool)


def _check_npz_member(info: zipfile.ZipInfo, limits: DataLimits) -> None:
    """Refuse an encrypted member, a method other than np.savez's, or a declared expansion past the limits."""
    name = info.filename.removesuffix(".npy")
    if info.flag_bits & 0x1:
        raise DataFormatError(f".npz array {name!r} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DataFormatError(
            f".npz array {name!r} uses zip compression method {info.compress_type}; np.savez and "
            "np.savez_compressed write stored or deflate members only"
        )
    check_ratio(f".npz array {name!r}", info.file_size, info.compress_size, limits)


def _npy_header(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: DataLimits
) -> tuple[tuple[int, ...], np.dtype]:
    name = info.filename
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise DataFormatError(f".npz array {name!r} uses the unsupported .npy version {version}")
    except DataFormatError:
        raise
    except ZIP_READ_ERRORS as e:
        raise DataFormatError(f".npz array {name!r} has an unreadable header: {str(e)[:200]}") from e
    if dtype.hasobject:
        raise DataFormatError(f".npz array {name[:-4]!r} holds Python objects, which are refused")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limits.max_expanded_bytes:
        raise DataFormatError(
            f".npz array {name[:-4]!r} of shape {shape} is {nbytes} bytes, over the limit of "
            f"{limits.max_expanded_bytes}"
        )
    # the header's shape decides how much is allocated: it must fit the bytes the member holds, and the
    # ratio is checked on it too, since the directory's declared size can lie
    if nbytes > info.file_size:
        raise DataFormatError(
            f".npz array {name[:-4]!r} of shape {shape} needs {nbytes} bytes but the member holds "
            f"{info.file_size}"
        )
    check_ratio(f".npz array {name[:-4]!r}", nbytes, info.compress_size, limits)
    return tuple(int(d) for d in shape), dtype


def _read_npy(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """The array of a checked member, read into one allocation of the header's size (never more)."""
    try:
        with zf.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except ZIP_READ_ERRORS as e:
        raise DataFormatError(f".npz array {info.filename[:-4]!r} could not be read: {str(e)[:200]}") from e
