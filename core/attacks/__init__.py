"""Backdoor attacks (trigger definitions) for evaluation and benchmarks, BackdoorBench conventions."""

from core.attacks.badnets import BadNets
from core.attacks.base import (
    Attack,
    BackdoorTestSet,
    PoisonedTrainingSet,
    make_backdoor_test_set,
    poison_training_set,
)
from core.attacks.blended import Blended
from core.attacks.lowfreq import LowFrequency
from core.attacks.registry import ATTACKS, create_attack
from core.attacks.sig import SIG
from core.attacks.wanet import WaNet

__all__ = [
    "ATTACKS",
    "Attack",
    "BackdoorTestSet",
    "BadNets",
    "Blended",
    "LowFrequency",
    "PoisonedTrainingSet",
    "SIG",
    "WaNet",
    "create_attack",
    "make_backdoor_test_set",
    "poison_training_set",
]
