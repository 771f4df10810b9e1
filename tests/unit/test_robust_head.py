"""robust_hparams: the trilevel head refit (core/defenses/robust_head.py) and its wiring into repair()."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.defenses.registry import repair, validate_params
from core.defenses.robust_head import RobustHeadConfig, _head_loss, head_problem, robust_head_refit
from core.metrics import predict
from core.multilevel import hypergradient, unroll, unrolled_objective
from core.training import train_classifier
from tests.unit.test_tsbd import NORM, digits, tiny_cnn

DT = torch.float64


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, object, object]:
    train, test = digits()
    model = train_classifier(tiny_cnn(seed=1), train, NORM, epochs=6, lr=0.05, batch_size=64, device="cpu",
                             augment=False)
    return model, train, test


def _logits(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    from core.data.transforms import to_model_input

    with torch.no_grad():
        return model.eval()(to_model_input(torch.as_tensor(x), NORM, "cpu", False))


def test_standardised_head_maps_back_to_the_same_function(trained) -> None:
    """With one vanishing step the refitted head must compute what the original head computed: the
    standardisation W' = W diag(std), b' = b + W mean and its inverse are exact."""
    model, _, test = trained
    cfg = RobustHeadConfig(iterations=0, train_steps=1, train_step=1e-12)
    out, account = robust_head_refit(model, test.subset(np.arange(120)), NORM, cfg, "cpu")
    torch.testing.assert_close(_logits(out, test.x[:50]), _logits(model, test.x[:50]), atol=1e-4, rtol=1e-4)
    assert out is not model and account["fit_images"] + account["heldout_images"] == 120


def test_head_problem_hypergradient_matches_finite_differences() -> None:
    g = torch.Generator().manual_seed(0)
    phi, y = torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)
    phi_val, y_val = torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
    w0 = 0.1 * torch.randn(3, 5, generator=g, dtype=DT)
    lam = torch.tensor([-1.0, -2.0], dtype=DT)
    for model in ("bilevel", "trilevel"):
        cfg = RobustHeadConfig(robust_model=model, train_steps=4, adversary_steps=2, budget=0.3)
        problem = head_problem(phi, y, phi_val, y_val, w0, cfg, lr=0.3)
        fd = torch.stack([(unrolled_objective(problem, lam + e) - unrolled_objective(problem, lam - e)) / 2e-6
                          for e in torch.eye(2, dtype=DT) * 1e-6]).detach()
        torch.testing.assert_close(hypergradient(problem, lam), fd, atol=1e-6, rtol=1e-4)
    # the adversary stays in its box and makes the head's fitting loss worse
    _, p, w_adv = (v.detach() for v in unroll(problem, lam))
    assert 0 < float(p.abs().max()) <= cfg.budget + 1e-12
    assert float(_head_loss(w_adv, phi + p, y)) > float(_head_loss(w_adv, phi, y))


def test_stronger_proximal_weight_moves_the_head_less(trained) -> None:
    model, _, test = trained
    clean = test.subset(np.arange(120))
    moved = {}
    for log_weight in (-10.0, -2.0, 0.0):
        cfg = RobustHeadConfig(iterations=0, log_weight_init=(log_weight, -10.0))
        out, account = robust_head_refit(model, clean, NORM, cfg, "cpu")
        assert account["proximal_weight"] == pytest.approx(np.exp(log_weight), rel=1e-5)
        moved[log_weight] = float((out[-1].weight - model[-1].weight).detach().norm())
    assert moved[-10.0] > moved[-2.0] > moved[0.0]


def test_repair_with_robust_hparams_records_the_learned_values(trained) -> None:
    model, _, test = trained
    clean = test.subset(np.arange(150))
    params = {"epochs": 1, "augment": False, "batch_size": 32, "robust_hparams": True}
    res = repair("finetune", model, clean, NORM, params, "cpu", 10)
    acc = (predict(res.model, test.x[150:], NORM) == test.y[150:]).mean()
    assert acc > 0.8
    account = res.details["robust_hparams"]
    assert account["model"] == "trilevel" and len(account["trajectory"]) == RobustHeadConfig().iterations + 1
    assert res.chosen["head_proximal_weight"] == account["proximal_weight"] > 0
    assert res.params["robust_hparams"] is True and "robust_hparams" in res.timings
    bounds = RobustHeadConfig().log_weight_bounds
    assert all(bounds[0] <= v <= bounds[1] for v in account["log_weights"])
    plain = repair("finetune", model, clean, NORM, {**params, "robust_hparams": False}, "cpu", 10)
    assert "robust_hparams" not in plain.details and plain.params["robust_hparams"] is False


def test_bad_robust_parameters_are_refused_before_any_work(trained) -> None:
    model, _, test = trained
    with pytest.raises(ValueError, match="robust_hparams"):
        validate_params("tsbd", {"robust_hparams": "yes"})
    with pytest.raises(ValueError, match="robust_model"):
        repair("finetune", model, test.subset(np.arange(50)), NORM, {"robust_model": "quadlevel"}, "cpu", 10)
    no_head = nn.Sequential(nn.Conv2d(1, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="nn.Linear head"):
        repair("finetune", no_head, test.subset(np.arange(50)), NORM, {"robust_hparams": True}, "cpu", 10)
    assert dataclasses.fields(RobustHeadConfig)  # the config is a plain dataclass the report can dump
