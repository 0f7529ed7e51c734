"""Turning a :class:`TrainConfig` into live objects: device, seeds, datasets, learner.

Shared by the trainer and by ``manlearn eval`` so that a checkpoint is always rebuilt by exactly
the code that trained it.
"""

from __future__ import annotations

from typing import Any

import torch

from manlearn.config import TrainConfig
from manlearn.errors import ConfigError
from manlearn.runtime import amp_dtype, resolve_device, seed_everything

__all__ = ["resolve_device", "seed_everything", "amp_dtype", "build_learner", "load_split", "make_loader"]


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


def build_learner(cfg: TrainConfig, info: Any, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The :class:`~manlearn.LocalLearner` described by ``cfg`` for a dataset described by ``info``.

    Shapes and normalisation come from the dataset (``info``), never from the config, so a recipe
    cannot disagree with its data.
    """
    import manlearn

    dev = torch.device(device)
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

