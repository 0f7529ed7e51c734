"""``e2e``: plain end-to-end backprop. It has no auxiliary networks: the learner uses one block."""
from __future__ import annotations

from torch import nn

from .base import AuxContext, Rule, register_rule


@register_rule
class E2ERule(Rule):
    name = "e2e"
    single_block = True
    summary = "plain end-to-end backprop (one block; the baseline)"

    def build_aux(self, ctx: AuxContext, h_shape=None) -> nn.Module:  # pragma: no cover - never called
        raise RuntimeError("e2e has no auxiliary networks")
