"""Box operations in plain torch (torchvision cannot be imported here).

Boxes are ``[..., 4]`` tensors in ``xyxy`` image pixels (x1, y1, x2, y2) unless a function says
otherwise; a box's width is ``x2 - x1`` (continuous coordinates, no "+1" pixel convention), the
convention of torchvision and Detectron2 that the RetinaNet recipes were tuned with.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["box_xyxy_to_cxcywh", "box_cxcywh_to_xyxy", "box_area", "box_iou", "generalized_box_iou",
           "paired_box_iou", "paired_generalized_box_iou", "BoxCoder", "nms", "batched_nms",
           "clip_boxes", "remove_small_boxes", "DEFAULT_BBOX_XFORM_CLIP"]

#: Largest log-scale change a decoded box may make (Detectron's ``log(1000 / 16)``): keeps exp() of an
#: untrained regressor from producing infinite boxes.
DEFAULT_BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _check_boxes(boxes: torch.Tensor, name: str = "boxes", ndim: int | None = None) -> None:
    if not isinstance(boxes, torch.Tensor) or boxes.shape[-1:] != (4,) or (ndim is not None and boxes.dim() != ndim):
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        want = "[N, 4]" if ndim == 2 else "[..., 4]"
        raise ConfigError(f"{name} must be a tensor of shape {want} (x1, y1, x2, y2), got {shape}")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) -> (centre x, centre y, width, height)."""
    _check_boxes(boxes)
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1), dim=-1)


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(centre x, centre y, width, height) -> (x1, y1, x2, y2)."""
    _check_boxes(boxes)
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of each box (negative extents count as zero)."""
    _check_boxes(boxes)
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise intersection and union areas of ``a [N, 4]`` and ``b [M, 4]``."""
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, area_a[:, None] + area_b[None, :] - inter


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``[N, M]``; a pair of zero-area boxes has IoU 0 (not NaN)."""
    _check_boxes(boxes1, "boxes1", 2)
    _check_boxes(boxes2, "boxes2", 2)
    inter, union = _inter_union(boxes1, boxes2)
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU ``[N, M]`` (Rezatofighi et al. 2019): IoU - (C - U) / C with C the area
    of the smallest enclosing box; in [-1, 1], and informative even for disjoint boxes."""
    _check_boxes(boxes1, "boxes1", 2)
    _check_boxes(boxes2, "boxes2", 2)
    inter, union = _inter_union(boxes1, boxes2)
    tiny = torch.finfo(union.dtype).tiny
    iou = torch.where(union > 0, inter / union.clamp(min=tiny), torch.zeros_like(inter))
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - torch.where(hull > 0, (hull - union) / hull.clamp(min=tiny), torch.zeros_like(hull))


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of ``boxes1[i]`` with ``boxes2[i]`` (same shape ``[..., 4]``): the diagonal of
    :func:`box_iou` without building the full matrix."""
    return _paired(boxes1, boxes2, generalized=False)


