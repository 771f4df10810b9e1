"""Step 3 and the baselines: the training loops that turn an identification into a repaired model.

``retain`` (the method): fine-tune a copy of the model on the unflagged samples with their labels, the relabelled
samples with their new labels, and the clean set as an anchor (its own batch every step, weighted by
``clean_weight``); the samples to unlearn get a *bounded* unlearning term, the complementary-label loss
-log(1 - p(y|x)) (negative learning, Kim et al. 2019), which pushes the given label's probability down without
the divergence of raw gradient ascent on -CE (unbounded below). Baselines: ``drop_flagged`` (the same loop with
every flagged sample dropped, nothing relabelled or unlearned), ``erase_flagged`` (gradient ascent on the flagged
samples' cross-entropy, then clean fine-tuning: erasing their influence, as earlier repair work does),
``retrain_without`` (train from re-initialised weights on the unflagged samples and the clean set) and
``finetune_clean`` (core.defenses.baselines.vanilla_finetune on the clean set only).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.runtime import DeviceImages, Runtime, augment_generator, make_generator, prepare_model
from core.progress import Progress
from core.ranges import BatchSize, Epochs, Flag, LearningRate, Momentum, WeightDecay, check_fields, float_in
from core.training import train_classifier

# the complementary-label loss is clamped at -log(1e-4): once p(y|x) < 1e-4 the sample no longer pulls
NL_FLOOR = 1e-4


@dataclass(frozen=True)
class RepairTrainConfig:
    """The fine-tuning of step 3 (and of ``drop_flagged``): passes over the kept training samples, cosine lr."""

    epochs: Epochs = 5
    lr: LearningRate = 0.01
    momentum: Momentum = 0.9
    weight_decay: WeightDecay = 5e-4
    batch_size: BatchSize = 128
    clean_weight: float_in(0.0, 100.0) = 1.0  # weight of the clean-set anchor batch in every step
    augment: Flag = True

    def __post_init__(self) -> None:
        check_fields(self)


def _cosine(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def complementary_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean of -log(1 - p(y|x)), bounded by -log(NL_FLOOR): lowers the given label's probability, boundedly."""
    p_y = logits.float().softmax(1).gather(1, y.view(-1, 1)).squeeze(1)
    return -torch.log((1 - p_y).clamp_min(NL_FLOOR)).mean()


def anchored_finetune(model: nn.Module, kept: ImageSet, clean: ImageSet, unlearn: ImageSet | None,
                      norm: Normalization, cfg: RepairTrainConfig, unlearn_weight: float, rt: Runtime, seed: int,
                      progress: Progress, kept_weights: np.ndarray | None = None) -> None:
    """Fine-tune ``model`` in place: per step a batch of ``kept`` (CE, each sample's weighted by
    ``kept_weights`` when given: the batch loss is the mean of weight x CE), a batch of ``clean`` (CE x clean_weight)
    and, given ``unlearn``, a batch of it (complementary loss x unlearn_weight); ``epochs`` passes over ``kept``
    (over ``clean`` when ``kept`` is empty)."""
    base = kept if len(kept) else clean
    data = DeviceImages(base, norm, rt)
    anchor = DeviceImages(clean, norm, rt)
    w = None
    if kept_weights is not None and len(kept) and not np.all(kept_weights == 1):
        w = torch.as_tensor(np.asarray(kept_weights, dtype=np.float32), device=rt.device)
    forget = DeviceImages(unlearn, norm, rt) if unlearn is not None and len(unlearn) and unlearn_weight > 0 else None
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = _cosine(opt, total)
    order_gen, draw_gen = make_generator(seed), make_generator(seed + 1)
    aug_gen = augment_generator(rt, seed + 2)
    model.train()
    for epoch in range(cfg.epochs):
        for idx in data.batches(cfg.batch_size, order_gen):
            progress.check()
            with rt.autocast():
                if w is None:
                    loss = F.cross_entropy(model(data.inputs(idx, cfg.augment, aug_gen)), data.y[idx])
                else:
                    loss = (F.cross_entropy(model(data.inputs(idx, cfg.augment, aug_gen)), data.y[idx],
                                            reduction="none") * w[idx]).mean()
                if cfg.clean_weight > 0 and base is not clean:
                    c = torch.randint(len(anchor), (cfg.batch_size,), generator=draw_gen).to(rt.device)
                    loss = loss + cfg.clean_weight * F.cross_entropy(
                        model(anchor.inputs(c, cfg.augment, aug_gen)), anchor.y[c])
                if forget is not None:
                    u = torch.randint(len(forget), (min(cfg.batch_size, len(forget)),), generator=draw_gen)
                    u = u.to(rt.device)
                    loss = loss + unlearn_weight * complementary_loss(model(forget.inputs(u)), forget.y[u])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        progress.update((epoch + 1) / max(1, cfg.epochs))
    model.eval()


@dataclass(frozen=True)
class EraseConfig:
    """Gradient-ascent erasure of the flagged samples before the clean fine-tuning (``erase_flagged``)."""

    erase_epochs: Epochs = 1
    erase_lr: LearningRate = 0.001
    erase_max_grad_norm: float_in(0.0, 1e6, open_low=True) = 5.0  # clipping keeps one ascent step finite

    def __post_init__(self) -> None:
        check_fields(self)


def gradient_ascent(model: nn.Module, flagged: ImageSet, norm: Normalization, cfg: EraseConfig, batch_size: int,
                    rt: Runtime, seed: int, progress: Progress) -> None:
    """Maximise the cross-entropy of ``flagged`` (their given labels) in place, with clipped gradients."""
    if len(flagged) == 0 or cfg.erase_epochs == 0:
        return
    data = DeviceImages(flagged, norm, rt)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.erase_lr, momentum=0.9)
    order_gen = make_generator(seed)
    model.train()
    for epoch in range(cfg.erase_epochs):
        for idx in data.batches(batch_size, order_gen):
            progress.check()
            with rt.autocast():
                loss = -F.cross_entropy(model(data.inputs(idx)), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.erase_max_grad_norm)
            opt.step()
        progress.update((epoch + 1) / cfg.erase_epochs)
    model.eval()


@dataclass(frozen=True)
class RetrainConfig:
    """Training from re-initialised weights on the unflagged samples and the clean set (``retrain_without``)."""

    retrain_epochs: Epochs = 30
    retrain_lr: LearningRate = 0.05
    retrain_batch_size: BatchSize = 128
    retrain_augment: Flag = True

    def __post_init__(self) -> None:
        check_fields(self)


def reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every submodule's parameters reset (its architecture's own initialisation)."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in fresh.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


def retrain(model: nn.Module, data: ImageSet, norm: Normalization, cfg: RetrainConfig, rt: Runtime, seed: int,
            progress: Progress) -> nn.Module:
    """``model``'s architecture trained from scratch on ``data``."""
    fresh = prepare_model(reinitialised(model, seed), rt)
    return train_classifier(fresh, data, norm, cfg.retrain_epochs, cfg.retrain_lr, cfg.retrain_batch_size,
                            rt.device, augment=cfg.retrain_augment, seed=seed, progress=progress)


def kept_set(training: ImageSet, new_labels: np.ndarray) -> ImageSet:
    """The training samples not dropped, with the labels the repair trains on."""
    keep = new_labels >= 0
    return ImageSet(training.x[keep], new_labels[keep].astype(np.int64))
