"""Detector names -> functions of a :class:`DetectContext`, registered by decorator."""

from __future__ import annotations

from collections.abc import Callable

from core.detect.base import DetectContext, DetectorResult

Detector = Callable[[DetectContext], DetectorResult]
DETECTORS: dict[str, Detector] = {}


def register(name: str) -> Callable[[Detector], Detector]:
    """Add ``fn`` to :data:`DETECTORS` under ``name`` (a name may be registered once)."""

    def wrap(fn: Detector) -> Detector:
        if name in DETECTORS:
            raise ValueError(f"detector {name!r} is already registered")
        DETECTORS[name] = fn
        return fn

    return wrap


def _register_builtins() -> None:
    from core.detect.feature_inversion import feature_inversion
    from core.detect.max_margin import max_margin
    from core.detect.neural_cleanse import neural_cleanse
    from core.detect.universal_perturbation import universal_perturbation
    from core.detect.unlearning import unlearning_concentration
    from core.detect.untargeted import untargeted

    register("neural_cleanse")(neural_cleanse)
    register("universal_perturbation")(universal_perturbation)
    register("untargeted")(untargeted)
    register("max_margin")(max_margin)
    register("feature_inversion")(feature_inversion)
    register("unlearning")(unlearning_concentration)


_register_builtins()
