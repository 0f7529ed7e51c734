"""``greedy`` and ``dgl``: each block trained through a small head of its own.

``greedy`` asks the task for its local head (a linear probe for classification, a one-level RetinaNet
or segmentation head for dense tasks); ``dgl`` trains a deeper classifier of whole images.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import AuxContext, LocalBatch, Rule, loss_precision, register_rule
from ..errors import ConfigError
from .heads import DGL_HEADS, DGLHead, DGLMLPSRHead
from .vit_aux import TokenCEAux, TokenClassifier, is_token_shape


class TaskLoss(nn.Module):
    """A task's local head followed by the task's loss: an auxiliary network ``aux(h, batch) -> loss``
    (what the greedy rule trains a block with, and what MAN/MAN++ with ``base='greedy'`` put after their
    fusion)."""

    def __init__(self, head: nn.Module, task: Any) -> None:
        super().__init__()
        self.head = head
        self._task = (task,)  # not a submodule: a task holds no parameters of its own

    @property
    def task(self) -> Any:
        return self._task[0]

    def forward(self, h: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        return self.task.loss(self.head(h), batch.y, batch.image_hw)


class ClassifierAux(nn.Module):
    """Aux network = a classifier head trained with cross-entropy."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """Class logits of ``h`` (what HPFF's own-output CE term reads)."""
        return self.head(h)

    def forward(self, h: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        out = self.head(h)
        out = loss_precision(out)
        return F.cross_entropy(out, batch.y.to(out.dtype) if batch.y.is_floating_point() else batch.y)


@register_rule
class GreedyRule(Rule):
    name = "greedy"
    summary = "each block trained through the task's local head (linear probe for classification)"

    def build_aux(self, ctx: AuxContext, h_shape=None) -> nn.Module:
        shape = h_shape or ctx.h_shape
        if is_token_shape(shape):
            ctx.require_labels(self.name)
            return TokenCEAux(TokenClassifier(shape[-1], ctx.num_classes))
        return TaskLoss(ctx.task.local_head(shape[0], ctx.stride(shape)), ctx.task)


@register_rule
class DGLRule(Rule):
    """``dgl``: Decoupled Greedy Learning. ``head="manpp"`` (default): the MAN++ CIFAR head (SPEC 2.1);
    ``head="mlp-sr"``: DGL's own head (SPEC 2.4). Results differ by head, so name it with them."""

    name = "dgl"
    summary = "Decoupled Greedy Learning: a conv + MLP classifier per block; head=manpp (default, MAN++'s) | mlp-sr (DGL's own)"

    def __init__(self, head: str = "manpp") -> None:
        if head not in DGL_HEADS:
            raise ConfigError(f"unknown DGL head {head!r}; choose from {', '.join(DGL_HEADS)} "
                              "(manpp: MAN++'s CIFAR head; mlp-sr: DGL's own, Belilovsky et al.)")
        self.head = head

    def build_aux(self, ctx: AuxContext, h_shape=None) -> nn.Module:
        shape = h_shape or ctx.h_shape
        ctx.require_labels(self.name)
        if is_token_shape(shape):
            return TokenCEAux(TokenClassifier(shape[-1], ctx.num_classes))
        if self.head == "mlp-sr":
            return ClassifierAux(DGLMLPSRHead(shape[0], ctx.num_classes))
        return ClassifierAux(DGLHead(shape[0], ctx.num_classes))
