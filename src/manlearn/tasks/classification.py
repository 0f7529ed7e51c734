"""Image classification: the backbone's own head on the last unit's output, cross-entropy."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.layers import GlobalAvgPool
from .base import Task, loss_precision


class LinearProbe(nn.Sequential):
    """Global average pool + one linear layer: the local head of the ``greedy`` rule."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(GlobalAvgPool(), nn.Flatten(1), nn.Linear(channels, num_classes))


class ClassificationTask(Task):
    """One class per image. Targets are ``[B]`` class indices or ``[B, num_classes]`` class
    probabilities (soft targets: mixup, cutmix). The final head is the backbone's own (``final_head``
    is not called: the learner keeps ``backbone.head``).

    ``label_smoothing`` applies to the final head's loss (the local losses are the rules' own).
    """

    name = "classification"
    reads = "last"
    per_image_labels = True
    fixed_input_size = False

    def __init__(self, num_classes: int = 10, label_smoothing: float = 0.0) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        if isinstance(label_smoothing, bool) or not 0.0 <= float(label_smoothing) < 1.0:
            raise ConfigError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)

    def final_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        return LinearProbe(channels[-1], self.num_classes)

    def local_head(self, channels: int, stride: int) -> nn.Module:
        return LinearProbe(channels, self.num_classes)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, image_hw: Any = None) -> torch.Tensor:
        return F.cross_entropy(loss_precision(outputs), targets, label_smoothing=self.label_smoothing)

    def predict(self, outputs: torch.Tensor, image_hw: Any = None) -> torch.Tensor:
        return outputs.argmax(dim=1)

    def check_targets(self, x: torch.Tensor, targets: Any) -> None:
        """Shapes and dtypes always; values (label range 0..C-1, finite probabilities) where the targets are on
        the CPU: on an accelerator those checks would make every step wait for the device (there a bad label
        is the device's own assert)."""
        b, c = x.shape[0], self.num_classes
        hard = (isinstance(targets, torch.Tensor) and targets.shape == (b,) and not targets.is_floating_point()
                and targets.dtype in (torch.int64, torch.uint8))
        soft = isinstance(targets, torch.Tensor) and targets.shape == (b, c) and targets.is_floating_point()
        if not (hard or soft):
            shape = (f"{targets.dtype} {list(targets.shape)}" if isinstance(targets, torch.Tensor)
                     else type(targets).__name__)
            hint = (" (class indices must be int64: y.long())" if isinstance(targets, torch.Tensor)
                    and targets.shape == (b,) and not targets.is_floating_point() else "")
            raise ConfigError(f"classification targets (labels) must be [B] integer class indices or [B, {c}] class "
                              f"probabilities for a batch of {b}, got {shape}{hint}")
        if targets.device.type != "cpu" or not targets.numel():
            return
        if hard:
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 0 or hi >= c:
                raise ConfigError(f"class indices must lie in 0..{c - 1} (num_classes={c}), got labels {lo}..{hi}")
        elif not bool(torch.isfinite(targets).all()):
            raise ConfigError("the class probabilities (soft targets) hold NaN or infinite values")
        elif bool((targets < 0).any()) or not bool(torch.allclose(targets.sum(dim=1).double(),
                                                                 torch.ones(b, dtype=torch.float64), atol=1e-3)):
            raise ConfigError("class probabilities (soft targets) must be >= 0 and sum to 1 per image, got rows "
                              f"summing to {float(targets.sum(dim=1).min()):.4g}..{float(targets.sum(dim=1).max()):.4g} "
                              f"(min value {float(targets.min()):.4g})")
