"""Stage 2: activeness-aware fine-tuning — fine-tuning that suppresses the gradient norm.

Why: TSBD's second observation is that backdoor neurons are more *active* (larger gradient norm) than clean
ones; stepping with ``(1 - alpha) g1 + alpha g2``, where ``g2`` is the gradient at ``theta + r g1/||g1||``, is the
gradient-norm penalty of Zhao et al. (ICML 2022) with ``lambda = alpha * r`` and keeps them from re-emerging.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.runtime import (
    DeviceImages,
    Runtime,
    augment_generator,
    make_generator,
    prepare_model,
    runtime_for,
    score,
)
from core.defenses.tsbd.config import REFERENCE_FINETUNE_IMAGES, TSBDConfig
from core.progress import Progress

_NORM_EPS = 1e-12  # guards the per-tensor normalisation against an all-zero gradient


_FLIP_KEEP = 0.9  # flips are sensible when flipped images keep >= 90% of the model's above-chance accuracy


@dataclass(frozen=True)
class FinetuneResult:
    epochs: int
    steps: int
    last_loss: float
    lr: float = 0.0
    crop_padding: int = 0
    flip: bool = False
    # stage 2 stopped on held-out loss (cfg.finetune_holdout > 0; None when off): :func:`HeldOutStop.account`
    holdout: dict[str, object] | None = None


def crop_padding_for(side: int, padding: int | None) -> int:
    """The random crop's padding: ``padding`` when given, else scaled to the image, ``round(side / 8)`` and at
    least 1 (the reference's 4 on 32x32; 1 on 8x8 digits, where 4 would crop away half a digit)."""
    return padding if padding is not None else max(1, round(side / 8))


def image_side(data: DeviceImages) -> int:
    """The shorter side of the subset's images (stored N×H×W×C)."""
    return int(min(data.x.shape[1], data.x.shape[2]))


def flip_sensible(model: nn.Module, data: DeviceImages, num_classes: int,
                  plain: float | None = None) -> tuple[bool, float, float]:
    """Whether horizontal flips are a sensible augmentation for this task, read from the model itself:
    (sensible, accuracy on the subset, accuracy on its mirror images). Sensible when the mirrored images keep
    at least 90% of the model's above-chance accuracy: a CIFAR model does, a digit model does not (a mirrored
    2 is no 2). Two forward passes, one when the caller gives the accuracy on the subset (``plain``)."""
    plain = score(model, data).accuracy if plain is None else plain
    mirrored = _MirroredView(data)
    flipped = score(model, mirrored).accuracy  # type: ignore[arg-type]
    chance = 1.0 / num_classes
    return flipped - chance >= _FLIP_KEEP * (plain - chance), plain, flipped


class _MirroredView:
    """``data`` with every image mirrored left-right (what :func:`score` reads: ``rt``, ``y``, ``inputs``)."""

    def __init__(self, data: DeviceImages) -> None:
        self.data, self.rt, self.y = data, data.rt, data.y

    def __len__(self) -> int:
        return len(self.data)

    def inputs(self, index: torch.Tensor | slice) -> torch.Tensor:
        return self.data.inputs(index).flip(3)


@dataclass(frozen=True)
class Stage2Schedule:
    """Stage 2's epochs, learning rate and augmentation, and the evidence they were set from."""

    epochs: int
    lr: float
    crop_padding: int
    flip: bool
    damage: float  # how far zeroing moved the subset's loss towards chance (0: not at all, 1: all the way)
    why: str

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def stage2_schedule(n_images: int, side: int, loss_original: float, loss_zeroed: float, num_classes: int,
                    cfg: TSBDConfig, flip: bool | None = None) -> Stage2Schedule:
    """Stage 2's schedule from the evidence rather than CIFAR constants (``cfg.finetune_adaptive``; else the
    configured values). Epochs keep the reference's budget of image presentations (21 x 2,500), at least
    ``finetune_min_epochs`` and at most ``finetune_epochs`` (the cap wins): a larger subset needs fewer passes.
    The learning rate is ``lr_finetune`` times the *damage* zeroing did, measured on the clean subset (which the
    original model never trained on, so its loss is a held-out loss): ``(loss_zeroed - loss_original) / (ln K -
    loss_original)``, clipped to ``[finetune_lr_floor, 1]`` — a model zeroing barely touched is not shaken by
    the full rate."""
    padding = crop_padding_for(side, cfg.crop_padding)
    do_flip = (cfg.augment_flip == "on") if flip is None or cfg.augment_flip != "auto" else flip
    chance_loss = math.log(num_classes)
    span = chance_loss - loss_original
    damage = 1.0 if span <= 1e-9 else min(1.0, max(0.0, (loss_zeroed - loss_original) / span))
    if cfg.finetune_holdout > 0:  # a budget of steps; the held-out loss decides where in it stage 2 stops
        batches = -(-max(1, n_images) // cfg.batch_size)
        budget = max(1, -(-cfg.finetune_max_steps // batches))
        budget_why = (f"at most {budget} epochs = ceil({cfg.finetune_max_steps} steps / {batches} batches of "
                      f"{n_images} images), stopped on the held-out loss (patience {cfg.finetune_patience})")
    if not cfg.finetune_adaptive:
        if cfg.finetune_holdout > 0:
            return Stage2Schedule(budget, cfg.lr_finetune, padding, do_flip, damage,
                                  f"{budget_why}; configured learning rate (finetune_adaptive is off)")
        return Stage2Schedule(cfg.finetune_epochs, cfg.lr_finetune, padding, do_flip, damage,
                              "configured epochs and learning rate (finetune_adaptive is off)")
    hi = cfg.finetune_epochs  # the user's (or the reference's) epochs stay the cap
    epochs = min(hi, max(cfg.finetune_min_epochs, round(REFERENCE_FINETUNE_IMAGES / max(1, n_images))))
    epochs_why = (f"epochs = clip({REFERENCE_FINETUNE_IMAGES} / {n_images} images, {cfg.finetune_min_epochs}, {hi})"
                  f" = {epochs}")
    if cfg.finetune_holdout > 0:
        epochs, epochs_why = budget, budget_why
    factor = min(1.0, max(cfg.finetune_lr_floor, damage))
    why = (f"{epochs_why}; lr = {cfg.lr_finetune:g} x clip(damage {damage:.3f}, {cfg.finetune_lr_floor:g}, 1), "
           f"damage = (zeroed loss {loss_zeroed:.3f} - original {loss_original:.3f}) / (ln {num_classes} - original)")
    return Stage2Schedule(epochs, cfg.lr_finetune * factor, padding, do_flip, damage, why)


def held_out_split(clean: ImageSet, fraction: float, seed: int, norm: Normalization, rt: Runtime
                   ) -> tuple[DeviceImages, DeviceImages]:
    """(the images stage 2 trains on, the disjoint ``fraction`` :class:`HeldOutStop` scores), seeded; the one
    split of every held-out stop (TSBD's ``finetune_holdout``, the baselines' ``holdout``)."""
    from core.defenses.tsbd.auto import split_holdout

    fit_idx, held_idx = split_holdout(len(clean), fraction, seed + 9)
    return DeviceImages(clean.subset(fit_idx), norm, rt), DeviceImages(clean.subset(held_idx), norm, rt)


class HeldOutStop:
    """Early stopping on a held-out part of the clean subset (``TSBDConfig.finetune_holdout``; Prechelt 1998):
    :meth:`after_epoch` scores the model on ``holdout`` (eval mode, one forward pass), remembers the weights
    (batch-norm statistics included) of the epoch with the lowest held-out loss so far, and answers whether to
    stop: ``patience`` epochs in a row without a lower loss. :meth:`restore` loads the remembered weights. The
    model before stage 2 (epoch 0) is scored for the record but is never a candidate: stage 2 always runs at
    least one epoch, so a repair never returns the merely zeroed model."""

    def __init__(self, model: nn.Module, holdout: DeviceImages, patience: int) -> None:
        self.holdout, self.patience = holdout, patience
        start = score(model, holdout)
        self.curve: list[dict[str, float]] = [{"epoch": 0, "loss": start.loss, "accuracy": start.accuracy}]
        self.best_epoch, self.best_loss = 0, math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped_after: int | None = None

    def after_epoch(self, model: nn.Module, epoch: int) -> bool:
        s = score(model, self.holdout)
        self.curve.append({"epoch": epoch, "loss": s.loss, "accuracy": s.accuracy})
        if s.loss < self.best_loss or self.best_state is None:  # the first epoch is always a candidate
            self.best_epoch, self.best_loss = epoch, s.loss
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - self.best_epoch >= self.patience:
            self.stopped_after = epoch
            return True
        return False

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def account(self, fit_images: int) -> dict[str, object]:
        best = self.curve[self.best_epoch]
        ran = self.curve[-1]["epoch"]
        why = (f"kept epoch {self.best_epoch} of {ran} (held-out loss {best['loss']:.4f}, accuracy "
               f"{best['accuracy']:.3f}, on {len(self.holdout)} held-out images; stage 2 trained on {fit_images}); "
               + (f"stopped after {self.patience} epochs without a lower held-out loss" if self.stopped_after else
                  "ran its whole step budget"))
        return {"holdout_images": len(self.holdout), "fit_images": fit_images, "patience": self.patience,
                "epochs_run": ran, "best_epoch": self.best_epoch, "best_loss": best["loss"],
                "best_accuracy": best["accuracy"], "stopped_early": self.stopped_after is not None,
                "curve": self.curve, "why": why}


class _FrozenBatchNormStats:
    """Within the block, BatchNorm layers normalise with batch statistics (train mode) but do not update their
    running statistics: the reference computes ``g2`` on a throw-away copy, so only the unshifted forward
    pass moves the running statistics. Setting momentum to 0 does that without copying anything."""

    def __init__(self, model: nn.Module) -> None:
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.saved: list[float | None] = []
        self.counts: list[torch.Tensor | None] = []

    def __enter__(self) -> None:
        self.saved = [bn.momentum for bn in self.bns]
        self.counts = [bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None
                       for bn in self.bns]
        for bn in self.bns:
            bn.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for bn, mom, cnt in zip(self.bns, self.saved, self.counts, strict=True):
            bn.momentum = mom
            if cnt is not None:
                bn.num_batches_tracked.copy_(cnt)


def trimmed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, trim: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the batch without its ``trim`` share of highest-loss samples, and the mask of
    the samples kept (``trim = 0``: the plain mean, every sample kept). Why: images in the "clean" subset that
    carry a trigger and the target's label contradict what the repaired model sees in them, so they are
    among the hardest until the model learns them again; leaving the hardest out keeps stage 2 from teaching
    the backdoor back (BENCHMARKS.md §3)."""
    per_sample = F.cross_entropy(logits.float(), y, reduction="none")
    drop = int(trim * len(y))
    if drop == 0:
        return per_sample.mean(), torch.ones_like(y, dtype=torch.bool)
    keep = torch.ones_like(y, dtype=torch.bool)
    keep[torch.topk(per_sample.detach(), drop).indices] = False
    return per_sample[keep].mean(), keep


def activeness_aware_step(model: nn.Module, params: list[torch.nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                          rho: float, alpha: float, rt_autocast: object, trim: float = 0.0) -> torch.Tensor:
    """Fill ``p.grad`` with ``(1 - alpha) * g1 + alpha * g2`` for every trainable parameter, where
    ``g1 = grad L(theta)`` and ``g2 = grad L(theta + rho * g1 / ||g1||)`` (norm per tensor). Leaves the
    parameters as they were (the shift is subtracted again, no copy of the model); returns L(theta)
    detached (a tensor, so that the caller decides when to synchronise with the device). With ``trim > 0``
    ``L`` is :func:`trimmed_cross_entropy` and the second pass uses the samples the first one kept."""
    with rt_autocast():  # type: ignore[operator]
        logits = model(x)
    loss, keep = trimmed_cross_entropy(logits, y, trim)
    g1 = torch.autograd.grad(loss, params, allow_unused=True)
    shifts: list[torch.Tensor | None] = []
    with torch.no_grad():
        for p, g in zip(params, g1, strict=True):
            if g is None:
                shifts.append(None)
                continue
            s = g * (rho / (g.norm() + _NORM_EPS))
            p.add_(s)
            shifts.append(s)
    with _FrozenBatchNormStats(model), rt_autocast():  # type: ignore[operator]
        loss2 = F.cross_entropy(model(x).float()[keep], y[keep])
    g2 = torch.autograd.grad(loss2, params, allow_unused=True)
    with torch.no_grad():
        for p, s, a, b in zip(params, shifts, g1, g2, strict=True):
            if s is not None:
                p.sub_(s)
            if a is None and b is None:
                p.grad = None
                continue
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            p.grad = torch.lerp(a, b, alpha)  # (1 - alpha) * a + alpha * b
    return loss.detach()


def activeness_aware_finetune(model: nn.Module, clean: ImageSet | DeviceImages, norm: Normalization,
                              cfg: TSBDConfig, device: torch.device | str,
                              progress: Progress | None = None,
                              schedule: Stage2Schedule | None = None,
                              holdout: DeviceImages | None = None) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``clean`` for ``schedule.epochs`` epochs (default: ``cfg``'s
    configured schedule), every parameter trained, SGD(lr, momentum, no weight decay), each step along the
    activeness-aware gradient of :func:`activeness_aware_step`; polls ``progress`` between batches. With
    ``holdout`` (images disjoint from ``clean``) the epochs are a budget: :class:`HeldOutStop` stops stage 2
    after ``cfg.finetune_patience`` epochs without a lower held-out loss and the model gets the weights of the
    best epoch; ``FinetuneResult.epochs`` is then the kept epoch and ``holdout`` the account."""
    progress = progress or Progress()
    rt = runtime_for(device)
    data = clean if isinstance(clean, DeviceImages) else DeviceImages(clean, norm, rt)
    prepare_model(model, rt)
    if schedule is None:
        flip = cfg.augment_flip == "on"
        if cfg.augment and cfg.augment_flip == "auto":
            flip = flip_sensible(model, data, int(data.y.max()) + 1)[0]
        budget = holdout is not None and cfg.finetune_holdout > 0  # the step budget only where a holdout stops it
        schedule = replace(stage2_schedule(len(data), image_side(data), 0.0, 0.0, 2, replace(
            cfg, finetune_adaptive=False, finetune_holdout=cfg.finetune_holdout if budget else 0.0)), flip=flip)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=schedule.lr, momentum=cfg.finetune_momentum, weight_decay=0.0)
    order_gen = make_generator(cfg.seed + 2)
    aug_gen = augment_generator(rt, cfg.seed + 3)
    epochs = schedule.epochs
    total = epochs * -(-len(data) // cfg.batch_size)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / total)))
             if cfg.finetune_schedule == "cosine" and total > 0 else None)
    steps, last = 0, torch.tensor(float("nan"))
    stop = HeldOutStop(model, holdout, cfg.finetune_patience) if holdout is not None else None
    model.train()
    for epoch in range(epochs):
        for idx in data.batches(cfg.batch_size, order_gen):
            progress.check()
            x = data.inputs(idx, augment=cfg.augment, generator=aug_gen, padding=schedule.crop_padding,
                            flip=schedule.flip)
            last = activeness_aware_step(model, params, x, data.y[idx], cfg.rho, cfg.alpha, rt.autocast,
                                         cfg.finetune_trim)
            opt.step()
            if sched is not None:
                sched.step()
            steps += 1
        progress.update((epoch + 1) / epochs)
        if stop is not None and stop.after_epoch(model, epoch + 1):
            break
    account = None
    if stop is not None:
        stop.restore(model)
        epochs, account = stop.best_epoch, stop.account(len(data))
    model.eval()
    return FinetuneResult(epochs=epochs, steps=steps, last_loss=float(last), lr=schedule.lr,
                          crop_padding=schedule.crop_padding if cfg.augment else 0, flip=cfg.augment and schedule.flip,
                          holdout=account)
