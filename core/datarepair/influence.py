"""The ``ekfac`` scorer of step 1: influence-function harm scores with an EK-FAC inverse Hessian (kronfluence).

For a model theta fitted on the training set, up-weighting a training sample z by eps moves the parameters by
-eps H^-1 g(z) (H the Hessian of the training loss, g(z) the gradient of z's loss), so the clean set's mean loss
L_c changes by -eps <grad L_c, H^-1 g(z)> (Koh & Liang 2017). The harm score is that first-order change per unit
of weight, with the sign of the other scorers (higher = more harmful)::

    harm(z) = -<gbar_q, (G + lambda I)^-1 g(z)>,   gbar_q = mean gradient of the query (clean) samples' loss

with G the eigenvalue-corrected Kronecker-factored (EK-FAC, George et al. 2018; Grosse et al. 2023) Gauss-Newton
approximation of H over every ``nn.Linear`` / ``nn.Conv2d`` of the network, fitted by kronfluence on the training
data, and lambda kronfluence's heuristic damping (0.1 x the mean eigenvalue). Where TracIn (the ``tracin`` scorer)
takes the plain dot product along a trajectory and only at the head, this preconditions every layer by the inverse
curvature: directions the training loss is flat in, which a mislabelled sample can move freely, weigh more.
identify.py calls it under the given model (a training-loss minimum, the function's assumption), with each clean
fold's complement as the query. Measured (BENCHMARKS.md §7.0e): above TracIn, 10-15 AUROC points below the
default ``loss`` scorer on label noise, blind to BadNets, ~10x the cost; selectable, not the default.

Memory is bounded whatever the number of training samples: kronfluence aggregates the query gradient (one gradient
of the parameters' size, ``aggregate_query_gradients``), the factors are per layer (d_in^2 + d_out^2 and a
d_in x d_out eigenvalue matrix), and the training samples are scored in batches whose per-sample gradients take
about ``GRADIENT_BUDGET`` bytes; the scores go chunk by chunk (``CHUNK``), each one a progress step and a safe
point. Factors and scores are written by kronfluence to a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import copy
import logging
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from core.data.imageset import ImageSet
from core.data.transforms import Normalization, to_model_input
from core.defenses.runtime import Runtime
from core.progress import Progress

GRADIENT_BUDGET = 64 * 2**20  # bytes of per-sample gradients in one training batch (float32)
CHUNK = 4096  # training samples per kronfluence scoring call: one progress step each
INSTALL_HINT = "pip install 'antidote[influence]'"


def _kronfluence():
    try:
        import kronfluence
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except ImportError as exc:  # an optional extra; a ValueError so the pipeline answers it as the spec's problem
        raise ValueError(
            f"scorer 'ekfac' needs kronfluence (>= 1.0.1), which this worker does not have ({INSTALL_HINT}); "
            "choose another scorer ('loss', the default)") from exc
    del kronfluence
    return Analyzer, prepare_model, FactorArguments, ScoreArguments, Task


class _Images(Dataset):
    """(uint8 image tensor H x W x C, label) per index; kronfluence batches them and moves them to its device."""

    def __init__(self, data: ImageSet) -> None:
        self.x = torch.as_tensor(data.x)
        self.y = torch.as_tensor(data.y, dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def _task(norm: Normalization, rt: Runtime):
    _, _, _, _, Task = _kronfluence()

    class CrossEntropyTask(Task):
        """Summed cross-entropy (kronfluence's convention) as both the training loss and the measurement; with
        ``sample`` the labels are drawn from the model's own predictive distribution (the true Fisher, the
        Gauss-Newton matrix of the cross-entropy, kronfluence's default)."""

        def _logits(self, batch, model: nn.Module) -> torch.Tensor:
            x = to_model_input(batch[0], norm, batch[0].device, rt.channels_last)
            return model(x).float()

        def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
            logits = self._logits(batch, model)
            if not sample:
                return F.cross_entropy(logits, batch[1], reduction="sum")
            with torch.no_grad():
                drawn = torch.multinomial(logits.detach().softmax(1), 1).flatten()
            return F.cross_entropy(logits, drawn, reduction="sum")

        def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
            return F.cross_entropy(self._logits(batch, model), batch[1], reduction="sum")

    return CrossEntropyTask()


def _tracked_parameters(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) for p in m.parameters())


