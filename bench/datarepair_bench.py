"""Detrimental-data repair benchmark (issue 11): every data-repair method on models trained on corrupted data.

Per data set (Fashion-MNIST, CIFAR-10; real data, bench/datasets.py) the training part is corrupted five ways
(rows): 20% and 40% symmetric label noise, 20% asymmetric label noise (class-pair flips), 20% corrupted inputs
(half Gaussian noise, half blur; labels kept) and 10% BadNets poisoning (core/attacks). A model is trained on each
row's data; every method then repairs it with a clean set training never saw. Per row and method: identification
precision / recall / AUROC against the known corrupted samples, ACC after (ASR for BadNets), the share of the gap
between the corrupted model and the same network trained on the uncorrupted data that the repair closes, time and
peak memory (RSS growth on the CPU, CUDA max allocated on a GPU).

    nice -n 10 python -m bench.datarepair_bench --profile cpu     # minutes on 2 cores: subsets, a small CNN
    python -m bench.datarepair_bench --profile gpu                # the issue's sizes: ResNet-20, clean 2,500/1,000
    python -m bench.datarepair_bench --profile gpu --tiny         # the GPU profile's code path at toy size (CPU)

A device machine has no network and a run carries at most 64 MiB: write one data set's split here, then run it
there (one data set per run): ``python -m bench.datarepair_bench --profile gpu --datasets cifar10 --write-carry
.carry`` here, ``python -m bench.datarepair_bench --profile gpu --datasets cifar10 --carry .carry`` there.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score

from core.attacks.base import make_backdoor_test_set, poison_training_set
from core.attacks.registry import create_attack
from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.datarepair.registry import repair_data
from core.metrics import evaluate
from core.models import create_model
from core.training import train_classifier

ROWS = ("sym20", "sym40", "asym20", "corrupt20", "badnets10")
# Asymmetric noise: the usual class-pair flips (Patrini et al. 2017 for CIFAR-10; similar-looking garments for
# Fashion-MNIST), each sample of a source class flipped with probability 0.2.
ASYM_FLIPS = {"cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
              "fmnist": {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 5}}
NORMS = {"cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
         "fmnist": Normalization((0.2860,), (0.3530,))}


@dataclass(frozen=True)
class Profile:
    """Sizes and budgets of one benchmark profile."""

    n_train: dict[str, int]
    n_clean: dict[str, int]
    n_test: int | dict[str, int]
    arch: str  # "small_cnn" or a core.models architecture
    train_epochs: int
    train_lr: float
    train_augment: bool
    methods: tuple[tuple[str, str, dict], ...]  # (label, method, params)


def _methods(train_epochs: int, budget: dict | None = None) -> tuple[tuple[str, str, dict], ...]:
    """Every method (and the two other scorers of retain); ``budget`` shortens the epochs of every method alike
    (the CPU profile), keeping the defaults otherwise."""
    b = budget or {}
    aug = b.get("augment", True)  # False where the model was trained without augmentation (the MLP)
    ident = {k: b[k] for k in ("calib_epochs",) if k in b} | ({} if aug else {"calib_augment": False})
    tune = {k: b[k] for k in ("epochs",) if k in b} | ({} if aug else {"augment": False})
    ft = ({"epochs": b["finetune_epochs"]} if "finetune_epochs" in b else {}) | ({} if aug else {"augment": False})
    return (
        ("retain", "retain", {**ident, **tune}),
        ("retain[tracin]", "retain", {"scorer": "tracin", **ident, **tune}),
        ("retain[cleanlab]", "retain", {"scorer": "cleanlab", **ident, **tune}),
        ("retain[ekfac]", "retain", {"scorer": "ekfac", **ident, **tune}),
        ("retain[drop_both]", "retain", {"drop_both_flagged": True, **ident, **tune}),
        ("drop_flagged", "drop_flagged", {**ident, **tune}),
        ("erase_flagged", "erase_flagged", {**ident, **ft}),
        ("retrain_without", "retrain_without",
         {"retrain_epochs": train_epochs, **ident, **({} if aug else {"retrain_augment": False})}),
        ("finetune_clean", "finetune_clean", ft),
    )


def _low_precision(budget: dict | None = None) -> tuple[tuple[str, str, dict], ...]:
    """The paper's claim, checked: flags of low precision (a loose null quantile, or the TracIn scorer), the same
    flags given to ``retain`` and to ``erase_flagged``."""
    base = [(label, method, p) for label, method, p in _methods(0, budget)
            if method in ("retain", "erase_flagged", "drop_flagged") and "scorer" not in p]
    out = []
    for extra, tag in (({"null_quantile": 0.6}, "q0.6"), ({"scorer": "tracin"}, "tracin")):
        out += [(f"{label}[{tag}]", method, {**p, **extra}) for label, method, p in base]
    return tuple(out)


PROFILES = {
    # 2 shared cores: 3,000 training images and a one-hidden-layer MLP (0.2M multiply-adds per image), trained
    # long enough (30 epochs, no augmentation) to fit its noisy labels; every method at its default epochs,
    # without crop+flip (an MLP is not translation invariant: the model never saw shifted images)
    "cpu": Profile({"fmnist": 3000, "cifar10": 3000}, {"fmnist": 1000, "cifar10": 500}, 2000, "mlp",
                   30, 0.05, False, _methods(30, {"augment": False})),
    # CIFAR-10 with a small CNN (crop+flip, 20 epochs) on 3,000 images: a CPU profile that can say something where
    # the MLP (39%) cannot; run it on a row or two with --only (each row trains two models and repairs)
    "cpu_cnn": Profile({"fmnist": 3000, "cifar10": 3000}, {"fmnist": 1000, "cifar10": 1000}, 1000, "small_cnn",
                       20, 0.05, True, _methods(20)),
    # the issue's clean sets (2,500 / 1,000); CIFAR-10's training part is what fits the 64 MiB a device run may
    # carry (--write-carry: 16,000 + 2,500 + 1,500 test images, compressed), Fashion-MNIST's is all of it
    "gpu": Profile({"fmnist": 59_000, "cifar10": 16_000}, {"fmnist": 1000, "cifar10": 2500},
                   {"fmnist": 5000, "cifar10": 1500}, "resnet20", 60, 0.1, True, _methods(60)),
}


def tiny(profile: Profile) -> Profile:
    """The profile's code path at toy size (runs on the CPU in seconds)."""
    methods = tuple((label, m, {**p, **({"retrain_epochs": 1} if m == "retrain_without" else {}),
                                **({"epochs": 1} if m != "retrain_without" else {}),
                                **({"calib_epochs": 1, "scratch_epochs": 1} if m != "finetune_clean" else {})})
                    for label, m, p in profile.methods)
    return replace(profile, n_train={k: 200 for k in profile.n_train}, n_clean={k: 60 for k in profile.n_clean},
                   n_test=100, train_epochs=1, methods=methods)


