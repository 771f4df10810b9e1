"""Every knob of the trigger-free detectors, each with its default's source and its allowed range."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DEFAULT_DETECTORS: tuple[str, ...] = ("neural_cleanse", "max_margin")


@dataclass(frozen=True)
class DetectConfig:
    """Settings of :func:`core.detect.scan_model`; every numeric field is range-checked on construction."""

    detectors: tuple[str, ...] = DEFAULT_DETECTORS  # which registered detectors run (core.detect.registry)
    max_images: int = 2500  # clean images used at most (a seeded random subset beyond that)
    # Neural Cleanse (Wang et al. 2019; their code: Adam lr 0.1 betas (0.5, 0.9), init_cost 1e-3, target
    # attack success 0.99, patience 5, cost multiplier 1.5, early stop after 10 epochs without 1% improvement)
    nc_batch_size: int = 16  # clean images per class per step (K x this many in one forward pass)
    nc_steps: int = 300  # optimisation steps at most
    nc_lr: float = 0.1
    nc_init_cost: float = 1e-3
    nc_target_success: float = 0.99
    nc_patience: int = 5  # steps above/below the target success before the cost moves
    nc_cost_multiplier: float = 1.5
    nc_early_stop_patience: int = 60  # steps without a 1% smaller best mask (every class) end the search
    anomaly_threshold: float = 2.0  # MAD anomaly index above which a class is flagged (NC's value)
    # MM-BD (Wang et al. 2024): maximum achievable logit margin per class from random starts
    mm_starts: int = 8  # random starting images per class (the paper uses 30; 8 gave the same maxima here)
    mm_steps: int = 150  # Adam steps per start
    mm_lr: float = 0.05  # Adam learning rate on the unconstrained image parameters
    p_value: float = 0.05  # MM-BD's order-statistic p-value below which the model is flagged
    # verdict: "backdoored" when a detector's score (statistic over its threshold; NC: index / 2, MM-BD:
    # log p / log p_value) reaches this, or two detectors flag; "suspicious" when one flags (docs/detect.md)
    strong_factor: float = 1.5
    # the detectors whose flags make the verdict; the others are run and reported as evidence only. MM-BD
    # does not vote: on the CPU benchmark it flagged 4 of 5 clean models (MNIST's naturally wide class 8,
    # p down to 1e-7) and caught no backdoor that Neural Cleanse missed (docs/detect.md#measured)
    voting_detectors: tuple[str, ...] = ("neural_cleanse",)
    # the voting detectors whose strong score alone says "backdoored"
    strong_detectors: tuple[str, ...] = ("neural_cleanse",)
    # TSBD's cheap signal (not run by default: it adds no information on the benchmark, docs/detect.md)
    unlearn_lr: float = 1e-3
    unlearn_max_epochs: int = 20

    def __post_init__(self) -> None:
        from core.detect.registry import DETECTORS  # late: the registry imports the detectors, which import us

        object.__setattr__(self, "detectors", tuple(self.detectors))
        object.__setattr__(self, "strong_detectors", tuple(self.strong_detectors))
        object.__setattr__(self, "voting_detectors", tuple(self.voting_detectors))
        unknown = [d for d in (*self.detectors, *self.strong_detectors, *self.voting_detectors)
                   if d not in DETECTORS]
        if unknown:
            raise ConfigError("detectors", f"unknown detector(s) {unknown}; valid: {sorted(DETECTORS)}")
        if not self.detectors:
            raise ConfigError("detectors", "name at least one detector (switch detection off in the spec instead)")
        if not set(self.voting_detectors) & set(self.detectors):
            raise ConfigError("voting_detectors", f"none of {list(self.voting_detectors)} is in detectors "
                                                  f"{list(self.detectors)}: nothing would make the verdict")
        for name, (lo, hi) in _RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
                raise ConfigError(name, f"must lie in [{lo}, {hi}], got {value!r}")

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> DetectConfig:
        """A config from JSON-like ``params``; an unknown key raises :class:`ConfigError` naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in params:
            if key not in names:
                raise ConfigError(key, f"unknown detect parameter; valid: {sorted(names)}")
        return cls(**params)


class ConfigError(ValueError):
    """A bad detect setting; ``field`` names it, for the API's ``{"detail", "field"}`` answer."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


_RANGES: dict[str, tuple[float, float]] = {
    "max_images": (10, 200_000),
    "nc_batch_size": (1, 1024),
    "nc_steps": (1, 100_000),
    "nc_lr": (1e-5, 10.0),
    "nc_init_cost": (0.0, 10.0),
    "nc_target_success": (0.5, 1.0),
    "nc_patience": (1, 10_000),
    "nc_cost_multiplier": (1.01, 10.0),
    "nc_early_stop_patience": (1, 100_000),
    "anomaly_threshold": (0.5, 20.0),
    "mm_starts": (1, 1024),
    "mm_steps": (1, 100_000),
    "mm_lr": (1e-5, 10.0),
    "p_value": (1e-12, 0.5),
    "strong_factor": (1.0, 100.0),
    "unlearn_lr": (1e-6, 1.0),
    "unlearn_max_epochs": (1, 1000),
}
