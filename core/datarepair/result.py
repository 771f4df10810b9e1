"""What every data-repair method returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch.nn as nn


@dataclass
class DataRepairResult:
    """The repaired model (a new module; the input is left untouched) and a per-training-sample account.

    ``scores`` float64 ``(N_train,)``: harm score, higher = more harmful (finite, else the method raised);
    ``flagged`` bool ``(N_train,)``; ``new_labels`` int64 ``(N_train,)``: the label the repair trained on,
    ``-1`` for a sample dropped or unlearned; ``params`` every parameter used (defaults filled); ``details``
    JSON-able facts (counts, the threshold and how it was chosen); ``timings`` seconds per stage and ``total``;
    ``input_flagged`` which flags the input-quality reference raised.
    """

    model: nn.Module
    method: str
    params: dict[str, object]
    scores: np.ndarray
    flagged: np.ndarray
    new_labels: np.ndarray
    details: dict[str, object] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # bool (N_train,) with input_quality: flagged because the input is not drawn like the clean inputs (a subset
    # of ``flagged``); None when the method did not score input quality
    input_flagged: np.ndarray | None = None
