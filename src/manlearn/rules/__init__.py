"""Local-learning rules: one small class per rule, one interface (:class:`Rule`)."""
from .base import AuxContext, LocalBatch, Rule, get_rule_class, list_rules, register_rule
from . import e2e, greedy, infopro, momentum  # noqa: F401  (register the rules)
from .momentum import MomentumAux, check_momentum, ema_update_

__all__ = ["AuxContext", "LocalBatch", "Rule", "get_rule_class", "list_rules", "register_rule",
           "MomentumAux", "check_momentum", "ema_update_"]
