"""MM-BD (Wang et al. 2024): the maximum logit margin each class can reach anywhere in the input box.

A backdoor makes its target class reachable with an abnormally large margin (the trigger feature dominates
every other logit), whatever the trigger's shape: patch, blend, warp, sinusoid or low-frequency noise. The
search needs no clean data; the largest class statistic is tested against a Gamma null fitted to the others.
"""

from __future__ import annotations

import math

import torch

from core.detect.base import DetectContext, DetectorResult, class_chunks
from core.detect.stats import gamma_max_p_value


def max_margin(ctx: DetectContext) -> DetectorResult:
    """Per class ``max_x f_k(x) - max_{j != k} f_j(x)`` over ``x`` in [0, 1]^d from ``mm_starts`` random
    images (all classes and starts in one batch, Adam on ``x = sigmoid(z)``; in chunks of whole classes where
    that batch is over a step's bounds, the gradients summed: the same step); flag when the largest class's
    order-statistic p-value under the others' Gamma null is below ``config.p_value``."""
    cfg, k = ctx.config, ctx.num_classes
    _, c, h, w = ctx.pixels.shape
    gen = torch.Generator(device="cpu").manual_seed(ctx.seed + 7)
    r = cfg.mm_starts
    z = torch.randn(k * r, c, h, w, generator=gen).to(ctx.device).requires_grad_(True)
    chunks = class_chunks(k, r, 4 * c * h * w + 5 * k, ctx.max_step_images, ctx.max_step_bytes)  # + logits, mask
    opt = torch.optim.Adam([z], lr=cfg.mm_lr)
    best = torch.full((k * r,), -float("inf"), device=ctx.device)
    for step in range(1, cfg.mm_steps + 1):
        opt.zero_grad(set_to_none=True)
        for a, b in chunks:
            margin = _chunk_margin(ctx, z, a, b, r)
            (-margin.sum()).backward()  # one chunk's graph at a time; z's gradient sums over the chunks
            best[a * r:b * r] = torch.maximum(best[a * r:b * r], margin.detach())
        opt.step()
        ctx.step(step / cfg.mm_steps)
    with torch.no_grad():
        for a, b in chunks:
            best[a * r:b * r] = torch.maximum(best[a * r:b * r], _chunk_margin(ctx, z, a, b, r))
        clean_margin = _clean_margins(ctx)
    per_class = best.view(k, r).max(1).values.double().cpu().tolist()
    top = max(range(k), key=lambda cls: per_class[cls])
    others = [v for cls, v in enumerate(per_class) if cls != top]
    p = gamma_max_p_value(per_class[top], others)
    flagged = p < cfg.p_value
    # score: the test's evidence over its threshold on a log scale, so that p = p_value gives exactly 1
    score = _log_ratio(p, cfg.p_value)
    return DetectorResult(
        name="max_margin", score=score, flagged=flagged, statistic=p, statistic_name="p_value",
        threshold=cfg.p_value, per_class=per_class, suspected_targets=[top] if flagged else [],
        details={"largest_margin_class": top, "starts": r, "steps": cfg.mm_steps,
                 "margin_ratio_to_median_of_others": per_class[top] / max(1e-12, _median(others)),
                 "clean_median_margin_per_class": clean_margin})


def _chunk_margin(ctx: DetectContext, z: torch.Tensor, a: int, b: int, r: int) -> torch.Tensor:
    """The margins of classes ``a .. b - 1``'s ``r`` starts each (``z``'s rows ``a*r .. b*r - 1``) towards their
    own class."""
    logits = ctx.logits(torch.sigmoid(z[a * r:b * r]))
    target = torch.arange(a, b, device=logits.device).repeat_interleave(r)
    return _margin(logits, torch.nn.functional.one_hot(target, logits.shape[1]).bool())


def _clean_margins(ctx: DetectContext) -> list[float]:
    """Per class the median margin its own clean images get (0 for a class without images): how far the
    model's ordinary inputs already go, a reference for the searched maximum."""
    out = []
    for i in range(0, len(ctx.pixels), 512):
        logits = ctx.logits(ctx.pixels[i:i + 512])
        onehot = torch.nn.functional.one_hot(ctx.labels[i:i + 512], logits.shape[1]).bool()
        out.append(_margin(logits, onehot))
    margins = torch.cat(out)
    return [float(margins[ctx.labels == cls].median()) if bool((ctx.labels == cls).any()) else 0.0
            for cls in range(ctx.num_classes)]


def _margin(logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    own = logits[onehot]
    rest = logits.masked_fill(onehot, -float("inf")).max(1).values
    return own - rest


def _median(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median()) if values else 0.0


def _log_ratio(p: float, threshold: float) -> float:
    return math.log(max(p, 1e-300)) / math.log(threshold)
