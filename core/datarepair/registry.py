"""Data-repair method names -> builders, and :func:`repair_data` to run one by name with checked parameters.

Same pattern as :mod:`core.defenses.registry`: each method declares its parameters as ranged dataclass fields
(:mod:`core.ranges`), so a client's JSON is checked at submission and every value used is reported.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.datarepair.identify import (
    Identification,
    IdentifyConfig,
    identify,
    label_flags_at,
    null_label_flags_at,
    posterior_label_flags_at,
)
from core.datarepair.repair import (
    EraseConfig,
    RepairTrainConfig,
    RetrainConfig,
    anchored_finetune,
    gradient_ascent,
    kept_set,
    retrain,
)
from core.datarepair.result import DataRepairResult
from core.datarepair.separate import RelabelPrior, WeakFlags, separate
from core.defenses.baselines import FinetuneConfig, vanilla_finetune
from core.defenses.runtime import cuda_sync, prepare_model, runtime_for
from core.progress import Progress
from core.ranges import Flag, check_params, field_types, float_in

DEFAULT_DATA_REPAIR_METHOD = "retain"
ActScore = Literal["loss", "noise_posterior"]


@dataclass(frozen=True)
class RetainExtra:
    """The separation and unlearning parameters of ``retain`` (core/datarepair/separate.py)."""

    relabel_precision: float_in(0.5, 1.0) = 0.9  # clean-set precision the relabelling confidence must reach
    unlearn_weight: float_in(0.0, 100.0) = 0.5  # weight of the complementary-label loss on what is unlearned
    # with the scratch reference: unlearn a dropped sample only when both references find its label < chance
    # (off: it lowers the harm of low-precision flags but leaves more of a backdoor, docs/datarepair.md)
    unlearn_when_all_agree: Flag = False
    # with input_quality: the loss weight of a sample whose input is flagged and whose label is not contested
    # (1 = kept as is, 0 = dropped; docs/datarepair.md "Corrupted inputs" for the measurements behind the default)
    input_weight: float_in(0.0, 1.0) = 1.0
    # with input_quality: drop a sample flagged for both its input and its label instead of relabelling it from
    # that input (off: relabelling is what unlearns a trigger large enough to be flagged; docs/datarepair.md)
    drop_both_flagged: Flag = False
    # relabel, confirm or unlearn only the label flags that also hold at this null quantile (same clean-null rule);
    # the other flagged samples are kept with their label or dropped (weak_flags). At or below null_quantile:
    # every flag acts (the two levels coincide at the defaults). docs/datarepair.md "Low precision" for why.
    act_quantile: float_in(0.5, 1.0, open_high=True) = 0.95
    # class_test: drop the weak flags only of the classes holding more strong flags than both their share of the
    # training set (binomial) and the held-out clean samples' flag rate in that class (Fisher exact), each
    # Bonferroni over the classes at 1 - act_quantile (docs/datarepair.md "Which weak flags to drop")
    weak_flags: WeakFlags = "keep"
    # noise_matrix: the relabel target and its confidence share the non-given probability among the other classes by
    # Bayes' rule with the confident-learning noise matrix P(given | true) of each reference (cleanlab), so that under
    # class-pair flips a flagged label goes back to its source class; under symmetric noise nothing changes
    # (docs/datarepair.md "The noise's structure")
    relabel_prior: RelabelPrior = "none"
    # noise_posterior (default): the acting flags (at act_quantile, when above null_quantile) score -log of the
    # posterior that the given label is the true one under each reference's noise matrix, against the clean null
    # scored the same way (identify.posterior_label_flags_at); loss: the plain calibrated loss. Nothing changes at
    # the default null_quantile = act_quantile (docs/datarepair.md "The noise's structure" for the measurements)
    act_score: ActScore = "noise_posterior"


@dataclass(frozen=True)
class DataRepairMethod:
    """A data-repair method: what it does, its parameters (names -> ranged types), how its configs are built
    from checked parameters and the seed, and how it runs."""

    description: str
    param_types: Mapping[str, Any]
    configure: Callable[[dict[str, Any], int], dict[str, Any]]  # (checked params, seed) -> named configs
    run: Callable[..., DataRepairResult]


def _types(*classes: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in classes:
        out.update(field_types(cls, ("seed",)))
    return out


def _configure(**classes: type) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    """A configure that builds one config per class from the params named by its fields (seed where it has one)."""
    def configure(params: dict[str, Any], seed: int) -> dict[str, Any]:
        out = {}
        for key, cls in classes.items():
            names = {f.name for f in dataclasses.fields(cls)}
            kw = {k: v for k, v in params.items() if k in names}
            if "seed" in names:
                kw["seed"] = seed
            out[key] = cls(**kw)
        return out

    return configure


def _flat_params(configs: Mapping[str, Any]) -> dict[str, object]:
    out: dict[str, object] = {}
    for cfg in configs.values():
        out.update(dataclasses.asdict(cfg))
    return out


def _identify_stage(model: nn.Module, training: ImageSet, clean: ImageSet, norm: Normalization,
                    cfg: IdentifyConfig, rt: Any, num_classes: int, progress: Progress, hi: float) -> Identification:
    return identify(model, training, clean, norm, cfg, rt, num_classes, progress.stage("identify", 0.0, hi))


def _result(name: str, repaired: nn.Module, configs: Mapping[str, Any], ident: Identification | None,
            new_labels: np.ndarray, details: dict[str, object], progress: Progress, n: int) -> DataRepairResult:
    input_flagged = None
    if ident is None:
        scores, flagged = np.zeros(n), np.zeros(n, dtype=bool)
        details = {"identification": "none (this method does not score the training data)", **details}
    else:
        scores, flagged = ident.scores.astype(np.float64), ident.flagged.astype(bool)
        input_flagged = None if ident.input_flagged is None else ident.input_flagged.astype(bool)
        details = {**ident.details, **details}
    details.setdefault("n_flagged", int(flagged.sum()))
    details.setdefault("n_relabelled", 0)
    details.setdefault("n_dropped", int((new_labels < 0).sum()))
    return DataRepairResult(model=repaired.eval(), method=name, params=_flat_params(configs), scores=scores,
                            flagged=flagged, new_labels=new_labels.astype(np.int64), details=details,
                            timings=progress.finish(), input_flagged=input_flagged)


def _run_retain(model: nn.Module, training: ImageSet, clean: ImageSet, norm: Normalization, cfgs: dict[str, Any],
                device: torch.device | str, num_classes: int, progress: Progress) -> DataRepairResult:
    rt = runtime_for(device)
    ident = _identify_stage(model, training, clean, norm, cfgs["identify"], rt, num_classes, progress, 0.6)
    progress.stage("separate", 0.6, 0.62)
    label_flagged = ident.flagged if ident.label_flagged is None else ident.label_flagged
    extra: RetainExtra = cfgs["extra"]
    strong = None
    if extra.act_quantile > cfgs["identify"].null_quantile:
        strong = (posterior_label_flags_at(ident, training.y, clean.y, extra.act_quantile)
                  if extra.act_score == "noise_posterior" else label_flags_at(ident, extra.act_quantile))
    sep = separate(label_flagged, training.y, ident.probs, ident.clean_probs, clean.y,
                   extra.relabel_precision, num_classes, ident.reference, ident.reference_clean_probs,
                   ident.reference_probs if extra.unlearn_when_all_agree else None,
                   ident.input_flagged, extra.input_weight, extra.drop_both_flagged, strong, extra.weak_flags,
                   1 - extra.act_quantile,
                   null_label_flags_at(ident, extra.act_quantile) if extra.weak_flags == "class_test"
                   else None, extra.relabel_prior, ident.reference_probs)
    repaired = prepare_model(copy.deepcopy(model), rt)
    unlearn = training.subset(np.flatnonzero(sep.unlearn))
    weights = None if sep.weights is None else sep.weights[sep.new_labels >= 0]
    anchored_finetune(repaired, kept_set(training, sep.new_labels), clean, unlearn, norm, cfgs["train"],
                      cfgs["extra"].unlearn_weight, rt, cfgs["identify"].seed, progress.stage("repair", 0.62, 1.0),
                      kept_weights=weights)
    return _result("retain", repaired, cfgs, ident, sep.new_labels, sep.details, progress, len(training))


def _flag_and_copy(model: nn.Module, training: ImageSet, clean: ImageSet, norm: Normalization, cfgs: dict[str, Any],
                   device: torch.device | str, num_classes: int, progress: Progress) -> tuple[Any, Any, np.ndarray,
                                                                                              nn.Module]:
    """Step 1 for the baselines that only drop or erase what is flagged: (runtime, identification, labels with
    -1 for every flagged sample, a copy of the model to repair)."""
    rt = runtime_for(device)
    ident = _identify_stage(model, training, clean, norm, cfgs["identify"], rt, num_classes, progress, 0.6)
    new_labels = np.where(ident.flagged, -1, training.y).astype(np.int64)
    return rt, ident, new_labels, prepare_model(copy.deepcopy(model), rt)


def _run_drop(model: nn.Module, training: ImageSet, clean: ImageSet, norm: Normalization, cfgs: dict[str, Any],
              device: torch.device | str, num_classes: int, progress: Progress) -> DataRepairResult:
    rt, ident, new_labels, repaired = _flag_and_copy(model, training, clean, norm, cfgs, device, num_classes, progress)
    anchored_finetune(repaired, kept_set(training, new_labels), clean, None, norm, cfgs["train"], 0.0, rt,
                      cfgs["identify"].seed, progress.stage("repair", 0.6, 1.0))
    return _result("drop_flagged", repaired, cfgs, ident, new_labels, {}, progress, len(training))


def _run_erase(model: nn.Module, training: ImageSet, clean: ImageSet, norm: Normalization, cfgs: dict[str, Any],
               device: torch.device | str, num_classes: int, progress: Progress) -> DataRepairResult:
    rt, ident, new_labels, repaired = _flag_and_copy(model, training, clean, norm, cfgs, device, num_classes, progress)
    ft: FinetuneConfig = cfgs["finetune"]
    gradient_ascent(repaired, training.subset(np.flatnonzero(ident.flagged)), norm, cfgs["erase"], ft.batch_size,
                    rt, ft.seed, progress.stage("erase", 0.6, 0.7))
    fine = vanilla_finetune(repaired, clean, norm, ft, device, progress.stage("finetune", 0.7, 1.0))
    return _result("erase_flagged", fine.model, cfgs, ident, new_labels, {}, progress, len(training))


def _run_retrain(model: nn.Module, training: ImageSet, clean: ImageSet, norm: Normalization, cfgs: dict[str, Any],
                 device: torch.device | str, num_classes: int, progress: Progress) -> DataRepairResult:
    rt = runtime_for(device)
    ident = _identify_stage(model, training, clean, norm, cfgs["identify"], rt, num_classes, progress, 0.3)
    new_labels = np.where(ident.flagged, -1, training.y).astype(np.int64)
    data = ImageSet.concat(kept_set(training, new_labels), clean)
    fresh = retrain(model, data, norm, cfgs["retrain"], rt, cfgs["identify"].seed, progress.stage("retrain", 0.3, 1))
    return _result("retrain_without", fresh, cfgs, ident, new_labels, {}, progress, len(training))


def _run_finetune_clean(model: nn.Module, training: ImageSet, clean: ImageSet, norm: Normalization,
                        cfgs: dict[str, Any], device: torch.device | str, num_classes: int,
                        progress: Progress) -> DataRepairResult:
    fine = vanilla_finetune(model, clean, norm, cfgs["finetune"], device, progress.stage("finetune", 0.0, 1.0))
    return _result("finetune_clean", fine.model, cfgs, None, training.y.astype(np.int64), {}, progress,
                   len(training))


DATA_REPAIR_METHODS: Mapping[str, DataRepairMethod] = MappingProxyType({
    "retain": DataRepairMethod(
        "identify harmful samples with clean-calibrated models (out-of-fold loss, clean null threshold), relabel "
        "those the models are confident about, unlearn the rest boundedly, fine-tune anchored on the clean set",
        _types(IdentifyConfig, RetainExtra, RepairTrainConfig),
        _configure(identify=IdentifyConfig, extra=RetainExtra, train=RepairTrainConfig), _run_retain),
    "drop_flagged": DataRepairMethod(
        "identify as retain, drop every flagged sample, fine-tune on the rest and the clean set",
        _types(IdentifyConfig, RepairTrainConfig), _configure(identify=IdentifyConfig, train=RepairTrainConfig),
        _run_drop),
    "erase_flagged": DataRepairMethod(
        "identify as retain, erase the flagged samples by gradient ascent on their loss, then fine-tune on the "
        "clean set", _types(IdentifyConfig, EraseConfig, FinetuneConfig),
        _configure(identify=IdentifyConfig, erase=EraseConfig, finetune=FinetuneConfig), _run_erase),
    "retrain_without": DataRepairMethod(
        "identify as retain, then train the architecture from scratch on the unflagged samples and the clean set",
        _types(IdentifyConfig, RetrainConfig), _configure(identify=IdentifyConfig, retrain=RetrainConfig),
        _run_retrain),
    "finetune_clean": DataRepairMethod(
        "fine-tune on the clean set only (no identification)", _types(FinetuneConfig),
        _configure(finetune=FinetuneConfig), _run_finetune_clean),
})


def validate_params(method: str, params: Mapping[str, object], seed: int = 0) -> dict[str, Any]:
    """``params`` checked against ``method``'s names and ranged types, and its configs built (so rules across
    parameters are checked too). Raises ``ValueError`` for an unknown method and a pydantic ``ValidationError``
    (a ``ValueError``) located at the unknown or bad parameter."""
    if method not in DATA_REPAIR_METHODS:
        raise ValueError(f"unknown data-repair method {method!r}; valid: {', '.join(sorted(DATA_REPAIR_METHODS))}")
    entry = DATA_REPAIR_METHODS[method]
    out = check_params(f"data-repair method {method!r}", entry.param_types, params)
    entry.configure(out, seed)
    return out


def default_params(method: str) -> dict[str, object]:
    """Every parameter of ``method`` with its default (for docs/parameters.md and reports)."""
    entry = DATA_REPAIR_METHODS[method]
    flat = _flat_params(entry.configure({}, 0))
    return {name: flat[name] for name in entry.param_types}


def min_clean_images(method: str, params: Mapping[str, object], seed: int = 0) -> int:
    """The fewest clean images ``method`` can work with: identification splits the clean set into ``folds``
    and needs two images per fold (a held-out null score and a reference to train); 1 for the rest."""
    configs = DATA_REPAIR_METHODS[method].configure(validate_params(method, params, seed), seed)
    ident = configs.get("identify")
    return 2 * ident.folds if isinstance(ident, IdentifyConfig) else 1


def _check_data(training: ImageSet, clean: ImageSet, num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if len(training) == 0:
        raise ValueError("the training data is empty")
    if training.image_shape != clean.image_shape:
        raise ValueError(f"training images are {training.image_shape}, clean images {clean.image_shape}")
    for name, data in (("training", training), ("clean", clean)):
        if len(data) and (data.y.min() < 0 or data.y.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), got [{data.y.min()}, {data.y.max()}]")


def repair_data(method: str, model: nn.Module, training: ImageSet, clean: ImageSet, norm: Normalization,
                params: Mapping[str, object], device: torch.device | str, num_classes: int, seed: int = 0,
                progress: Progress | None = None) -> DataRepairResult:
    """Run data-repair ``method`` on a copy of ``model`` with the (possibly corrupted) ``training`` data and the
    trusted ``clean`` set; ``params`` override the method's defaults (:data:`DATA_REPAIR_METHODS`). Bad values
    raise ``ValueError``; non-finite harm scores raise ``ValueError`` naming the cause; ``progress`` gets the
    stages and its ``check()`` may raise ``StopRequested``."""
    checked = validate_params(method, params, seed)
    _check_data(training, clean, num_classes)
    entry = DATA_REPAIR_METHODS[method]
    if method != "finetune_clean" and not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"data-repair method {method!r} scores samples on the model's classifier head and needs a "
                         "model whose last layer is an nn.Linear; this one has none")
    progress = progress or Progress()
    progress.sync = progress.sync or cuda_sync(runtime_for(device))
    return entry.run(model, training, clean, norm, entry.configure(checked, seed), device, num_classes, progress)
