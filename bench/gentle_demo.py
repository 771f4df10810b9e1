"""The demo's model (ResNet-20 on scikit-learn's 8x8 digits, ``cli/demo.py``) and a clean twin, repaired by
today's automatic ``tsbd`` and by the gentle, escalating variant (issue 10), in process.

    python bench/gentle_demo.py --seeds 0,1 --out bench/results/gentle_demo.md

Per seed and model (BadNets 10% to class 0 as in the demo, and the same training without poisoning): the
detector's verdict on the model (``core.detect.scan_model`` on the 300-image defender subset, the data the
pipeline scans), then each variant through ``core.defenses.registry.repair`` with that verdict, as the pipeline
passes it; ACC on the 297 held-out digits, ASR on them triggered. Writes a markdown table and a ``.json``.
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

from cli.demo import DEMO_REPAIR_PARAMS, DIGITS_NORM, load_digits  # noqa: E402
from core.attacks import poison_training_set  # noqa: E402
from core.attacks.base import make_backdoor_test_set  # noqa: E402
from core.attacks.registry import create_attack  # noqa: E402
from core.defenses.registry import repair  # noqa: E402
from core.detect import scan_model  # noqa: E402
from core.metrics import evaluate  # noqa: E402
from core.models.registry import create_model  # noqa: E402
from core.training import train_classifier  # noqa: E402

VARIANTS = {
    "tsbd (today's default)": {},
    "tsbd gentle (clean_check given, clean_action gentle)": {"clean_check": "given", "clean_action": "gentle"},
    "tsbd gentle without escalation": {"clean_check": "given", "clean_action": "gentle", "escalate": False},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default="bench/results/gentle_demo.md")
    ap.add_argument("--kinds", default="badnets,clean", help="which models: badnets, clean")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant labels to run")
    args = ap.parse_args()
    data = load_digits()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        order = np.random.default_rng(seed).permutation(len(data))
        train, clean, test = data.subset(order[:1200]), data.subset(order[1200:1500]), data.subset(order[1500:])
        attack = create_attack("badnets", target=0, image_shape=train.image_shape)
        backdoor = make_backdoor_test_set(attack, test, 10)
        for kind in args.kinds.split(","):
            poisoned = poison_training_set(attack, train, 0.1, 10, seed=seed).data if kind == "badnets" else train
            torch.manual_seed(seed)
            model = create_model("resnet20", 10, 1)
            train_classifier(model, poisoned, DIGITS_NORM, epochs=8, lr=0.05, batch_size=64, device="cpu",
                             augment=False, seed=seed)
            model.eval()
            before = evaluate(model, test, backdoor, DIGITS_NORM).scores()
            t0 = time.perf_counter()
            found = scan_model(model, clean, DIGITS_NORM, None, "cpu", 10, seed)
            scan_s = time.perf_counter() - t0
            print(f"[s{seed} {kind}] ACC {before['acc']:.4f} ASR {before['asr']:.4f} verdict {found.verdict} "
                  f"({found.score:.2f}, {scan_s:.0f}s)", flush=True)
            for label, extra in ((k, VARIANTS[k]) for k in args.variants.split(",")):
                t0 = time.perf_counter()
                res = repair("tsbd", model, clean, DIGITS_NORM, {**DEMO_REPAIR_PARAMS, **extra}, "cpu", 10, seed,
                             verdict=found.verdict)
                secs = time.perf_counter() - t0
                after = evaluate(res.model, test, backdoor, DIGITS_NORM).scores()
                esc = res.details.get("escalation", {})
                row = {"seed": seed, "model": kind, "verdict": found.verdict, "verdict_score": found.score,
                       "scan_s": scan_s, "variant": label, "before": before, "after": after, "repair_s": secs,
                       "action": res.chosen.get("action"), "n": res.chosen.get("neuron_ratio"),
                       "n_full": res.chosen.get("neuron_ratio_full"), "rule": res.chosen.get("rule"),
                       "attempts": esc.get("attempts", [])}
                rows.append(row)
                print(f"[s{seed} {kind}] {label}: n {row['n']} ACC {after['acc']:.4f} ASR {after['asr']:.4f} "
                      f"{secs:.0f}s attempts {[(a['n'], a['verdict']) for a in row['attempts']]}", flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    lines = ["| seed | model | detector (score) | variant | n (full) | ACC before -> after | ASR before -> after | "
             "escalation (n: verdict) | repair s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        esc = ", ".join(f"{a['n']:g}: {a['verdict']}" for a in r["attempts"]) or "–"
        lines.append(f"| {r['seed']} | {r['model']} | {r['verdict']} ({r['verdict_score']:.2f}) | {r['variant']} | "
                     f"{r['n']:g} ({r['n_full'] if r['n_full'] is not None else '–'}) | "
                     f"{100 * r['before']['acc']:.2f} -> {100 * r['after']['acc']:.2f} | "
                     f"{100 * r['before']['asr']:.1f} -> {100 * r['after']['asr']:.1f} | {esc} | "
                     f"{r['repair_s']:.0f} |")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
