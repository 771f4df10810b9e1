"""Baseline repairs in the same engine as TSBD: vanilla fine-tuning and fine-pruning."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.result import RepairResult
from core.defenses.runtime import (
    DeviceImages,
    Runtime,
    cuda_sync,
    forward_all,
    prepare_model,
    runtime_for,
    score,
    sgd_finetune,
)
from core.defenses.subset_filter import SubsetFilterConfig, filter_poisoned
from core.defenses.tsbd.config import REFERENCE_FINETUNE_STEPS
from core.defenses.tsbd.finetune import HeldOutStop, held_out_split
from core.progress import Progress
from core.ranges import (
    MAX_EPOCHS,
    BatchSize,
    Epochs,
    Flag,
    LearningRate,
    Momentum,
    PositiveRatio,
    Ratio,
    WeightDecay,
    check_fields,
    float_in,
    int_in,
)


@dataclass(frozen=True)
class FinetuneConfig:
    """Vanilla fine-tuning: TSBD's stage 2 without its gradient-norm penalty, so the comparison isolates it."""

    epochs: Epochs = 21  # = TSBDConfig.finetune_epochs (tsbd.py runs ft_epoch + 1 = 21)
    lr: LearningRate = 0.01  # = TSBDConfig.lr_finetune (tsbd/config.yaml: lr_ft=0.01)
    momentum: Momentum = 0.9  # tsbd.py: SGD momentum 0.9
    weight_decay: WeightDecay = 0.0  # tsbd.py: no weight decay in stage 2
    batch_size: BatchSize = 256  # tsbd/config.yaml: batch_size=256
    augment: Flag = True  # crop (padding 4) + flip, as the reference's clean data
    # not in the published baseline: TSBD's finetune_holdout / finetune_patience / finetune_max_steps (early
    # stopping on a held-out part of the clean subset, BENCHMARKS.md §2.14); 0 = off, the published method
    holdout: float_in(0.0, 0.5) = 0.0
    patience: int_in(1, MAX_EPOCHS) = 5
    max_steps: int_in(1, 100_000) = REFERENCE_FINETUNE_STEPS
    seed: int_in(0, 2**31 - 1) = 0

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class FinePruningConfig:
    """Fine-pruning (Liu, Dolan-Gavitt, Garg; RAID 2018): prune the last conv layer's channels that are least
    active on clean data, as long as clean accuracy holds, then fine-tune."""

    accuracy_drop_tolerance: Ratio = 0.04  # Liu et al. 2018 stop pruning at a ~4% validation accuracy drop
    max_prune_ratio: PositiveRatio = 0.95  # never prune the whole layer (BackdoorBench fp: ratio up to 0.95 or so)
    # candidate pruning counts in steps of 2% of the channels (forward only; >= 1% bounds them to 100 passes)
    prune_step_ratio: float_in(0.01, 1.0) = 0.02
    finetune: FinetuneConfig = FinetuneConfig()

    def __post_init__(self) -> None:
        check_fields(self, skip=("finetune",))  # the nested config checked itself when it was built


def _filtered(model: nn.Module, clean: ImageSet, norm: Normalization, rt: Runtime,
              subset_filter: SubsetFilterConfig | None) -> tuple[ImageSet, dict[str, object]]:
    """``clean`` without what :func:`filter_poisoned` drops (when ``subset_filter`` is given), and its report."""
    if subset_filter is None:
        return clean, {"applied": False}
    res = filter_poisoned(model, clean, norm, rt, subset_filter)
    return clean.subset(res.keep), res.details


