"""FT-SAM (Zhu, Wei, Shen, Fan, Wu; ICCV 2023): fine-tuning with sharpness-aware minimisation as a backdoor
defence. The backdoor lives in a sharp region of the loss on clean data; descending the worst loss within a
large neighbourhood of the weights pushes the model out of it while the clean accuracy is kept.

Each step: ``g = grad L(w)``; perturb ``e = rho * T^2 g / ||T g||`` with ``T = |w|`` elementwise (the adaptive
SAM of Kwon et al. 2021, whose scale-invariant neighbourhood is what makes FT-SAM's large ``rho = 2`` usable;
our reading of FT-SAM's choice); then step with ``grad L(w + e)`` taken at the perturbed weights. Defaults from
BackdoorBench's ``config/defense/ft-sam/cifar10.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.result import RepairResult
from core.defenses.runtime import (
    DeviceImages,
    augment_generator,
    cuda_sync,
    make_generator,
    prepare_model,
    runtime_for,
    score,
)
from core.progress import Progress
from core.ranges import (
    BatchSize,
    Epochs,
    Flag,
    LearningRate,
    Momentum,
    WeightDecay,
    check_fields,
    float_in,
    int_in,
)

_EPS = 1e-12


@dataclass(frozen=True)
class FTSAMConfig:
    """FT-SAM's knobs (BackdoorBench ft-sam/cifar10.yaml unless stated)."""

    epochs: Epochs = 100  # epochs: 100
    lr: LearningRate = 0.01  # lr: 0.01, lr_scheduler: CosineAnnealingLR
    momentum: Momentum = 0.9  # sgd_momentum: 0.9
    weight_decay: WeightDecay = 5e-4  # wd: 5.0e-4
    batch_size: BatchSize = 256  # batch_size: 256
    rho: float_in(0.0, 10.0) = 2.0  # rho_max = rho_min = 2.0
    label_smoothing: float_in(0.0, 1.0, open_high=True) = 0.1  # label_smoothing: 0.1
    augment: Flag = True  # crop + flip, as for the other fine-tuning baselines
    seed: int_in(0, 2**31 - 1) = 0

    def __post_init__(self) -> None:
        check_fields(self)


def adaptive_sam_perturbation(params: list[nn.Parameter], grads: list[torch.Tensor | None],
                              rho: float) -> list[torch.Tensor | None]:
    """``e = rho * T^2 g / ||T g||`` over all parameters together (``T = |w|``): the ascent step of adaptive
    SAM, the maximiser of the first-order loss over ``||T^-1 e|| <= rho``."""
    scaled = [None if g is None else p.detach().abs() * g for p, g in zip(params, grads, strict=True)]
    norm = torch.sqrt(sum((s.float().square().sum() for s in scaled if s is not None),
                          torch.zeros((), device=params[0].device)))
    factor = rho / (norm + _EPS)
    return [None if s is None else p.detach().abs() * s * factor for p, s in zip(params, scaled, strict=True)]


def ft_sam(model: nn.Module, clean: ImageSet, norm: Normalization, cfg: FTSAMConfig, device: torch.device | str,
           progress: Progress | None = None) -> RepairResult:
    """FT-SAM on a copy of ``model`` with the clean subset (this module's docstring)."""
    rt = runtime_for(device)
    progress = progress or Progress()
    progress.sync = cuda_sync(rt)
    progress.stage("setup", 0.0, 0.02)
    repaired = prepare_model(copy.deepcopy(model), rt)
    data = DeviceImages(clean, norm, rt)
    params = [p for p in repaired.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    total = cfg.epochs * math.ceil(len(data) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / max(1, total))))
    order_gen, aug_gen = make_generator(cfg.seed), augment_generator(rt, cfg.seed + 1)
    tuning = progress.stage("finetune", 0.02, 1.0)
    repaired.train()
    for epoch in range(cfg.epochs):
        for idx in data.batches(cfg.batch_size, order_gen):
            tuning.check()
            x, y = data.inputs(idx, augment=cfg.augment, generator=aug_gen), data.y[idx]
            with rt.autocast():
                loss = F.cross_entropy(repaired(x).float(), y, label_smoothing=cfg.label_smoothing)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            shifts = adaptive_sam_perturbation(params, list(grads), cfg.rho)
            with torch.no_grad():
                for p, e in zip(params, shifts, strict=True):
                    if e is not None:
                        p.add_(e)
            with rt.autocast():
                loss2 = F.cross_entropy(repaired(x).float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss2.backward()
            with torch.no_grad():
                for p, e in zip(params, shifts, strict=True):
                    if e is not None:
                        p.sub_(e)
            opt.step()
            sched.step()
        tuning.update((epoch + 1) / max(1, cfg.epochs))
    after = score(repaired, data)
    return RepairResult(model=repaired.eval(), method="ft_sam", params=dataclasses.asdict(cfg),
                        timings=progress.finish(),
                        details={"clean_subset_after": {"accuracy": after.accuracy, "loss": after.loss}})
