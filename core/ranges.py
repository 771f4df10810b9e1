"""Typed, ranged parameters declared once on the config dataclasses and checked in one place.

A config field's annotation carries its range (``epochs: Epochs = 21``, ``alpha: Ratio = 0.7``); the same
annotation checks a client's JSON at submission (:func:`check_params`, whose errors name the parameter so
the API answers 422 at e.g. ``spec.repair.params.epochs``) and a config built in code (:func:`check_fields`,
called from ``__post_init__``). The bounds are what a real repair needs, so that a method's worst-case work
(epochs x images, bounded by ``DataLimits.max_images``) stays within reach of the scan time limit; the
methods also poll ``Progress.check()`` so the time limit still applies inside those bounds.

Bounds (docs/ lists them per method): epochs 0..``MAX_EPOCHS`` (300: 3x FT-SAM's 100, 14x TSBD's 21),
batch sizes 1..``MAX_BATCH_SIZE`` (4096), learning rates finite in [``MIN_LEARNING_RATE``, ``MAX_LEARNING_RATE``]
(1e-10: a smaller step is below float32's resolution of a weight of 0.01 even at unit gradient, so the run would
change nothing and still report a repair; 1.0: SGD diverges above it on normalised inputs), momentum in [0, 1),
weight decay in [0, 0.1], ratios in [0, 1].
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, Strict, ValidationError, create_model
from pydantic_core import InitErrorDetails, PydanticCustomError

MAX_EPOCHS = 300
MAX_BATCH_SIZE = 4096
MAX_LEARNING_RATE = 1.0
MIN_LEARNING_RATE = 1e-10

def has_control_character(text: str) -> bool:
    """Whether ``text`` holds an ASCII control character (C0 or DEL), the one rule for names and URLs a client
    sends: PostgreSQL's jsonb refuses a NUL, and escape sequences would be echoed to terminals and pages."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


Flag = Annotated[bool, Strict()]
"""A JSON boolean (``1`` or ``"yes"`` is refused)."""
Epochs = Annotated[int, Strict(), Field(ge=0, le=MAX_EPOCHS)]
"""Passes over the clean subset: a whole number in [0, MAX_EPOCHS]."""
BatchSize = Annotated[int, Strict(), Field(ge=1, le=MAX_BATCH_SIZE)]
"""Images per step: a whole number in [1, MAX_BATCH_SIZE]."""
LearningRate = Annotated[float, Strict(), Field(ge=MIN_LEARNING_RATE, le=MAX_LEARNING_RATE, allow_inf_nan=False)]
"""An SGD step size: finite, in [MIN_LEARNING_RATE, MAX_LEARNING_RATE] (5e-324 would be a repair that changes
nothing)."""
Momentum = Annotated[float, Strict(), Field(ge=0.0, lt=1.0, allow_inf_nan=False)]
"""SGD momentum in [0, 1)."""
WeightDecay = Annotated[float, Strict(), Field(ge=0.0, le=0.1, allow_inf_nan=False)]
"""L2 weight decay in [0, 0.1]."""
Ratio = Annotated[float, Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False)]
"""A fraction in [0, 1]."""
PositiveRatio = Annotated[float, Strict(), Field(gt=0.0, le=1.0, allow_inf_nan=False)]
"""A fraction in (0, 1]."""
CropPadding = Annotated[int, Strict(), Field(ge=0, le=32)]
"""Pixels of padding of the random-crop augmentation, in [0, 32]."""


def int_in(lo: int, hi: int) -> Any:
    """A whole number in [lo, hi] (JSON ``2.5`` and ``true`` are refused)."""
    return Annotated[int, Strict(), Field(ge=lo, le=hi)]


def float_in(lo: float, hi: float, *, open_low: bool = False, open_high: bool = False) -> Any:
    """A finite number in [lo, hi], with either end open on request."""
    bounds = {"gt" if open_low else "ge": lo, "lt" if open_high else "le": hi}
    return Annotated[float, Strict(), Field(allow_inf_nan=False, **bounds)]


def field_types(cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The annotations (ranges included) of a dataclass's ``__init__`` fields, less ``skip``."""
    return dict(_field_types(cls, skip))


@cache
def _field_types(cls: type, skip: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    # cached: string annotations are evaluated anew on each call, and new objects would miss _model's cache
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init and f.name not in skip)


@cache
def _model(owner: str, fields: tuple[tuple[str, Any], ...]) -> Any:
    """A pydantic model with one optional field per parameter, each checked against its annotation."""
    return create_model(f"{owner} parameters", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
                        **{name: (tp, None) for name, tp in fields})


def check_params(owner: str, types: Mapping[str, Any], params: Mapping[str, object]) -> dict[str, Any]:
    """``params`` checked against ``types`` (lists become tuples where a tuple is expected); raises a pydantic
    ``ValidationError`` (a ``ValueError``) whose locations are the parameter names, an unknown name with the
    list of valid ones."""
    unknown = [key for key in params if key not in types]
    if unknown:
        valid = ", ".join(sorted(types))
        raise ValidationError.from_exception_data(f"{owner} parameters", [InitErrorDetails(
            # the message goes in as a value: a client's key with braces in it is not a template
            type=PydanticCustomError("unknown_parameter", "{message}",
                                     {"message": f"unknown parameter {key!r} for {owner}; valid: {valid}"}),
            loc=(key,), input=params[key]) for key in unknown])
    model = _model(owner, tuple((name, types[name]) for name in sorted(types)))
    checked = model.model_validate(dict(params))
    return {key: getattr(checked, key) for key in params}


def check_fields(obj: object, skip: tuple[str, ...] = ()) -> None:
    """Check a config dataclass built in code against its own field ranges (from ``__post_init__``)."""
    cls = type(obj)
    types = field_types(cls, skip)
    check_params(cls.__name__, types, {name: getattr(obj, name) for name in types})


def describe(tp: Any) -> str:
    """A reader's description of a ranged annotation: ``whole number in [0, 300]``, ``list of 1-32 …``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        parts = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(describe(a) for a in parts) + (" or null" if len(parts) < len(typing.get_args(tp)) else "")
    bounds: dict[str, Any] = {}
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        for extra in extras:
            for item in getattr(extra, "metadata", [extra]):
                for key in ("ge", "gt", "le", "lt", "min_length", "max_length"):
                    if hasattr(item, key):
                        bounds[key] = getattr(item, key)
        tp = base
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(f"`{v!r}`" for v in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        count = f"{bounds.get('min_length', 0)}-{bounds['max_length']} " if "max_length" in bounds else ""
        return f"list of {count}({describe(typing.get_args(tp)[0])})"
    name = {bool: "true or false", int: "whole number", float: "finite number", str: "text"}.get(tp, str(tp))
    if tp is str and "max_length" in bounds:
        return f"text of at most {bounds['max_length']} characters"
    if not {"ge", "gt", "le", "lt"} & set(bounds):
        return name
    low = f"[{_num(bounds['ge'])}" if "ge" in bounds else f"({_num(bounds.get('gt', '-inf'))}"
    high = f"{_num(bounds['le'])}]" if "le" in bounds else f"{_num(bounds.get('lt', 'inf'))})"
    return f"{name} in {low}, {high}"


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
