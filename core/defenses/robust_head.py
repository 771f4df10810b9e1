"""``repair.params.robust_hparams``: refit the classifier head with regularisation chosen by the trilevel model.

Issue 4 / docs/methods.md (Sato, Tanaka & Takeda, NeurIPS 2021): the clean subset a team uploads may not be
clean, so the regularisation of the last repair step is chosen for the worst case. After a repair method has
run, the repaired model's penultimate features ``phi`` of the clean subset are split into a fitting part and a
held-out part, and the head ``W`` (the last ``nn.Linear``, weights and bias) is refitted by a three-level problem
solved with :mod:`core.multilevel`:

* upper: ``lambda = (log a, log b)`` minimising the held-out cross-entropy of the refitted head;
* middle: an adversary perturbing the fitting features by ``P`` (``|P_ij| <= budget * std_j``) to maximise the
  fitting loss of the head trained on them (the paper's poisoning adversary);
* lower: ``train_steps`` of gradient descent from the repaired head ``W0`` on
  ``CE(W; phi + P) + a ||W - W0||^2 + b ||W||^2``.

Features are whitened first (PCA on the clean subset), so one step size, one budget and one range of ``a, b``
fit every architecture; the head is mapped into and out of that basis exactly.

With ``robust_model="bilevel"`` the middle level is left out (the usual hyperparameter learning), for
comparison. The learned ``a``, ``b``, the held-out losses and the trajectory are returned for the report; the
head is then refitted on all clean features (unperturbed) with them and written into a copy of the model.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.runtime import DeviceImages, forward_all, make_generator, prepare_model, runtime_for
from core.multilevel import Level, MultilevelProblem, box, solve

# fields of RobustHeadConfig that are not repair parameters (only robust_model is; robust_hparams turns it on)
ROBUST_HEAD_INTERNALS = ("holdout_fraction", "train_steps", "train_step", "adversary_steps", "adversary_lr",
                         "budget", "iterations", "upper_lr", "log_weight_init", "log_weight_bounds")


@dataclass(frozen=True)
class RobustHeadConfig:
    """Sizes and steps of the head problem (chosen here, no source: features are standardised first)."""

    robust_model: Literal["trilevel", "bilevel"] = "trilevel"  # with the adversary, or without
    holdout_fraction: float = 0.2  # share of the clean subset the upper level scores on
    train_steps: int = 20  # T of the head's gradient descent (lowest level)
    train_step: float = 1.0  # the head's step is train_step / L, L a bound on the lower objective's curvature
    # (about 10 on whitened features: 20 steps of 0.1)
    adversary_steps: int = 3  # T of the adversary (middle level)
    adversary_lr: float = 5.0  # large enough to reach the box within its few steps
    budget: float = 0.5  # |P_ij| <= budget, in whitened feature units (standard deviations)
    iterations: int = 15  # projected gradient steps on lambda
    upper_lr: float = 0.5  # distance moved in (log a, log b) per iteration (normalised hypergradient steps)
    log_weight_init: tuple[float, float] = (-4.0, -4.0)  # (log a, log b): a = b = exp(-4) ~ 0.018 to start
    log_weight_bounds: tuple[float, float] = (-10.0, 0.0)  # a, b <= 1, so L <= 0.5 + 4 on whitened features

    def __post_init__(self) -> None:
        if self.robust_model not in ("trilevel", "bilevel"):
            raise ValueError("robust_model must be 'trilevel' or 'bilevel'")
        if not 0.05 <= self.holdout_fraction <= 0.5:
            raise ValueError("holdout_fraction must lie in [0.05, 0.5]")
        if min(self.train_steps, self.adversary_steps) < 1 or self.iterations < 0:
            raise ValueError("train_steps and adversary_steps must be >= 1, iterations >= 0")
        if not 0 < self.train_step <= 1.9 or min(self.adversary_lr, self.upper_lr) <= 0 or self.budget < 0:
            raise ValueError("train_step must lie in (0, 1.9], step sizes > 0 and budget >= 0")
        low, high = self.log_weight_bounds
        if len(self.log_weight_init) != 2 or not all(low <= v <= high for v in self.log_weight_init):
            raise ValueError("log_weight_init must be two values within log_weight_bounds")


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's classifier head: its last ``nn.Linear`` module (by registration order)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("robust_hparams needs a model whose last layer is an nn.Linear head; this one has none")
    return found[-1]


def penultimate_features(model: nn.Module, data: DeviceImages, head: nn.Linear,
                         batch_size: int = 1024) -> torch.Tensor:
    """The inputs of ``head`` for every image of ``data`` (eval mode, float32)."""
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach().float()))
    try:
        forward_all(model, data, batch_size)
    finally:
        handle.remove()
    return torch.cat([c.flatten(1) for c in captured]).clone()


def _head_loss(w: torch.Tensor, phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head ``w`` on features ``phi``: ``[W | b]`` (K x (d+1)) or ``W`` (K x d)."""
    d = phi.shape[1]
    logits = phi @ w[:, :d].T
    return F.cross_entropy(logits + w[:, d] if w.shape[1] > d else logits, y)


