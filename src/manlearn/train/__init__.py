"""Training: the :class:`Trainer` loop (every task) and the pieces it is made of.

- ``schedule``: learning rate as a pure function of the global step (every schedule)
- ``optim``: the single optimiser over every trainable parameter
- ``checkpoint``: atomic ``last.pt`` writes, validated reads, resume compatibility, RNG state
- ``metrics``: a small metric logger and the ``metrics.jsonl`` writer
- ``build``: config → device, seeds, datasets, loaders, learner (shared with ``manlearn eval``)
- ``task_runs``: what differs per task (data, batches, evaluation metric, progress fields)
"""

from .build import build_learner, load_split, make_loader, resolve_device, seed_everything
from .checkpoint import (RESUME_FREE_KEYS, check_resume_compatible, config_differences,
                         load_checkpoint, save_checkpoint)
from .metrics import JsonlWriter, MetricLogger, SmoothedValue, read_jsonl
from .optim import build_optimizer, trainable_parameters
from .schedule import lr_at, total_epochs, total_steps
from .task_runs import ClassificationRun, DenseRun, make_task_run
from .callbacks import Callback
from .trainer import CKPT_NAME, LOOP_KEYS, METRICS_NAME, Trainer, evaluate, evaluate_checkpoint

__all__ = [
    "Trainer", "Callback", "LOOP_KEYS", "evaluate", "evaluate_checkpoint", "CKPT_NAME", "METRICS_NAME",
    "lr_at", "total_steps", "total_epochs", "build_optimizer", "trainable_parameters",
    "save_checkpoint", "load_checkpoint", "check_resume_compatible", "config_differences",
    "RESUME_FREE_KEYS", "MetricLogger", "SmoothedValue", "JsonlWriter", "read_jsonl",
    "build_learner", "load_split", "make_loader", "resolve_device", "seed_everything",
    "ClassificationRun", "DenseRun", "make_task_run",
]
