"""Every knob of the trigger-free detectors, each with its default's source and its range (core/ranges.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from core.ranges import check_fields, float_in, int_in

Combination = Literal["cauchy", "bonferroni"]
"""How the voting detectors' p-values merge (core/detect/verdict.py)."""

DEFAULT_DETECTORS: tuple[str, ...] = ("neural_cleanse", "universal_perturbation", "untargeted", "feature_inversion")
DetectorNames = Annotated[tuple[str, ...], Field(max_length=16)]
"""Registered detector names (core/detect/registry.py)."""
FamilyNames = Annotated[tuple[str, ...], Field(min_length=1, max_length=2)]
"""Trigger families of the untargeted test: ``patch`` (Neural Cleanse's), ``additive`` (the universal
perturbation's)."""


@dataclass(frozen=True)
class DetectConfig:
    """Settings of :func:`core.detect.scan_model`; every field is range-checked on construction."""

    detectors: DetectorNames = DEFAULT_DETECTORS  # which registered detectors run (core.detect.registry)
    max_images: int_in(10, 200_000) = 2500  # clean images used at most (a seeded random subset beyond that)
    # Neural Cleanse (Wang et al. 2019; their code: Adam lr 0.1 betas (0.5, 0.9), init_cost 1e-3, target
    # attack success 0.99, patience 5, cost multiplier 1.5, early stop after 10 epochs without 1% improvement)
    nc_batch_size: int_in(1, 1024) = 16  # clean images per class per step (K x this a step, in class chunks past 4096)
    nc_steps: int_in(1, 100_000) = 300  # optimisation steps at most
    nc_lr: float_in(1e-5, 10.0) = 0.1
    nc_init_cost: float_in(0.0, 10.0) = 1e-3
    nc_target_success: float_in(0.5, 1.0) = 0.99  # also the universal perturbation's
    nc_patience: int_in(1, 10_000) = 5  # steps above/below the target success before the cost moves (both)
    nc_cost_multiplier: float_in(1.01, 10.0) = 1.5  # both inversions
    nc_early_stop_patience: int_in(1, 100_000) = 60  # steps without a 1% smaller best (every class) end a search
    # the universal additive perturbation (the same batched search and schedule; its size is ||d||_2 in
    # [0, 1] pixel units, whose balance against the cross-entropy needs a larger first cost than NC's L1)
    up_steps: int_in(1, 100_000) = 300
    up_lr: float_in(1e-5, 10.0) = 0.02
    up_init_cost: float_in(0.0, 10.0) = 1e-2
    # the untargeted (all-to-all) test: the smallest trigger shared by all images that moves each off its label,
    # per family, with that family's targeted schedule; its size against the family's targeted class sizes
    ut_families: FamilyNames = ("patch",)
    # its step limit: this x its family's. 1 gives u the targeted triggers' budget, which the null's comparison
    # assumes; more steps (one trigger costs 1/K of a targeted step) shrink u against step-limited s_k — on the
    # CPU benchmark 4x turned the all-to-all model's p 0.20 into 0.026, a bias the null does not know
    ut_steps_factor: int_in(1, 20) = 1
    # the untargeted trigger's map has no dominant label (an all-to-all backdoor: the verdict is at least
    # "suspicious") when it sends the sources to more than this fraction of the K classes as distinct labels;
    # 1.0 switches the rule off, and it never applies below 6 classes. Half: a natural universal perturbation's
    # dominant label (plus the label its own images go to) leaves 2-3 labels of 10 on every clean model
    # measured, a permutation 7-8 (docs/detect.md; a rule, not a p-value: its false-alarm rate is measured)
    ut_spread_fraction: float_in(0.0, 1.0) = 0.5
    # feature-space inversion (FeatureRE / BTI-DBF's idea): the smallest universal additive change of the
    # feature map before global pooling (fi_depth 1.0; a smaller fraction picks an earlier 4-D map), size in
    # units of the clean activations' RMS there
    fi_steps: int_in(1, 100_000) = 300
    fi_batch_size: int_in(1, 1024) = 32  # clean images per step, shared by the K classes (the K x this changed
    # activations past the layer cost far less than NC's K x nc_batch_size full passes, so more images fit)
    fi_lr: float_in(1e-5, 10.0) = 0.05
    fi_init_cost: float_in(0.0, 10.0) = 0.1
    fi_depth: float_in(0.0, 1.0) = 1.0
    # MM-BD (Wang et al. 2024): maximum achievable logit margin per class from random starts
    mm_starts: int_in(1, 1024) = 8  # random starting images per class (the paper uses 30)
    mm_steps: int_in(1, 100_000) = 150  # Adam steps per start
    mm_lr: float_in(1e-5, 10.0) = 0.05  # Adam learning rate on the unconstrained image parameters
    # the tests' level: a detector flags when its p-value is below it; the verdict is "suspicious" when the
    # voting detectors' combined p-value is below it, "backdoored" below strong_p_value — under the null each
    # level bounds the false-alarm rate (the Cauchy combination's by simulation: 0.050-0.056 at 0.05 for three
    # correlated detectors, docs/detect.md)
    p_value: float_in(1e-12, 0.5) = 0.05
    strong_p_value: float_in(1e-12, 0.5) = 0.01
    # how the voting detectors' p-values merge: "cauchy" (the Cauchy combination test, ACAT: valid in the tail
    # under arbitrary dependence; agreeing detectors strengthen each other) or "bonferroni" (m x the smallest)
    combination: Combination = "cauchy"
    # the detectors whose p-values make the verdict; the others are run and reported as evidence only. MM-BD
    # does not vote: on the CPU benchmark it flagged 4 of 5 clean models (MNIST's naturally wide class 8).
    # The feature inversion votes since the Cauchy combination (under Bonferroni a third term cost IAB its
    # "backdoored" and caught nothing; under the Cauchy combination 5 of 7 WaNet models, two at p 0.0499, and
    # two held-out IAB/BadNets models move to "backdoored"; no false alarm on 20 clean, BENCHMARKS.md §6.3). The
    # untargeted test's p-value does not vote (0.20 on the all-to-all model at equal step budgets; a p of 1,
    # "not comparable", is its usual answer); its map's dominant-label rule does (ut_spread_fraction)
    voting_detectors: DetectorNames = ("neural_cleanse", "universal_perturbation", "feature_inversion")
    # TSBD's cheap signal (not run by default: it adds no information on the benchmark, docs/detect.md)
    unlearn_lr: float_in(1e-6, 1.0) = 1e-3
    unlearn_max_epochs: int_in(1, 1000) = 20

    def __post_init__(self) -> None:
        from core.detect.registry import DETECTORS  # late: the registry imports the detectors, which import us

        for name in ("detectors", "voting_detectors", "ut_families"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple) or not all(isinstance(x, str) for x in value):
                raise ConfigError(name, f"must be a list of names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        try:
            check_fields(self)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err.get("loc") else "detect"
            raise ConfigError(field, f"{err['msg']}, got {err.get('input')!r}") from None
        bad = [f for f in self.ut_families if f not in ("patch", "additive")]
        if bad or len(set(self.ut_families)) != len(self.ut_families):
            raise ConfigError("ut_families", f"name each of 'patch', 'additive' at most once, got "
                                             f"{list(self.ut_families)}")
        for name in ("detectors", "voting_detectors"):
            unknown = [d for d in getattr(self, name) if d not in DETECTORS]
            if unknown:
                raise ConfigError(name, f"unknown detector(s) {[d[:64] for d in unknown[:5]]}; valid: "
                                        f"{sorted(DETECTORS)}")
            names = getattr(self, name)
            if len(set(names)) != len(names):  # a detector named twice would run (and cost) twice
                raise ConfigError(name, f"name each detector at most once, got {list(names)}")
        if not self.detectors:
            raise ConfigError("detectors", "name at least one detector (switch detection off in the spec instead)")
        if not set(self.voting_detectors) & set(self.detectors):
            raise ConfigError("voting_detectors", f"none of {list(self.voting_detectors)} is in detectors "
                                                  f"{list(self.detectors)}: nothing would make the verdict")
        if self.strong_p_value > self.p_value:
            raise ConfigError("strong_p_value", f"must not exceed p_value ({self.p_value}), got "
                                                f"{self.strong_p_value}")

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
