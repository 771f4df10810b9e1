"""``.zip`` image folders ``[top/]<class>/<image>.png|jpg``: names, layout and every image header checked,
and the pixel budgets enforced, before one array of the whole folder is allocated and filled."""

from __future__ import annotations

import io
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from core.data.imageset import ImageSet
from core.data.limits import DataFormatError, DataLimits
from core.data.zip_checks import ZIP_READ_ERRORS, check_labels, check_ratio, open_zip, wxh

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# folders and files that archivers add and that are no part of the data
_JUNK_PREFIXES = ("__MACOSX/",)

_JUNK_NAMES = ("Thumbs.db", "desktop.ini")

_GRAY_MODES = ("L", "1")

_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)

_COLOUR_MODES = ("RGB", "RGBA", "P", "LA", "PA", "CMYK", "YCbCr")

# the largest class index a folder may name when the model's class count is not known
_MAX_CLASS_INDEX = 2**31 - 1

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# a PNG's zlib-compressed ICC profile and text chunks: PIL inflates each to up to 1 MiB
# (PngImagePlugin.MAX_TEXT_CHUNK) however few bytes it is stored in, and a PNG may repeat them, so 200 of
# 1 KiB each cost 200 MiB of inflating per read; the pixels never depend on them, so PIL never sees them
_PNG_INFLATED_CHUNKS = (b"iCCP", b"zTXt", b"iTXt")

# a progressive JPEG's scans: each costs the decoder a pass over all its blocks however few bytes it is stored in
# (a 12-byte scan of a 1000x1000 image ~60 us: 10,000 of them in 145 kB cost 0.6 s, an hour per GiB of upload);
# encoders write 6-10 (libjpeg's progressive scripts) up to about 20 (mozjpeg), and libjpeg-turbo leaves the
# limit to the application (its djpeg -maxscans)
MAX_JPEG_SCANS = 100


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    class_name: str


def load_image_zip(
    path: Path, limits: DataLimits, num_classes: int | None
) -> tuple[ImageSet, list[str] | None]:
    """The images of an image-folder ``.zip`` and its class names (``None`` when folders are indices)."""
    zf = open_zip(path, ".zip", limits.max_zip_members)
    with zf:
        members = _image_members(zf, limits)
        labels, class_names = _class_labels(sorted({m.class_name for m in members}), num_classes)
        members.sort(key=lambda m: (labels[m.class_name], m.info.filename))
        # every header first: sizes, modes and the total are known before a single image is decoded
        h, w, channels = _plan_decode(zf, members, limits, path.stat().st_size)
        x = np.empty((len(members), h, w, channels), dtype=np.uint8)
        for i, m in enumerate(members):
            img = _decode(zf, m.info, limits)
            if img.shape[:2] != (h, w) or img.shape[2] > channels:  # not what its header said
                raise DataFormatError(
                    f"image {m.info.filename!r} decodes to {wxh(img.shape[:2])} with {img.shape[2]} channel(s), "
                    f"not the {wxh((h, w))} its header declared"
                )
            x[i] = img  # a grayscale image broadcasts into a colour folder's three channels
    y = np.array([labels[m.class_name] for m in members], dtype=np.int64)
    check_labels(y, num_classes)
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
            # every image has the first one's size: the budgets are known now, before the other headers
            _check_budgets(len(members), h, w, 1, limits, archive_bytes)
        elif (h, w) != first[1]:
            raise DataFormatError(
                f"image {m.info.filename!r} is {wxh((h, w))} but {first[0]!r} is "
                f"{wxh(first[1])}; all images must have the same size"
            )
        # a folder mixing grayscale and colour images becomes colour throughout
        if mode not in _GRAY_MODES:
            channels = 3
    assert first is not None
    h, w = first[1]
    _check_budgets(len(members), h, w, channels, limits, archive_bytes)
    return h, w, channels


def _check_budgets(n: int, h: int, w: int, channels: int, limits: DataLimits, archive_bytes: int) -> None:
    """Refuse ``n`` images of ``h``×``w`` past the total pixel budget, or decoding past the ratio limit."""
    total = n * h * w
    if total > limits.max_total_pixels:
        raise DataFormatError(
            f"zip's {n} images of {wxh((h, w))} hold {total} pixels together, over the limit of "
            f"{limits.max_total_pixels}"
        )
    check_ratio("zip's images", total * channels, archive_bytes, limits)


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
    data = _member_bytes(zf, info)
    try:
        with warnings.catch_warnings():
            # our own pixel limits replace PIL's process-wide one
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as img:
                (w, h), mode = img.size, img.mode
    except ZIP_READ_ERRORS + (SyntaxError, Image.DecompressionBombError) as e:
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


def _member_bytes(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The bytes of member ``info`` as PIL gets them: read to at most its declared size, a PNG without the
    chunks of ``_PNG_INFLATED_CHUNKS``."""
    try:
        with zf.open(info) as f:
            # never trust the declared size alone: read at most one byte past it
            data = f.read(info.file_size + 1)
    except ZIP_READ_ERRORS as e:
        raise DataFormatError(f"zip member {info.filename!r} is unreadable: {str(e)[:200]}") from e
    if len(data) > info.file_size:
        raise DataFormatError(f"zip member {info.filename!r} expands past its declared size")
    if data.startswith(b"\xff\xd8") and (scans := jpeg_scans(data, MAX_JPEG_SCANS)) > MAX_JPEG_SCANS:
        raise DataFormatError(f"JPEG {info.filename!r} has more than {MAX_JPEG_SCANS} scans (at least {scans}); "
                              "re-encode it (encoders write at most about 20)")
    if not data.startswith(_PNG_SIGNATURE):
        return data
    kept, pos = [data[:8]], 8
    while pos + 8 <= len(data):  # each chunk: 4-byte length, 4-byte type, data, 4-byte CRC
        end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] not in _PNG_INFLATED_CHUNKS:
            kept.append(data[pos:end])
        pos = end
    kept.append(data[pos:])
    return b"".join(kept)


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """How many scans (SOS markers) the JPEG ``data`` holds, counted up to ``stop_after + 1``: its segments are
    walked by their lengths, each scan's entropy-coded data to the next marker (a 0xFF there is followed by a
    stuffed 0x00 or is a restart marker), so bytes inside APPn payloads or an EXIF thumbnail never count. Stops
    at EOI or at bytes that are no marker (PIL then says what is wrong)."""
    pos, scans, n = 2, 0, len(data)
    while pos + 1 < n and scans <= stop_after:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if pos + 4 > n:
            break
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker != 0xDA:
            continue
        scans += 1
        while (j := data.find(b"\xff", pos)) >= 0 and j + 1 < n and (data[j + 1] == 0 or 0xD0 <= data[j + 1] <= 0xD7):
            pos = j + 2
        if j < 0 or j + 1 >= n:
            break
        pos = j
    return scans


def _decode(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: DataLimits) -> np.ndarray:
    data = _member_bytes(zf, info)
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
    except ZIP_READ_ERRORS + (SyntaxError, Image.DecompressionBombError) as e:
        raise _not_an_image(info, e) from e
    if img.mode in _GRAY_MODES:
        arr = np.asarray(img.convert("L"))[..., None]
    elif img.mode in _COLOUR_MODES:
        arr = np.asarray(img.convert("RGB"))
    else:
        raise DataFormatError(f"image {info.filename!r} has the unsupported mode {img.mode}")
    return arr
