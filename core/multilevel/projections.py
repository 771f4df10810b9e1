"""Projections onto simple feasible sets, for a level's ``project``."""

from __future__ import annotations

import torch

from core.multilevel.problem import Projection


def box(lower: float | torch.Tensor, upper: float | torch.Tensor) -> Projection:
    """Projection onto ``{x : lower <= x <= upper}`` (elementwise clamp)."""
    if isinstance(lower, float | int) and isinstance(upper, float | int) and lower > upper:
        raise ValueError(f"empty box: lower {lower} > upper {upper}")

    def project(x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, lower, upper)

    return project


def l2_ball(radius: float) -> Projection:
    """Projection onto ``{x : ||x||_2 <= radius}`` (all entries of the tensor together)."""
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")

    def project(x: torch.Tensor) -> torch.Tensor:
        return x * torch.clamp(radius / x.norm().clamp_min(1e-30), max=1.0)

    return project
