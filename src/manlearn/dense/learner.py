"""Dense tasks (detection, segmentation) on the one engine: a compatibility layer.

There is one :class:`~manlearn.LocalLearner`; a dense task is just a task whose final head reads every
stage (``manlearn.tasks.RetinaNetTask``, ``manlearn.tasks.DeepLabV3Task``), cut at stage boundaries
(SPEC 3.4: K=4 is stem+layer1 | layer2 | layer3 | layer4). :func:`DenseLocalLearner` keeps the earlier
call signature: its ``local`` method is the ``greedy`` rule with the task's local head, and ``man`` /
``manpp`` put their ema/lb fusion in front of that head (``base='greedy'``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import ConfigError
from ..learner import LocalLearner, StepOutput
from ..models import model_accepts
from ..rules import TaskLoss
from ..split import DEFAULT_STAGE_CUTS
from ..tasks import Task

#: The methods of the earlier dense learner; ``local`` is the greedy rule with the task's local head.
DENSE_METHODS = ("e2e", "local", "man", "manpp")
DenseTask = Task
LocalTaskLoss = TaskLoss
DenseStepOutput = StepOutput

__all__ = ["DENSE_METHODS", "DEFAULT_STAGE_CUTS", "DenseLocalLearner", "DenseStepOutput", "DenseTask",
           "LocalTaskLoss"]


def DenseLocalLearner(task: Any, model: str | torch.nn.Module = "resnet50", method: str = "manpp", K: int = 4, *,
                      stage_cuts: Sequence[int] | None = None, in_channels: int = 3, momentum: float = 0.995,
                      init: str = "copy", norm_mean: Sequence[float] | None = None,
                      norm_std: Sequence[float] | None = None, channels_last: bool = False,
                      amp_dtype: torch.dtype | None = None, model_kwargs: dict | None = None,
                      probe_size: int = 64) -> LocalLearner:
    """``LocalLearner(model, task=task, method=..., K=..., stage_cuts=...)`` with the earlier dense names."""
    if method not in DENSE_METHODS:
        raise ConfigError(f"unknown dense method {method!r}; choose from {', '.join(DENSE_METHODS)}")
    if isinstance(model, str) and model_accepts(model, "image_size"):
        raise ConfigError(f"model {model!r} is a token model; dense tasks need a ResNet-style backbone")
    if method != "e2e" and K == 1:
        raise ConfigError(f"method {method!r} with K=1 is plain backprop; use method=e2e")
    return LocalLearner(model, method="greedy" if method == "local" else method,
                        base="greedy" if method in ("man", "manpp") else None, K=K, in_channels=in_channels,
                        image_size=probe_size, task=task, stage_cuts=stage_cuts, stem_module=False,
                        momentum=momentum, init=init, norm_mean=norm_mean, norm_std=norm_std,
                        channels_last=channels_last, amp_dtype=amp_dtype, model_kwargs=model_kwargs)
