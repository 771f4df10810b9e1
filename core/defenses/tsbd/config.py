"""Defaults of TSBD, each with its source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, Strict

from core.ranges import (
    MAX_EPOCHS,
    BatchSize,
    CropPadding,
    Epochs,
    Flag,
    LearningRate,
    Momentum,
    PositiveRatio,
    Ratio,
    check_fields,
    float_in,
    int_in,
)

# The reference's sweep over the neuron ratio n (tsbd.py loops over it; its user reads the poisoned ASR).
REFERENCE_N_SWEEP: tuple[float, ...] = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9)

AUTO_RULES = ("recovery", "width", "collapse", "retention")
# the reference's stage 2 sees 21 epochs x 2,500 images (5% of CIFAR-10): the budget the adaptive schedule keeps
REFERENCE_FINETUNE_IMAGES = 21 * 2_500
# ... in 21 x ceil(2,500 / 256) = 210 optimiser steps: the step budget of stage 2 stopped on held-out loss
REFERENCE_FINETUNE_STEPS = 21 * -(-2_500 // 256)
# each candidate costs one forward pass over the clean subset; a JSON number each (``"0.5"`` and ``true`` are
# refused), and distinct: a repeated n repeats its pass and its row of the sweep (checked in __post_init__)
Candidates = Annotated[tuple[Annotated[float, Strict(), Field(gt=0.0, le=1.0, allow_inf_nan=False)], ...],
                       Field(min_length=1, max_length=32)]
# substrings of the Conv2d names TSBD leaves alone: an empty one is in every name and would exclude them all
LayerNames = Annotated[tuple[Annotated[str, Field(min_length=1, max_length=200)], ...], Field(max_length=64)]


@dataclass(frozen=True)
class TSBDConfig:
    """Every knob of TSBD. ``neuron_ratio=None`` means: choose ``n`` automatically (see ``auto.py``)."""

    batch_size: BatchSize = 256  # tsbd/config.yaml: batch_size=256
    augment: Flag = True  # reference: training transform (random crop, padding 4, horizontal flip)
    # reference: RandomCrop(32, padding=4); None: scaled to the image, round(side / 8), at least 1 (8x8 -> 1)
    crop_padding: CropPadding | None = None
    # "auto": flip only when the model itself is flip-invariant on the clean subset (finetune.flip_sensible:
    # CIFAR yes, digits no); "on" is the reference
    augment_flip: Literal["auto", "on", "off"] = "auto"
    # Stage 1a, clean unlearning
    lr_unlearn: LearningRate = 1e-4  # tsbd/config.yaml: lr_un=1e-4 (SGD, momentum 0.9, no weight decay)
    unlearn_momentum: Momentum = 0.9  # tsbd.py: SGD momentum 0.9
    unlearn_margin: Ratio = 0.0  # reference stops at clean acc <= 0.10 = 1/10 exactly for CIFAR-10
    unlearn_max_epochs: int_in(1, MAX_EPOCHS) = 100  # not in the reference (it loops until the threshold); a safety cap
    # Stage 1b/1c
    layer_exclude: LayerNames = ("shortcut", "downsample")  # tsbd.py: Conv2d names without "shortcut";
    # "downsample" is torchvision's name for the same 1x1 projection
    neuron_ratio: Ratio | None = None  # n; reference sweeps REFERENCE_N_SWEEP, None = automatic choice
    weight_ratio: Ratio = 0.7  # tsbd/config.yaml: m=0.7 (fraction of the pooled |dW| set to zero)
    # Automatic choice of n (not in the reference; see auto.py)
    auto_candidates: Candidates = REFERENCE_N_SWEEP  # the values the reference's user chooses from
    auto_collapse_fraction: Ratio = 0.1  # collapsed = zeroed model keeps <= 10% of its above-chance accuracy
    # auto.py's evidence: resetting too little leaves 17-99% ASR (early H200 run: n <= 0.1 left 30-34% on
    # PreAct-ResNet18 BadNets; here MNIST Blended 40% at n=0.2, SIG 17%), resetting 0.5 instead of the best n
    # cost at most ~2 ACC points; the collapse point is early (0.05-0.15) and only ever raises n above 0.5
    auto_min_n: Ratio = 0.5
    auto_max_n: Ratio = 0.7  # MNIST BadNets: 0.7 cost no more ACC than 0.5; 8x8 digits: 0.9 cost 5 points more
    # "collapse": n = clip(collapse point, auto_min_n, auto_max_n) (above); "retention": n = the largest
    # candidate whose zeroed model keeps >= auto_retention of its above-chance accuracy, clipped to
    # [auto_retention_min_n, auto_retention_max_n] (auto.py: the GPU evidence on PreAct-ResNet18)
    # "width" (default): the retention rule on wide networks whose clean function survives zeroing (at least
    # auto_wide_channels covered channels and a collapse point >= auto_redundant_from), the collapse rule on
    # the others (auto.py has the evidence: PreAct-ResNet18 3,904 channels, collapse 0.25-0.7, wants small n;
    # a 6-layer CNN with 224 channels (collapse 0.01-0.15) and a 24-channel CNN (collapse 0.7) want n >= 0.5)
    # "recovery" (not in the reference; auto.py): probe n = auto_probes in increasing order, each with a short
    # stage 2 (auto_probe_epochs) on 1 - auto_holdout of the subset, and keep the largest n whose held-out
    # accuracy stays within max(auto_tolerance, one standard error) of the best probe so far
    auto_rule: Literal["recovery", "width", "collapse", "retention"] = "width"
    auto_wide_channels: int_in(0, 10**7) = 1000
    auto_redundant_from: Ratio = 0.2
    auto_retention: Ratio = 0.75
    auto_retention_min_n: Ratio = 0.05
    auto_retention_max_n: Ratio = 0.3
    auto_probes: Candidates = (0.1, 0.3, 0.5, 0.7)
    auto_probe_epochs: int_in(1, 50) = 2
    auto_holdout: float_in(0.05, 0.5) = 0.2
    auto_tolerance: Ratio = 0.01
    # "given" / "scan": a model the detector calls clean (core.detect's verdict, given by the pipeline, or
    # scanned here) is repaired gently or kept (clean_action) unless force_repair. Off by default: the detector
    # called a BadNets digits CNN with 100% ASR clean (BENCHMARKS.md §2.7), and a gate that trusts it leaves that
    # backdoor in place; a gentle repair of such a miss left 4.9% ASR where the full rule left 0.4% (§2.10)
    clean_check: Literal["off", "given", "scan"] = "off"
    force_repair: Flag = False
    # what a clean verdict does (issue 10, BENCHMARKS.md §2.10): "gentle" repairs it with the retention rule's
    # small n (auto_retention_min_n .. auto_retention_max_n) instead of the width/collapse rule's n >= 0.5: on
    # three clean MNIST CNNs it kept 97.5-98.0% accuracy where the full rule kept 94.5-94.9, and on the models
    # the detector missed it still repaired (MNIST WaNet 0.6% ASR, demo BadNets 1.1% / 4.9%), where "keep" (the
    # model returned unrepaired, the behaviour before) leaves the backdoor whole. Read only with a clean_check
    clean_action: Literal["keep", "gentle"] = "gentle"
    # after a gentle repair, scan the repaired model with the detector; while it is not called clean, repair
    # again from the original model with the next larger n of the ladder up to the full rule's n (at most
    # escalate_max_repairs repairs in all, each with one detector scan), stopping where the clean subset's accuracy
    # after stage 2 falls more than max(auto_tolerance, one standard error) below the best attempt. Off by
    # default (§2.10): it rescued no backdoor (the detector called every gently repaired missed model clean, at
    # 4.9% ASR on the demo's BadNets) and undid the gentleness on a clean digits model it flagged once repaired
    escalate: Flag = False
    escalate_max_repairs: int_in(1, 8) = 3
    # which pre-repair verdicts start gently: "clean" only, or "all" (a flagged model too: the closed loop of
    # issue 10, start small and raise n until the detector no longer flags the repaired model; with escalate)
    gentle_verdicts: Literal["clean", "all"] = "clean"
    # not in the reference: drop the subset's images that sit apart from their class before stage 1
    # (core/defenses/subset_filter.py), so poisoned images in a not-quite-clean subset cannot teach the backdoor
    # back in stage 2 (BENCHMARKS.md §2.8); a clean subset loses about 1% of its images
    subset_filter: Flag = True
    # Stage 2, activeness-aware fine-tuning
    lr_finetune: LearningRate = 0.01  # tsbd/config.yaml: lr_ft=0.01 (SGD, momentum 0.9, no weight decay)
    finetune_momentum: Momentum = 0.9  # tsbd.py: SGD momentum 0.9
    finetune_epochs: Epochs = 21  # tsbd/config.yaml: ft_epoch=20, and tsbd.py's loop runs ft_epoch + 1 = 21
    # tsbd.py: constant lr; "cosine" decays it to 0 over stage 2
    finetune_schedule: Literal["constant", "cosine"] = "constant"
    # not in the reference: epochs = min(finetune_epochs, max(finetune_min_epochs, REFERENCE_FINETUNE_IMAGES /
    # subset size)) and lr = lr_finetune * clip(damage, finetune_lr_floor, 1), damage = how far zeroing moved
    # the clean subset's loss from the original model's towards chance (finetune.stage2_schedule)
    finetune_adaptive: Flag = False
    finetune_min_epochs: Epochs = 5
    # 0.5: lr 0.005 kept ASR on PreAct-ResNet18 (BENCHMARKS.md §2.1, 2.6% vs 2.3%); 0.001 kept a digits BadNets
    finetune_lr_floor: PositiveRatio = 0.5
    # not in the reference (issue 10, BENCHMARKS.md §2.14): early stopping (Prechelt, "Early stopping - but when?",
    # 1998). Stage 2 trains on 1 - finetune_holdout of the clean subset, scores the held-out rest after every
    # epoch, keeps the weights of the epoch with the lowest held-out loss and stops after finetune_patience epochs
    # without a lower one; its budget is finetune_max_steps optimiser steps (the reference's 210 by default)
    # instead of the schedule's epochs. 0: off (stage 2 trains on the whole subset for the schedule's epochs).
    # Off by default: it cost TSBD 0.6-14.5 ACC points (mean 4.1) on CIFAR ResNet-20s (250 images) and MNIST CNNs
    # (500) against the default schedule, ASR up to +14 (BENCHMARKS.md §2.14: the held-out 20% is missing from
    # training, and 50-100 held-out images give a noisy loss)
    finetune_holdout: float_in(0.0, 0.5) = 0.0
    finetune_patience: int_in(1, MAX_EPOCHS) = 5
    finetune_max_steps: int_in(1, 100_000) = REFERENCE_FINETUNE_STEPS
    # not in the reference: share of each batch's highest-loss images stage 2
    finetune_trim: float_in(0.0, 0.5, open_high=True) = 0.0
    # leaves out (0 = the reference); against a "clean" subset with poisoned images in it (BENCHMARKS.md §3)
    rho: float_in(0.0, 10.0) = 0.05  # tsbd/config.yaml: r=0.05 (size of the gradient-direction shift)
    alpha: Ratio = 0.7  # tsbd/config.yaml: alpha=0.7 (weight of the shifted gradient)
    seed: int_in(0, 2**31 - 1) = 0

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("auto_candidates", "auto_probes"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                repeated = sorted({v for v in values if values.count(v) > 1})
                raise ValueError(f"{name} must not repeat a value (each costs a pass over the clean subset), "
                                 f"got {repeated} more than once")
        if self.clean_check == "off" and (self.escalate or self.gentle_verdicts == "all"):
            # both act on the detector's verdict, which clean_check off never reads: they would be ignored silently
            given = "escalate" if self.escalate else "gentle_verdicts 'all'"
            raise ValueError(f"{given} acts on the detector's verdict, which clean_check 'off' never reads: set "
                             "clean_check to 'given' or 'scan', or leave it out")
        if not 0.0 <= self.auto_retention_min_n <= self.auto_retention_max_n <= 1.0:
            raise ValueError("need auto_retention_min_n <= auto_retention_max_n")
        if not 0.0 <= self.auto_min_n <= self.auto_max_n <= 1.0:
            raise ValueError("need auto_min_n <= auto_max_n")
