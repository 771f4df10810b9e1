"""The statistics the detectors flag with: the MAD anomaly index and MM-BD's Gamma null p-value."""

from __future__ import annotations

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
