"""Feature-space inversion: per class the smallest universal change of an intermediate activation that sends
clean inputs to it (the idea shared by FeatureRE, Wang et al. 2022, and BTI-DBF, Xu et al. 2024).

A warp (WaNet) or a per-input generated pattern (IAB) is not a small universal change of the *input*, so the
patch and additive inversions miss them; but whatever the trigger's input form, the backdoored model encodes
it as a (nearly) input-independent feature that its last layers map to the target. A small universal
change of a deep activation ``a`` can express that feature: ``a' = a + delta_k``, one shift per channel
(spatially uniform: a channel is the conv net's "neuron", as in ABS's neuron stimulation, and a per-position
delta has ~H x W times the freedom, which on the benchmark made every class about as easy), so the target's
smallest ``delta`` stands out below the other classes'. The same batched search (core/detect/inversion.py:
all K deltas in one pass, or in chunks of classes past a step's byte bound), cost schedule and outlier test
(core/detect/stats.py) as the input inversions.

The layer: the last module, in execution order, whose output is a 4-D map with more than one spatial position
and which runs once per forward pass — the feature map just before global pooling in every CNN classifier
(found with forward hooks on one clean image, so it works for any ``nn.Module``; ``fi_depth`` picks an earlier
one as a fraction of the candidates). Sizes are ``RMS(delta) / RMS(a)`` of the clean activations there, so
they read the same across layers and architectures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.detect.base import DetectContext, DetectorResult
from core.detect.inversion import Family, schedule, smallest_triggers
from core.detect.neural_cleanse import outlier_result


@dataclass(frozen=True)
class FeatureLayer:
    """The hooked module, its qualified name, its per-image output shape ``(C, H, W)``, its position among
    the candidate layers and how many candidates there were."""

    name: str
    module: nn.Module
    shape: tuple[int, int, int]
    index: int
    candidates: int


def candidate_layers(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """The modules whose output on ``sample`` (a normalised batch the model accepts) is a 4-D map with more
    than one spatial position and that ran exactly once, in the order their forward passes finished. A module
    called twice per pass (a shared ReLU) is left out: changing its output would change two places."""
    calls: dict[str, int] = {}
    order: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    handles = []

    def hook(name: str, module: nn.Module):  # noqa: ANN202 - a forward hook
        def fn(_m: nn.Module, _inp: tuple, out: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
                order.append((name, module, tuple(out.shape[1:])))
        return fn

    try:
        for name, module in model.named_modules():
            if name:  # not the model itself
                handles.append(module.register_forward_hook(hook(name, module)))
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return [(n, m, s) for n, m, s in order if calls[n] == 1]


def feature_layer(model: nn.Module, sample: torch.Tensor, depth: float = 1.0) -> FeatureLayer:
    """The candidate (see :func:`candidate_layers`) at ``depth`` of the way through them: 1.0 the last one,
    the feature map before global pooling. Raises ``ValueError`` for a model without a 4-D feature map."""
    cands = candidate_layers(model, sample)
    if not cands:
        raise ValueError("the model has no module with a 4-D feature map output (N x C x H x W, H x W > 1) "
                         "that runs once per forward pass: feature inversion needs a convolutional classifier")
    i = round(depth * (len(cands) - 1))
    name, module, shape = cands[i]
    return FeatureLayer(name=name, module=module, shape=(shape[0], shape[1], shape[2]), index=i,
                        candidates=len(cands))


@contextlib.contextmanager
def hooked(module: nn.Module, fn) -> Iterator[None]:  # noqa: ANN001 - fn(output) -> output
    """``module``'s output replaced by ``fn(output)`` for the duration; the hook is always removed."""
    handle = module.register_forward_hook(lambda _m, _i, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


def activation_stats(ctx: DetectContext, layer: FeatureLayer, max_images: int = 256) -> tuple[float, bool]:
    """(RMS of the clean activations at ``layer``, whether they are all non-negative, as after a ReLU) on up
    to ``max_images`` clean images: the size unit, and whether a changed activation is kept non-negative."""
    seen: list[torch.Tensor] = []

    def keep(out: torch.Tensor) -> torch.Tensor:
        seen.append(out.detach().float())
        return out

    with torch.no_grad(), hooked(layer.module, keep):
        for i in range(0, min(len(ctx.pixels), max_images), 128):
            ctx.logits(ctx.pixels[i:min(i + 128, max_images)])
    a = torch.cat(seen)
    return float(a.pow(2).mean().sqrt().clamp_min(1e-12)), bool(a.min() >= 0)


class FeatureShift(Family):
    """A universal additive change of the hooked activation, one value per channel at every position,
    ``a' = a + s * u_k`` (``s`` the clean RMS, so ``u`` is unit-free), kept non-negative where the clean
    activations are; size ``RMS(u)``: the change's RMS over the clean activations' RMS. One forward pass per
    step: the ``B`` clean images run up to the layer once and the hook expands their activation to ``K x B``
    (the same images under K changes)."""

    name = "feature_shift"

    def __init__(self, layer: FeatureLayer, scale: float, nonneg: bool, image_shape: tuple[int, int, int]):
        self.layer, self.scale, self.nonneg, self.image_shape = layer, scale, nonneg, image_shape
        self.expand = True  # run B images and expand at the layer; False: run K x B copies (a skip around it)

    def init(self, k: int, c: int, h: int, w: int, gen: torch.Generator, device: torch.device
             ) -> list[torch.Tensor]:
        return [(torch.randn(k, self.layer.shape[0], 1, 1, generator=gen) * 1e-3).to(device)]

    def shifted(self, params: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """``(K*B) x C x H x W`` changed activations from ``B`` (expanding) or ``K*B`` clean ones."""
        u = params[0]
        k = u.shape[0]
        a = out[None] if self.expand else out.view(k, -1, *out.shape[1:])
        shifted = a + (self.scale * u[:, None]).to(out.dtype)
        if self.nonneg:
            shifted = shifted.clamp_min(0)
        return shifted.reshape(-1, *out.shape[1:])

    def stamped_bytes(self, c: int, h: int, w: int) -> int:
        """A changed copy is the layer's map (float32; with a full image copy too where it cannot expand)."""
        fmap = 4 * self.layer.shape[0] * self.layer.shape[1] * self.layer.shape[2]
        return fmap if self.expand else max(fmap, 4 * c * h * w)

    def full_passes(self) -> bool:
        """Expanding, only the layers after the hook see the K copies: not held to the image count."""
        return not self.expand

    def logits(self, ctx: DetectContext, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        k, b = params[0].shape[0], x.shape[0]
        if self.expand:
            try:
                with hooked(self.layer.module, lambda out: self.shifted(params, out)):
                    logits = ctx.logits(x)
                if logits.shape[0] == k * b:
                    return logits
            except RuntimeError:  # something after the layer mixes in an earlier, unexpanded tensor
                pass
            self.expand = False
        with hooked(self.layer.module, lambda out: self.shifted(params, out)):
            return ctx.logits(x[None].expand(k, *x.shape).reshape(k * b, *x.shape[1:]))

    def apply(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a feature shift acts on the hooked activation: see logits()")

    def size(self, params: list[torch.Tensor]) -> torch.Tensor:
        return params[0].flatten(1).pow(2).mean(1).sqrt()

    def normalised(self, size: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
        return size  # already relative to the clean activations' RMS

    def picture(self, params: list[torch.Tensor], cls: int) -> torch.Tensor:
        """The shift per channel as vertical grey bars, left to right (50% grey: no change), image-sized."""
        c, h, w = self.image_shape
        u = params[0][cls].detach().float().flatten()
        bars = (u / (2 * u.abs().max().clamp_min(1e-12)) + 0.5).view(1, 1, 1, -1)
        return F.interpolate(bars, size=(h, w), mode="nearest")[0].expand(c, h, w).clamp(0, 1)


def feature_inversion(ctx: DetectContext) -> DetectorResult:
    """Per class the smallest universal change of the feature map before global pooling (or at ``fi_depth``)
    that sends clean images to it, all classes in one batch; flag the model when the smallest log size is an
    outlier at ``config.p_value`` under the simulated null."""
    cfg = ctx.config
    _, c, h, w = ctx.pixels.shape
    try:
        layer = feature_layer(ctx.model, ctx.normalize(ctx.pixels[:1]), cfg.fi_depth)
    except ValueError as exc:  # no 4-D feature map (an MLP, a model of tokens): no evidence either way
        return DetectorResult(name="feature_inversion", score=0.0, flagged=False, statistic=1.0,
                              statistic_name="p_value", threshold=cfg.p_value, per_class=[], suspected_targets=[],
                              details={"skipped": str(exc)})
    scale, nonneg = activation_stats(ctx, layer)
    family = FeatureShift(layer, scale, nonneg, (c, h, w))
    sch = schedule(ctx, cfg.fi_steps, cfg.fi_batch_size, cfg.fi_lr, cfg.fi_init_cost)
    inv = smallest_triggers(ctx, family, sch, seed_offset=23)
    res = outlier_result(ctx, "feature_inversion", family, inv, "relative_rms_per_class")
    res.details.update(layer=layer.name, layer_shape=list(layer.shape), layer_index=layer.index,
                       layer_candidates=layer.candidates, clean_rms=scale, kept_non_negative=nonneg)
    return res
