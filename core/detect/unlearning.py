"""TSBD's cheap signal: how concentrated clean unlearning's weight change is (docs/detect.md measures it).

TSBD observes that clean unlearning moves the backdoor neurons most; if so, a backdoored model's neuron weight
change (NWC) should be concentrated in few channels. The share of the total NWC held by the top 5% of channels
and its Gini coefficient are reported; having no threshold that follows from a statistic, and no separation
on the benchmark, the signal is informational and never flags.
"""

from __future__ import annotations

from core.defenses.tsbd import TSBDConfig, covered_conv_layers, neuron_weight_change, unlearn_clean
from core.detect.base import DetectContext, DetectorResult


def unlearning_concentration(ctx: DetectContext) -> DetectorResult:
    """Clean unlearning to chance accuracy on a copy, then the NWC concentration (share of the top 5%)."""
    cfg = ctx.config
    tsbd = TSBDConfig(lr_unlearn=cfg.unlearn_lr, unlearn_max_epochs=cfg.unlearn_max_epochs, augment=False,
                      batch_size=min(256, len(ctx.clean)), seed=ctx.seed)
    ctx.step(0.0)
    un = unlearn_clean(ctx.model, ctx.clean, ctx.norm, tsbd, ctx.device, ctx.num_classes,
                       on_progress=lambda _stage, f: ctx.step(f))
    nwc = neuron_weight_change(ctx.model, un.model, covered_conv_layers(ctx.model, tsbd.layer_exclude))
    summary = nwc.summary()
    share = float(summary["share_top5pct"])
    return DetectorResult(
        name="unlearning", score=0.0, flagged=False, statistic=share, statistic_name="nwc_share_top5pct",
        threshold=1.0, per_class=[], suspected_targets=[],
        details={"gini": summary["gini"], "unlearn_epochs": un.epochs,
                 "reached_chance": un.reached_threshold, "informational": True})
