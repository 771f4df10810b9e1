"""TSBD end to end: unlearn → NWC → (choose n) → zero re-initialise → activeness-aware fine-tune."""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.result import RepairResult
from core.defenses.runtime import (
    DeviceImages,
    cuda_sync,
    infer_num_classes,
    prepare_model,
    runtime_for,
    score,
)
from core.defenses.subset_filter import SubsetFilterConfig, filter_poisoned
from core.defenses.tsbd.auto import choose_neuron_ratio
from core.defenses.tsbd.config import TSBDConfig
from core.defenses.tsbd.finetune import activeness_aware_finetune
from core.defenses.tsbd.nwc import covered_conv_layers, neuron_weight_change
from core.defenses.tsbd.reinit import zero_reinitialize
from core.defenses.tsbd.unlearn import unlearn_clean
from core.progress import Progress


def tsbd_repair(model: nn.Module, clean: ImageSet, norm: Normalization, cfg: TSBDConfig,
                device: torch.device | str, progress: Progress | None = None,
                num_classes: int | None = None,
                subset_filter: SubsetFilterConfig | None = SubsetFilterConfig()) -> RepairResult:
    """Repair ``model`` with TSBD on the clean subset; ``cfg.neuron_ratio=None`` chooses ``n`` automatically
    from the clean subset (:func:`choose_neuron_ratio`). ``subset_filter`` (on unless ``None``) first drops
    the subset's images that sit apart from their class (:func:`filter_poisoned`), so that poisoned images
    in it cannot teach the backdoor back in stage 2. ``model`` is not modified; the result holds a new
    module on ``device`` in eval mode."""
    rt = runtime_for(device)
    progress = progress or Progress()
    progress.sync = cuda_sync(rt)
    progress.stage("setup", 0.0, 0.01)
    original = prepare_model(copy.deepcopy(model), rt).eval()
    filtered = filter_poisoned(original, clean, norm, rt, subset_filter) if subset_filter is not None else None
    data = DeviceImages(clean.subset(filtered.keep) if filtered is not None else clean, norm, rt)
    layers = covered_conv_layers(original, cfg.layer_exclude)
    if not layers:
        raise ValueError("the model has no Conv2d layer TSBD can work on")

    k = num_classes if num_classes is not None else infer_num_classes(original, data)
    # shares of the bar: unlearning and fine-tuning are the epochs; the rest are forward passes
    unlearned = unlearn_clean(original, data, norm, cfg, device, k, progress.stage("unlearn", 0.01, 0.3))
    progress.stage("nwc", 0.3, 0.31)
    nwc = neuron_weight_change(original, unlearned.model, layers)
    del unlearned.model  # only its weight changes are needed

    chosen: dict[str, object] = {}
    details: dict[str, object] = {"subset_filter": filtered.details if filtered is not None else {"applied": False}}
    n = cfg.neuron_ratio
    if n is None:
        choice = choose_neuron_ratio(original, nwc, data, cfg, k, progress.stage("choose_n", 0.31, 0.34))
        n = choice.n
        chosen = {"neuron_ratio": n, "rule": choice.rule}
        details["auto"] = choice.as_dict()
    progress.stage("zero_reinit", 0.34, 0.35)
    repaired, zsum = zero_reinitialize(original, nwc, n, cfg.weight_ratio)
    del original

    ft = activeness_aware_finetune(repaired, data, norm, cfg, device, progress.stage("finetune", 0.35, 0.99))
    progress.stage("final_eval", 0.99, 1.0)
    after = score(repaired, data)

    details.update({
        "unlearn": {"epochs": unlearned.epochs, "threshold": unlearned.threshold,
                    "clean_accuracy_before": unlearned.accuracy_before,
                    "clean_accuracy_after": unlearned.accuracy_after,
                    "reached_threshold": unlearned.reached_threshold},
        "nwc_summary": nwc.summary(),
        "zero_reinit": dataclasses.asdict(zsum),
        "finetune": dataclasses.asdict(ft),
        "clean_subset_after": {"accuracy": after.accuracy, "loss": after.loss},
    })
    params = dataclasses.asdict(cfg)
    params["neuron_ratio"] = n
    params["layers"] = layers
    return RepairResult(model=repaired.eval(), method="tsbd" if cfg.neuron_ratio is None else "tsbd_fixed",
                        params=params, chosen=chosen, timings=progress.finish(), details=details)
