"""Loading and cross-checking one scan's uploads; the API runs this at upload time, the worker again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.data.formats import (
    DataFormatError,
    DataLimits,
    UnsupportedDataFormatError,
    load_image_set_with_classes,
    load_training_set,
)
from core.data.imageset import ImageSet
from core.models.checkpoint import CheckpointError, LoadedCheckpoint, UnsupportedFormatError, load_checkpoint
from core.models.checkpoint.inspect import high_findings, inspect_checkpoint
from core.models.weights import WeightsError, check_state_dict
from core.spec import ScanSpec

DATA_PARTS = ("clean_data", "test_data", "poisoned_data", "training_data")


class InputError(ValueError):
    """An upload that cannot be used, with the part or field it concerns; ``unsupported`` means wrong format."""

    def __init__(self, field: str, message: str, unsupported: bool = False,
                 findings: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.unsupported = field, message, unsupported
        self.findings = findings  # a refused code-carrying checkpoint: what it would have run


@dataclass(frozen=True)
class UploadedFile:
    path: Path
    filename: str


@dataclass(frozen=True)
class ScanInputs:
    """Where each uploaded part lies on local disk (``None`` when not uploaded)."""

    model: UploadedFile
    clean_data: UploadedFile
    test_data: UploadedFile | None = None
    poisoned_data: UploadedFile | None = None
    training_data: UploadedFile | None = None


@dataclass(frozen=True)
class LoadedInputs:
    checkpoint: LoadedCheckpoint
    clean: ImageSet
    test: ImageSet | None
    poisoned: ImageSet | None
    training: ImageSet | None
    file_findings: tuple[dict[str, Any], ...] = ()
    # training_data's optional ``is_corrupt`` mask (bool, one per training image): the samples the user knows
    # to be harmful, against which the report measures how well they were identified
    training_is_corrupt: np.ndarray | None = None


HOLDOUT_FRACTION = 0.2  # share of clean_data held out for evaluation when no test_data is uploaded


def evaluation_split(loaded: LoadedInputs, seed: int) -> tuple[ImageSet, ImageSet, str]:
    """(evaluation set, data the repair and the detector may learn from, where ACC comes from)."""
    if loaded.test is not None:
        return loaded.test, loaded.clean, "test_data"
    rest, held_out = loaded.clean.split(HOLDOUT_FRACTION, seed)
    return held_out, rest, f"clean_data_holdout ({HOLDOUT_FRACTION:.0%} of clean_data, seed {seed})"


def _check_attack_has_images(spec: ScanSpec, attack: Any, clean: ImageSet, test: ImageSet | None) -> None:
    """An all-to-one attack triggers only the evaluation images not already of its target (BackdoorBench's ASR
    convention, core/attacks/base.py): refuse at upload an evaluation set (test_data, or the seeded hold-out of
    clean_data the worker will take) with none, which the worker could only fail on."""
    if attack.all_to_all:
        return
    assert spec.attack is not None
    if test is not None:
        labels, where = test.y, f"all {len(test)} test_data images"
    else:
        _, held_out = ImageSet.split_index(len(clean), HOLDOUT_FRACTION, spec.seed)
        labels = clean.y[held_out]
        where = (f"all {len(labels)} images of clean_data's {HOLDOUT_FRACTION:.0%} evaluation hold-out (seed "
                 f"{spec.seed}; no test_data was given)")
    if not (labels != spec.attack.target).any():
        raise InputError("spec.attack.target", f"{where} are of the attack's target class {spec.attack.target}, so "
                         "no image is left to trigger for ASR; upload test_data of other classes, more clean_data, "
                         "or another target")


# a repair trains in batches; a single image is none a batch-norm model can train on (one value per channel)
MIN_REPAIR_IMAGES = 2


def _check_learning_set(spec: ScanSpec, clean: ImageSet, has_test: bool) -> None:
    """Refuse at upload a clean set too small for what the spec runs on it (the detector, a data repair's
    identification), counted as the worker will see it: without test_data, 20% is held out for evaluation."""
    n = len(clean) if has_test else len(clean) - ImageSet.held_out_count(len(clean), HOLDOUT_FRACTION)
    seen = "" if has_test else (f" ({len(clean)} uploaded less the {HOLDOUT_FRACTION:.0%} held out for "
                                "evaluation because no test_data was given)")
    if spec.detect.enabled:
        from core.detect.scan import MIN_IMAGES

        if n < MIN_IMAGES:
            raise InputError("clean_data", f"the trigger-free detector needs at least {MIN_IMAGES} clean images to "
                             f"learn from, got {n}{seen}; upload more, or set \"detect\": {{\"enabled\": false}}")
    if spec.mode == "repair_data":
        from core.datarepair.registry import min_clean_images

        try:
            need = min_clean_images(spec.repair_data.method, spec.repair_data.params, spec.seed)
        except ValueError as exc:  # parameters refused together (the spec checked each one)
            raise InputError("spec.repair_data", str(exc)) from exc
        if n < need:
            raise InputError("clean_data", f"data-repair method {spec.repair_data.method!r} needs at least {need} "
                             f"clean images (2 per identification fold), got {n}{seen}")
    if spec.mode == "repair" and n < MIN_REPAIR_IMAGES:  # one image is no batch: batch norm cannot train on it
        raise InputError("clean_data", f"repair method {spec.repair.method!r} needs at least {MIN_REPAIR_IMAGES} "
                         f"clean images to learn from, got {n}{seen}; upload more")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _detector_config(spec: ScanSpec) -> Any:
    """The ``DetectConfig`` the scan's detector runs with, or ``None`` when it never runs: the spec's detect
    section when enabled, else the defaults when a ``tsbd`` repair scans the model itself (``clean_check``
    ``scan``)."""
    from core.detect.config import DetectConfig
    from core.spec import detect_config

    if spec.detect.enabled:
        return detect_config(spec.detect.params)
    if spec.mode == "repair" and spec.repair.method == "tsbd" and spec.repair.params.get("clean_check") == "scan":
        return DetectConfig()
    return None


STATE_COPIES = 5
"""Copies of a trigger search's per-class parameters a scan holds: the parameters, their gradient, Adam's two
moments and the best ones kept (core/detect/inversion.py); MM-BD's starting images have no best copy (4)."""


