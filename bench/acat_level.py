"""The verdict's combination tests under the null: how often the Cauchy combination (with its 0.99 cap) and
Bonferroni fall below 0.05 and 0.01 when the m detectors' p-values come from correlated normal statistics.

    python bench/acat_level.py > bench/results/acat_level.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.detect.stats import CAUCHY_P_CAP  # noqa: E402

DRAWS = 400_000


def cauchy(p: np.ndarray, cap: float) -> np.ndarray:
    """core.detect.stats.cauchy_combination, vectorised over rows."""
    p = np.clip(p, 1e-300, cap)
    t = (1.0 / np.tan(p * np.pi)).mean(1)
    return 0.5 - np.arctan(t) / np.pi


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"# Null level of the verdict's combinations ({DRAWS:,} draws per row, seed 0)\n")
    print("| m | rho | ACAT < 0.05 | ACAT < 0.01 | ACAT uncapped < 0.05 | Bonferroni < 0.05 | Bonferroni < 0.01 |")
    print("|---|---|---|---|---|---|---|")
    for m in (2, 3):
        for rho in (0.0, 0.3, 0.6, 0.9):
            c = np.full((m, m), rho) + np.eye(m) * (1 - rho)
            p = norm.sf(rng.standard_normal((DRAWS, m)) @ np.linalg.cholesky(c).T)
            a, raw, b = cauchy(p, CAUCHY_P_CAP), cauchy(p, 1 - 1e-12), np.minimum(1, m * p.min(1))
            print(f"| {m} | {rho} | {np.mean(a < 0.05):.4f} | {np.mean(a < 0.01):.4f} | {np.mean(raw < 0.05):.4f} | "
                  f"{np.mean(b < 0.05):.4f} | {np.mean(b < 0.01):.4f} |")


if __name__ == "__main__":
    main()
