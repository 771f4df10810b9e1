"""Class chunking of the detectors' steps (issue 9): past a step's bounds the K classes run in chunks of whole
classes, their gradients summed, and the search is the one-pass search up to float summation order; within the
bounds one pass as before; a model of 300 classes (4,800 stamped images a step at the default 16 per class, over
the 4,096 a pass may hold) is scanned end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.detect import DetectConfig, scan_model
from core.detect.base import DetectContext, class_chunks, frozen_model
from core.detect.feature_inversion import feature_inversion
from core.detect.inversion import Additive, Patch, Schedule, smallest_triggers
from core.detect.max_margin import max_margin
from core.detect.neural_cleanse import neural_cleanse

NORM = Normalization((0.5,), (0.5,))


def test_class_chunks_cover_the_classes_in_whole_classes_within_both_bounds() -> None:
    assert class_chunks(10, 16, 100, 4096, 10**9) == [(0, 10)]  # everything fits: one pass
    assert class_chunks(300, 16, 100, 4096, 10**9) == [(0, 256), (256, 300)]
    assert class_chunks(300, 16, 100, None, 16 * 100 * 50) == [(a, min(a + 50, 300)) for a in range(0, 300, 50)]
    assert class_chunks(3, 16, 100, 8, 10) == [(0, 1), (1, 2), (2, 3)]  # one class over the bounds runs alone


def _net(k: int, side: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * side * side, k)).eval()


def _ctx(k: int, side: int, cfg: DetectConfig, n: int = 40, **bounds: int) -> DetectContext:
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(n, 1, side, side, generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    clean = ImageSet(pixels.permute(0, 2, 3, 1).mul(255).to(torch.uint8).numpy(), labels.numpy())
    return DetectContext(model=_net(k, side), clean=clean, pixels=pixels, labels=labels, norm=NORM,
                         device=torch.device("cpu"), num_classes=k, seed=3, config=cfg, **bounds)


def _passes(ctx: DetectContext) -> list[int]:
    """Records the batch size every forward pass of ``ctx``'s model brings to its head (past the layer where the
    feature inversion expands its batch to K copies)."""
    seen: list[int] = []
    ctx.model[-1].register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[0]))
    return seen


@pytest.mark.parametrize("family", [Patch(), Additive()], ids=["patch", "additive"])
def test_a_chunked_search_is_the_one_pass_search(family: Patch | Additive) -> None:
    """Same seed, K = 12 classes of 8 images: one pass of 96 images against chunks of at most 4 classes (32
    images); every class's best size and trigger agree within float tolerance, and so do the steps run."""
    cfg = DetectConfig()
    sch = Schedule(steps=12, batch_size=8, lr=0.1, init_cost=1e-3, target_success=0.5, patience=2,
                   cost_multiplier=1.5, early_stop_patience=100)
    one, chunked = _ctx(12, 6, cfg), _ctx(12, 6, cfg, max_step_images=32)
    seen_one, seen_chunked = _passes(one), _passes(chunked)
    with frozen_model(one.model), frozen_model(chunked.model):
        a = smallest_triggers(one, family, sch)
        b = smallest_triggers(chunked, family, sch)
    assert set(seen_one) == {96} and set(seen_chunked) == {32}  # 3 chunks of 4 classes a step
    assert a.steps == b.steps and a.never_reached == b.never_reached
    np.testing.assert_allclose(a.sizes, b.sizes, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(a.params, b.params, strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-5)


def test_the_chunked_detectors_answer_as_the_one_pass_ones() -> None:
    """Neural Cleanse (by the image count), MM-BD (by the image count) and the feature inversion (by the bytes of
    its feature maps: not held to the image count) give the same per-class statistics chunked as in one pass."""
    cfg = DetectConfig(nc_steps=8, nc_batch_size=4, mm_steps=8, mm_starts=2, fi_steps=8, fi_batch_size=4)
    fmap = 4 * 4 * 6 * 6  # float32 bytes of one changed copy of the 4 x 6 x 6 map the feature inversion hooks
    for detector, bounds in ((neural_cleanse, {"max_step_images": 12}), (max_margin, {"max_step_images": 6}),
                             (feature_inversion, {"max_step_bytes": 3 * 4 * fmap})):
        one, chunked = _ctx(10, 6, cfg), _ctx(10, 6, cfg, **bounds)
        seen_one, seen_chunked = _passes(one), _passes(chunked)
        with frozen_model(one.model), frozen_model(chunked.model):
            a, b = detector(one), detector(chunked)
        step_pass = max(set(seen_one), key=seen_one.count)  # the optimisation steps' pass, the commonest one
        assert step_pass == (10 * 2 if detector is max_margin else 10 * 4)
        assert max(set(seen_chunked), key=seen_chunked.count) < step_pass, detector.__name__
        np.testing.assert_allclose(a.per_class, b.per_class, rtol=1e-4, atol=1e-6, err_msg=detector.__name__)
        assert a.statistic == pytest.approx(b.statistic, rel=1e-4, abs=1e-9)


def test_a_300_class_model_is_scanned_end_to_end_in_chunks() -> None:
    """300 classes x the default 16 images per class are 4,800 stamped images a step, over the 4,096 one pass
    may hold: every detector runs (few steps, 4x4 images), no forward pass holds more than 4,096 images, and
    every class gets its statistic."""
    k, side = 300, 4
    g = np.random.default_rng(0)
    clean = ImageSet(g.integers(0, 256, (40, side, side, 1), dtype=np.uint8), g.integers(0, k, 40))
    model = _net(k, side)
    seen: list[int] = []
    model[0].register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[0]))
    cfg = DetectConfig(detectors=("neural_cleanse", "universal_perturbation", "untargeted", "feature_inversion",
                                  "max_margin"), nc_steps=2, up_steps=2, fi_steps=2, mm_steps=2, mm_starts=16)
    assert cfg.nc_batch_size == 16 and k * cfg.nc_batch_size > 4096
    res = scan_model(model, clean, NORM, cfg, "cpu", k)
    assert max(seen) <= 4096 and 256 * 16 in seen  # the chunks of 256 classes
    for name in ("neural_cleanse", "universal_perturbation", "feature_inversion", "max_margin"):
        assert len(res.detectors[name].per_class) == k, name
    assert res.verdict in ("clean", "suspicious", "backdoored")


def test_a_step_that_fits_is_one_pass() -> None:
    """Within the bounds nothing changes: K x batch images in every pass (the GPU path and small models)."""
    ctx = _ctx(10, 6, DetectConfig())
    seen = _passes(ctx)
    with frozen_model(ctx.model):
        smallest_triggers(ctx, Patch(), Schedule(3, 4, 0.1, 1e-3, 0.99, 5, 1.5, 60))
    assert set(seen) == {40}