def ekfac_harm(model: nn.Module, training: ImageSet, pairs: list[tuple[ImageSet, list[ImageSet]]],
               norm: Normalization, rt: Runtime, factor_examples: int, seed: int, progress: Progress,
               batch_size: int = 512, damping: float | None = None) -> list[list[np.ndarray]]:
    """Per ``(query, targets)`` of ``pairs``, per set in ``targets``: each sample's harm on ``query``'s mean loss
    (module docstring), float64; one EK-FAC fit serves every pair.

    The factors are fitted under ``model`` on at most ``factor_examples`` training samples drawn at random
    (seeded): the curvature is an average over samples, which a few thousand estimate well, while its cost grows
    with the number used. ``damping`` ``None`` is kronfluence's heuristic (0.1 x the mean eigenvalue).
    ``model`` is not modified (a copy is wrapped)."""
    Analyzer, prepare_model, FactorArguments, ScoreArguments, _ = _kronfluence()
    task = _task(norm, rt)
    wrapped = prepare_model(copy.deepcopy(model).to(rt.device), task)
    cpu = torch.device(rt.device).type == "cpu"
    n_params = max(1, _tracked_parameters(model))
    train_batch = max(1, min(batch_size, GRADIENT_BUDGET // (4 * n_params)))
    sub = np.sort(np.random.default_rng(seed).permutation(len(training))[:min(factor_examples, len(training))])
    factor_stage, score_stage = progress.span(0.0, 0.5), progress.span(0.5, 1.0)
    total = sum(len(t) for _, targets in pairs for t in targets)
    out: list[list[np.ndarray]] = []
    with tempfile.TemporaryDirectory(prefix="antidote-ekfac-") as tmp:
        analyzer = Analyzer("harm", wrapped, task, cpu=cpu, log_level=logging.WARNING, disable_tqdm=True,
                            output_dir=tmp)
        torch.manual_seed(seed)  # the true-Fisher label draws
        try:
            analyzer.fit_all_factors("ekfac", Subset(_Images(training), sub.tolist()),
                                     per_device_batch_size=train_batch, factor_args=FactorArguments(strategy="ekfac"),
                                     overwrite_output_dir=True)
        except torch.linalg.LinAlgError as exc:  # a NaN/Inf covariance: its eigendecomposition fails
            raise ValueError(
                "harm scores are not finite: the EK-FAC curvature factors of the training samples got NaN/Inf "
                f"({exc}); the model's outputs diverged (check the weights and the normalisation)") from exc
        factor_stage.update(1.0)
        progress.check()
        score_args = ScoreArguments(aggregate_query_gradients=True, damping_factor=damping)
        done = 0
        for p, (query, targets) in enumerate(pairs):
            query_set, per_target = _Images(query), []
            for t, target in enumerate(targets):
                data = _Images(target)
                scores = np.empty(len(data), dtype=np.float64)
                for c, start in enumerate(range(0, len(data), CHUNK)):
                    idx = list(range(start, min(start + CHUNK, len(data))))
                    name = f"q{p}_t{t}_{c}"
                    analyzer.compute_pairwise_scores(
                        name, "ekfac", query_set, data, per_device_query_batch_size=min(len(query), batch_size),
                        per_device_train_batch_size=train_batch, train_indices=idx, score_args=score_args,
                        overwrite_output_dir=True)
                    result = analyzer.load_pairwise_scores(name)
                    # kronfluence: <sum_q g_q, (G + lambda)^-1 g(z)> > 0 when z helps the query; harm: minus the mean
                    scores[start:start + len(idx)] = -result["all_modules"].double().sum(0).cpu().numpy() / len(query)
                    done += len(idx)
                    score_stage.update(done / max(1, total))
                    progress.check()
                per_target.append(scores)
            out.append(per_target)
    return out


def require_kronfluence() -> None:
    """Refuse (``ValueError`` naming the extra) before any work where the optional extra is not installed."""
    _kronfluence()
