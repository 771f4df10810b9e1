"""The repair benchmark's harness end to end on random images (the numbers mean nothing; the table, the means,
the all-to-all row, the poisoned defender subset, the variants and the reference loop must all come out), so
that a GPU session never spends its minutes on a crash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_cpu_run_writes_the_whole_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "random.npz"
    np.savez(data, x_train=rng.integers(0, 256, (2400, 28, 28, 1), dtype=np.uint8),
             y_train=rng.integers(0, 10, 2400), x_test=rng.integers(0, 256, (800, 28, 28, 1), dtype=np.uint8),
             y_test=rng.integers(0, 10, 800))
    out = tmp_path / "report.md"
    variants = json.dumps({"tsbd_trim": ["tsbd", {"finetune_trim": 0.05}]})
    proc = subprocess.run(
        [sys.executable, "bench/repair_bench.py", "--profile", "cpu", "--tiny", "--data", str(data),
         "--attacks", "badnets,badnets_a2a", "--defender-poison", "0.02", "--sweep", "badnets",
         "--sweep-n", "0.1,0.5", "--variants", variants, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["attacks"]) == {"badnets", "badnets_a2a"} and report["defender_poison"] == 0.02
    assert set(report["methods"]) == {"tsbd", "tsbd_fixed", "fine_pruning", "finetune", "ft_sam", "tsbd_trim"}
    for entry in report["attacks"].values():
        assert set(entry["methods"]) == set(report["methods"])
        assert all(0 <= m["asr"] <= 1 and 0 <= m["acc"] <= 1 for m in entry["methods"].values())
    assert report["attacks"]["badnets"]["methods"]["tsbd_trim"]["params"]["finetune_trim"] == 0.05
    assert [p["n"] for p in report["attacks"]["badnets"]["reference_sweep"]["per_n"]] == [0.1, 0.5]
    text = out.read_text()
    assert "of which 2% replaced by poisoned ones" in text and "| badnets_a2a | ft_sam |" in text
    assert text.count("| **mean of 1** |") == 1 + len(report["methods"])  # the all-to-all row is left out
    assert "warm-up" not in text  # only CUDA runs warm up


def test_tiny_run_with_clean_model_retuning_and_filter_rows(tmp_path: Path) -> None:
    """The issue-10 columns: a clean model among the attacks, the retuning attack on every row (the gentle
    one, with the clean model's baseline), TSBD without its filter and a baseline with it, and the filter's
    drop counts; ``--arch`` picks the architecture."""
    rng = np.random.default_rng(1)
    data = tmp_path / "random.npz"
    np.savez(data, x_train=rng.integers(0, 256, (2400, 28, 28, 1), dtype=np.uint8),
             y_train=rng.integers(0, 10, 2400), x_test=rng.integers(0, 256, (800, 28, 28, 1), dtype=np.uint8),
             y_test=rng.integers(0, 10, 800))
    out = tmp_path / "report.md"
    variants = json.dumps({"tsbd_nofilter": ["tsbd", {"subset_filter": False}],
                           "finetune_filter": ["finetune", {"subset_filter": True}]})
    proc = subprocess.run(
        [sys.executable, "bench/repair_bench.py", "--profile", "cpu", "--tiny", "--data", str(data),
         "--arch", "small_cnn", "--attacks", "badnets,clean", "--defender-poison", "0.02", "--sweep", "",
         "--methods", "tsbd", "--variants", variants, "--retune", "10", "--retune-epochs", "1,3",
         "--retune-lr", "0.003", "--retune-freeze-bn", "--retune-clean-baseline", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["attacks"]) == {"badnets", "clean"}
    for entry in report["attacks"].values():
        assert set(entry["retune"]) == {"asr_1", "acc_1", "asr_3", "acc_3"}
        assert all(set(m["retune"]) == set(entry["retune"]) for m in entry["methods"].values())
    assert report["retune"] == {"n": 10, "lr": 0.003, "epochs": [1, 3], "freeze_bn": True, "clean_baseline": True}
    # the baseline is the model the attack "clean" trains (same recipe, BadNets' trigger and retuning images)
    base, clean = report["attacks"]["badnets"]["clean_baseline"], report["attacks"]["clean"]
    assert "clean_baseline" not in clean
    assert base["acc"] == clean["before"]["acc"] and base["asr"] == clean["before"]["asr"]
    assert base["retune"] == clean["retune"]
    bad = report["attacks"]["badnets"]["methods"]
    assert bad["tsbd"]["details"]["subset_filter"]["applied"] and "filter" in bad["tsbd"]
    assert bad["tsbd"]["filter"]["planted"] == 6  # 2% of the 300 defender images
    assert bad["tsbd_nofilter"]["details"]["subset_filter"] == {"applied": False}
    assert bad["finetune_filter"]["details"]["subset_filter"]["applied"]
    assert report["attacks"]["clean"]["methods"]["tsbd"]["filter"]["planted"] == 0
    text = out.read_text()
    assert "| clean | tsbd |" in text and "retune ASR" in text and "| badnets | clean baseline |" in text
    assert "SGD lr 0.003, batch-norm statistics frozen" in text
    assert text.count("| **mean of 1** |") == 1 + len(report["methods"])  # the clean model is left out
