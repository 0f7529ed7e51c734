"""Auxiliary networks for token-shaped activations (``B x N x D``, CLS token first): ViTs.

MAN++'s ViT auxiliary network (SPEC.md 3.4) for local block g, with ``u0, u1`` the first two
transformer blocks of block g+1::

    y = s * lb0(h) + (2 - s) * ema(h)          # lb0: trainable copy of u0, ema: EMA of u0
    loss = CE(Linear(LayerNorm(lb1(y))[:, 0]), target)   # lb1: trainable copy of u1, CLS token

(built by the ``man``/``manpp`` rules in :mod:`manlearn.rules.momentum`). ``greedy`` and ``dgl`` on
tokens train the block through LayerNorm + linear on the CLS token (the ViT's own head shape);
InfoPro has no decoder for tokens and refuses them. Each rule decides this itself, from the shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LocalBatch, loss_precision


def is_token_shape(shape: tuple[int, ...]) -> bool:
    """True for ``(N, D)`` activations (tokens), as opposed to ``(C, H, W)`` feature maps."""
    return len(shape) == 2


class TokenClassifier(nn.Module):
    """LayerNorm over the tokens, linear classifier on the CLS token (index 0)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(h)[:, 0])


class TokenCEAux(nn.Module):
    """``aux(h, batch) = CE(classifier(blocks(h)), y)`` with optional trainable ``blocks`` in front."""

    def __init__(self, classifier: TokenClassifier, blocks: nn.Module | None = None) -> None:
        super().__init__()
        self.blocks = blocks if blocks is not None else nn.Identity()
        self.classifier = classifier

    def forward(self, h: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        return F.cross_entropy(loss_precision(self.classifier(self.blocks(h))), batch.y)
