"""The detection benchmark's GPU profile runs end to end on the CPU with ``--tiny`` (PreAct-ResNet18 on real
CIFAR-10 images from an .npz, as on the offline device machine), so it is ready for a lent GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.datasets import load_cifar10
from bench.detect_bench import main


@pytest.mark.slow  # trains two PreAct-ResNet18s: about a minute on 2 quiet cores, minutes under load
def test_gpu_profile_runs_tiny_on_the_cpu(tmp_path: Path) -> None:
    train, test = load_cifar10()
    data = tmp_path / "cifar_small.npz"
    np.savez(data, x_train=train.x[:320], y_train=train.y[:320], x_test=test.x[:120], y_test=test.y[:120])
    out = tmp_path / "detect_gpu_tiny.md"
    main(["--profile", "gpu", "--tiny", "--data", str(data), "--device", "cpu", "--models", "clean_s0,badnets",
          "--cache", str(tmp_path / "cache"), "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["config"]["architecture"] == "preactresnet18" and report["tiny"] is True
    assert [r["label"] for r in report["models"]] == ["clean_s0", "badnets"]
    for row in report["models"]:
        assert row["verdict"] in ("clean", "suspicious", "backdoored")
        assert {"nc_p", "up_p", "mm_p", "nwc_share"} <= set(row)
    assert "| clean_s0 |" in out.read_text() and "ROC-AUC" in out.read_text()


def test_seeds_retrain_the_selected_models_under_new_labels() -> None:
    """``--seeds``: held-out models of the same recipe, each attack's label kept apart from the default ones."""
    from bench.detect_bench import SUBJECTS, reseeded

    chosen = tuple(s for s in SUBJECTS if s.label in ("clean_s0", "clean_s3", "wanet", "badnets_a2a"))
    out = reseeded(chosen, [10, 11])
    assert [s.label for s in out] == ["clean_s10", "clean_s11", "wanet_s10", "wanet_s11", "badnets_a2a_s10",
                                      "badnets_a2a_s11"]  # two clean models under one seed are one model
    assert [s.seed for s in out] == [10, 11, 10, 11, 10, 11]
    assert out[-1].a2a and out[-1].attack == "badnets" and out[0].attack is None
    assert not {s.label for s in out} & {s.label for s in SUBJECTS}
