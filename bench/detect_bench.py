"""Detection benchmark: clean and backdoored models of one architecture, every detector on each with only the
defender's clean subset, and the verdict's ROC-AUC, true-positive and false-alarm rates.

    python bench/detect_bench.py --profile cpu --out bench/results/detect_cpu.md    # small CNN, MNIST, 2 cores
    python bench/detect_bench.py --profile gpu --data .carry/cifar10.npz --out bench/results/detect_gpu.md
    python bench/detect_bench.py --profile gpu --tiny --data x.npz --out /tmp/smoke.md  # code-path smoke run (CPU ok)
    python bench/detect_bench.py --time-resnet20 --out bench/results/detect_resnet20_cpu.md  # one timed scan

Trained models are cached under ``.bench-data/detect/<profile>/`` (git-ignored), so reruns only scan. The GPU
profile reads CIFAR-10 from the ``.npz`` that ``bench/make_carry.py`` writes (the device machine is offline).
Writes a markdown report to ``--out`` and the raw numbers next to it with ``.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datasets import load_cifar10, load_mnist, load_npz_pair  # noqa: E402
from bench.repair_bench import CIFAR_NORM, small_cnn, split_data  # noqa: E402
from core.attacks.base import make_backdoor_test_set, poison_training_set  # noqa: E402
from core.attacks.clb import CLB, clb_poison_training_set  # noqa: E402
from core.attacks.iab import train_iab  # noqa: E402
from core.attacks.registry import create_attack  # noqa: E402
from core.data.imageset import ImageSet  # noqa: E402
from core.data.transforms import Normalization  # noqa: E402
from core.detect import DetectConfig, scan_model  # noqa: E402
from core.metrics import evaluate  # noqa: E402
from core.models.registry import create_model  # noqa: E402
from core.training import train_classifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-data" / "detect"


@dataclass(frozen=True)
class Subject:
    """One benchmark model: ``attack`` None is clean; ``a2a`` the all-to-all variant."""

    label: str
    attack: str | None
    target: int = 0
    seed: int = 0
    a2a: bool = False


SUBJECTS: tuple[Subject, ...] = (
    *(Subject(f"clean_s{s}", None, seed=s) for s in range(10)),
    Subject("badnets", "badnets"), Subject("blended", "blended"), Subject("sig", "sig"),
    Subject("wanet", "wanet"), Subject("lowfreq", "lowfreq"), Subject("iab", "iab"), Subject("clb", "clb"),
    Subject("badnets_a2a", "badnets", a2a=True),
    Subject("badnets_t3", "badnets", target=3, seed=1), Subject("blended_t5", "blended", target=5, seed=1),
    Subject("lowfreq_t7", "lowfreq", target=7, seed=1),
)


@dataclass(frozen=True)
class Profile:
    architecture: str
    dataset: str
    n_train: int
    n_defender: int
    n_test: int
    epochs: int
    lr: float
    batch_size: int
    augment: bool
    iab_mask_epochs: int
    detect: dict[str, object]


PROFILES = {
    # MNIST, a 6-layer CNN (bench/repair_bench.py), no augmentation (flips corrupt digits)
    # ~25 min on 2 shared cores; the scan settings are cut to fit (docs/detect.md gives the defaults' cost)
    "cpu": Profile("small_cnn", "mnist", 4_000, 300, 1_000, 4, 0.05, 64, False, 2,
                   {"nc_steps": 150, "nc_batch_size": 6, "up_steps": 300, "mm_steps": 100, "mm_starts": 4,
                    "mm_lr": 0.1, "unlearn_max_epochs": 5}),
    # CIFAR-10, PreAct-ResNet18 as the repair benchmark (40 epochs are enough for a backdoor to take)
    "gpu": Profile("preactresnet18", "cifar10", 17_500, 2_500, 10_000, 40, 0.01, 256, True, 10,
                   {"nc_batch_size": 32}),
}


# the --tiny scan: a few steps of every detector, enough to run each code path once
TINY_DETECT = {"nc_steps": 3, "up_steps": 3, "nc_batch_size": 4, "mm_steps": 3, "mm_starts": 1,
               "unlearn_max_epochs": 1}


def reseeded(subjects: tuple[Subject, ...], seeds: list[int]) -> tuple[Subject, ...]:
    """The ``subjects`` retrained with each of ``seeds`` (weights, poisoned subset and the attack's own random
    pattern): held-out models for a rule chosen on the default ones. A clean model is labelled
    ``clean_s<seed>``, a backdoored one ``<label>_s<seed>``; duplicates (clean_s0 and clean_s1 under one seed)
    are kept once."""
    out: dict[str, Subject] = {}
    for subj in subjects:
        for seed in seeds:
            label = f"clean_s{seed}" if subj.attack is None else f"{subj.label}_s{seed}"
            out.setdefault(label, dataclasses.replace(subj, label=label, seed=seed))
    return tuple(out.values())


def build_model(prof: Profile, in_channels: int, num_classes: int) -> nn.Module:
    if prof.architecture == "small_cnn":
        return small_cnn(in_channels, num_classes)
    return create_model(prof.architecture, num_classes, in_channels)


def train_subject(subj: Subject, prof: Profile, train: ImageSet, test: ImageSet, norm: Normalization,
                  num_classes: int, device: str, surrogate: nn.Module | None) -> tuple[nn.Module, dict]:
    """Train one model (clean or backdoored) and measure its ACC and, when backdoored, ASR on the test set."""
    torch.manual_seed(subj.seed)
    model = build_model(prof, train.image_shape[2], num_classes)
    t0 = time.perf_counter()
    backdoor = None
    if subj.attack == "iab":
        # the generator and the classifier learn together: 3x the epochs, or the backdoor does not take
        model, attack = train_iab(model, train, norm, target=subj.target, epochs=3 * prof.epochs, lr=prof.lr,
                                  batch_size=prof.batch_size, device=device, seed=subj.seed,
                                  mask_epochs=prof.iab_mask_epochs)
        backdoor = make_backdoor_test_set(attack, test, num_classes)
    else:
        data = train
        if subj.attack == "clb":
            attack = CLB(image_shape=train.image_shape, target=subj.target)
            data = clb_poison_training_set(attack, train, 0.1, num_classes, subj.seed, surrogate, norm,
                                           device).data
        elif subj.attack is not None:
            attack = create_attack(subj.attack, target=subj.target, image_shape=train.image_shape, seed=subj.seed,
                                   **({"all_to_all": True} if subj.a2a else {}))
            data = poison_training_set(attack, train, 0.1, num_classes, subj.seed).data
        if subj.attack is not None:
            backdoor = make_backdoor_test_set(attack, test, num_classes)
        train_classifier(model, data, norm, prof.epochs, prof.lr, prof.batch_size, device,
                         augment=prof.augment, seed=subj.seed)
    ev = evaluate(model, test, backdoor, norm, device)
    return model, {"train_s": time.perf_counter() - t0, "acc": ev.acc, "asr": ev.asr}


def auroc(pos: list[float], neg: list[float]) -> float | None:
    """P(score of a backdoored model > score of a clean one), ties counting half (Mann-Whitney)."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _nlp(p: float) -> float:
    return -float(np.log10(max(p, 1e-300)))


