"""The statistics the detectors flag with: the MAD anomaly index and MM-BD's Gamma null p-value."""

from __future__ import annotations

import functools
import math

import torch

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal's standard deviation (NC)


def anomaly_index(values: list[float] | torch.Tensor) -> list[float]:
    """Per value ``|v - median| / (1.4826 * MAD)`` (Neural Cleanse); 0 for every value when MAD is 0."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        return []
    med = v.median()
    mad = (v - med).abs().median() * MAD_CONSISTENCY
    if float(mad) == 0.0:
        return [0.0] * v.numel()
    return ((v - med).abs() / mad).tolist()


def small_side_anomalies(values: list[float], threshold: float) -> tuple[list[float], list[int]]:
    """The anomaly index signed towards the small side (0 for values above the median) and the indices
    whose small-side index exceeds ``threshold`` — only abnormally small masks point to a backdoor."""
    idx = anomaly_index(values)
    med = float(torch.as_tensor(values, dtype=torch.float64).median()) if values else 0.0
    small = [a if v < med else 0.0 for a, v in zip(idx, values, strict=True)]
    return small, [k for k, a in enumerate(small) if a > threshold]


def gamma_max_p_value(stat: float, null: list[float]) -> float:
    """P(max of ``len(null)`` Gamma draws >= ``stat``) with the Gamma fitted to ``null`` by moments (MM-BD:
    the largest class statistic against a null learned from the others, an order-statistic test that
    already corrects for the number of classes)."""
    x = torch.as_tensor(null, dtype=torch.float64).clamp_min(1e-12)
    if x.numel() < 2:
        return 1.0
    mean, var = float(x.mean()), float(x.var(unbiased=True))
    if var <= 0:
        return 0.0 if stat > mean else 1.0
    shape, scale = mean * mean / var, var / mean
    if stat <= 0:
        return 1.0
    cdf = float(torch.special.gammainc(torch.tensor(shape, dtype=torch.float64),
                                       torch.tensor(stat / scale, dtype=torch.float64)))
    # 1 - cdf^n without cancellation for cdf close to 1
    return float(-math.expm1(len(null) * math.log(cdf))) if cdf > 0 else 1.0


NULL_DRAWS = 20_000  # Monte-Carlo draws of the outlier statistic's null: p-values resolve down to 5e-5 (fewer
# for many classes, at least 2,000: 1,000 classes take a second)


def small_outlier_scores(values: list[float] | torch.Tensor) -> list[float]:
    """Per class ``(mean(O) - v_k) / std(O)``: how far below the other classes ``O`` it lies in their own
    standard deviations, where ``O`` leaves out ``v_k`` and, from ``K >= 6`` classes on, the largest other
    value (a naturally hard class — MNIST's thin 1 — would otherwise inflate the spread and hide a target;
    large values carry no backdoor evidence). Works on a ``... x K`` tensor too (the null draws)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    return _outlier_scores(v).tolist()


def _outlier_scores(v: torch.Tensor) -> torch.Tensor:
    k = v.shape[-1]
    trim = 1 if k >= 6 else 0
    m = k - 1 - trim
    if m < 2:
        return torch.zeros_like(v)
    total, squares = v.sum(-1, keepdim=True), (v * v).sum(-1, keepdim=True)
    top2 = v.topk(2, dim=-1).values
    # the largest of the others: the second largest where v_k is itself the largest
    removed = torch.where(v >= top2[..., :1], top2[..., 1:2], top2[..., :1]) if trim else torch.zeros_like(v)
    s = total - v - removed
    q = squares - v * v - removed * removed
    mean = s / m
    var = ((q - m * mean * mean) / (m - 1)).clamp_min(0.0)
    std = var.sqrt()
    return torch.where(std > 0, (mean - v) / std.clamp_min(1e-300), torch.zeros_like(v))


@functools.cache
def _null_maxima(k: int) -> torch.Tensor:
    """Sorted maxima of the outlier score over ``k`` i.i.d. standard normal classes (seeded: reproducible).
    The score is location- and scale-free, so one standard normal null serves every model."""
    gen = torch.Generator().manual_seed(20_190_519 + k)
    draws = torch.randn(max(2_000, min(NULL_DRAWS, 2_000_000 // k)), k, generator=gen, dtype=torch.float64)
    return _outlier_scores(draws).max(-1).values.sort().values


def outlier_p_value(values: list[float]) -> tuple[float, list[float], float]:
    """(p-value, per-class scores, the score a class needs for significance at 5%): the probability that the
    largest :func:`small_outlier_scores` of ``K`` classes drawn i.i.d. from one normal is at least the observed
    largest — the detector's own null, built by simulation for this ``K``, so it accounts for the number of
    classes and for estimating the spread from ``K - 2`` values. The values are log trigger sizes: one class
    standing out below the rest is the backdoor's signature."""
    k = len(values)
    scores = small_outlier_scores(values)
    if k < 4:  # too few classes to estimate a spread: no evidence either way
        return 1.0, scores, math.inf
    null = _null_maxima(k)
    critical = float(null[int(0.95 * len(null))])
    return null_p_value(max(scores), k), scores, critical


def null_p_value(score: float, k: int) -> float:
    """P(the largest outlier score of ``k`` i.i.d. normal classes >= ``score``), from the simulated null
    (``(1 + exceedances) / (1 + draws)``); 1 below 4 classes, where no spread can be estimated."""
    if k < 4:
        return 1.0
    null = _null_maxima(k)
    exceed = int(len(null) - torch.searchsorted(null, torch.tensor(score, dtype=torch.float64), right=False))
    return (1 + exceed) / (1 + len(null))


CAUCHY_P_CAP = 0.99  # p-values above this enter the Cauchy combination as this: a detector's p = 1 ("no
# evidence at all") would otherwise be tan(-pi/2) = -inf and veto every other detector; simulated (docs/detect.md)
# the cap moves the combination's level by less than 0.0002 at 0.05


def cauchy_combination(p_values: list[float], cap: float = CAUCHY_P_CAP) -> float:
    """The Cauchy combination test (ACAT, Liu & Xie 2020): ``T = mean_i tan((1/2 - p_i) pi)`` and the combined
    p-value ``1/2 - arctan(T) / pi``. Each ``tan((1/2 - p) pi)`` of a uniform ``p`` is standard Cauchy, and a
    mean of standard Cauchy variables is standard Cauchy again under independence and, in the tail (small
    combined p), under arbitrary dependence of normally distributed test statistics — so, unlike Fisher's
    method, correlated detectors do not inflate it, and unlike Bonferroni (``m x min p``) it does not pay
    ``m`` for every detector that agrees. p-values are capped at ``cap`` (see :data:`CAUCHY_P_CAP`) and
    floored at 1e-300; for large ``T`` the tail ``1 / (pi T)`` is used (no cancellation)."""
    if not p_values:
        return 1.0
    ps = [min(max(float(p), 1e-300), cap) for p in p_values]
    # tan((1/2 - p) pi) = 1 / tan(p pi): exact for tiny p, where (1/2 - p) rounds to 1/2
    t = sum(1.0 / math.tan(p * math.pi) for p in ps) / len(ps)
    if t > 1e6:  # 1/2 - arctan(t)/pi = arctan(1/t)/pi ~ 1/(pi t)
        return math.atan(1.0 / t) / math.pi
    return min(1.0, max(0.0, 0.5 - math.atan(t) / math.pi))


def bonferroni(p_values: list[float]) -> float:
    """``min(1, m x min p)`` over ``m`` p-values: valid whatever their dependence, and pays ``m`` always."""
    return min(1.0, len(p_values) * min(p_values)) if p_values else 1.0
