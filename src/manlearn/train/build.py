"""Turning a :class:`TrainConfig` into live objects: device, seeds, datasets, learner.

Shared by the trainer and by ``manlearn eval`` so that a checkpoint is always rebuilt by exactly
the code that trained it.
"""

from __future__ import annotations

from typing import Any

import torch

from manlearn.config import TrainConfig
from manlearn.errors import ConfigError
from manlearn.data import (STREAMING_DATASETS, BatchLoader, FolderIndex, StreamingLoader, index_image_folder,
                           load_dataset)
from manlearn.learner import LocalLearner
from manlearn.plugins import import_user_code
from manlearn.rules import create_rule
from manlearn.runtime import amp_dtype, resolve_device, seed_everything

from .registry import get_task

__all__ = ["resolve_device", "seed_everything", "amp_dtype", "build_learner", "build_task", "load_split",
           "make_loader", "normalization", "IGNORE_INDEX"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Label of the pixels a segmentation loss and metric ignore.
IGNORE_INDEX = 255


def load_split(cfg: TrainConfig, split: str, limit: int | None) -> Any:
    """One split of ``cfg.dataset`` as :class:`~manlearn.data.ImageData`, or for a streamed dataset
    (imagenet) as a :class:`~manlearn.data.FolderIndex` of its files (DatasetError if missing)."""
    if cfg.dataset in STREAMING_DATASETS:
        return index_image_folder(split, data_dir=cfg.data_dir, limit=limit, image_size=cfg.image_size,
                                  name=cfg.dataset)

    # image_size is passed through: the data package refuses a size that a dataset cannot give.
    return load_dataset(cfg.dataset, split=split, data_dir=cfg.data_dir, limit=limit,
                        image_size=cfg.image_size)


def make_loader(cfg: TrainConfig, data: Any, *, train: bool, device: torch.device) -> Any:
    """A :class:`~manlearn.data.BatchLoader` (or :class:`~manlearn.data.StreamingLoader` for a streamed
    dataset); training batches depend only on (seed, epoch, index)."""
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
    """The engine task object (final head, loss, post-processing, local head) of ``cfg.task``."""
    return get_task(cfg.task.name).build(cfg, num_classes)


#: The probe input side of stage-reading tasks (any size trains; this only measures channels and strides).
DENSE_PROBE_SIZE = 64


def build_learner(cfg: TrainConfig, info: Any, device: torch.device | str = "cpu", *,
                  load_pretrained: bool = True) -> torch.nn.Module:
    """The :class:`~manlearn.LocalLearner` described by ``cfg`` for data described by ``info`` (every task:
    the one place a learner is constructed).

    The task (:func:`~manlearn.train.registry.get_task`) builds the engine task and gives the data side of
    the learner: shapes and normalisation come from the data (``info``), never from the config, so a
    recipe cannot disagree with its data.
    A modifier (``man``/``manpp``) left on the classification default ``base=infopro`` takes the task's
    default base on a task without per-image labels (``greedy``).
    """
    dev = torch.device(device)
    import_user_code(cfg.imports)
    spec = get_task(cfg.task.name)
    task = spec.build(cfg, info.num_classes)
    method = cfg.method
    base = cfg.base if (task.per_image_labels or cfg.base != "infopro") else None
    options = dict(spec.learner_options(cfg, info))
    model_kwargs: dict[str, Any] = {}
    if cfg.pretrained and load_pretrained:
        model_kwargs.update(pretrained=cfg.pretrained, pretrained_head=cfg.pretrained_head)
    model_kwargs.update(options.pop("model_kwargs", {}))
    learner = LocalLearner(
        model=cfg.model, method=method, K=cfg.K, task=task, amp_dtype=amp_dtype(cfg.amp, dev),
        channels_last=cfg.channels_last, blocks_in_flight=cfg.blocks_in_flight, model_kwargs=model_kwargs,
        **options, **rule_options(cfg, method, base, task))
    return learner.to(dev)


#: config keys that are options of some rules (config key -> rule option), passed to the rules that take them
RULE_KEYS = {"base": "base", "momentum": "momentum", "init": "init", "lambda_schedule": "lambda_schedule",
             "infopro_heads": "heads", "ema_recompute": "ema_recompute", "fidelity": "fidelity",
             "authors_init": "authors_init"}


def rule_options(cfg: TrainConfig, method: str, base: str | None, task: Any) -> dict[str, Any]:
    """The rule options of ``cfg``: its rule keys that the rule in use (and its base) take, as recipes set
    them for every method, then ``cfg.rule_options``, refused by the learner when no rule in use takes them."""
    config_key = {opt: key for key, opt in RULE_KEYS.items()}
    for opt in cfg.rule_options:  # one place for each setting: the config key (recorded, checked on resume)
        if opt in config_key:
            raise ConfigError(f"rule_options sets {opt!r}, which the config key {config_key[opt]!r} sets: give "
                              f"{config_key[opt]}=... instead (rule_options is for options without a config key)")
    accepted = create_rule(method, {"base": base} if base else {}, task=task).accepted_options()
    for key in ("fidelity", "authors_init"):  # set for this run, not by every recipe: refused where meaningless
        if getattr(cfg, key) not in ("default", False) and RULE_KEYS[key] not in accepted:
            raise ConfigError(f"{key}={getattr(cfg, key)} is an option of man/manpp; method {method!r} does not take it")
    opts = {opt: getattr(cfg, key) for key, opt in RULE_KEYS.items() if opt in accepted}
    if base is None:
        opts.pop("base", None)
    return {**opts, **dict(cfg.rule_options)}
