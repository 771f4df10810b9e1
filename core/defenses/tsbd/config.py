"""Defaults of TSBD, each with its source."""

from __future__ import annotations

from dataclasses import dataclass

# The reference's sweep over the neuron ratio n (tsbd.py loops over it; its user reads the poisoned ASR).
REFERENCE_N_SWEEP: tuple[float, ...] = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9)

AUTO_RULES = ("width", "collapse", "retention")


@dataclass(frozen=True)
class TSBDConfig:
    """Every knob of TSBD. ``neuron_ratio=None`` means: choose ``n`` automatically (see ``auto.py``)."""

    batch_size: int = 256  # tsbd/config.yaml: batch_size=256
    augment: bool = True  # reference: training transform (random crop, padding 4, horizontal flip)
    crop_padding: int = 4  # reference: RandomCrop(32, padding=4)
    # Stage 1a, clean unlearning
    lr_unlearn: float = 1e-4  # tsbd/config.yaml: lr_un=1e-4 (SGD, momentum 0.9, no weight decay)
    unlearn_momentum: float = 0.9  # tsbd.py: SGD momentum 0.9
    unlearn_margin: float = 0.0  # reference stops at clean acc <= 0.10 = 1/10 exactly for CIFAR-10
    unlearn_max_epochs: int = 100  # not in the reference (it loops until the threshold); a safety cap
    # Stage 1b/1c
    layer_exclude: tuple[str, ...] = ("shortcut", "downsample")  # tsbd.py: Conv2d names without "shortcut";
    # "downsample" is torchvision's name for the same 1x1 projection
    neuron_ratio: float | None = None  # n; reference sweeps REFERENCE_N_SWEEP, None = automatic choice
    weight_ratio: float = 0.7  # tsbd/config.yaml: m=0.7 (fraction of the pooled |dW| set to zero)
    # Automatic choice of n (not in the reference; see auto.py)
    auto_candidates: tuple[float, ...] = REFERENCE_N_SWEEP  # the values the reference's user chooses from
    auto_collapse_fraction: float = 0.1  # collapsed = zeroed model keeps <= 10% of its above-chance accuracy
    # auto.py's evidence: resetting too little leaves 17-99% ASR (early H200 run: n <= 0.1 left 30-34% on
    # PreAct-ResNet18 BadNets; here MNIST Blended 40% at n=0.2, SIG 17%), resetting 0.5 instead of the best n
    # cost at most ~2 ACC points; the collapse point is early (0.05-0.15) and only ever raises n above 0.5
    auto_min_n: float = 0.5
    auto_max_n: float = 0.7  # MNIST BadNets: 0.7 cost no more ACC than 0.5; 8x8 digits: 0.9 cost 5 points more
    # "collapse": n = clip(collapse point, auto_min_n, auto_max_n) (above); "retention": n = the largest
    # candidate whose zeroed model keeps >= auto_retention of its above-chance accuracy, clipped to
    # [auto_retention_min_n, auto_retention_max_n] (auto.py: the GPU evidence on PreAct-ResNet18)
    # "width" (default): the retention rule on wide networks whose clean function survives zeroing (at least
    # auto_wide_channels covered channels and a collapse point >= auto_redundant_from), the collapse rule on
    # the others (auto.py has the evidence: PreAct-ResNet18 3,904 channels, collapse 0.25-0.7, wants small n;
    # a 6-layer CNN with 224 channels (collapse 0.01-0.15) and a 24-channel CNN (collapse 0.7) want n >= 0.5)
    auto_rule: str = "width"
    auto_wide_channels: int = 1000
    auto_redundant_from: float = 0.2
    auto_retention: float = 0.75
    auto_retention_min_n: float = 0.05
    auto_retention_max_n: float = 0.3
    # Stage 2, activeness-aware fine-tuning
    lr_finetune: float = 0.01  # tsbd/config.yaml: lr_ft=0.01 (SGD, momentum 0.9, no weight decay)
    finetune_momentum: float = 0.9  # tsbd.py: SGD momentum 0.9
    finetune_epochs: int = 21  # tsbd/config.yaml: ft_epoch=20, and tsbd.py's loop runs ft_epoch + 1 = 21
    finetune_schedule: str = "constant"  # tsbd.py: constant lr; "cosine" decays it to 0 over stage 2
    finetune_trim: float = 0.0  # not in the reference: share of each batch's highest-loss images stage 2
    # leaves out (0 = the reference); against a "clean" subset with poisoned images in it (BENCHMARKS.md §3)
    rho: float = 0.05  # tsbd/config.yaml: r=0.05 (size of the gradient-direction shift)
    alpha: float = 0.7  # tsbd/config.yaml: alpha=0.7 (weight of the shifted gradient)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.neuron_ratio is not None and not 0.0 <= self.neuron_ratio <= 1.0:
            raise ValueError("neuron_ratio must lie in [0, 1]")
        if not 0.0 <= self.weight_ratio <= 1.0:
            raise ValueError("weight_ratio must lie in [0, 1]")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must lie in [0, 1]")
        if self.rho < 0 or self.lr_unlearn <= 0 or self.lr_finetune <= 0:
            raise ValueError("rho must be >= 0 and learning rates > 0")
        if not 0.0 <= self.finetune_trim < 0.5:
            raise ValueError("finetune_trim must lie in [0, 0.5)")
        if self.finetune_schedule not in ("constant", "cosine"):
            raise ValueError("finetune_schedule must be 'constant' or 'cosine'")
        if not self.auto_candidates or any(not 0.0 < c <= 1.0 for c in self.auto_candidates):
            raise ValueError("auto_candidates must be a non-empty tuple of values in (0, 1]")
        if not 0.0 <= self.auto_collapse_fraction <= 1.0:
            raise ValueError("auto_collapse_fraction must lie in [0, 1]")
        if self.auto_rule not in AUTO_RULES:
            raise ValueError(f"auto_rule must be one of {', '.join(AUTO_RULES)}")
        if self.auto_wide_channels < 0 or not 0.0 <= self.auto_redundant_from <= 1.0:
            raise ValueError("auto_wide_channels must be >= 0 and auto_redundant_from in [0, 1]")
        if not 0.0 <= self.auto_retention <= 1.0:
            raise ValueError("auto_retention must lie in [0, 1]")
        if not 0.0 <= self.auto_retention_min_n <= self.auto_retention_max_n <= 1.0:
            raise ValueError("need 0 <= auto_retention_min_n <= auto_retention_max_n <= 1")
        if not 0.0 <= self.auto_min_n <= self.auto_max_n <= 1.0:
            raise ValueError("need 0 <= auto_min_n <= auto_max_n <= 1")
        if self.unlearn_max_epochs < 1 or self.finetune_epochs < 0:
            raise ValueError("unlearn_max_epochs must be >= 1 and finetune_epochs >= 0")