def _feature_map_shape(model: Any, image_shape: tuple[int, int, int], depth: float) -> tuple[int, int, int] | None:
    """The (C, H, W) of the map the feature inversion changes (``core.detect.feature_inversion.feature_layer`` at
    ``depth``), found on the shape-only model; ``None`` where the model is not on the meta device, cannot run
    shape-only or has no such map (the worker then finds out, and its steps still run in chunks of classes)."""
    import torch

    from core.detect.feature_inversion import feature_layer

    if model is None or not any(p.is_meta for p in model.parameters()):
        return None
    h, w, c = image_shape
    try:
        with torch.device("meta"):
            return feature_layer(model, torch.empty(1, c, h, w), depth).shape
    except (NotImplementedError, RuntimeError, ValueError, AssertionError, IndexError, TypeError):
        return None


def _check_detector_batches(spec: ScanSpec, image_shape: tuple[int, int, int], limits: DataLimits,
                            model: Any = None) -> None:
    """An inversion step stamps its batch of clean images once per class; past a step's bounds the detectors run
    the classes in chunks of whole classes (docs/detect.md), so what cannot run is one class's batch over them: more
    images than any step may hold (``MAX_BATCH_SIZE``, the repairs' bound; not the feature inversion, whose copies
    are of a late feature map) or more float32 bytes, in images of the upload's size and their logits, than any
    one upload may make the service allocate (``limits.max_expanded_bytes``). The per-class trigger state (K masks
    and patterns, K perturbations, K x mm_starts images, with their gradients and Adam moments) is held whole:
    refused past the same byte bound. The feature inversion's copies are of the feature map it changes, which
    can be many times an image (64 channels at full resolution against 3): with ``model`` (shape-only) that map's
    bytes count where they are larger, and its per-class change (K x its channels) is held to the bound too.
    Each refusal names the setting and the largest value that fits."""
    cfg = _detector_config(spec)
    if cfg is None:
        return
    from core.ranges import MAX_BATCH_SIZE

    k = spec.model.num_classes
    h, w, c = image_shape
    image_bytes = 4 * c * h * w
    item_bytes = image_bytes + 4 * k  # a stamped image and its row of logits (core/detect/inversion.py: step_chunks)
    nc_users = set(cfg.detectors) & {"neural_cleanse", "universal_perturbation", "untargeted"}
    per_class = {"nc_batch_size": cfg.nc_batch_size} if nc_users else {}
    fmap = _feature_map_shape(model, image_shape, cfg.fi_depth) if "feature_inversion" in cfg.detectors else None
    item_of = {"fi_batch_size": max(image_bytes, 4 * fmap[0] * fmap[1] * fmap[2]) + 4 * k} if fmap else {}
    if "feature_inversion" in cfg.detectors:
        per_class["fi_batch_size"] = cfg.fi_batch_size
    if "max_margin" in cfg.detectors:
        per_class["mm_starts"] = cfg.mm_starts
    off = '"detect": {"enabled": false}'
    for name, per in per_class.items():
        item = item_of.get(name, item_bytes)
        what = (f"copies of the {fmap[0]}x{fmap[1]}x{fmap[2]} feature map it changes (for {w}x{h}x{c} images)"
                if name in item_of else f"images of {w}x{h}x{c}")
        if name != "fi_batch_size" and per > MAX_BATCH_SIZE:  # (the config's own range keeps under it today)
            raise InputError(f"spec.detect.params.{name}",
                             f"one class's batch of {name} = {per} images is over the {MAX_BATCH_SIZE} images a step "
                             f"may hold (the batch-size bound of every repair); set {name} to at most "
                             f"{MAX_BATCH_SIZE}, or set {off}")
        if per * item > limits.max_expanded_bytes:
            most = limits.max_expanded_bytes // item
            fix = f"set {name} to at most {most}" if most >= 1 else "use smaller images"
            raise InputError(f"spec.detect.params.{name}",
                             f"one class's batch of {name} = {per} {what} (with their {k} logits) is "
                             f"{_size(per * item)} as float32, over the {_size(limits.max_expanded_bytes)} an "
                             f"upload may make the service allocate (a step runs its classes in chunks, never less "
                             f"than one class); {fix}, or set {off}")
    if fmap and k * STATE_COPIES * 4 * fmap[0] > limits.max_expanded_bytes:  # K channel shifts, grads, moments, best
        most = limits.max_expanded_bytes // (STATE_COPIES * 4 * fmap[0])
        raise InputError("spec.detect.params.detectors",
                         f"the feature inversion holds per class a shift of the {fmap[0]} channels of its feature "
                         f"map with its gradient, Adam moments and best copy: {_size(k * STATE_COPIES * 4 * fmap[0])}"
                         f" for num_classes={k}, over the {_size(limits.max_expanded_bytes)} an upload may make the "
                         f"service allocate (at most {most} classes fit); leave feature_inversion out of detectors, "
                         f"or set {off}")
    # the trigger state per family: the mask (1 x H x W) and pattern (C x H x W) of the patch, the additive change
    families = {"patch": c + 1, "additive": c}
    users = {"patch": [d for d in ("neural_cleanse",) if d in cfg.detectors],
             "additive": [d for d in ("universal_perturbation",) if d in cfg.detectors]}
    if "untargeted" in cfg.detectors:
        for fam in cfg.ut_families:  # computes its family's targeted search when that detector does not run
            users[fam].append("untargeted")
    for fam, who in users.items():
        per = STATE_COPIES * 4 * families[fam] * h * w
        if who and k * per > limits.max_expanded_bytes:
            most = limits.max_expanded_bytes // per
            raise InputError("spec.detect.params.detectors",
                             f"the {fam} trigger search of {who} holds per class a {fam} trigger of {w}x{h}x{c} "
                             f"images with its gradient, Adam moments and best copy: {_size(k * per)} for "
                             f"num_classes={k}, over the {_size(limits.max_expanded_bytes)} an upload may make the "
                             f"service allocate (at most {most} classes fit); leave {who} out of detectors, use "
                             f"smaller images, or set {off}")
    if "max_margin" in cfg.detectors:
        per = (STATE_COPIES - 1) * image_bytes  # each start image, its gradient and Adam moments
        if k * cfg.mm_starts * per > limits.max_expanded_bytes:
            most = limits.max_expanded_bytes // (k * per)
            fix = f"set mm_starts to at most {most}" if most >= 1 else "leave max_margin out of detectors"
            raise InputError("spec.detect.params.mm_starts",
                             f"MM-BD optimises num_classes x mm_starts = {k} x {cfg.mm_starts} images of {w}x{h}x{c} "
                             f"with their gradients and Adam moments: {_size(k * cfg.mm_starts * per)}, over the "
                             f"{_size(limits.max_expanded_bytes)} an upload may make the service allocate; {fix}, "
                             f"or set {off}")


