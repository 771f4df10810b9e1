"""Issue 10: one automatic TSBD repair against the reference's single fixed-n run, timed in one process.

    OMP_NUM_THREADS=1 python bench/auto_timing.py --model-cache ~/.cache/antidote/models \\
        --order auto,fixed,fixed,auto --out bench/results/auto_timing_r20.md

One backdoored CIFAR ResNet-20 (the ``cpu_resnet20`` profile of ``bench/repair_bench.py``, as it stands: since
BENCHMARKS.md 2.13 5,000 training images x 10 epochs at lr 0.01, 10% poisoning, target 0; 2.9's runs had the
older, weakly backdoored profile; loaded from ``--model-cache`` when that run saved it, else trained and saved) and a
clean defender subset of ``--n-defender`` (2,500) CIFAR-10 training images that training never saw. In the
order given, it runs ``repair("tsbd", ...)`` (the automatic method, every default) and ``repair("tsbd_fixed",
...)`` (the reference: n = 0.3, constant lr, 21 epochs) back to back in this process, each wall-clock timed,
with the repair's own per-phase seconds (subset filter and setup, clean check, unlearning, NWC, the choice of
n, zero re-initialisation, stage 2, final score); ACC/ASR are measured after the clock stops. An order like
``auto,fixed,fixed,auto`` lets drifting load from other jobs fall on both methods alike. Writes markdown to
``--out`` and the raw numbers beside it (``.json``) after every repair.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.repair_bench import CIFAR_NORM, PROFILES, build_model, load_data, model_cache_path, split_data  # noqa: E402
from core.attacks.base import make_backdoor_test_set, poison_training_set  # noqa: E402
from core.attacks.registry import create_attack  # noqa: E402
from core.data.transforms import Normalization  # noqa: E402
from core.defenses.registry import repair  # noqa: E402
from core.metrics import evaluate  # noqa: E402
from core.training import train_classifier  # noqa: E402

METHODS = {"auto": "tsbd", "fixed": "tsbd_fixed"}


def _load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu_resnet20", choices=sorted(PROFILES))
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--n-defender", type=int, default=2_500)
    ap.add_argument("--order", default="auto,fixed,fixed,auto", help="comma-separated auto / fixed")
    ap.add_argument("--params", default="{}", help="JSON overrides for both methods (e.g. finetune_epochs)")
    ap.add_argument("--model-cache", help="the folder bench/repair_bench.py --model-cache saves models in")
    ap.add_argument("--data", help="a .npz with x_train, y_train, x_test, y_test (default: the cached set)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="auto_timing.md")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    prof = dataclasses.replace(PROFILES[args.profile], n_defender=args.n_defender)
    device = args.device
    train_all, test_all = load_data(prof, args.data)
    num_classes = int(max(train_all.y.max(), test_all.y.max()) + 1)
    norm = CIFAR_NORM if prof.dataset == "cifar10" else Normalization()
    # the same seed draws the same training images as repair_bench.py (the defender takes the next n_defender)
    train, defender, test, source = split_data(train_all, test_all, prof, args.seed)
    attack = create_attack(args.attack, target=0, image_shape=train.image_shape, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model(prof, train.image_shape[2], num_classes)
    cached = model_cache_path(args.model_cache, prof, args.attack, args.seed, len(train))
    if cached is not None and cached.exists():
        model.load_state_dict(torch.load(cached, map_location="cpu"))
        trained = f"loaded {cached.name}"
    else:
        t0 = time.perf_counter()
        poisoned = poison_training_set(attack, train, 0.1, num_classes, args.seed)
        train_classifier(model, poisoned.data, norm, prof.epochs, prof.lr, prof.batch_size, device,
                         augment=prof.augment, seed=args.seed)
        trained = f"trained in {time.perf_counter() - t0:.0f} s"
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, cached)
    model.to(device)
    backdoor = make_backdoor_test_set(attack, test, num_classes)
    before = evaluate(model, test, backdoor, norm, device)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    report: dict[str, object] = {
        "profile": args.profile, "attack": args.attack, "n_defender": len(defender), "defender_source": source,
        "n_test": len(test), "model": trained, "before": {"acc": before.acc, "asr": before.asr},
        "params": json.loads(args.params), "commit": commit, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(), "runs": []}
    print(f"model {trained}: ACC {before.acc:.3f} ASR {before.asr:.3f}; defender {len(defender)} ({source})",
          flush=True)
    for i, which in enumerate(args.order.split(",")):
        method = METHODS[which]
        load_at_start = _load_average()
        t0 = time.perf_counter()
        res = repair(method, model, defender, norm, {**prof.repair_params, **report["params"]}, device,
                     num_classes, seed=args.seed)
        wall = time.perf_counter() - t0
        after = evaluate(res.model, test, backdoor, norm, device)
        run = {"index": i, "which": which, "method": method, "wall_s": wall, "timings": res.timings,
               "chosen": res.chosen, "acc": after.acc, "asr": after.asr,
               "unlearn_epochs": res.details.get("unlearn", {}).get("epochs"),
               "finetune": res.details.get("finetune"), "schedule": res.details.get("schedule"),
               "filter_dropped": res.details.get("subset_filter", {}).get("dropped"),
               "sweep": [[q["n"], q.get("images")] for q in res.details.get("auto", {}).get("sweep", [])],
               "sweep_stopped": res.details.get("auto", {}).get("sweep_stopped"),
               "load_start": load_at_start, "load_end": _load_average()}
        report["runs"].append(run)
        print(f"[{i}] {which}: {wall:.1f} s {res.timings} ACC {after.acc:.3f} ASR {after.asr:.3f} "
              f"{res.chosen.get('neuron_ratio')} load {load_at_start} -> {run['load_end']}", flush=True)
        Path(args.out).write_text(render(report))
        Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    print(Path(args.out).read_text())


def render(report: dict) -> str:
    runs = report["runs"]
    phases = sorted({k for r in runs for k in r["timings"] if k != "total"},
                    key=lambda k: ["setup", "clean_check", "unlearn", "nwc", "choose_n", "zero_reinit",
                                   "finetune", "final_eval"].index(k) if k in (
                        "setup", "clean_check", "unlearn", "nwc", "choose_n", "zero_reinit", "finetune",
                        "final_eval") else 99)
    b = report["before"]
    lines = [f"### Automatic TSBD against one fixed-n run, `{report['profile']}` {report['attack']} model",
             "", f"Commit {report['commit']}, torch {report['torch']}, {report['threads']} thread(s), CPU "
             f"{report['cpu']}; model {report['model']} (ACC {100 * b['acc']:.1f}, ASR {100 * b['asr']:.1f}); "
             f"defender subset {report['n_defender']} clean images ({report['defender_source']}); test "
             f"{report['n_test']}; overrides {report['params'] or 'none'}.", "",
             "| # | method | wall (s) | " + " | ".join(phases) + " | n | unlearn epochs | stage-2 epochs "
             "| ACC | ASR | load (1/5/15 min) start -> end |",
             "|---|---|---|" + "---|" * len(phases) + "---|---|---|---|---|---|"]
    for r in runs:
        ft = r.get("finetune") or {}
        lines.append(f"| {r['index']} | {r['method']} | {r['wall_s']:.1f} | "
                     + " | ".join(f"{r['timings'].get(p, 0.0):.1f}" for p in phases)
                     + f" | {r['chosen'].get('neuron_ratio', '')} | {r['unlearn_epochs']} | {ft.get('epochs', '')} "
                     f"| {100 * r['acc']:.1f} | {100 * r['asr']:.1f} | {r['load_start']} -> {r['load_end']} |")
    for which in ("auto", "fixed"):
        w = [r["wall_s"] for r in runs if r["which"] == which]
        if w:
            each = ", ".join(f"{v:.1f}" for v in w)
            lines.append(f"\n{which}: mean {np.mean(w):.1f} s over {len(w)} run(s) ({each})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
