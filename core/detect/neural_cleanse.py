"""Neural Cleanse (Wang et al. 2019): per class the smallest mask + pattern that flips clean inputs to it.

All classes are optimised at once (core/detect/inversion.py): K masks and patterns applied to K copies of one
clean batch make one forward pass of ``K × batch`` images (in chunks of classes where that pass is over a
step's bounds: the same step, see inversion.py). A backdoor target needs an abnormally small mask;
the log mask sizes are tested with the outlier statistic against its simulated null (core/detect/stats.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from core.detect.base import DetectContext, DetectorResult
from core.detect.inversion import Family, Inversion, Patch, Schedule, schedule, smallest_triggers
from core.detect.stats import outlier_p_value, small_side_anomalies


def nc_schedule(ctx: DetectContext) -> Schedule:
    cfg = ctx.config
    return schedule(ctx, cfg.nc_steps, cfg.nc_batch_size, cfg.nc_lr, cfg.nc_init_cost)


def neural_cleanse(ctx: DetectContext) -> DetectorResult:
    """Reverse-engineer one patch trigger per class, all classes in one batch; flag the model when the
    smallest log mask size is an outlier at ``config.p_value`` under the simulated null."""
    return outlier_result(ctx, "neural_cleanse", Patch(), patch_inversion(ctx), "mask_l1_fraction_per_class")


def patch_inversion(ctx: DetectContext) -> Inversion:
    """The per-class patch search, once per scan (the untargeted test reuses its sizes)."""
    return ctx.shared("targeted:patch", lambda: smallest_triggers(ctx, Patch(), nc_schedule(ctx)))


def outlier_result(ctx: DetectContext, name: str, family: Family, inv: Inversion, size_key: str) -> DetectorResult:
    """The shared verdict of an inversion detector: the outlier p-value of the log (area-normalised) sizes,
    the suspected classes (each scoring above the null's 5% critical value), their trigger pictures, and
    Neural Cleanse's classic MAD anomaly index as evidence."""
    cfg = ctx.config
    logs = [math.log(max(v, 1e-12)) for v in inv.normalised]
    p, scores, critical = outlier_p_value(logs)
    flagged = p < cfg.p_value
    suspects = sorted((cls for cls, s in enumerate(scores) if s >= critical), key=lambda cls: -scores[cls]) \
        if flagged else []
    if flagged and not suspects:  # p below the level always means the top class passes; guard rounding
        suspects = [int(np.argmax(scores))]
    # NC's original statistic, on log sizes, small side: reported (the CI gate's --max-anomaly-index reads it)
    index, _ = small_side_anomalies(logs, 2.0)
    triggers = {cls: _picture(family.picture(inv.params, cls)) for cls in suspects}
    return DetectorResult(
        name=name, score=_log_ratio(p, cfg.p_value), flagged=flagged, statistic=p, statistic_name="p_value",
        threshold=cfg.p_value, per_class=inv.normalised, suspected_targets=suspects, trigger_images=triggers,
        details={"outlier_score_per_class": scores, "critical_score": critical,
                 "anomaly_index": max(index) if index else 0.0, "anomaly_index_per_class": index,
                 "smallest_class": int(np.argmin(inv.normalised)), "steps": inv.steps, size_key: inv.normalised,
                 "classes_never_reaching_target_success": inv.never_reached})


def _log_ratio(p: float, level: float) -> float:
    """``log p / log level``: 1 at the level, larger for stronger evidence (how every p-value scores)."""
    return math.log(max(p, 1e-300)) / math.log(level)


def _picture(img: torch.Tensor) -> np.ndarray:
    """A ``C×H×W`` picture in [0, 1] as ``H×W×C`` uint8."""
    return img.mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
