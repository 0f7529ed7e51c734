"""``auglocal``: AugLocal (Ma et al., ICLR 2024), SPEC 2.4.

The auxiliary network of the block that ends at unit ℓ (the stem is unit 0, so a backbone with a stem
and n−1 residual units has n units) is d *freshly initialised* units that follow the backbone's later
widths — the unit indices round(ℓ + (n−ℓ−1)/d·j), j = 1…d (Python rounding; every later unit when
d ≥ n−1−ℓ; the last one is always the final unit) — then global pooling, BatchNorm1d (only when d ≤ 1),
Linear and cross-entropy. Nothing is shared with the backbone: a later unit's architecture is copied and
re-initialised with the backbone's own init (or, when no later unit takes the running channel count, a
plain residual unit of that width is built).

**K.** Here K is the real number of gradient-isolated pieces, as everywhere in manlearn. The authors'
"K" counts one module per unit *before* the last d+1 units and the classifier are merged into one final
module, so their "ResNet-32 K=16, d=2" is 14 real pieces: :func:`authors_k` and :func:`auglocal_split`
convert.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.layers import GlobalAvgPool
from .base import AuxContext, LocalBatch, Rule, loss_precision, register_rule


def authors_k(K: int, depth: int) -> int:
    """The authors' "K" of a run with K real pieces laid out as they do (one unit per module, the last
    d+1 units in one final module): K + d. ResNet-32 with 14 real pieces and d=2 is their "K=16"."""
    return int(K) + int(depth)


def auglocal_split(n_units: int, depth: int) -> list[int]:
    """The authors' layout as an explicit ``split`` (unit counts, with ``stem_module=True``): every residual
    unit its own piece except the last d+1, which form the final piece with the classifier."""
    last_alone = n_units - depth - 1
    if last_alone < 1:
        raise ConfigError(f"auglocal depth {depth} leaves no local unit in a backbone of {n_units} units")
    return list(range(1, last_alone + 1)) + [n_units]


def later_unit_indices(position: int, n: int, depth: int) -> list[int]:
    """Indices (in units counted with the stem as 0) of the units the auxiliary network of unit
    ``position`` follows: round(ℓ + (n−ℓ−1)/d·j) for j = 1…d, or every later unit when d ≥ n−1−ℓ."""
    remaining = n - 1 - position
    if remaining <= 0:
        return []
    if depth >= remaining:
        return list(range(position + 1, n))
    return [round(position + remaining / depth * j) for j in range(1, depth + 1)]


def pyramid_depth(depth: int, position: int, n: int) -> int:
    """Pyramid depth: falls linearly from d at the first unit to (d+1)/2 at the last local one (n−2),
    rounded (Python rounding), never below 1."""
    if n <= 2:
        return depth
    frac = min(max(position / (n - 2), 0.0), 1.0)
    return max(1, round(depth + ((depth + 1) / 2 - depth) * frac))


class ResidualUnit(nn.Module):
    """A plain basic residual unit c_in -> c_out (stride 2 when the width grows), used only when no later
    unit of the backbone takes the running channel count."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        stride = 2 if c_out > c_in else 1
        self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                                  nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _fresh_unit(ctx: AuxContext, chosen: int, c_in: int) -> nn.Module:
    """A freshly initialised unit producing the width of later unit ``chosen`` from ``c_in`` channels:
    a re-initialised copy of that unit when it takes ``c_in`` channels, else of the first later unit that
    maps c_in to that width, else :class:`ResidualUnit`."""
    in_shapes = [tuple(ctx.h_shape)] + [tuple(s) for s in ctx.later_shapes[:-1]]
    c_out = int(ctx.later_shapes[chosen][0])
    order = [chosen] + [m for m in range(len(ctx.later_units)) if m != chosen]
    for m in order:
        if int(in_shapes[m][0]) == c_in and int(ctx.later_shapes[m][0]) == c_out:
            unit = copy.deepcopy(ctx.later_units[m])
            break
    else:
        unit = ResidualUnit(c_in, c_out)
    if ctx.reinit is not None:
        ctx.reinit(unit)
    else:
        for mod in unit.modules():
            if hasattr(mod, "reset_parameters") and mod is not unit:
                mod.reset_parameters()
    for p in unit.parameters():
        p.requires_grad_(True)
    return unit


class AugLocalAux(nn.Module):
    """d fresh units, global pool, [BN1d when d ≤ 1], Linear, CE."""

    def __init__(self, units: list[nn.Module], channels: int, num_classes: int) -> None:
        super().__init__()
        self.units = nn.Sequential(*units)
        self.pool = nn.Sequential(GlobalAvgPool(), nn.Flatten(1))
        self.norm = nn.BatchNorm1d(channels) if len(units) <= 1 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, h: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        logits = self.fc(self.norm(self.pool(self.units(h))))
        logits = loss_precision(logits)
        y = batch.y.to(logits.dtype) if batch.y.is_floating_point() else batch.y
        return F.cross_entropy(logits, y)


@register_rule
class AugLocalRule(Rule):
    """``auglocal``: each block trained through d fresh units that follow the backbone's later widths."""

    name = "auglocal"
    summary = ("AugLocal: d fresh units following the later widths + pool + linear, CE (depth=d, pyramid); "
               "authors' K = real K + d")

    def __init__(self, depth: int = 2, pyramid: bool = False) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"auglocal depth must be a positive integer (d units), got {depth!r}")
        self.depth, self.pyramid = depth, bool(pyramid)

    def authors_k(self, K: int) -> int:
        """The authors' "K" for K real pieces in their layout (see :func:`authors_k`)."""
        return authors_k(K, self.depth)

    def build_aux(self, ctx: AuxContext, h_shape=None) -> nn.Module:
        shape = tuple(h_shape or ctx.h_shape)
        ctx.require_feature_maps("auglocal", shape, "builds residual units on feature maps")
        ctx.require_labels(self.name)
        if not ctx.later_units or len(ctx.later_shapes) != len(ctx.later_units):
            raise ConfigError("auglocal needs the backbone's later units (AuxContext.later_units/later_shapes)")
        position = ctx.next_unit_index           # the block's last unit, counting the stem as unit 0
        n = position + 1 + len(ctx.later_units)
        depth = pyramid_depth(self.depth, position, n) if self.pyramid else self.depth
        chosen = [j - position - 1 for j in later_unit_indices(position, n, depth)]  # into later_units
        units, c = [], int(shape[0])
        for m in chosen:
            units.append(_fresh_unit(ctx, m, c))
            c = int(ctx.later_shapes[m][0])
        return AugLocalAux(units, c, ctx.num_classes)
