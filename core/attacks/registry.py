"""Attack names -> builders, and ``create_attack`` to build one by name with checked parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from core.attacks.badnets import BadNets
from core.attacks.base import NOT_PARAMS, Attack
from core.attacks.blended import Blended
from core.attacks.clb import CLB
from core.attacks.iab import IAB, train_iab
from core.attacks.lowfreq import LowFrequency
from core.attacks.sig import SIG
from core.attacks.wanet import WaNet
from core.ranges import check_params, field_types

ATTACKS: Mapping[str, Callable[..., Attack]] = MappingProxyType(
    {
        "badnets": BadNets,
        "blended": Blended,
        "sig": SIG,
        "wanet": WaNet,
        "lowfreq": LowFrequency,
        "lf": LowFrequency,  # BackdoorBench's name for it
        "clb": CLB,  # test trigger only; poison with core.attacks.clb.clb_poison_training_set
        "lc": CLB,  # BackdoorBench's name for it (label-consistent)
    }
)

# Attacks whose trigger is trained with the classifier: not data poisoning, so not a built-in trigger a spec
# can name (an untrained IAB has no trigger); the benchmark builds them with their training function.
TRAINED_ATTACKS: Mapping[str, Callable[..., tuple[object, IAB]]] = MappingProxyType(
    {"iab": train_iab, "inputaware": train_iab}  # "inputaware": BackdoorBench's name
)


def attack_param_types(name: str) -> dict[str, Any]:
    """The parameters ``attack.params`` may set for attack ``name``, with their ranged types."""
    return field_types(ATTACKS[name.lower()], NOT_PARAMS)  # type: ignore[arg-type]


def check_attack_params(name: str, params: Mapping[str, object]) -> dict[str, Any]:
    """``params`` checked against attack ``name``'s parameter names and ranges, before any image is seen
    (limits that depend on the image size, e.g. ``patch_size`` <= its side, are checked on creation); raises
    a pydantic ``ValidationError`` located at the parameter."""
    return check_params(f"attack {name!r}", attack_param_types(name), params)


def create_attack(
    name: str, *, target: int = 0, image_shape: tuple[int, int, int], seed: int = 0, **params: Any
) -> Attack:
    """The attack ``name`` for images of ``image_shape`` = ``(H, W, C)``.

    ``params`` are the attack's own settings (e.g. ``alpha`` for blended, ``all_to_all=True`` for any
    dirty-label attack), checked by :func:`check_attack_params`; ``seed`` fixes random patterns and is ignored
    by attacks without one. An unknown name, an unknown parameter or a bad value raises ``ValueError``.
    """
    try:
        builder = ATTACKS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown attack {name!r}; valid names: {', '.join(sorted(ATTACKS))}") from None
    checked = check_attack_params(name, params)
    kwargs: dict[str, Any] = {"image_shape": tuple(image_shape), "target": target, **checked}
    if "seed" in {f.name for f in dataclasses.fields(builder)}:  # type: ignore[arg-type]
        kwargs["seed"] = seed
    return builder(**kwargs)
