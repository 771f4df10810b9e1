"""The n-level gradient method (Sato, Tanaka & Takeda, NeurIPS 2021): exact hypergradient."""

from core.multilevel.gradient import hypergradient, unroll, unrolled_objective, value_and_hypergradient
from core.multilevel.problem import Level, MultilevelProblem
from core.multilevel.projections import box, l2_ball
from core.multilevel.solve import Trajectory, solve

__all__ = [
    "Level",
    "MultilevelProblem",
    "Trajectory",
    "box",
    "hypergradient",
    "l2_ball",
    "solve",
    "unroll",
    "unrolled_objective",
    "value_and_hypergradient",
]