def _check_ekfac_factors(model: Any, described: str, limits: DataLimits) -> None:
    """The ``ekfac`` scorer fits, per ``nn.Linear`` / ``nn.Conv2d``, a d_in x d_in and a d_out x d_out covariance
    and a d_in x d_out eigenvalue matrix (core/datarepair/influence.py): quadratic in the layer's width where the
    uploaded weights are linear in it (a 64-wide head of 100,000 classes: 26 MB of weights, 40 GB of factors).
    Refuse factors past the bytes an upload may make the service allocate (``limits.max_expanded_bytes``)."""
    import torch.nn as nn

    floats = 0
    for layer in model.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            d_out = layer.weight.shape[0]
            d_in = layer.weight[0].numel() + (layer.bias is not None)
            floats += d_in * d_in + d_out * d_out + d_in * d_out
    if 4 * floats > limits.max_expanded_bytes:
        raise InputError("spec.repair_data.params.scorer",
                         f"scorer 'ekfac' would fit {_size(4 * floats)} of EK-FAC factors (float32) for "
                         f"{described}, over the {_size(limits.max_expanded_bytes)} an "
                         "upload may make the service allocate; choose another scorer ('loss', the default)")


def _check_identification_arrays(spec: ScanSpec, n_train: int, n_clean: int, limits: DataLimits) -> None:
    """Identification (core/datarepair/identify.py) keeps every training and clean sample's class probabilities,
    float64 for the training samples and float32 for the clean ones, and as much again in float64 for the
    from-scratch reference (scorer ``loss`` with ``scratch_reference``): refuse when those arrays exceed the bytes
    an upload may make the service allocate (``limits.max_expanded_bytes``); tiny images of many classes would
    otherwise cost far more than the upload."""
    if spec.repair_data.method == "finetune_clean":
        return
    from core.datarepair.identify import IdentifyConfig

    params = spec.repair_data.params
    scratch = (params.get("scratch_reference", IdentifyConfig.scratch_reference)
               and params.get("scorer", IdentifyConfig.scorer) == "loss")
    k = spec.model.num_classes
    need = k * (8 * n_train + 4 * n_clean) + (k * 8 * (n_train + n_clean) if scratch else 0)
    if need > limits.max_expanded_bytes:
        raise InputError("training_data", f"identifying harmful samples keeps per-class probabilities of its "
                                          f"{n_train} training and {n_clean} clean images for num_classes={k}: "
                                          f"{_size(need)}, over the {_size(limits.max_expanded_bytes)} an upload may "
                                          "make the service allocate; upload fewer training images")
    if spec.repair_data.method != "retain":
        return
    from core.datarepair.registry import RetainExtra

    # the confident-learning noise matrix P(given | true), K x K float64 per label reference (separate.noise_matrix),
    # used by relabel_prior noise_matrix and by act_score noise_posterior where act_quantile is above null_quantile
    prior = params.get("relabel_prior", RetainExtra.relabel_prior) == "noise_matrix"
    posterior = (params.get("act_score", RetainExtra.act_score) == "noise_posterior"
                 and params.get("act_quantile", RetainExtra.act_quantile)
                 > params.get("null_quantile", IdentifyConfig.null_quantile))
    matrices = 8 * k * k * (2 if scratch else 1)
    if (prior or posterior) and matrices > limits.max_expanded_bytes:
        name = "relabel_prior" if prior else "act_score"
        raise InputError(f"spec.repair_data.params.{name}",
                         f"{name} {params.get(name, getattr(RetainExtra, name))!r} estimates a num_classes x "
                         f"num_classes noise matrix per reference: {_size(matrices)} for num_classes={k}, over the "
                         f"{_size(limits.max_expanded_bytes)} an upload may make the service allocate")


