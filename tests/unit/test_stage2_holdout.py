"""Issue 10: stage 2 stopped on a held-out part of the clean subset (TSBDConfig.finetune_holdout)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.defenses.runtime import DeviceImages, runtime_for, score
from core.defenses.tsbd import TSBDConfig, tsbd_repair
from core.defenses.tsbd import repair as repair_module
from core.defenses.tsbd.config import REFERENCE_FINETUNE_STEPS
from core.defenses.tsbd.finetune import activeness_aware_finetune, stage2_schedule

NORM = Normalization()
RT = runtime_for("cpu")


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _bright_dark(n: int, seed: int, flip_labels: bool = False) -> ImageSet:
    """8x8 images, class 1 bright and class 0 dark (``flip_labels``: the opposite labels)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = np.where(y[:, None, None, None] == 1, rng.integers(150, 256, (n, 8, 8, 1)), rng.integers(0, 106, (n, 8, 8, 1)))
    return ImageSet(x.astype(np.uint8), (1 - y if flip_labels else y).astype(np.int64))


def _cfg(**kw: object) -> TSBDConfig:
    return TSBDConfig(batch_size=16, augment=False, lr_finetune=0.05, **kw)


def _budget_schedule(cfg: TSBDConfig, n: int):
    return stage2_schedule(n, 8, 0.5, 0.6, 2, cfg, flip=False)


def test_the_step_budget_sets_the_epochs_only_when_the_holdout_is_on() -> None:
    on = TSBDConfig(finetune_adaptive=True, finetune_holdout=0.2, batch_size=32)
    s = stage2_schedule(200, 32, 0.5, 2.0, 10, on)
    assert s.epochs == math.ceil(REFERENCE_FINETUNE_STEPS / math.ceil(200 / 32)) and "held-out" in s.why
    off = dataclasses.replace(on, finetune_holdout=0.0)
    assert stage2_schedule(200, 32, 0.5, 2.0, 10, off).epochs == off.finetune_epochs  # today's cap of 21
    # one epoch at least, however large the subset
    assert stage2_schedule(10**6, 32, 0.5, 2.0, 10, dataclasses.replace(on, finetune_max_steps=5)).epochs == 1
    with pytest.raises(ValueError):
        TSBDConfig(finetune_holdout=0.6)
    with pytest.raises(ValueError):
        TSBDConfig(finetune_patience=0)


def test_patience_stops_where_the_held_out_loss_only_rises() -> None:
    # the held-out images carry the opposite labels: every epoch that fits the training part raises their loss
    cfg = _cfg(finetune_holdout=0.2, finetune_patience=2, finetune_max_steps=400)
    fit, held = DeviceImages(_bright_dark(64, 0), NORM, RT), DeviceImages(_bright_dark(32, 1, True), NORM, RT)
    sched = _budget_schedule(cfg, len(fit))
    ft = activeness_aware_finetune(_tiny(), fit, NORM, cfg, "cpu", schedule=sched, holdout=held)
    h = ft.holdout
    assert h is not None and h["stopped_early"] and sched.epochs == 100
    assert h["epochs_run"] == h["best_epoch"] + cfg.finetune_patience < sched.epochs
    assert ft.steps == h["epochs_run"] * 4  # 64 images in batches of 16


