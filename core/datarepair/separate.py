"""Step 2: separate the beneficial from the detrimental information inside the flagged samples.

A flagged sample carries an input and a label. Following RDIA (Kong et al., ICLR 2022: relabelling harmful
samples beats deleting them under cross-entropy), the input is kept whenever the clean-calibrated models are
confident in another class: the sample is relabelled, its input still teaches the features of that class (for a
BadNets sample, that the trigger means nothing). "Confident" is calibrated on the clean set, not fixed: the
threshold is the lowest confidence at which the calibrated models' out-of-fold predictions on held-out clean
samples are right at least ``relabel_precision`` of the time. A flagged sample the models confidently agree with
is kept as it is (a false alarm of the score). The rest (no confident class: its label is untrusted and its
input unknown, e.g. a corrupted image) is dropped (with the scratch reference of step 1, the probabilities and the
threshold are those of the reference that flagged the sample: a backdoored model "confirms" its poisoned samples,
the from-scratch model relabels them to the class their content shows); those whose given label the calibrated
models find less likely than chance are also unlearned (step 3), the detrimental part being the association of
that input with that label.

Inputs flagged by the input-quality reference (``input_flagged``: the image is not drawn like the clean inputs,
core/datarepair/quality.py) are separated the other way round: the label is trusted, the input is not. One whose
label the label references do not contest (not flagged by them) keeps its label and is trained on with weight
``input_weight`` (0 drops it; docs/datarepair.md gives the measurements that chose the default). One whose label
is contested too is separated as any label-flagged sample (relabelled, confirmed or dropped): a BadNets image is
such a sample where the trigger is large enough to change the image statistics, and relabelling it is what
unlearns the trigger. ``drop_both_flagged`` drops such samples instead (a relabelling read from a corrupted input
can be wrong); docs/datarepair.md gives the measurement that kept the default.

Acting needs stronger evidence than flagging (``strong``): relabelling a sample or unlearning its label is what
costs when the flag is a false alarm (a right label replaced by the reference's mistake, or pushed down), while
keeping or dropping a benign sample costs little. Measured with loose flags (docs/datarepair.md, "Acting needs
stronger evidence than flagging"; BENCHMARKS.md 7.0b): of the benign samples flagged, about a fifth were relabelled
to a wrong class and another fifth had their right label unlearned, almost all of them raised by the from-scratch
reference (a model trained on half the clean set, confidently wrong on 7% of held-out clean images), and that is
what put ``retain`` below erasing. So only the label
flags that also hold at the stricter null quantile of step 2 (``act_quantile``, the same clean-null rule) are
relabelled, confirmed or unlearned; the other flagged samples are kept with their label (``weak_flags="keep"``: the
benign part is kept) or dropped (``"drop"``). At the default flagging level the two levels coincide and nothing
changes.

``weak_flags="class_test"`` decides per class (:func:`concentrated_classes`): an all-to-one backdoor puts its poisons
under one given label, so that label's strong flags are both far more than its share of the training set predicts
(one-sided binomial) and far above the rate at which the same references flag the held-out clean samples of that
class (``clean_strong``, one-sided Fisher exact test); each test is Bonferroni over the K classes at level
``class_alpha`` (1 - act_quantile in ``retain``), and a class both tests reject has its weak flags dropped (the
likely poisons among them go), the other classes keep theirs. Why the strong flags and not the weak ones: the weak
flags of the target class are not above its share (measured, docs/datarepair.md "Which weak flags to drop"). Why
both tests: the share alone rejects the hard classes, where benign strong flags crowd (it cost ~0.3 points on
asymmetric noise); the clean rate alone asks "is there noise in class c", not "is it concentrated in c", and under
symmetric noise rejects nearly every class (it became ``"drop"``). Requiring both was never below the share test
alone in any measured cell and better on asymmetric noise (BENCHMARKS.md 7.0c and its addendum, where the two-test
rule is named ``class_both`` and the share test alone ``class_test``); it still fires on some flip destinations and
on a CIFAR-10 sym20 class, so it is not the default.

``relabel_prior="noise_matrix"`` uses the noise's structure in the relabelling: under class-conditional noise a wrong
label comes from some classes more than others, ``T[i, j] = P(given i | true j)``, estimated by confident learning
(:func:`noise_matrix`, cleanlab) per reference; the probability the model leaves to the classes other than the given
one is shared among them by Bayes' rule with T (:func:`alternative_confidence`), so a flagged label of a flip
destination is relabelled to its source class. Under symmetric noise it is the plain rule exactly. Measured
(BENCHMARKS.md 7.0d): it relabels more true flips right and does not raise the repaired accuracy (negative), so it
is not the default; the noise matrix helps where it chooses which flags act instead
(:func:`core.datarepair.identify.posterior_label_flags_at`, ``retain``'s ``act_score="noise_posterior"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import binom, fisher_exact

MIN_RELABEL_SUPPORT = 10  # held-out clean samples the confidence threshold must rest on at least
WeakFlags = Literal["keep", "drop", "class_test"]
RelabelPrior = Literal["none", "noise_matrix"]


@dataclass
class Separation:
    """Per training sample: the label to train on (``-1`` = dropped) and which samples are unlearned."""

    new_labels: np.ndarray  # int64 (N,)
    relabelled: np.ndarray  # bool (N,)
    confirmed: np.ndarray  # bool (N,): flagged, but the calibrated models confidently agree with the label
    dropped: np.ndarray  # bool (N,)
    unlearn: np.ndarray  # bool (N,): dropped and the given label less likely than chance
    details: dict[str, object]
    # per sample the weight of its loss in step 3 (1 except the corrupted-looking inputs kept at input_weight)
    weights: np.ndarray | None = None
    input_kept: np.ndarray | None = None  # bool (N,): input flagged, label uncontested, kept at input_weight
    weak: np.ndarray | None = None  # bool (N,): label-flagged, not at the acting level (kept or dropped as told)


def relabel_threshold(clean_probs: np.ndarray, clean_y: np.ndarray, precision: float) -> float:
    """The lowest confidence tau such that the held-out clean samples with max probability >= tau are
    classified right at least ``precision`` of the time (``inf`` when no such set of at least
    :data:`MIN_RELABEL_SUPPORT` samples exists: then nothing is relabelled)."""
    conf = clean_probs.max(1)
    correct = clean_probs.argmax(1) == clean_y
    order = np.argsort(-conf, kind="stable")
    prec = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(prec[MIN_RELABEL_SUPPORT - 1:] >= precision) + MIN_RELABEL_SUPPORT - 1
    if len(ok) == 0:
        return float("inf")
    return float(conf[order][ok[-1]])


def noise_matrix(y: np.ndarray, probs: np.ndarray, num_classes: int) -> np.ndarray:
    """``T[i, j] = P(given label i | true label j)`` estimated by confident learning (Northcutt et al., JAIR 2021;
    cleanlab's :func:`cleanlab.count.estimate_py_and_noise_matrices_from_probabilities`) from the given labels ``y``
    and the calibrated models' probabilities of the same samples. K x K, columns sum to 1. A class absent from ``y``
    or never predicted gets the identity column (no noise is assumed for it)."""
    from cleanlab.count import estimate_py_and_noise_matrices_from_probabilities

    y = y.astype(np.int64)
    present = np.bincount(y, minlength=num_classes) > 0
    p = np.clip(probs.astype(np.float64), 1e-12, None)
    p = p / p.sum(1, keepdims=True)
    if not present.all():  # cleanlab needs every class among the labels
        return np.eye(num_classes)
    _, t, _, _ = estimate_py_and_noise_matrices_from_probabilities(y, p)
    t = np.nan_to_num(np.asarray(t, dtype=np.float64), nan=0.0)
    bad = t.sum(0) <= 0
    t[:, bad] = np.eye(num_classes)[:, bad]
    return t / t.sum(0, keepdims=True)


def alternative_confidence(probs: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per sample and class the confidence that the class is the true one, the given label being the flag's suspect:
    the given label keeps its probability ``p_y``, and the rest, ``1 - p_y``, is shared among the other classes by
    Bayes' rule with the noise matrix, ``c_j = (1 - p_y) p_j T[y, j] / sum_{k != y} p_k T[y, k]`` (p(true = j | x,
    given = y, the label wrong) ∝ p(j | x) P(given = y | true = j)). Under class-pair flips the mass goes to the
    label's source class; under symmetric noise (``T[y, j]`` equal for every j != y) ``c = p`` exactly. Where the
    matrix gives the label no source at all (every ``p_k T[y, k]`` zero, k != y), ``c = p`` too (no evidence)."""
    y = y.astype(np.int64)
    rows = np.arange(len(y))
    p = probs.astype(np.float64)
    w = p * t[y]  # (N, K): p_j T[y, j]
    w[rows, y] = 0.0
    total = w.sum(1)
    out = p.copy()
    ok = total > 0
    rest = 1.0 - p[rows, y]
    out[ok] = w[ok] * (rest[ok] / total[ok])[:, None]
    out[rows[ok], y[ok]] = p[rows[ok], y[ok]]
    return out


def concentrated_classes(y: np.ndarray, strong: np.ndarray, num_classes: int, alpha: float,
                         clean_y: np.ndarray | None = None,
                         clean_strong: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which given labels hold more of the ``strong`` flags than their share of the training set predicts:
    per class c, with k_c of the S strong flags under label c and n_c of the N samples, the one-sided binomial p-value
    P(Binomial(S, n_c / N) >= k_c), rejected below ``alpha / num_classes`` (Bonferroni over the classes, so at most
    ``alpha`` chance of any rejection when the flags fall on the labels as the training set does). Returns
    (rejected per class, p-value per class). Why: the poisons of an all-to-one backdoor share the target label, so
    that label's flags are concentrated, while label noise and false alarms spread over the classes (module
    docstring); no threshold is fitted, the level is the acting level's own.

    With ``clean_y`` and ``clean_strong`` (the held-out clean samples' labels and their flags by the same rule,
    :func:`core.datarepair.identify.null_label_flags_at`), the expectation is the clean null's own rate in the class
    instead of the class's share: per class the one-sided Fisher exact test of k_c of n_c training samples flagged
    against m_c of l_c clean samples of class c flagged, Bonferroni over the classes. A hard class, whose clean samples
    are flagged more often, then expects more flags; the clean rate's own estimation noise (about a hundred clean
    samples per class) is in the test."""
    y = y.astype(np.int64)
    n_c = np.bincount(y, minlength=num_classes)
    k_c = np.bincount(y[strong], minlength=num_classes)
    if clean_y is not None and clean_strong is not None:
        cy = clean_y.astype(np.int64)
        l_c = np.bincount(cy, minlength=num_classes)
        m_c = np.bincount(cy[clean_strong], minlength=num_classes)
        pvals = np.array([fisher_exact([[k_c[c], n_c[c] - k_c[c]], [m_c[c], l_c[c] - m_c[c]]],
                                       alternative="greater")[1] if n_c[c] and l_c[c] else 1.0
                          for c in range(num_classes)])
        return pvals < alpha / num_classes, pvals
    total = int(strong.sum())
    pvals = np.ones(num_classes)
    if total > 0:
        pvals = binom.sf(k_c - 1, total, n_c / max(1, len(y)))
    return pvals < alpha / num_classes, pvals


def separate(flagged: np.ndarray, y: np.ndarray, probs: np.ndarray, clean_probs: np.ndarray,
             clean_y: np.ndarray, precision: float, num_classes: int, reference: np.ndarray | None = None,
             reference_clean_probs: list[np.ndarray] | None = None,
             reference_probs: list[np.ndarray] | None = None, input_flagged: np.ndarray | None = None,
             input_weight: float = 1.0, drop_both_flagged: bool = False, strong: np.ndarray | None = None,
             weak_flags: WeakFlags = "keep", class_alpha: float = 0.05,
             clean_strong: np.ndarray | None = None, relabel_prior: RelabelPrior = "none",
             prior_probs: list[np.ndarray] | None = None) -> Separation:
    """Relabel, confirm or drop each flagged sample (module docstring); unflagged samples keep their label.
    With ``reference`` (per sample, which of ``reference_clean_probs``' models gave its ``probs``), each sample's
    confidence threshold is calibrated on that model's own held-out clean probabilities; with ``reference_probs``
    (every reference's probabilities), a dropped sample is unlearned only when every reference finds its given
    label less likely than chance. ``flagged`` are the label references' flags; with ``input_flagged`` the
    inputs flagged by input quality are separated as the module docstring says; ``drop_both_flagged`` drops a
    sample flagged by both (its input and its label untrusted) instead of relabelling it from that input. With
    ``strong`` (the label flags at the acting level), only ``flagged & strong`` are relabelled, confirmed, dropped
    or unlearned as above; the rest of ``flagged`` is kept with its label or dropped (``weak_flags``; ``"class_test"``:
    dropped in the classes :func:`concentrated_classes` rejects at level ``class_alpha`` both against their share of
    the training set and against ``clean_strong``, the held-out clean samples' flags at the acting level, kept in the
    others). ``relabel_prior="noise_matrix"``: the relabel target and its confidence are
    :func:`alternative_confidence`'s, with the noise matrix (:func:`noise_matrix`) estimated per reference from
    ``prior_probs`` (each reference's probabilities of every training sample; ``probs`` without it) and applied to the
    samples whose ``probs`` that reference gave; the confidence threshold is unchanged."""
    y = y.astype(np.int64)
    weak = np.zeros(len(y), dtype=bool)
    if strong is not None:
        weak = flagged & ~strong
        flagged = flagged & strong
    conf_probs = probs
    prior_details: dict[str, object] = {}
    if relabel_prior == "noise_matrix":
        sources = prior_probs if prior_probs is not None else [probs]
        which = (reference if reference is not None and len(sources) > 1
                 else np.zeros(len(y), dtype=np.int64)).astype(np.int64)
        mats = [noise_matrix(y, p, num_classes) for p in sources]
        conf_probs = np.asarray(probs, dtype=np.float64).copy()
        for r, t in enumerate(mats):
            sel = which == r
            if sel.any():
                conf_probs[sel] = alternative_confidence(probs[sel], y[sel], t)
        prior_details = {"relabel_prior": relabel_prior,
                         "noise_matrices": [np.round(t, 4).tolist() for t in mats],
                         "noise_rate_estimates": [float(1 - np.mean(np.diag(t))) for t in mats]}
    elif relabel_prior != "none":
        raise ValueError(f"unknown relabel_prior {relabel_prior!r}")
    pred = conf_probs.argmax(1).astype(np.int64)
    if reference is None or reference_clean_probs is None:
        tau = relabel_threshold(clean_probs, clean_y, precision)
        confident = conf_probs.max(1) >= tau
        taus = [tau]
    else:
        taus = [relabel_threshold(cp, clean_y, precision) for cp in reference_clean_probs]
        confident = conf_probs.max(1) >= np.asarray(taus)[reference]
        tau = taus[0]
    relabelled = flagged & confident & (pred != y)
    confirmed = flagged & confident & (pred == y)
    if drop_both_flagged and input_flagged is not None:  # neither the input nor the label is trusted
        both = flagged & input_flagged
        relabelled, confirmed = relabelled & ~both, confirmed & ~both
    dropped = flagged & ~relabelled & ~confirmed
    every = [probs] if reference_probs is None else reference_probs
    unlearn = dropped & np.all([p[np.arange(len(y)), y] < 1.0 / num_classes for p in every], axis=0)
    weights = np.ones(len(y), dtype=np.float32)
    input_kept = np.zeros(len(y), dtype=bool)
    classes: list[int] = []
    if weak_flags == "drop":
        dropped = dropped | weak
    elif weak_flags == "class_test" and strong is not None:
        if clean_strong is None:
            raise ValueError('weak_flags="class_test" needs clean_strong (the clean null\'s flags at the acting level)')
        # more strong flags than the class's share of the training set, and a higher strong-flag rate than the
        # clean samples of the class get
        rejected = (concentrated_classes(y, flagged, num_classes, class_alpha)[0]
                    & concentrated_classes(y, flagged, num_classes, class_alpha, clean_y, clean_strong)[0])
        classes = np.flatnonzero(rejected).tolist()
        dropped = dropped | (weak & rejected[y])
    if input_flagged is not None:  # input untrusted, label uncontested: kept at input_weight (0: dropped)
        only = input_flagged & ~flagged & ~(weak & dropped)
        input_kept = only & (input_weight > 0)
        dropped = dropped | (only & (input_weight == 0))
        weights[input_kept] = input_weight
    weights[dropped] = 0.0
    new_labels = y.copy()
    new_labels[relabelled] = pred[relabelled]
    new_labels[dropped] = -1
    details = {
        **prior_details,
        "relabel_confidence": tau if np.isfinite(tau) else None,
        **({"relabel_confidence_scratch": taus[1] if np.isfinite(taus[1]) else None} if len(taus) > 1 else {}),
        **({"n_relabelled_by_scratch": int((relabelled & (reference == 1)).sum())} if len(taus) > 1 else {}),
        "relabel_rule": (f"flagged and the calibrated models' max probability >= the lowest confidence at which "
                         f"held-out clean predictions are >= {precision:g} precise"),
        "n_relabelled": int(relabelled.sum()), "n_confirmed": int(confirmed.sum()),
        "n_dropped": int(dropped.sum()), "n_unlearned": int(unlearn.sum()),
        **({"n_weak_flags": int(weak.sum()), "weak_flags": weak_flags,
            "weak_rule": ("label-flagged but not at the acting level (act_quantile): not relabelled or unlearned, "
                          + {"keep": "kept with its label", "drop": "dropped",
                             "class_test": (f"dropped in the classes whose strong flags exceed both their share of "
                                            f"the training set (binomial) and the held-out clean samples' rate in "
                                            f"that class (Fisher exact), each one-sided, Bonferroni over "
                                            f"{num_classes} classes at {class_alpha:g}; kept in the others"),
                             }[weak_flags]),
            **({"weak_dropped_classes": classes, "n_weak_dropped": int((weak & dropped).sum())}
               if weak_flags == "class_test" else {})}
           if strong is not None else {}),
        **({"n_input_kept": int(input_kept.sum()), "input_weight": input_weight,
            "n_both_flagged": int((input_flagged & flagged).sum()), "drop_both_flagged": drop_both_flagged,
            "input_rule": ("input flagged, label uncontested: kept with its label at weight input_weight (0: "
                           "dropped); input flagged and label contested: "
                           + ("dropped (drop_both_flagged)" if drop_both_flagged
                              else "separated as any label flag"))}
           if input_flagged is not None else {}),
    }
    return Separation(new_labels, relabelled, confirmed, dropped, unlearn, details, weights, input_kept, weak)
