"""The repair benchmark's gentler retuning attack (BENCHMARKS.md §2.12): its flags, frozen batch-norm statistics
while the weights move, and a retuning at lr 0 that must leave the measurement where it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from bench.repair_bench import RETUNE_EPOCHS, RetuneSpec, build_parser, retune_spec, retuning_attack, small_cnn
from core.attacks.base import make_backdoor_test_set
from core.attacks.registry import create_attack
from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.metrics import evaluate

NORM = Normalization()


def _images(n: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64))


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "running_" in k}


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_flags_parse_into_the_spec_and_defaults_keep_the_old_attack() -> None:
    args = build_parser().parse_args(["--profile", "cpu", "--retune", "20", "--retune-lr", "3e-4",
                                      "--retune-epochs", "1,5,20", "--retune-freeze-bn", "--retune-clean-baseline"])
    assert retune_spec(args) == RetuneSpec(n=20, lr=3e-4, epochs=(1, 5, 20), freeze_bn=True, clean_baseline=True)
    default = retune_spec(build_parser().parse_args(["--profile", "cpu", "--retune", "20"]))
    assert default == RetuneSpec(n=20, lr=0.01, epochs=RETUNE_EPOCHS, freeze_bn=False, clean_baseline=False)
    assert RETUNE_EPOCHS == (1, 5)


@pytest.mark.parametrize("bad", ["5,1", "0,2", "1,1", "a,b", ""])
def test_bad_epoch_lists_are_refused(bad: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--profile", "cpu", "--retune-epochs", bad])


def _retune_and_capture(model: nn.Module, spec: RetuneSpec) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Runs the bench's retuning attack; its measurement callback sees the retuned copy after the last epoch."""
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def measure(m: nn.Module) -> dict[str, float]:
        seen["bn"], seen["w"] = _bn_stats(m), _weights(m)
        return {"acc": 0.0, "asr": 0.0}

    retuning_attack(model, _images(100, 1), NORM, "cpu", 0, measure, spec)
    return seen["bn"], seen["w"]


def test_freeze_bn_keeps_running_statistics_while_weights_move() -> None:
    torch.manual_seed(0)
    model = small_cnn(1, 10)
    bn0, w0 = _bn_stats(model), _weights(model)
    bn, w = _retune_and_capture(model, RetuneSpec(n=20, lr=0.01, epochs=(1, 2), freeze_bn=True))
    assert bn.keys() == bn0.keys() and len(bn) > 0
    assert all(torch.equal(bn[k], bn0[k]) for k in bn0)  # statistics untouched
    moved = [k for k in w0 if not torch.equal(w[k], w0[k])]
    assert any("weight" in k for k in moved) and len(moved) == len(w0)  # every conv, BN affine and head moved
    bn_free, _ = _retune_and_capture(model, RetuneSpec(n=20, lr=0.01, epochs=(1, 2), freeze_bn=False))
    assert not all(torch.equal(bn_free[k], bn0[k]) for k in bn0)  # without the flag they do move
    assert all(torch.equal(v, _bn_stats(model)[k]) for k, v in bn0.items())  # the model itself is a copy


def test_retuning_at_lr_zero_leaves_acc_and_asr_unchanged() -> None:
    torch.manual_seed(1)
    model = small_cnn(1, 10)
    # statistics away from the init (mean 0, var 1), so that one BN update in train mode would shift them
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    test = _images(300, 2)
    backdoor = make_backdoor_test_set(create_attack("badnets", target=0, image_shape=(28, 28, 1), seed=0), test, 10)
    probe = torch.as_tensor(test.x[:64], dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    logits: list[torch.Tensor] = []

    def measure(m: nn.Module) -> dict[str, float]:
        e = evaluate(m, test, backdoor, NORM, "cpu")
        with torch.no_grad():
            logits.append(m.eval()(probe))
        return {"acc": e.acc, "asr": e.asr}

    before = measure(model)
    out = retuning_attack(model, _images(100, 3), NORM, "cpu", 0, measure,
                          RetuneSpec(n=20, lr=0.0, epochs=(1, 3), freeze_bn=True))
    assert out == {"asr_1": before["asr"], "acc_1": before["acc"], "asr_3": before["asr"], "acc_3": before["acc"]}
    assert torch.equal(logits[1], logits[0]) and torch.equal(logits[2], logits[0])
    # without frozen statistics, lr 0 still changes the model (the BN statistics move): the check above can fail
    retuning_attack(model, _images(100, 3), NORM, "cpu", 0, measure, RetuneSpec(n=20, lr=0.0, epochs=(1,)))
    assert not torch.allclose(logits[3], logits[0])
    # and a real lr moves the predictions
    retuning_attack(model, _images(100, 3), NORM, "cpu", 0, measure,
                    RetuneSpec(n=20, lr=0.05, epochs=(3,), freeze_bn=True))
    assert not torch.allclose(logits[4], logits[0])

