"""Turning a :class:`TrainConfig` into live objects: device, seeds, datasets, learner.

Shared by the trainer and by ``manlearn eval`` so that a checkpoint is always rebuilt by exactly
the code that trained it.
"""

from __future__ import annotations

from typing import Any

import torch

from manlearn.config import TrainConfig
from manlearn.runtime import amp_dtype, resolve_device, seed_everything

__all__ = ["resolve_device", "seed_everything", "amp_dtype", "build_learner", "build_task", "load_split",
           "make_loader", "normalization", "IGNORE_INDEX"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Label of the pixels a segmentation loss and metric ignore.
IGNORE_INDEX = 255


def load_split(cfg: TrainConfig, split: str, limit: int | None) -> Any:
    """One split of ``cfg.dataset`` as :class:`~manlearn.data.ImageData`, or for a streamed dataset
    (imagenet) as a :class:`~manlearn.data.FolderIndex` of its files (DatasetError if missing)."""
    from manlearn.data import STREAMING_DATASETS, index_image_folder, load_dataset

    if cfg.dataset in STREAMING_DATASETS:
        return index_image_folder(split, data_dir=cfg.data_dir, limit=limit, image_size=cfg.image_size,
                                  name=cfg.dataset)

    # image_size is passed through: the data package refuses a size that a dataset cannot give.
    return load_dataset(cfg.dataset, split=split, data_dir=cfg.data_dir, limit=limit,
                        image_size=cfg.image_size)


def make_loader(cfg: TrainConfig, data: Any, *, train: bool, device: torch.device) -> Any:
    """A :class:`~manlearn.data.BatchLoader` (or :class:`~manlearn.data.StreamingLoader` for a streamed
    dataset); training batches depend only on (seed, epoch, index)."""
    from manlearn.data import BatchLoader, FolderIndex, StreamingLoader

    if isinstance(data, FolderIndex):
        return StreamingLoader(data, cfg.batch_size if train else cfg.eval_batch_size, train=train,
                               device=device, seed=cfg.seed, channels_last=cfg.channels_last,
                               workers=cfg.data_workers)

    return BatchLoader(data, cfg.batch_size if train else cfg.eval_batch_size, train=train,
                       device=device, seed=cfg.seed, channels_last=cfg.channels_last)


def normalization(cfg: TrainConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a dense task's input normalisation (``task.normalize``)."""
    return (IMAGENET_MEAN, IMAGENET_STD) if cfg.task.normalize == "imagenet" else ((0.5,) * 3, (0.5,) * 3)


def build_task(cfg: TrainConfig, num_classes: int) -> Any:
    """The dense task object (heads, loss, post-processing) of ``cfg.task``."""
    t = cfg.task
    if t.name == "detection":
        from manlearn.detection import RetinaNetTask

        return RetinaNetTask(num_classes, fpn_channels=t.fpn_channels, head_convs=t.head_convs,
                             box_loss=t.box_loss, local_channels=t.local_channels, norm=t.head_norm)
    from manlearn.segmentation import DeepLabV3Task

    return DeepLabV3Task(num_classes, ignore_index=IGNORE_INDEX, aspp_channels=t.aspp_channels,
                         decoder=t.decoder, local_channels=t.local_channels)


def build_learner(cfg: TrainConfig, info: Any, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The learner described by ``cfg`` for data described by ``info`` (every task: the one place a
    learner is constructed).

    Classification: a :class:`~manlearn.LocalLearner`; shapes and normalisation come from the dataset
    (``info``: a :class:`~manlearn.data.DatasetInfo`), never from the config, so a recipe cannot
    disagree with its data.  Detection / segmentation: a :class:`~manlearn.dense.DenseLocalLearner`
    around the task's heads (``info.num_classes``).
    """
    dev = torch.device(device)
    if cfg.is_dense:
        from manlearn.dense.learner import DenseLocalLearner

        t = cfg.task
        kwargs: dict[str, Any] = {}
        if t.model_widths is not None:
            kwargs["widths"] = tuple(t.model_widths)
        if t.stem_width is not None:
            kwargs["stem_width"] = t.stem_width
        mean, std = normalization(cfg)
        dense = DenseLocalLearner(
            build_task(cfg, info.num_classes), model=cfg.model, method=cfg.method,
            K=1 if cfg.method == "e2e" else cfg.K,
            stage_cuts=list(t.stage_cuts) if t.stage_cuts is not None and cfg.method != "e2e" else None,
            momentum=cfg.momentum, init=cfg.init, norm_mean=mean, norm_std=std,
            channels_last=cfg.channels_last, amp_dtype=amp_dtype(cfg.amp, dev), model_kwargs=kwargs)
        return dense.to(dev)

    import manlearn

    split: Any = cfg.split
    if not isinstance(split, str):
        split = [tuple(b) if isinstance(b, (list, tuple)) else b for b in split]
    learner = manlearn.LocalLearner(
        model=cfg.model, method=cfg.method, base=cfg.base, K=cfg.K,
        num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size,
        split=split, stem_module=cfg.stem_module, momentum=cfg.momentum, init=cfg.init,
        lambda_schedule=cfg.lambda_schedule, infopro_heads=cfg.infopro_heads,
        norm_mean=tuple(info.mean), norm_std=tuple(info.std),
        amp_dtype=amp_dtype(cfg.amp, dev), channels_last=cfg.channels_last,
        ema_recompute=cfg.ema_recompute, grad_checkpoint=cfg.grad_checkpoint,
    )
    return learner.to(dev)
