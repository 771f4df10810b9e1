"""TSBD's cheap signal: how concentrated clean unlearning's weight change is (docs/detect.md measures it).

TSBD observes that clean unlearning moves the backdoor neurons most; if so, a backdoored model's neuron weight
change (NWC) should be concentrated in few channels. The share of the total NWC held by the top 5% of channels
and its Gini coefficient are reported; having no threshold that follows from a statistic, and no separation
on the benchmark, the signal is informational and never flags.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from core.defenses.tsbd import TSBDConfig, covered_conv_layers, neuron_weight_change, unlearn_clean
from core.detect.base import DetectContext, DetectionStopped, DetectorResult
from core.progress import Progress


class _ContextSink:
    """Unlearning's progress into the scan context: its fractions, and a stop when ``should_stop()`` says so."""

    def __init__(self, ctx: DetectContext) -> None:
        self.ctx = ctx

    def report(self, stage: str, fraction: float, timings: MutableMapping[str, float]) -> None:
        if self.ctx.progress is not None:
            lo, hi = self.ctx._span
            self.ctx.progress(lo + (hi - lo) * fraction)

    def stop_reason(self) -> str | None:
        return "stopped" if self.ctx.should_stop is not None and self.ctx.should_stop() else None


def unlearning_concentration(ctx: DetectContext) -> DetectorResult:
    """Clean unlearning to chance accuracy on a copy, then the NWC concentration (share of the top 5%)."""
    cfg = ctx.config
    tsbd = TSBDConfig(lr_unlearn=cfg.unlearn_lr, unlearn_max_epochs=cfg.unlearn_max_epochs, augment=False,
                      batch_size=min(256, len(ctx.clean)), seed=ctx.seed)
    ctx.step(0.0)
    from core.progress import StopRequested

    try:
        un = unlearn_clean(ctx.model, ctx.clean, ctx.norm, tsbd, ctx.device, ctx.num_classes,
                           progress=Progress(_ContextSink(ctx)))
    except StopRequested as exc:
        raise DetectionStopped("detection stopped on request") from exc
    nwc = neuron_weight_change(ctx.model, un.model, covered_conv_layers(ctx.model, tsbd.layer_exclude))
    summary = nwc.summary()
    share = float(summary["share_top5pct"])
    return DetectorResult(
        name="unlearning", score=0.0, flagged=False, statistic=share, statistic_name="nwc_share_top5pct",
        threshold=1.0, per_class=[], suspected_targets=[],
        details={"gini": summary["gini"], "unlearn_epochs": un.epochs,
                 "reached_chance": un.reached_threshold, "informational": True})
