"""Reading uploaded image data (``.npz`` arrays or a ``.zip`` image folder) into an :class:`ImageSet`.

Uploads are hostile until proven otherwise: sizes, counts, member names and pixel counts are checked before
anything large is decompressed or decoded, and pickled objects are never loaded. ``npz_file`` and
``image_folder`` hold the two formats, ``limits`` the bounds (:class:`DataLimits`), ``zip_checks`` what they
share.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from core.data.image_folder import IMAGE_EXTENSIONS, load_image_zip
from core.data.imageset import ImageSet
from core.data.limits import DataFormatError, DataLimits, UnsupportedDataFormatError
from core.data.npz_file import MASK_ARRAY, load_npz, load_npz_with_mask

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataFormatError",
    "DataLimits",
    "MASK_ARRAY",
    "UnsupportedDataFormatError",
    "load_image_set",
    "load_image_set_with_classes",
    "load_training_set",
]


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
    suffix = _suffix(path, filename)
    if suffix == ".npz":
        return load_npz(path, limits, num_classes), None
    if suffix == ".zip":
        return load_image_zip(path, limits, num_classes)
    raise _unsupported(suffix)


def load_training_set(
    path: str | Path,
    filename: str | None = None,
    *,
    limits: DataLimits = DataLimits(),
    num_classes: int | None = None,
) -> tuple[ImageSet, list[str] | None, np.ndarray | None]:
    """Training data for ``repair_data``: the images, their class folder names (as
    :func:`load_image_set_with_classes`), and the optional ``is_corrupt`` mask of an ``.npz`` (bool, one per
    image; ``None`` when absent: image folders cannot carry it). At most ``limits.max_training_images``."""
    path = Path(path)
    suffix = _suffix(path, filename)
    limits = replace(limits, max_images=min(limits.max_images, limits.max_training_images))
    if suffix == ".npz":
        images, mask = load_npz_with_mask(path, limits, num_classes, MASK_ARRAY)
        return images, None, mask
    if suffix == ".zip":
        images, names = load_image_zip(path, limits, num_classes)
        return images, names, None
    raise _unsupported(suffix)


def _suffix(path: Path, filename: str | None) -> str:
    return Path(filename or path.name).suffix.lower()


def _unsupported(suffix: str) -> UnsupportedDataFormatError:
    return UnsupportedDataFormatError(
        f"unsupported data format {suffix or '(no extension)'!r}: upload an .npz with uint8 'x' "
        "(N×H×W×C) and integer 'y', or a .zip of an image folder <class>/<image>.png|jpg"
    )