def _check_model_takes(spec: ScanSpec, image_shape: tuple[int, int, int], limits: DataLimits) -> None:
    """What the worker would otherwise find only when it runs, checked on a shape-only (meta) model: that the
    architecture takes images of this size, that the repair finds the layers it works on, and that the
    detector's batches fit the allocation bound (:func:`_check_detector_batches`)."""
    import torch
    import torch.nn as nn

    from core.models.registry import shape_model

    h, w, c = image_shape
    m = spec.model
    model = shape_model(m.architecture, m.num_classes, m.in_channels).eval()
    if any(p.is_meta for p in model.parameters()):  # (one built on the CPU is not run here: the worker finds out)
        try:
            with torch.device("meta"), torch.no_grad():
                model(torch.empty(1, c, h, w))
        except NotImplementedError:  # an operation without a shape-only form: nothing to conclude
            pass
        except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as exc:
            why = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise InputError("clean_data", f"{m.architecture} cannot take {w}x{h} images: {why}") from exc
    if any(p.is_meta for p in model.parameters()):
        _check_trains_on_one_image(spec, model, image_shape)
    linear = any(isinstance(x, nn.Linear) for x in model.modules())
    if spec.mode == "repair" and spec.repair.method in ("tsbd", "tsbd_fixed"):
        from core.defenses.tsbd.config import TSBDConfig
        from core.defenses.tsbd.nwc import covered_conv_layers

        exclude = tuple(spec.repair.params.get("layer_exclude", TSBDConfig.layer_exclude))
        if not covered_conv_layers(model, exclude):
            raise InputError("spec.repair.params.layer_exclude",
                             f"{m.architecture} has no Conv2d layer whose name contains none of {list(exclude)}: "
                             "TSBD would have nothing to work on")
    if spec.mode == "repair" and spec.repair.method == "fine_pruning":
        from core.defenses.baselines import last_conv_layer

        try:
            last_conv_layer(model)
        except ValueError as exc:
            raise InputError("spec.repair.method", f"fine_pruning cannot work on {m.architecture}: {exc}") from exc
    if spec.mode == "repair" and spec.repair.params.get("robust_hparams") and not linear:
        raise InputError("spec.repair.params.robust_hparams",
                         f"{m.architecture} has no nn.Linear head for robust_hparams to refit")
    if spec.mode == "repair_data" and spec.repair_data.method != "finetune_clean" and not linear:
        raise InputError("spec.repair_data.method",
                         f"data-repair method {spec.repair_data.method!r} scores samples on the model's "
                         f"nn.Linear classifier head; {m.architecture} has none")
    if spec.mode == "repair_data" and spec.repair_data.params.get("scorer") == "ekfac":
        from core.datarepair.influence import require_kronfluence

        try:  # the API runs the worker's image (Dockerfile): without the extra here the worker lacks it too
            require_kronfluence()
        except ValueError as exc:
            raise InputError("spec.repair_data.params.scorer", str(exc)) from exc
        _check_ekfac_factors(model, f"{m.architecture} with num_classes={m.num_classes}", limits)
    _check_detector_batches(spec, image_shape, limits, model)