def _regularised(w: torch.Tensor, w0: torch.Tensor, log_ab: torch.Tensor, d: int) -> torch.Tensor:
    a, b = torch.exp(log_ab[0]), torch.exp(log_ab[1])
    return a * (w - w0).square().sum() + b * w[:, :d].square().sum()


def curvature_bound(phi: torch.Tensor, bias: bool, max_weight: float) -> float:
    """An upper bound on the Hessian of ``CE(W; phi) + a||W - W0||^2 + b||W||^2`` for ``a, b <= max_weight``:
    cross-entropy's is at most ``0.5 * lambda_max(X^T X / n)`` (X = phi with a ones column for the bias), the
    penalty's ``2 (a + b)``. Gradient descent with step ``< 2 / L`` then converges whatever lambda is."""
    x = torch.cat([phi, torch.ones_like(phi[:, :1])], dim=1) if bias else phi
    top = float(torch.linalg.eigvalsh((x.T @ x / len(x)).double())[-1])
    return 0.5 * top + 4.0 * max_weight


def head_problem(phi_fit: torch.Tensor, y_fit: torch.Tensor, phi_val: torch.Tensor, y_val: torch.Tensor,
                 w0: torch.Tensor, cfg: RobustHeadConfig, lr: float) -> MultilevelProblem:
    """The bilevel or trilevel problem of this module's docstring over standardised features; ``lr`` is the
    head's step (``cfg.train_step / curvature_bound(...)``)."""
    d = phi_fit.shape[1]
    log_ab = torch.tensor(cfg.log_weight_init, dtype=phi_fit.dtype, device=phi_fit.device)
    upper = Level(lambda lam, *rest: _head_loss(rest[-1], phi_val, y_val), log_ab, lr=cfg.upper_lr,
                  project=box(*cfg.log_weight_bounds), name="regularisation")
    lower_init = w0.detach().clone()
    if cfg.robust_model == "bilevel":
        lower = Level(lambda lam, w: _head_loss(w, phi_fit, y_fit) + _regularised(w, w0, lam, d), lower_init,
                      steps=cfg.train_steps, lr=lr, name="head")
        return MultilevelProblem([upper, lower])
    n = phi_fit.shape[0]
    # the adversary maximises the summed fitting loss (each row of P then sees an O(1) gradient)
    adversary = Level(lambda lam, p, w: -n * _head_loss(w, phi_fit + p, y_fit), torch.zeros_like(phi_fit),
                      steps=cfg.adversary_steps, lr=cfg.adversary_lr, project=box(-cfg.budget, cfg.budget),
                      name="adversary")
    lower = Level(lambda lam, p, w: _head_loss(w, phi_fit + p, y_fit) + _regularised(w, w0, lam, d),
                  lower_init,
                  steps=cfg.train_steps, lr=lr, name="head")
    return MultilevelProblem([upper, adversary, lower])


