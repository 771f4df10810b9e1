"""The multilevel paper's experiment and the method's cost growth; writes ``bench/results/multilevel.md``.

1. Hyperparameter learning on scikit-learn's diabetes data (features and target standardised on the training
   split): per-feature L2 weights learned on validation data by the bilevel model and by the poisoning-aware
   trilevel model (an adversary perturbs the training features within a box budget), with Gaussian noise of
   ``sigma`` feature standard deviations added to the training features, over several random splits; test MSE
   mean ± std per noise level and model. Sato, Tanaka & Takeda (NeurIPS 2021) report the trilevel model as more
   stable on noisy data; this measures whether that holds here.
2. Time per hypergradient for n = 2, 3, 4 levels and several T, against the ``T^(n-1)`` prediction.

Usage: ``nice .venv/bin/python -m bench.multilevel_bench [--splits 5] [--iterations 40] [--quick]``
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_diabetes

from core.multilevel import Level, MultilevelProblem, hypergradient, solve, unroll
from core.multilevel.hparams import (
    HparamConfig,
    bilevel_hparam_problem,
    fit_ridge_gd,
    mse,
    trilevel_hparam_problem,
)

DT = torch.float64
TRILEVEL_MODELS = ("trilevel-train", "trilevel-val")


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    y_scale: float = 1.0  # MSE × y_scale² is in units of the clean training target's variance


def diabetes_split(
    seed: int, noise: float, noise_on: str = "both", fractions: tuple[float, float] = (0.4, 0.3)
) -> Split:
    """A seeded train/val/test split with noise on the training data, standardised as a practitioner would.

    Noise N(0, noise²) is added to the training features ("features") or features and target ("both"), in units
    of the clean training split's standard deviations; validation and test data stay clean. Every split is then
    standardised with the statistics of the training data as received (noisy), so the lowest level's gradient
    descent sees unit-variance features at every noise level (a fixed step size stays stable). ``y_scale`` turns
    MSEs back into units of the clean training target's variance, comparable across noise levels.
    """
    x, y = load_diabetes(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_train, n_val = round(fractions[0] * len(y)), round(fractions[1] * len(y))
    parts = np.split(order, [n_train, n_train + n_val])
    mu, sd = x[parts[0]].mean(0), x[parts[0]].std(0)
    ymu, ysd = y[parts[0]].mean(), y[parts[0]].std()
    xs = [(x[p] - mu) / sd for p in parts]
    ys = [(y[p] - ymu) / ysd for p in parts]
    xs[0] = xs[0] + noise * rng.standard_normal(xs[0].shape)
    if noise_on == "both":
        ys[0] = ys[0] + noise * rng.standard_normal(ys[0].shape)
    elif noise_on != "features":
        raise ValueError(f"noise_on must be 'both' or 'features', got {noise_on!r}")
    mu2, sd2, ymu2, ysd2 = xs[0].mean(0), xs[0].std(0), ys[0].mean(), ys[0].std()
    xt = [torch.tensor((v - mu2) / sd2, dtype=DT) for v in xs]
    yt = [torch.tensor((v - ymu2) / ysd2, dtype=DT) for v in ys]
    return Split(xt[0], yt[0], xt[1], yt[1], xt[2], yt[2], float(ysd2))


def run_hparams(split: Split, cfg: HparamConfig, iterations: int, model: str) -> dict[str, float]:
    """Learn λ with the bilevel or trilevel model; test MSE of the model retrained on the training data."""
    if model == "unregularised":
        lam = torch.full((split.x_train.shape[1],), cfg.log_weight_bounds[0], dtype=DT)
        theta = fit_ridge_gd(split.x_train, split.y_train, lam, cfg.train_steps, cfg.train_lr)
        test = float(mse(split.x_test, split.y_test, theta)) * split.y_scale**2
        return {"test_mse": test, "seconds": 0.0, "val_mse": math.nan}
    if model == "bilevel":
        problem = bilevel_hparam_problem(split.x_train, split.y_train, split.x_val, split.y_val, cfg)
    else:  # "trilevel-train" or "trilevel-val": what the adversary maximises
        cfg = replace(cfg, adversary_objective=model.split("-")[1])
        problem = trilevel_hparam_problem(split.x_train, split.y_train, split.x_val, split.y_val, cfg)
    trajectory = solve(problem, iterations)
    lam = trajectory.best  # chosen by the top objective (validation only), never by test error
    theta = fit_ridge_gd(split.x_train, split.y_train, lam, cfg.train_steps, cfg.train_lr)
    out = {
        "test_mse": float(mse(split.x_test, split.y_test, theta)) * split.y_scale**2,
        "val_mse": float(mse(split.x_val, split.y_val, theta)) * split.y_scale**2,
        "seconds": trajectory.seconds,
        "mean_log_weight": float(lam.mean()),
    }
    if model.startswith("trilevel"):  # the model the trilevel solution itself trains, on the adversary's data
        theta_adv = unroll(problem, lam)[-1].detach()
        out["test_mse_adv_model"] = float(mse(split.x_test, split.y_test, theta_adv)) * split.y_scale**2
    return out


def hparam_table(
    cfg: HparamConfig, noises: list[float], splits: int, iterations: int, noise_on: str
) -> tuple[str, dict]:
    models = ["unregularised", "bilevel", *TRILEVEL_MODELS]
    results: dict = {}
    for noise in noises:
        for model in models:
            runs = [
                run_hparams(diabetes_split(seed, noise, noise_on), cfg, iterations, model) for seed in range(splits)
            ]
            results[(noise, model)] = runs
            mses = [r["test_mse"] for r in runs]
            print(f"noise {noise:.2f} {model:>13}: test MSE {statistics.mean(mses):.4f} ± {statistics.stdev(mses):.4f}"
                  f"  ({sum(r['seconds'] for r in runs):.1f} s)", flush=True)  # fmt: skip
    lines = [
        "| noise σ | model | test MSE mean ± std | min – max | val MSE | mean log-weight | time / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for (noise, model), runs in results.items():
        mses = [r["test_mse"] for r in runs]
        val = [r["val_mse"] for r in runs]
        lw = [r.get("mean_log_weight", cfg.log_weight_bounds[0]) for r in runs]
        secs = statistics.mean(r["seconds"] for r in runs)
        lines.append(
            f"| {noise:.1f} | {model} | {statistics.mean(mses):.4f} ± {statistics.stdev(mses):.4f} | "
            f"{min(mses):.4f} – {max(mses):.4f} | "
            + ("—" if math.isnan(val[0]) else f"{statistics.mean(val):.4f}")
            + f" | {statistics.mean(lw):.2f} | {secs:.2f} s |"
        )
    adv = []
    for noise in noises:
        cells = []
        for model in TRILEVEL_MODELS:
            mses = [r["test_mse_adv_model"] for r in results[(noise, model)]]
            cells.append(f"{statistics.mean(mses):.4g} ± {statistics.stdev(mses):.4g} ({statistics.median(mses):.4f})")
        adv.append(f"| {noise:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines), {"results": results, "adv": adv}


def chain_problem(n: int, steps: int, dim: int = 10, seed: int = 0) -> MultilevelProblem:
    """A smooth n-level problem with ``dim`` variables per level (each level coupled to the one below)."""
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(dim, dim, generator=g, dtype=DT) / math.sqrt(dim) for _ in range(n)]

    def lower(i: int):
        def objective(*xs: torch.Tensor) -> torch.Tensor:
            value = 0.5 * (xs[i] - torch.tanh(mats[i] @ xs[i - 1])).square().sum()
            return value + (0.3 * (xs[i] * xs[i + 1]).sum() if i + 1 < n else 0.0)

        return objective

    levels = [Level(lambda *xs: xs[-1].square().sum(), torch.ones(dim, dtype=DT))]
    levels += [Level(lower(i), torch.zeros(dim, dtype=DT), steps=steps, lr=0.3) for i in range(1, n)]
    return MultilevelProblem(levels)


def time_hypergradient(problem: MultilevelProblem, budget_s: float = 1.0) -> float:
    """Median seconds per hypergradient over repeats filling about ``budget_s`` (at least 3)."""
    x1 = problem.levels[0].init
    hypergradient(problem, x1)  # warm-up
    times: list[float] = []
    while len(times) < 3 or (sum(times) < budget_s and len(times) < 50):
        start = time.perf_counter()
        hypergradient(problem, x1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost_table(ts: dict[int, list[int]]) -> str:
    lines = [
        "| n | T | innermost steps (exact) | T^(n-1) | time / hypergradient | time ÷ time at smallest T "
        "| predicted ratio (T/T0)^(n-1) |",
        "|---|---|---|---|---|---|---|",
    ]
    slopes = []
    for n, t_values in ts.items():
        base = None
        points = []
        for t in t_values:
            problem = chain_problem(n, t)
            seconds = time_hypergradient(problem)
            base = base or (t, seconds)
            points.append((math.log(t), math.log(seconds)))
            lines.append(
                f"| {n} | {t} | {problem.innermost_steps()} | {t ** (n - 1)} | {seconds * 1e3:.2f} ms | "
                f"{seconds / base[1]:.1f} | {(t / base[0]) ** (n - 1):.0f} |"
            )
            print(lines[-1], flush=True)
        xs, ys = zip(*points, strict=True)
        slope = float(np.polyfit(xs, ys, 1)[0])
        slopes.append(f"n = {n}: fitted exponent {slope:.2f} (prediction {n - 1})")
    return "\n".join(lines) + "\n\nLog-log slope of time against T: " + "; ".join(slopes) + "."


def hparam_section(cfg: HparamConfig, noises: list[float], splits: int, iterations: int, noise_on: str) -> str:
    """The markdown section for one way of adding noise: setup, per-model table, paired comparison."""
    start = time.perf_counter()
    table, extra = hparam_table(cfg, noises, splits, iterations, noise_on)
    seconds = time.perf_counter() - start
    results = extra["results"]
    paired = [
        "| noise σ | model | test MSE minus bilevel's (paired, mean ± std) | lower than bilevel on "
        "| std bilevel | std this model |",
        "|---|---|---|---|---|---|",
    ]
    for noise in noises:
        bi = [r["test_mse"] for r in results[(noise, "bilevel")]]
        for model in TRILEVEL_MODELS:
            tri = [r["test_mse"] for r in results[(noise, model)]]
            diff = [t - b for t, b in zip(tri, bi, strict=True)]
            paired.append(
                f"| {noise:.1f} | {model} | {statistics.mean(diff):+.4f} ± {statistics.stdev(diff):.4f} | "
                f"{sum(d < 0 for d in diff)}/{len(diff)} splits | "
                f"{statistics.stdev(bi):.4f} | {statistics.stdev(tri):.4f} |"
            )
    lo, hi = cfg.log_weight_bounds
    noised = "features and target" if noise_on == "both" else "features only"
    cfg_text = ", ".join(f"{k}={v}" for k, v in asdict(cfg).items())
    adv = "\n".join(extra["adv"])
    return f"""## Bilevel vs trilevel hyperparameter learning — diabetes (442 × 10), noise on {noised}, {splits} splits

