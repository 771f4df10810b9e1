"""Input-aware dynamic backdoor (IAB, Nguyen & Tran 2020): a generator makes a different trigger for every
input and is trained together with the classifier; a diversity loss keeps triggers of different inputs apart
and cross-trigger samples (an input with another input's trigger, true label kept) make a trigger work only
on its own input."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.attacks.base import Attack
from core.data.imageset import ImageSet
from core.data.transforms import Normalization

_CHUNK = 512  # images per generator call in apply_trigger


class TriggerNet(nn.Module):
    """BackdoorBench's encoder-decoder shape, narrowed: conv-BN-ReLU down twice, up twice, ``out`` channels
    (the pattern: C channels through tanh; the mask: 1 channel through the soft threshold)."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 16) -> None:
        super().__init__()

        def block(a: int, b: int) -> list[nn.Module]:
            return [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]

        w = width
        self.body = nn.Sequential(
            *block(in_channels, w), nn.MaxPool2d(2), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 2 * w),
            nn.Upsample(scale_factor=2), *block(2 * w, w), nn.Upsample(scale_factor=2), *block(w, w),
            nn.Conv2d(w, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # pad to a multiple of 4 so the two pools and upsamples give back the input size (MNIST is 28x28)
        ph, pw = (-h) % 4, (-w) % 4
        y = self.body(F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x)
        return y[..., :h, :w]


def soft_threshold(m: torch.Tensor) -> torch.Tensor:
    """IAB's mask threshold ``(tanh(20 m - 10) + 1) / 2`` on the raw mask output squashed to [0, 1]."""
    return (torch.tanh(20 * (torch.tanh(m) / 2 + 0.5) - 10) + 1) / 2


@dataclass(frozen=True, kw_only=True)
class IAB(Attack):
    """The trained trigger: ``x' = x + (G(x) - x) ⊙ M(x)`` in [0, 1] pixels with the pattern generator ``G``
    and the mask generator ``M`` of :func:`train_iab`. Built without them, ``apply_trigger`` refuses."""

    name: ClassVar[str] = "iab"
    pattern_net: nn.Module | None = field(default=None, repr=False, compare=False)
    mask_net: nn.Module | None = field(default=None, repr=False, compare=False)

    def _trigger(self, x: np.ndarray) -> np.ndarray:
        if self.pattern_net is None or self.mask_net is None:
            raise ValueError("IAB has no trained generator: build it with core.attacks.iab.train_iab")
        dev = next(self.pattern_net.parameters()).device
        out = np.empty_like(x)
        with torch.no_grad():
            for i in range(0, len(x), _CHUNK):
                batch = torch.as_tensor(x[i:i + _CHUNK]).to(dev).permute(0, 3, 1, 2).float().div(255)
                bd = _triggered(batch, batch, self.pattern_net, self.mask_net)
                out[i:i + _CHUNK] = bd.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
        return out


def _pattern(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(net(x)) / 2 + 0.5


def _triggered(x: torch.Tensor, source: torch.Tensor, g: nn.Module, m: nn.Module) -> torch.Tensor:
    """``x`` with the trigger generated from ``source`` (``source is x``: the backdoor; else cross)."""
    return x + (_pattern(g, source) - x) * soft_threshold(m(source))


@dataclass(frozen=True)
class IABConfig:
    """BackdoorBench's inputaware defaults, with the epoch counts left to the caller's budget."""

    p_attack: float = 0.1  # pratio: share of each batch backdoored
    p_cross: float = 0.1  # share of each batch given another image's trigger (label kept)
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    mask_density: float = 0.032
    lr_generator: float = 0.01  # Adam, betas (0.5, 0.9)
    mask_epochs: int = 25  # BackdoorBench trains the mask generator alone first (25 epochs)
    width: int = 16


def _div_loss(x1: torch.Tensor, x2: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Diversity loss: input distance over trigger distance (small when different inputs get different
    triggers), as IAB's ``criterion_div``."""
    dx = (x1 - x2).pow(2).flatten(1).mean(1).sqrt()
    dg = (g1 - g2).pow(2).flatten(1).mean(1).sqrt()
    return (dx / (dg + 1e-7)).mean()


def train_iab(model: nn.Module, data: ImageSet, norm: Normalization, *, target: int = 0, epochs: int,
              lr: float, batch_size: int, device: torch.device | str, seed: int = 0,
              config: IABConfig | None = None, mask_epochs: int | None = None) -> tuple[nn.Module, IAB]:
    """Train ``model`` with IAB's joint procedure and return it with the trained :class:`IAB` trigger.

    First ``mask_epochs`` epochs fit the mask generator alone (diversity + density loss), then each batch
    of ``epochs`` holds ``p_attack`` backdoored, ``p_cross`` cross-trigger and otherwise clean images; the
    classifier (SGD momentum 0.9, weight decay 5e-4, cosine lr) and the pattern generator (Adam) step on the
    cross-entropy plus ``lambda_div`` × the diversity loss.
    """
    cfg = config or IABConfig()
    dev = torch.device(device)
    c = data.image_shape[2]
    torch.manual_seed(seed)
    g = TriggerNet(c, c, cfg.width).to(dev)
    m = TriggerNet(c, 1, cfg.width).to(dev)
    model.to(dev)
    x_all = torch.as_tensor(data.x).to(dev).permute(0, 3, 1, 2).float().div(255)
    y_all = torch.as_tensor(data.y, dtype=torch.int64).to(dev)
    n = len(data)
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor(_per_channel(norm.mean, c), device=dev).view(1, c, 1, 1)
    std = torch.tensor(_per_channel(norm.std, c), device=dev).view(1, c, 1, 1)

    opt_m = torch.optim.Adam(m.parameters(), lr=cfg.lr_generator, betas=(0.5, 0.9))
    for _ in range(cfg.mask_epochs if mask_epochs is None else mask_epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if len(idx) < 2:
                continue
            x1 = x_all[idx.to(dev)]
            x2 = x1.roll(1, 0)
            m1, m2 = soft_threshold(m(x1)), soft_threshold(m(x2))
            loss = cfg.lambda_div * _div_loss(x1, x2, m1, m2) + cfg.lambda_norm * F.relu(m1.mean() - cfg.mask_density)
            opt_m.zero_grad(set_to_none=True)
            loss.backward()
            opt_m.step()
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)

    opt_c = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    total = max(1, epochs * math.ceil(n / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt_c, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr_generator, betas=(0.5, 0.9))
    for _ in range(epochs):
        model.train()
        g.train()
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            idx = idx.to(dev)
            x, y = x_all[idx], y_all[idx]
            b = len(idx)
            n_bd, n_cross = int(b * cfg.p_attack), int(b * cfg.p_cross)
            x2 = x_all[torch.randint(0, n, (b,), generator=gen).to(dev)]
            bd = _triggered(x[:n_bd], x[:n_bd], g, m)
            cross = _triggered(x[n_bd:n_bd + n_cross], x2[n_bd:n_bd + n_cross], g, m)
            inputs = torch.cat([bd, cross, x[n_bd + n_cross:]])
            labels = torch.cat([torch.full((n_bd,), target, device=dev, dtype=torch.int64), y[n_bd:]])
            ce = F.cross_entropy(model((inputs - mean) / std), labels)
            div = _div_loss(x, x2, _pattern(g, x), _pattern(g, x2))
            loss = ce + cfg.lambda_div * div
            opt_c.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_c.step()
            opt_g.step()
            sched.step()
    model.eval()
    g.eval()
    for p in g.parameters():
        p.requires_grad_(False)
    return model, IAB(image_shape=data.image_shape, target=target, pattern_net=g, mask_net=m)


def _per_channel(values: tuple[float, ...], c: int) -> list[float]:
    return list(values) * c if len(values) == 1 else list(values)
