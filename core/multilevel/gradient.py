"""The unrolled top objective ``F_1(x_1)`` and its exact gradient, by reverse or forward mode.

Level i (i >= 2) runs ``x_i <- P_i(x_i - lr_i * d/dx_i f_i(x_1, ..., x_i, x_{i+1}^(T)(...), ...))``
for ``T_i`` steps from its fixed initial point, where the derivative is the total one: it flows through the
unrolled solutions of every level below, which are re-solved at each iterate (so an evaluation costs about
``T_2 · … · T_n`` innermost steps). Each inner gradient is taken with ``create_graph=True`` so the whole
nested unroll stays differentiable in ``x_1``; the hypergradient is then one reverse pass (default), or one
forward-mode pass per coordinate of ``x_1`` (``mode="forward"``: the paper's Algorithm 1 accumulates
``dx_i/dx_1`` forward in the same way; worth it only when ``x_1`` is small).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.autograd import forward_ad

from core.multilevel.problem import Level, MultilevelProblem

Mode = Literal["reverse", "forward"]


def _level_gradient(level: Level, index: int, variables: list[torch.Tensor]) -> torch.Tensor:
    """Total derivative of ``level``'s objective in its own variable ``variables[index]``, graph kept."""
    value = level.objective(*variables)
    if value.numel() != 1:
        raise ValueError(f"level {index + 1}: objective must return a scalar, got shape {tuple(value.shape)}")
    (grad,) = torch.autograd.grad(value, variables[index], create_graph=True, allow_unused=True)
    if grad is None:
        raise ValueError(f"level {index + 1}: objective does not depend on its own variable x_{index + 1}")
    return grad


def _unroll_from(levels: tuple[Level, ...], index: int, upper: list[torch.Tensor]) -> list[torch.Tensor]:
    """``upper`` (x_1..x_index) extended by the unrolled solutions of levels ``index`` and below."""
    if index == len(levels):
        return upper
    level = levels[index]
    x = level.init.detach().clone().requires_grad_(True)
    # Tie the start point to the iterate just above with weight zero (values and gradients unchanged). Autograd
    # skips graph nodes older than the input it differentiates for (topological-number pruning), but a fresh
    # leaf is "oldest" of all, so without the tie every unroll's first gradient re-walks the whole graph built
    # so far: about 2.5x slower at n = 4, T = 8 (measured), and worse as T grows.
    x = x + 0.0 * upper[-1].reshape(-1)[:1].sum()
    for _ in range(level.steps):
        variables = _unroll_from(levels, index + 1, [*upper, x])
        x = x - level.lr * _level_gradient(level, index, variables)
        if level.project is not None:
            x = level.project(x)
    return _unroll_from(levels, index + 1, [*upper, x])


def unroll(problem: MultilevelProblem, x1: torch.Tensor) -> list[torch.Tensor]:
    """``[x_1, x_2^(T_2), ..., x_n^(T_n)]``: the unrolled lower-level solutions, differentiable in ``x1``."""
    if x1.shape != problem.levels[0].init.shape:
        raise ValueError(f"x1 has shape {tuple(x1.shape)}, expected {tuple(problem.levels[0].init.shape)}")
    with torch.enable_grad():
        return _unroll_from(problem.levels, 1, [x1])


def unrolled_objective(problem: MultilevelProblem, x1: torch.Tensor) -> torch.Tensor:
    """``F_1(x_1) = f_1(x_1, x_2^(T_2)(x_1), ..., x_n^(T_n)(x_1, ...))``: a scalar, differentiable."""
    with torch.enable_grad():
        value = problem.levels[0].objective(*unroll(problem, x1))
    if value.numel() != 1:
        raise ValueError(f"level 1: objective must return a scalar, got shape {tuple(value.shape)}")
    return value.reshape(())


def value_and_hypergradient(
    problem: MultilevelProblem, x1: torch.Tensor, mode: Mode = "reverse"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F_1(x1), ∇F_1(x1))``, both detached; the gradient is exact for the unrolled problem."""
    x1 = x1.detach()
    if mode == "reverse":
        leaf = x1.clone().requires_grad_(True)
        value = unrolled_objective(problem, leaf)
        (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
        return value.detach(), torch.zeros_like(x1) if grad is None else grad
    if mode == "forward":
        return _forward_value_and_hypergradient(problem, x1)
    raise ValueError(f"mode must be 'reverse' or 'forward', got {mode!r}")


def _forward_value_and_hypergradient(problem: MultilevelProblem, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-mode accumulation: one dual-number pass of the nested unroll per coordinate of ``x1``."""
    grad = torch.zeros_like(x1)
    flat = grad.view(-1)
    value = torch.zeros((), dtype=x1.dtype)
    for k in range(x1.numel()):
        tangent = torch.zeros_like(x1)
        tangent.view(-1)[k] = 1.0
        with forward_ad.dual_level():
            out = unrolled_objective(problem, forward_ad.make_dual(x1, tangent))
            primal, derivative = forward_ad.unpack_dual(out)
            value = primal.detach()
            flat[k] = 0.0 if derivative is None else derivative.detach()
    return value, grad


def hypergradient(problem: MultilevelProblem, x1: torch.Tensor, mode: Mode = "reverse") -> torch.Tensor:
    """The exact gradient of the unrolled top objective ``F_1`` at ``x1`` (same shape as ``x1``)."""
    return value_and_hypergradient(problem, x1, mode)[1]
