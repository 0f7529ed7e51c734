"""MAN and MAN++: a momentum auxiliary network in front of a base rule's heads.

For local block k the auxiliary network holds two copies of ``u``, the first unit of block k+1:
``ema`` (frozen, updated only by EMA of ``u``'s parameters) and ``lb`` (trainable, the "learnable
bias"). MAN fuses ``lb(h) + ema(h)``; MAN++ learns a scalar ``s``: ``s·lb(h) + (2−s)·ema(h)``.
The base heads then see that fused tensor.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError
from ..recompute import Segment, checkpoint
from .base import AuxContext, LocalBatch, Rule, get_rule_class, register_rule

MAN_BASES = ("dgl", "infopro", "infopro-contrast", "greedy")
INITS = ("copy", "random")


def check_momentum(m: float) -> float:
    """Refuse EMA momenta outside [0, 1] (the authors' CLI default of 1.0 silently froze the EMA)."""
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= float(m) <= 1.0:
        raise ConfigError(f"EMA momentum must be a number in [0, 1], got {m!r} (default 0.995)")
    return float(m)


@torch.no_grad()
def ema_update_(ema_params: list[torch.Tensor], source_params: list[torch.Tensor], momentum: float) -> None:
    """θ_ema ← m·θ_ema + (1 − m)·θ_source, fused over all tensors (two multi-tensor kernels)."""
    if not ema_params:
        return
    torch._foreach_mul_(ema_params, momentum)
    torch._foreach_add_(ema_params, source_params, alpha=1.0 - momentum)


class MomentumAux(nn.Module):
    """Momentum auxiliary network: ema + lb copies of ``source`` (+ MAN++ scale), then ``heads``."""

    def __init__(self, source: nn.Module, heads: nn.Module, scaled: bool, init: str = "copy",
                 reinit=None) -> None:
        super().__init__()
        self.ema = copy.deepcopy(source)
        self.lb = copy.deepcopy(source)
        if init == "random":
            if reinit is None:
                raise ConfigError("init='random' needs the backbone family's weight init")
            reinit(self.ema)
            reinit(self.lb)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.scale = nn.Parameter(torch.tensor(1.0)) if scaled else None
        self.heads = heads
        # Not a submodule: the source belongs to the next block; we only read its parameters.
        self._source = (source,)
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        # Recompute the frozen ema unit in backward instead of keeping its activations (only its
        # output stays alive: MAN++'s s needs it). Same gradients; one more ema forward per step.
        self.recompute_ema = False

    @property
    def source(self) -> nn.Module:
        return self._source[0]

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(ema parameters, source parameters), matched by name; cached until the module is moved."""
        if self._pairs is None:
            src = dict(self.source.named_parameters())
            names = [n for n, _ in self.ema.named_parameters()]
            self._pairs = ([p for _, p in self.ema.named_parameters()], [src[n] for n in names])
        return self._pairs

    def _apply(self, fn, recurse=True):  # parameters may be replaced when moved: rebuild the cache
        self._pairs = None
        return super()._apply(fn, recurse)

    def update_ema(self, momentum: float) -> None:
        ema, src = self.ema_pairs()
        ema_update_(ema, src, momentum)

    def ema_forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.recompute_ema and torch.is_grad_enabled() and h.requires_grad:
            # Reentrant: the tracker sees what is kept; Segment keeps BN statistics from being
            # updated a second time by the recomputation.
            return checkpoint(Segment([self.ema]), h, use_reentrant=True)
        return self.ema(h)

    def fuse(self, h: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return self.lb(h) + self.ema_forward(h)
        s = self.scale.to(h.dtype)
        return s * self.lb(h) + (2.0 - s) * self.ema_forward(h)

    def forward(self, h: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        return self.heads(self.fuse(h), batch)


@register_rule
class ManRule(Rule):
    """``man``: MAN on top of ``base`` (dgl or infopro)."""

    name = "man"
    scaled = False

    def __init__(self, base: str = "infopro", init: str = "copy", **base_kwargs) -> None:
        if base not in MAN_BASES:
            raise ConfigError(f"{self.name} needs base in {MAN_BASES}, got {base!r}")
        if init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {init!r}")
        self.base = get_rule_class(base)(**base_kwargs)
        self.init = init

    def build_aux(self, ctx: AuxContext, h_shape=None) -> nn.Module:
        if not any(True for _ in ctx.next_unit.parameters()):
            raise ConfigError(f"MAN's ema/lb unit cannot be built after local block {ctx.index}: unit "
                              f"{ctx.next_unit_index} (the first unit of the next block) has no parameters "
                              "to track; move the boundary so the next block starts with a parametrised unit")
        heads = self.base.build_aux(ctx, ctx.next_shape)
        return MomentumAux(ctx.next_unit, heads, self.scaled, self.init, ctx.reinit)


@register_rule
class ManPPRule(ManRule):
    """``manpp``: MAN++ (learnable scale s)."""

    name = "manpp"
    scaled = True
