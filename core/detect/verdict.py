"""The verdict: clean / suspicious / backdoored, from the voting detectors' p-values combined by the Cauchy
combination test (or Bonferroni), plus one rule that is not a p-value: the untargeted trigger without a dominant
label (an all-to-all backdoor's signature) makes a model at least ``suspicious``."""

from __future__ import annotations

import math

from core.detect.base import DetectorResult
from core.detect.config import Combination
from core.detect.stats import bonferroni, cauchy_combination

VERDICTS = ("clean", "suspicious", "backdoored")


def combined_p_value(results: list[DetectorResult], combination: Combination = "cauchy") -> float:
    """The voting detectors' p-values (their ``statistic``) merged: ``cauchy`` (ACAT: valid in the tail under
    arbitrary dependence, and two agreeing detectors strengthen each other) or ``bonferroni`` (``m x min p``:
    valid whatever the dependence, at the cost of ``m``). Two inversions of one model are correlated through
    the model's naturally easy classes, so a test that assumes independence (Fisher's) would not hold its
    level."""
    ps = [r.statistic for r in results]
    if not ps:
        return 1.0
    return cauchy_combination(ps) if combination == "cauchy" else bonferroni(ps)


def _no_dominant_label(results: list[DetectorResult]) -> DetectorResult | None:
    """The untargeted detector's result when it reports an untargeted trigger without a dominant label."""
    return next((r for r in results if r.name == "untargeted" and r.details.get("no_dominant_label")), None)


def combine(results: list[DetectorResult], p_value: float, strong_p_value: float,
            voting_detectors: tuple[str, ...], combination: Combination = "cauchy"
            ) -> tuple[str, float, float, list[int], list[str]]:
    """(verdict, score, combined p-value, suspected targets, reasons) from the ``voting_detectors`` (each
    reporting a p-value as its statistic): ``backdoored`` when the combined p is below ``strong_p_value``,
    ``suspicious`` below ``p_value``, else ``clean`` — and at least ``suspicious`` when the untargeted trigger
    has no dominant label (``details["no_dominant_label"]``, core/detect/untargeted.py; not a p-value, so it
    never reaches ``backdoored`` alone). The score is ``log p / log p_value`` (1 at the level; at least 1 when
    the rule alone makes the model suspicious). The targets are those of the voting detectors that pass the
    level on their own, strongest first (under Bonferroni: after its correction), else the smallest class of
    the strongest voting detector; then the labels the untargeted trigger serves when its rule fired."""
    # a detector that could not run (the feature inversion on a model without a 4-D feature map) has no vote:
    # its p = 1 would only dilute the others'
    voting = [r for r in results if r.name in voting_detectors and not r.details.get("informational")
              and not r.details.get("skipped")]
    p = combined_p_value(voting, combination)
    verdict = "backdoored" if p < strong_p_value else "suspicious" if p < p_value else "clean"
    score = math.log(max(p, 1e-300)) / math.log(p_value)
    reasons: list[str] = []
    targets: list[int] = []
    if verdict != "clean":
        reasons.append(f"combined p {p:.3g} < {strong_p_value if verdict == 'backdoored' else p_value} "
                       f"({combination} over {[r.name for r in voting]})")
        factor = len(voting) if combination == "bonferroni" else 1
        ranked = sorted(voting, key=lambda r: r.statistic)
        for r in ranked:
            if factor * r.statistic < p_value:
                targets.extend(t for t in r.suspected_targets if t not in targets)
        if not targets and "smallest_class" in ranked[0].details:
            targets.append(int(ranked[0].details["smallest_class"]))
    spread = _no_dominant_label(results)
    if spread is not None:
        reasons.append(f"the untargeted trigger sends the classes to {spread.details['spread_targets']} distinct "
                       f"labels (> {spread.details['spread_limit']}): no dominant label, an all-to-all backdoor's "
                       f"signature")
        if verdict == "clean":
            verdict, score = "suspicious", max(score, 1.0)
        targets.extend(t for t in spread.suspected_targets if t not in targets)
    return verdict, score, p, targets, reasons
