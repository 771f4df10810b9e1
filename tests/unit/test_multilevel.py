"""The n-level gradient method: exact hypergradients, convergence to a closed form, feasibility."""

from __future__ import annotations

import pytest
import torch

from core.multilevel import (
    Level,
    MultilevelProblem,
    box,
    hypergradient,
    l2_ball,
    solve,
    unroll,
    unrolled_objective,
    value_and_hypergradient,
)
from core.multilevel.hparams import (
    HparamConfig,
    bilevel_hparam_problem,
    fit_ridge_gd,
    trilevel_hparam_problem,
)

DT = torch.float64
# Central differences in float64 with h = 1e-6 have error ~h² (truncation) + 1e-16/h (rounding) ≈ 1e-10,
# so this tolerance only allows for rounding in the long unrolls, not for a wrong gradient.
FD_ATOL, FD_RTOL = 1e-7, 1e-6


def _chain_problem(n: int, steps: int, dim: int = 3, seed: int = 0) -> MultilevelProblem:
    """A smooth nonlinear n-level problem whose every level depends on the one below it."""
    g = torch.Generator().manual_seed(seed)
    mats = [0.5 * torch.randn(dim, dim, generator=g, dtype=DT) for _ in range(n)]
    target = torch.randn(dim, generator=g, dtype=DT)

    def top(*xs: torch.Tensor) -> torch.Tensor:
        return (xs[-1] - target).square().sum() + 0.5 * xs[0].square().sum() + torch.sin(xs[1]).sum()

    def lower(i: int):
        def objective(*xs: torch.Tensor) -> torch.Tensor:
            value = 0.5 * (xs[i] - torch.tanh(mats[i] @ xs[i - 1])).square().sum() + 0.1 * xs[i].square().sum()
            if i + 1 < n:
                value = value + 0.3 * (xs[i] * xs[i + 1]).sum()
            return value

        return objective

    levels = [Level(top, 0.1 * torch.randn(dim, generator=g, dtype=DT), lr=0.1)]
    levels += [Level(lower(i), torch.zeros(dim, dtype=DT), steps=steps, lr=0.3) for i in range(1, n)]
    return MultilevelProblem(levels)


