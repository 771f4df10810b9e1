"""Reading uploaded image data (``.npz`` arrays or a ``.zip`` image folder) into an :class:`ImageSet`.

Uploads are hostile until proven otherwise: sizes, counts, member names and pixel counts are checked before
anything large is decompressed or decoded, and pickled objects are never loaded.
"""

from __future__ import annotations

import io
import math
import stat
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from core.data.imageset import ImageSet
from core.models.checkpoint.errors import CheckpointLimits

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# folders and files that archivers add and that are no part of the data
_JUNK_PREFIXES = ("__MACOSX/",)
_JUNK_NAMES = ("Thumbs.db", "desktop.ini")
_GRAY_MODES = ("L", "1")
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_COLOUR_MODES = ("RGB", "RGBA", "P", "LA", "PA", "CMYK", "YCbCr")
# the largest class index a folder may name when the model's class count is not known
_MAX_CLASS_INDEX = 2**31 - 1
# what reading a hostile zip member or image can raise besides our own errors
_ZIP_READ_ERRORS = (
    zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError,
    ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError, struct.error, UnicodeDecodeError,
)  # fmt: skip


class DataFormatError(ValueError):
    """The data file is malformed, too large or inconsistent; the message names the problem."""


class UnsupportedDataFormatError(DataFormatError):
    """A data file format other than ``.npz`` or ``.zip`` (the API answers 415)."""


@dataclass(frozen=True)
class DataLimits:
    """Bounds on an upload once it is unpacked; the archive's own declarations are checked against them.

    ``checkpoint`` gives the model part's bounds, so one object fed by the settings bounds every upload.
    """

    max_images: int = 200_000
    max_pixels_per_image: int = 1024 * 1024
    max_zip_members: int = 250_000
    max_expanded_bytes: int = 2 * 1024**3
    # expanded / stored bytes of one member, and decoded pixel bytes / archive bytes of an image folder:
    # real images and arrays compress a few-fold, bombs a thousand-fold
    max_compression_ratio: float = 200.0
    # pixels of all images of one image-folder upload together (N x H x W), read from the headers first
    max_total_pixels: int = 256 * 1024 * 1024
    # the ratio checks are waived below this many expanded bytes (tiny label arrays compress very well)
    ratio_slack_bytes: int = 16 * 1024 * 1024
    # the model part's bounds (core.models.checkpoint.CheckpointLimits), here so one object bounds every part
    max_pickle_bytes: int = CheckpointLimits.max_pickle_bytes
    max_pickle_globals: int = CheckpointLimits.max_pickle_globals
    max_pickle_memory_ratio: float = CheckpointLimits.max_pickle_memory_ratio
    pickle_memory_slack_bytes: int = CheckpointLimits.pickle_memory_slack_bytes

    @property
    def checkpoint(self) -> CheckpointLimits:
        """The bounds :func:`core.models.checkpoint.load_checkpoint` enforces on the model part."""
        return CheckpointLimits(
            max_pickle_bytes=self.max_pickle_bytes, max_pickle_globals=self.max_pickle_globals,
            max_pickle_memory_ratio=self.max_pickle_memory_ratio,
            pickle_memory_slack_bytes=self.pickle_memory_slack_bytes,
        )


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
        _check_count_and_pixels(n, x_shape[1], x_shape[2], limits)
        if not np.issubdtype(y_dtype, np.integer):
            raise DataFormatError(f"y must hold integer labels, got {y_dtype}")
        if y_shape != (n,):
            raise DataFormatError(f"y must have shape ({n},) to match x's {n} images, got {y_shape}")
        x = _read_npy(zf, x_info)
        y = _read_npy(zf, y_info)
    if x.ndim == 3:
        x = x[..., None]
    y = y.astype(np.int64)
    _check_labels(y, num_classes)
    return ImageSet(np.ascontiguousarray(x), y)


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
    _check_ratio(f".npz array {name!r}", info.file_size, info.compress_size, limits)


def _check_ratio(what: str, expanded: int, stored: int, limits: DataLimits) -> None:
    if expanded > limits.max_expanded_bytes:
        raise DataFormatError(f"{what} expands to {expanded} bytes, over the limit of {limits.max_expanded_bytes}")
    if expanded > limits.ratio_slack_bytes and expanded > limits.max_compression_ratio * max(stored, 1):
        raise DataFormatError(
            f"{what} expands {expanded / max(stored, 1):.0f}-fold ({stored} to {expanded} bytes), over the "
            f"limit of {limits.max_compression_ratio:.0f}"
        )


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
    except _ZIP_READ_ERRORS as e:
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
    _check_ratio(f".npz array {name[:-4]!r}", nbytes, info.compress_size, limits)
    return tuple(int(d) for d in shape), dtype


