"""Attack names -> builders, and ``create_attack`` to build one by name with checked parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from core.attacks.badnets import BadNets
from core.attacks.base import Attack
from core.attacks.blended import Blended
from core.attacks.clb import CLB
from core.attacks.iab import IAB, train_iab
from core.attacks.lowfreq import LowFrequency
from core.attacks.sig import SIG
from core.attacks.wanet import WaNet

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


def create_attack(
    name: str, *, target: int = 0, image_shape: tuple[int, int, int], seed: int = 0, **params: Any
) -> Attack:
    """The attack ``name`` for images of ``image_shape`` = ``(H, W, C)``.

    ``params`` are the attack's own settings (e.g. ``alpha`` for blended, ``all_to_all=True`` for any
    dirty-label attack); ``seed`` fixes random patterns and is ignored by attacks without one. An unknown
    name, an unknown parameter or a bad value raises ``ValueError``.
    """
    try:
        builder = ATTACKS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown attack {name!r}; valid names: {', '.join(sorted(ATTACKS))}") from None
    allowed = {f.name for f in dataclasses.fields(builder) if f.init} - {"image_shape", "target", "seed"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for attack {name!r}; "
            f"valid: {', '.join(sorted(allowed))}"
        )
    kwargs: dict[str, Any] = {"image_shape": tuple(image_shape), "target": target, **params}
    if "seed" in {f.name for f in dataclasses.fields(builder)}:
        kwargs["seed"] = seed
    try:
        return builder(**kwargs)
    except TypeError as exc:  # e.g. a value of the wrong type reaching a comparison in validation
        raise ValueError(f"bad parameters for attack {name!r}: {exc}") from exc
