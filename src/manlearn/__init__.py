"""manlearn: supervised local learning in PyTorch (DGL, InfoPro, MAN, MAN++).

>>> import manlearn
>>> learner = manlearn.LocalLearner(model="resnet32", method="manpp", base="infopro", K=16)
"""
from .errors import CheckpointError, ConfigError, DatasetError, DivergenceError, ManlearnError, OutputError
from .learner import LocalLearner, StepOutput, memory_plan
from .planning import MemoryPlan, MemoryWarning
from .models import Backbone, adapt_model, create_model, cut_model, list_models, register_model
from .rules import Rule, create_rule, list_base_rules, list_rules, register_rule
from . import tasks
from .split import PUBLISHED_SPLITS, Split, resolve_split

__version__ = "0.1.0"


def __getattr__(name: str):
    """``manlearn.Trainer``, ``Callback``, ``register_task`` and ``list_tasks``, imported on first use (the
    loop's modules are not needed by ``import manlearn``)."""
    if name in ("Trainer", "Callback"):
        from . import train

        return getattr(train, name)
    if name in ("register_task", "list_tasks"):
        from .train import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'manlearn' has no attribute {name!r}")

__all__ = ["LocalLearner", "Trainer", "Callback", "register_task", "list_tasks", "StepOutput", "memory_plan", "MemoryPlan", "MemoryWarning", "Backbone", "adapt_model", "cut_model", "create_model", "list_models", "register_model",
           "list_rules", "Rule", "register_rule", "create_rule", "list_base_rules", "tasks", "PUBLISHED_SPLITS", "Split", "resolve_split", "ManlearnError", "ConfigError",
           "DatasetError", "CheckpointError", "DivergenceError", "OutputError", "__version__"]