def small_cnn(in_channels: int, num_classes: int = 10) -> nn.Module:
    """Three conv blocks (16, 32, 64 channels) and a linear head: about 2M multiply-adds per 28x28 image."""
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*block(in_channels, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2),
                         *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def mlp(in_features: int, num_classes: int = 10, hidden: int = 256) -> nn.Module:
    """One hidden layer of 256 units and a linear head: cheap enough for the 2-core CPU profile."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def build(arch: str, image_shape: tuple[int, int, int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "mlp":
        return mlp(int(np.prod(image_shape)))
    if arch == "small_cnn":
        return small_cnn(image_shape[2])
    return create_model(arch, 10, image_shape[2])


def load(name: str) -> tuple[ImageSet, ImageSet]:
    from bench.datasets import load_cifar10, load_fashion_mnist

    return load_cifar10() if name == "cifar10" else load_fashion_mnist()


def carry_path(carry: Path, name: str) -> Path:
    return carry / f"datarepair_{name}.npz"


def split(name: str, profile: Profile, seed: int, carry: Path | None = None
          ) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(training, clean, test): disjoint seeded subsets; clean is held out of the training data. With ``carry``,
    read from the file ``--write-carry`` made (a device machine has no network)."""
    if carry is not None:
        with np.load(carry_path(carry, name), allow_pickle=False) as z:
            return tuple(ImageSet(z[f"x_{p}"], z[f"y_{p}"].astype(np.int64)) for p in ("train", "clean", "test"))
    train, test = load(name)
    order = np.random.default_rng(seed).permutation(len(train))
    n_tr, n_cl = min(profile.n_train[name], len(train) - profile.n_clean[name]), profile.n_clean[name]
    n_test = profile.n_test[name] if isinstance(profile.n_test, dict) else profile.n_test
    t_order = np.random.default_rng(seed + 1).permutation(len(test))[:n_test]
    return (train.subset(np.sort(order[:n_tr])), train.subset(np.sort(order[n_tr:n_tr + n_cl])),
            test.subset(np.sort(t_order)))