def vanilla_finetune(model: nn.Module, clean: ImageSet, norm: Normalization, cfg: FinetuneConfig,
                     device: torch.device | str, progress: Progress | None = None,
                     subset_filter: SubsetFilterConfig | None = None) -> RepairResult:
    """Plain SGD fine-tuning of a copy of ``model`` on the clean subset (first filtered by
    :func:`filter_poisoned` when ``subset_filter`` is given; off by default, so the baseline stays the
    published method)."""
    rt = runtime_for(device)
    progress = progress or Progress()
    progress.sync = cuda_sync(rt)
    progress.stage("setup", 0.0, 0.05)
    repaired = prepare_model(copy.deepcopy(model), rt)
    clean, filt = _filtered(repaired, clean, norm, rt, subset_filter)
    data = DeviceImages(clean, norm, rt)
    details: dict[str, object] = {"subset_filter": filt}
    held_out = _finetune(repaired, clean, data, cfg, progress.stage("finetune", 0.05, 1.0))
    if held_out is not None:
        details["holdout"] = held_out
    after = score(repaired, data)
    details["clean_subset_after"] = {"accuracy": after.accuracy, "loss": after.loss}
    return RepairResult(model=repaired.eval(), method="finetune", params=dataclasses.asdict(cfg),
                        timings=progress.finish(), details=details)