def paired_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Generalized IoU of ``boxes1[i]`` with ``boxes2[i]``: what a GIoU box loss needs."""
    return _paired(boxes1, boxes2, generalized=True)


def _paired(a: torch.Tensor, b: torch.Tensor, generalized: bool) -> torch.Tensor:
    _check_boxes(a, "boxes1")
    _check_boxes(b, "boxes2")
    if a.shape != b.shape:
        raise ConfigError(f"paired IoU needs boxes of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    tiny = torch.finfo(a.dtype).tiny if a.is_floating_point() else 1e-38
    lt = torch.max(a[..., :2], b[..., :2])
    rb = torch.min(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=tiny), torch.zeros_like(inter))
    if not generalized:
        return iou
    wh = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - torch.where(hull > 0, (hull - union) / hull.clamp(min=tiny), torch.zeros_like(hull))


class BoxCoder:
    """R-CNN / RetinaNet box parameterisation relative to anchors.

    ``dx = wx (gx - ax) / aw``, ``dy = wy (gy - ay) / ah``, ``dw = ww log(gw / aw)``,
    ``dh = wh log(gh / ah)`` on centres and sizes; RetinaNet uses weights (1, 1, 1, 1). Decoding clamps
    ``dw, dh`` at ``bbox_xform_clip`` (``log(1000/16)``) so that an untrained regressor cannot
    overflow ``exp``.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP) -> None:
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise ConfigError(f"BoxCoder weights must be four positive numbers, got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Regression targets ``[..., 4]`` that turn ``anchors`` into ``boxes`` (same shapes).

        Boxes and anchors must have positive width and height (the log is undefined otherwise)."""
        _check_boxes(boxes)
        _check_boxes(anchors, "anchors")
        wx, wy, ww, wh = self.weights
        a = box_xyxy_to_cxcywh(anchors.to(boxes.dtype))
        g = box_xyxy_to_cxcywh(boxes)
        return torch.stack((wx * (g[..., 0] - a[..., 0]) / a[..., 2],
                            wy * (g[..., 1] - a[..., 1]) / a[..., 3],
                            ww * torch.log(g[..., 2] / a[..., 2]),
                            wh * torch.log(g[..., 3] / a[..., 3])), dim=-1)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Boxes ``[..., 4]`` (xyxy) from regression ``deltas`` applied to ``anchors`` (broadcasting)."""
        _check_boxes(deltas, "deltas")
        _check_boxes(anchors, "anchors")
        wx, wy, ww, wh = self.weights
        a = box_xyxy_to_cxcywh(anchors.to(deltas.dtype))
        dw = (deltas[..., 2] / ww).clamp(max=self.bbox_xform_clip)
        dh = (deltas[..., 3] / wh).clamp(max=self.bbox_xform_clip)
        cx = deltas[..., 0] / wx * a[..., 2] + a[..., 0]
        cy = deltas[..., 1] / wy * a[..., 3] + a[..., 1]
        w = torch.exp(dw) * a[..., 2]
        h = torch.exp(dh) * a[..., 3]
        return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def clip_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Clip boxes to an image of ``size = (height, width)``."""
    _check_boxes(boxes)
    h, w = size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def remove_small_boxes(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """Indices of the boxes whose width and height are both at least ``min_size``."""
    _check_boxes(boxes, ndim=2)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.nonzero((w >= min_size) & (h >= min_size)).flatten()


_NMS_CHUNK = 2048


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, by decreasing score.

    A box is dropped when its IoU with an already kept, higher-scored box is **greater than**
    ``iou_threshold``. Equal scores keep the lower index first (stable sort), so the result is
    deterministic. On an accelerator the pairwise "IoU > threshold" matrix is computed once (in row
    chunks, as booleans) and moved to the host in one transfer, and the greedy pass only reads the rows
    of kept boxes; on the CPU the classic greedy loop in numpy (IoU of each kept box with the boxes
    still alive) is about twice as fast as building the matrix.
    """
    _check_boxes(boxes, ndim=2)
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ConfigError(f"nms needs scores of shape [N] for boxes [N, 4], got {tuple(scores.shape)} "
                          f"and {tuple(boxes.shape)}")
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    if boxes.device.type == "cpu":
        kept = _greedy_numpy(boxes[order].double().numpy(), float(iou_threshold))
    else:
        b = boxes[order].float()
        over = torch.cat([box_iou(b[i:i + _NMS_CHUNK], b) > iou_threshold for i in range(0, n, _NMS_CHUNK)])
        kept = _greedy_matrix(over.cpu().numpy())
    return order[torch.as_tensor(kept, dtype=torch.long, device=boxes.device)]


def _greedy_matrix(over: np.ndarray) -> list[int]:
    """Greedy pass over a boolean "IoU > threshold" matrix of score-sorted boxes."""
    suppressed = np.zeros(over.shape[0], dtype=bool)
    kept: list[int] = []
    for i in range(over.shape[0]):
        if not suppressed[i]:
            kept.append(i)
            suppressed |= over[i]
    return kept


def _greedy_numpy(b: np.ndarray, thr: float) -> list[int]:
    """Greedy NMS of score-sorted boxes ``b [N, 4]``: one vectorised IoU row per kept box."""
    x1, y1, x2, y2 = b.T
    area = (x2 - x1).clip(min=0) * (y2 - y1).clip(min=0)
    alive = np.arange(b.shape[0])
    kept: list[int] = []
    while alive.size:
        i, rest = alive[0], alive[1:]
        kept.append(int(i))
        iw = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(min=0)
        ih = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(min=0)
        inter = iw * ih
        union = area[i] + area[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        alive = rest[iou <= thr]
    return kept


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """NMS applied independently per label; returns kept indices by decreasing score (equal scores:
    lower index first).

    On an accelerator, one NMS over all boxes, each label's boxes shifted by ``label * (span + 1)`` so
    that boxes of different labels never overlap (the class-offset trick); on the CPU, where an NMS
    costs time per pair of boxes, one NMS per label (same result, far fewer pairs)."""
    _check_boxes(boxes, ndim=2)
    if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
        raise ConfigError(f"batched_nms needs labels of shape [N] for boxes [N, 4], got {tuple(labels.shape)}")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    if boxes.device.type == "cpu":
        return _batched_nms_per_label(boxes, scores, labels, iou_threshold)
    return _batched_nms_offsets(boxes, scores, labels, iou_threshold)


def _batched_nms_offsets(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                         iou_threshold: float) -> torch.Tensor:
    b = boxes.double() if boxes.device.type == "cpu" else boxes.float()
    lo, hi = b.min(), b.max()
    offsets = labels.to(b.dtype) * (hi - lo + 1)
    return nms(b - lo + offsets[:, None], scores, iou_threshold)


def _batched_nms_per_label(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                           iou_threshold: float) -> torch.Tensor:
    kept = []
    for lab in torch.unique(labels):
        idx = torch.nonzero(labels == lab).flatten()
        kept.append(idx[nms(boxes[idx], scores[idx], iou_threshold)])
    keep = torch.cat(kept).sort().values  # index order first, so the stable sort breaks ties by index
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]
