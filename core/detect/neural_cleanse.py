"""Neural Cleanse (Wang et al. 2019): per class the smallest mask + pattern that flips clean inputs to it.

All classes are optimised at once: K masks and patterns applied to K copies of one clean batch make one
forward pass of ``K × batch`` images, so the cost is that of one class's search on a K-times larger batch.
A backdoor target needs an abnormally small mask, found with the MAD anomaly index of the (log) L1 norms.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from core.detect.base import DetectContext, DetectorResult
from core.detect.stats import small_side_anomalies


def neural_cleanse(ctx: DetectContext) -> DetectorResult:
    """Reverse-engineer one trigger per class, all classes in one batch; flag classes whose mask L1 norm
    has a small-side anomaly index above ``config.anomaly_threshold``."""
    cfg, k = ctx.config, ctx.num_classes
    n, c, h, w = ctx.pixels.shape
    gen = torch.Generator(device="cpu").manual_seed(ctx.seed)
    # NC parameterises with tanh: mask = tanh(m)/2 + 0.5 in (0, 1); start from a mid mask and random pattern
    mask_p = torch.zeros(k, 1, h, w, device=ctx.device)
    pattern_p = (torch.rand(k, c, h, w, generator=gen) * 2 - 1).mul(0.999).atanh().to(ctx.device)
    mask_p.requires_grad_(True)
    pattern_p.requires_grad_(True)
    opt = torch.optim.Adam([mask_p, pattern_p], lr=cfg.nc_lr, betas=(0.5, 0.9))
    targets = torch.arange(k, device=ctx.device).repeat_interleave(cfg.nc_batch_size)
    cost = torch.zeros(k, device=ctx.device)  # 0 until a class first reaches the target success (NC)
    cost_set = torch.zeros(k, dtype=torch.bool, device=ctx.device)
    up = torch.zeros(k, device=ctx.device)
    down = torch.zeros(k, device=ctx.device)
    best_norm = torch.full((k,), float("inf"), device=ctx.device)
    best_mask = torch.zeros(k, 1, h, w, device=ctx.device)
    best_pattern = torch.zeros(k, c, h, w, device=ctx.device)
    since_improved = 0
    steps = 0
    for steps in range(1, cfg.nc_steps + 1):
        idx = torch.randint(0, n, (cfg.nc_batch_size,), generator=gen).to(ctx.device)
        x = ctx.pixels[idx]  # B×C×H×W
        mask = torch.tanh(mask_p) / 2 + 0.5
        pattern = torch.tanh(pattern_p) / 2 + 0.5
        x_adv = (1 - mask[:, None]) * x[None] + (mask * pattern)[:, None]  # K×B×C×H×W
        logits = ctx.logits(x_adv.reshape(k * cfg.nc_batch_size, c, h, w))
        ce = F.cross_entropy(logits, targets, reduction="none").view(k, -1).mean(1)
        l1 = mask.flatten(1).sum(1)
        loss = (ce + cost * l1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            success = (logits.argmax(1) == targets).float().view(k, -1).mean(1)
            reached = success >= cfg.nc_target_success
            better = reached & (l1 < best_norm)
            improved_much = reached & (l1 < best_norm * 0.99)
            best_norm = torch.where(better, l1, best_norm)
            best_mask[better] = mask[better]
            best_pattern[better] = pattern[better]
            # NC's cost schedule: start the L1 cost once the target success is reached, then raise it after
            # `patience` successful steps and lower it faster after `patience` failing ones
            new = reached & ~cost_set
            cost = torch.where(new, torch.full_like(cost, cfg.nc_init_cost), cost)
            cost_set |= reached
            up = torch.where(reached, up + 1, torch.zeros_like(up))
            down = torch.where(reached, torch.zeros_like(down), down + 1)
            raise_ = cost_set & (up >= cfg.nc_patience)
            lower = cost_set & (down >= cfg.nc_patience)
            cost = torch.where(raise_, cost * cfg.nc_cost_multiplier, cost)
            cost = torch.where(lower, cost / cfg.nc_cost_multiplier ** 1.5, cost)
            up = torch.where(raise_, torch.zeros_like(up), up)
            down = torch.where(lower, torch.zeros_like(down), down)
        since_improved = 0 if bool(improved_much.any()) else since_improved + 1
        ctx.step(steps / cfg.nc_steps)
        if bool(cost_set.all()) and since_improved >= cfg.nc_early_stop_patience:
            break
    with torch.no_grad():
        never = ~torch.isfinite(best_norm)  # a class never reached the target success: its final mask counts
        final_mask = torch.tanh(mask_p) / 2 + 0.5
        best_mask[never] = final_mask[never]
        best_pattern[never] = (torch.tanh(pattern_p) / 2 + 0.5)[never]
        best_norm = torch.where(never, final_mask.flatten(1).sum(1), best_norm)
    norms = best_norm.double().cpu().tolist()
    # the index is taken on log norms: mask sizes spread multiplicatively, and on a linear scale one naturally
    # large class (MNIST's thin "1" needs ~4x the median mask) inflates the MAD and hides a real outlier
    index, flagged = small_side_anomalies([math.log(max(v, 1e-6)) for v in norms], cfg.anomaly_threshold)
    top = max(index) if index else 0.0
    triggers = {cls: _trigger_image(best_mask[cls], best_pattern[cls]) for cls in flagged}
    return DetectorResult(
        name="neural_cleanse", score=top / cfg.anomaly_threshold, flagged=bool(flagged), statistic=top,
        statistic_name="anomaly_index", threshold=cfg.anomaly_threshold, per_class=norms,
        suspected_targets=sorted(flagged, key=lambda cls: -index[cls]), trigger_images=triggers,
        details={"anomaly_index_per_class": index, "steps": steps, "image_pixels": h * w,
                 "mask_l1_fraction_per_class": [v / (h * w) for v in norms],
                 "classes_never_reaching_target_success": never.nonzero().flatten().cpu().tolist()})


def _trigger_image(mask: torch.Tensor, pattern: torch.Tensor) -> np.ndarray:
    """``mask × pattern`` as an ``H×W×C`` uint8 picture of the inverted trigger."""
    img = (mask * pattern).clamp(0, 1).mul(255).round().to(torch.uint8)
    return img.permute(1, 2, 0).cpu().numpy()
