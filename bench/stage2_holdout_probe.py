"""Stage 2 stopped on held-out loss (issue 10, BENCHMARKS.md §2.14): the whole step budget's trajectory.

Loads a model of ``bench/repair_bench.py`` from ``--model-cache`` (same split, seed, attack and cache name as the
bench; it must have been trained there), runs the repair ``--method`` with the held-out stop switched on but its
patience set to the budget (``--patience 300``), so every epoch of the budget runs, and records after every epoch
the held-out part's loss and accuracy (what the repair reads) next to the test ACC and ASR (what it cannot read;
measured here only). The epoch a given patience would keep follows from the curve: the stop is deterministic,
and the trajectory up to it does not depend on the patience (the schedule is set from the budget).

    OMP_NUM_THREADS=1 nice -n 10 python bench/stage2_holdout_probe.py --profile cpu_resnet20 --attack badnets \
        --method tsbd --model-cache ~/.cache/antidote/models --out bench/results/stage2_holdout_curves.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.repair_bench import (  # noqa: E402
    CIFAR_NORM,
    CLEAN_MODEL,
    PROFILES,
    build_model,
    load_data,
    model_cache_path,
    split_data,
)
from core.attacks.base import make_backdoor_test_set  # noqa: E402
from core.attacks.registry import create_attack  # noqa: E402
from core.data.transforms import Normalization  # noqa: E402
from core.defenses.registry import repair  # noqa: E402
from core.defenses.tsbd import finetune as stage2  # noqa: E402
from core.metrics import evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), required=True)
    ap.add_argument("--attack", required=True)
    ap.add_argument("--method", default="tsbd", choices=("tsbd", "tsbd_fixed", "finetune"))
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--patience", type=int, default=300, help="300: the whole budget runs")
    ap.add_argument("--params", default="{}", help="JSON: further repair parameters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-cache", required=True)
    ap.add_argument("--out", required=True, help="a .jsonl file; one row per run is appended")
    args = ap.parse_args(argv)

    prof = PROFILES[args.profile]
    train_all, test_all = load_data(prof, None)
    num_classes = int(max(train_all.y.max(), test_all.y.max()) + 1)
    norm = CIFAR_NORM if prof.dataset == "cifar10" and train_all.image_shape[2] == 3 else Normalization()
    train, defender, test, _ = split_data(train_all, test_all, prof, args.seed)
    attack = create_attack("badnets" if args.attack == CLEAN_MODEL else args.attack, target=0,
                           image_shape=train.image_shape, seed=args.seed)
    backdoor = make_backdoor_test_set(attack, test, num_classes)
    cached = model_cache_path(args.model_cache, prof, args.attack, args.seed, len(train))
    if cached is None or not cached.exists():
        raise SystemExit(f"no cached model at {cached}: train it with bench/repair_bench.py --model-cache first")
    torch.manual_seed(args.seed)
    model = build_model(prof, train.image_shape[2], num_classes)
    model.load_state_dict(torch.load(cached, map_location="cpu"))
    before = evaluate(model, test, backdoor, norm, "cpu")

    rows: list[dict[str, float]] = []
    real = stage2.HeldOutStop.after_epoch

    def after_epoch(self, m, epoch):  # type: ignore[no-untyped-def]
        stop = real(self, m, epoch)
        e = evaluate(m, test, backdoor, norm, "cpu")
        rows.append({**self.curve[-1], "test_acc": e.acc, "test_asr": e.asr})
        m.train()
        print(json.dumps(rows[-1]), flush=True)
        return stop

    stage2.HeldOutStop.after_epoch = after_epoch  # type: ignore[method-assign]
    params = {**prof.repair_params, **json.loads(args.params)}
    if args.method == "finetune":
        params = {k: v for k, v in params.items() if k not in ("lr_unlearn",)}
        params |= {"holdout": args.holdout, "patience": args.patience}
    else:
        params |= {"finetune_holdout": args.holdout, "finetune_patience": args.patience}
    t0 = time.perf_counter()
    res = repair(args.method, model, defender, norm, params, "cpu", num_classes, seed=args.seed)
    seconds = time.perf_counter() - t0
    account = res.details.get("holdout") or res.details["finetune"]["holdout"]
    after = evaluate(res.model, test, backdoor, norm, "cpu")
    row = {"profile": args.profile, "attack": args.attack, "method": args.method, "seed": args.seed,
           "params": params, "before": {"acc": before.acc, "asr": before.asr},
           "after_kept": {"acc": after.acc, "asr": after.asr, "ra": after.ra}, "seconds_incl_measuring": seconds,
           "kept_epoch": account["best_epoch"], "epochs_run": account["epochs_run"], "chosen": res.chosen,
           "curve": [account["curve"][0], *rows], "torch": torch.__version__, "threads": torch.get_num_threads()}
    for p in (3, 5, 10):  # what each patience would have kept (the first epoch that many evaluations after a best)
        best, best_epoch = np.inf, 0
        for r in rows:
            if r["loss"] < best:
                best, best_epoch = r["loss"], r["epoch"]
            elif r["epoch"] - best_epoch >= p:
                break
        row[f"kept_with_patience_{p}"] = best_epoch
    with open(args.out, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "curve"}, default=str))


if __name__ == "__main__":
    main()
