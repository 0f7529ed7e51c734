"""Local-learning rules: one small class per rule, one interface (:class:`Rule`)."""
from .base import (AuxContext, LocalBatch, Rule, create_rule, get_rule_class, list_base_rules, list_rules,
                   modifier_base, register_rule)
from . import auglocal, e2e, greedy, hpff, infopro, momentum, predsim  # noqa: F401  (register the rules)
from .greedy import TaskLoss
from .momentum import FIDELITIES, MomentumAux, ViTMomentumAux, check_momentum, ema_update_, heads_of

__all__ = ["AuxContext", "LocalBatch", "Rule", "get_rule_class", "list_rules", "register_rule", "create_rule", "list_base_rules",
           "modifier_base",
           "FIDELITIES", "MomentumAux", "ViTMomentumAux", "TaskLoss", "check_momentum", "ema_update_",
           "heads_of"]