def row_signals(res) -> dict[str, object]:
    d = res.detectors
    out: dict[str, object] = {"verdict": res.verdict, "score": res.score, "p": res.evidence["p_value"],
                              "targets": res.suspected_targets}
    for key, name in (("nc", "neural_cleanse"), ("up", "universal_perturbation"), ("fi", "feature_inversion")):
        if name in d:
            r = d[name]
            out.update({f"{key}_p": r.statistic, f"{key}_targets": r.suspected_targets,
                        f"{key}_min_class": r.details["smallest_class"],
                        f"{key}_score": max(r.details["outlier_score_per_class"]), f"{key}_s": r.seconds})
            if key == "nc":
                out["nc_index"] = r.details["anomaly_index"]
    if "untargeted" in d:
        ut = d["untargeted"]
        fam = ut.details["families"][ut.details["family"]]
        out.update(ut_p=ut.statistic, ut_score=fam["score"], ut_ratio=fam["ratio_to_smallest"],
                   ut_distinct=fam["distinct_targets"], ut_success=fam["success"], ut_steps=fam["steps"],
                   ut_map={s: (m["to"], round(m["share"], 2)) for s, m in fam["mapping"].items()}, ut_s=ut.seconds)
    # the two inversions' verdict alone (m = 2), to see what adding a voting detector costs them
    two = [out[k] for k in ("nc_p", "up_p") if k in out]
    if two:
        out["p_nc_up"] = min(1.0, len(two) * min(two))
    if "max_margin" in d:
        mm = d["max_margin"]
        out.update(mm_p=mm.statistic, mm_class=mm.details["largest_margin_class"],
                   mm_ratio=mm.details["margin_ratio_to_median_of_others"], mm_s=mm.seconds)
    if "unlearning" in d:
        un = d["unlearning"]
        out.update(nwc_share=un.statistic, nwc_gini=un.details["gini"], un_s=un.seconds)
    return out


