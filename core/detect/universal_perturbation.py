"""A shape-free second inversion: per class the smallest universal additive perturbation that sends clean
inputs to it (targeted universal adversarial perturbations as a backdoor test, as in USB, Xu et al. 2023).

Neural Cleanse's patch family cannot express a blend, a warp, a sinusoid or low-frequency noise with a small
mask. An additive perturbation ``clip(x + d, 0, 1)`` can approximate all of them, and a backdoored model has
learned to answer that full-image change with its target, so the target's smallest ``||d||_2`` stands out
below the other classes'. Same batched search, cost schedule and outlier test as Neural Cleanse.
"""

from __future__ import annotations

from core.detect.base import DetectContext, DetectorResult
from core.detect.inversion import Additive, Inversion, Schedule, schedule, smallest_triggers
from core.detect.neural_cleanse import outlier_result


def universal_perturbation(ctx: DetectContext) -> DetectorResult:
    """Per class the smallest universal perturbation (L2, per-pixel RMS), all classes in one batch; flag the
    model when the smallest log size is an outlier at ``config.p_value`` under the simulated null."""
    return outlier_result(ctx, "universal_perturbation", Additive(), additive_inversion(ctx),
                          "rms_per_pixel_per_class")


def up_schedule(ctx: DetectContext) -> Schedule:
    cfg = ctx.config
    return schedule(ctx, cfg.up_steps, cfg.nc_batch_size, cfg.up_lr, cfg.up_init_cost)


def additive_inversion(ctx: DetectContext) -> Inversion:
    """The per-class additive search, once per scan (the untargeted test reuses its sizes)."""
    return ctx.shared("targeted:additive", lambda: smallest_triggers(ctx, Additive(), up_schedule(ctx), seed_offset=11))
