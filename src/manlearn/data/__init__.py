"""Datasets, batched transforms and a resumable loader for manlearn.

Everything is held as uint8 and transformed per batch on the training device; see SPEC sections 5, 7, 8.

Public API::

    from manlearn.data import (DatasetInfo, ImageData, list_datasets, get_dataset_info, dataset_files,
                               load_dataset, BatchTransform, BatchLoader)
"""

from .datasets import load_dataset
from .info import DatasetInfo, ImageData, dataset_files, get_dataset_info, list_datasets
from .loader import BatchLoader
from .imagenet import STREAMING_DATASETS, FolderIndex, StreamingLoader, index_image_folder
from .transforms import AUGMENTATIONS, Augment, BatchTransform, augmentation_for

__all__ = [
    "DatasetInfo",
    "ImageData",
    "list_datasets",
    "get_dataset_info",
    "dataset_files",
    "load_dataset",
    "BatchTransform",
    "BatchLoader",
    "Augment",
    "AUGMENTATIONS",
    "augmentation_for",
    "STREAMING_DATASETS",
    "FolderIndex",
    "StreamingLoader",
    "index_image_folder",
]
