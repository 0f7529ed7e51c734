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
from ..models import init_weights
from ..recompute import Segment, checkpoint
from .base import AuxContext, LocalBatch, Rule, check_option_types, create_rule, list_base_rules, register_rule
from .vit_aux import TokenCEAux, TokenClassifier, is_token_shape

INITS = ("copy", "random")
#: ``default``: the methods as intended; ``authors``: the authors' MAN++ code's exact computation (SPEC 2.3)
FIDELITIES = ("default", "authors")


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
        self.momentum = 0.995  # the rule's EMA momentum, set by the rule (and by ``LocalLearner.momentum``)

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

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """What to watch in a run (logged with the step records): MAN++'s ``s``, and how far lb has
        drifted from ema and ema from the next block, as relative L2 distances over all parameters."""
        ema, src = self.ema_pairs()
        ema = [p.float() for p in ema]
        lb = [p.float() for p in self.lb.parameters()]

        def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
            num = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(torch._foreach_sub(a, b))))
            den = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(b)))
            return float(num / den.clamp_min(1e-12))

        out = {"lb_vs_ema": rel(lb, ema), "ema_vs_next": rel(ema, [p.float() for p in src])}
        if self.scale is not None:
            out["s"] = float(self.scale.detach())
        return out

    def after_backward(self) -> None:
        """The learner's hook after this block's backward: the EMA update of SPEC 3.2."""
        self.update_ema(self.momentum)

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


def heads_of(aux: nn.Module) -> nn.Module:
    """The part of an auxiliary network that computes the local loss from (fused) features: a
    MAN/MAN++ network's ``heads``, any other rule's whole auxiliary network."""
    return aux.heads if isinstance(aux, MomentumAux) else aux


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


def _check_trackable(ctx: AuxContext) -> None:
    if not any(True for _ in ctx.next_unit.parameters()):
        raise ConfigError(f"MAN's ema/lb unit cannot be built after local block {ctx.index}: unit "
                          f"{ctx.next_unit_index} (the first unit of the next block) has no parameters "
                          "to track; move the boundary so the next block starts with a parametrised unit")


@register_rule
class ManRule(Rule):
    """``man``: MAN in front of the heads of any ``base`` rule (default: ``infopro`` when the task's
    targets are class labels, else ``greedy``, the task's own local head). Other options are passed to
    the base rule. On tokens (ViT) it builds MAN++'s ViT auxiliary network (CE on the CLS token).

    Options: ``momentum`` of the EMA (SPEC 3.2); ``init`` of ema/lb (``copy`` of the next unit, or
    ``random``); ``ema_recompute``: recompute the frozen ema unit in backward instead of keeping its
    activations (same gradients, one more ema forward per step, less memory); ``fidelity``: ``default``
    (what the methods intend) or the preset ``authors``: the authors' MAN++ CIFAR computation exactly
    (SPEC 2.3): ``authors_init``, the InfoPro options ``authors_stem_head=True`` and
    ``supcon_anchors="all"``, and ``lambda_schedule="stage"`` unless one is given. ``authors_init``: once
    the learner is built, re-initialise every conv and norm layer of it (backbone, ema/lb units, heads,
    decoders) as the authors' code does, so ema and lb start random rather than as copies.
    """

    name = "man"
    modifier = True
    scaled = False
    summary = "Momentum Auxiliary Network: ema + lb copies of the next unit before a base rule's heads"

    def __init__(self, base: str | None = None, momentum: float = 0.995, init: str = "copy",
                 ema_recompute: bool = False, fidelity: str = "default", authors_init: bool = False,
                 **base_options) -> None:
        if base is not None and base not in list_base_rules():
            raise ConfigError(f"unknown base {base!r} for {self.name}; choose from {', '.join(list_base_rules())}")
        if init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {init!r}")
        if fidelity not in FIDELITIES:
            raise ConfigError(f"unknown fidelity {fidelity!r}; choose from {FIDELITIES}")
        if fidelity == "authors":  # the preset; options given explicitly win (rules that do not take them ignore them)
            base_options = {"lambda_schedule": "stage", "authors_stem_head": True, "supcon_anchors": "all",
                            **base_options}
        self.base_name = base
        self.base_options = base_options
        self.momentum = check_momentum(momentum)
        self.init = init
        self.recompute_ema = bool(ema_recompute)
        self.fidelity = fidelity
        self.authors_init = bool(authors_init) or fidelity == "authors"
        self.base: Rule | None = None if base is None else create_rule(base, base_options)

    @classmethod
    def from_options(cls, options):
        own = cls.option_names() - {"base_options"}
        mine = {k: v for k, v in options.items() if k in own}
        check_option_types(cls, mine)
        return cls(**mine, **{k: v for k, v in options.items() if k not in own})

    def accepted_options(self) -> set[str]:
        own = type(self).option_names() - {"base_options"}
        return own | (self.base.accepted_options() if self.base is not None else set())

    def after_build(self, learner: nn.Module) -> None:
        if self.authors_init:
            init_weights(learner)  # the authors' global re-init: every conv and norm layer, auxes included

    def bind(self, task) -> None:
        if self.base is None:
            self.base_name = "infopro" if getattr(task, "per_image_labels", False) else "greedy"
            self.base = create_rule(self.base_name, self.base_options)
        self.base.bind(task)

    def build_aux(self, ctx: AuxContext, h_shape=None) -> nn.Module:
        _check_trackable(ctx)
        if self.base is None:
            self.bind(ctx.task)
        if is_token_shape(ctx.h_shape):
            ctx.require_labels(self.name)
            aux: MomentumAux = build_vit_momentum_aux(ctx, self.scaled, self.init)
        else:
            heads = self.base.build_aux(ctx, ctx.next_shape)
            aux = MomentumAux(ctx.next_unit, heads, self.scaled, self.init, ctx.reinit)
        aux.recompute_ema = self.recompute_ema
        aux.momentum = self.momentum
        return aux


@register_rule
class ManPPRule(ManRule):
    """``manpp``: MAN++ (learnable scale s)."""

    name = "manpp"
    scaled = True
    summary = "MAN++: MAN with a learnable scale s, s*lb(h) + (2-s)*ema(h)"