def _check_trains_on_one_image(spec: ScanSpec, model: Any, image_shape: tuple[int, int, int]) -> None:
    """A training batch size of 1 on a model whose batch norm then sees one value per channel (torchvision's
    ResNets reach a 1x1 map on 32x32 images) is refused at the parameter: every step of the repair would fail
    ('Expected more than 1 value per channel when training'), found only in the worker."""
    import torch

    section = {"repair": spec.repair.params, "repair_data": spec.repair_data.params}.get(spec.mode, {})
    ones = [name for name in ("batch_size", "retrain_batch_size") if section.get(name) == 1]
    if not ones:
        return
    h, w, c = image_shape
    model.train()
    try:
        with torch.device("meta"):
            model(torch.empty(1, c, h, w))
    except ValueError as exc:
        field = f"spec.{spec.mode}.params.{ones[0]}"
        raise InputError(field, f"{ones[0]} 1: {spec.model.architecture} cannot train on one {w}x{h} image at a "
                                f"time ({str(exc).splitlines()[0][:200]}); use at least 2") from exc
    except (NotImplementedError, RuntimeError, AssertionError, IndexError, TypeError):
        pass  # no shape-only form, or a problem the eval-mode check above has named already
    finally:
        model.eval()


def load_inputs(spec: ScanSpec, inputs: ScanInputs, limits: DataLimits) -> LoadedInputs:
    """Load every part and check it against the spec and the other parts; raises ``InputError``."""
    if inputs.training_data is not None and spec.mode != "repair_data":
        raise InputError("training_data", "is only used by mode repair_data")
    if spec.mode == "repair_data" and inputs.training_data is None:
        raise InputError("training_data", "is required by mode repair_data")
    try:
        # static inspection first: a file that would run code is refused before any loader opens it
        findings = inspect_checkpoint(inputs.model.path, inputs.model.filename, limits=limits.checkpoint)
        if high := high_findings(findings):
            raise InputError("model", "checkpoint carries code and is refused, never loaded: "
                             + "; ".join(f.message for f in high[:5]), findings=[f.as_dict() for f in high])
        checkpoint = load_checkpoint(inputs.model.path, inputs.model.filename, limits=limits.checkpoint)
    except UnsupportedFormatError as exc:
        raise InputError("model", str(exc), unsupported=True) from exc
    except CheckpointError as exc:
        raise InputError("model", str(exc)) from exc
    m = spec.model
    try:
        check_state_dict(m.architecture, m.num_classes, m.in_channels, checkpoint.state_dict)
    except WeightsError as exc:  # wrong keys or shapes, or non-finite weights
        raise InputError("model", str(exc)) from exc

    sets: dict[str, ImageSet | None] = {}
    class_names: dict[str, list[str] | None] = {}
    mask: np.ndarray | None = None
    for part in DATA_PARTS:
        uploaded: UploadedFile | None = getattr(inputs, part)
        if uploaded is None:
            sets[part] = None
        elif part == "training_data":
            sets[part], class_names[part], mask = _load_training(uploaded, spec, limits)
        else:
            sets[part], class_names[part] = _load_data(part, uploaded, spec, limits)
    clean = sets["clean_data"]
    assert clean is not None
    if len(clean) < 2:
        raise InputError("clean_data", "needs at least 2 images")
    _check_same_classes(class_names)
    for part in DATA_PARTS[1:]:
        other = sets[part]
        if other is not None and other.image_shape[:2] != clean.image_shape[:2]:
            raise InputError(part, f"images are {other.image_shape[0]}x{other.image_shape[1]} but clean_data's "
                                   f"are {clean.image_shape[0]}x{clean.image_shape[1]}")
    if spec.attack is not None and sets["poisoned_data"] is None:
        from core.attacks.registry import create_attack

        try:
            attack = create_attack(spec.attack.type, target=spec.attack.target, image_shape=clean.image_shape,
                                   seed=spec.seed, **spec.attack.params)
        except (ValueError, TypeError) as exc:
            raise InputError("spec.attack", str(exc)) from exc
        _check_attack_has_images(spec, attack, clean, sets["test_data"])
    _check_learning_set(spec, clean, sets["test_data"] is not None)
    _check_model_takes(spec, clean.image_shape, limits)
    if sets["training_data"] is not None:
        _check_identification_arrays(spec, len(sets["training_data"]), len(clean), limits)
    return LoadedInputs(checkpoint, clean, sets["test_data"], sets["poisoned_data"], sets["training_data"],
                        tuple(f.as_dict() for f in findings), mask)


