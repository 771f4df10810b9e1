"""Stage 1c: zero re-initialisation of the weights clean unlearning moved most."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from core.defenses.tsbd.nwc import NWC


@dataclass(frozen=True)
class ZeroSummary:
    """What zeroing touched."""

    neuron_ratio: float
    weight_ratio: float
    channels_selected: int
    channels_total: int
    weights_zeroed: int
    weights_in_selected_channels: int
    threshold: float  # |dW| at or above which a selected channel's weight is set to zero
    per_layer_channels: dict[str, int]


def zero_masks(nwc: NWC, n: float, m: float) -> tuple[list[torch.Tensor], ZeroSummary]:
    """Per covered layer, a boolean mask (weight-shaped) of the weights to set to zero: in the top ``n``
    fraction of channels by NWC, pool the per-weight ``|dW|`` and keep the largest ``m`` fraction of the pool
    (every weight whose change is >= the pool's threshold, so ties are all zeroed)."""
    channel_masks = nwc.top_channels(n)
    pools = [d[c].flatten() for d, c in zip(nwc.weight_change, channel_masks, strict=True) if bool(c.any())]
    pool = torch.cat(pools) if pools else torch.empty(0)
    k_keep = min(pool.numel(), math.ceil(m * pool.numel() - 1e-9))
    threshold = float("inf")
    if k_keep > 0:
        # the k_keep-th largest value: kthvalue counts from the smallest
        threshold = float(pool.kthvalue(pool.numel() - k_keep + 1).values)
    masks = []
    for d, c in zip(nwc.weight_change, channel_masks, strict=True):
        shape = (-1,) + (1,) * (d.dim() - 1)
        # a weight unlearning did not move (|dW| = 0) is not one it moved most: never zeroed, even where more
        # than 1 - m of the pool is unmoved (threshold 0)
        masks.append((d >= threshold) & (d > 0) & c.view(shape))
    summary = ZeroSummary(
        neuron_ratio=n, weight_ratio=m, channels_selected=int(sum(int(c.sum()) for c in channel_masks)),
        channels_total=nwc.num_channels, weights_zeroed=int(sum(int(mk.sum()) for mk in masks)),
        weights_in_selected_channels=int(pool.numel()), threshold=threshold,
        per_layer_channels={name: int(c.sum()) for name, c in zip(nwc.layer_names, channel_masks, strict=True)
                            if bool(c.any())})
    return masks, summary


def apply_zero_masks(model: nn.Module, layer_names: list[str], masks: list[torch.Tensor]) -> None:
    """Set the masked conv weights of ``model`` to zero, in place (BN, biases and linear layers untouched)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in zip(layer_names, masks, strict=True):
            w = modules[name].weight
            w.masked_fill_(mask.to(w.device), 0.0)


def zero_reinitialize(model: nn.Module, nwc: NWC, n: float, m: float) -> tuple[nn.Module, ZeroSummary]:
    """A copy of ``model`` (the *original*, not the unlearned one) with the weights chosen by
    :func:`zero_masks` set to zero; ``model`` itself is not modified."""
    masks, summary = zero_masks(nwc, n, m)
    out = copy.deepcopy(model)
    apply_zero_masks(out, nwc.layer_names, masks)
    return out, summary
