"""Issue 10: the recovery rule's decisions, the clean check, stage 2's evidence-set schedule and augmentation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization, random_crop_flip
from core.defenses.registry import repair
from core.defenses.runtime import DeviceImages, runtime_for
from core.defenses.tsbd import TSBDConfig, tsbd_repair
from core.defenses.tsbd.auto import escalate, recovery_tolerance, split_holdout
from core.defenses.tsbd.config import REFERENCE_FINETUNE_IMAGES
from core.defenses.tsbd.finetune import crop_padding_for, flip_sensible, stage2_schedule

NORM = Normalization()
PROBES = (0.1, 0.3, 0.5, 0.7)


def _probe(table: dict[float, float]):
    calls: list[float] = []

    def probe(n: float) -> tuple[float, float, float]:
        calls.append(n)
        return table[n], 1.0 - table[n], 0.01

    return probe, calls


def test_recovery_raises_n_while_a_redundant_network_recovers() -> None:
    # a wide, redundant network: every reset up to 0.7 recovers to the same held-out accuracy -> the largest n
    probe, calls = _probe({0.1: 0.90, 0.3: 0.905, 0.5: 0.895, 0.7: 0.90})
    n, points, _ = escalate(PROBES, probe, held_out=2_000, floor=0.01)
    assert n == 0.7 and calls == list(PROBES) and all(p.kept for p in points)


def test_recovery_stops_where_held_out_accuracy_falls() -> None:
    # a network whose clean function cannot spare 30% of its channels: the drop at 0.3 (8 points) is far
    # beyond one standard error on 2,000 images (0.7 points) -> keeps 0.1 and probes nothing larger
    probe, calls = _probe({0.1: 0.90, 0.3: 0.82, 0.5: 0.91, 0.7: 0.91})
    n, points, tol = escalate(PROBES, probe, held_out=2_000, floor=0.01)
    assert n == 0.1 and calls == [0.1, 0.3] and [p.kept for p in points] == [True, False]
    assert tol == pytest.approx(0.01)


def test_recovery_tolerance_is_one_standard_error_on_small_held_out_sets() -> None:
    assert recovery_tolerance(0.8, 100, 0.01) == pytest.approx(math.sqrt(0.8 * 0.2 / 100))  # 4 points
    assert recovery_tolerance(0.8, 100_000, 0.01) == 0.01
    # a 3-point drop on 100 held-out images is noise: the rule keeps raising n
    probe, _ = _probe({0.1: 0.80, 0.3: 0.77, 0.5: 0.60, 0.7: 0.60})
    assert escalate(PROBES, probe, held_out=100, floor=0.01)[0] == 0.3


def test_holdout_split_is_disjoint_and_seeded() -> None:
    fit, held = split_holdout(500, 0.2, seed=3)
    assert len(held) == 100 and len(fit) == 400 and not set(fit) & set(held)
    assert np.array_equal(held, split_holdout(500, 0.2, seed=3)[1])


def test_stage2_epochs_scale_with_the_subset_and_lr_with_the_damage() -> None:
    cfg = TSBDConfig(finetune_adaptive=True)
    k = 10
    full = stage2_schedule(2_500, 32, 0.5, math.log(k), k, cfg)  # zeroing took the model to chance
    assert full.epochs == 21 and full.lr == pytest.approx(cfg.lr_finetune) and full.damage == pytest.approx(1.0)
    assert stage2_schedule(5_000, 32, 0.5, 2.0, k, cfg).epochs == round(REFERENCE_FINETUNE_IMAGES / 5_000)
    assert stage2_schedule(50_000, 32, 0.5, 2.0, k, cfg).epochs == cfg.finetune_min_epochs
    assert stage2_schedule(500, 32, 0.5, 2.0, k, cfg).epochs == cfg.finetune_epochs  # capped by the reference
    short = dataclasses.replace(cfg, finetune_epochs=3)  # a user's epochs stay the cap, below the minimum too
    assert stage2_schedule(50_000, 32, 0.5, 2.0, k, short).epochs == 3
    cfg = dataclasses.replace(cfg, finetune_lr_floor=0.1)
    half = stage2_schedule(2_500, 32, 0.5, 0.5 + 0.6 * (math.log(k) - 0.5), k, cfg)
    assert half.lr == pytest.approx(0.6 * cfg.lr_finetune)
    untouched = stage2_schedule(2_500, 32, 0.5, 0.5, k, dataclasses.replace(cfg, finetune_lr_floor=0.1))
    assert untouched.lr == pytest.approx(cfg.finetune_lr_floor * cfg.lr_finetune)
    ref = stage2_schedule(50_000, 32, 0.5, 0.5, k, TSBDConfig())  # not adaptive: the reference's constants
    assert (ref.epochs, ref.lr) == (21, 0.01)


def test_crop_padding_scales_with_the_image_side() -> None:
    assert [crop_padding_for(s, None) for s in (32, 28, 16, 8, 4)] == [4, 4, 2, 1, 1]
    assert crop_padding_for(8, 3) == 3  # an explicit value wins
    assert stage2_schedule(300, 8, 0.5, 2.0, 10, TSBDConfig()).crop_padding == 1


def test_crop_without_flip_never_mirrors() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_crop_flip(x, padding=0, generator=g, flip=False), x)
    mirrored = [torch.equal(random_crop_flip(x, padding=0, generator=g)[0], x[0].flip(2)) for _ in range(20)]
    assert any(mirrored)


class _SideBrighter(nn.Module):
    """Class 1 when the left half (axis=3) or the top half (axis=2) is brighter than the other."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=self.axis)
        d = (a.mean((1, 2, 3)) - b.mean((1, 2, 3))) * self.scale
        return torch.stack([-d, d], 1)


