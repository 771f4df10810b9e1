"""Projected gradient descent on the unrolled top objective, recording the trajectory."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from core.multilevel.gradient import Mode, value_and_hypergradient
from core.multilevel.problem import MultilevelProblem


@dataclass
class Trajectory:
    """The iterates ``x_1^(k)`` and ``F_1(x_1^(k))`` for k = 0..iterations, and the wall time taken."""

    x: list[torch.Tensor] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> torch.Tensor:
        """The last iterate."""
        return self.x[-1]

    @property
    def best(self) -> torch.Tensor:
        """The iterate with the lowest recorded ``F_1``."""
        return self.x[min(range(len(self.values)), key=self.values.__getitem__)]


def solve(
    problem: MultilevelProblem,
    iterations: int,
    x1: torch.Tensor | None = None,
    lr: float | None = None,
    mode: Mode = "reverse",
    callback: Callable[[int, torch.Tensor, float], None] | None = None,
    normalized: bool = False,
) -> Trajectory:
    """Run ``x1 <- P_1(x1 - lr * ∇F_1(x1))`` for ``iterations`` steps from ``x1`` (default: level 1's init).

    ``normalized=True`` steps along ``∇F_1 / ||∇F_1||`` instead, so that ``lr`` is the distance moved per
    iteration whatever the hypergradient's scale (useful when that scale is unknown in advance, e.g. a
    regularisation weight that starts where it barely matters).
    ``lr`` defaults to level 1's; the start point is projected first, so every recorded iterate is feasible.
    The trajectory records ``iterations + 1`` points: the last one's value costs one more evaluation.
    ``callback(k, x, value)`` is called at each recorded point (progress reporting).
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    top = problem.levels[0]
    step = top.lr if lr is None else lr
    x = (top.init if x1 is None else x1).detach().clone()
    if top.project is not None:
        x = top.project(x).detach()
    trajectory = Trajectory()
    start = time.perf_counter()
    for k in range(iterations + 1):
        value, grad = value_and_hypergradient(problem, x, mode)
        trajectory.x.append(x.clone())
        trajectory.values.append(float(value))
        trajectory.grad_norms.append(float(grad.norm()))
        if callback is not None:
            callback(k, x, float(value))
        if k == iterations:
            break
        if normalized:
            grad = grad / grad.norm().clamp_min(1e-30)
        x = x - step * grad
        if top.project is not None:
            x = top.project(x).detach()
    trajectory.seconds = time.perf_counter() - start
    return trajectory
