"""How an n-level optimisation problem is described: a list of levels, top first.

Following Sato, Tanaka & Takeda, "A Gradient Method for Multilevel Optimization" (NeurIPS 2021): level i
minimises ``f_i(x_1, ..., x_n)`` over its own variable ``x_i`` given the variables above it and the optimal
responses below it. Every lower level is replaced by ``T_i`` steps of (projected) gradient descent started
from a fixed initial point, which turns the problem into a single-level one in ``x_1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Objective = Callable[..., torch.Tensor]
"""``f(x_1, ..., x_n) -> scalar tensor``; called with every level's variable, top first."""

Projection = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Level:
    """One level: its objective (minimised over this level's variable), start point, steps and step size.

    ``init`` is the top variable's starting point at level 1 and the fixed initial point of the unrolled
    descent below it. ``steps`` is ``T_i`` (unused at the top, where ``solve`` takes an iteration count).
    ``project`` is applied after every step: the feasible set ``S_1`` at the top; below, an optional budget
    (e.g. an adversary's box), which keeps the unroll differentiable wherever the projection is.
    A level that maximises passes the negated objective.
    """

    objective: Objective
    init: torch.Tensor
    steps: int = 1
    lr: float = 0.1
    project: Projection | None = None
    name: str = ""


@dataclass(frozen=True)
class MultilevelProblem:
    """An n-level problem, ``levels[0]`` the top; each level has one tensor variable of ``init``'s shape."""

    levels: tuple[Level, ...]

    def __init__(self, levels: Sequence[Level]) -> None:
        object.__setattr__(self, "levels", tuple(levels))
        if len(self.levels) < 2:
            raise ValueError(f"a multilevel problem needs at least 2 levels, got {len(self.levels)}")
        for i, level in enumerate(self.levels):
            if not isinstance(level.init, torch.Tensor) or not level.init.is_floating_point():
                raise TypeError(f"level {i + 1}: init must be a floating-point tensor")
            if i > 0 and level.steps < 1:
                raise ValueError(f"level {i + 1}: steps (T_{i + 1}) must be >= 1, got {level.steps}")
            if not level.lr > 0:
                raise ValueError(f"level {i + 1}: lr must be > 0, got {level.lr}")

    @property
    def n(self) -> int:
        """The number of levels."""
        return len(self.levels)

    def paper_cost(self) -> int:
        """``T_2 · … · T_n``: the paper's count of innermost steps per evaluation of ``F_1``."""
        return math.prod(level.steps for level in self.levels[1:])

    def innermost_steps(self) -> int:
        """The exact count of innermost gradient steps in one evaluation of ``F_1`` here.

        Each level i re-solves the levels below at each of its ``T_i`` iterates and once more at its final
        iterate (the level above needs the lower responses there), hence ``T_n · Π_{i=2}^{n-1} (T_i + 1)``.
        """
        lower = self.levels[1:]
        return lower[-1].steps * math.prod(level.steps + 1 for level in lower[:-1])
