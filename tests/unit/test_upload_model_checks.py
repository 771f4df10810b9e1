"""Checks load_inputs makes at upload on a shape-only copy of the model, so that a spec the worker could only
fail on late (image size, layers, head, the detector's batch memory) is a 422 naming the field instead."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from core.data.formats import DataLimits
from core.data.imageset import ImageSet
from core.inputs import InputError, ScanInputs, UploadedFile, load_inputs
from core.models.registry import create_model, shape_model
from core.spec import ScanSpec
from tests.helpers import write_npz, write_safetensors


def _inputs(tmp_path: Path, architecture: str, num_classes: int, side: int, channels: int,
            n: int = 40) -> ScanInputs:
    weights = create_model(architecture, num_classes, channels).state_dict()
    model = write_safetensors(tmp_path / "m.safetensors", weights)
    rng = np.random.default_rng(0)
    clean = write_npz(tmp_path / "c.npz", ImageSet(rng.integers(0, 256, (n, side, side, channels), dtype=np.uint8),
                                                   np.arange(n) % num_classes))
    return ScanInputs(UploadedFile(model, "m.safetensors"), UploadedFile(clean, "c.npz"))


def _spec(architecture: str, num_classes: int, channels: int, **extra: object) -> ScanSpec:
    return ScanSpec.model_validate_json(json.dumps({
        "model": {"architecture": architecture, "num_classes": num_classes, "in_channels": channels},
        "detect": {"enabled": False}, **{"mode": "scan", **extra}}))


def _refused(spec: ScanSpec, inputs: ScanInputs, limits: DataLimits = DataLimits()) -> InputError:
    with pytest.raises(InputError) as info:
        load_inputs(spec, inputs, limits)
    return info.value


def test_an_image_size_the_architecture_cannot_take_is_refused(tmp_path: Path) -> None:
    """vgg19_bn pools five times: 16x16 images vanish before its head (the worker failed with an internal error)."""
    small = _inputs(tmp_path, "vgg19_bn", 10, 16, 3)
    err = _refused(_spec("vgg19_bn", 10, 3), small)
    assert err.field == "clean_data" and "vgg19_bn cannot take 16x16 images" in err.message
    load_inputs(_spec("vgg19_bn", 10, 3), _inputs(tmp_path, "vgg19_bn", 10, 32, 3), DataLimits())


def test_tsbd_layer_exclude_that_leaves_no_layer_is_refused(tmp_path: Path) -> None:
    """Every resnet20 Conv2d name contains "conv": TSBD would fail after its first stage."""
    inputs = _inputs(tmp_path, "resnet20", 10, 8, 1)
    for method in ("tsbd", "tsbd_fixed"):
        spec = _spec("resnet20", 10, 1, mode="repair",
                     repair={"method": method, "params": {"layer_exclude": ["downsample", "conv"]}})
        err = _refused(spec, inputs)
        assert err.field == "spec.repair.params.layer_exclude" and "no Conv2d layer" in err.message
    load_inputs(_spec("resnet20", 10, 1, mode="repair", repair={"method": "tsbd"}), inputs, DataLimits())


def test_a_head_the_method_needs_is_checked_at_upload(tmp_path: Path) -> None:
    """squeezenet's classifier is a Conv2d: robust_hparams and the scoring data repairs need an nn.Linear."""
    inputs = _inputs(tmp_path, "torchvision.squeezenet1_1", 10, 32, 3)
    err = _refused(_spec("torchvision.squeezenet1_1", 10, 3, mode="repair",
                         repair={"method": "finetune", "params": {"robust_hparams": True}}), inputs)
    assert err.field == "spec.repair.params.robust_hparams" and "no nn.Linear head" in err.message
    training = write_npz(tmp_path / "t.npz", ImageSet(np.zeros((20, 32, 32, 3), np.uint8), np.arange(20) % 10))
    with_training = ScanInputs(inputs.model, inputs.clean_data, training_data=UploadedFile(training, "t.npz"))
    err = _refused(_spec("torchvision.squeezenet1_1", 10, 3, mode="repair_data"), with_training)
    assert err.field == "spec.repair_data.method" and "nn.Linear classifier head" in err.message
    load_inputs(_spec("torchvision.squeezenet1_1", 10, 3, mode="repair_data",
                      repair_data={"method": "finetune_clean"}), with_training, DataLimits())


