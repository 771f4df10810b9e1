"""TSBD end to end: unlearn → NWC → (choose n) → zero re-initialise → activeness-aware fine-tune."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any

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
from core.defenses.tsbd.auto import choose_by_recovery, choose_neuron_ratio, recovery_tolerance
from core.defenses.tsbd.config import TSBDConfig
from core.defenses.tsbd.finetune import (
    activeness_aware_finetune,
    flip_sensible,
    held_out_split,
    image_side,
    stage2_schedule,
)
from core.defenses.tsbd.nwc import covered_conv_layers, neuron_weight_change
from core.defenses.tsbd.reinit import zero_reinitialize
from core.defenses.tsbd.unlearn import unlearn_clean
from core.progress import Progress

# the detector's account of one model: at least {"verdict": "clean" | "suspicious" | "backdoored", "score": float}
Scan = Callable[[nn.Module, Progress], dict[str, Any]]


def detector_scan(clean: ImageSet, norm: Normalization, device: torch.device | str, num_classes: int, seed: int,
                  config: Any = None, max_step_bytes: int | None = None) -> Scan:
    """The trigger-free detector (``core.detect.scan_model`` with ``config``, a ``DetectConfig`` or ``None`` for
    its defaults: the pipeline passes its own, and its allocation bound ``max_step_bytes``; ``None``: the
    detector's default) on the repair's clean subset, as a function of the model."""

    def scan(model: nn.Module, progress: Progress) -> dict[str, Any]:
        from core.detect import scan_model

        bound = {} if max_step_bytes is None else {"max_step_bytes": max_step_bytes}
        result = scan_model(model, clean, norm, config, device, num_classes, seed, progress=progress.update,
                            should_stop=lambda: bool(progress.check()), **bound)
        return {"verdict": result.verdict, "score": result.score,
                "suspected_targets": list(result.suspected_targets), "result": result}

    return scan


def escalation_ladder(candidates: tuple[float, ...], gentle: float, full: float, repairs: int) -> tuple[float, ...]:
    """The larger ``n`` an escalation may try after the gentle one: the candidates in ``(gentle, full]`` plus
    ``full`` itself, thinned evenly to at most ``repairs - 1`` values and always ending at ``full`` (so the
    last step is today's repair: an escalation that runs to its end repairs as strongly as the full rule)."""
    if full <= gentle + 1e-9 or repairs <= 1:
        return ()
    ladder = sorted({c for c in candidates if gentle + 1e-9 < c < full - 1e-9} | {full})
    k = min(len(ladder), repairs - 1)
    return tuple(ladder[round((i + 1) * len(ladder) / k) - 1] for i in range(k))


def tsbd_repair(model: nn.Module, clean: ImageSet, norm: Normalization, cfg: TSBDConfig,
                device: torch.device | str, progress: Progress | None = None,
                num_classes: int | None = None, verdict: str | None = None,
                subset_filter: SubsetFilterConfig | None = SubsetFilterConfig(),
                detect_config: Any = None, scan: Scan | None = None,
                detect_step_bytes: int | None = None) -> RepairResult:
    """Repair ``model`` with TSBD on the clean subset; ``cfg.neuron_ratio=None`` chooses ``n`` automatically
    from the clean subset (``cfg.auto_rule``: :func:`choose_by_recovery` or :func:`choose_neuron_ratio`).
    ``subset_filter`` (used when ``cfg.subset_filter``; ``None`` switches it off) first drops the subset's
    images that sit apart from their class (:func:`filter_poisoned`), so that poisoned images in it cannot
    teach the backdoor back in stage 2. ``verdict``: the trigger-free detector's verdict on ``model``
    (``cfg.clean_check``): a model called clean is returned unrepaired (``cfg.clean_action="keep"``) or repaired
    gently (``"gentle"``: the retention rule's n; with ``cfg.escalate``, repaired again with a larger n while the
    detector still flags the result, :func:`_escalate`), unless ``cfg.force_repair``. ``detect_config``: the
    detector's ``DetectConfig`` for the scans done here (``None``: its defaults) and ``detect_step_bytes`` their
    allocation bound (``core.detect.scan_model``'s ``max_step_bytes``); ``scan`` replaces the detector
    altogether (tests). ``model`` is not modified; the result holds a new module on ``device`` in eval mode."""
    rt = runtime_for(device)
    progress = progress or Progress()
    progress.sync = cuda_sync(rt)
    progress.stage("setup", 0.0, 0.01)
    original = prepare_model(copy.deepcopy(model), rt).eval()
    use_filter = cfg.subset_filter and subset_filter is not None
    filtered = filter_poisoned(original, clean, norm, rt, subset_filter) if use_filter else None
    clean = clean.subset(filtered.keep) if filtered is not None else clean  # everything below sees the kept part
    data = DeviceImages(clean, norm, rt)
    layers = covered_conv_layers(original, cfg.layer_exclude)
    if not layers:
        raise ValueError("the model has no Conv2d layer TSBD can work on")

    k = num_classes if num_classes is not None else infer_num_classes(original, data)
    scan = scan or detector_scan(clean, norm, device, k, cfg.seed, detect_config, detect_step_bytes)
    check = _clean_check(original, cfg, verdict, scan, progress.stage("clean_check", 0.01, 0.02))
    if check["action"] == "kept":
        return _kept(original, cfg, check, progress)
    base = score(original, data)  # one forward pass, read by the flip check, the choice of n and stage 2
    flip = (flip_sensible(original, data, k, plain=base.accuracy) if cfg.augment and cfg.augment_flip == "auto"
            else None)
    recovery = cfg.neuron_ratio is None and cfg.auto_rule == "recovery"
    stop1, stop_n = (0.2, 0.5) if recovery else (0.3, 0.34)  # the probes are short stage-2 runs
    # shares of the bar: unlearning and fine-tuning are the epochs; the rest are forward passes
    unlearned = unlearn_clean(original, data, norm, cfg, device, k, progress.stage("unlearn", 0.02, stop1),
                              flip=None if flip is None else flip[0])
    progress.stage("nwc", stop1, stop1 + 0.01)
    nwc = neuron_weight_change(original, unlearned.model, layers)
    del unlearned.model  # only its weight changes are needed

    gentle = check["action"] == "gentle" and cfg.neuron_ratio is None
    chosen: dict[str, object] = {"action": "gentle" if gentle else "repaired", "why": check["why"]}
    details: dict[str, object] = {"clean_check": check,
                                  "subset_filter": filtered.details if filtered is not None else {"applied": False}}
    if nwc.num_channels and float(nwc.flat().sum()) == 0.0:
        chosen["note"] = (f"clean unlearning moved no weight: the clean subset's accuracy "
                          f"{unlearned.accuracy_before:.3g} was already at or below its threshold "
                          f"{unlearned.threshold:.3g} (chance), so no channel was zeroed and only stage 2 ran")
    n = cfg.neuron_ratio
    n_gentle: float | None = None
    stage_n = progress.stage("choose_n", stop1 + 0.01, stop_n)
    if n is None and recovery:
        rchoice = choose_by_recovery(original, nwc, clean, norm, cfg, k, device,
                                     True if flip is None else flip[0], stage_n)
        n = rchoice.n
        n_gentle = min(n, cfg.auto_retention_max_n)
        chosen |= {"neuron_ratio": n, "rule": rchoice.rule}
        details["auto"] = rchoice.as_dict()
    elif n is None:
        choice = choose_neuron_ratio(original, nwc, data, cfg, k, stage_n, base_accuracy=base.accuracy)
        n = choice.n
        n_gentle = min(n, choice.n_retention_rule)
        chosen |= {"neuron_ratio": n, "rule": choice.rule}
        details["auto"] = choice.as_dict()
    ladder: tuple[float, ...] = ()
    last_scan: Any = None  # the detector's result on the returned model, where the escalation scanned it
    if gentle:
        assert n_gentle is not None
        n_full, n = n, n_gentle
        ladder = escalation_ladder(tuple(cfg.auto_candidates), n_gentle, n_full,
                                   cfg.escalate_max_repairs) if cfg.escalate else ()
        chosen |= {"neuron_ratio": n, "neuron_ratio_full": n_full,
                   "rule": (f"gentle: the retention rule's n = {n_gentle:g} (clipped to [{cfg.auto_retention_min_n:g}, "
                            f"{cfg.auto_retention_max_n:g}]) instead of the full rule's n = {n_full:g} "
                            f"({chosen['rule']})")}

    fit, held = data, None  # stage 2's images, and the held-out ones it stops on (finetune_holdout)
    if cfg.finetune_holdout > 0 and len(clean) >= 2:
        fit, held = held_out_split(clean, cfg.finetune_holdout, cfg.seed, norm, rt)

    def attempt(n_try: float) -> tuple[nn.Module, Any, Any, Any, Any]:
        progress.stage("zero_reinit", stop_n, stop_n + 0.01)
        repaired, zsum = zero_reinitialize(original, nwc, n_try, cfg.weight_ratio)
        schedule = stage2_schedule(len(fit), image_side(data), base.loss, score(repaired, data).loss, k, cfg,
                                   None if flip is None else flip[0])
        ft = activeness_aware_finetune(repaired, fit, norm, cfg, device,
                                       progress.stage("finetune", stop_n + 0.01, 0.99), schedule, holdout=held)
        progress.stage("final_eval", 0.99, 1.0)
        return repaired, zsum, schedule, ft, score(repaired, data)

    if check["action"] == "gentle" and not gentle:
        chosen["why"] = f"{check['why']}; but neuron_ratio is fixed at {n:g}: repaired with it"
    outcome = attempt(n)
    if gentle and cfg.escalate and not ladder:
        details["escalation"] = {"ladder": [], "attempts": [], "stopped": (
            f"no scan: the gentle n = {n:g} is already the full rule's n" if cfg.escalate_max_repairs > 1 else
            "no scan: escalate_max_repairs = 1 allows no larger n")}
        chosen["rule"] = f"{chosen['rule']}; {details['escalation']['stopped']}"
    elif gentle and cfg.escalate:
        outcome, n, details["escalation"], last_scan = _escalate(attempt, outcome, n, ladder, scan, len(data), cfg,
                                                                 progress)
        if n > n_gentle + 1e-9:  # type: ignore[operator]
            chosen["rule"] = f"{chosen['rule']}; escalated to n = {n:g}: {details['escalation']['stopped']}"
        else:
            chosen["rule"] = f"{chosen['rule']}; {details['escalation']['stopped']}"
        chosen["neuron_ratio"] = n
    repaired, zsum, schedule, ft, after = outcome

    details.update({
        "unlearn": {"epochs": unlearned.epochs, "threshold": unlearned.threshold,
                    "clean_accuracy_before": unlearned.accuracy_before,
                    "clean_accuracy_after": unlearned.accuracy_after,
                    "reached_threshold": unlearned.reached_threshold},
        "nwc_summary": nwc.summary(),
        "zero_reinit": dataclasses.asdict(zsum),
        "finetune": dataclasses.asdict(ft),
        "schedule": schedule.as_dict(),
        "flip_evidence": None if flip is None else {"sensible": flip[0], "accuracy": flip[1],
                                                    "accuracy_mirrored": flip[2]},
        "clean_subset_after": {"accuracy": after.accuracy, "loss": after.loss},
    })
    params = dataclasses.asdict(cfg)
    params["neuron_ratio"] = n
    params["layers"] = layers
    if cfg.finetune_adaptive:
        chosen |= {"finetune_epochs": schedule.epochs, "lr_finetune": schedule.lr}
    if ft.holdout is not None:
        chosen |= {"finetune_epochs": ft.epochs, "finetune_stop": ft.holdout["why"]}
    return RepairResult(model=repaired.eval(), method="tsbd" if cfg.neuron_ratio is None else "tsbd_fixed",
                        params=params, chosen=chosen, timings=progress.finish(), details=details,
                        final_scan=last_scan)


def _escalate(attempt: Callable[[float], tuple[Any, ...]], outcome: tuple[Any, ...], n: float,
              ladder: tuple[float, ...], scan: Scan, images: int, cfg: TSBDConfig,
              progress: Progress) -> tuple[tuple[Any, ...], float, dict[str, object], Any]:
    """Close the loop on the detector after a gentle repair: scan the repaired model; while it is not called
    clean and ``ladder`` has a larger ``n`` left, repair again from the original model with it (``attempt``).
    Stop also where the clean subset's accuracy after stage 2 falls more than ``max(cfg.auto_tolerance, one
    standard error)`` below the best attempt so far (that subset is the one stage 2 trained on, so a drop
    there is lost clean function, not noise, but a small one may go unseen). The last attempt is returned:
    erring towards the larger ``n`` is the safe side (it costs accuracy, which the report shows). Returns the
    outcome, its ``n``, the account (every attempt: n, verdict, score, accuracy, seconds) and the detector's result
    on the returned model (its last scan: every exit of the loop follows a scan of the current outcome)."""
    attempts: list[dict[str, object]] = []
    best = -1.0
    rest = list(ladder)
    while True:
        t0 = time.perf_counter()
        found = scan(outcome[0], progress.stage("escalation_scan", 0.99, 0.99))
        accuracy = float(outcome[4].accuracy)
        attempts.append({"n": n, "verdict": found.get("verdict"), "score": found.get("score"),
                         "clean_subset_accuracy": accuracy, "scan_s": round(time.perf_counter() - t0, 3)})
        best = max(best, accuracy)
        tol = recovery_tolerance(best, images, cfg.auto_tolerance)
        if found.get("verdict") == "clean":
            stopped = f"the detector calls the model repaired at n = {n:g} clean"
            break
        if accuracy < best - tol - 1e-12:
            stopped = (f"the clean subset's accuracy fell to {accuracy:.3f} at n = {n:g}, more than {tol:.3f} below "
                       f"the best attempt's {best:.3f}: stopped there (verdict {found.get('verdict')})")
            break
        if not rest:
            stopped = (f"the detector still calls the model repaired at n = {n:g} {found.get('verdict')}, and no "
                       f"larger n is left (the full rule's n is the last step)")
            break
        n = rest.pop(0)
        outcome = attempt(n)
    return outcome, n, {"ladder": list(ladder), "attempts": attempts, "stopped": stopped}, found.get("result")


def _clean_check(model: nn.Module, cfg: TSBDConfig, verdict: str | None, scan: Scan,
                 progress: Progress) -> dict[str, object]:
    """Whether and how strongly to repair: ``kept`` (``clean_action="keep"``) or ``gentle`` (``"gentle"``) when
    the detector's verdict (given, or scanned here with ``clean_check="scan"``) is ``clean`` and the user did not
    force the repair, else ``repair`` (the full rule); the why as text."""
    out: dict[str, object] = {"mode": cfg.clean_check, "verdict": verdict, "force_repair": cfg.force_repair,
                              "clean_action": cfg.clean_action}
    if cfg.clean_check == "off":
        return out | {"action": "repair", "why": "clean_check is off: full repair"}
    if verdict is None and cfg.clean_check == "scan":
        found = scan(model, progress)
        verdict = str(found["verdict"])
        out |= {"verdict": verdict, "score": found.get("score"), "suspected_targets": found.get("suspected_targets")}
    if verdict is None:
        return out | {"action": "repair", "why": "no detector verdict was given: full repair"}
    if cfg.force_repair:
        return out | {"action": "repair", "why": f"the detector's verdict is {verdict}, force_repair is set: full "
                                                 "repair"}
    if verdict != "clean" and cfg.clean_action == "gentle" and cfg.gentle_verdicts == "all":
        return out | {"action": "gentle", "why": (
            f"the detector's verdict is {verdict}: gentle start (gentle_verdicts = all), "
            + ("escalated to a larger n while the detector flags the repaired model" if cfg.escalate else
               "not escalated (escalate is off)"))}
    if verdict != "clean":
        return out | {"action": "repair", "why": f"the detector's verdict is {verdict}: full repair"}
    if cfg.clean_action == "gentle":
        why = ("the detector's verdict is clean: gentle repair (a small n costs less of the clean accuracy a clean "
               "model cannot spare, and still repairs a backdoor the detector missed")
        why += ("; escalated to a larger n while the detector flags the repaired model; force_repair=true repairs "
                "fully)" if cfg.escalate else "; force_repair=true repairs fully)")
        return out | {"action": "gentle", "why": why}
    return out | {"action": "kept", "why": "the detector's verdict is clean: not repaired (a repair costs clean "
                                           "accuracy a clean model cannot spare; force_repair=true repairs anyway)"}


def _kept(model: nn.Module, cfg: TSBDConfig, check: dict[str, object], progress: Progress) -> RepairResult:
    """The result for a model left as it was: the (prepared) copy itself, and why."""
    params = dataclasses.asdict(cfg)
    params["neuron_ratio"] = None
    return RepairResult(model=model.eval(), method="tsbd" if cfg.neuron_ratio is None else "tsbd_fixed",
                        params=params, chosen={"action": "kept", "why": check["why"]}, timings=progress.finish(),
                        details={"clean_check": check})
