"""Segmentation metrics from a confusion matrix (mIoU, per-class IoU, pixel accuracy).

Accumulating one ``num_classes x num_classes`` count matrix over the whole evaluation set (instead of
averaging per-batch IoUs) gives the dataset-level IoU that Cityscapes / VOC benchmarks report, and the
matrix is a single tensor that data-parallel evaluation can all-reduce.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """Accumulates ``matrix[target, pred]`` pixel counts; pixels whose target is ``ignore_index`` are skipped.

    ``compute()`` returns ``{"iou": [C floats, NaN for classes absent from both targets and predictions],
    "miou": mean over the classes present, "pixel_acc": correct / counted pixels, "mean_acc": mean per-class
    recall over classes present in the targets}``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Forget all counts (start a new evaluation)."""
        self.matrix = torch.zeros_like(self.matrix)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` hold class ids of the same shape (e.g. [B, H, W])."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
        c = self.num_classes
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel():
            lo = min(int(target.min()), int(pred.min()))
            hi = max(int(target.max()), int(pred.max()))
            if lo < 0 or hi >= c:
                raise ValueError(f"class ids must lie in 0..{c - 1} (or be ignore_index {self.ignore_index} "
                                 f"in the target), found {lo}..{hi}")
        counts = torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)
        if self.matrix.device != counts.device:
            self.matrix = self.matrix.to(counts.device)
        self.matrix += counts

    def compute(self) -> dict[str, Any]:
        """Per-class IoU, mIoU over classes present, pixel accuracy, mean class accuracy."""
        m = self.matrix.detach().to("cpu", torch.float64)
        tp = m.diag()
        gt = m.sum(dim=1)
        pr = m.sum(dim=0)
        union = gt + pr - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
        present = union > 0
        total = m.sum()
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, math.nan))
        return {
            "iou": [float(v) for v in iou],
            "miou": float(iou[present].mean()) if bool(present.any()) else math.nan,
            "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_acc": float(acc[gt > 0].mean()) if bool((gt > 0).any()) else math.nan,
        }
