"""Issue 10 probe: are the ORIGINAL model's inverted triggers evidence of what a TSBD reset removed?

    OMP_NUM_THREADS=1 nice -n 10 python bench/proxy_trigger_probe.py --attacks clean,badnets --seed 0 \
        --model-cache ~/.cache/antidote/models/repair_cpu --out bench/results/proxy_probe_s0_a.json

Per model of the repair benchmark's ``cpu`` profile (small CNN, 6,000 MNIST images, 500 defender images; the
same training, split and cache names as ``bench/repair_bench.py --model-cache``):

1. the detector's two inversions on the original model (Neural Cleanse's patch search and the universal
   additive perturbation, ``core.detect``'s defaults, on the defender subset): one trigger per class and
   family, the family's outlier p-value and its most anomalous class (the smallest normalised trigger, the
   class the detector would name; taken even when the p-value is not small);
2. clean unlearning and the NWC once (``TSBDConfig`` as the bench's profile sets it);
3. along the zeroing sweep (every candidate of ``auto_candidates``, the original model zeroed, no fine-tuning)
   and after a full stage 2 at each ``--repair-n``: clean ACC and real ASR on the test set (the real trigger:
   measurement only), and the *proxy ASR* of every class's inverted trigger on the defender subset (the images
   the method has; images of the class itself left out) plus, for the anomalous classes, on 500 test images
   and with the trigger's pixels shuffled (mask and pattern permuted together: same amount of change, no shape).

Nothing here chooses anything: it measures whether a rule could read these triggers (§2.11: it could not).
Writes one JSON (``--out``), rewritten after every model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.proxy_triggers import ProxyTriggers, proxy_success  # noqa: E402
from bench.repair_bench import (  # noqa: E402
    CLEAN_MODEL,
    PROFILES,
    _tsbd_only,
    build_model,
    load_data,
    model_cache_path,
    split_data,
)
from core.attacks.base import make_backdoor_test_set, poison_training_set  # noqa: E402
from core.attacks.registry import create_attack  # noqa: E402
from core.data.transforms import Normalization  # noqa: E402
from core.defenses.runtime import DeviceImages, prepare_model, runtime_for  # noqa: E402
from core.defenses.tsbd import (  # noqa: E402
    TSBDConfig,
    activeness_aware_finetune,
    covered_conv_layers,
    neuron_weight_change,
    unlearn_clean,
    zero_reinitialize,
)
from core.detect.base import DetectContext  # noqa: E402
from core.detect.config import DetectConfig  # noqa: E402
from core.detect.inversion import Additive, Patch, smallest_triggers  # noqa: E402
from core.detect.neural_cleanse import nc_schedule  # noqa: E402
from core.detect.stats import outlier_p_value  # noqa: E402
from core.detect.universal_perturbation import up_schedule  # noqa: E402
from core.metrics import evaluate  # noqa: E402
from core.training import train_classifier  # noqa: E402


def invert(model: nn.Module, defender, norm: Normalization, num_classes: int, seed: int) -> dict[str, object]:
    """Both inversion families on ``model`` as ``core.detect.scan_model`` runs them (same schedules, seeds)."""
    cfg = DetectConfig()
    dev = torch.device("cpu")
    pixels = torch.as_tensor(defender.x).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    labels = torch.as_tensor(defender.y, dtype=torch.int64)
    ctx = DetectContext(model=model, clean=defender, pixels=pixels, labels=labels, norm=norm, device=dev,
                        num_classes=num_classes, seed=seed, config=cfg)
    was = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in was:
        p.requires_grad_(False)
    out: dict[str, object] = {}
    try:
        for fam, sch, off in ((Patch(), nc_schedule(ctx), 0), (Additive(), up_schedule(ctx), 11)):
            t0 = time.perf_counter()
            inv = smallest_triggers(ctx, fam, sch, seed_offset=off)
            logs = [math.log(max(v, 1e-12)) for v in inv.normalised]
            p, scores, critical = outlier_p_value(logs)
            out[fam.name] = {"params": [t.detach().clone() for t in inv.params], "normalised": inv.normalised,
                             "p_value": p, "scores": scores, "critical": critical,
                             "anomalous": int(np.argmin(inv.normalised)), "steps": inv.steps,
                             "seconds": time.perf_counter() - t0}
    finally:
        for p, g in was:
            p.requires_grad_(g)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", default="clean,badnets,blended,sig,wanet,lowfreq")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-cache", default=str(Path.home() / ".cache/antidote/models/repair_cpu"))
    ap.add_argument("--repair-n", default="0.05,0.1,0.3,0.5")
    ap.add_argument("--amplify", default="", help="comma-separated factors: also the triggers this many times as "
                    "strong (ProxyTriggers.scaled), every class, on the defender subset")
    ap.add_argument("--no-sweep", action="store_true", help="skip the zeroing sweep (forward passes on zeroed models)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prof = PROFILES["cpu"]
    device = "cpu"
    train_all, test_all = load_data(prof, None)
    num_classes = int(max(train_all.y.max(), test_all.y.max()) + 1)
    norm = Normalization()
    train, defender, test, _ = split_data(train_all, test_all, prof, args.seed)
    test_proxy = test.subset(np.arange(500))
    cfg = TSBDConfig(**_tsbd_only(prof.repair_params), seed=args.seed)
    rt = runtime_for(device)
    out_path = Path(args.out)
    report: dict[str, object] = {"seed": args.seed, "profile": "cpu", "config": dataclasses.asdict(cfg),
                                 "repair_n": args.repair_n, "models": {}}
    for attack_name in args.attacks.split(","):
        t_model = time.perf_counter()
        clean_model = attack_name == CLEAN_MODEL
        torch.manual_seed(args.seed)
        model = build_model(prof, train.image_shape[2], num_classes)
        attack = create_attack("badnets" if clean_model else attack_name, target=0, image_shape=train.image_shape,
                               seed=args.seed)
        cached = model_cache_path(args.model_cache, prof, attack_name, args.seed, len(train))
        if cached.exists():
            model.load_state_dict(torch.load(cached, map_location="cpu"))
        else:
            poisoned = poison_training_set(attack, train, 0.0 if clean_model else 0.1, num_classes, args.seed)
            train_classifier(model, poisoned.data, norm, prof.epochs, prof.lr, prof.batch_size, device,
                             augment=prof.augment, seed=args.seed)
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, cached)
        model.eval()
        backdoor = make_backdoor_test_set(attack, test, num_classes)
        train_s = time.perf_counter() - t_model

        t0 = time.perf_counter()
        inv = invert(model, defender, norm, num_classes, args.seed)
        detect_s = time.perf_counter() - t0
        triggers = {fam: ProxyTriggers(fam, inv[fam]["params"]) for fam in ("patch", "additive")}
        anomalous = {fam: inv[fam]["anomalous"] for fam in triggers}
        gen = torch.Generator().manual_seed(args.seed + 3)
        side = defender.x.shape[1] * defender.x.shape[2]
        perm = torch.randperm(side, generator=gen)
        shuffled = {fam: triggers[fam].shuffled(perm) for fam in triggers}

        factors = [float(f) for f in args.amplify.split(",") if f]
        amplified = {(fam, f): triggers[fam].scaled(f) for fam in triggers for f in factors}

        def measure(m: nn.Module, _backdoor=backdoor, _triggers=triggers, _shuffled=shuffled,
                    _anomalous=anomalous, _amplified=amplified) -> dict[str, object]:
            m.eval()
            e = evaluate(m, test, _backdoor, norm, device)
            row: dict[str, object] = {"acc": e.acc, "asr": e.asr}
            for fam, trig in _triggers.items():
                k = _anomalous[fam]
                row[f"proxy_{fam}_all"] = proxy_success(m, trig, defender, norm, rt)  # per class, defender
                row[f"proxy_{fam}_test"] = proxy_success(m, trig, test_proxy, norm, rt, classes=[k])[k]
                row[f"proxy_{fam}_shuffled"] = proxy_success(m, _shuffled[fam], defender, norm, rt, classes=[k])[k]
            for (fam, f), trig in _amplified.items():
                row[f"proxy_{fam}_x{f:g}_all"] = proxy_success(m, trig, defender, norm, rt)
            return row

        original = prepare_model(copy.deepcopy(model), rt).eval()
        row_before = measure(original)
        data = DeviceImages(defender, norm, rt)
        t0 = time.perf_counter()
        un = unlearn_clean(original, data, norm, cfg, device, num_classes)
        nwc = neuron_weight_change(original, un.model, covered_conv_layers(original, cfg.layer_exclude))
        unlearn_s = time.perf_counter() - t0
        sweep = []
        t0 = time.perf_counter()
        for n in () if args.no_sweep else sorted(cfg.auto_candidates):
            zeroed, _ = zero_reinitialize(original, nwc, n, cfg.weight_ratio)
            sweep.append({"n": n, **measure(zeroed)})
        sweep_s = time.perf_counter() - t0
        repairs = []
        for n in (float(v) for v in args.repair_n.split(",")):
            t0 = time.perf_counter()
            repaired, _ = zero_reinitialize(original, nwc, n, cfg.weight_ratio)
            activeness_aware_finetune(repaired, data, norm, dataclasses.replace(cfg, neuron_ratio=n), device)
            repairs.append({"n": n, "stage2_s": time.perf_counter() - t0, **measure(repaired)})
            print(f"[{attack_name}] n={n}: ACC {repairs[-1]['acc']:.3f} ASR {repairs[-1]['asr']:.3f} proxy "
                  f"patch {repairs[-1]['proxy_patch_all'][anomalous['patch']]:.3f} additive "
                  f"{repairs[-1]['proxy_additive_all'][anomalous['additive']]:.3f}", flush=True)
        report["models"][attack_name] = {
            "train_s": train_s, "detect_s": detect_s, "unlearn_s": unlearn_s, "sweep_s": sweep_s,
            "total_s": time.perf_counter() - t_model,
            "detector": {fam: {k: v for k, v in d.items() if k != "params"} for fam, d in inv.items()},
            "anomalous": anomalous, "before": row_before, "sweep": sweep, "repairs": repairs,
            "unlearn_epochs": un.epochs}
        print(f"[{attack_name}] done in {time.perf_counter() - t_model:.0f}s (detect {detect_s:.0f}s); before "
              f"ACC {row_before['acc']:.3f} ASR {row_before['asr']:.3f}; anomalous {anomalous}, p "
              f"{inv['patch']['p_value']:.3g} / {inv['additive']['p_value']:.3g}", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
