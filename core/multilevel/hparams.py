"""Regularisation hyperparameters learned by bilevel or poisoning-aware trilevel optimisation.

The paper's experiment (Sato et al., NeurIPS 2021, §5): linear regression with L2 weights ``exp(λ)`` (one per
feature, or one in all) chosen on validation data. The bilevel model trains the regressor on the training data
(lower) and picks λ by validation error (upper). The trilevel model puts an adversary in between who perturbs
the training features by ``P`` (``|P_ij| <= budget``) to maximise the training loss of the regressor trained
on the perturbed data; λ is then chosen for the worst case, which the paper finds more stable on noisy data.
The middle level is our reading (the paper's exact adversary objective was not at hand): with ``adversary_objective``
"train" the adversary maximises ``Σ_i r_i² - penalty · ||P||²``, ``r = y - (X + P) θ`` on the training data (sums
over samples, so each row of ``P`` sees an O(1) gradient whatever the data size); with "val" it maximises the
validation MSE (times the training-set size, for the same gradient scale) of the model trained on its perturbed
data (a classic poisoning attack; the trilevel problem is then a min-max of the validation error over λ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.multilevel.problem import Level, MultilevelProblem
from core.multilevel.projections import box


@dataclass(frozen=True)
class HparamConfig:
    """Step counts, step sizes and bounds; chosen here for standardised features and target (no source)."""

    per_feature: bool = True  # one L2 weight per feature (else one scalar)
    train_steps: int = 40  # T of the regressor's gradient descent (the lowest level)
    train_lr: float = 0.1  # stable while 2 (λ_max(XᵀX/n) + exp(λ)) < 2 / train_lr
    adversary_steps: int = 5  # T of the adversary (trilevel middle level)
    adversary_lr: float = 0.5  # large enough to reach the budget within its few steps
    budget: float = 0.5  # |P_ij| <= budget, in standard deviations of the feature
    adversary_penalty: float = 0.0
    adversary_objective: str = "train"  # "train": maximise the training loss; "val": the validation loss
    log_weight_init: float = -2.0
    log_weight_bounds: tuple[float, float] = (-8.0, 1.0)
    upper_lr: float = 50.0  # d F / d λ_j = exp(λ_j) d F / d w_j is small, so the step in λ is large


def _residual(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return y - x @ theta


def mse(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the linear model ``theta`` on ``(x, y)``."""
    return _residual(x, y, theta).square().mean()


def ridge_loss(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, log_weight: torch.Tensor) -> torch.Tensor:
    """Training MSE plus ``Σ_j exp(λ_j) θ_j²`` (``log_weight`` broadcast to the features)."""
    return mse(x, y, theta) + (torch.exp(log_weight) * theta.square()).sum()


def _log_weight_init(cfg: HparamConfig, n_features: int, like: torch.Tensor) -> torch.Tensor:
    shape = (n_features,) if cfg.per_feature else (1,)
    return torch.full(shape, cfg.log_weight_init, dtype=like.dtype, device=like.device)


def bilevel_hparam_problem(
    x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, cfg: HparamConfig
) -> MultilevelProblem:
    """Upper: validation MSE over λ; lower: ``train_steps`` of gradient descent on the ridge loss."""
    d = x_train.shape[1]
    return MultilevelProblem(
        [
            Level(
                lambda lam, theta: mse(x_val, y_val, theta),
                _log_weight_init(cfg, d, x_train),
                lr=cfg.upper_lr,
                project=box(*cfg.log_weight_bounds),
                name="hyperparameters",
            ),
            Level(
                lambda lam, theta: ridge_loss(x_train, y_train, theta, lam),
                torch.zeros(d, dtype=x_train.dtype, device=x_train.device),
                steps=cfg.train_steps,
                lr=cfg.train_lr,
                name="model",
            ),
        ]
    )


def trilevel_hparam_problem(
    x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, cfg: HparamConfig
) -> MultilevelProblem:
    """Upper: validation MSE over λ; middle: a bounded adversary on the training features; lower: training."""
    d = x_train.shape[1]

    if cfg.adversary_objective not in ("train", "val"):
        raise ValueError(f"adversary_objective must be 'train' or 'val', got {cfg.adversary_objective!r}")

    def adversary(lam: torch.Tensor, p: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if cfg.adversary_objective == "train":
            gain = _residual(x_train + p, y_train, theta).square().sum()
        else:
            gain = len(y_train) * mse(x_val, y_val, theta)  # scaled like the summed training loss
        return -(gain - cfg.adversary_penalty * p.square().sum())

    return MultilevelProblem(
        [
            Level(
                lambda lam, p, theta: mse(x_val, y_val, theta),
                _log_weight_init(cfg, d, x_train),
                lr=cfg.upper_lr,
                project=box(*cfg.log_weight_bounds),
                name="hyperparameters",
            ),
            Level(
                adversary,
                torch.zeros_like(x_train),
                steps=cfg.adversary_steps,
                lr=cfg.adversary_lr,
                project=box(-cfg.budget, cfg.budget),
                name="adversary",
            ),
            Level(
                lambda lam, p, theta: ridge_loss(x_train + p, y_train, theta, lam),
                torch.zeros(d, dtype=x_train.dtype, device=x_train.device),
                steps=cfg.train_steps,
                lr=cfg.train_lr,
                name="model",
            ),
        ]
    )


def fit_ridge_gd(x: torch.Tensor, y: torch.Tensor, log_weight: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The regressor the lowest level computes: ``steps`` of gradient descent on the ridge loss from zero."""
    theta = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    n = x.shape[0]
    w = torch.exp(log_weight.detach())
    for _ in range(steps):
        grad = -2.0 / n * (x.T @ (y - x @ theta)) + 2.0 * w * theta
        theta = theta - lr * grad
    return theta
