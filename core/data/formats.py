"""Reading uploaded image data (``.npz`` arrays or a ``.zip`` image folder) into an :class:`ImageSet`.

Uploads are hostile until proven otherwise: sizes, counts, member names and pixel counts are checked before
anything large is decompressed or decoded, and pickled objects are never loaded.
"""

from __future__ import annotations

import io
import math
import stat
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from core.data.imageset import ImageSet

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# folders and files that archivers add and that are no part of the data
_JUNK_PREFIXES = ("__MACOSX/",)
_JUNK_NAMES = ("Thumbs.db", "desktop.ini")


class DataFormatError(ValueError):
    """The data file is malformed, too large or inconsistent; the message names the problem."""


class UnsupportedDataFormatError(DataFormatError):
    """A data file format other than ``.npz`` or ``.zip`` (the API answers 415)."""


@dataclass(frozen=True)
class DataLimits:
    """Bounds on an upload once it is unpacked; the archive's own declarations are checked against them."""

    max_images: int = 200_000
    max_pixels_per_image: int = 1024 * 1024
    max_zip_members: int = 250_000
    max_expanded_bytes: int = 2 * 1024**3
    max_compression_ratio: float = 200.0


def load_image_set(
    path: str | Path,
    filename: str | None = None,
    *,
    limits: DataLimits = DataLimits(),
    num_classes: int | None = None,
) -> ImageSet:
    """The images and labels in ``path`` (``filename``, the client's name for it, picks the format).

    Raises :class:`DataFormatError` (or :class:`UnsupportedDataFormatError`) naming the problem.
    """
    return load_image_set_with_classes(path, filename, limits=limits, num_classes=num_classes)[0]


def load_image_set_with_classes(
    path: str | Path,
    filename: str | None = None,
    *,
    limits: DataLimits = DataLimits(),
    num_classes: int | None = None,
) -> tuple[ImageSet, list[str] | None]:
    """Like :func:`load_image_set`, plus the class folder names by label when a ``.zip`` names its classes
    (``None`` for ``.npz`` and for folders named by class index)."""
    path = Path(path)
    suffix = Path(filename or path.name).suffix.lower()
    if suffix == ".npz":
        return _load_npz(path, limits, num_classes), None
    if suffix == ".zip":
        return _load_image_zip(path, limits, num_classes)
    raise UnsupportedDataFormatError(
        f"unsupported data format {suffix or '(no extension)'!r}: upload an .npz with uint8 'x' "
        "(N×H×W×C) and integer 'y', or a .zip of an image folder <class>/<image>.png|jpg"
    )


# --------------------------------------------------------------------------------------------------- npz