def _central_difference(problem: MultilevelProblem, x1: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(x1)
    for k in range(x1.numel()):
        e = torch.zeros_like(x1)
        e.view(-1)[k] = h
        plus = unrolled_objective(problem, x1 + e).detach()
        minus = unrolled_objective(problem, x1 - e).detach()
        grad.view(-1)[k] = (plus - minus) / (2 * h)
    return grad


@pytest.mark.parametrize(("n", "steps"), [(2, 10), (3, 5), (4, 3)])
def test_hypergradient_matches_central_finite_differences(n: int, steps: int) -> None:
    problem = _chain_problem(n, steps)
    x1 = problem.levels[0].init
    grad = hypergradient(problem, x1)
    assert grad.shape == x1.shape and float(grad.abs().max()) > 1e-3  # a non-trivial gradient
    torch.testing.assert_close(grad, _central_difference(problem, x1), atol=FD_ATOL, rtol=FD_RTOL)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_forward_mode_equals_reverse_mode(n: int) -> None:
    problem = _chain_problem(n, steps=3, seed=1)
    x1 = problem.levels[0].init
    value_r, grad_r = value_and_hypergradient(problem, x1, mode="reverse")
    value_f, grad_f = value_and_hypergradient(problem, x1, mode="forward")
    torch.testing.assert_close(value_f, value_r)
    torch.testing.assert_close(grad_f, grad_r, atol=1e-12, rtol=1e-10)


def test_unroll_returns_every_level_and_the_cost_counts() -> None:
    problem = _chain_problem(3, steps=4)
    xs = unroll(problem, problem.levels[0].init)
    assert [tuple(x.shape) for x in xs] == [(3,), (3,), (3,)]
    assert problem.paper_cost() == 16 and problem.innermost_steps() == 5 * 4
    calls = 0

    def counting_bottom(*xs: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return problem.levels[2].objective(*xs)

    counted = MultilevelProblem([*problem.levels[:2], Level(counting_bottom, torch.zeros(3, dtype=DT), 4, 0.3)])
    unrolled_objective(counted, counted.levels[0].init)
    assert calls == counted.innermost_steps()


def _ridge_data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    n, d = 30, 5
    theta = 0.5 * torch.randn(d, generator=g, dtype=DT)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = x @ theta + torch.randn(n, generator=g, dtype=DT)
    x_val = torch.randn(200, d, generator=g, dtype=DT)
    y_val = x_val @ theta + torch.randn(200, generator=g, dtype=DT)
    return x, y, x_val, y_val


def _ridge_closed_form_optimum(x, y, x_val, y_val, upper: float) -> float:
    """argmin over w in [0, upper] of the validation MSE of exact ridge: a grid, then golden-section search."""
    n, d = x.shape

    def val_mse(w: float) -> float:
        theta = torch.linalg.solve(x.T @ x / n + w * torch.eye(d, dtype=DT), x.T @ y / n)
        return float((y_val - x_val @ theta).square().mean())

    grid = [upper * k / 300 for k in range(301)]
    k = min(range(301), key=lambda i: val_mse(grid[i]))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, 300)]
    ratio = (5**0.5 - 1) / 2
    while hi - lo > 1e-10:
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if val_mse(a) < val_mse(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


def test_ridge_bilevel_converges_to_the_closed_form_optimum_as_t_grows() -> None:
    x, y, x_val, y_val = _ridge_data()
    w_star = _ridge_closed_form_optimum(x, y, x_val, y_val, upper=3.0)
    assert 0.1 < w_star < 2.9  # an interior optimum, so convergence is not just the projection's doing

    def problem(steps: int) -> MultilevelProblem:
        return MultilevelProblem(
            [
                Level(lambda w, t: (y_val - x_val @ t).square().mean(), torch.tensor([0.05], dtype=DT), lr=2.0,
                      project=box(0.0, 3.0)),
                Level(lambda w, t: (y - x @ t).square().mean() + w * t.square().sum(), torch.zeros(5, dtype=DT),
                      steps=steps, lr=0.2),
            ]
        )  # fmt: skip

    errors = [abs(float(solve(problem(steps), iterations=60).final) - w_star) for steps in (2, 5, 40)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4


def test_projection_keeps_every_iterate_feasible() -> None:
    # The unconstrained optimum of the top level is x1 = (2, -2); the box cuts it to (0.5, -0.5).
    target = torch.tensor([2.0, -2.0], dtype=DT)
    problem = MultilevelProblem(
        [
            Level(lambda a, b: (b - target).square().sum(), torch.tensor([3.0, 0.0], dtype=DT), lr=0.3,
                  project=box(-0.5, 0.5)),
            Level(lambda a, b: (b - a).square().sum(), torch.zeros(2, dtype=DT), steps=20, lr=0.4),
        ]
    )  # fmt: skip
    trajectory = solve(problem, iterations=30)
    assert len(trajectory.x) == len(trajectory.values) == 31
    assert all(float(x.abs().max()) <= 0.5 for x in trajectory.x)
    torch.testing.assert_close(trajectory.final, torch.tensor([0.5, -0.5], dtype=DT))
    assert trajectory.values[-1] < trajectory.values[0]


def test_normalised_steps_move_exactly_lr() -> None:
    trajectory = solve(_chain_problem(3, 3), 4, lr=0.05, normalized=True)
    for before, after in zip(trajectory.x, trajectory.x[1:], strict=False):
        assert float((after - before).norm()) == pytest.approx(0.05, rel=1e-9)


def test_l2_ball_projection() -> None:
    project = l2_ball(1.0)
    torch.testing.assert_close(project(torch.tensor([3.0, 4.0])), torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(project(torch.tensor([0.3, 0.4])), torch.tensor([0.3, 0.4]))


def test_bad_problems_are_refused() -> None:
    top = Level(lambda a, b: b.sum(), torch.zeros(1))
    with pytest.raises(ValueError, match="at least 2 levels"):
        MultilevelProblem([top])
    with pytest.raises(ValueError, match="steps"):
        MultilevelProblem([top, Level(lambda a, b: b.square().sum(), torch.zeros(1), steps=0)])
    with pytest.raises(TypeError, match="floating-point"):
        MultilevelProblem([top, Level(lambda a, b: b.sum(), torch.zeros(1, dtype=torch.long))])
    ignores_own = MultilevelProblem([top, Level(lambda a, b: a.square().sum(), torch.zeros(1))])
    with pytest.raises(ValueError, match="does not depend on its own variable"):
        hypergradient(ignores_own, torch.zeros(1))
    with pytest.raises(ValueError, match="shape"):
        hypergradient(ignores_own, torch.zeros(2))
    with pytest.raises(ValueError, match="mode"):
        value_and_hypergradient(ignores_own, torch.zeros(1), mode="sideways")  # type: ignore[arg-type]


def test_hparam_problems_have_exact_hypergradients_and_the_adversary_hurts_training() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=g, dtype=DT), torch.randn(12, generator=g, dtype=DT)
    x_val, y_val = torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)
    cfg = HparamConfig(train_steps=6, adversary_steps=3, budget=0.3, log_weight_init=-1.0)
    bilevel = bilevel_hparam_problem(x, y, x_val, y_val, cfg)
    trilevel = trilevel_hparam_problem(x, y, x_val, y_val, cfg)
    lam = torch.tensor([-1.0, 0.0, -2.0], dtype=DT)
    for problem in (bilevel, trilevel):
        torch.testing.assert_close(
            hypergradient(problem, lam), _central_difference(problem, lam), atol=FD_ATOL, rtol=FD_RTOL
        )
    _, p, theta_adv = (v.detach() for v in unroll(trilevel, lam))
    assert float(p.abs().max()) <= cfg.budget + 1e-12 and float(p.abs().max()) > 0
    theta = fit_ridge_gd(x, y, lam, cfg.train_steps, cfg.train_lr)
    torch.testing.assert_close(theta, unroll(bilevel, lam)[1].detach())
    # the adversary's perturbation raises the training loss of the model trained on the perturbed data
    loss_adv = float((y - (x + p) @ theta_adv).square().mean())
    assert loss_adv > float((y - x @ theta).square().mean())


def test_validation_loss_adversary_hurts_the_held_out_error() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 3, generator=g, dtype=DT), torch.randn(12, generator=g, dtype=DT)
    x_val, y_val = torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)
    cfg = HparamConfig(train_steps=6, adversary_steps=3, budget=0.3, adversary_objective="val")
    problem = trilevel_hparam_problem(x, y, x_val, y_val, cfg)
    lam = torch.full((3,), -1.0, dtype=DT)
    theta_adv = unroll(problem, lam)[-1].detach()
    theta = fit_ridge_gd(x, y, lam, cfg.train_steps, cfg.train_lr)
    assert float((y_val - x_val @ theta_adv).square().mean()) > float((y_val - x_val @ theta).square().mean())
    with pytest.raises(ValueError, match="adversary_objective"):
        trilevel_hparam_problem(x, y, x_val, y_val, HparamConfig(adversary_objective="test"))
