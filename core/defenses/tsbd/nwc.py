"""Stage 1b: neuron weight change (NWC) — how far clean unlearning moved each conv output channel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


def covered_conv_layers(model: nn.Module, exclude: tuple[str, ...] = ("shortcut", "downsample")) -> list[str]:
    """Qualified names of the ``Conv2d`` layers TSBD works on: all whose name contains none of ``exclude``
    (the reference skips the residual shortcut projections)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and not any(s in name for s in exclude)]


@dataclass
class NWC:
    """Per-layer, per-output-channel L1 weight change, plus the per-weight ``|dW|`` zeroing needs."""

    layer_names: list[str]
    channel_change: list[torch.Tensor]  # one float32 vector per layer, length = out_channels
    weight_change: list[torch.Tensor]  # |W_unlearned - W_original|, float32, same shape as each weight

    @property
    def num_channels(self) -> int:
        return sum(int(c.numel()) for c in self.channel_change)

    def flat(self) -> torch.Tensor:
        """All channels' NWC in one vector (layer by layer, channel order), on the CPU."""
        return torch.cat([c.detach().float().cpu() for c in self.channel_change])

    def top_channels(self, n: float) -> list[torch.Tensor]:
        """Per layer, a boolean mask of the channels among the global top ``round(n * num_channels)`` by NWC
        (ranked together across layers, largest first, no normalisation, as the reference does). A channel that
        unlearning did not move (NWC 0) is never among them: where unlearning moved nothing (a model already at
        chance on the clean subset stops it before its first step) ranking the ties would pick channels by their
        position, the stem's first."""
        flat = self.flat()
        k = min(int((flat > 0).sum()), max(0, round(n * len(flat))))
        chosen = torch.zeros(len(flat), dtype=torch.bool)
        if k > 0:
            # stable descending order so that ties resolve the same way every time
            chosen[torch.argsort(flat, descending=True, stable=True)[:k]] = True
        masks, start = [], 0
        for c in self.channel_change:
            masks.append(chosen[start:start + c.numel()].to(c.device))
            start += c.numel()
        return masks

    def summary(self, top_layers: int = 5) -> dict[str, object]:
        """Quantiles, Gini coefficient, the share of the total change held by the top 5%/20% of channels, and
        the layers holding most of the top 5% channels: a compact picture for the report."""
        flat = self.flat().double()
        s, _ = torch.sort(flat)
        n = len(s)
        total = float(s.sum())
        gini = float((2 * torch.arange(1, n + 1, dtype=torch.float64) - n - 1).mul(s).sum() / (n * total)) \
            if total > 0 else 0.0
        qs = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
        quant = {f"q{int(q * 100)}": float(torch.quantile(s, q)) for q in qs}
        desc = s.flip(0)
        share = {f"share_top{p}pct": (float(desc[: max(1, round(p / 100 * n))].sum()) / total if total else 0.0)
                 for p in (5, 20)}
        top5 = self.top_channels(0.05)
        per_layer = sorted(((int(m.sum()), name) for m, name in zip(top5, self.layer_names, strict=True)),
                           reverse=True)
        return {"num_channels": n, "num_layers": len(self.layer_names), "total": total, "gini": gini,
                **quant, **share,
                "top5pct_by_layer": {name: cnt for cnt, name in per_layer[:top_layers] if cnt > 0}}


def neuron_weight_change(original: nn.Module, unlearned: nn.Module, layer_names: list[str]) -> NWC:
    """``NWC_k = sum |W_unlearned[k] - W_original[k]|`` over each output channel ``k`` of each named conv
    layer, computed in float32 on the weights' device."""
    orig = dict(original.named_modules())
    unl = dict(unlearned.named_modules())
    channel_change, weight_change = [], []
    with torch.no_grad():
        for name in layer_names:
            w0 = orig[name].weight.detach().float()
            w1 = unl[name].weight.detach().float().to(w0.device)
            d = (w1 - w0).abs()
            weight_change.append(d)
            channel_change.append(d.flatten(1).sum(1))
    return NWC(layer_names=list(layer_names), channel_change=channel_change, weight_change=weight_change)
