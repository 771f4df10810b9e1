"""Checks every data loader shares: opening a zip, expansion ratios, image counts and labels."""

from __future__ import annotations

import struct
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from core.data.limits import DataFormatError, DataLimits
from core.models.checkpoint.archive import count_zip_entries

# what reading a hostile zip member or image can raise besides our own errors (numpy tokenizes an .npy header:
# an unclosed bracket in it is a tokenize.TokenError, which is no ValueError)
ZIP_READ_ERRORS = (
    zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError,
    ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError, struct.error, UnicodeDecodeError,
    tokenize.TokenError,
)  # fmt: skip


def open_zip(path: Path, kind: str, max_members: int) -> zipfile.ZipFile:
    """The archive at ``path``, or a :class:`DataFormatError` saying it is no valid ``kind`` file or has more
    than ``max_members`` entries (counted before zipfile builds one object per entry)."""
    if (members := count_zip_entries(path, max_members)) > max_members:
        raise DataFormatError(f"{kind} has at least {members} members, over the limit of {max_members}")
    try:
        return zipfile.ZipFile(path)
    except ZIP_READ_ERRORS as e:
        raise DataFormatError(f"not a valid {kind} file (it is not a readable zip archive): {e}") from e


def check_ratio(what: str, expanded: int, stored: int, limits: DataLimits) -> None:
    """Refuse ``expanded`` bytes from ``stored`` past the byte limit, or past the ratio above the slack."""
    if expanded > limits.max_expanded_bytes:
        raise DataFormatError(f"{what} expands to {expanded} bytes, over the limit of {limits.max_expanded_bytes}")
    if expanded > limits.ratio_slack_bytes and expanded > limits.max_compression_ratio * max(stored, 1):
        raise DataFormatError(
            f"{what} expands {expanded / max(stored, 1):.0f}-fold ({stored} to {expanded} bytes), over the "
            f"limit of {limits.max_compression_ratio:.0f}"
        )


def check_count_and_pixels(n: int, h: int, w: int, limits: DataLimits) -> None:
    """Refuse no images, too many, images without pixels, or images over the per-image pixel limit."""
    if n == 0:
        raise DataFormatError("the data holds no images")
    if n > limits.max_images:
        raise DataFormatError(f"the data holds {n} images, over the limit of {limits.max_images}")
    if h < 1 or w < 1:
        raise DataFormatError(f"images are {w}x{h} pixels: an image needs at least one pixel in each direction")
    if h * w > limits.max_pixels_per_image:
        raise DataFormatError(
            f"images are {w}x{h} = {h * w} pixels, over the limit of {limits.max_pixels_per_image}"
        )


def check_labels(y: np.ndarray, num_classes: int | None) -> None:
    """Refuse negative labels, or labels outside ``[0, num_classes)`` when it is known."""
    bad = (y < 0) | (y >= num_classes) if num_classes is not None else y < 0
    count = int(bad.sum())
    if count:
        where = f"lie outside [0, {num_classes})" if num_classes is not None else "are negative"
        raise DataFormatError(
            f"{count} of {len(y)} labels {where} (found labels {int(y.min())}..{int(y.max())})"
        )


def wxh(hw: tuple[int, ...]) -> str:
    """``(H, W, ...)`` written as ``WxH``."""
    return f"{hw[1]}x{hw[0]}"
