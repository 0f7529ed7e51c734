"""``greedy``: each block trained by cross-entropy through a linear probe (GAP + Linear)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AuxContext, LocalBatch, Rule, register_rule
from .heads import DGLHead, GreedyHead


class ClassifierAux(nn.Module):
    """Aux network = a classifier head trained with cross-entropy."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        return F.cross_entropy(self.head(h), batch.y)


@register_rule
class GreedyRule(Rule):
    name = "greedy"

    def build_aux(self, ctx: AuxContext, h_shape=None) -> nn.Module:
        c = (h_shape or ctx.h_shape)[0]
        return ClassifierAux(GreedyHead(c, ctx.num_classes))


@register_rule
class DGLRule(Rule):
    """``dgl``: Decoupled Greedy Learning with the MAN++ CIFAR head."""

    name = "dgl"

    def build_aux(self, ctx: AuxContext, h_shape=None) -> nn.Module:
        c = (h_shape or ctx.h_shape)[0]
        return ClassifierAux(DGLHead(c, ctx.num_classes))
