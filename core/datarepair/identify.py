"""Step 1 of the repair: harm scores of the training samples against the trusted clean set, and a flagging rule
that needs no noise rate.

The clean set is split into ``folds``. For each fold, a copy of the model is fine-tuned on the other folds (a
*clean-calibrated* model: it unlearns part of what the corrupted training taught) and, at ``checkpoints`` points
of that short trajectory, every training sample and every held-out clean sample is scored:

- ``loss`` (default): -log p(y | x) under the calibrated models (averaged probabilities), the self-confidence
  signal of confident learning, computed with models that never trained on the sample's fold of the clean set.
  It ranks label noise better than TracIn in every measurement here (docs/datarepair.md).
- ``tracin`` (TracIn, Pruthi et al. 2020, restricted to the classifier head): harm(z) = -sum_k
  eta * <g_k(z), gbar_k>, with g_k(z) the gradient of z's cross-entropy w.r.t. the head ``[W | b]`` at checkpoint
  k and gbar_k the mean gradient of the fine-tuning clean folds. The head gradient has the closed form
  ``(p - onehot(y)) [h, 1]^T``, so <g(z), gbar> = (p - e_y)^T G [h, 1] with G = gbar as a K x (D+1) matrix: per
  batch O(B x K) memory, never an N x P matrix, whatever N. Positive = a step on z raises the clean loss.
- ``ekfac`` (core/datarepair/influence.py, the optional ``influence`` extra): the influence function of each
  training sample on the clean set's mean loss, harm(z) = -<gbar_q, (G + lambda)^-1 g(z)> over every Linear / Conv2d
  layer, with G kronfluence's EK-FAC curvature fitted on ``ekfac_factor_examples`` training samples. Under the
  *given* model, not the calibrated ones: an influence function linearises around a minimum of the training loss,
  which the given model is and a model fine-tuned on the clean set is not (and on the design seed it ranked better
  under the given model, docs/datarepair.md). One factor fit; per fold the query is the fitting folds' loss and the
  held-out fold is scored as the null, so no clean sample's score comes from a query it is part of, and the given
  model never saw any clean sample. Bounded memory: one aggregated query gradient, batched training gradients.
- ``cleanlab``: cleanlab's ``find_label_issues`` (confident learning, Northcutt et al. 2021) on the calibrated
  probabilities; flags by its own per-class thresholds; scores = 1 - cleanlab's self-confidence label quality.

Flagging (``tracin``, ``ekfac`` and ``loss``): the held-out clean samples are scored exactly as the training
samples (by a model that did not fine-tune on them, with a query they are not in), so their scores are a null
distribution of "harmless" samples; a training sample is flagged when its score exceeds the null's
``null_quantile``. This controls the false-positive rate on
harmless samples at about ``1 - null_quantile`` without knowing how much of the training set is corrupt. It is
conservative: the given model already fitted its training samples (including their given labels), so harmless
training samples score lower than unseen clean ones.

Scratch reference (``scratch_reference``, scorer ``loss``): a model fine-tuned from the given one keeps what the
clean set does not contradict, a backdoor included: BadNets samples (trigger + target label) get a LOWER loss
than clean ones under it (AUROC 0.10 on Fashion-MNIST, docs/datarepair.md). So each fold also trains the
architecture from re-initialised weights on the fitting folds only: a model that never saw the training data, to
which the trigger means nothing, so a poisoned sample's given (target) label is as unlikely as a wrong label. Both
references' out-of-fold losses are put on one scale against their own clean null,
u_r = (s_r - median(null_r)) / (quantile_r - median(null_r)) with quantile_r the null's 1 - (1 - null_quantile)/2
quantile (Bonferroni over the two references, so the false-alarm rate on clean samples stays <= 1 - null_quantile);
the harm score is max_r u_r and a sample is flagged when it exceeds 1. Step 2 relabels each flagged sample with
the probabilities of the reference that raised its score (``Identification.reference``).

Input quality (``input_quality``, core/datarepair/quality.py): a third reference asks whether the training *input*
is drawn like the clean inputs (Mahalanobis distance of a few image statistics: spatial-frequency band energies,
total variation, a noise estimate), for corrupted images whose label is right and that the label references do not
see. It is used only when the training inputs, as a population, exceed the clean null's quantile more often than the
held-out clean inputs do (:func:`population_test`, one-sided Fisher test at ``1 - null_quantile``); then the
Bonferroni split is three-way and ``Identification.input_flagged`` records its flags. Without that evidence it
flags nothing and the label references keep their split, so label-noise rows lose no precision through it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.data.imageset import ImageSet
from core.data.transforms import Normalization
from core.datarepair.quality import MIN_SIDE, input_quality_scores, statistics_of
from core.datarepair.repair import reinitialised
from core.defenses.robust_head import last_linear
from core.defenses.runtime import DeviceImages, Runtime, augment_generator, make_generator, sgd_epoch
from core.progress import Progress
from core.ranges import BatchSize, Flag, LearningRate, check_fields, float_in, int_in
from core.training import train_classifier

Scorer = Literal["tracin", "loss", "cleanlab", "ekfac"]


@dataclass(frozen=True)
class IdentifyConfig:
    """How harmful training samples are scored and flagged (module docstring)."""

    scorer: Scorer = "loss"
    folds: int_in(2, 10) = 2  # clean-set folds: each sample of the clean set is held out once (its null score)
    calib_epochs: int_in(1, 200) = 10  # epochs of the clean fine-tuning that calibrates each fold's model
    calib_lr: LearningRate = 0.01
    checkpoints: int_in(1, 20) = 3  # TracIn checkpoints along that trajectory, from the given model to its end
    null_quantile: float_in(0.5, 1.0, open_high=True) = 0.95  # flag above this quantile of the clean null
    calib_augment: Flag = True  # crop + flip while calibrating
    score_batch_size: BatchSize = 512
    scratch_reference: Flag = True  # scorer loss: also score with models trained from scratch on the clean folds
    scratch_epochs: int_in(1, 500) = 60  # epochs of that from-scratch training (per fold)
    scratch_lr: LearningRate = 0.05
    # also flag inputs whose image statistics are not drawn like the clean inputs' (core/datarepair/quality.py)
    input_quality: Flag = True
    # scorer ekfac: training samples (a seeded random subset) the EK-FAC curvature factors are fitted on
    ekfac_factor_examples: int_in(100, 1_000_000) = 2000
    seed: int_in(0, 2**31 - 1) = 0

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Identification:
    """Step 1's output: per training sample the harm score, the flag and the calibrated class probabilities;
    per clean sample its out-of-fold probabilities and null score; and how the threshold was chosen."""

    scores: np.ndarray  # float64 (N_train,)
    flagged: np.ndarray  # bool (N_train,)
    probs: np.ndarray  # float32 (N_train, K): calibrated probabilities, averaged over folds
    clean_probs: np.ndarray  # float32 (N_clean, K): each from the fold's model that never fine-tuned on it
    null_scores: np.ndarray  # float64 (N_clean,)
    details: dict[str, object]
    # with the scratch reference: per training sample which reference's probabilities ``probs`` holds (0 = the
    # clean-calibrated fine-tuned model, 1 = the from-scratch one) and each reference's out-of-fold clean probs
    reference: np.ndarray | None = None
    reference_clean_probs: list[np.ndarray] | None = None
    reference_probs: list[np.ndarray] | None = None  # each reference's training-sample probabilities
    # flagged by the label references (their loss on the given label), and by the input-quality reference
    # (``input_quality``: the input is not drawn like the clean inputs); ``flagged`` is their union
    label_flagged: np.ndarray | None = None
    input_flagged: np.ndarray | None = None
    # each label reference's raw (training scores, held-out clean null scores) and the number of references the
    # Bonferroni split was over (the input-quality reference included when it flags): what :func:`label_flags_at`
    # needs to flag at another level with the same rule
    label_refs: list[tuple[np.ndarray, np.ndarray]] | None = None
    n_split: int = 1


def _head_outputs(model: nn.Module, data: DeviceImages, head: nn.Linear, batch_size: int):
    """Per batch ``(slice, features [h, 1] float32, logits float32)`` of ``data`` in eval mode."""
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), data.rt.autocast():
            for start in range(0, len(data), batch_size):
                sl = slice(start, min(start + batch_size, len(data)))
                captured.clear()
                logits = model(data.inputs(sl)).float()
                h = captured[-1].float().flatten(1)
                yield sl, torch.cat([h, torch.ones(len(h), 1, device=h.device)], 1), logits
    finally:
        handle.remove()
        model.train(was_training)


def clean_head_gradient(model: nn.Module, data: DeviceImages, head: nn.Linear, batch_size: int) -> torch.Tensor:
    """Mean gradient of the cross-entropy over ``data`` w.r.t. the head ``[W | b]``: K x (D+1), closed form."""
    total = None
    for sl, hb, logits in _head_outputs(model, data, head, batch_size):
        err = logits.softmax(1) - F.one_hot(data.y[sl], logits.shape[1]).float()
        g = err.T @ hb
        total = g if total is None else total + g
    assert total is not None
    return total / len(data)


def tracin_dots(model: nn.Module, data: DeviceImages, head: nn.Linear, gbar: torch.Tensor,
                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of ``data``: <head gradient of its loss, gbar> (float64) and its class probabilities."""
    dots, probs = [], []
    for sl, hb, logits in _head_outputs(model, data, head, batch_size):
        p = logits.softmax(1)
        err = p - F.one_hot(data.y[sl], logits.shape[1]).float()
        dots.append(((hb @ gbar.T) * err).sum(1).double().cpu())
        probs.append(p.cpu())
    return torch.cat(dots).numpy(), torch.cat(probs).numpy()