def _load_npz(path: Path, limits: DataLimits, num_classes: int | None) -> ImageSet:
    zf = _open_zip(path, ".npz")
    with zf:
        names = zf.namelist()
        if len(names) > limits.max_zip_members:
            raise DataFormatError(f".npz has {len(names)} arrays, over the limit of {limits.max_zip_members}")
        for key in ("x", "y"):
            if f"{key}.npy" not in names:
                found = ", ".join(repr(n.removesuffix(".npy")) for n in names[:10]) or "none"
                raise DataFormatError(f".npz has no array {key!r} (it needs 'x' and 'y'; found {found})")
        x_shape, x_dtype = _npy_header(zf, "x.npy", limits)
        y_shape, y_dtype = _npy_header(zf, "y.npy", limits)
    # the headers are checked before any array is read, so nothing large is decompressed for a bad file
    if x_dtype != np.uint8:
        raise DataFormatError(
            f"x must be uint8 pixels 0..255, got {x_dtype}; scale and convert it, e.g. "
            "(x * 255).round().astype(np.uint8) for values in [0, 1]"
        )
    if len(x_shape) not in (3, 4) or (len(x_shape) == 4 and x_shape[3] not in (1, 3)):
        raise DataFormatError(f"x must have shape N×H×W×C with C 1 or 3, or N×H×W; got {x_shape}")
    n = x_shape[0]
    _check_count_and_pixels(n, x_shape[1], x_shape[2], limits)
    if not np.issubdtype(y_dtype, np.integer):
        raise DataFormatError(f"y must hold integer labels, got {y_dtype}")
    if y_shape != (n,):
        raise DataFormatError(f"y must have shape ({n},) to match x's {n} images, got {y_shape}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            x = npz["x"]
            y = npz["y"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataFormatError(f".npz could not be read: {e}") from e
    if x.ndim == 3:
        x = x[..., None]
    y = y.astype(np.int64)
    _check_labels(y, num_classes)
    return ImageSet(np.ascontiguousarray(x), y)


def _npy_header(zf: zipfile.ZipFile, name: str, limits: DataLimits) -> tuple[tuple[int, ...], np.dtype]:
    info = zf.getinfo(name)
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
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, SyntaxError) as e:
        raise DataFormatError(f".npz array {name!r} has an unreadable header: {e}") from e
    if dtype.hasobject:
        raise DataFormatError(f".npz array {name[:-4]!r} holds Python objects, which are refused")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limits.max_expanded_bytes:
        raise DataFormatError(
            f".npz array {name[:-4]!r} of shape {shape} is {nbytes} bytes, over the limit of "
            f"{limits.max_expanded_bytes}"
        )
    return tuple(int(d) for d in shape), dtype


# --------------------------------------------------------------------------------------------------- zip


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    class_name: str


def _load_image_zip(
    path: Path, limits: DataLimits, num_classes: int | None
) -> tuple[ImageSet, list[str] | None]:
    zf = _open_zip(path, ".zip")
    with zf:
        members = _image_members(zf, limits)
        labels, class_names = _class_labels(sorted({m.class_name for m in members}), num_classes)
        members.sort(key=lambda m: (labels[m.class_name], m.info.filename))
        images: list[np.ndarray] = []
        first: tuple[str, tuple[int, int]] | None = None
        for m in members:
            img = _decode(zf, m.info, limits)
            if first is None:
                first = (m.info.filename, img.shape[:2])
            elif img.shape[:2] != first[1]:
                raise DataFormatError(
                    f"image {m.info.filename!r} is {_wxh(img.shape[:2])} but {first[0]!r} is "
                    f"{_wxh(first[1])}; all images must have the same size"
                )
            images.append(img)
    # a folder mixing grayscale and colour images becomes colour throughout
    channels = 3 if any(a.shape[2] == 3 for a in images) else 1
    x = np.stack([np.repeat(a, 3, axis=2) if a.shape[2] != channels else a for a in images])
    y = np.array([labels[m.class_name] for m in members], dtype=np.int64)
    _check_labels(y, num_classes)
    return ImageSet(x, y), class_names


def _image_members(zf: zipfile.ZipFile, limits: DataLimits) -> list[_Member]:
    infos = zf.infolist()
    if len(infos) > limits.max_zip_members:
        raise DataFormatError(f"zip has {len(infos)} members, over the limit of {limits.max_zip_members}")
    files = []
    for info in infos:
        name = info.filename
        _check_member_name(info)
        base = PurePosixPath(name).name
        if info.is_dir() or name.startswith(_JUNK_PREFIXES) or base.startswith(".") or base in _JUNK_NAMES:
            continue
        files.append(info)
    if not files:
        raise DataFormatError("zip holds no images; expected <class>/<image>.png|jpg")
    # an optional single top folder around the class folders
    depths = {name.count("/") for name in (i.filename for i in files)}
    tops = {i.filename.split("/", 1)[0] for i in files}
    strip_top = depths == {2} and len(tops) == 1
    total = 0
    members = []
    for info in files:
        parts = info.filename.split("/")[1 if strip_top else 0 :]
        if len(parts) != 2:
            raise DataFormatError(
                f"zip member {info.filename!r} is not laid out as <class>/<image> (optionally under one top "
                "folder)"
            )
        if PurePosixPath(parts[1]).suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataFormatError(f"zip member {info.filename!r} is not a .png, .jpg or .jpeg image")
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_compression_ratio:
            raise DataFormatError(
                f"zip member {info.filename!r} expands {ratio:.0f}-fold, over the limit of "
                f"{limits.max_compression_ratio:.0f}"
            )
        total += info.file_size
        if total > limits.max_expanded_bytes:
            raise DataFormatError(f"zip expands to more than the limit of {limits.max_expanded_bytes} bytes")
        members.append(_Member(info, parts[0]))
    if len(members) > limits.max_images:
        raise DataFormatError(f"zip has {len(members)} images, over the limit of {limits.max_images}")
    return members


def _check_member_name(info: zipfile.ZipInfo) -> None:
    # zipfile normalises some names; the raw one is what another tool would extract
    name = info.orig_filename
    if "\\" in name or "\0" in name:
        raise DataFormatError(f"zip member {name!r} has a backslash or NUL in its name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise DataFormatError(f"zip member {name!r} has an absolute path")
    if ".." in name.split("/"):
        raise DataFormatError(f"zip member {name!r} climbs out of the archive with '..'")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataFormatError(f"zip member {name!r} is a symbolic link")
    if info.flag_bits & 0x1:
        raise DataFormatError(f"zip member {name!r} is encrypted")


def _class_labels(names: list[str], num_classes: int | None) -> tuple[dict[str, int], list[str] | None]:
    if all(n.isascii() and n.isdigit() for n in names):
        return {n: int(n) for n in names}, None
    if num_classes is not None and len(names) > num_classes:
        raise DataFormatError(
            f"zip has {len(names)} class folders but the model has num_classes={num_classes}"
        )
    return {n: i for i, n in enumerate(names)}, names


def _decode(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: DataLimits) -> np.ndarray:
    try:
        with zf.open(info) as f:
            # never trust the declared size alone: read at most one byte past it
            data = f.read(info.file_size + 1)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
        raise DataFormatError(f"zip member {info.filename!r} is unreadable: {e}") from e
    if len(data) > info.file_size:
        raise DataFormatError(f"zip member {info.filename!r} expands past its declared size")
    try:
        with warnings.catch_warnings():
            # our own pixel limit, checked below before decoding, replaces PIL's process-wide one
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
            w, h = img.size
            if w * h > limits.max_pixels_per_image:
                raise DataFormatError(
                    f"image {info.filename!r} is {w}x{h} = {w * h} pixels, over the limit of "
                    f"{limits.max_pixels_per_image}"
                )
            img.load()
    except DataFormatError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataFormatError(f"zip member {info.filename!r} is not a readable PNG or JPEG image: {e}") from e
    if img.mode in ("L", "1"):
        arr = np.asarray(img.convert("L"))[..., None]
    elif img.mode in ("RGB", "RGBA", "P", "LA", "PA", "CMYK", "YCbCr"):
        arr = np.asarray(img.convert("RGB"))
    else:
        raise DataFormatError(f"image {info.filename!r} has the unsupported mode {img.mode}")
    return arr


# --------------------------------------------------------------------------------------------------- shared


def _open_zip(path: Path, kind: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataFormatError(f"not a valid {kind} file (it is not a readable zip archive): {e}") from e


def _check_count_and_pixels(n: int, h: int, w: int, limits: DataLimits) -> None:
    if n == 0:
        raise DataFormatError("the data holds no images")
    if n > limits.max_images:
        raise DataFormatError(f"the data holds {n} images, over the limit of {limits.max_images}")
    if h * w > limits.max_pixels_per_image:
        raise DataFormatError(
            f"images are {w}x{h} = {h * w} pixels, over the limit of {limits.max_pixels_per_image}"
        )


def _check_labels(y: np.ndarray, num_classes: int | None) -> None:
    bad = (y < 0) | (y >= num_classes) if num_classes is not None else y < 0
    count = int(bad.sum())
    if count:
        where = f"lie outside [0, {num_classes})" if num_classes is not None else "are negative"
        raise DataFormatError(
            f"{count} of {len(y)} labels {where} (found labels {int(y.min())}..{int(y.max())})"
        )


def _wxh(hw: tuple[int, ...]) -> str:
    return f"{hw[1]}x{hw[0]}"
