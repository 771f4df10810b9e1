"""TSBD (Lin et al., NeurIPS 2024): clean unlearning, neuron weight change, zero re-initialisation and
activeness-aware fine-tuning, plus an automatic choice of the neuron ratio ``n`` from clean data alone."""

from core.defenses.tsbd.auto import AutoChoice, SweepPoint, choose_neuron_ratio, zeroing_sweep
from core.defenses.tsbd.config import REFERENCE_N_SWEEP, TSBDConfig
from core.defenses.tsbd.finetune import FinetuneResult, activeness_aware_finetune, activeness_aware_step
from core.defenses.tsbd.nwc import NWC, covered_conv_layers, neuron_weight_change
from core.defenses.tsbd.reinit import ZeroSummary, apply_zero_masks, zero_masks, zero_reinitialize
from core.defenses.tsbd.repair import tsbd_repair
from core.defenses.tsbd.unlearn import UnlearnResult, unlearn_clean, unlearn_threshold

__all__ = [
    "NWC", "REFERENCE_N_SWEEP", "AutoChoice", "FinetuneResult", "SweepPoint", "TSBDConfig", "UnlearnResult",
    "ZeroSummary", "activeness_aware_finetune", "activeness_aware_step", "apply_zero_masks",
    "choose_neuron_ratio", "covered_conv_layers", "neuron_weight_change", "tsbd_repair", "unlearn_clean",
    "unlearn_threshold", "zero_masks", "zero_reinitialize", "zeroing_sweep",
]
