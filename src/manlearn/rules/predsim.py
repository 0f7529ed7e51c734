"""``predsim``: PredSim (Nøkland & Eidnes, ICML 2019), SPEC 2.4.

Each block's auxiliary network has two heads on the block output h: *pred* (average-pool h until
C·h'·w' fits a feature budget, flatten, Linear, CE) and *sim* (a 3x3 conv without bias, then the MSE
between the batch's similarity matrix and the labels' similarity matrix). Loss = β·sim + (1−β)·pred,
β = 0.99.

The similarity matrix depends on the whole batch: under data parallelism each rank's matrix sees only
its own shard, which is a different loss from the single-process one (the original code has the same
property; nothing here gathers across ranks).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import AuxContext, LocalBatch, Rule, register_rule
from .vit_aux import is_token_shape

#: ``shared``: the ResNet adaptation of later papers, every parameter under the one optimiser of the run;
#: ``per-block``: the original code's own Adam per block, stepped inside the forward pass.
PREDSIM_OPTIMIZERS = ("shared", "per-block")


def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    """Losses in float64 when the input is, else float32 (low precision is upcast, never downcast)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """PredSim's B×B similarity matrix: a B×C×H×W map is first reduced to the per-channel standard
    deviation over the positions (when C > 3 and H > 1, as the original code does; else flattened);
    each row is centred, divided by (1e-8 + its L2 norm), and S = clamp(X·Xᵀ, −1, 1)."""
    x = x.to(_loss_dtype(x))
    if x.dim() == 4 and x.shape[1] > 3 and x.shape[2] > 1:
        x = x.flatten(2).std(dim=2)
    else:
        x = x.flatten(1)
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (1e-8 + xc.pow(2).sum(dim=1, keepdim=True).sqrt())
    return (xn @ xn.T).clamp(-1.0, 1.0)


def similarity_loss(features: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """MSE between the features' and the targets' similarity matrices (targets: class indices, or
    per-class probabilities for mixup-style soft targets)."""
    onehot = targets if targets.is_floating_point() else F.one_hot(targets, num_classes)
    return F.mse_loss(similarity_matrix(features), similarity_matrix(onehot.to(_loss_dtype(features))))


def budget_pool(channels: int, height: int, width: int, budget: int) -> tuple[nn.Module, int]:
    """The original code's pooling of the *pred* head: kernel doubled alternately in height and width
    until C·h'·w' ≤ budget (or the kernel covers the map); returns the pool and C·h'·w'."""
    kh = kw = 1
    oh, ow = height, width
    while channels * oh * ow > budget and (kh < height or kw < width):
        if kh < height:
            kh *= 2
            oh = math.ceil(height / kh)
        if channels * oh * ow > budget and kw < width:
            kw *= 2
            ow = math.ceil(width / kw)
    if kh == 1 and kw == 1:
        return nn.Identity(), channels * oh * ow
    pad = ((kh * oh - height) // 2, (kw * ow - width) // 2)  # ceil-sized output, padding centred
    return nn.AvgPool2d((kh, kw), padding=pad), channels * oh * ow


class PredSimAux(nn.Module):
    """β·MSE(S(conv(h)), S(onehot y)) + (1−β)·CE(Linear(pool(h)), y)."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, feature_budget: int, beta: float) -> None:
        super().__init__()
        c, h, w = shape
        self.sim_conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.pool, features = budget_pool(c, h, w, feature_budget)
        self.pred = nn.Linear(features, num_classes)
        self.beta = float(beta)
        self.num_classes = num_classes

    def losses(self, h: torch.Tensor, batch: LocalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sim, pred) losses, unweighted."""
        sim = similarity_loss(self.sim_conv(h), batch.y, self.num_classes)
        logits = self.pred(self.pool(h).flatten(1))
        logits = logits.to(_loss_dtype(logits))
        y = batch.y.to(logits.dtype) if batch.y.is_floating_point() else batch.y
        pred = F.cross_entropy(logits, y)
        return sim, pred

    def forward(self, h: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        sim, pred = self.losses(h, batch)
        return self.beta * sim + (1.0 - self.beta) * pred


@register_rule
class PredSimRule(Rule):
    """``predsim``: pred + sim heads per block, loss 0.99·sim + 0.01·pred (the ResNet adaptation:
    feature budget 512, one optimiser for everything)."""

    name = "predsim"
    summary = "PredSim: 0.99 * similarity-matrix MSE + 0.01 * pooled linear CE per block (optimizer=shared)"

    def __init__(self, feature_budget: int = 512, beta: float = 0.99, optimizer: str = "shared") -> None:
        if optimizer not in PREDSIM_OPTIMIZERS:
            raise ConfigError(f"unknown predsim optimizer {optimizer!r}; choose from {PREDSIM_OPTIMIZERS}")
        if optimizer == "per-block":
            raise ConfigError("predsim optimizer='per-block' (the original code's Adam per block, stepped inside "
                              "the forward pass) is not implemented yet; optimizer='shared' is the ResNet "
                              "adaptation (one optimiser for all parameters)")
        if isinstance(feature_budget, bool) or not isinstance(feature_budget, int) or feature_budget < 1:
            raise ConfigError(f"predsim feature_budget must be a positive integer, got {feature_budget!r}")
        if not 0.0 <= float(beta) <= 1.0:
            raise ConfigError(f"predsim beta must be in [0, 1], got {beta!r}")
        self.feature_budget, self.beta, self.optimizer = feature_budget, float(beta), optimizer

    def build_aux(self, ctx: AuxContext, h_shape=None) -> nn.Module:
        shape = tuple(h_shape or ctx.h_shape)
        if is_token_shape(shape) or len(shape) != 3:
            raise ConfigError(f"predsim needs feature maps (C, H, W); local block {ctx.index} outputs "
                              f"{shape} (tokens?)")
        ctx.require_labels(self.name)
        return PredSimAux(shape, ctx.num_classes, self.feature_budget, self.beta)
