"""An all-to-all test: the smallest UNTARGETED universal trigger against the classes' targeted ones.

Both inversions look for one class whose smallest targeted trigger stands out below the others'. An all-to-all
backdoor (label ``y -> y + 1``) hides from them: every class's targeted trigger must flip every source, and the
backdoor helps from one source only, so no class stands out. But the backdoor is a SINGLE small trigger that
sends every image *somewhere else* — its effect depends on the source class. So the smallest trigger shared by
all images that makes the model answer anything but the true label (untargeted, the same family, cost schedule,
early stop and target success as the targeted search, :class:`core.detect.inversion.Untargeted`) is far smaller
than every targeted one. On a clean model the cheapest way to move every image is roughly to move it to the
easiest class: the untargeted size ``u`` is about the smallest targeted size ``min_k s_k`` (a little more,
since the easiest class's own images must be moved too).

The statistic puts ``log u`` in place of the smallest class's log size and scores it as the outlier test does
(core/detect/stats.py): ``(mean(O) - log u) / std(O)``, ``O`` the other targeted log sizes less the largest
(from K >= 6). Its p-value is the same simulated null (the largest score of K i.i.d. normal classes): under
"``u`` behaves like the smallest of the K class sizes" the score is distributed like the null's smallest
class's score, which never exceeds the null's largest — so the test keeps its level. The targeted sizes are
the ones Neural Cleanse / the universal perturbation computed in the same scan (``DetectContext.shared``): no
second targeted search. Evidence: the source -> answered-label map under the untargeted trigger — an
all-to-all backdoor gives a permutation (distinct targets), a clean model mostly a sink class.

That map is the second, stronger all-to-all signal (``no_dominant_label``, which the verdict reads): a natural
universal perturbation has a *dominant label* — it sends most images to one or two classes (Moosavi-Dezfooli et
al. 2017, "Universal adversarial perturbations"; on the CPU benchmark every clean and every all-to-one model:
2-3 distinct labels over 10 sources), while a shared trigger that answers differently per source is what a
permutation backdoor installs (the all-to-all model: 7-8 distinct labels, most ``y -> y + 1``). The rule —
more than ``ut_spread_fraction x K`` distinct labels (half the classes by default), from a trigger that reached
the target success — is not a p-value: no null distribution of the map of a clean model is known, so its
false-alarm rate is only what the benchmark measures (docs/detect.md), and it makes a model ``suspicious``,
never ``backdoored``, on its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from core.detect.base import DetectContext, DetectorResult
from core.detect.inversion import Additive, Family, Inversion, Patch, Schedule, Untargeted, smallest_triggers
from core.detect.neural_cleanse import _log_ratio, _picture, nc_schedule, patch_inversion
from core.detect.stats import bonferroni, null_p_value, small_outlier_scores
from core.detect.universal_perturbation import additive_inversion, up_schedule

UT_FAMILIES = ("patch", "additive")
_FAMILIES: dict[str, tuple[Callable[[], Family], Callable[[DetectContext], Inversion],
                           Callable[[DetectContext], Schedule]]] = {
    "patch": (Patch, patch_inversion, nc_schedule),
    "additive": (Additive, additive_inversion, up_schedule),
}


def untargeted_score(log_u: float, log_sizes: list[float]) -> float:
    """``(mean(O) - log u) / std(O)`` with ``O`` the targeted log sizes less the smallest (``u`` takes its
    place) and, from K >= 6, less the largest: the outlier score of ``u`` put in the smallest class's place
    (:func:`core.detect.stats.small_outlier_scores`); 0 when fewer than 2 remain or they do not spread."""
    v = sorted(log_sizes)
    if not v:
        return 0.0
    return small_outlier_scores([log_u, *v[1:]])[0]


def untargeted_p_value(log_u: float, log_sizes: list[float]) -> tuple[float, float]:
    """(p-value, score): the probability that the largest outlier score of K i.i.d. normal classes reaches
    :func:`untargeted_score` — the outlier test's own simulated null (core/detect/stats.py); p = 1 below 4
    classes (no spread to estimate)."""
    score = untargeted_score(log_u, log_sizes)
    return null_p_value(score, len(log_sizes)), score


MIN_SPREAD_CLASSES = 6  # below this a clean model's sink map (the dominant label, plus the label its own
# images go to, plus a second sink: 2-3 labels on the benchmark) already covers half the classes


def spread_limit(num_classes: int, fraction: float) -> float:
    """How many distinct labels the untargeted trigger may send the sources to before the map has no dominant
    label: ``fraction x K``; infinite (the rule off) below :data:`MIN_SPREAD_CLASSES` classes or at
    ``fraction`` 1 (a map has at most K labels)."""
    if num_classes < MIN_SPREAD_CLASSES or fraction >= 1.0:
        return math.inf
    return fraction * num_classes


def flip_map(ctx: DetectContext, family: Family, params: list[torch.Tensor], batch: int = 256) -> dict:
    """Under the trigger ``params`` (one trigger): per source class the modal answered label among the images
    it moved, that label's share of the class's images, the class's flip rate, its image count and how many
    of its images each label received (``answers``, the source's own label 0); plus the overall success
    and how many distinct labels the sources go to (all-to-all: many; a clean model's sink: few)."""
    preds = []
    with torch.no_grad():
        for i in range(0, len(ctx.pixels), batch):
            preds.append(ctx.logits(family.apply(params, ctx.pixels[i:i + batch])[0]).argmax(1))
    pred = torch.cat(preds).cpu().numpy()
    labels = ctx.labels.cpu().numpy()
    mapping: dict[str, dict] = {}
    for src in range(ctx.num_classes):
        sel = labels == src
        if not sel.any():
            continue
        moved = pred[sel][pred[sel] != src]
        counts = np.bincount(moved, minlength=ctx.num_classes)
        to = int(counts.argmax()) if moved.size else src
        mapping[str(src)] = {"to": to, "share": float(counts[to] / sel.sum()) if moved.size else 0.0,
                             "flipped": float(moved.size / sel.sum()), "images": int(sel.sum()),
                             "answers": counts.tolist()}
    targets = [m["to"] for s, m in mapping.items() if m["to"] != int(s)]
    return {"mapping": mapping, "success": float((pred != labels).mean()), "distinct_targets": len(set(targets)),
            "fixed_points": sum(m["to"] == int(s) for s, m in mapping.items())}


def untargeted(ctx: DetectContext) -> DetectorResult:
    """Per family in ``config.ut_families``: the smallest untargeted universal trigger, its size ``u`` against
    the family's targeted class sizes (reused from the same scan), the p-value of :func:`untargeted_p_value`
    and the flip map; the detector's p-value is Bonferroni over the families."""
    cfg = ctx.config
    fams = list(cfg.ut_families)
    lo, hi = ctx._span
    per: dict[str, dict] = {}
    pictures: dict[str, torch.Tensor] = {}
    for i, name in enumerate(fams):
        make, targeted, schedule = _FAMILIES[name]
        family = make()
        a, b = lo + (hi - lo) * i / len(fams), lo + (hi - lo) * (i + 1) / len(fams)
        with ctx.span(a, a + (b - a) * 0.8):  # computed here only when its own detector has not run
            inv = targeted(ctx)
        with ctx.span(a + (b - a) * 0.8, b):
            sch = schedule(ctx)
            sch = dataclasses.replace(sch, steps=sch.steps * cfg.ut_steps_factor)
            ut = smallest_triggers(ctx, family, sch, seed_offset=23 + i, objective=Untargeted())
        u = ut.normalised[0]
        logs = [math.log(max(s, 1e-12)) for s in inv.normalised]
        p, score = untargeted_p_value(math.log(max(u, 1e-12)), logs)
        # a size that never reached the target success is not a smallest trigger: no comparison, no evidence
        # (e.g. a targeted search cut short by its step limit while the cheaper untargeted one converged)
        comparable = not ut.never_reached and not inv.never_reached
        if not comparable:
            p = 1.0
        per[name] = {"targeted_sizes": inv.normalised, "p_value": p, "score": score, "untargeted_size": u,
                     "smallest_targeted_size": min(inv.normalised),
                     "ratio_to_smallest": u / max(min(inv.normalised), 1e-12),
                     "smallest_targeted_class": int(np.argmin(inv.normalised)), "steps": ut.steps,
                     "reached_target_success": not ut.never_reached, "comparable": comparable,
                     "targeted_classes_never_reaching_target_success": inv.never_reached,
                     **flip_map(ctx, family, ut.params)}
        pictures[name] = family.picture(ut.params, 0)
    limit = spread_limit(ctx.num_classes, cfg.ut_spread_fraction)
    spread = [f for f in fams if per[f]["comparable"] and per[f]["distinct_targets"] > limit]
    best = min(fams, key=lambda f: per[f]["p_value"])
    p = bonferroni([per[f]["p_value"] for f in fams])
    flagged = p < cfg.p_value
    if spread and not flagged:  # the map without a dominant label is the evidence: show that trigger's
        best = max(spread, key=lambda f: per[f]["distinct_targets"])
    top = per[best]
    # every label the sources are sent to is served by the one trigger: each gets its picture
    suspects = sorted({m["to"] for s, m in top["mapping"].items() if m["to"] != int(s)},
                      key=lambda t: -sum(m["share"] for m in top["mapping"].values() if m["to"] == t)) \
        if flagged or spread else []
    picture = _picture(pictures[best])
    return DetectorResult(
        name="untargeted", score=_log_ratio(p, cfg.p_value), flagged=flagged, statistic=p,
        statistic_name="p_value", threshold=cfg.p_value,
        per_class=[top["mapping"].get(str(k), {}).get("flipped", 0.0) for k in range(ctx.num_classes)],
        suspected_targets=suspects, trigger_images=dict.fromkeys(suspects, picture),
        details={"families": per, "family": best, "suspected_mapping": {s: m["to"] for s, m in top["mapping"].items()}
                 if flagged or spread else {}, "rule": f"p = min(1, {len(fams)} x the smallest family p-value)",
                 "no_dominant_label": bool(spread), "spread_targets": top["distinct_targets"],
                 "spread_limit": None if math.isinf(limit) else limit,
                 "spread_rule": f"no dominant label when a comparable untargeted trigger sends the sources to more "
                                f"than {limit} distinct labels ({cfg.ut_spread_fraction} x {ctx.num_classes} "
                                f"classes; never below {MIN_SPREAD_CLASSES} classes)"})