Split 40% train / 30% validation / 30% test; Gaussian noise N(0, σ²) added to the training {noised}
(σ in clean training standard deviations; validation and test stay clean); then every split standardised with
the statistics of the training data as received. MSEs are in units of the clean training target's variance,
comparable across σ. L2 weights `exp(λ_j)`, one per feature,
λ in [{lo}, {hi}], start {cfg.log_weight_init}.
Lowest level: T = {cfg.train_steps} steps of gradient descent (step {cfg.train_lr}) on the ridge loss from zero.
Trilevel middle level: an adversary perturbs the training features, `|P_ij| <= {cfg.budget}`,
T = {cfg.adversary_steps} steps of projected gradient ascent (step {cfg.adversary_lr}) on the summed squared
training residual (trilevel-train) or on the validation MSE of the model trained on its data (trilevel-val).
Upper level: validation MSE, {iterations} iterations of projected gradient descent
(step {cfg.upper_lr}); λ is the iterate with the lowest upper objective (validation only). Test MSE is that of
the regressor trained on the (noisy) training data with the learned λ. "unregularised": the same T-step
descent with λ at its lower bound. The same splits and noise draws serve every model.
Config: {cfg_text}. Time for this section: {seconds:.0f} s.

{table}

Paired over the same splits:

{chr(10).join(paired)}

