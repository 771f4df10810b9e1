"""core.progress: one reporter for stage timings, a bar that never moves back, and "should I stop?"."""

from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np
import pytest
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.progress import Progress, StopRequested
from core.training import train_classifier


class RecordingSink:
    """A sink that records every report and answers ``stop_reason`` from a settable value."""

    def __init__(self, stop_after: int | None = None, reason: str = "canceled") -> None:
        self.reports: list[tuple[str, float]] = []
        self.timings: list[dict[str, float]] = []
        self.polls = 0
        self.stop_after, self.reason = stop_after, reason

    def report(self, stage: str, fraction: float, timings: MutableMapping[str, float]) -> None:
        self.reports.append((stage, fraction))
        self.timings.append(dict(timings))

    def stop_reason(self) -> str | None:
        self.polls += 1
        return self.reason if self.stop_after is not None and self.polls > self.stop_after else None


class FakeClock:
    """A clock the test moves by hand, so timings are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stages_are_timed_and_children_scaled_into_their_parent_span() -> None:
    sink, clock = RecordingSink(), FakeClock()
    root = Progress(sink, clock=clock)
    root.stage("load", 0.0, 0.2)
    clock.now = 1.5
    repair = root.stage("repair", 0.2, 0.8)
    unlearn = repair.stage("unlearn", 0.0, 0.5)
    unlearn.update(0.5)
    assert sink.reports[-1] == ("repair:unlearn", pytest.approx(0.35))  # 0.2 + 0.6 * (0.5 * 0.5)
    clock.now = 2.0
    finetune = repair.stage("finetune", 0.5, 1.0)
    finetune.span(0.0, 0.5).update(1.0)  # a part of a stage keeps its label and has no timing of its own
    assert sink.reports[-1] == ("repair:finetune", pytest.approx(0.65))  # 0.2 + 0.6 * (0.5 + 0.5 * 0.5)
    finetune.update(1.0)
    clock.now = 4.0
    method_timings = repair.finish()
    root.stage("report", 0.8, 1.0)
    root.close()
    assert root.timings == {"load": 1.5, "repair": 2.5, "report": 0.0}
    assert method_timings == {"unlearn": 0.5, "finetune": 2.0, "total": 2.5}
    assert sink.reports[-1][0] == "report" and sink.timings[-1]["repair"] == 2.5


def test_the_bar_never_moves_back() -> None:
    sink = RecordingSink()
    root = Progress(sink)
    repair = root.stage("repair", 0.0, 0.5)
    a = repair.stage("a", 0.0, 0.8)
    a.update(1.0)
    repair.stage("b", 0.3, 1.0).update(0.1)  # starts below where the bar already is
    a.update(0.2)  # a stale report from a finished stage
    repair.stage("unknown")  # no span: stays where the bar is
    root.stage("after", 0.4, 1.0).update(float("nan"))  # NaN counts as no progress
    fractions = [f for _, f in sink.reports]
    assert fractions == sorted(fractions) and all(0.0 <= f <= 1.0 for f in fractions)
    assert root.fraction == pytest.approx(0.4)  # a's end: 0.8 of repair's [0, 0.5]
    with pytest.raises(ValueError, match="span"):
        root.stage("bad", 0.7, 0.2)


def test_check_raises_core_s_own_exception_with_the_sink_s_reason() -> None:
    root = Progress(RecordingSink(stop_after=1, reason="time_limit"))
    root.check()  # first poll: go on
    assert root.should_stop() == "time_limit"
    with pytest.raises(StopRequested) as info:
        root.stage("next")  # every stage boundary is a safe point
    assert info.value.reason == "time_limit"


def test_a_reporter_without_a_sink_only_times() -> None:
    root = Progress()
    root.stage("x", 0.0, 1.0).update(0.5)
    root.check()
    assert root.should_stop() is None and "x" in root.finish()


def test_training_loops_poll_between_batches() -> None:
    """A stop requested mid-training is honoured within one batch, from core (not the sink)."""
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8), rng.integers(0, 2, 64).astype(np.int64))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    sink = RecordingSink(stop_after=3)
    with pytest.raises(StopRequested):
        train_classifier(model, data, Normalization(), epochs=50, lr=0.1, batch_size=8, device="cpu",
                         augment=False, progress=Progress(sink))
    assert sink.polls == 4  # three batches ran, the fourth poll stopped it