def _load_data(part: str, uploaded: UploadedFile, spec: ScanSpec,
               limits: DataLimits) -> tuple[ImageSet, list[str] | None]:
    try:
        data, names = load_image_set_with_classes(uploaded.path, uploaded.filename, limits=limits,
                                                  num_classes=spec.model.num_classes)
    except UnsupportedDataFormatError as exc:
        raise InputError(part, str(exc), unsupported=True) from exc
    except DataFormatError as exc:
        raise InputError(part, str(exc)) from exc
    _check_channels(part, data, spec)
    return data, names


def _load_training(uploaded: UploadedFile, spec: ScanSpec,
                   limits: DataLimits) -> tuple[ImageSet, list[str] | None, np.ndarray | None]:
    """training_data, at most ``limits.max_training_images`` images, with its optional ``is_corrupt`` mask."""
    try:
        data, names, mask = load_training_set(uploaded.path, uploaded.filename, limits=limits,
                                              num_classes=spec.model.num_classes)
    except UnsupportedDataFormatError as exc:
        raise InputError("training_data", str(exc), unsupported=True) from exc
    except DataFormatError as exc:
        raise InputError("training_data", str(exc)) from exc
    _check_channels("training_data", data, spec)
    return data, names, mask


def _check_channels(part: str, data: ImageSet, spec: ScanSpec) -> None:
    channels = data.image_shape[2]
    if channels != spec.model.in_channels:
        raise InputError(part, f"images have {channels} channel(s) but spec.model.in_channels is "
                               f"{spec.model.in_channels}")


def _check_same_classes(class_names: dict[str, list[str] | None]) -> None:
    """Image folders named by class (not by index) are numbered by their sorted names: training_data's must
    then be clean_data's, or the same label would mean different classes in the two sets."""
    clean, training = class_names.get("clean_data"), class_names.get("training_data")
    if clean is not None and training is not None and clean != training:
        only = sorted(set(training) ^ set(clean))[:5]
        raise InputError("training_data", f"class folders {training[:10]} are not clean_data's {clean[:10]} "
                                          f"(differing: {only}); the labels would not mean the same classes")