def _finetune(model: nn.Module, clean: ImageSet, data: DeviceImages, cfg: FinetuneConfig,
              progress: Progress) -> dict[str, object] | None:
    """Plain fine-tuning of ``model`` on ``data`` (the ``clean`` images on the device) for ``cfg.epochs``; with
    ``cfg.holdout`` (TSBD's ``finetune_holdout``) on ``1 - holdout`` of them for at most ``cfg.max_steps`` steps,
    stopped on the held-out rest's loss (:class:`HeldOutStop`), the model left with the best epoch's weights, and
    its account returned (``None`` without a holdout)."""
    if cfg.holdout <= 0 or len(clean) < 2:
        sgd_finetune(model, data, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=cfg.momentum,
                     weight_decay=cfg.weight_decay, augment=cfg.augment, seed=cfg.seed, progress=progress)
        return None
    fit, held = held_out_split(clean, cfg.holdout, cfg.seed, data.norm, data.rt)
    epochs = max(1, -(-cfg.max_steps // -(-len(fit) // cfg.batch_size)))
    stop = HeldOutStop(model, held, cfg.patience)
    sgd_finetune(model, fit, epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=cfg.momentum,
                 weight_decay=cfg.weight_decay, augment=cfg.augment, seed=cfg.seed, progress=progress,
                 stop=stop.after_epoch)
    stop.restore(model)
    return {**stop.account(len(fit)), "epoch_budget": epochs}


def last_conv_layer(model: nn.Module) -> str:
    """The name of the last feature ``Conv2d`` in module order (the layer fine-pruning prunes). A last conv with no
    ``nn.Linear`` after it makes the logits (SqueezeNet's ``classifier.1``: one channel per class), so the conv
    before it is the last feature layer; pruning the logits conv would switch classes off. Raises ``ValueError``
    where there is no feature conv to prune: no ``Conv2d``, only the logits conv, or only a patch embedding
    (a ViT's or Swin's ``kernel_size == stride`` stem, whose channels are token dimensions, not late features)."""
    from core.models.registry import runs_in_forward

    # GoogLeNet's auxiliary heads come after its last feature conv but never run: pruning one changed nothing
    modules = [(n, m) for n, m in model.named_modules() if runs_in_forward(model, n)]
    convs = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no Conv2d layer to prune")
    if not any(isinstance(m, nn.Linear) for _, m in modules[convs[-1] + 1:]):
        if len(convs) == 1:
            raise ValueError(f"the model's only Conv2d ({modules[convs[0]][0]}) makes the logits: no feature "
                             "channels to prune")
        convs = convs[:-1]
    name, conv = modules[convs[-1]]
    assert isinstance(conv, nn.Conv2d)
    if len(convs) == 1 and conv.kernel_size == conv.stride and conv.kernel_size != (1, 1):
        raise ValueError(f"the model's only Conv2d ({name}) is a patch embedding (kernel {conv.kernel_size} = "
                         "stride): fine-pruning prunes a late convolutional layer's channels, and this model has "
                         "none")
    return name


def mean_channel_activation(model: nn.Module, layer: str, data: DeviceImages, batch_size: int = 1024
                            ) -> torch.Tensor:
    """Mean over images and positions of each output channel of ``layer`` on ``data`` (eval mode)."""
    module = dict(model.named_modules())[layer]
    total: list[torch.Tensor] = []

    def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        total.append(out.float().mean(dim=(2, 3)).sum(0))

    handle = module.register_forward_hook(hook)
    try:
        forward_all(model, data, batch_size)
    finally:
        handle.remove()
    model.eval()
    return torch.stack(total).sum(0) / len(data)


def _zero_channels(conv: nn.Conv2d, channels: torch.Tensor) -> None:
    with torch.no_grad():
        conv.weight[channels] = 0
        if conv.bias is not None:
            conv.bias[channels] = 0


def fine_pruning(model: nn.Module, clean: ImageSet, norm: Normalization, cfg: FinePruningConfig,
                 device: torch.device | str, progress: Progress | None = None,
                 subset_filter: SubsetFilterConfig | None = None) -> RepairResult:
    """Prune (zero, and keep at zero while fine-tuning) the last conv layer's channels in increasing order of
    mean activation on the clean subset, the most channels whose pruning keeps the subset's accuracy within
    ``accuracy_drop_tolerance`` of the unpruned model's; then fine-tune. Zeroing instead of removing keeps the
    repaired weights' keys and shapes those of the upload. ``subset_filter`` as in :func:`vanilla_finetune`."""
    rt = runtime_for(device)
    progress = progress or Progress()
    progress.sync = cuda_sync(rt)
    progress.stage("setup", 0.0, 0.02)
    repaired = prepare_model(copy.deepcopy(model), rt)
    clean, filt = _filtered(repaired, clean, norm, rt, subset_filter)
    data = DeviceImages(clean, norm, rt)
    layer = last_conv_layer(repaired)
    conv = dict(repaired.named_modules())[layer]
    assert isinstance(conv, nn.Conv2d)
    pruning = progress.stage("prune", 0.02, 0.3)

    order = torch.argsort(mean_channel_activation(repaired, layer, data), stable=True)
    base = score(repaired, data).accuracy
    saved_w = conv.weight.detach().clone()
    saved_b = conv.bias.detach().clone() if conv.bias is not None else None
    channels = conv.out_channels
    step = max(1, round(cfg.prune_step_ratio * channels))
    limit = max(0, min(channels - 1, int(cfg.max_prune_ratio * channels)))
    pruned, curve = 0, []
    for k in range(step, limit + 1, step):
        pruning.check()
        pruning.update(k / max(1, limit))
        _zero_channels(conv, order[:k])
        acc = score(repaired, data).accuracy
        curve.append((k, acc))
        if acc < base - cfg.accuracy_drop_tolerance:
            break
        pruned = k
    with torch.no_grad():  # back to the last count that kept the accuracy
        conv.weight.copy_(saved_w)
        if saved_b is not None and conv.bias is not None:
            conv.bias.copy_(saved_b)
    pruned_idx = order[:pruned]
    _zero_channels(conv, pruned_idx)

    keep = torch.ones(channels, dtype=torch.bool, device=conv.weight.device)
    keep[pruned_idx] = False
    hooks = [conv.weight.register_hook(lambda g: g * keep.view(-1, 1, 1, 1).to(g.dtype))]
    if conv.bias is not None:
        hooks.append(conv.bias.register_hook(lambda g: g * keep.to(g.dtype)))
    try:  # masked gradients (and no weight decay by default) keep the pruned channels at zero
        held_out = _finetune(repaired, clean, data, cfg.finetune, progress.stage("finetune", 0.3, 1.0))
    finally:
        for h in hooks:
            h.remove()
    after = score(repaired, data)
    params = dataclasses.asdict(cfg)
    params["layer"] = layer
    return RepairResult(
        model=repaired.eval(), method="fine_pruning", params=params,
        chosen={"pruned_channels": pruned, "layer_channels": channels},
        timings=progress.finish(),
        details={"subset_filter": filt, "clean_accuracy_unpruned": base, "prune_curve": curve,
                 "clean_subset_after": {"accuracy": after.accuracy, "loss": after.loss},
                 **({"holdout": held_out} if held_out is not None else {})})