def _read_npy(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """The array of a checked member, read into one allocation of the header's size (never more)."""
    try:
        with zf.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except _ZIP_READ_ERRORS as e:
        raise DataFormatError(f".npz array {info.filename[:-4]!r} could not be read: {str(e)[:200]}") from e


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
        # every header first: sizes, modes and the total are known before a single image is decoded
        h, w, channels = _plan_decode(zf, members, limits, path.stat().st_size)
        x = np.empty((len(members), h, w, channels), dtype=np.uint8)
        for i, m in enumerate(members):
            img = _decode(zf, m.info, limits)
            if img.shape[:2] != (h, w):  # the header said otherwise: a file that changed its mind
                raise DataFormatError(f"image {m.info.filename!r} decodes to {_wxh(img.shape[:2])}, not {_wxh((h, w))}")
            x[i] = img  # a grayscale image broadcasts into a colour folder's three channels
    y = np.array([labels[m.class_name] for m in members], dtype=np.int64)
    _check_labels(y, num_classes)
    return ImageSet(x, y), class_names


def _plan_decode(
    zf: zipfile.ZipFile, members: list[_Member], limits: DataLimits, archive_bytes: int
) -> tuple[int, int, int]:
    """``(H, W, C)`` of the folder from the image headers alone, after the size, pixel and total budgets."""
    first: tuple[str, tuple[int, int]] | None = None
    channels = 1
    for m in members:
        w, h, mode = _header(zf, m.info, limits)
        if first is None:
            first = (m.info.filename, (h, w))
        elif (h, w) != first[1]:
            raise DataFormatError(
                f"image {m.info.filename!r} is {_wxh((h, w))} but {first[0]!r} is "
                f"{_wxh(first[1])}; all images must have the same size"
            )
        # a folder mixing grayscale and colour images becomes colour throughout
        if mode not in ("L", "1"):
            channels = 3
    assert first is not None
    h, w = first[1]
    total = len(members) * h * w
    if total > limits.max_total_pixels:
        raise DataFormatError(
            f"zip's {len(members)} images of {_wxh((h, w))} hold {total} pixels together, over the limit of "
            f"{limits.max_total_pixels}"
        )
    _check_ratio("zip's images", total * channels, archive_bytes, limits)
    return h, w, channels


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
    if info.compress_type not in _ZIP_METHODS:
        raise DataFormatError(
            f"zip member {name!r} uses the unknown zip compression method {info.compress_type}; "
            "use stored or deflate"
        )


def _class_labels(names: list[str], num_classes: int | None) -> tuple[dict[str, int], list[str] | None]:
    if all(n.isascii() and n.isdigit() for n in names):
        labels: dict[str, int] = {}
        seen: dict[int, str] = {}
        for n in names:
            # a folder named by class index must name one the model has (and one an int64 can hold)
            index = int(n) if len(n) <= 18 else None
            bound = num_classes if num_classes is not None else _MAX_CLASS_INDEX + 1
            if index is None or index >= bound:
                where = f"num_classes={num_classes}" if num_classes is not None else f"{_MAX_CLASS_INDEX + 1}"
                raise DataFormatError(f"class folder {n[:40]!r} names class index {n[:40]}, not below {where}")
            if index in seen:
                raise DataFormatError(f"class folders {seen[index]!r} and {n!r} name the same class index {index}")
            labels[n], seen[index] = index, n
        return labels, None
    if num_classes is not None and len(names) > num_classes:
        raise DataFormatError(
            f"zip has {len(names)} class folders but the model has num_classes={num_classes}"
        )
    return {n: i for i, n in enumerate(names)}, names


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: DataLimits) -> tuple[int, int, str]:
    """``(width, height, mode)`` of member ``info`` from its image header; nothing is decoded."""
    try:
        with zf.open(info) as f, warnings.catch_warnings():
            # our own pixel limits replace PIL's process-wide one
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f, formats=("PNG", "JPEG")) as img:
                (w, h), mode = img.size, img.mode
    except _ZIP_READ_ERRORS + (SyntaxError, Image.DecompressionBombError) as e:
        raise _not_an_image(info, e) from e
    if w * h > limits.max_pixels_per_image:
        raise DataFormatError(
            f"image {info.filename!r} is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels_per_image}"
        )
    if w * h == 0:
        raise DataFormatError(f"image {info.filename!r} is empty ({w}x{h})")
    if mode not in _GRAY_MODES + _COLOUR_MODES:
        raise DataFormatError(f"image {info.filename!r} has the unsupported mode {mode}")
    return w, h, mode


def _not_an_image(info: zipfile.ZipInfo, e: BaseException) -> DataFormatError:
    return DataFormatError(f"zip member {info.filename!r} is not a readable PNG or JPEG image: {str(e)[:200]}")


def _decode(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: DataLimits) -> np.ndarray:
    try:
        with zf.open(info) as f:
            # never trust the declared size alone: read at most one byte past it
            data = f.read(info.file_size + 1)
    except _ZIP_READ_ERRORS as e:
        raise DataFormatError(f"zip member {info.filename!r} is unreadable: {str(e)[:200]}") from e
    if len(data) > info.file_size:
        raise DataFormatError(f"zip member {info.filename!r} expands past its declared size")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
            w, h = img.size
            if w * h > limits.max_pixels_per_image:  # checked again on the bytes actually decoded
                raise DataFormatError(
                    f"image {info.filename!r} is {w}x{h} = {w * h} pixels, over the limit of "
                    f"{limits.max_pixels_per_image}"
                )
            img.load()
    except DataFormatError:
        raise
    except _ZIP_READ_ERRORS + (SyntaxError, Image.DecompressionBombError) as e:
        raise _not_an_image(info, e) from e
    if img.mode in _GRAY_MODES:
        arr = np.asarray(img.convert("L"))[..., None]
    elif img.mode in _COLOUR_MODES:
        arr = np.asarray(img.convert("RGB"))
    else:
        raise DataFormatError(f"image {info.filename!r} has the unsupported mode {img.mode}")
    return arr


# --------------------------------------------------------------------------------------------------- shared


def _open_zip(path: Path, kind: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except _ZIP_READ_ERRORS as e:
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