def _blur(x: np.ndarray) -> np.ndarray:
    """A 5x5 box blur per channel (edge-padded), on uint8 ``N×H×W×C``."""
    pad = np.pad(x.astype(np.float32), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    out = sum(pad[:, i:i + h, j:j + w] for i in range(5) for j in range(5)) / 25.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def corrupt(name: str, row: str, data: ImageSet, seed: int) -> tuple[ImageSet, np.ndarray, object]:
    """The row's corrupted training data, the known-bad mask and (BadNets) the attack."""
    rng = np.random.default_rng(seed)
    n = len(data)
    y, x = data.y.copy(), data.x.copy()
    if row.startswith("sym"):
        bad = np.zeros(n, bool)
        bad[rng.choice(n, round(int(row[3:]) / 100 * n), replace=False)] = True
        y[bad] = (y[bad] + rng.integers(1, 10, bad.sum())) % 10  # always a different class
        return ImageSet(x, y), bad, None
    if row == "asym20":
        flips = ASYM_FLIPS[name]
        bad = np.isin(y, list(flips)) & (rng.random(n) < 0.2)
        y[bad] = [flips[int(c)] for c in y[bad]]
        return ImageSet(x, y), bad, None
    if row == "corrupt20":
        bad = np.zeros(n, bool)
        idx = rng.choice(n, round(0.2 * n), replace=False)
        bad[idx] = True
        noisy, blurred = idx[: len(idx) // 2], idx[len(idx) // 2:]
        x[noisy] = np.clip(x[noisy] + rng.normal(0, 0.4 * 255, x[noisy].shape), 0, 255).astype(np.uint8)
        x[blurred] = _blur(x[blurred])
        return ImageSet(x, y), bad, None
    if row == "badnets10":
        attack = create_attack("badnets", target=0, image_shape=data.image_shape)
        poisoned = poison_training_set(attack, data, 0.1, 10, seed)
        bad = np.zeros(n, bool)
        bad[poisoned.poisoned_index] = True
        return poisoned.data, bad, attack
    raise ValueError(f"unknown row {row!r}")


class PeakMemory:
    """Peak memory of a block: CUDA max allocated on a GPU, else the RSS high-water growth (Linux)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    @staticmethod
    def _kib(key: str) -> int:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        return int(m.group(1)) if m else 0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        peak = torch.cuda.max_memory_allocated() if self.cuda else self._kib("VmHWM") * 1024
        self.mb = max(0, peak - self.base) / 2**20


def identification(bad: np.ndarray, flagged: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    """Precision, recall and AUROC of the flags / scores against the known-bad mask."""
    tp = int((bad & flagged).sum())
    auc = float(roc_auc_score(bad, scores)) if np.ptp(scores) > 0 and 0 < bad.sum() < len(bad) else None
    return {"precision": tp / flagged.sum() if flagged.sum() else None, "recall": tp / max(1, bad.sum()),
            "auroc": auc}


def run_row(name: str, row: str, profile: Profile, train: ImageSet, clean: ImageSet, test: ImageSet,
            ref_acc: float, device: str, seed: int) -> list[dict]:
    norm = NORMS[name]
    data, bad, attack = corrupt(name, row, train, seed)
    backdoor = make_backdoor_test_set(attack, test, 10) if attack is not None else None
    t0 = time.perf_counter()
    model = train_classifier(build(profile.arch, train.image_shape, seed), data, norm, profile.train_epochs,
                             profile.train_lr, 128, device, augment=profile.train_augment, seed=seed)
    before = evaluate(model, test, backdoor, norm, device)
    out = [{"dataset": name, "row": row, "method": "(corrupted model)", "acc": before.acc, "asr": before.asr,
            "ref_acc": ref_acc, "n_bad": int(bad.sum()), "time_s": time.perf_counter() - t0}]
    print(f"{name} {row}: corrupted model ACC {before.acc:.4f} ASR {before.asr} (ref {ref_acc:.4f})", flush=True)
    for label, method, params in profile.methods:
        with PeakMemory(device) as mem:
            t = time.perf_counter()
            result = repair_data(method, model, data, clean, norm, params, device, 10, seed=seed)
            elapsed = time.perf_counter() - t
        after = evaluate(result.model, test, backdoor, norm, device)
        gap = ref_acc - before.acc
        rec = {"dataset": name, "row": row, "method": label, "acc": after.acc, "asr": after.asr,
               "gap_closed": (after.acc - before.acc) / gap if gap > 0.005 else None,
               **(identification(bad, result.flagged, result.scores) if method != "finetune_clean" else {}),
               "n_flagged": int(result.flagged.sum()), "n_relabelled": int(result.details.get("n_relabelled", 0)),
               "n_dropped": int(result.details.get("n_dropped", 0)), "time_s": elapsed, "peak_mb": mem.mb}
        out.append(rec)
        print(f"  {label:18s} ACC {after.acc:.4f} ASR {after.asr} P {rec.get('precision')} R {rec.get('recall')} "
              f"AUROC {rec.get('auroc')} flagged {rec['n_flagged']} relab {rec['n_relabelled']} {elapsed:.1f}s "
              f"{mem.mb:.0f}MB", flush=True)
    return out


def _fmt(v: object, pct: bool = True) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if pct else f"{v:.1f}"
    return str(v)


def table(records: list[dict]) -> str:
    """The results as one markdown table (percentages except time and memory)."""
    lines = ["| data | row | method | P % | R % | AUROC % | ACC % | ASR % | gap closed % | flagged | relabelled "
             "| time s | peak MB |", "|" + "---|" * 13]
    for r in records:
        if r["method"] == "(corrupted model)":
            lines.append(f"| {r['dataset']} | {r['row']} | *corrupted model* (clean-label reference ACC "
                         f"{_fmt(r['ref_acc'])}) | | | | {_fmt(r['acc'])} | {_fmt(r['asr'])} | | {r['n_bad']} bad | "
                         f"| {_fmt(r['time_s'], False)} | |")
            continue
        lines.append(f"| {r['dataset']} | {r['row']} | {r['method']} | {_fmt(r.get('precision'))} | "
                     f"{_fmt(r.get('recall'))} | {_fmt(r.get('auroc'))} | {_fmt(r['acc'])} | {_fmt(r['asr'])} | "
                     f"{_fmt(r['gap_closed'])} | {r['n_flagged']} | {r['n_relabelled']} | "
                     f"{_fmt(r['time_s'], False)} | {_fmt(r['peak_mb'], False)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--tiny", action="store_true", help="the profile's code path at toy size")
    ap.add_argument("--datasets", default="fmnist,cifar10")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--methods", choices=("all", "low_precision"), default="all",
                    help="every method (default), or retain / erase / drop on flags of low precision")
    ap.add_argument("--only", default=None, help="comma-separated method labels to run (default: every one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="markdown table (default bench/results/datarepair_<p>.md)")
    ap.add_argument("--write-carry", type=Path, default=None, metavar="DIR",
                    help="write each data set's split as DIR/datarepair_<name>.npz for a device run, and stop")
    ap.add_argument("--carry", type=Path, default=None, metavar="DIR", help="read the splits --write-carry made")
    args = ap.parse_args()
    profile = PROFILES[args.profile]
    if args.methods == "low_precision":
        profile = replace(profile, methods=_low_precision({"augment": False} if profile.arch == "mlp" else None))
    if args.only:
        profile = replace(profile, methods=tuple(m for m in profile.methods if m[0] in args.only.split(",")))
    profile = tiny(profile) if args.tiny else profile
    if args.write_carry is not None:
        for name in args.datasets.split(","):
            train, clean, test = split(name, profile, args.seed)
            path = carry_path(args.write_carry, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, x_train=train.x, y_train=train.y, x_clean=clean.x, y_clean=clean.y,
                                x_test=test.x, y_test=test.y)
            print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")
        return
    args.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 check=False).stdout.strip() or "unknown"
    if args.device == "cpu":
        torch.set_num_threads(1)
    out = args.out or Path("bench/results") / f"datarepair_{args.profile}{'_tiny' if args.tiny else ''}.md"
    records: list[dict] = []
    start = time.perf_counter()
    for name in args.datasets.split(","):
        train, clean, test = split(name, profile, args.seed, args.carry)
        ref = train_classifier(build(profile.arch, train.image_shape, args.seed), train, NORMS[name],
                               profile.train_epochs, profile.train_lr, 128, args.device,
                               augment=profile.train_augment, seed=args.seed)
        ref_acc = evaluate(ref, test, None, NORMS[name], args.device).acc
        for row in args.rows.split(","):
            records.extend(run_row(name, row, profile, train, clean, test, ref_acc, args.device, args.seed))
            write(out, records, args, profile, time.perf_counter() - start)
    write(out, records, args, profile, time.perf_counter() - start)
    print(table(records))


def write(out: Path, records: list[dict], args: argparse.Namespace, profile: Profile, seconds: float) -> None:
    commit = args.commit
    hw = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'CPU'}, " \
        f"{torch.get_num_threads()} thread(s)"
    head = (f"# Data-repair benchmark, profile {args.profile}{' (tiny)' if args.tiny else ''}\n\n"
            f"commit {commit}, {hw}, torch {torch.__version__}, seed {args.seed}, {seconds:.0f} s in all; "
            f"{profile.arch}, train {profile.n_train}, clean {profile.n_clean}, test {profile.n_test}, "
            f"{profile.train_epochs} training epochs.\n"
            f"Command: `python -m bench.datarepair_bench --profile {args.profile}{' --tiny' if args.tiny else ''}"
            f" --datasets {args.datasets} --rows {args.rows} --methods {args.methods}"
            f"{f' --only {args.only}' if args.only else ''}"
            f"{f' --carry {args.carry}' if args.carry else ''}`\n\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head + table(records) + "\n")
    out.with_suffix(".json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