def test_flips_are_sensible_only_where_the_model_is_mirror_invariant() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    left = x[:, :, :4].mean((1, 2, 3)) > x[:, :, 4:].mean((1, 2, 3))
    top = x[:, :4].mean((1, 2, 3)) > x[:, 4:].mean((1, 2, 3))
    rt = runtime_for("cpu")
    by_side = DeviceImages(ImageSet(x, left.astype(np.int64)), NORM, rt)
    by_height = DeviceImages(ImageSet(x, top.astype(np.int64)), NORM, rt)
    sensible, acc, mirrored = flip_sensible(_SideBrighter(3), by_side, 2)
    assert not sensible and acc == 1.0 and mirrored == 0.0  # a mirrored "left" is a "right"
    sensible, acc, mirrored = flip_sensible(_SideBrighter(2), by_height, 2)
    assert sensible and acc == mirrored == 1.0


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _clean_subset(n: int = 120) -> ImageSet:
    rng = np.random.default_rng(1)
    return ImageSet(rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), np.arange(n) % 10)


def test_a_model_the_detector_calls_clean_is_kept_unless_forced() -> None:
    model, clean = _tiny().eval(), _clean_subset()
    params = {"clean_check": "given", "clean_action": "keep", "batch_size": 60, "unlearn_max_epochs": 1,
              "finetune_epochs": 1,
              "auto_probe_epochs": 1, "auto_probes": [0.5]}
    kept = repair("tsbd", model, clean, NORM, params, "cpu", 10, verdict="clean")
    assert kept.chosen["action"] == "kept" and "clean" in kept.chosen["why"]
    for a, b in zip(kept.model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    forced = repair("tsbd", model, clean, NORM, {**params, "force_repair": True}, "cpu", 10, verdict="clean")
    assert forced.chosen["action"] == "repaired" and "force_repair" in forced.chosen["why"]
    # clean_action's default: a clean verdict gets the gentle repair, not escalated (escalate is off by default)
    default = repair("tsbd", model, clean, NORM, {k: v for k, v in params.items() if k != "clean_action"}, "cpu", 10,
                     verdict="clean")
    assert default.chosen["action"] == "gentle" and "escalation" not in default.details
    assert default.chosen["neuron_ratio"] <= 0.3 < default.chosen["neuron_ratio_full"]
    flagged = repair("tsbd", model, clean, NORM, params, "cpu", 10, verdict="backdoored")
    assert flagged.chosen["action"] == "repaired" and "backdoored" in flagged.chosen["why"]
    # the reference (tsbd_fixed) does not read the verdict
    fixed = repair("tsbd_fixed", model, clean, NORM, params, "cpu", 10, verdict="clean")
    assert fixed.chosen["action"] == "repaired"


def test_recovery_rule_end_to_end_records_its_probes() -> None:
    model, clean = _tiny().eval(), _clean_subset(200)
    cfg = TSBDConfig(auto_rule="recovery", finetune_adaptive=True, batch_size=50, unlearn_max_epochs=2,
                     lr_unlearn=0.05, auto_probe_epochs=1, auto_probes=(0.2, 0.6), auto_holdout=0.25,
                     subset_filter=False)  # the filter may drop an image of this random subset
    res = tsbd_repair(model, clean, NORM, cfg, "cpu", num_classes=10)
    auto = res.details["auto"]
    assert auto["held_out_images"] == 50 and auto["fit_images"] == 150
    kept = [p["n"] for p in auto["probes"] if p["kept"]]
    assert res.params["neuron_ratio"] == kept[-1] == res.chosen["neuron_ratio"]
    assert auto["probe_steps"] == len(auto["probes"]) * 3  # 150 images / 50 per batch, one epoch each
    sched = res.details["schedule"]
    assert sched["crop_padding"] == 1 and res.chosen["finetune_epochs"] == sched["epochs"] == 21
    assert res.details["flip_evidence"] is not None


def _flagging_scan(flags: int):
    """A stand-in detector: calls the first ``flags`` models it sees backdoored, every later one clean."""
    seen: list[nn.Module] = []

    def scan(model: nn.Module, progress: object) -> dict[str, object]:
        seen.append(model)
        return {"verdict": "backdoored" if len(seen) <= flags else "clean", "score": 2.0 if len(seen) <= flags
                else 0.1}

    return scan, seen


# a width-rule model on the collapse branch (narrow: 8 channels): full n >= auto_min_n, gentle n <= 0.3
_GENTLE = dict(clean_check="given", clean_action="gentle", escalate=True, batch_size=60, unlearn_max_epochs=1,
               finetune_epochs=1, subset_filter=False, auto_min_n=0.5, auto_max_n=0.7)


def test_a_clean_verdict_gets_the_gentle_n_and_says_why() -> None:
    model, clean = _tiny().eval(), _clean_subset()
    scan, seen = _flagging_scan(0)
    res = tsbd_repair(model, clean, NORM, TSBDConfig(**_GENTLE), "cpu", num_classes=10, verdict="clean", scan=scan)
    full = res.chosen["neuron_ratio_full"]
    assert res.chosen["action"] == "gentle" and "gentle" in res.chosen["why"] and "clean" in res.chosen["why"]
    assert 0.05 <= res.chosen["neuron_ratio"] <= 0.3 < 0.5 <= full
    assert res.chosen["neuron_ratio"] == res.details["auto"]["n_retention_rule"]
    attempts = res.details["escalation"]["attempts"]
    assert len(seen) == 1 and [a["n"] for a in attempts] == [res.chosen["neuron_ratio"]]
    assert attempts[0]["verdict"] == "clean" and "clean" in res.details["escalation"]["stopped"]
    # not gentle: a flagged or missing verdict, or force_repair, gets the full rule's n
    for verdict, extra in (("backdoored", {}), (None, {}), ("clean", {"force_repair": True})):
        other = tsbd_repair(model, clean, NORM, TSBDConfig(**{**_GENTLE, **extra}), "cpu", num_classes=10,
                            verdict=verdict, scan=scan)
        assert other.chosen["action"] == "repaired" and other.chosen["neuron_ratio"] == full
        assert "escalation" not in other.details
    assert len(seen) == 1  # none of them scanned


def test_escalation_raises_n_while_the_detector_flags_and_stops_when_clean() -> None:
    model, clean = _tiny().eval(), _clean_subset()
    cfg = TSBDConfig(**_GENTLE, escalate_max_repairs=8, auto_tolerance=1.0)  # accuracy never stops it here
    scan, seen = _flagging_scan(1)  # the gentle repair is flagged, the next one is clean
    res = tsbd_repair(model, clean, NORM, cfg, "cpu", num_classes=10, verdict="clean", scan=scan)
    esc = res.details["escalation"]
    ns = [a["n"] for a in esc["attempts"]]
    assert len(ns) == 2 == len(seen) and ns[0] < ns[1] == res.chosen["neuron_ratio"] == esc["ladder"][0]
    assert [a["verdict"] for a in esc["attempts"]] == ["backdoored", "clean"]
    assert "escalated" in res.chosen["rule"]
    # always flagged: it climbs the whole ladder and ends at the full rule's n
    scan, seen = _flagging_scan(99)
    res = tsbd_repair(model, clean, NORM, cfg, "cpu", num_classes=10, verdict="clean", scan=scan)
    esc = res.details["escalation"]
    assert res.chosen["neuron_ratio"] == res.chosen["neuron_ratio_full"] == esc["ladder"][-1]
    assert len(esc["attempts"]) == 1 + len(esc["ladder"]) == len(seen) and "no larger n" in esc["stopped"]
    # escalation off: the gentle n stands without a scan
    scan, seen = _flagging_scan(99)
    res = tsbd_repair(model, clean, NORM, dataclasses.replace(cfg, escalate=False), "cpu", num_classes=10,
                      verdict="clean", scan=scan)
    assert not seen and res.chosen["neuron_ratio"] < res.chosen["neuron_ratio_full"]


def test_escalation_ladder_is_thinned_and_ends_at_the_full_n() -> None:
    from core.defenses.tsbd.repair import escalation_ladder

    sweep = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9)
    assert escalation_ladder(sweep, 0.1, 0.5, 3) == (0.25, 0.5)
    assert escalation_ladder(sweep, 0.1, 0.5, 8) == (0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
    assert escalation_ladder(sweep, 0.3, 0.3, 3) == ()
    assert escalation_ladder(sweep, 0.1, 0.5, 1) == ()


def test_gentle_verdicts_all_closes_the_loop_on_a_flagged_model_too() -> None:
    model, clean = _tiny().eval(), _clean_subset()
    cfg = TSBDConfig(**{**_GENTLE, "gentle_verdicts": "all", "auto_tolerance": 1.0})
    scan, seen = _flagging_scan(1)
    res = tsbd_repair(model, clean, NORM, cfg, "cpu", num_classes=10, verdict="backdoored", scan=scan)
    assert res.chosen["action"] == "gentle" and "backdoored" in res.chosen["why"]
    assert [a["verdict"] for a in res.details["escalation"]["attempts"]] == ["backdoored", "clean"]
    forced = tsbd_repair(model, clean, NORM, dataclasses.replace(cfg, force_repair=True), "cpu", num_classes=10,
                         verdict="backdoored", scan=scan)
    assert forced.chosen["action"] == "repaired" and forced.chosen["neuron_ratio"] == res.chosen["neuron_ratio_full"]
