"""A plain supervised training loop, used by tests and benchmarks to make (backdoored) models to repair."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.runtime import DeviceImages, augment_generator, make_generator, prepare_model, runtime_for
from core.progress import Progress


def train_classifier(model: nn.Module, data: ImageSet, norm: Normalization, epochs: int, lr: float,
                     batch_size: int, device: torch.device | str, augment: bool = True, seed: int = 0,
                     weight_decay: float = 5e-4, crop_padding: int = 4,
                     progress: Progress | None = None) -> nn.Module:
    """Train ``model`` in place on ``data`` and return it (in eval mode): SGD momentum 0.9, weight decay 5e-4,
    cosine learning-rate decay per step from ``lr`` to 0 (BackdoorBench's recipe); on CUDA the data stay on
    the device as uint8 and the steps run in bf16 autocast with channels-last. ``progress`` (optional) is
    polled between batches and advanced per epoch."""
    if epochs < 0 or not 0 < lr < float("inf") or batch_size < 1:
        raise ValueError("need epochs >= 0, a finite lr > 0 and batch_size >= 1")
    progress = progress or Progress()
    rt = runtime_for(device)
    prepare_model(model, rt)
    images = DeviceImages(data, norm, rt)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    total = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    torch.manual_seed(seed)  # parameter-free layers such as dropout draw from the global generator
    order_gen = make_generator(seed)
    aug_gen = augment_generator(rt, seed + 1)
    model.train()
    for epoch in range(epochs):
        for idx in images.batches(batch_size, order_gen):
            progress.check()
            x = images.inputs(idx, augment=augment, generator=aug_gen, padding=crop_padding)
            with rt.autocast():
                loss = F.cross_entropy(model(x), images.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        progress.update((epoch + 1) / epochs)
    model.eval()
    return model
