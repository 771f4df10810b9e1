"""The one entry point the pipeline calls: every configured detector on one model, then the verdict."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.detect.base import STEP_BYTES, DetectContext, DetectorResult, ProgressFn, StopFn, frozen_model
from core.detect.config import DetectConfig
from core.detect.registry import DETECTORS
from core.detect.verdict import combine

MIN_IMAGES = 10  # fewer clean images than this cannot estimate an attack success rate of 99%


@dataclass
class DetectionResult:
    """The verdict, the JSON-ready evidence, and the inverted triggers of suspected classes (uint8 H×W×C)."""

    verdict: str
    score: float
    suspected_targets: list[int]
    evidence: dict[str, Any]
    trigger_images: dict[int, np.ndarray] = field(default_factory=dict)
    detectors: dict[str, DetectorResult] = field(default_factory=dict)


def scan_model(model: nn.Module, clean: ImageSet, norm: Normalization, config: DetectConfig | None = None,
               device: torch.device | str = "cpu", num_classes: int | None = None, seed: int = 0,
               progress: ProgressFn | None = None, should_stop: StopFn | None = None,
               max_step_bytes: int = STEP_BYTES) -> DetectionResult:
    """Run ``config.detectors`` on ``model`` (already on ``device``) with at most ``config.max_images`` of the
    ``clean`` images; ``progress(fraction)`` is called as work advances and ``should_stop()`` polled between
    steps (raising :class:`core.detect.DetectionStopped`). The model's modes and gradient flags are restored.
    ``max_step_bytes``: the float32 bytes one step's stamped inputs may take before its classes run in chunks
    (the service passes its operator's allocation bound, ``ANTIDOTE_MAX_ZIP_EXPANDED_BYTES``)."""
    cfg = config or DetectConfig()
    if len(clean) < MIN_IMAGES:
        raise ValueError(f"the detector needs at least {MIN_IMAGES} clean images, got {len(clean)}")
    dev = torch.device(device)
    if num_classes is None:
        num_classes = int(clean.y.max()) + 1
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if max_step_bytes < 1:
        raise ValueError(f"max_step_bytes must be positive, got {max_step_bytes}")
    if int(clean.y.max()) >= num_classes or int(clean.y.min()) < 0:
        raise ValueError(f"clean labels must lie in [0, {num_classes - 1}], got {int(clean.y.min())}.."
                         f"{int(clean.y.max())}")
    if len(clean) > cfg.max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(clean), cfg.max_images, replace=False))
        clean = clean.subset(keep)
    pixels = torch.as_tensor(clean.x).to(dev).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    labels = torch.as_tensor(clean.y, dtype=torch.int64).to(dev)
    ctx = DetectContext(model=model, clean=clean, pixels=pixels, labels=labels, norm=norm, device=dev,
                        num_classes=num_classes, seed=seed, config=cfg, progress=progress,
                        should_stop=should_stop, max_step_bytes=max_step_bytes)
    results: dict[str, DetectorResult] = {}
    n = len(cfg.detectors)
    for i, name in enumerate(cfg.detectors):
        t0 = time.perf_counter()
        with ctx.span(i / n, (i + 1) / n):
            if name == "unlearning":  # trains a copy: needs parameter gradients
                res = DETECTORS[name](ctx)
            else:
                with frozen_model(model):
                    res = DETECTORS[name](ctx)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        res.seconds = time.perf_counter() - t0
        results[name] = res
    verdict, score, p, targets, reasons = combine(list(results.values()), cfg.p_value, cfg.strong_p_value,
                                                  cfg.voting_detectors, cfg.combination)
    triggers: dict[int, np.ndarray] = {}
    for res in results.values():
        shows = res.name in cfg.voting_detectors or bool(res.details.get("no_dominant_label"))
        for cls, img in res.trigger_images.items() if shows else ():
            if cls in targets:
                triggers.setdefault(cls, img)
    if progress is not None:
        progress(1.0)
    voting = [name for name in cfg.voting_detectors if name in results]
    merge = ("the Cauchy combination (ACAT) of the p-values" if cfg.combination == "cauchy"
             else f"min(1, {len(voting)} x the smallest p-value)")
    evidence = {"verdict": verdict, "score": score, "p_value": p, "suspected_targets": targets,
                "num_classes": num_classes, "clean_images": len(clean), "combination": cfg.combination,
                "reasons": reasons,
                "detectors": {name: {**r.evidence(), "votes": name in cfg.voting_detectors}
                              for name, r in results.items()},
                "rule": (f"p = {merge} of {voting}; backdoored: p < {cfg.strong_p_value}; suspicious: p < "
                         f"{cfg.p_value}, or the untargeted trigger has no dominant label (more than "
                         f"{cfg.ut_spread_fraction} x K distinct labels); score = log p / log {cfg.p_value}")}
    return DetectionResult(verdict=verdict, score=score, suspected_targets=targets, evidence=evidence,
                           trigger_images=triggers, detectors=results)
