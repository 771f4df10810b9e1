"""The batched smallest-trigger search both inversion detectors share: per class the smallest trigger of one
family (a mask + pattern patch, or an additive perturbation) that sends clean images to that class.

All K classes are optimised at once: K triggers applied to K copies of one clean batch make one forward pass of
``K x batch`` images. Where that pass would exceed a step's bounds (``DetectContext.max_step_images`` full images,
``max_step_bytes`` of stamped float32 inputs) the step runs the classes in chunks of whole classes instead, one
forward and backward pass each, the gradients accumulating before the one optimiser step: a class's trigger gets
gradient from its own chunk only and every per-class quantity (loss, success, cost schedule) is computed per class,
so a chunked step is the one-pass step, up to float summation order.

The loss per class is ``CE(f(x'), k) + cost_k * size_k`` with Neural Cleanse's cost schedule per class (cost 0 until
the class first reaches the target success, then ``init_cost``, raised after ``patience`` successful steps, lowered
faster after ``patience`` failing ones); the best size reached with the target success is kept, and the search stops
early when no class's best has shrunk 1% for a while.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.detect.base import DetectContext, class_chunks


@dataclass
class Schedule:
    """One search's optimiser and cost schedule (NC's defaults in :class:`core.detect.DetectConfig`)."""

    steps: int
    batch_size: int
    lr: float
    init_cost: float
    target_success: float
    patience: int
    cost_multiplier: float
    early_stop_patience: int


def schedule(ctx: DetectContext, steps: int, batch_size: int, lr: float, init_cost: float) -> Schedule:
    """A search's schedule: its own steps, batch, learning rate and first cost; the target success and the cost
    schedule (patience, multiplier, early stop) shared by every inversion (``nc_*`` in the config)."""
    cfg = ctx.config
    return Schedule(steps=steps, batch_size=batch_size, lr=lr, init_cost=init_cost,
                    target_success=cfg.nc_target_success, patience=cfg.nc_patience,
                    cost_multiplier=cfg.nc_cost_multiplier, early_stop_patience=cfg.nc_early_stop_patience)


class Family:
    """A trigger family: its parameters, how it stamps an image, its size (what must be small)."""

    name = ""

    def init(self, k: int, c: int, h: int, w: int, gen: torch.Generator, device: torch.device
             ) -> list[torch.Tensor]:
        raise NotImplementedError

    def apply(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``K x B x C x H x W`` stamped images from ``B x C x H x W`` clean ones."""
        raise NotImplementedError

    def size(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Per class the penalised size (the loss's unit)."""
        raise NotImplementedError

    def normalised(self, size: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
        """The size per image area (comparable across image sizes)."""
        raise NotImplementedError

    def picture(self, params: list[torch.Tensor], cls: int):  # noqa: ANN201 - a tensor C x H x W in [0, 1]
        raise NotImplementedError

    def stamped_bytes(self, c: int, h: int, w: int) -> int:
        """The float32 bytes of one stamped copy of a ``C x H x W`` image: what a step holds per class and image."""
        return 4 * c * h * w

    def full_passes(self) -> bool:
        """Whether each stamped copy runs the whole network (an input-space family); a step's chunks then also
        keep to ``max_step_images``, the bound of every batch."""
        return True

    def logits(self, ctx: DetectContext, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The ``K*B`` logits of the stamped images, class-major (an input-space family stamps pixels; a
        feature-space one overrides this to act on a hooked activation instead). ``params`` may be a chunk of
        the classes' (a slice of each tensor): ``K`` is then the chunk's size."""
        k, b = params[0].shape[0], x.shape[0]
        return ctx.logits(self.apply(params, x).reshape(k * b, *x.shape[1:]))


class Patch(Family):
    """Neural Cleanse's ``(1 - m) x + m p`` with ``m, p = tanh(.)/2 + 1/2``; size: the mask's L1 norm."""

    name = "patch"

    def init(self, k: int, c: int, h: int, w: int, gen: torch.Generator, device: torch.device
             ) -> list[torch.Tensor]:
        mask_p = torch.zeros(k, 1, h, w)
        pattern_p = (torch.rand(k, c, h, w, generator=gen) * 2 - 1).mul(0.999).atanh()
        return [mask_p.to(device), pattern_p.to(device)]

    @staticmethod
    def _mp(params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(params[0]) / 2 + 0.5, torch.tanh(params[1]) / 2 + 0.5

    def apply(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        mask, pattern = self._mp(params)
        return (1 - mask[:, None]) * x[None] + (mask * pattern)[:, None]

    def size(self, params: list[torch.Tensor]) -> torch.Tensor:
        return self._mp(params)[0].flatten(1).sum(1)

    def normalised(self, size: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
        return size / (h * w)  # the fraction of the image the mask covers

    def picture(self, params: list[torch.Tensor], cls: int) -> torch.Tensor:
        mask, pattern = self._mp(params)
        return (mask[cls] * pattern[cls]).clamp(0, 1)


class Additive(Family):
    """A universal additive perturbation ``clip(x + d, 0, 1)``; size: ``||d||_2``. It assumes no patch: a
    blend, a warp, a sinusoid or low-frequency noise is a full-image change that a backdoored model answers
    with its target class, so the target needs an abnormally small universal perturbation."""

    name = "additive"

    def init(self, k: int, c: int, h: int, w: int, gen: torch.Generator, device: torch.device
             ) -> list[torch.Tensor]:
        return [(torch.randn(k, c, h, w, generator=gen) * 1e-3).to(device)]

    def apply(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return (x[None] + params[0][:, None]).clamp(0, 1)

    def size(self, params: list[torch.Tensor]) -> torch.Tensor:
        return params[0].flatten(1).norm(dim=1)

    def normalised(self, size: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
        return size / (c * h * w) ** 0.5  # the root-mean-square change per pixel value

    def picture(self, params: list[torch.Tensor], cls: int) -> torch.Tensor:
        d = params[0][cls]
        return (d / (2 * d.abs().max().clamp_min(1e-8)) + 0.5).clamp(0, 1)  # 0.5 grey is no change


class Objective:
    """What a search's triggers must make the model answer: how many triggers it optimises and, per trigger,
    the loss to minimise and the success rate on one batch (the cost schedule's target success applies to it)."""

    def count(self, num_classes: int) -> int:
        raise NotImplementedError

    def loss_success(self, logits: torch.Tensor, labels: torch.Tensor, t: int, start: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per trigger (loss, success) from ``t x B`` logits (trigger-major) and the batch's ``B`` true labels;
        the triggers are ``start .. start + t - 1`` (a chunk of them in a chunked step)."""
        raise NotImplementedError


class Targeted(Objective):
    """One trigger per class ``k``, each sending the images to ``k``: cross-entropy towards ``k`` (Neural
    Cleanse's objective; the images of class ``k`` itself count as successes)."""

    def count(self, num_classes: int) -> int:
        return num_classes

    def loss_success(self, logits: torch.Tensor, labels: torch.Tensor, t: int, start: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        targets = torch.arange(start, start + t, device=logits.device).repeat_interleave(labels.numel())
        ce = F.cross_entropy(logits, targets, reduction="none").view(t, -1).mean(1)
        return ce, (logits.argmax(1) == targets).float().view(t, -1).mean(1)


class Untargeted(Objective):
    """One trigger shared by every image, sending each image to any class but its own: the loss is
    ``-log(1 - p_y)`` (the cross-entropy of "not the true label"), success is ``argmax != y``. An all-to-all
    backdoor is one such trigger whose effect depends on the source class."""

    def count(self, num_classes: int) -> int:
        return 1

    def loss_success(self, logits: torch.Tensor, labels: torch.Tensor, t: int, start: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        y = labels.repeat(t)  # every trigger acts alike: ``start`` does not matter
        true = F.one_hot(y, logits.shape[1]).bool()
        # log(1 - p_y) = logsumexp over the other classes - logsumexp over all
        loss = logits.logsumexp(1) - logits.masked_fill(true, float("-inf")).logsumexp(1)
        return loss.view(t, -1).mean(1), (logits.argmax(1) != y).float().view(t, -1).mean(1)


@dataclass
class Inversion:
    """Per class the best size reached with the target success (the final size where never reached), the
    matching parameters, the steps run and the classes that never reached the target success."""

    sizes: list[float]
    normalised: list[float]
    params: list[torch.Tensor]
    steps: int
    never_reached: list[int]


def smallest_triggers(ctx: DetectContext, family: Family, sch: Schedule, seed_offset: int = 0,
                      objective: Objective | None = None) -> Inversion:
    """Search every class's smallest trigger of ``family`` at once (see the module docstring); with an
    ``objective`` other than :class:`Targeted` (the default) its triggers instead, e.g. one untargeted one."""
    objective = objective or Targeted()
    k = objective.count(ctx.num_classes)
    n, c, h, w = ctx.pixels.shape
    gen = torch.Generator(device="cpu").manual_seed(ctx.seed + seed_offset)
    params = [p.requires_grad_(True) for p in family.init(k, c, h, w, gen, ctx.device)]
    opt = torch.optim.Adam(params, lr=sch.lr, betas=(0.5, 0.9))
    cost = torch.zeros(k, device=ctx.device)
    cost_set = torch.zeros(k, dtype=torch.bool, device=ctx.device)
    up = torch.zeros(k, device=ctx.device)
    down = torch.zeros(k, device=ctx.device)
    best = torch.full((k,), float("inf"), device=ctx.device)
    best_params = [p.detach().clone() for p in params]
    since_improved = 0
    steps = 0
    for steps in range(1, sch.steps + 1):
        idx = torch.randint(0, n, (sch.batch_size,), generator=gen).to(ctx.device)
        opt.zero_grad(set_to_none=True)
        ce, success, size = _step_gradients(ctx, family, objective, params, cost, idx, k, (c, h, w))
        with torch.no_grad():
            # the success and size of the parameters this step evaluated (before the update)
            reached = success >= sch.target_success
            better = reached & (size < best)
            improved_much = reached & (size < best * 0.99)
            best = torch.where(better, size, best)
            for bp, p in zip(best_params, params, strict=True):
                bp[better] = p[better]
            new = reached & ~cost_set
            cost = torch.where(new, torch.full_like(cost, sch.init_cost), cost)
            cost_set |= reached
            up = torch.where(reached, up + 1, torch.zeros_like(up))
            down = torch.where(reached, torch.zeros_like(down), down + 1)
            raise_ = cost_set & (up >= sch.patience)
            lower = cost_set & (down >= sch.patience)
            cost = torch.where(raise_, cost * sch.cost_multiplier, cost)
            cost = torch.where(lower, cost / sch.cost_multiplier ** 1.5, cost)
            up = torch.where(raise_, torch.zeros_like(up), up)
            down = torch.where(lower, torch.zeros_like(down), down)
        opt.step()
        since_improved = 0 if bool(improved_much.any()) else since_improved + 1
        ctx.step(steps / sch.steps)
        if bool(cost_set.all()) and since_improved >= sch.early_stop_patience:
            break
    with torch.no_grad():
        never = ~torch.isfinite(best)  # never reached the target success: the final trigger counts
        final = family.size(params)
        for bp, p in zip(best_params, params, strict=True):
            bp[never] = p.detach()[never]
        best = torch.where(never, final, best)
    return Inversion(sizes=best.double().cpu().tolist(),
                     normalised=family.normalised(best, c, h, w).double().cpu().tolist(),
                     params=best_params, steps=steps, never_reached=never.nonzero().flatten().cpu().tolist())


def step_chunks(ctx: DetectContext, family: Family, k: int, batch: int, image: tuple[int, int, int]
                ) -> list[tuple[int, int]]:
    """The chunks of the ``k`` triggers one step runs (:func:`core.detect.base.class_chunks`): ``batch`` stamped
    copies per trigger of ``family.stamped_bytes`` each, with their row of ``num_classes`` float32 logits (with
    100,000 classes the logits outweigh a small image); one chunk when the whole step fits the bounds."""
    item = family.stamped_bytes(*image) + 4 * ctx.num_classes
    return class_chunks(k, batch, item, ctx.max_step_images if family.full_passes() else None, ctx.max_step_bytes)


def _step_gradients(ctx: DetectContext, family: Family, objective: Objective, params: list[torch.Tensor],
                    cost: torch.Tensor, idx: torch.Tensor, k: int, image: tuple[int, int, int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Back-propagate one step's loss ``sum_k CE_k + cost_k * size_k`` on the clean images ``idx`` into
    ``params``' gradients; return per trigger (loss, success, size) of the parameters evaluated. One forward pass
    when the step fits the bounds; else one per chunk of triggers (:func:`step_chunks`), each chunk's triggers a
    slice of the parameters, the chunks' gradients summed: the same gradient, since a trigger's loss depends on
    its own parameters only."""
    x, y = ctx.pixels[idx], ctx.labels[idx]
    chunks = step_chunks(ctx, family, k, len(idx), image)
    size = family.size(params)
    if len(chunks) == 1:  # the one-pass step, exactly as before chunking existed
        ce, success = objective.loss_success(family.logits(ctx, params, x), y, k)
        (ce + cost * size).sum().backward()
        return ce, success, size
    ces, successes = [], []
    for a, b in chunks:
        ce, success = objective.loss_success(family.logits(ctx, [p[a:b] for p in params], x), y, b - a, start=a)
        ce.sum().backward()  # frees this chunk's graph: one chunk's activations are held at a time
        ces.append(ce.detach())
        successes.append(success)
    (cost * size).sum().backward()
    return torch.cat(ces), torch.cat(successes), size