def checkpoint_epochs(epochs: int, checkpoints: int) -> list[int]:
    """The epochs (0 = before any fine-tuning) after which TracIn scores: evenly spaced from 0 (the given
    model) to ``epochs`` (the calibrated model, always included: its probabilities are step 2's)."""
    if checkpoints == 1:
        return [epochs]
    return sorted({round(i * epochs / (checkpoints - 1)) for i in range(checkpoints)})


def fold_index(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """A seeded partition of ``range(n)`` into ``folds`` sorted index arrays of near-equal size."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, folds)]


def _probs(model: nn.Module, data: DeviceImages, batch_size: int) -> np.ndarray:
    """Class probabilities of ``data`` under ``model`` (eval mode), float64."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode(), data.rt.autocast():
            for start in range(0, len(data), batch_size):
                out.append(model(data.inputs(slice(start, min(start + batch_size, len(data))))).float().softmax(1))
    finally:
        model.train(was_training)
    return torch.cat(out).double().cpu().numpy()


def _label_loss(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)).astype(np.float64)


def null_scaled(scores: np.ndarray, null: np.ndarray, quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """``scores`` and ``null`` on the null's scale: 0 at its median, 1 at its ``quantile``."""
    med = float(np.median(null))
    hi = float(np.quantile(null, quantile, method="higher"))
    scale = max(hi - med, 1e-6)
    return (scores - med) / scale, (null - med) / scale


def label_flags_at(ident: Identification, quantile: float) -> np.ndarray:
    """The label references' flags at null quantile ``quantile`` instead of the configured one, by the same rule
    (each reference against its own held-out clean null, Bonferroni over ``ident.n_split``): at most about
    ``1 - quantile`` of clean samples get them. Used by step 2 to ask for stronger evidence before the actions that
    cost most when the flag is a false alarm (relabelling, unlearning). Without recorded references (the cleanlab
    scorer, which flags by its own thresholds) these are the label flags themselves."""
    base = ident.flagged if ident.label_flagged is None else ident.label_flagged
    if not ident.label_refs:
        return np.asarray(base, dtype=bool).copy()
    return _flags_at(ident, quantile)[0]


def null_label_flags_at(ident: Identification, quantile: float) -> np.ndarray | None:
    """Which held-out clean samples :func:`label_flags_at` would flag at ``quantile`` (same rule, same references,
    each clean sample scored by a model that never trained on it): the clean null's own flags, so that a rate of
    flags can be compared with what clean samples of the same class get. ``None`` without recorded references."""
    if not ident.label_refs:
        return None
    return _flags_at(ident, quantile)[1]


def posterior_label_flags_at(ident: Identification, y: np.ndarray, clean_y: np.ndarray,
                             quantile: float) -> np.ndarray:
    """The label references' flags at null quantile ``quantile`` by :func:`label_flags_at`'s rule, each reference
    scoring instead ``-log`` of the posterior that the given label is the true one under class-conditional noise,
    ``p(y | x) T[y, y] / sum_k p(k | x) T[y, k]``, with ``T[i, j] = P(given i | true j)`` its own confident-learning
    noise matrix (:func:`core.datarepair.separate.noise_matrix`, from its probabilities of every training sample and
    their given labels); its held-out clean samples are scored the same way (their labels, the same matrix), so the
    clean null is the posterior's. A label that the matrix says receives no noise keeps a posterior near 1 however
    much the model doubts it, and a doubted label of a class that receives flips is scored up: under class-pair flips
    the flags concentrate on the flip destinations. Without recorded references: :func:`label_flags_at`."""
    from core.datarepair.separate import noise_matrix

    if not ident.label_refs:
        return label_flags_at(ident, quantile)
    y, clean_y = y.astype(np.int64), clean_y.astype(np.int64)
    train = ident.reference_probs if ident.reference_probs is not None else [ident.probs]
    held = ident.reference_clean_probs if ident.reference_clean_probs is not None else [ident.clean_probs]
    q = 1 - (1 - quantile) / max(1, ident.n_split)
    scaled = []
    for p, pc in zip(train, held, strict=True):
        t = noise_matrix(y, p, p.shape[1])
        p, pc = p.astype(np.float64), pc.astype(np.float64)
        post = (p * t[y])[np.arange(len(y)), y] / np.maximum((p * t[y]).sum(1), 1e-300)
        post_c = (pc * t[clean_y])[np.arange(len(clean_y)), clean_y] / np.maximum((pc * t[clean_y]).sum(1), 1e-300)
        scaled.append(null_scaled(-np.log(np.clip(post, 1e-12, 1.0)), -np.log(np.clip(post_c, 1e-12, 1.0)), q)[0])
    return np.max(scaled, axis=0) > 1.0


def _flags_at(ident: Identification, quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """(training flags, clean-null flags) of the recorded label references at null quantile ``quantile``: each
    reference against its own null, Bonferroni over ``ident.n_split``, flagged by any reference."""
    assert ident.label_refs
    q = 1 - (1 - quantile) / max(1, ident.n_split)
    scaled = [null_scaled(s, nl, q) for s, nl in ident.label_refs]
    return (np.max([u for u, _ in scaled], axis=0) > 1.0, np.max([nu for _, nu in scaled], axis=0) > 1.0)


def _check_finite(values: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise ValueError(
            f"harm scores are not finite: {len(bad)} {what} (first index {int(bad[0])}) got NaN/Inf; the model's "
            "outputs or the calibration fine-tuning diverged (check the weights, the normalisation and calib_lr)")


def population_test(train: np.ndarray, null: np.ndarray, level: float, alpha: float) -> dict[str, object]:
    """Do the training inputs, as a population, exceed the clean null's ``level`` quantile more often than the
    held-out clean inputs do? One-sided Fisher exact test of the two exceedance counts at ``alpha`` (the method's
    own false-alarm level, 1 - null_quantile). Without that evidence (label noise, a small trigger, a clean
    training set) the input-quality reference flags nothing, so it cannot cost the label flags any precision.
    The counts include the null's own estimation noise, which a binomial test against ``1 - level`` would not."""
    from scipy.stats import fisher_exact

    u, nu = null_scaled(train, null, level)
    k_train, k_null = int((u > 1).sum()), int((nu > 1).sum())
    _, p = fisher_exact([[k_train, len(train) - k_train], [k_null, len(null) - k_null]], alternative="greater")
    return {"corrupted_inputs": bool(p < alpha), "p_value": float(p), "level": level, "alpha": alpha,
            "train_exceed_rate": k_train / max(1, len(train)), "clean_exceed_rate": k_null / max(1, len(null)),
            "rule": ("input flags only when more training inputs than held-out clean inputs exceed the clean null's "
                     f"{level:g} quantile of input-quality distance (one-sided Fisher exact test, p < {alpha:g})")}


def identify(model: nn.Module, training: ImageSet, clean: ImageSet, norm: Normalization, cfg: IdentifyConfig,
             rt: Runtime, num_classes: int, progress: Progress, batch_size: int = 128) -> Identification:
    """Score and flag every training sample (module docstring); ``model`` is not modified."""
    if len(clean) < 2 * cfg.folds:
        raise ValueError(f"the clean set has {len(clean)} images; need at least {2 * cfg.folds} for {cfg.folds} folds")
    train_data = DeviceImages(training, norm, rt)
    n, k = len(training), num_classes
    train_tracin = np.zeros(n)
    train_probs = np.zeros((n, k), dtype=np.float64)
    clean_probs = np.zeros((len(clean), k), dtype=np.float32)
    null_tracin = np.zeros(len(clean))
    use_scratch = cfg.scratch_reference and cfg.scorer == "loss"
    scratch_train = np.zeros((n, k), dtype=np.float64)
    scratch_clean = np.zeros((len(clean), k), dtype=np.float64)
    use_ekfac = cfg.scorer == "ekfac"
    if use_ekfac:  # before the calibration folds: a worker without the optional extra refuses at once
        from core.datarepair.influence import require_kronfluence

        require_kronfluence()
    train_ekfac = np.zeros(n)
    null_ekfac = np.zeros(len(clean))
    calib_share = 0.6 if use_scratch else 1.0
    folds_progress = progress.span(0.0, 0.3) if use_ekfac else progress
    marks = checkpoint_epochs(cfg.calib_epochs, cfg.checkpoints)
    parts = fold_index(len(clean), cfg.folds, cfg.seed)
    for f, held in enumerate(parts):
        fold_stage = folds_progress.span(f / cfg.folds, (f + 1) / cfg.folds)
        stage = fold_stage.span(0.0, calib_share)
        fit_idx = np.setdiff1d(np.arange(len(clean)), held)
        fit = DeviceImages(clean.subset(fit_idx), norm, rt)
        null = DeviceImages(clean.subset(held), norm, rt)
        calib = copy.deepcopy(model).to(rt.device)
        _, head = last_linear(calib)
        opt = torch.optim.SGD(calib.parameters(), lr=cfg.calib_lr, momentum=0.9, weight_decay=5e-4)
        order_gen, aug_gen = make_generator(cfg.seed + 7 * f), augment_generator(rt, cfg.seed + 7 * f + 1)
        for epoch in range(cfg.calib_epochs + 1):
            if epoch in marks:
                gbar = clean_head_gradient(calib, fit, head, cfg.score_batch_size)
                # an SGD step of size calib_lr on z changes the clean loss by about -calib_lr * <g(z), gbar>
                dots, p_train = tracin_dots(calib, train_data, head, gbar, cfg.score_batch_size)
                null_dots, p_null = tracin_dots(calib, null, head, gbar, cfg.score_batch_size)
                train_tracin -= cfg.calib_lr * dots
                null_tracin[held] -= cfg.calib_lr * null_dots
            if epoch == cfg.calib_epochs:
                break
            sgd_epoch(calib, fit, opt, batch_size, cfg.calib_augment, order_gen, aug_gen, stage)
            stage.update((epoch + 1) / cfg.calib_epochs)
        train_probs += p_train / cfg.folds  # the last mark is the end of the trajectory
        clean_probs[held] = p_null
        del calib, opt
        if use_scratch:  # a model that never saw the training data (module docstring)
            fresh = reinitialised(model, cfg.seed + 7 * f + 3)
            train_classifier(fresh, clean.subset(fit_idx), norm, cfg.scratch_epochs, cfg.scratch_lr, batch_size,
                             rt.device, augment=cfg.calib_augment, seed=cfg.seed + 7 * f + 3,
                             progress=fold_stage.span(calib_share, 1.0))
            scratch_train += _probs(fresh, train_data, cfg.score_batch_size) / cfg.folds
            scratch_clean[held] = _probs(fresh, null, cfg.score_batch_size)
            del fresh
    _check_finite(train_probs.sum(1), "training samples' calibrated probabilities")
    if use_ekfac:  # influence on each fold's fitting part's mean loss, under the given model (influence.py)
        from core.datarepair.influence import ekfac_harm

        pairs = [(clean.subset(np.setdiff1d(np.arange(len(clean)), held)), [training, clean.subset(held)])
                 for held in parts]
        harm = ekfac_harm(model, training, pairs, norm, rt, cfg.ekfac_factor_examples, cfg.seed + 5,
                          progress.span(0.3, 1.0), cfg.score_batch_size)
        train_ekfac = sum(h[0] for h in harm) / cfg.folds
        for held, h in zip(parts, harm, strict=True):
            null_ekfac[held] = h[1]
    train_probs = train_probs.astype(np.float32)
    y = training.y.astype(np.int64)
    if cfg.scorer == "tracin":
        scores, null_scores = train_tracin / cfg.folds, null_tracin
    elif use_ekfac:
        scores, null_scores = train_ekfac, null_ekfac
    else:  # loss and cleanlab rank by the calibrated model's loss on the given label
        scores = -np.log(np.clip(train_probs[np.arange(n), y], 1e-12, 1.0)).astype(np.float64)
        null_scores = -np.log(np.clip(clean_probs[np.arange(len(clean)), clean.y], 1e-12, 1.0)).astype(np.float64)
    _check_finite(scores, "training samples")
    _check_finite(null_scores, "clean samples")
    details: dict[str, object] = {"scorer": cfg.scorer, "checkpoint_epochs": marks, "folds": cfg.folds}
    # the references on the null scale: the label scores (one, or two with the scratch reference) and, with
    # input_quality, the inputs' distance to the clean inputs' statistics (core/datarepair/quality.py)
    refs: list[tuple[np.ndarray, np.ndarray]] = []
    if cfg.scorer != "cleanlab":
        refs.append((scores, null_scores))
    if use_scratch:
        _check_finite(scratch_train.sum(1), "training samples' from-scratch reference probabilities")
        refs.append((_label_loss(scratch_train, y), _label_loss(scratch_clean, clean.y)))
    quality = None
    if cfg.input_quality and min(training.image_shape[:2]) < MIN_SIDE:
        details["input_quality_test"] = {"corrupted_inputs": False, "skipped": (
            f"images of {training.image_shape[0]}x{training.image_shape[1]} pixels are too small for the "
            f"input-quality statistics (at least {MIN_SIDE}x{MIN_SIDE})")}
    elif cfg.input_quality:
        q_train, q_null = input_quality_scores(statistics_of(training), statistics_of(clean), parts)
        # the level the input-quality reference would be flagged at (Bonferroni with the label references)
        q_level = 1 - (1 - cfg.null_quantile) / (len(refs) + 1) if refs else cfg.null_quantile
        gate = population_test(q_train, q_null, q_level, 1 - cfg.null_quantile)
        details["input_quality_test"] = gate
        if gate["corrupted_inputs"]:  # else no evidence that the inputs differ from the clean ones: no input flags
            quality = (q_train, q_null)
    reference, ref_clean, ref_train, input_flagged = None, None, None, None
    n_split = 1
    if cfg.scorer == "cleanlab":
        flagged, scores = _cleanlab_flags(y, train_probs)
        details["threshold_rule"] = "cleanlab.filter.find_label_issues (confident learning, per-class thresholds)"
        label_flagged = flagged
        if quality is not None:
            u_q, nu_q = null_scaled(quality[0], quality[1], cfg.null_quantile)
            input_flagged = u_q > 1.0
            details["input_threshold_rule"] = (f"input-quality distance above the {cfg.null_quantile:g} quantile of "
                                               f"{len(clean)} held-out clean inputs")
            details["input_null_flag_rate"] = float(np.mean(nu_q > 1.0))
    elif len(refs) == 1 and quality is None:
        threshold = float(np.quantile(null_scores, cfg.null_quantile, method="higher"))
        flagged = label_flagged = scores > threshold
        details["threshold"] = threshold
        details["threshold_rule"] = (f"score above the {cfg.null_quantile:g} quantile of {len(clean)} held-out clean "
                                     "samples scored the same way (out of fold)")
        details["null_flag_rate"] = float(np.mean(null_scores > threshold))
    else:
        n_refs = n_split = len(refs) + (quality is not None)
        q = 1 - (1 - cfg.null_quantile) / n_refs
        scaled = [null_scaled(s, nl, q) for s, nl in refs]
        u_label = np.max([u for u, _ in scaled], axis=0)
        nu_label = np.max([nu for _, nu in scaled], axis=0)
        label_flagged = u_label > 1.0
        scores, null_scores = u_label, nu_label
        names = ["fine-tuned" if cfg.scorer == "loss" else cfg.scorer] + (["from-scratch"] if use_scratch else [])
        if quality is not None:
            u_q, nu_q = null_scaled(quality[0], quality[1], q)
            input_flagged = u_q > 1.0
            scores, null_scores = np.maximum(scores, u_q), np.maximum(null_scores, nu_q)
            names.append("input-quality")
        if use_scratch:
            reference = (scaled[1][0] > scaled[0][0]).astype(np.int8)
            ref_train = [train_probs, scratch_train.astype(np.float32)]
            train_probs = np.where(reference[:, None] == 1, scratch_train, train_probs).astype(np.float32)
            ref_clean = [clean_probs, scratch_clean.astype(np.float32)]
            details["n_flagged_by_scratch"] = int(((scaled[1][0] > 1) & (scaled[0][0] <= 1)).sum())
        _check_finite(scores, "training samples (on the references' null scale)")
        flagged = scores > 1.0
        details["threshold"] = 1.0
        details["threshold_rule"] = (
            f"max over the references ({', '.join(names)}) of the out-of-fold score scaled to 0 at the median and 1 "
            f"at the {q:g} quantile of {len(clean)} held-out clean samples scored the same way; flagged above 1 "
            f"(Bonferroni: at most {1 - cfg.null_quantile:g} of clean samples)")
        details["null_flag_rate"] = float(np.mean(null_scores > 1.0))
    details.setdefault("null_flag_rate", float(np.mean(null_scores > details.get("threshold", math.inf))))
    if cfg.input_quality and input_flagged is None:  # the population test found no corrupted inputs
        input_flagged = np.zeros(n, dtype=bool)
    if input_flagged is not None:
        flagged = flagged | input_flagged
        details["n_input_flagged"] = int(input_flagged.sum())
        details["n_input_flagged_only"] = int((input_flagged & ~label_flagged).sum())
    details["n_flagged"] = int(flagged.sum())
    return Identification(scores=scores, flagged=flagged, probs=train_probs, clean_probs=clean_probs,
                          null_scores=null_scores, details=details, reference=reference,
                          reference_clean_probs=ref_clean, reference_probs=ref_train,
                          label_flagged=np.asarray(label_flagged, dtype=bool), input_flagged=input_flagged,
                          label_refs=refs if cfg.scorer != "cleanlab" else None, n_split=n_split)


def _cleanlab_flags(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's confident-learning flags and 1 - self-confidence as the score (imported here: optional)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    p = probs.astype(np.float64)
    p = p / p.sum(1, keepdims=True)
    flagged = find_label_issues(labels=y, pred_probs=p, filter_by="prune_by_noise_rate")
    quality = get_label_quality_scores(labels=y, pred_probs=p, method="self_confidence")
    return np.asarray(flagged, dtype=bool), 1.0 - np.asarray(quality, dtype=np.float64)
