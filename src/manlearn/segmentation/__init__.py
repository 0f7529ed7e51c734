"""Semantic segmentation for manlearn: DeepLabV3(+) task heads, datasets (mask folders such as the
Fashion-MNIST mosaic, Cityscapes), batched augmentation and confusion-matrix metrics.

The engine is :class:`manlearn.LocalLearner` and the loop :class:`manlearn.train.Trainer`; this package supplies what is specific
to segmentation.

Public API::

    from manlearn.segmentation import (DeepLabV3Task, ConfusionMatrix, SegmentationData, load_mask_folder,
                                       load_cityscapes, load_segmentation, SegmentationAugment)
"""

from .datasets import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_TO_TRAIN,
    SegmentationAugment,
    SegmentationData,
    cityscapes_lut,
    load_cityscapes,
    load_mask_folder,
    load_segmentation,
)
from .deeplab import ASPP, DEFAULT_ATROUS_RATES, DeepLabV3Head, DeepLabV3Task, LocalSegHead
from .metrics import ConfusionMatrix

__all__ = [
    "DeepLabV3Task",
    "DeepLabV3Head",
    "LocalSegHead",
    "ASPP",
    "DEFAULT_ATROUS_RATES",
    "ConfusionMatrix",
    "SegmentationData",
    "SegmentationAugment",
    "load_mask_folder",
    "load_cityscapes",
    "load_segmentation",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_TO_TRAIN",
    "cityscapes_lut",
]
