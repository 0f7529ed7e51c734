"""Auxiliary networks for token-shaped activations (``B x N x D``, CLS token first): ViTs.

MAN++'s ViT auxiliary network (SPEC.md 3.4) for local block g, with ``u0, u1`` the first two
transformer blocks of block g+1::

    y = s * lb0(h) + (2 - s) * ema(h)          # lb0: trainable copy of u0, ema: EMA of u0
    loss = CE(Linear(LayerNorm(lb1(y))[:, 0]), target)   # lb1: trainable copy of u1, CLS token

It is a plain module ``aux(h, batch) -> loss`` like every other auxiliary network, so one
``LocalLearner.train_step`` is one stateless iteration: the authors' ViT forward instead keeps the
previous group's output between K calls per batch. ``ema`` is updated by the learner exactly like
the CNN momentum auxiliary networks (``θ_ema ← m·θ_ema + (1 − m)·θ_u0``, parameters only).

``greedy`` and ``dgl`` on tokens train the block through LayerNorm + linear on the CLS token (the
ViT's own head shape); InfoPro has no decoder for tokens and is refused.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import AuxContext, LocalBatch, Rule
from .momentum import MomentumAux


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
        return F.cross_entropy(self.classifier(self.blocks(h)).float(), batch.y)


class ViTMomentumAux(MomentumAux):
    """MAN / MAN++ auxiliary network for a ViT group: ``ema`` + ``lb`` (= lb0) copies of the next
    group's first block, fused as MAN(++), then ``heads`` = lb1 + LayerNorm + CLS linear + CE.

    The fusion, the EMA update and ``ema_recompute`` are MomentumAux's own (they are shape-agnostic)."""

    @property
    def lb1(self) -> nn.Module:
        return self.heads.blocks


def build_vit_momentum_aux(ctx: AuxContext, scaled: bool, init: str = "copy") -> ViTMomentumAux:
    """The MAN(++) ViT auxiliary network of local block ``ctx.index`` (SPEC.md 3.4)."""
    if not any(True for _ in ctx.next_unit.parameters()):
        raise ConfigError(f"MAN's ema/lb unit cannot be built after local block {ctx.index}: unit "
                          f"{ctx.next_unit_index} has no parameters to track")
    dim = ctx.next_shape[-1]
    lb1 = copy.deepcopy(ctx.following_unit) if ctx.following_unit is not None else None
    if lb1 is not None and init == "random":
        if ctx.reinit is None:
            raise ConfigError("init='random' needs the backbone family's weight init")
        ctx.reinit(lb1)
    heads = TokenCEAux(TokenClassifier(dim, ctx.num_classes), lb1)
    return ViTMomentumAux(ctx.next_unit, heads, scaled, init, ctx.reinit)


def build_token_aux(rule: Rule, ctx: AuxContext) -> nn.Module:
    """Auxiliary network of ``rule`` for a block whose output is tokens (``ctx.h_shape == (N, D)``).

    ``man``/``manpp`` give MAN++'s ViT auxiliary network whatever their ``base`` (it is CE-only, as in
    the authors' ViT code); ``greedy``/``dgl`` give LayerNorm + CLS linear + CE; others are refused.
    """
    name = getattr(rule, "name", type(rule).__name__)
    if name in ("man", "manpp"):
        return build_vit_momentum_aux(ctx, bool(getattr(rule, "scaled", name == "manpp")),
                                      getattr(rule, "init", "copy"))
    if name in ("greedy", "dgl"):
        return TokenCEAux(TokenClassifier(ctx.h_shape[-1], ctx.num_classes))
    raise ConfigError(f"method {name!r} has no auxiliary network for token activations (ViT): its heads need "
                      "(C, H, W) feature maps. Use 'manpp' or 'man' (MAN++'s ViT auxiliary network, CE on the "
                      "CLS token), 'greedy'/'dgl' (LayerNorm + linear on CLS) or 'e2e'")