def test_only_one_class_s_batch_is_bounded_by_the_allocation_limit(tmp_path: Path) -> None:
    """A step runs its classes in chunks (docs/detect.md), so 10 x 1024 images, over the 4096 any pass may hold,
    are accepted; what is refused is one class's batch over the allocation bound: 400 digits-size images and their
    10 logits (116 KiB as float32) under a 64 KiB bound, each time with the largest batch that fits named (the
    default 16 passes)."""
    inputs = _inputs(tmp_path, "resnet20", 10, 8, 1)
    load_inputs(_spec("resnet20", 10, 1, detect={"params": {"nc_batch_size": 1024}}), inputs, DataLimits())
    load_inputs(_spec("resnet20", 10, 1, detect={"params": {"mm_starts": 1024, "detectors": ["max_margin"],
                                                            "voting_detectors": ["max_margin"]}}), inputs, DataLimits())
    limits = DataLimits(max_expanded_bytes=64 * 2**10)
    err = _refused(_spec("resnet20", 10, 1, detect={"params": {"nc_batch_size": 400}}), inputs, limits)
    assert err.field == "spec.detect.params.nc_batch_size" and "set nc_batch_size to at most 221" in err.message
    assert "one class's batch" in err.message
    err = _refused(_spec("resnet20", 10, 1, detect={"params": {"fi_batch_size": 400}}), inputs, limits)
    # the feature inversion's copies are of resnet20's last map, 64 x 2 x 2 floats (1 KiB) for 8x8 images
    assert err.field == "spec.detect.params.fi_batch_size" and "set fi_batch_size to at most 61" in err.message
    assert "64x2x2 feature map" in err.message
    # the detector off: nothing is stamped, unless a tsbd repair scans the model itself (with the defaults)
    load_inputs(_spec("resnet20", 10, 1, detect={"enabled": False, "params": {"nc_batch_size": 1024}}), inputs, limits)
    load_inputs(_spec("resnet20", 10, 1, detect={"enabled": True}), inputs, limits)
    tiny = DataLimits(max_expanded_bytes=3000)  # under one class's default 16 x 256 B
    scans = _spec("resnet20", 10, 1, mode="repair", repair={"method": "tsbd", "params": {"clean_check": "scan"}})
    assert _refused(scans, inputs, tiny).field == "spec.detect.params.nc_batch_size"


def test_a_thousand_classes_pass_with_the_defaults_and_the_trigger_state_is_bounded(tmp_path: Path) -> None:
    """1,000 classes x the default 16 images are 16,000 stamped images a step: accepted (the step runs in chunks
    of 256 classes). The per-class trigger state is held whole: 1,000 patch triggers of 8x8x1 with their gradient,
    Adam moments and best copy are 2.4 MiB, refused under a 2 MiB bound naming the detectors and the 819 classes
    that fit; MM-BD's 1,000 x mm_starts optimised images likewise, naming the largest mm_starts."""
    inputs = _inputs(tmp_path, "resnet20", 1000, 8, 1, n=1000)
    load_inputs(_spec("resnet20", 1000, 1, detect={"enabled": True}), inputs, DataLimits())
    limits = DataLimits(max_expanded_bytes=2 * 2**20)
    err = _refused(_spec("resnet20", 1000, 1, detect={"enabled": True}), inputs, limits)
    assert err.field == "spec.detect.params.detectors" and "at most 819 classes fit" in err.message
    assert "patch" in err.message and "'neural_cleanse', 'untargeted'" in err.message
    err = _refused(_spec("resnet20", 1000, 1, detect={"params": {"detectors": ["max_margin"],
                                                                 "voting_detectors": ["max_margin"]}}), inputs, limits)
    assert err.field == "spec.detect.params.mm_starts" and "set mm_starts to at most 2" in err.message
    load_inputs(_spec("resnet20", 1000, 1, detect={"params": {"detectors": ["max_margin"], "mm_starts": 2,
                                                              "voting_detectors": ["max_margin"]}}), inputs, limits)


def test_ekfac_factors_quadratic_in_the_widths_are_bounded(tmp_path: Path) -> None:
    """resnet20's EK-FAC factors are 10.5 MB (float32): refused under an 8 MiB allocation bound with scorer ekfac,
    while the default scorer (no factors) passes the same bound."""
    inputs = _inputs(tmp_path, "resnet20", 10, 8, 1)
    training = write_npz(tmp_path / "t.npz", ImageSet(np.zeros((20, 8, 8, 1), np.uint8), np.arange(20) % 10))
    with_training = ScanInputs(inputs.model, inputs.clean_data, training_data=UploadedFile(training, "t.npz"))
    limits = DataLimits(max_expanded_bytes=8 * 2**20)
    spec = _spec("resnet20", 10, 1, mode="repair_data", repair_data={"method": "retain", "params": {"scorer": "ekfac"}})
    err = _refused(spec, with_training, limits)
    assert err.field == "spec.repair_data.params.scorer" and "10.0 MiB of EK-FAC factors" in err.message
    assert "of EK-FAC factors (float32) for resnet20 with num_classes=10" in err.message
    load_inputs(_spec("resnet20", 10, 1, mode="repair_data"), with_training, limits)
    load_inputs(spec, with_training, DataLimits())


