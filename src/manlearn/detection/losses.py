"""RetinaNet's training objective: focal loss on every non-ignored anchor, a box loss on the positive
ones (Lin et al. 2017), both normalised by the number of positive anchors.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .boxes import BoxCoder, box_iou, paired_generalized_box_iou

__all__ = ["sigmoid_focal_loss", "Matcher", "BELOW_LOW_THRESHOLD", "BETWEEN_THRESHOLDS", "retinanet_loss",
           "BOX_LOSSES", "check_targets"]

#: Matcher labels for anchors that match no ground-truth box.
BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2
BOX_LOSSES = ("smooth_l1", "l1", "giou")
_REDUCTIONS = ("none", "mean", "sum")


def _focal_term(x: torch.Tensor, positive: bool, alpha: float, gamma: float) -> torch.Tensor:
    """Focal loss of float logits ``x`` against an all-ones (``positive``) or all-zeros target."""
    p = torch.sigmoid(x)
    ce = F.softplus(-x) if positive else F.softplus(x)  # -log p, -log(1 - p), stable
    loss = ce if gamma == 0 else ce * ((1 - p) if positive else p) ** gamma
    if alpha >= 0:
        loss = loss * (alpha if positive else 1 - alpha)
    return loss


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> torch.Tensor:
    """Focal loss ``-alpha_t (1 - p_t)^gamma log(p_t)`` on independent sigmoid outputs.

    ``p_t = p`` for targets 1 and ``1 - p`` for targets 0; ``alpha_t = alpha`` for targets 1 and
    ``1 - alpha`` for targets 0. A negative ``alpha`` disables the weighting (``alpha_t = 1``), so
    ``gamma=0, alpha=-1`` is exactly binary cross-entropy with logits. Computed in float32 from the
    logits (numerically stable: ``log p_t`` is ``-BCE``) even under autocast.
    """
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if logits.shape != targets.shape:
        raise ConfigError(f"focal loss needs logits and targets of the same shape, got {tuple(logits.shape)} "
                          f"and {tuple(targets.shape)}")
    logits = logits.float()
    targets = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = ce
    if gamma != 0:
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class Matcher:
    """Anchor-to-ground-truth assignment by IoU (RetinaNet: ``high=0.5``, ``low=0.4``).

    Each anchor gets the index of its highest-IoU box when that IoU is ``>= high``,
    :data:`BELOW_LOW_THRESHOLD` (-1, background) when it is ``< low`` and :data:`BETWEEN_THRESHOLDS`
    (-2, ignored) in between. With ``allow_low_quality_matches`` every box also claims the anchors
    with which it has its highest IoU (all of them on ties), even below ``low``, so that no box goes
    without a positive anchor; such an anchor gets its own best box, as in Detectron / torchvision.
    """

    def __init__(self, high_threshold: float = 0.5, low_threshold: float = 0.4,
                 allow_low_quality_matches: bool = True) -> None:
        if not 0 <= low_threshold <= high_threshold <= 1:
            raise ConfigError(f"Matcher needs 0 <= low <= high <= 1, got low={low_threshold}, high={high_threshold}")
        self.high = float(high_threshold)
        self.low = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, iou: torch.Tensor) -> torch.Tensor:
        """``iou`` is ``[num_gt, num_anchors]``; returns ``LongTensor[num_anchors]``."""
        if iou.dim() != 2:
            raise ConfigError(f"Matcher takes an IoU matrix [num_gt, num_anchors], got shape {tuple(iou.shape)}")
        if iou.shape[0] == 0:
            return torch.full((iou.shape[1],), BELOW_LOW_THRESHOLD, dtype=torch.long, device=iou.device)
        best, matches = iou.max(dim=0)
        out = matches.clone()
        out[best < self.low] = BELOW_LOW_THRESHOLD
        out[(best >= self.low) & (best < self.high)] = BETWEEN_THRESHOLDS
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1, keepdim=True).values
            # a box with IoU 0 everywhere (e.g. outside the image) has no anchor worth claiming
            claim = ((iou == best_per_gt) & (best_per_gt > 0)).any(dim=0)
            out[claim] = matches[claim]
        return out

    def match(self, anchors: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """Match ``anchors [A, 4]`` to ``gt_boxes [n, 4]`` (both xyxy)."""
        return self(box_iou(gt_boxes.to(anchors.dtype), anchors))


def check_targets(targets: Sequence[Mapping[str, torch.Tensor]], batch: int, num_classes: int | None = None) -> None:
    """Refuse a target list that does not have one ``{"boxes": [n, 4], "labels": [n]}`` per image."""
    if not isinstance(targets, (list, tuple)):
        what = f"a tensor {list(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ConfigError(f"detection targets must be a list of one dict per image ({{'boxes': FloatTensor[n, 4], "
                          f"'labels': LongTensor[n]}}), got {what}")
    if len(targets) != batch:
        raise ConfigError(f"need one target dict per image: {batch} images, {len(targets)} targets")
    for i, t in enumerate(targets):
        if not isinstance(t, Mapping) or "boxes" not in t or "labels" not in t:
            have = f"keys {sorted(t)}" if isinstance(t, Mapping) else f"a {type(t).__name__}"
            raise ConfigError(f"target {i} must be a dict with 'boxes' (FloatTensor[n, 4], xyxy pixels) and "
                              f"'labels' (LongTensor[n]); it is {have}")
        b, lab = t["boxes"], t["labels"]
        if not isinstance(b, torch.Tensor) or not isinstance(lab, torch.Tensor):
            raise ConfigError(f"target {i}: boxes and labels must be tensors, got {type(b).__name__} and "
                              f"{type(lab).__name__}")
        if b.dim() != 2 or b.shape[1] != 4 or lab.dim() != 1 or lab.shape[0] != b.shape[0]:
            raise ConfigError(f"target {i}: boxes must be [n, 4] and labels [n], got {tuple(b.shape)} and "
                              f"{tuple(lab.shape)}")
        if num_classes is not None and lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise ConfigError(f"target {i}: labels must lie in 0..{num_classes - 1}, got "
                              f"{int(lab.min())}..{int(lab.max())}")


def _check_outputs(cls_logits: torch.Tensor, box_deltas: torch.Tensor, anchors: torch.Tensor, box_loss: str) -> None:
    if box_loss not in BOX_LOSSES:
        raise ConfigError(f"unknown box_loss {box_loss!r}; choose one of {BOX_LOSSES}")
    if cls_logits.dim() != 3:
        raise ConfigError(f"cls_logits must be [B, A, C], got shape {tuple(cls_logits.shape)}")
    b, a, c = cls_logits.shape
    if box_deltas.shape != (b, a, 4):
        raise ConfigError(f"box_deltas must be [B, A, 4] = {(b, a, 4)} to match cls_logits, got "
                          f"{tuple(box_deltas.shape)}")
    if anchors.shape != (a, 4):
        raise ConfigError(f"anchors must be [A, 4] = {(a, 4)}, got {tuple(anchors.shape)}")


def _match_batch(anchors: torch.Tensor, targets: Sequence[Mapping[str, torch.Tensor]], matcher: Matcher,
                 b: int, device: torch.device):
    """Match every image's boxes to the anchors: (valid anchors [B, A], and for the positive anchors their
    image index, anchor index, matched box and label, concatenated; None when there is no positive)."""
    valid = torch.ones(b, anchors.shape[0], dtype=torch.bool, device=device)
    fg: list[tuple[torch.Tensor, ...]] = []
    for i, t in enumerate(targets):
        gt = t["boxes"].to(device=anchors.device, dtype=torch.float32)
        labels = t["labels"].to(device=device, dtype=torch.long)
        proper = (gt[:, 2] > gt[:, 0]) & (gt[:, 3] > gt[:, 1])  # a zero-size box has no log-size target
        if not bool(proper.all()):
            gt, labels = gt[proper], labels[proper]
        m = matcher.match(anchors, gt)
        valid[i] = m != BETWEEN_THRESHOLDS
        pos = torch.nonzero(m >= 0).flatten()
        if pos.numel():
            fg.append((torch.full_like(pos, i), pos, gt[m[pos]], labels[m[pos]]))
    positives = tuple(torch.cat(parts) for parts in zip(*fg)) if fg else None
    return valid, positives


def _box_term(pred: torch.Tensor, gt: torch.Tensor, anchors: torch.Tensor, coder: BoxCoder, box_loss: str,
              beta: float) -> torch.Tensor:
    """Summed box loss of the positive anchors."""
    if box_loss == "giou":
        return (1.0 - paired_generalized_box_iou(coder.decode(pred, anchors), gt)).sum()
    target = coder.encode(gt, anchors)
    if box_loss == "l1":
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, reduction="sum", beta=beta)


def retinanet_loss(cls_logits: torch.Tensor, box_deltas: torch.Tensor, anchors: torch.Tensor,
                   targets: Sequence[Mapping[str, torch.Tensor]], box_loss: str = "smooth_l1", *,
                   matcher: Matcher | None = None, box_coder: BoxCoder | None = None,
                   focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                   smooth_l1_beta: float = 1.0 / 9) -> dict[str, torch.Tensor]:
    """RetinaNet loss for a batch.

    Args:
        cls_logits: ``[B, A, C]`` class logits (sigmoid, no background class).
        box_deltas: ``[B, A, 4]`` regression outputs (:class:`BoxCoder` parameterisation).
        anchors: ``[A, 4]`` xyxy anchors shared by the batch.
        targets: per image ``{"boxes": [n, 4] xyxy pixels, "labels": [n] in 0..C-1}``; ``n`` may be 0.
        box_loss: ``"smooth_l1"`` (on the deltas, beta ``smooth_l1_beta``, Detectron's 0.11), ``"l1"``
            (torchvision's choice) or ``"giou"`` (``1 - GIoU`` of the decoded box and the target).

    Returns ``{"cls": ..., "box": ...}``: focal loss summed over all non-ignored anchors and classes,
    box loss summed over positive anchors, both divided by ``max(1, number of positive anchors in the
    batch)``. Normalising by the batch total (Detectron2) rather than per image (torchvision) keeps the
    weight of an object independent of how crowded its image is.
    """
    _check_outputs(cls_logits, box_deltas, anchors, box_loss)
    b, _, c = cls_logits.shape
    check_targets(targets, b, c)
    anchors = anchors.to(device=cls_logits.device, dtype=torch.float32)
    valid, positives = _match_batch(anchors, targets, Matcher() if matcher is None else matcher, b,
                                    cls_logits.device)
    num_pos = 0 if positives is None else int(positives[1].numel())
    norm = float(max(1, num_pos))

    # Focal loss without a [B, A, C] one-hot target: every (valid anchor, class) pair as a negative,
    # then, for the few positive pairs, the positive term in place of the negative one.
    x = cls_logits.float()
    cls = (_focal_term(x, False, focal_alpha, focal_gamma).sum(-1) * valid).sum()
    if positives is None:
        box = box_deltas.float().sum() * 0.0  # keeps the graph (and DDP's used-parameter set) intact
        return {"cls": cls / norm, "box": box}
    img, anc, gt, lab = positives
    xp = x[img, anc, lab]
    cls = cls + (_focal_term(xp, True, focal_alpha, focal_gamma) - _focal_term(xp, False, focal_alpha, focal_gamma)).sum()
    coder = BoxCoder() if box_coder is None else box_coder
    box = _box_term(box_deltas[img, anc].float(), gt, anchors[anc], coder, box_loss, smooth_l1_beta)
    return {"cls": cls / norm, "box": box / norm}
