"""Strict weight loading: a state dict must match the architecture key for key and shape for shape.

The check runs on a ``meta``-device model, so the API can answer a bad upload at once without allocating
weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from core.models.checkpoint.tensors import tensor_problem
from core.models.registry import shape_model

_LIST_LIMIT = 10


class WeightsError(ValueError):
    """A state dict that cannot be loaded into the model."""


class ArchitectureMismatchError(WeightsError):
    """Keys or shapes of a state dict differ from those of the architecture."""


class NonFiniteWeightsError(WeightsError):
    """Some weights are NaN or infinite: a repair or evaluation on them would be meaningless."""


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without the leading ``module.`` that ``DataParallel``/DDP add to every key."""
    if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def check_state_dict(
    architecture: str, num_classes: int, in_channels: int, state_dict: Mapping[str, torch.Tensor]
) -> None:
    """Raise :class:`ArchitectureMismatchError` or :class:`NonFiniteWeightsError` unless ``state_dict`` loads
    strictly into ``create_model(architecture, num_classes, in_channels)``."""
    model = shape_model(architecture, num_classes, in_channels)
    _check(model, strip_module_prefix(state_dict), _describe(architecture, num_classes, in_channels))


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str | None = None) -> None:
    """Copy ``state_dict`` into ``model`` strictly, after the same checks as :func:`check_state_dict`.

    ``name`` (e.g. the architecture) only makes the error message clearer.
    """
    sd = strip_module_prefix(state_dict)
    _check(model, sd, name or type(model).__name__)
    model.load_state_dict(sd, strict=True)


def _describe(architecture: str, num_classes: int, in_channels: int) -> str:
    return f"{architecture} (num_classes={num_classes}, in_channels={in_channels})"


def _check(model: nn.Module, state_dict: dict[str, torch.Tensor], described: str) -> None:
    expected = model.state_dict()
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ArchitectureMismatchError(
            f"state dict values must be tensors; {_listing(not_tensors, 'entry', 'entries')} are not"
        )
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)
    ]
    # a float weight must come as floats (integers there mean a wrong or hostile file), and an integer or
    # boolean buffer as the same kind
    bad_dtype = [
        f"{k} expected {expected[k].dtype}, got {state_dict[k].dtype}"
        for k in expected
        if k in state_dict and not _dtype_compatible(expected[k].dtype, state_dict[k].dtype)
    ]
    if missing or unexpected or mismatched or bad_dtype:
        parts = []
        if missing:
            parts.append(_listing(missing, "missing key", "missing keys"))
        if unexpected:
            parts.append(_listing(unexpected, "unexpected key", "unexpected keys"))
        if mismatched:
            parts.append(_listing(mismatched, "shape mismatch", "shape mismatches"))
        if bad_dtype:
            parts.append(_listing(bad_dtype, "dtype mismatch", "dtype mismatches"))
        raise ArchitectureMismatchError(f"state dict does not match {described}: " + "; ".join(parts))
    # meta, sparse, quantized or nested tensors match keys and shapes but break every read of their values
    unusable = [f"{k} {p}" for k, v in state_dict.items() if (p := tensor_problem(v)) is not None]
    if unusable:
        raise WeightsError(f"state dict holds unusable tensors: {_listing(unusable, 'tensor', 'tensors')}")
    non_finite = [
        k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if non_finite:
        raise NonFiniteWeightsError(
            f"state dict holds NaN or infinite values in {_listing(non_finite, 'tensor', 'tensors')}"
        )
    # finite, but batch norm divides by its square root: every output of the model would be NaN (and every
    # score of the report with it)
    negative_var = [k for k, v in state_dict.items()
                    if k.endswith("running_var") and v.is_floating_point() and bool((v < 0).any())]
    if negative_var:
        raise NonFiniteWeightsError(
            f"state dict holds negative batch-norm running variances in {_listing(negative_var, 'tensor', 'tensors')}"
        )


def _dtype_compatible(expected: torch.dtype, got: torch.dtype) -> bool:
    if got.is_complex or got == torch.bool or expected == torch.bool:
        return expected == got
    return expected.is_floating_point == got.is_floating_point


def _listing(items: list[str], singular: str, plural: str) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = f" (and {len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
    return f"{len(items)} {singular if len(items) == 1 else plural}: {shown}{more}"
