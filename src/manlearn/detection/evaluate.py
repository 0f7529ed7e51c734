"""COCO box mAP with pycocotools' ``COCOeval`` (the number detection papers report)."""
from __future__ import annotations

import contextlib
import io
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import ConfigError, optional_import
from .coco import CocoAnnotations, CocoDetection, load_coco_annotations

__all__ = ["coco_map", "COCO_METRICS", "predictions_to_coco"]

#: The twelve numbers of ``COCOeval.summarize()``, in its order.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def predictions_to_coco(ann: CocoAnnotations, predictions: Mapping[int, Mapping[str, Any]],
                        scales: Mapping[int, tuple[float, float]] | None = None,
                        sizes: Mapping[int, tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """COCO result dicts (``image_id``, ``category_id``, ``bbox`` as ``[x, y, w, h]`` in original pixels,
    ``score``) from per-image ``{"boxes" xyxy, "scores", "labels" 0..C-1}``. Boxes are divided by the
    image's ``scale = (sx, sy)`` (default 1) and clipped to its original ``(h, w)`` when known."""
    cats = ann.label_to_category
    out: list[dict[str, Any]] = []
    for image_id, pred in predictions.items():
        image_id = int(image_id)
        if image_id not in ann.index_of:
            raise ConfigError(f"prediction for image id {image_id}, which is not in {ann.ann_file}")
        for key in ("boxes", "scores", "labels"):
            if key not in pred:
                raise ConfigError(f"prediction of image {image_id} lacks {key!r} (need boxes, scores, labels)")
        boxes = _as_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = _as_numpy(pred["scores"]).astype(np.float64).reshape(-1)
        labels = _as_numpy(pred["labels"]).astype(np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ConfigError(f"prediction of image {image_id}: {len(boxes)} boxes, {len(scores)} scores, "
                              f"{len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(cats)):
            raise ConfigError(f"prediction of image {image_id}: labels must lie in 0..{len(cats) - 1}")
        sx, sy = scales.get(image_id, (1.0, 1.0)) if scales is not None else (1.0, 1.0)
        boxes = boxes / np.array([sx, sy, sx, sy])
        hw = sizes.get(image_id) if sizes is not None else None
        if hw is not None:
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, hw[1])
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, hw[0])
        for (x1, y1, x2, y2), s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            out.append({"image_id": image_id, "category_id": cats[lab], "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": s})
    return out


def coco_map(dataset_or_ann_file: CocoDetection | CocoAnnotations | str | os.PathLike,
             predictions: Mapping[int, Mapping[str, Any]], image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCO bbox metrics of ``predictions`` (image id -> ``{"boxes" xyxy, "scores", "labels" 0..C-1}``).

    With a :class:`CocoDetection`, boxes are in its resized pixels (what :meth:`RetinaNetTask.predict`
    returns for its batches) and are mapped back with each image's scale; with an annotation file they
    must already be in original pixels. Labels are mapped back to category ids. ``image_ids`` restricts
    the evaluation (default: every image of the dataset, so a missing prediction counts as a miss).

    Returns the twelve :data:`COCO_METRICS` as floats in [0, 1] (pycocotools' -1 for "no ground truth
    in this size range" is kept). No detections at all give 0 everywhere instead of pycocotools'
    crash. pycocotools' prints are captured.
    """
    COCO = optional_import("pycocotools.coco", "detection", "COCO box mAP").COCO
    COCOeval = optional_import("pycocotools.cocoeval", "detection", "COCO box mAP").COCOeval

    scales: dict[int, tuple[float, float]] | None = None
    sizes: dict[int, tuple[int, int]] | None = None
    if isinstance(dataset_or_ann_file, CocoDetection):
        ds = dataset_or_ann_file
        ann = ds.annotations
        default_ids = ds.image_ids
        wanted = {int(i) for i in (image_ids if image_ids is not None else default_ids)} | \
            {int(i) for i in predictions}
        idx = [ann.index_of[i] for i in wanted if i in ann.index_of]
        scales = {ann.image_ids[i]: ds.scale_of(i) for i in idx}
        sizes = {ann.image_ids[i]: ds.original_size(i) for i in idx}
    elif isinstance(dataset_or_ann_file, CocoAnnotations):
        ann = dataset_or_ann_file
        default_ids = ann.image_ids
    else:
        ann = load_coco_annotations(dataset_or_ann_file)
        default_ids = ann.image_ids
    if sizes is None:
        sizes = {iid: hw for iid, hw in zip(ann.image_ids, ann.sizes) if hw is not None}
    eval_ids = [int(i) for i in (image_ids if image_ids is not None else default_ids)]
    unknown = [i for i in eval_ids if i not in ann.index_of]
    if unknown:
        raise ConfigError(f"image ids {unknown[:5]} are not in {ann.ann_file}")

    results = predictions_to_coco(ann, predictions, scales, sizes)
    if not results:
        return {k: 0.0 for k in COCO_METRICS}
    gt_sizes = [sizes.get(i) or (1, 1) for i in ann.image_ids]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ann.coco_gt_dict(gt_sizes)
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = eval_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(COCO_METRICS, ev.stats)}