The trilevel solutions' own regressors (trained on the adversary's perturbed features), test MSE mean ± std
(median):

| noise σ | trilevel-train | trilevel-val |
|---|---|---|
{adv}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--noise", type=str, default="0,0.5,1.0,2.0")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--train-steps", type=int, default=HparamConfig.train_steps)
    parser.add_argument("--adversary-steps", type=int, default=HparamConfig.adversary_steps)
    parser.add_argument("--budget", type=float, default=HparamConfig.budget)
    parser.add_argument("--noise-on", type=str, default="both", help="comma list of: both, features")
    parser.add_argument("--quick", action="store_true", help="2 splits, 10 iterations, small T: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/multilevel.md"))
    parser.add_argument("--append", action="store_true", help="append the tables to --out, skip the cost table")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and the machine is shared)
    if args.quick:
        args.splits, args.iterations = 2, 10
    cfg = HparamConfig(train_steps=args.train_steps, adversary_steps=args.adversary_steps, budget=args.budget)
    noises = [float(v) for v in args.noise.split(",")]
    sections = [hparam_section(cfg, noises, args.splits, args.iterations, on) for on in args.noise_on.split(",")]
    command = "nice .venv/bin/python -m bench.multilevel_bench " + " ".join(sys.argv[1:])
    if args.append:  # a further run (e.g. another budget) added to an existing report, without the cost table
        with args.out.open("a") as f:
            f.write(f"\n## Further run: `{command.strip()}`\n\n" + "\n".join(sections))
        print(f"appended to {args.out}")
        return
    ts = {2: [2, 4, 8], 3: [2, 4, 8], 4: [2, 4]} if args.quick else {2: [4, 8, 16, 32], 3: [4, 8, 16], 4: [2, 4, 8]}
    start = time.perf_counter()
    costs = cost_table(ts)
    cost_seconds = time.perf_counter() - start
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    report = f"""# Multilevel optimisation (issue 4)

Machine: {model_name}, 2 CPU cores shared with other jobs, `torch.set_num_threads(1)`, float64,
torch {torch.__version__}, Python {platform.python_version()}. Command: `{command.strip()}`.

{chr(10).join(sections)}
## Cost growth: time per hypergradient against T^(n-1)

A smooth chain problem, 10 variables per level, all lower levels with the same T; median of repeated reverse-mode
hypergradients. Exact innermost step count is `T · (T+1)^(n-2)` (each level re-solves the levels below once more at
its final iterate). Time for this table: {cost_seconds:.0f} s.

{costs}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
