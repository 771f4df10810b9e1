"""Issue 10's known-answer case: the unit tests' 24-channel CNN on 8x8 digits with BadNets, whose backdoor needs
a large reset. Runs the rules for ``n`` (recovery with its settings, width), the fixed-``n`` reference loop, and
the trigger-free detector on the model and on each repaired copy; poisoned data only measure.

    python bench/strength_known_case.py --out bench/results/strength_known_case.md      # ~2 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_tsbd import NORM, digits, tiny_cnn  # noqa: E402

from core.attacks.base import make_backdoor_test_set, poison_training_set  # noqa: E402
from core.attacks.registry import create_attack  # noqa: E402
from core.defenses.tsbd import TSBDConfig, tsbd_repair  # noqa: E402
from core.detect import scan_model  # noqa: E402
from core.metrics import accuracy, attack_success_rate, predict  # noqa: E402
from core.training import train_classifier  # noqa: E402

BASE = {"lr_unlearn": 0.01, "batch_size": 64, "finetune_epochs": 10}
RUNS: dict[str, dict[str, object]] = {
    "recovery, lr floor 0.1, no augmentation": {"auto_rule": "recovery", "finetune_adaptive": True,
                                                "finetune_lr_floor": 0.1, "augment": False},
    "recovery, lr floor 0.1": {"auto_rule": "recovery", "finetune_adaptive": True, "finetune_lr_floor": 0.1},
    "recovery, full lr": {"auto_rule": "recovery", "finetune_adaptive": True, "finetune_lr_floor": 1.0},
    "recovery, full lr, 5 probe epochs": {"auto_rule": "recovery", "finetune_adaptive": True,
                                          "finetune_lr_floor": 1.0, "auto_probe_epochs": 5},
    "recovery, lr floor 0.5, 5 probe epochs": {"auto_rule": "recovery", "finetune_adaptive": True,
                                               "auto_probe_epochs": 5},
    "recovery (defaults)": {"auto_rule": "recovery", "finetune_adaptive": True},
    "width, no augmentation (before issue 10)": {"auto_rule": "width", "augment": False},
    "width, adaptive stage 2, scaled augmentation (committed tsbd)": {"auto_rule": "width", "finetune_adaptive": True},
    **{f"fixed n = {n}": {"neuron_ratio": n} for n in (0.1, 0.3, 0.5, 0.7)},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="strength_known_case.md")
    ap.add_argument("--no-detect", action="store_true")
    args = ap.parse_args()
    train, test = digits()
    attack = create_attack("badnets", target=0, image_shape=train.image_shape)
    poisoned = poison_training_set(attack, train, 0.1, 10, seed=0)
    model = train_classifier(tiny_cnn(seed=4), poisoned.data, NORM, epochs=15, lr=0.05, batch_size=64,
                             device="cpu", augment=False).eval()
    clean, held = test.subset(np.arange(250)), test.subset(np.arange(250, len(test)))
    backdoor = make_backdoor_test_set(attack, held, 10)

    def measure(m: torch.nn.Module) -> dict[str, object]:
        out: dict[str, object] = {"acc": accuracy(predict(m, held.x, NORM), held.y),
                                  "asr": attack_success_rate(predict(m, backdoor.x, NORM), backdoor.y_target)}
        if not args.no_detect:
            d = scan_model(m, clean, NORM, None, "cpu", 10)
            out["verdict"], out["score"] = d.verdict, d.score
        return out

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = [("none", None, measure(model), 0.0)]
    for label, kw in RUNS.items():
        t0 = time.perf_counter()
        res = tsbd_repair(model, clean, NORM, TSBDConfig(**{**BASE, **kw}), "cpu", num_classes=10)
        rows.append((label, res.params["neuron_ratio"], measure(res.model), time.perf_counter() - t0))
        print(rows[-1], flush=True)
    lines = [f"# known case: 24-channel CNN, 8x8 digits, BadNets (commit {commit}, torch {torch.__version__})", "",
             f"`{' '.join(sys.argv)}`", "", "| run | n | ACC | ASR | detector | s |", "|---|---|---|---|---|---|"]
    for label, n, m, s in rows:
        det = f"{m['verdict']} ({m['score']:.2f})" if "verdict" in m else "–"
        lines.append(f"| {label} | {n if n is not None else '–'} | {100 * m['acc']:.1f} | {100 * m['asr']:.1f} | "
                     f"{det} | {s:.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
