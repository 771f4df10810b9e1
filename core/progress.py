"""One progress reporter for every long piece of work: stage timings, a bar that never moves back, and
"should I stop?".

A :class:`Progress` covers a span of the whole bar. ``stage(name, lo, hi)`` ends the current stage (its
seconds go to ``timings``) and returns a child reporter for ``name`` that covers ``[lo, hi]`` of this one's
span, so a repair method reports its own stages from 0 to 1 and the scan's bar still only moves forward.
Stages of children are labelled ``parent:child`` (``repair:finetune``). Work polls :meth:`Progress.check`
at safe points (between batches, between stages); when the sink says to stop (a client's cancel, a passed
deadline) core raises its own :class:`StopRequested` there, so nothing foreign is thrown through core's
loops and the caller maps the reason to an outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from typing import Protocol


class StopRequested(Exception):
    """Raised by core at a safe point because the sink asked to stop; ``reason`` is the sink's word for why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"work stopped: {reason}")
        self.reason = reason


class ProgressSink(Protocol):
    """Where progress goes (e.g. the scan's database row) and who decides that work should stop."""

    def report(self, stage: str, fraction: float, timings: MutableMapping[str, float]) -> None:
        """Record that ``stage`` is running and the whole job is ``fraction`` done (never decreasing);
        ``timings`` are the top-level stages' seconds so far. Must not raise."""

    def stop_reason(self) -> str | None:
        """Why the work should stop now (``"canceled"``, ``"time_limit"``, …), or ``None`` to go on."""


class Progress:
    """A reporter for one span of the bar; the root (made with a sink, or none) covers all of it."""

    def __init__(self, sink: ProgressSink | None = None, *, sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.sink = sink
        self.sync = sync  # e.g. a CUDA synchronise, so that queued kernels are charged to their own stage
        self.timings: dict[str, float] = {}
        self._clock = clock
        self._root: Progress = self
        self._parent: Progress | None = None
        self._label = ""
        self._lo, self._hi = 0.0, 1.0
        self._high = 0.0  # the bar's high-water mark (root only)
        self._current: tuple[str, float] | None = None
        self._started = self._now()

    def _now(self) -> float:
        node: Progress | None = self
        while node is not None:  # the nearest reporter with a sync function charges queued work
            if node.sync is not None:
                node.sync()
                break
            node = node._parent
        return self._clock()

    @property
    def label(self) -> str:
        """This reporter's stage label (``""`` for the root, ``repair:finetune`` for a grandchild)."""
        return self._label

    @property
    def fraction(self) -> float:
        """How far the whole bar is, in [0, 1]."""
        return self._root._high

    def stage(self, name: str, lo: float | None = None, hi: float | None = None) -> Progress:
        """End the current stage and start ``name``, covering ``[lo, hi]`` of this reporter's span (no span:
        it keeps the bar where it is); a safe point, so it may raise :class:`StopRequested`."""
        self.close()
        self.check()
        child = self._child(f"{self._label}:{name}" if self._label else name, lo, hi)
        self._current = (name, self._clock())
        child._started = self._current[1]
        child.update(0.0)
        return child

    def _child(self, label: str, lo: float | None, hi: float | None) -> Progress:
        """A reporter for ``[lo, hi]`` of this one's span (no span: a point where the bar is now)."""
        if lo is None or hi is None:
            abs_lo = abs_hi = min(max(self._root._high, self._lo), self._hi)
        else:
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"a stage's span must satisfy 0 <= lo <= hi <= 1, got [{lo}, {hi}]")
            width = self._hi - self._lo
            abs_lo, abs_hi = self._lo + width * lo, self._lo + width * hi
        child = Progress.__new__(Progress)
        child.sink, child.sync, child.timings, child._clock = None, None, {}, self._clock
        child._root, child._parent, child._label = self._root, self, label
        child._lo, child._hi, child._high, child._current = abs_lo, abs_hi, 0.0, None
        return child

    def span(self, lo: float, hi: float) -> Progress:
        """A part of this reporter's span, ``[lo, hi]``, under the same stage label and with no timing of its
        own (e.g. the clean and the triggered pass of one evaluation)."""
        child = self._child(self._label, lo, hi)
        child._started = self._clock()
        return child

    def update(self, fraction: float) -> None:
        """This reporter's own work is ``fraction`` done (clamped to [0, 1]); the bar never moves back."""
        f = min(max(float(fraction), 0.0), 1.0) if fraction == fraction else 0.0
        root = self._root
        root._high = max(root._high, self._lo + (self._hi - self._lo) * f)
        if root.sink is not None:
            root.sink.report(self._label or "start", round(root._high, 6), root.timings)

    def should_stop(self) -> str | None:
        """Why the work should stop now (the sink's reason), or ``None``."""
        sink = self._root.sink
        return sink.stop_reason() if sink is not None else None

    def check(self) -> None:
        """A safe point: raise :class:`StopRequested` if the work should stop."""
        reason = self.should_stop()
        if reason is not None:
            raise StopRequested(reason)

    def close(self) -> None:
        """End the current stage, if any, and record its seconds (idempotent)."""
        if self._current is not None:
            name, t0 = self._current
            self.timings[name] = round(self.timings.get(name, 0.0) + self._now() - t0, 4)
            self._current = None

    def finish(self) -> dict[str, float]:
        """End the current stage and move the bar to this reporter's end; the stage timings plus ``total``
        (seconds since this reporter began)."""
        self.close()
        self.update(1.0)
        return {**self.timings, "total": round(self._now() - self._started, 4)}
