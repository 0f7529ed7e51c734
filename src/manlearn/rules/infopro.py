"""``infopro`` / ``infopro-contrast``: reconstruction (BCE) + classification (CE or SupCon) heads,
weighted by a lambda schedule over the local modules."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import AuxContext, LocalBatch, Rule, loss_precision, register_rule
from .heads import INFOPRO_CLASSIFIERS, SUPCON_ANCHORS, InfoProClassifier, InfoProDecoder, supcon_loss
from .heads_imagenet import ImageNetInfoProClassifier, ImageNetInfoProDecoder

#: ``auto`` (default): ``stage`` when K >= 6 (where it leaves no local block at λ = 0), else ``linear``;
#: ``stage``: the MAN/MAN++ code; ``module``: InfoPro's; ``linear``: r = i/(K-1), zero only at the final block.
LAMBDA_SCHEDULES = ("auto", "stage", "module", "linear")
#: smallest K at which the authors' ``stage`` schedule leaves every local block of a 3-stage ResNet a loss
STAGE_MIN_K = 6
#: ``cifar``: the CIFAR decoder/classifier with λ 5/0.5 -> 0/0; ``imagenet``: the deeper ImageNet heads
#: with constant λ 5/0.75 (SPEC 2.2); ``auto``: ``imagenet`` for inputs of at least 128 px, else ``cifar``.
INFOPRO_HEADS = ("auto", "cifar", "imagenet")
IMAGENET_MIN_SIZE = 128
DEFAULT_LAMBDAS = {"cifar": (5.0, 0.5, 0.0, 0.0), "imagenet": (5.0, 0.75, 5.0, 0.75)}


def resolve_heads(heads: str, image_size: int) -> str:
    """``auto`` -> ``imagenet`` for inputs of at least 128 px, else ``cifar``."""
    if heads not in INFOPRO_HEADS:
        raise ConfigError(f"unknown infopro_heads {heads!r}; choose from {INFOPRO_HEADS}")
    if heads == "auto":
        return "imagenet" if image_size >= IMAGENET_MIN_SIZE else "cifar"
    return heads


def lambda_ratio(ctx: AuxContext, schedule: str) -> float:
    """Interpolation ratio r in [0, 1] for local module ``ctx.index``.

    ``module``: r = i / (K-2) (InfoPro). ``stage``: r = stage / (K-2) with the stage of the unit that
    follows the boundary (the MAN/MAN++ code), except for a block that is the stem alone, which the
    authors' code gives r = 0. ``linear``: r = i / (K-1), which reaches 1 only at the final block (SPEC
    2.2's "(0, 0) at block K-1"), so no local block is silenced. ``auto``: ``stage`` for K >= 6 (falling
    back to ``linear`` for a block that ``stage`` would silence, e.g. a 4th stage at K = 6), else
    ``linear``. K <= 2 gives r = 0; r is clipped to [0, 1] so that small K cannot produce negative
    weights (the authors' formula would, for K < 5, under ``stage``).
    """
    denom = ctx.K - 2
    if denom <= 0:
        return 0.0
    linear = ctx.index / (ctx.K - 1)
    if schedule == "auto":
        if ctx.K < STAGE_MIN_K:
            return linear
        r = lambda_ratio(ctx, "stage")
        return r if r < 1.0 else linear
    if schedule == "linear":
        return linear
    if schedule == "stage" and ctx.next_stage is not None:
        if ctx.index == 0 and ctx.next_unit_index == 0:
            return 0.0  # the stem alone: the authors' code hard-codes r = 0, i.e. λ = (5, 0.5)
        r = ctx.next_stage / denom
    else:
        r = ctx.index / denom
    return min(max(r, 0.0), 1.0)


class InfoProAux(nn.Module):
    """λ1·BCE(decoder(h), image) + λ2·CE(classifier(h), y), or SupCon in place of CE."""

    def __init__(self, channels: int, ctx: AuxContext, lambdas: tuple[float, float], contrast: bool,
                 classifier: str, temperature: float, feature_dim: int = 128, heads: str = "cifar",
                 feature_size: int | None = None, supcon_anchors: str = "positive") -> None:
        super().__init__()
        out = feature_dim if contrast else ctx.num_classes
        if heads == "imagenet":
            size = feature_size if feature_size is not None else ctx.image_size
            self.decoder = ImageNetInfoProDecoder(channels, size, ctx.image_size, ctx.in_channels)
            self.classifier = ImageNetInfoProClassifier(channels, out)
        else:
            self.decoder = InfoProDecoder(channels, ctx.image_size, ctx.in_channels)
            self.classifier = InfoProClassifier(channels, out, classifier)
        self.contrast = contrast
        self.temperature = temperature
        self.supcon_anchors = supcon_anchors
        self.lambda_x, self.lambda_y = float(lambdas[0]), float(lambdas[1])

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """Class logits of ``h`` (CE variant only; what HPFF's own-output CE term reads)."""
        if self.contrast:
            raise ConfigError("the contrastive InfoPro classifier outputs projections, not class logits")
        return self.classifier(h)

    def forward(self, h: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        own_loss = getattr(self.decoder, "reconstruction_loss", None)  # a decoder with a loss of its own (HPFF)
        if own_loss is not None:
            loss_x = own_loss(h, batch)
        else:
            recon = self.decoder(h, batch.image_hw)
            recon = loss_precision(recon)
            loss_x = F.binary_cross_entropy_with_logits(recon, batch.image01.to(recon.dtype))
        out = self.classifier(h)
        if self.contrast:
            labels = batch.y if not batch.y.is_floating_point() else batch.y.argmax(dim=1)  # soft targets
            loss_y = supcon_loss(F.normalize(loss_precision(out), dim=1), labels, self.temperature,
                                 self.supcon_anchors)
        else:
            out = loss_precision(out)
            loss_y = F.cross_entropy(out, batch.y.to(out.dtype) if batch.y.is_floating_point() else batch.y)
        return self.lambda_x * loss_x + self.lambda_y * loss_y


def _weights(values: Any) -> bool:
    """Whether ``values`` are 4 finite numbers >= 0 (InfoPro's loss weights)."""
    try:
        ok = len(values) == 4
    except TypeError:
        return False
    return ok and all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                      for v in values)


@register_rule
class InfoProRule(Rule):
    name = "infopro"
    contrast = False
    summary = "InfoPro: lambda1 * image reconstruction (BCE) + lambda2 * classifier CE per block"

    #: set by a modifier whose own loss term keeps a block with λ = (0, 0) learning (HPFF)
    zero_lambda_ok = False

    def __init__(self, lambda_schedule: str = "auto",
                 lambdas: tuple[float, float, float, float] | None = None,
                 classifier: str = "2c2f", temperature: float = 0.07, heads: str = "auto",
                 supcon_anchors: str = "positive", authors_stem_head: bool = False) -> None:
        """``supcon_anchors``: ``positive`` (anchors with a positive) or ``all`` (every anchor, the authors'
        MAN++ code). ``authors_stem_head``: the auxiliary network of a block that is the stem alone gets the
        classifier the authors' MAN++ code builds there — ``1c2f`` with a 128-d output trained by SupCon —
        whatever the other blocks use (SPEC 2.3)."""
        if lambda_schedule not in LAMBDA_SCHEDULES:
            raise ConfigError(f"unknown lambda_schedule {lambda_schedule!r}; choose from {LAMBDA_SCHEDULES}")
        if classifier not in INFOPRO_CLASSIFIERS:
            raise ConfigError(f"unknown InfoPro classifier {classifier!r}; choose from {INFOPRO_CLASSIFIERS}")
        if lambdas is not None and not _weights(lambdas):
            raise ConfigError(f"lambdas must be 4 finite numbers >= 0, (λ1_first, λ2_first, λ1_last, λ2_last); got "
                              f"{lambdas!r} (a negative weight ascends its loss)")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature (InfoPro's contrastive loss) must be a finite number > 0, got {temperature!r}")
        if heads not in INFOPRO_HEADS:
            raise ConfigError(f"unknown infopro_heads {heads!r}; choose from {INFOPRO_HEADS}")
        if supcon_anchors not in SUPCON_ANCHORS:
            raise ConfigError(f"unknown supcon_anchors {supcon_anchors!r}; choose from {SUPCON_ANCHORS}")
        self.lambda_schedule = lambda_schedule
        self.supcon_anchors = supcon_anchors
        self.authors_stem_head = bool(authors_stem_head)
        # None: the default of the heads in use (5/0.5 -> 0/0 for cifar, constant 5/0.75 for imagenet)
        self.lambdas = None if lambdas is None else tuple(float(v) for v in lambdas)
        self.heads = heads
        self.classifier = classifier
        self.temperature = float(temperature)

    def lambdas_for(self, ctx: AuxContext) -> tuple[float, float]:
        r = lambda_ratio(ctx, self.lambda_schedule)
        x1, y1, x2, y2 = self.lambdas or DEFAULT_LAMBDAS[resolve_heads(self.heads, ctx.image_size)]
        return x1 * (1 - r) + x2 * r, y1 * (1 - r) + y2 * r

    def build_aux(self, ctx: AuxContext, h_shape=None) -> nn.Module:
        shape = h_shape or ctx.h_shape
        if len(shape) != 3:
            raise ConfigError(f"InfoPro needs spatial feature maps (C, H, W) for its decoder; local block "
                              f"{ctx.index} outputs shape {tuple(shape)} (tokens?). For a ViT use method='manpp' "
                              "(MAN++'s CE-only ViT auxiliary network) or 'greedy'/'dgl'")
        ctx.require_labels(self.name)
        c = shape[0]
        lambdas = self.lambdas_for(ctx)
        if lambdas == (0.0, 0.0) and not self.zero_lambda_ok:
            raise ConfigError(
                f"InfoPro's lambda_schedule={self.lambda_schedule!r} with lambdas {self.lambdas or 'default'} gives "
                f"local block {ctx.index} of K={ctx.K} the weights λ = (0, 0): an identically zero local loss, so that "
                f"block would never learn. Use lambda_schedule='auto' (default: 'stage' from K={STAGE_MIN_K}, else "
                "'linear') or 'linear' (r = i/(K-1), zero only at the final block), or non-zero final lambdas")
        heads = resolve_heads(self.heads, ctx.image_size)
        contrast, classifier = self.contrast, self.classifier
        stem_alone = ctx.index == 0 and ctx.next_unit_index == 0
        if self.authors_stem_head and stem_alone and heads == "cifar":
            contrast, classifier = True, "1c2f"  # the authors' defaults, used because their code passes none
        return InfoProAux(c, ctx, lambdas, contrast, classifier, self.temperature, heads=heads,
                          feature_size=shape[-1], supcon_anchors=self.supcon_anchors)


@register_rule
class InfoProContrastRule(InfoProRule):
    name = "infopro-contrast"
    contrast = True
    summary = "InfoPro with a supervised-contrastive (SupCon) projection head instead of CE"
