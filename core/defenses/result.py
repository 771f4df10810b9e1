"""What every repair method returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn


@dataclass
class RepairResult:
    """The repaired model (a new module; the input model is left untouched) and a JSON-ready account of how:
    ``params`` every parameter used (defaults included), ``chosen`` the values chosen automatically,
    ``timings`` seconds per stage (plus ``total``), ``details`` method-specific facts (e.g. the NWC summary).
    ``final_scan``: the trigger-free detector's result on the returned model where the method scanned it itself
    (tsbd's escalation), so the pipeline reports that scan instead of running the same one again."""

    model: nn.Module
    method: str
    params: dict[str, object]
    chosen: dict[str, object] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    final_scan: Any = None
