"""What every checkpoint loader shares: its errors, its result and the limits it enforces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from core.ranges import has_control_character

CheckpointFormat = Literal["safetensors", "torch", "backdoorbench"]


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded; the message says why and, where possible, what to do."""


class UnsupportedFormatError(CheckpointError):
    """A checkpoint format Antidote does not load (the API answers 415)."""


@dataclass(frozen=True)
class CheckpointLimits:
    """Bounds on what a checkpoint may make the loader allocate or do, whatever the file declares."""

    # data.pkl of a torch archive; BackdoorBench results pickle their datasets inline, hence the size
    max_pickle_bytes: int = 256 * 1024 * 1024
    # distinct globals a BackdoorBench pickle may name before it is refused (each is neutralised, not run)
    max_pickle_globals: int = 1000
    # the objects data.pkl may build, estimated before unpickling: this times its size, plus the slack
    max_pickle_memory_ratio: float = 2.0
    pickle_memory_slack_bytes: int = 64 * 1024 * 1024
    # how many neutralised names the report lists (the count is always complete)
    max_listed_globals: int = 100


@dataclass
class LoadedCheckpoint:
    """The tensors of a checkpoint and what the file said about them (BackdoorBench's ``model_name``,
    ``num_classes``, ``ignored_globals``; safetensors' ``__metadata__``)."""

    state_dict: dict[str, torch.Tensor]
    format: CheckpointFormat
    meta: dict[str, Any] = field(default_factory=dict)

    def findings(self) -> dict[str, Any]:
        """What the report should say about the file itself: the globals a BackdoorBench pickle named, which
        were neutralised (sorted, at most ``max_listed_globals``, with the full count); empty otherwise."""
        if "ignored_globals" not in self.meta:
            return {}
        return {"ignored_globals": list(self.meta["ignored_globals"]),
                "ignored_globals_count": int(self.meta.get("ignored_globals_count", len(self.meta["ignored_globals"])))}


def check_global_name(qualified: str) -> None:
    """Refuse a pickled global whose name holds a control character: no Python module or attribute is named so,
    and the name goes into the report (a NUL, which PostgreSQL's jsonb refuses, failed the finished scan's
    write after the whole run)."""
    if has_control_character(qualified):
        raise CheckpointError(f"PyTorch checkpoint's pickle names a global with a control character "
                              f"({qualified[:80]!r}); no Python module or attribute is named so")


def is_nonneg_int(v: object) -> bool:
    """True for a plain non-negative ``int`` (not ``bool``): the only thing a size or offset may be."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
