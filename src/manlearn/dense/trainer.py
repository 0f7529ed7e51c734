"""Deprecated: dense runs are trained by :class:`manlearn.train.Trainer` with a ``task:`` section.

``DenseTrainer`` is kept as a thin alias so that code written against earlier versions still runs;
the data, evaluation and metrics of dense runs live in :mod:`manlearn.train.task_runs`.
"""

from __future__ import annotations

import warnings
from typing import Any

from manlearn.train.task_runs import HEADLINE, DenseData, evaluate_dense, format_metrics, load_dense_data
from manlearn.train.trainer import CKPT_NAME, METRICS_NAME, Trainer, evaluate_checkpoint

__all__ = ["DenseTrainer", "DenseData", "load_dense_data", "evaluate_dense", "evaluate_checkpoint",
           "format_metrics", "CKPT_NAME", "METRICS_NAME", "HEADLINE"]


class DenseTrainer(Trainer):
    """Deprecated alias of :class:`manlearn.train.Trainer` (which trains every task)."""

    def __init__(self, cfg: Any, **kwargs: Any) -> None:
        warnings.warn("manlearn.dense.DenseTrainer is deprecated: use manlearn.train.Trainer with a "
                      "task section (task.name=detection | segmentation)", DeprecationWarning, stacklevel=2)
        super().__init__(cfg, **kwargs)