def test_ekfac_without_kronfluence_is_refused_at_submission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the optional extra the API accepted scorer ekfac (202) and the worker failed the scan later."""
    monkeypatch.setitem(sys.modules, "kronfluence", None)  # `import kronfluence` raises ImportError
    inputs = _inputs(tmp_path, "resnet20", 10, 8, 1)
    training = write_npz(tmp_path / "t.npz", ImageSet(np.zeros((20, 8, 8, 1), np.uint8), np.arange(20) % 10))
    with_training = ScanInputs(inputs.model, inputs.clean_data, training_data=UploadedFile(training, "t.npz"))
    spec = _spec("resnet20", 10, 1, mode="repair_data", repair_data={"method": "retain", "params": {"scorer": "ekfac"}})
    err = _refused(spec, with_training)
    assert err.field == "spec.repair_data.params.scorer" and "antidote[influence]" in err.message
    load_inputs(_spec("resnet20", 10, 1, mode="repair_data"), with_training, DataLimits())


def test_identification_s_per_class_arrays_are_bounded(tmp_path: Path) -> None:
    """20 training and 40 clean images of 10 classes: 3,200 bytes of probabilities, 8,000 with the from-scratch
    reference; refused under a 6,000-byte bound only with it (the file checks pass: every array is smaller)."""
    inputs = _inputs(tmp_path, "resnet20", 10, 8, 1)
    training = write_npz(tmp_path / "t.npz", ImageSet(np.zeros((20, 8, 8, 1), np.uint8), np.arange(20) % 10))
    with_training = ScanInputs(inputs.model, inputs.clean_data, training_data=UploadedFile(training, "t.npz"))
    limits = DataLimits(max_expanded_bytes=6000)
    err = _refused(_spec("resnet20", 10, 1, mode="repair_data"), with_training, limits)
    assert err.field == "training_data" and "20 training and 40 clean images for num_classes=10" in err.message
    load_inputs(_spec("resnet20", 10, 1, mode="repair_data",
                      repair_data={"method": "retain", "params": {"scratch_reference": False}}), with_training, limits)
    load_inputs(_spec("resnet20", 10, 1, mode="repair_data", repair_data={"method": "finetune_clean"}), with_training,
                limits)


def test_regnets_are_checked_shape_only(tmp_path: Path) -> None:
    """torchvision's regnets compute their widths with real tensors while they build: the meta-device build raised
    NotImplementedError (an internal error at upload), then a CPU build cost a 640M-parameter regnet_y_128gf 3 GB
    and 27 s per upload naming it. Their width arithmetic now runs on the CPU and the model on meta: the same
    shapes, no memory, and the image-size check runs on them too."""
    meta = shape_model("torchvision.regnet_y_128gf", 10, 3)
    assert all(p.is_meta for p in meta.parameters()) and sum(p.numel() for p in meta.parameters()) > 6e8
    small = shape_model("torchvision.regnet_x_400mf", 10, 3)
    real = create_model("torchvision.regnet_x_400mf", 10, 3)
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    inputs = _inputs(tmp_path, "torchvision.regnet_x_400mf", 10, 32, 3)
    load_inputs(_spec("torchvision.regnet_x_400mf", 10, 3), inputs, DataLimits())
    err = _refused(_spec("torchvision.regnet_x_400mf", 12, 3), inputs)
    assert err.field == "model"
    (tmp_path / "gray").mkdir()  # 1-channel images for the 3-channel stem
    gray = ScanInputs(inputs.model, _inputs(tmp_path / "gray", "torchvision.regnet_x_400mf", 10, 32, 1).clean_data)
    err = _refused(_spec("torchvision.regnet_x_400mf", 10, 3), gray)
    assert err.field == "clean_data"


def test_the_noise_matrices_of_many_classes_are_bounded(tmp_path: Path) -> None:
    """100 classes: a 100 x 100 float64 noise matrix per reference is 160,000 bytes for the two references,
    refused under a 100,000-byte bound when an option estimates it (the per-sample arrays, 80,000 bytes, pass);
    the default retain (act_quantile = null_quantile) never builds it and passes."""
    inputs = _inputs(tmp_path, "resnet20", 100, 8, 1)
    training = write_npz(tmp_path / "t.npz", ImageSet(np.zeros((20, 8, 8, 1), np.uint8), np.arange(20)))
    with_training = ScanInputs(inputs.model, inputs.clean_data, training_data=UploadedFile(training, "t.npz"))
    limits = DataLimits(max_expanded_bytes=100_000)

    def retain(**params: object) -> ScanSpec:
        return _spec("resnet20", 100, 1, mode="repair_data", repair_data={"method": "retain", "params": params})

    err = _refused(retain(relabel_prior="noise_matrix"), with_training, limits)
    assert err.field == "spec.repair_data.params.relabel_prior" and "noise matrix" in err.message
    err = _refused(retain(act_quantile=0.99), with_training, limits)
    assert err.field == "spec.repair_data.params.act_score"
    load_inputs(retain(), with_training, limits)
    load_inputs(retain(act_quantile=0.99, act_score="loss"), with_training, limits)


def test_the_feature_inversion_s_copies_are_not_held_to_the_image_count(tmp_path: Path) -> None:
    """K x fi_batch_size copies are of a late feature map: 10 x 1024 pass, as 10 x 1024 Neural Cleanse images now
    do (chunked); one class's batch is held to the byte bound in both."""
    inputs = _inputs(tmp_path, "resnet20", 10, 8, 1)
    load_inputs(_spec("resnet20", 10, 1, detect={"params": {"fi_batch_size": 1024}}), inputs, DataLimits())
    load_inputs(_spec("resnet20", 10, 1, detect={"params": {"nc_batch_size": 1024}}), inputs, DataLimits())


