"""Repair strength (issue 10): the automatic TSBD's rule for ``n`` against the width rule, clean models included.

    python bench/strength_bench.py --profile mnist --out bench/results/strength_mnist.md    # 2 CPU cores
    python bench/strength_bench.py --profile digits --out bench/results/strength_digits.md  # 8x8 digits, ResNet-20
    python bench/strength_bench.py --profile cifar_r20 --out bench/results/strength_r20.md  # GPU (or a long CPU run)

Per model (a clean one, then one per attack: 10% poisoning, target 0) it runs each variant of the repair on the
same defender subset and reports ACC / ASR on held-out test images, the chosen ``n`` and the time; poisoned data
only measure. Every variant runs with ``clean_check: "off"`` so that the rule itself is measured on the clean
model too; ``--detect`` also scans each model with the trigger-free detector and reports what the automatic
method's clean check would have done with that verdict. Models and data come from ``bench/repair_bench.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.repair_bench import CIFAR_NORM, PROFILES, Profile, build_model, load_data, split_data  # noqa: E402
from core.attacks.base import make_backdoor_test_set, poison_training_set  # noqa: E402
from core.attacks.registry import create_attack  # noqa: E402
from core.data.imageset import ImageSet  # noqa: E402
from core.data.transforms import Normalization  # noqa: E402
from core.defenses.registry import repair  # noqa: E402
from core.metrics import evaluate  # noqa: E402
from core.training import train_classifier  # noqa: E402

# "tsbd" is the committed default (width rule, adaptive stage 2, augmentation scaled to the image); "tsbd_width"
# the automatic method before issue 10 (width rule, configured stage 2), with the profile's augmentation
WIDTH = {"auto_rule": "width", "finetune_adaptive": False}
PROFILE_VARIANTS: dict[str, dict[str, tuple[str, dict[str, object]]]] = {
    # the repair bench's CPU profile turns augmentation off (flips corrupt digits); the new default keeps it on
    # with flips read from the model and padding scaled to the side
    "mnist": {"tsbd": ("tsbd", {}), "tsbd_recovery": ("tsbd", {"auto_rule": "recovery"}),
              "tsbd_width": ("tsbd", {**WIDTH, "augment": False}),
              "tsbd_fixed": ("tsbd_fixed", {"augment": False})},
    "digits": {"tsbd": ("tsbd", {}), "tsbd_width": ("tsbd", {**WIDTH, "augment": False}),
               "tsbd_width_aug_old": ("tsbd", {**WIDTH, "crop_padding": 4, "augment_flip": "on"}),
               "tsbd_recovery": ("tsbd", {"auto_rule": "recovery"}),
               "tsbd_fixed": ("tsbd_fixed", {"augment": False})},
    "cifar_r20": {"tsbd": ("tsbd", {}), "tsbd_recovery": ("tsbd", {"auto_rule": "recovery"}),
                  "tsbd_width": ("tsbd", WIDTH), "tsbd_fixed": ("tsbd_fixed", {})},
}
BENCH_PROFILES: dict[str, Profile] = {
    "mnist": dataclasses.replace(PROFILES["cpu"], attacks=("none", "badnets", "blended", "sig"),
                                 repair_params={"batch_size": 128, "lr_unlearn": 1e-3}),
    # the demo's model (cli/demo.py): ResNet-20 on scikit-learn's 1,797 8x8 digits; 300 defender images
    "digits": Profile("resnet20", "digits", 1_200, 300, 297, 8, 0.05, 64, ("none", "badnets", "blended"), (),
                      {"batch_size": 32}, augment=False),
    # the case: CIFAR-10 ResNet-20 (688 covered channels), 2,500 defender images
    "cifar_r20": Profile("resnet20", "cifar10", 17_500, 2_500, 2_000, 40, 0.05, 128,
                         ("none", "badnets", "blended", "sig"), (), {}),
}


def _digits() -> tuple[ImageSet, ImageSet]:
    from cli.demo import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data))
    return data.subset(np.sort(order[:1_200])), data.subset(np.sort(order[1_200:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(BENCH_PROFILES), required=True)
    ap.add_argument("--data", help="a .npz with x_train, y_train, x_test, y_test (default: the cached set)")
    ap.add_argument("--out", default="strength_bench.md")
    ap.add_argument("--attacks", help="comma-separated subset of the profile's models ('none' = clean)")
    ap.add_argument("--variants", help="comma-separated subset of the profile's variants")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--detect", action="store_true", help="scan every model with the trigger-free detector")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    prof = BENCH_PROFILES[args.profile]
    if args.attacks:
        prof = dataclasses.replace(prof, attacks=tuple(args.attacks.split(",")))
    variants = PROFILE_VARIANTS[args.profile]
    if args.variants:
        variants = {k: variants[k] for k in args.variants.split(",")}
    if prof.dataset == "digits":
        train, rest = _digits()
        defender, test = rest.subset(np.arange(prof.n_defender)), rest.subset(np.arange(prof.n_defender, len(rest)))
        norm = Normalization((0.5,), (0.5,))
    else:
        train_all, test_all = load_data(prof, args.data)
        train, defender, test, _ = split_data(train_all, test_all, prof, args.seed)
        norm = CIFAR_NORM if prof.dataset == "cifar10" else Normalization()
    num_classes = 10
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report: dict[str, object] = {"profile": args.profile, "config": dataclasses.asdict(prof), "device": args.device,
                                 "cpu": platform.processor(), "torch": torch.__version__, "commit": commit,
                                 "command": " ".join(sys.argv), "models": {}}
    started = time.perf_counter()
    for name in prof.attacks:
        poisoned, backdoor = train, None
        if name != "none":
            attack = create_attack(name, target=0, image_shape=train.image_shape, seed=args.seed)
            poisoned = poison_training_set(attack, train, 0.1, num_classes, args.seed).data
            backdoor = make_backdoor_test_set(attack, test, num_classes)
        torch.manual_seed(args.seed)
        model = build_model(prof, train.image_shape[2], num_classes)
        train_classifier(model, poisoned, norm, prof.epochs, prof.lr, prof.batch_size, args.device,
                         augment=prof.augment, seed=args.seed)
        model.eval()
        before = evaluate(model, test, backdoor, norm, args.device)
        entry: dict[str, object] = {"before": {"acc": before.acc, "asr": before.asr}, "variants": {}}
        print(f"[{name}] ACC {before.acc:.3f} ASR {before.asr}", flush=True)
        if args.detect:
            from core.detect import scan_model

            t0 = time.perf_counter()
            det = scan_model(model, defender, norm, None, args.device, num_classes, args.seed)
            entry["verdict"] = {"label": det.verdict, "score": det.score, "seconds": time.perf_counter() - t0}
            print(f"[{name}] detector: {det.verdict} ({det.score:.2f})", flush=True)
        for label, (method, extra) in variants.items():
            params = {**prof.repair_params, **extra, "clean_check": "off"}
            res = repair(method, model, defender, norm, params, args.device, num_classes, seed=args.seed)
            after = evaluate(res.model, test, backdoor, norm, args.device)
            ft = res.details.get("finetune", {})
            entry["variants"][label] = {"acc": after.acc, "asr": after.asr, "n": res.params.get("neuron_ratio"),
                                        "seconds": res.timings.get("total"), "timings": res.timings,
                                        "chosen": res.chosen, "probe_steps": res.details.get("auto", {}).get(
                                            "probe_steps", 0), "finetune_steps": ft.get("steps"),
                                        "details": res.details}
            print(f"[{name}] {label}: ACC {after.acc:.3f} ASR {after.asr} n={res.params.get('neuron_ratio')} "
                  f"({res.timings.get('total', 0):.1f}s)", flush=True)
        report["models"][name] = entry
        report["total_s"] = time.perf_counter() - started
        out = Path(args.out)
        out.write_text(render(report))
        out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    print(Path(args.out).read_text())


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def render(report: dict) -> str:
    lines = [f"# strength bench, profile {report['profile']} (commit {report['commit']}, {report['device']}, "
             f"torch {report['torch']}, {report.get('total_s', 0):.0f} s)", "", f"`{report['command']}`", "",
             "| model | before ACC / ASR | variant | n | ACC / ASR after | ACC drop | probe + stage-2 steps | s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in report["models"].items():
        b = e["before"]
        verdict = f" (detector: {e['verdict']['label']})" if "verdict" in e else ""
        for label, v in e["variants"].items():
            lines.append(f"| {name}{verdict} | {_pct(b['acc'])} / {_pct(b['asr'])} | {label} | {v['n']} | "
                         f"{_pct(v['acc'])} / {_pct(v['asr'])} | {100 * (b['acc'] - v['acc']):.1f} | "
                         f"{v['probe_steps']} + {v['finetune_steps']} | {v['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
