"""Bounds on what an uploaded data file may make Antidote allocate, and the errors its loaders raise."""

from __future__ import annotations

from dataclasses import dataclass

from core.models.checkpoint.errors import CheckpointLimits


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
    # training_data of repair_data: its per-sample scoring and the repair's passes over it cost far more per
    # image than an evaluation, so it has a bound of its own (50,000 CIFAR-10 training images fit)
    max_training_images: int = 60_000
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