def robust_head_refit(model: nn.Module, clean: ImageSet, norm: Normalization, cfg: RobustHeadConfig,
                      device: torch.device | str, seed: int = 0) -> tuple[nn.Module, dict[str, object]]:
    """A copy of ``model`` whose head is refitted with the learned regularisation, and the report's account."""
    started = time.perf_counter()
    rt = runtime_for(device)
    out = prepare_model(copy.deepcopy(model), rt).eval()
    name, head = last_linear(out)
    data = DeviceImages(clean, norm, rt)
    phi = penultimate_features(out, data, head)
    if phi.shape[1] != head.in_features:
        raise ValueError(f"the head {name!r} takes {head.in_features} features, the model feeds it {phi.shape[1]}")
    has_bias = head.bias is not None
    # whitened features, so that one step size and one budget fit every model (and the head's curvature is
    # known); without a bias the head cannot absorb a shift, so the features are not centred
    phi64 = phi.double()
    mean = phi64.mean(0) if has_bias else torch.zeros_like(phi64[0])
    centred = phi64 - mean
    eig, vecs = torch.linalg.eigh(centred.T @ centred / len(centred))
    eig = eig.clamp_min(max(1e-6 * float(eig.max()), 1e-12))
    whiten = vecs / eig.sqrt()  # z = (phi - mean) @ whiten
    z = (centred @ whiten).float()
    y = data.y
    d = z.shape[1]
    # the same head on whitened features: W' = W V diag(sqrt(eig)), b' = b + W mean
    w_raw = head.weight.detach().double()
    w0 = w_raw @ vecs * eig.sqrt()
    if has_bias:
        w0 = torch.cat([w0, (head.bias.detach().double() + w_raw @ mean)[:, None]], dim=1)
    w0 = w0.float()
    perm = torch.randperm(len(y), generator=make_generator(seed)).to(rt.device)
    n_val = max(1, math.ceil(cfg.holdout_fraction * len(y)))
    val, fit = perm[:n_val], perm[n_val:]
    if len(fit) < 2:
        raise ValueError("robust_hparams needs at least 3 clean images")
    # the adversary can raise feature magnitudes by its budget, hence the (1 + budget)^2
    lr = cfg.train_step / (curvature_bound(z, has_bias, math.exp(cfg.log_weight_bounds[1]))
                           * (1 + cfg.budget) ** 2)
    problem = head_problem(z[fit], y[fit], z[val], y[val], w0, cfg, lr)
    with torch.autocast(device_type=rt.device.type, enabled=False):
        trajectory = solve(problem, cfg.iterations, normalized=True)
        log_ab = trajectory.best.detach()
        val_before = float(_head_loss(w0, z[val], y[val]))
        # refit on every clean image with the learned values (unperturbed features)
        w = w0.clone().requires_grad_(True)
        for _ in range(cfg.train_steps):
            loss = _head_loss(w, z, y) + _regularised(w, w0, log_ab, d)
            (grad,) = torch.autograd.grad(loss, w)
            w = (w - lr * grad).detach().requires_grad_(True)
        w = w.detach()
    new_w = w[:, :d].double() @ whiten.T  # back to raw features: W = W' whiten^T, b = b' - W mean
    with torch.no_grad():
        head.weight.copy_(new_w.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.copy_((w[:, d].double() - new_w @ mean).to(head.bias.dtype))
    a, b = (float(v) for v in torch.exp(log_ab))
    account = {
        "model": cfg.robust_model, "head": name, "proximal_weight": a, "l2_weight": b,
        "log_weights": [float(v) for v in log_ab], "heldout_images": len(val), "fit_images": len(fit),
        "head_step": lr, "head_change": float((w - w0).norm() / w0.norm().clamp_min(1e-12)),
        "heldout_loss_repaired_head": val_before, "heldout_loss_unrolled": min(trajectory.values),
        "trajectory": trajectory.values, "seconds": time.perf_counter() - started,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    return out.eval(), account
