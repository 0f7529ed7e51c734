"""Object detection for the dense-task part of MAN++ (SPEC 3.4): RetinaNet in plain torch.

* :mod:`.boxes` - IoU / GIoU, the RetinaNet box coder, NMS;
* :mod:`.anchors` - anchor grids (P3..P7, or one level for a local head);
* :mod:`.losses` - focal loss, the IoU matcher, the RetinaNet loss;
* :mod:`.retinanet` - FPN, head, and :class:`RetinaNetTask` (heads + loss + predict for the engine);
* :mod:`.coco` - COCO-format data (json + images), collate and flip augmentation;
* :mod:`.evaluate` - COCO box mAP through pycocotools.
"""
from .anchors import AnchorGenerator, cell_anchors, retinanet_anchor_sizes
from .boxes import (BoxCoder, batched_nms, box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, clip_boxes,
                    generalized_box_iou, nms, paired_box_iou, paired_generalized_box_iou, remove_small_boxes)
from .coco import (CocoAnnotations, CocoDetection, DetectionBatch, DetectionSample, collate, hflip_batch,
                   load_coco_annotations, resized_size)
from .evaluate import COCO_METRICS, coco_map, predictions_to_coco
from .losses import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher, retinanet_loss, sigmoid_focal_loss
from .retinanet import (FPN, RetinaNetFinalHead, RetinaNetHead, RetinaNetLocalHead, RetinaNetTask,
                        flatten_head_output)

__all__ = ["AnchorGenerator", "cell_anchors", "retinanet_anchor_sizes",
           "BoxCoder", "batched_nms", "box_area", "box_cxcywh_to_xyxy", "box_iou", "box_xyxy_to_cxcywh",
           "clip_boxes", "generalized_box_iou", "nms", "paired_box_iou", "paired_generalized_box_iou",
           "remove_small_boxes",
           "CocoAnnotations", "CocoDetection", "DetectionBatch", "DetectionSample", "collate", "hflip_batch",
           "load_coco_annotations", "resized_size",
           "COCO_METRICS", "coco_map", "predictions_to_coco",
           "BELOW_LOW_THRESHOLD", "BETWEEN_THRESHOLDS", "Matcher", "retinanet_loss", "sigmoid_focal_loss",
           "FPN", "RetinaNetFinalHead", "RetinaNetHead", "RetinaNetLocalHead", "RetinaNetTask",
           "flatten_head_output"]