def _fmt_p(r: dict, key: str) -> str:
    return "—" if key not in r else f"{r[key]:.2g}"


def markdown(report: dict) -> str:
    rows = report["models"]
    lines = [f"# Detection benchmark — profile `{report['profile']}`", "",
             f"Machine: {report['machine']}; torch {report['torch']}; commit `{report['commit']}`; "
             f"command: `{report['command']}`.", "",
             f"{report['config']['architecture']} on {report['config']['dataset']}: "
             f"{report['config']['n_train']} training images, {report['n_defender']} clean defender images "
             f"(all the detectors see), {report['n_test']} test images for ACC/ASR. Detect config: "
             f"`{json.dumps(report['detect_config'])}`.", "",
             "p-values: NC = Neural Cleanse's outlier test on log mask sizes, UP = the universal perturbation's "
             "on log perturbation norms, FI = the feature inversion's on log feature-shift sizes (each against its "
             "simulated null), UT = the untargeted (all-to-all) test "
             "(its untargeted patch size u against the targeted ones; u/min s its ratio to the smallest; map: the "
             "distinct labels the sources go to under it; more than half the classes: no dominant label, at least "
             f"suspicious), combined = the {report['detect_config'].get('combination', 'bonferroni')} combination "
             f"over the voting detectors ({', '.join(report['detect_config']['voting_detectors'])}; NC+UP: "
             "min(1, 2 x the smaller) over NC and UP only, the old default); NC index = Neural Cleanse's "
             "classic MAD anomaly index (log sizes, small side), evidence only; "
             "smallest = the class with the smallest trigger (NC / UP / FI).", "",
             "| model | ACC | ASR | verdict | combined p | NC+UP p | NC p | UP p | FI p | UT p | u/min s "
             "| UT map distinct | NC index | smallest NC/UP/FI | MM-BD p (class) | NWC top-5% | target found "
             "| scan s (FI s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        asr = "—" if r["asr"] is None else f"{r['asr']:.3f}"
        found = {True: "yes", False: "no", None: "—"}[r["target_found"]]
        mm = "—" if "mm_p" not in r else f"{r['mm_p']:.2g} ({r['mm_class']})"
        lines.append(
            f"| {r['label']} | {r['acc']:.3f} | {asr} | **{r['verdict']}** {r['targets']} | {r['p']:.2g} | "
            f"{_fmt_p(r, 'p_nc_up')} | {_fmt_p(r, 'nc_p')} | {_fmt_p(r, 'up_p')} | {_fmt_p(r, 'fi_p')} | "
            f"{_fmt_p(r, 'ut_p')} | {_fmt_p(r, 'ut_ratio')} | {r.get('ut_distinct', '—')} | "
            f"{r.get('nc_index', float('nan')):.2f} | "
            f"{r.get('nc_min_class', '—')}/{r.get('up_min_class', '—')}/{r.get('fi_min_class', '—')} | {mm} | "
            f"{r.get('nwc_share', float('nan')):.3f} | {found} | {r['scan_s']:.1f} "
            f"({r.get('fi_s', float('nan')):.1f}) |")
    s = report["summary"]
    lines += ["", "| signal | ROC-AUC (backdoored vs clean) |", "|---|---|"]
    for k, v in s["auroc"].items():
        lines.append(f"| {k} | {'n/a' if v is None else f'{v:.3f}'} |")
    lines += ["", f"- Flagged (verdict suspicious or backdoored): TPR {s['tpr_flagged']:.3f} "
              f"({s['n_flagged_bd']}/{s['n_backdoored']}), false alarms on clean models "
              f"{s['fpr_flagged']:.3f} ({s['n_flagged_clean']}/{s['n_clean']}).",
              f"- Verdict backdoored: TPR {s['tpr_backdoored']:.3f} ({s['n_backdoored_bd']}/{s['n_backdoored']}), "
              f"false alarms {s['fpr_backdoored']:.3f} ({s['n_backdoored_clean']}/{s['n_clean']}).",
              f"- Smallest combined p on a clean model: {s['min_clean_p']:.3g}.",
              f"- NC+UP alone (m = 2): flagged {s['n_flagged_bd_nc_up']}/{s['n_backdoored']} backdoored "
              f"({s['n_backdoored_bd_nc_up']} at p < 0.01), {s['n_flagged_clean_nc_up']}/{s['n_clean']} clean.",
              f"- Target named (all-to-one models with an alarm): {s['targets_found']}/{s['targets_possible']}; "
              f"smallest NC / UP / FI trigger on the target (all all-to-one models): {s['nc_smallest_is_target']} / "
              f"{s['up_smallest_is_target']} / {s.get('fi_smallest_is_target', 0)} of {s['n_all_to_one']}.",
              f"- Mean scan time {s['mean_scan_s']:.1f} s per model (max {s['max_scan_s']:.1f} s); "
              f"total wall time {report['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict]) -> dict:
    bd = [r for r in rows if r["attack"] is not None]
    cl = [r for r in rows if r["attack"] is None]

    def sig(r: dict, key: str) -> float:
        if key in ("p", "nc_p", "up_p", "fi_p", "mm_p", "ut_p", "p_nc_up"):
            return _nlp(r.get(key, 1.0))
        if key == "ut_neg_ratio":
            return -float(r["ut_ratio"])
        return float(r.get(key, 0.0))

    keys = {"combined -log10 p (the verdict's)": "p", "NC+UP combined -log10 p (m = 2)": "p_nc_up",
            "Neural Cleanse -log10 p": "nc_p", "universal perturbation -log10 p": "up_p",
            "feature inversion -log10 p": "fi_p",
            "untargeted -log10 p": "ut_p", "untargeted u/min s (smaller: more suspicious)": "ut_neg_ratio",
            "Neural Cleanse MAD anomaly index": "nc_index",
            "MM-BD -log10 p": "mm_p", "NWC top-5% share": "nwc_share", "NWC Gini": "nwc_gini"}
    au = {name: auroc([sig(r, k) for r in bd], [sig(r, k) for r in cl]) for name, k in keys.items()
          if all((k if k != "ut_neg_ratio" else "ut_ratio") in r for r in rows)}
    flagged = [r for r in bd if r["verdict"] != "clean"]
    possible = [r for r in flagged if r["target_found"] is not None]
    one = [r for r in bd if r["target"] is not None]
    times = [r["scan_s"] for r in rows]
    return {"auroc": au, "n_backdoored": len(bd), "n_clean": len(cl), "n_flagged_bd": len(flagged),
            "n_flagged_clean": sum(r["verdict"] != "clean" for r in cl),
            "tpr_flagged": len(flagged) / max(1, len(bd)),
            "fpr_flagged": sum(r["verdict"] != "clean" for r in cl) / max(1, len(cl)),
            "n_backdoored_bd": sum(r["verdict"] == "backdoored" for r in bd),
            "n_backdoored_clean": sum(r["verdict"] == "backdoored" for r in cl),
            "tpr_backdoored": sum(r["verdict"] == "backdoored" for r in bd) / max(1, len(bd)),
            "fpr_backdoored": sum(r["verdict"] == "backdoored" for r in cl) / max(1, len(cl)),
            "min_clean_p": min((r["p"] for r in cl), default=float("nan")),
            "n_flagged_clean_nc_up": sum(r.get("p_nc_up", 1.0) < 0.05 for r in cl),
            "n_flagged_bd_nc_up": sum(r.get("p_nc_up", 1.0) < 0.05 for r in bd),
            "n_backdoored_bd_nc_up": sum(r.get("p_nc_up", 1.0) < 0.01 for r in bd),
            "targets_found": sum(bool(r["target_found"]) for r in possible), "targets_possible": len(possible),
            "n_all_to_one": len(one),
            "nc_smallest_is_target": sum(r.get("nc_min_class") == r["target"] for r in one),
            "up_smallest_is_target": sum(r.get("up_min_class") == r["target"] for r in one),
            "fi_smallest_is_target": sum(r.get("fi_min_class") == r["target"] for r in one),
            "mean_scan_s": float(np.mean(times)), "max_scan_s": float(np.max(times))}


def time_resnet20(args: argparse.Namespace) -> None:
    """One scan of a CIFAR ResNet-20 with 2,500 clean CIFAR-10 images (a briefly trained model: the scan's
    cost does not depend on the weights, only the early stop could shorten it)."""
    train_all, test_all = load_npz_pair(Path(args.data)) if args.data else load_cifar10()
    clean = test_all.subset(np.arange(2500))
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 3)
    t0 = time.perf_counter()
    train_classifier(model, train_all.subset(np.arange(2000)), CIFAR_NORM, 1, 0.05, 128, args.device)
    train_s = time.perf_counter() - t0
    cfg = DetectConfig(**json.loads(args.detect)) if args.detect else DetectConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    res = scan_model(model.to(args.device), clean, CIFAR_NORM, cfg, args.device, 10, seed=0)
    scan_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    out = {"machine": machine(args.device), "commit": commit(), "command": " ".join(sys.argv),
           "train_s": train_s, "scan_s": scan_s, "scan_cpu_s": cpu_s, "verdict": res.verdict,
           "detector_s": {k: v.seconds for k, v in res.detectors.items()}, "config": dataclasses.asdict(cfg)}
    Path(args.out).with_suffix(".json").write_text(json.dumps(out, indent=2))
    Path(args.out).write_text(
        f"# One scan of a CIFAR ResNet-20, 2,500 clean images\n\nMachine: {out['machine']}; commit "
        f"`{out['commit']}`; command: `{out['command']}`.\n\nScan: **{scan_s:.1f} s** wall, {cpu_s:.1f} s of CPU "
        f"time (with {torch.get_num_threads()} thread(s), the wall time a quiet machine would need at most) (" +
        ", ".join(f"{k} {v:.1f} s" for k, v in out["detector_s"].items()) +
        f"); verdict {res.verdict} on a model trained for one epoch on 2,000 images.\n")
    print(Path(args.out).read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--data", help="a .npz with x_train, y_train, x_test, y_test (default: the cached set)")
    ap.add_argument("--out", default="bench/results/detect_cpu.md")
    ap.add_argument("--tiny", action="store_true", help="smoke run: 2 clean + badnets + blended, small sizes")
    ap.add_argument("--models", help="comma-separated subset of the subject labels")
    ap.add_argument("--detectors", default="neural_cleanse,universal_perturbation,max_margin,unlearning")
    ap.add_argument("--cache", help="where trained models are cached (default .bench-data/detect/<profile>)")
    ap.add_argument("--seeds", help="comma-separated seeds: train and scan the selected models again with each "
                                    "(held-out models, labelled clean_s<seed> / <label>_s<seed>)")
    ap.add_argument("--detect", help="JSON overrides of DetectConfig (on top of the profile's)")
    ap.add_argument("--rescan", action="store_true", help="scan again even where a kept scan matches")
    ap.add_argument("--train-only", action="store_true", help="train and cache the models, scan nothing")
    ap.add_argument("--time-resnet20", action="store_true", help="only time one ResNet-20 scan (CIFAR-10)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.time_resnet20:
        time_resnet20(args)
        return
    prof = PROFILES[args.profile]
    subjects = SUBJECTS
    if args.tiny:  # a smoke run of the code path (any profile, on the CPU too): its numbers mean nothing
        prof = dataclasses.replace(prof, n_train=256, n_defender=40, n_test=100, epochs=1, iab_mask_epochs=1,
                                   detect={**prof.detect, **TINY_DETECT})
        subjects = tuple(s for s in SUBJECTS if s.label in ("clean_s0", "clean_s1", "badnets", "blended"))
    if args.models:
        wanted = set(args.models.split(","))
        subjects = tuple(s for s in SUBJECTS if s.label in wanted)
    if args.seeds:
        subjects = reseeded(subjects, [int(x) for x in args.seeds.split(",")])
    torch.backends.cudnn.benchmark = True
    if args.data:
        train_all, test_all = load_npz_pair(Path(args.data))
    else:
        train_all, test_all = load_cifar10() if prof.dataset == "cifar10" else load_mnist()
    num_classes = int(max(train_all.y.max(), test_all.y.max()) + 1)
    norm = CIFAR_NORM if prof.dataset == "cifar10" else Normalization()
    train, defender, test, _ = split_data(train_all, test_all, prof, 0)
    detect_params = {**prof.detect, "detectors": tuple(args.detectors.split(",")),
                     **(json.loads(args.detect) if args.detect else {})}
    cfg = DetectConfig(**detect_params)
    cache = Path(args.cache) if args.cache else CACHE / (args.profile + ("_tiny" if args.tiny else ""))
    cache.mkdir(parents=True, exist_ok=True)
    # scans are kept per model under a key of the config and the detector code, so that a run split over
    # several processes (--models) is assembled by one more run, and a code change rescans
    code = "".join(p.read_text() for p in sorted((ROOT / "core" / "detect").glob("*.py")))
    scan_key = hashlib.sha256((json.dumps(dataclasses.asdict(cfg), sort_keys=True) + code +
                               str(len(defender))).encode()).hexdigest()[:12]
    started = time.perf_counter()
    models: dict[str, nn.Module] = {}
    rows = []
    ordered = sorted(subjects, key=lambda s: s.attack == "clb")  # CLB's surrogate is a clean model
    if any(s.attack == "clb" for s in ordered) and not any(s.label == "clean_s0" for s in ordered):
        # CLB's surrogate is the default clean_s0 (held-out CLB models too: the attacker's surrogate is fixed)
        ordered.insert(0, SUBJECTS[0])
    for subj in ordered:
        path, meta_path = cache / f"{subj.label}.pt", cache / f"{subj.label}.json"
        model = build_model(prof, train.image_shape[2], num_classes)
        if path.exists() and meta_path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
            model.to(args.device).eval()
            meta = json.loads(meta_path.read_text())
        else:
            model, meta = train_subject(subj, prof, train, test, norm, num_classes, args.device,
                                        models.get("clean_s0"))
            torch.save(model.state_dict(), path)
            meta_path.write_text(json.dumps(meta))
        models[subj.label] = model
        if subj not in subjects or args.train_only:
            print(f"[{subj.label}] cached: {meta}", flush=True)
            continue
        print(f"[{subj.label}] ACC {meta['acc']:.3f} ASR {meta['asr']} (trained in {meta['train_s']:.0f}s)",
              flush=True)
        scan_path = cache / f"{subj.label}.scan-{scan_key}.json"
        if scan_path.exists() and not args.rescan:  # a scan of this model with this config and code, kept
            row = json.loads(scan_path.read_text())
            rows.append(row)
            print(f"[{subj.label}] cached scan: {row['verdict']} p {row['p']:.3g}", flush=True)
            continue
        t0 = time.perf_counter()
        res = scan_model(model, defender, norm, cfg, args.device, num_classes, seed=0)
        scan_s = time.perf_counter() - t0
        row = {"label": subj.label, "attack": subj.attack, "target": None if subj.attack is None or subj.a2a
               else subj.target, **meta, "scan_s": scan_s, **row_signals(res),
               "evidence": res.evidence, "commit": commit()}
        row["target_found"] = (None if row["target"] is None or res.verdict == "clean"
                               else row["target"] in res.suspected_targets)
        rows.append(row)
        scan_path.write_text(json.dumps(row, default=float))
        print(f"[{subj.label}] {res.verdict} {res.suspected_targets} p {row['p']:.3g} NC p "
              f"{row.get('nc_p', 1):.3g} (smallest {row.get('nc_min_class')}) UP p {row.get('up_p', 1):.3g} "
              f"(smallest {row.get('up_min_class')}) MM p {row.get('mm_p', 1):.3g} cls {row.get('mm_class')} "
              f"NWC {row.get('nwc_share', float('nan')):.3f} ({scan_s:.1f}s)", flush=True)
    if args.train_only:
        return
    order = {s.label: i for i, s in enumerate((*SUBJECTS, *subjects))}
    rows.sort(key=lambda r: order[r["label"]])
    report = {"profile": args.profile, "tiny": args.tiny, "machine": machine(args.device), "torch": torch.__version__,
              "commit": commit(), "command": " ".join(["python", "bench/detect_bench.py", *(argv or sys.argv[1:])]),
              "config": dataclasses.asdict(prof),
              "detect_config": dataclasses.asdict(cfg), "n_defender": len(defender), "n_test": len(test),
              "models": rows, "summary": summarise(rows), "wall_s": time.perf_counter() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float))
    out.write_text(markdown(report))
    print(out.read_text())


if __name__ == "__main__":
    main()
