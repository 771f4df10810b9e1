"""Stage 1a: clean unlearning — gradient ascent on the clean subset until the model is at chance level.

Why: TSBD's first observation is that the weights clean unlearning moves most are the ones poisoned unlearning
moves most, i.e. the backdoor neurons; the unlearned copy is only used to measure those weight changes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.runtime import (
    DeviceImages,
    augment_generator,
    infer_num_classes,
    make_generator,
    prepare_model,
    runtime_for,
    score,
)
from core.defenses.tsbd.config import TSBDConfig
from core.defenses.tsbd.finetune import crop_padding_for, image_side
from core.progress import Progress


@dataclass
class UnlearnResult:
    """The unlearned copy and how it got there."""

    model: nn.Module
    epochs: int
    threshold: float  # the clean accuracy at or below which unlearning stopped
    accuracy_before: float
    accuracy_after: float
    reached_threshold: bool  # False when the epoch cap stopped it first


def chance_accuracy(labels: torch.Tensor, num_classes: int) -> float:
    """The accuracy of the best constant prediction on ``labels``: ``max(1/num_classes, largest class
    share)``. Unlearning ends in such a collapse, so on a subset whose largest class holds more than
    ``1/num_classes`` (e.g. 26 of 250 images) a threshold of exactly ``1/num_classes`` is never reached."""
    counts = torch.bincount(labels.detach().flatten().cpu(), minlength=num_classes)
    return max(1.0 / num_classes, float(counts.max()) / max(1, int(counts.sum())))


def unlearn_threshold(num_classes: int, margin: float, labels: torch.Tensor | None = None) -> float:
    """Chance accuracy plus ``margin``: the reference stops at 0.10, chance for 10 balanced classes; here chance
    is ``1/num_classes``, or the largest class share of ``labels`` when that is higher."""
    chance = 1.0 / num_classes if labels is None else chance_accuracy(labels, num_classes)
    return chance + margin


def unlearn_clean(model: nn.Module, clean: ImageSet | DeviceImages, norm: Normalization, cfg: TSBDConfig,
                  device: torch.device | str, num_classes: int | None = None,
                  progress: Progress | None = None, seed: int | None = None,
                  flip: bool | None = None) -> UnlearnResult:
    """Gradient ascent on cross-entropy over ``clean`` on a copy of ``model`` (train mode, so BN statistics
    update as in the reference), SGD(lr_unlearn, momentum, no weight decay), epoch by epoch until the
    eval-mode accuracy on ``clean`` is <= chance (:func:`chance_accuracy`) + ``cfg.unlearn_margin``, or
    ``cfg.unlearn_max_epochs`` is hit. ``model`` itself is not modified. ``flip``: whether flips are sensible
    (:func:`~core.defenses.tsbd.finetune.flip_sensible`), read when ``cfg.augment_flip`` is "auto"."""
    progress = progress or Progress()
    rt = runtime_for(device)
    data = clean if isinstance(clean, DeviceImages) else DeviceImages(clean, norm, rt)
    unlearned = prepare_model(copy.deepcopy(model), rt)
    for p in unlearned.parameters():
        p.requires_grad_(True)
    k = num_classes if num_classes is not None else infer_num_classes(unlearned, data)
    threshold = unlearn_threshold(k, cfg.unlearn_margin, data.y)
    seed = cfg.seed if seed is None else seed
    before = score(unlearned, data).accuracy
    acc = before
    epochs = 0
    if acc > threshold:
        opt = torch.optim.SGD(unlearned.parameters(), lr=cfg.lr_unlearn, momentum=cfg.unlearn_momentum,
                              weight_decay=0.0)
        order_gen = make_generator(seed)
        aug_gen = augment_generator(rt, seed + 1)
        padding = crop_padding_for(image_side(data), cfg.crop_padding)
        flip = cfg.augment_flip == "on" if flip is None or cfg.augment_flip != "auto" else flip
        while epochs < cfg.unlearn_max_epochs and acc > threshold:
            unlearned.train()
            for idx in data.batches(cfg.batch_size, order_gen):
                progress.check()
                x = data.inputs(idx, augment=cfg.augment, generator=aug_gen, padding=padding, flip=flip)
                with rt.autocast():
                    loss = -F.cross_entropy(unlearned(x), data.y[idx])  # ascent: minimise the negative
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            epochs += 1
            acc = score(unlearned, data).accuracy
            progress.update(epochs / cfg.unlearn_max_epochs if acc > threshold else 1.0)
    unlearned.eval()
    return UnlearnResult(model=unlearned, epochs=epochs, threshold=threshold, accuracy_before=before,
                         accuracy_after=acc, reached_threshold=acc <= threshold)
