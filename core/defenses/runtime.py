"""Shared machinery of the repair methods: device placement, batching, augmentation, evaluation.

Everything here follows docs/methods.md's speed rules: on CUDA the clean subset lives on the device as uint8, batches
are augmented on the device, the forward/backward runs under bf16 autocast in channels-last layout, and
evaluation runs in large batches under ``torch.inference_mode()``. On the CPU the same code runs in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.data.imageset import ImageSet
from core.data.transforms import Normalization, random_crop_flip, to_model_input
from core.progress import Progress


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed."""

    device: torch.device
    amp: bool  # bf16 autocast (CUDA only: CPU bf16 autocast is slower than fp32 on most CPUs)
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA, a no-op elsewhere."""
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def runtime_for(device: torch.device | str) -> Runtime:
    """The :class:`Runtime` for ``device``: bf16 + channels-last on CUDA, fp32 contiguous elsewhere."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    return Runtime(device=dev, amp=cuda, channels_last=cuda)


def prepare_model(model: nn.Module, rt: Runtime) -> nn.Module:
    """Move ``model`` to the runtime's device and memory layout (in place; returns it)."""
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


class DeviceImages:
    """An :class:`ImageSet` held on the device as uint8, turned into normalised model input per batch.

    Keeping the pixels as uint8 on the device costs 4x less memory than floats and removes all host→device
    traffic from the training loop.
    """

    def __init__(self, data: ImageSet, norm: Normalization, rt: Runtime) -> None:
        if len(data) == 0:
            raise ValueError("the clean subset is empty")
        self.rt = rt
        self.norm = norm
        self.x = torch.as_tensor(data.x).to(rt.device)
        self.y = torch.as_tensor(data.y, dtype=torch.int64).to(rt.device)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def inputs(self, index: torch.Tensor | slice, augment: bool = False,
               generator: torch.Generator | None = None, padding: int = 4, flip: bool = True) -> torch.Tensor:
        """Normalised float ``N×C×H×W`` input for the images at ``index``, optionally crop(+flip) augmented."""
        x = to_model_input(self.x[index], self.norm, self.rt.device, self.rt.channels_last)
        if augment:
            x = random_crop_flip(x, padding=padding, generator=generator, flip=flip)
        return x

    def batches(self, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
        """Index tensors of one shuffled epoch (shuffled only when ``generator`` is given); keeps the last
        partial batch, as the reference's DataLoader does, except that a single image left over joins the batch
        before it: batch norm cannot train on one value per channel (torchvision's ResNets reach a 1x1 map on
        32x32 images), and 33 images in batches of 32 failed every repair of one."""
        n = len(self)
        order = (torch.randperm(n, generator=generator, device="cpu").to(self.rt.device)
                 if generator is not None else torch.arange(n, device=self.rt.device))
        cuts = [*range(0, n, batch_size), n]
        if batch_size > 1 and len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:
            del cuts[-2]
        for start, end in zip(cuts, cuts[1:], strict=False):
            yield order[start:end]


def make_generator(seed: int) -> torch.Generator:
    """A seeded CPU generator (shuffling and augmentation draws are made on the CPU for reproducibility
    across devices; the draws are tiny)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def augment_generator(rt: Runtime, seed: int) -> torch.Generator:
    """A seeded generator on the runtime's device for on-device augmentation."""
    g = torch.Generator(device=rt.device)
    g.manual_seed(seed)
    return g


@dataclass(frozen=True)
class CleanScore:
    """Accuracy and mean cross-entropy of a model on a clean set."""

    accuracy: float
    loss: float


def score(model: nn.Module, data: DeviceImages, batch_size: int = 1024) -> CleanScore:
    """Eval-mode accuracy and mean loss over ``data`` (large batches, inference mode); restores the
    model's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    correct = 0
    loss_sum = 0.0
    with torch.inference_mode(), data.rt.autocast():
        for start in range(0, len(data), batch_size):
            sl = slice(start, start + batch_size)
            logits = model(data.inputs(sl)).float()
            y = data.y[sl]
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    return CleanScore(accuracy=correct / len(data), loss=loss_sum / len(data))


def forward_all(model: nn.Module, data: DeviceImages, batch_size: int = 1024) -> None:
    """Eval-mode forward passes over every image of ``data`` (inference mode, autocast), for forward hooks to
    observe; restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), data.rt.autocast():
            for start in range(0, len(data), batch_size):
                model(data.inputs(slice(start, start + batch_size)))
    finally:
        model.train(was_training)


def infer_num_classes(model: nn.Module, data: DeviceImages) -> int:
    """The number of logits ``model`` produces (one eval-mode forward pass on one image)."""
    was_training = model.training
    model.eval()
    with torch.inference_mode(), data.rt.autocast():
        out = model(data.inputs(slice(0, 1)))
    model.train(was_training)
    return int(out.shape[1])


def sgd_finetune(model: nn.Module, data: DeviceImages, *, epochs: int, lr: float, batch_size: int,
                 momentum: float, weight_decay: float, augment: bool, seed: int,
                 progress: Progress | None = None, freeze_bn: bool = False,
                 stop: Callable[[nn.Module, int], bool] | None = None) -> None:
    """Plain supervised fine-tuning in place (constant lr, as the reference's stage 2 without its penalty);
    polls ``progress`` between batches and reports each epoch. ``freeze_bn``: batch-norm layers stay in eval
    mode (their running statistics do not move; their affine weights still train). ``stop(model, epoch)``,
    asked after each epoch (1-based), ends the fine-tuning early when it answers True (held-out stopping)."""
    progress = progress or Progress()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    order_gen = make_generator(seed)
    aug_gen = augment_generator(data.rt, seed + 1)
    for epoch in range(epochs):
        sgd_epoch(model, data, opt, batch_size, augment, order_gen, aug_gen, progress, freeze_bn=freeze_bn)
        progress.update((epoch + 1) / epochs)
        if stop is not None and stop(model, epoch + 1):
            break


def sgd_epoch(model: nn.Module, data: DeviceImages, opt: torch.optim.Optimizer, batch_size: int, augment: bool,
              order_gen: torch.Generator, aug_gen: torch.Generator, progress: Progress,
              freeze_bn: bool = False) -> None:
    """One epoch of plain cross-entropy steps in train mode (batch-norm layers in eval mode with
    ``freeze_bn``), polling ``progress`` between batches (the one supervised loop that fine-tuning baselines
    and data repair's calibration share)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    for idx in data.batches(batch_size, order_gen):
        progress.check()
        x = data.inputs(idx, augment=augment, generator=aug_gen)
        with data.rt.autocast():
            loss = F.cross_entropy(model(x), data.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def cuda_sync(rt: Runtime) -> Callable[[], None] | None:
    """A CUDA synchronise for :class:`core.progress.Progress` on a CUDA runtime (so that queued kernels are
    charged to the stage that launched them), ``None`` elsewhere."""
    if rt.device.type != "cuda":
        return None
    device = rt.device
    return lambda: torch.cuda.synchronize(device)
