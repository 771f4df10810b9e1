"""The verdict: clean / suspicious / backdoored, from the voting detectors' p-values combined by Bonferroni."""

from __future__ import annotations

import math

from core.detect.base import DetectorResult

VERDICTS = ("clean", "suspicious", "backdoored")


def combined_p_value(results: list[DetectorResult]) -> float:
    """``min(1, m x min p)`` over ``m`` detectors: valid whatever their dependence (two inversions of one
    model are correlated through the model's naturally easy classes, so independence is not assumed)."""
    return min(1.0, len(results) * min(r.statistic for r in results)) if results else 1.0


def combine(results: list[DetectorResult], p_value: float, strong_p_value: float,
            voting_detectors: tuple[str, ...]) -> tuple[str, float, float, list[int]]:
    """(verdict, score, combined p-value, suspected targets) from the ``voting_detectors`` (each reporting a
    p-value as its statistic): ``backdoored`` when the combined p is below ``strong_p_value``,
    ``suspicious`` below ``p_value``, else ``clean``. The score is ``log p / log p_value`` (1 at the level).
    The targets are those of the detectors that pass the level after the correction, strongest first."""
    voting = [r for r in results if r.name in voting_detectors and not r.details.get("informational")]
    if not voting:
        return "clean", 0.0, 1.0, []
    p = combined_p_value(voting)
    verdict = "backdoored" if p < strong_p_value else "suspicious" if p < p_value else "clean"
    score = math.log(max(p, 1e-300)) / math.log(p_value)
    targets: list[int] = []
    if verdict != "clean":
        for r in sorted(voting, key=lambda r: r.statistic):
            if len(voting) * r.statistic < p_value:
                targets.extend(t for t in r.suspected_targets if t not in targets)
    return verdict, score, p, targets
