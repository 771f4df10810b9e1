"""What every repair method returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass
class RepairResult:
    """The repaired model (a new module; the input model is left untouched) and a JSON-ready account of how:
    ``params`` every parameter used (defaults included), ``chosen`` the values chosen automatically,
    ``timings`` seconds per stage (plus ``total``), ``details`` method-specific facts (e.g. the NWC summary)."""

    model: nn.Module
    method: str
    params: dict[str, object]
    chosen: dict[str, object] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
