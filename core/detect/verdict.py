"""The verdict: clean / suspicious / backdoored, combined from the detectors' threshold-relative scores."""

from __future__ import annotations

from core.detect.base import DetectorResult

VERDICTS = ("clean", "suspicious", "backdoored")


def combine(results: list[DetectorResult], strong_factor: float, strong_detectors: tuple[str, ...],
            voting_detectors: tuple[str, ...]) -> tuple[str, float, list[int]]:
    """(verdict, combined score, suspected targets) from the ``voting_detectors``: ``backdoored`` when two
    flag or one of ``strong_detectors`` scores >= ``strong_factor``, ``suspicious`` when one flags. The
    combined score is the largest voting threshold-relative score (> 1: at least one flagged)."""
    voting = [r for r in results if r.name in voting_detectors and not r.details.get("informational")]
    if not voting:
        return "clean", 0.0, []
    flagged = [r for r in voting if r.flagged]
    combined = max(r.score for r in voting)
    if len(flagged) >= 2 or any(r.score >= strong_factor and r.name in strong_detectors for r in flagged):
        verdict = "backdoored"
    elif flagged:
        verdict = "suspicious"
    else:
        verdict = "clean"
    targets: list[int] = []
    for r in sorted(flagged, key=lambda r: -r.score):
        targets.extend(t for t in r.suspected_targets if t not in targets)
    return verdict, combined, targets
