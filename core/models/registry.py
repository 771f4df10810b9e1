"""Architecture registry: a name maps to a builder of a plain ``nn.Module`` with random weights (timm-like).

Weights never come from here: nothing is downloaded; checkpoints are loaded separately (``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from torch import nn

from core.models.preactresnet import PreActResNet18
from core.models.resnet_cifar import resnet20

TORCHVISION_PREFIX = "torchvision."

Builder = Callable[[int, int], nn.Module]


class UnknownArchitectureError(ValueError):
    """The architecture name is not in the registry."""


def _build_vgg19_bn(num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    model = torchvision.models.vgg19_bn(weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


_BUILDERS: dict[str, Builder] = {
    "preactresnet18": lambda num_classes, in_channels: PreActResNet18(num_classes, in_channels),
    "resnet20": lambda num_classes, in_channels: resnet20(num_classes, in_channels),
    "vgg19_bn": _build_vgg19_bn,
}

ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)
"""The built-in names; ``torchvision.<name>`` for a name of :func:`torchvision_classification_models` too."""


def torchvision_classification_models() -> list[str]:
    """The names torchvision builds as image classifiers (``torchvision.models.list_models``)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def is_known_architecture(name: str) -> bool:
    """Whether :func:`create_model` accepts ``name``."""
    if name in _BUILDERS:
        return True
    if name.startswith(TORCHVISION_PREFIX):
        return name[len(TORCHVISION_PREFIX) :] in torchvision_classification_models()
    return False


def shape_model(architecture: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The model's structure for shape checks, built on the meta device (no memory, no initialisation: a
    spec naming a 640M-parameter regnet costs the API nothing). torchvision's regnets compute their block widths
    with real tensors while they build (``.tolist()``, which meta tensors cannot); that small computation runs
    on the CPU and the model itself on meta. A builder that still needs real tensors is built on the CPU;
    ``next(model.parameters()).is_meta`` tells which."""
    import torch

    try:
        with torch.device("meta"), _regnet_widths_on_cpu():
            return create_model(architecture, num_classes, in_channels)
    except NotImplementedError:
        return create_model(architecture, num_classes, in_channels)


_REGNET_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _regnet_widths_on_cpu() -> Iterator[None]:
    """While building, torchvision's ``BlockParams.from_init_params`` (regnets' width arithmetic on a few dozen
    numbers, read back as Python ints) runs under an inner CPU device context; the same numbers come out, so
    another thread building a real regnet meanwhile is unaffected."""
    import torch
    from torchvision.models import regnet

    with _REGNET_PATCH_LOCK:
        original = regnet.BlockParams.__dict__["from_init_params"]

        def on_cpu(cls: type, *args: object, **kwargs: object) -> object:
            with torch.device("cpu"):
                return original.__func__(cls, *args, **kwargs)

        regnet.BlockParams.from_init_params = classmethod(on_cpu)  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            regnet.BlockParams.from_init_params = original  # type: ignore[method-assign]


def create_model(architecture: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A new ``architecture`` model with random weights, ``num_classes`` outputs and ``in_channels`` inputs.

    Build under ``with torch.device("meta"):`` for a cheap shape-only model.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    builder = _BUILDERS.get(architecture)
    if builder is not None:
        return builder(num_classes, in_channels)
    if architecture.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(architecture[len(TORCHVISION_PREFIX) :], num_classes, in_channels)
    raise UnknownArchitectureError(
        f"unknown architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}, "
        f"or {TORCHVISION_PREFIX}<name> for a torchvision classification model "
        "(torchvision.models.list_models(module=torchvision.models) lists the names)"
    )


def _build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    if name not in torchvision_classification_models():
        raise UnknownArchitectureError(
            f"unknown architecture {TORCHVISION_PREFIX + name!r}: {name!r} is not a torchvision "
            "classification model; torchvision.models.list_models(module=torchvision.models) lists the "
            "valid names"
        )
    # weights=None: never download; the checkpoint supplies the weights
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    _skip_auxiliary_heads(model)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


AUXILIARY_HEADS = ("aux1", "aux2", "AuxLogits")  # GoogLeNet's and Inception v3's training-only classifiers


def _skip_auxiliary_heads(model: nn.Module) -> None:
    """GoogLeNet and Inception v3 run auxiliary classifiers in training mode and answer a namedtuple with their
    logits, which every repair's loss refused (a TypeError, late in the worker), and Inception's head cannot
    take the small maps of images the eval-mode model takes (a RuntimeError). Here the heads never run and the
    model answers its main logits in every mode; their modules and weights stay, so an uploaded state dict
    trained with them loads as it is."""
    if not getattr(model, "aux_logits", False):
        return
    model.aux_logits = False
    for name in AUXILIARY_HEADS:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            head.forward = _no_output  # type: ignore[method-assign]
            head.never_runs = True  # type: ignore[assignment]


def runs_in_forward(model: nn.Module, name: str) -> bool:
    """False for the submodule ``name`` of ``model`` (a ``named_modules`` name) inside a head that never runs
    (:func:`_skip_auxiliary_heads`): a layer a repair picks by module order must not be one of those."""
    parts = name.split(".")
    module: nn.Module | None = model
    for part in parts:
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return True
        if getattr(module, "never_runs", False):
            return False
    return True


def _no_output(*_args: object) -> None:
    """The forward of a head that never runs (its caller reads ``None`` as "no auxiliary output")."""
    return None


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first ``Conv2d`` (the stem) for one with ``in_channels`` inputs, otherwise the same."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    kernel_size=child.kernel_size,  # type: ignore[arg-type]
                    stride=child.stride,  # type: ignore[arg-type]
                    padding=child.padding,  # type: ignore[arg-type]
                    dilation=child.dilation,  # type: ignore[arg-type]
                    groups=1,  # stems are plain convs; a depthwise stem could not keep its groups anyway
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                )
                setattr(parent, child_name, new)
                return
    raise ValueError(f"{type(model).__name__} has no Conv2d whose input could take {in_channels} channels")