def test_the_kept_weights_are_those_of_the_best_held_out_epoch() -> None:
    cfg = _cfg(finetune_holdout=0.2, finetune_patience=3, finetune_max_steps=48, finetune_schedule="constant")
    fit, held = DeviceImages(_bright_dark(64, 0), NORM, RT), DeviceImages(_bright_dark(40, 1), NORM, RT)
    sched = _budget_schedule(cfg, len(fit))
    model = _tiny()
    ft = activeness_aware_finetune(model, fit, NORM, cfg, "cpu", schedule=sched, holdout=held)
    h = ft.holdout
    assert h is not None
    losses = [p["loss"] for p in h["curve"][1:]]  # epoch 0 (before stage 2) is never a candidate
    assert h["best_epoch"] == 1 + int(np.argmin(losses)) == ft.epochs
    assert score(model, held).loss == pytest.approx(min(losses), rel=1e-6)
    # scoring the held-out part does not disturb training: a run without it, stopped at the kept epoch, has the
    # same weights (constant lr, so the schedule does not depend on the budget)
    plain = _tiny()
    activeness_aware_finetune(plain, fit, NORM, cfg, "cpu", schedule=dataclasses.replace(sched, epochs=ft.epochs))
    for a, b in zip(model.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_repair_trains_and_stops_on_disjoint_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[DeviceImages, DeviceImages | None]] = []
    real = repair_module.activeness_aware_finetune

    def spy(model, clean, norm, cfg, device, progress=None, schedule=None, holdout=None):  # type: ignore[no-untyped-def]
        seen.append((clean, holdout))
        return real(model, clean, norm, cfg, device, progress, schedule, holdout=holdout)

    monkeypatch.setattr(repair_module, "activeness_aware_finetune", spy)
    subset = _bright_dark(50, 3)
    subset = ImageSet(subset.x + np.arange(50, dtype=np.uint8)[:, None, None, None] % 3, subset.y)  # distinct images
    cfg = _cfg(neuron_ratio=0.5, unlearn_max_epochs=1, subset_filter=False, finetune_holdout=0.2,
               finetune_max_steps=12)
    res = tsbd_repair(_tiny(), subset, NORM, cfg, "cpu", num_classes=2)
    fit, held = seen[-1]
    assert held is not None and len(fit) == 40 and len(held) == 10
    rows = {bytes(r) for r in fit.x.reshape(len(fit), -1).numpy()}
    assert not rows & {bytes(r) for r in held.x.reshape(len(held), -1).numpy()}
    assert len(rows | {bytes(r) for r in held.x.reshape(len(held), -1).numpy()}) == 50
    account = res.details["finetune"]["holdout"]
    assert account["fit_images"] == 40 and account["holdout_images"] == 10
    assert res.chosen["finetune_epochs"] == account["best_epoch"] and "kept epoch" in res.chosen["finetune_stop"]
    # off (the default): the whole subset trains for the schedule's epochs and nothing is held out
    seen.clear()
    off = tsbd_repair(_tiny(), subset, NORM, dataclasses.replace(cfg, finetune_holdout=0.0), "cpu", num_classes=2)
    fit, held = seen[-1]
    assert held is None and len(fit) == 50
    assert off.details["finetune"]["holdout"] is None
    assert off.details["finetune"]["epochs"] == off.details["schedule"]["epochs"] == cfg.finetune_epochs


def test_plain_finetuning_stops_on_the_held_out_part_too() -> None:
    from core.defenses.registry import repair

    subset = ImageSet.concat(_bright_dark(40, 4), _bright_dark(40, 5))
    params = {"batch_size": 16, "augment": False, "lr": 0.05, "holdout": 0.25, "patience": 2, "max_steps": 40}
    res = repair("finetune", _tiny(), subset, NORM, params, "cpu", 2)
    h = res.details["holdout"]
    assert h["fit_images"] == 60 and h["holdout_images"] == 20 and h["epoch_budget"] == 10  # 40 steps / 4 batches
    assert 1 <= h["best_epoch"] <= h["epochs_run"] <= 10
    losses = [p["loss"] for p in h["curve"][1:]]
    assert h["best_epoch"] == 1 + int(np.argmin(losses))
    assert h["stopped_early"] == (h["epochs_run"] < 10)
    off = repair("finetune", _tiny(), subset, NORM, {**params, "holdout": 0.0}, "cpu", 2)
    assert "holdout" not in off.details
    pruned = repair("fine_pruning", _tiny(), subset, NORM, params, "cpu", 2)
    assert pruned.details["holdout"]["fit_images"] == 60
