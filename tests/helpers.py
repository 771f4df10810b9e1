"""Small real things the tests share: a backdoored model on scikit-learn's digits, and file writers."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cli.demo import DIGITS_MODEL, DIGITS_NORM, backdoored_digits_model, load_digits
from core.data.imageset import ImageSet

NORM = DIGITS_NORM
SPEC_MODEL = DIGITS_MODEL


def digits() -> ImageSet:
    return load_digits()


def backdoored_digits() -> tuple[dict[str, torch.Tensor], ImageSet, ImageSet]:
    """(state dict of a ResNet-20 with a BadNets backdoor to class 0, a clean subset, a clean test set)."""
    return _cached_backdoored_digits()


@lru_cache(maxsize=1)
def _cached_backdoored_digits() -> tuple[dict[str, torch.Tensor], ImageSet, ImageSet]:
    return backdoored_digits_model()


def write_npz(path: Path, data: ImageSet) -> Path:
    np.savez(path, x=data.x, y=data.y)
    return path


def write_safetensors(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


# the detector's default search costs ~10-20 s per scan on the CI's 2 cores (docs/detect.md); tests that do not
# test detection switch it off, those that do pass their own ``detect``
NO_DETECT = {"enabled": False}


def spec_json(mode: str = "scan", **extra: Any) -> str:
    return json.dumps({"mode": mode, "model": SPEC_MODEL, "detect": NO_DETECT, **extra})
