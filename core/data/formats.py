"""Reading uploaded image data (``.npz`` arrays or a ``.zip`` image folder) into an :class:`ImageSet`.

Uploads are hostile until proven otherwise: sizes, counts, member names and pixel counts are checked before
anything large is decompressed or decoded, and pickled objects are never loaded. ``npz_file`` and
``image_folder`` hold the two formats, ``limits`` the bounds (:class:`DataLimits`), ``zip_checks`` what they
share.
"""

from __future__ import annotations

from pathlib import Path

from core.data.image_folder import IMAGE_EXTENSIONS, load_image_zip
from core.data.imageset import ImageSet
from core.data.limits import DataFormatError, DataLimits, UnsupportedDataFormatError
from core.data.npz_file import load_npz

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataFormatError",
    "DataLimits",
    "UnsupportedDataFormatError",
    "load_image_set",
    "load_image_set_with_classes",
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
    suffix = Path(filename or path.name).suffix.lower()
    if suffix == ".npz":
        return load_npz(path, limits, num_classes), None
    if suffix == ".zip":
        return load_image_zip(path, limits, num_classes)
    raise UnsupportedDataFormatError(
        f"unsupported data format {suffix or '(no extension)'!r}: upload an .npz with uint8 'x' "
        "(N×H×W×C) and integer 'y', or a .zip of an image folder <class>/<image>.png|jpg"
    )