def test_the_feature_inversion_s_batch_is_counted_in_its_feature_maps(tmp_path: Path) -> None:
    """At ``fi_depth`` 0 resnet20 changes its stem's 16 x 32 x 32 map, five times the bytes of a 32x32x3 image:
    one class's 32 copies (2 MiB) are refused under a 1 MiB bound, naming the map and the batch that fits, where
    counting images (0.4 MiB) would have let the worker allocate twice the bound; at the default depth (the last
    map, 64 x 8 x 8) the same batch passes."""
    inputs = _inputs(tmp_path, "resnet20", 10, 32, 3)
    limits = DataLimits(max_expanded_bytes=2**20)
    only_fi = {"detectors": ["feature_inversion"], "voting_detectors": ["feature_inversion"]}
    err = _refused(_spec("resnet20", 10, 3, detect={"params": {**only_fi, "fi_depth": 0.0}}), inputs, limits)
    assert err.field == "spec.detect.params.fi_batch_size", err.message
    assert "16x32x32 feature map" in err.message and "set fi_batch_size to at most 15" in err.message
    load_inputs(_spec("resnet20", 10, 3, detect={"params": only_fi}), inputs, limits)


def test_the_feature_inversion_s_per_class_shift_is_bounded(tmp_path: Path) -> None:
    """Per class the feature inversion keeps a shift of its map's channels (64 for resnet20) with its gradient, Adam
    moments and best copy: 1.25 KiB a class, so 2,000 classes (2.4 MiB) are refused under a 1 MiB bound, naming
    the classes that fit, and 500 pass."""
    only_fi = {"detectors": ["feature_inversion"], "voting_detectors": ["feature_inversion"], "fi_batch_size": 1}
    limits = DataLimits(max_expanded_bytes=2**20)
    err = _refused(_spec("resnet20", 2000, 1, detect={"params": only_fi}), _inputs(tmp_path, "resnet20", 2000, 8, 1),
                   limits)
    assert err.field == "spec.detect.params.detectors" and "at most 819 classes fit" in err.message, err.message
    load_inputs(_spec("resnet20", 500, 1, detect={"params": only_fi}), _inputs(tmp_path, "resnet20", 500, 8, 1),
                limits)


def test_a_batch_size_of_one_the_model_cannot_train_on_is_refused(tmp_path: Path) -> None:
    """torchvision's resnet18 reaches a 1x1 map on 32x32 images: batch norm cannot train on one image there, and
    every step failed in the worker; resnet20 keeps a 8x8 map and trains on one image."""
    inputs = _inputs(tmp_path, "torchvision.resnet18", 10, 32, 3)
    err = _refused(_spec("torchvision.resnet18", 10, 3, mode="repair",
                         repair={"method": "finetune", "params": {"batch_size": 1}}), inputs)
    assert err.field == "spec.repair.params.batch_size" and "cannot train on one 32x32 image" in err.message
    load_inputs(_spec("torchvision.resnet18", 10, 3, mode="repair",
                      repair={"method": "finetune", "params": {"batch_size": 2}}), inputs, DataLimits())
    load_inputs(_spec("resnet20", 10, 3, mode="repair", repair={"method": "finetune", "params": {"batch_size": 1}}),
                _inputs(tmp_path, "resnet20", 10, 32, 3), DataLimits())
