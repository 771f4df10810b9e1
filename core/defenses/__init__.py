"""Backdoor repair methods: TSBD (automatic and fixed-n) and the baselines, behind one registry.

``repair(method, model, clean, norm, params, device, num_classes, seed, progress)`` runs a method by name;
``REPAIR_METHODS`` lists them with their parameter names and types.
"""

from core.defenses.registry import REPAIR_METHODS, repair, validate_params
from core.defenses.result import RepairResult

__all__ = ["REPAIR_METHODS", "RepairResult", "repair", "validate_params"]
