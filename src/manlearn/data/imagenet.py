"""ImageNet-scale class-per-folder data, streamed from disk (SPEC.md section 5, ImageNet rows).

ImageNet does not fit in memory as uint8 tensors, so unlike every other dataset here it is not loaded
up front: :func:`index_image_folder` lists the files (``<root>/train/<class>/<image>`` and
``<root>/val/<class>/<image>``, the layout of the usual ImageNet preparation scripts) and
:class:`StreamingLoader` decodes them with Pillow (Pillow-SIMD when it is installed in its place) in
``torch.utils.data.DataLoader`` worker processes, into pinned uint8 batches that are normalised on the
training device.

Training: random-resized-crop (scale 0.08-1, aspect 3/4-4/3, torchvision's algorithm) to ``size`` and a
horizontal flip with probability 1/2. Evaluation: resize the shorter side to ``resize`` (256) and take
the centre ``size`` (224) crop. Both are one Pillow ``resize(box=...)`` call per image. JPEGs are
decoded at a reduced scale (``Image.draft``) when that still leaves enough pixels.

Like :class:`~manlearn.data.BatchLoader`, batch ``b`` of epoch ``e`` is a pure function of
``(seed, e, b)``: the permutation comes from ``(seed, e)`` and each image's crop and flip from
``(seed, e, index)``, whatever the number of workers, so resuming mid-epoch is exact.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from manlearn.errors import ConfigError, DatasetError

from .info import DatasetInfo, candidate_dirs, get_dataset_info
from .loader import EpochOrder, derive_seed

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "STREAMING_DATASETS", "FolderIndex", "index_image_folder",
           "StreamingLoader", "decode_image", "random_resized_crop_box", "center_crop_box"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Datasets that are streamed from disk rather than loaded into memory.
STREAMING_DATASETS = ("imagenet",)
DEFAULT_CROP = 224
EVAL_RESIZE_RATIO = 256 / 224  # resize 256, centre-crop 224

_TAG_PERM, _TAG_AUG = 11, 12


@dataclass
class FolderIndex:
    """One split of a class-per-folder dataset, as a list of files: what the streaming loader reads."""

    samples: list[tuple[str, int]]
    info: DatasetInfo
    classes: tuple[str, ...]
    source: str = ""  # the split's folder

    def __len__(self) -> int:
        return len(self.samples)


def _error(split: str, problem: str, searched: Sequence[str]) -> DatasetError:
    info = get_dataset_info("imagenet")
    return DatasetError(f"dataset 'imagenet' ({split} split): {problem}\n"
                        f"  folders searched: {', '.join(searched) or '(none: pass data_dir=... or set $MANLEARN_DATA)'}\n"
                        f"  how to get it: {info.how_to_get}")


def _images_in(folder: str) -> list[str]:
    from .formats import IMAGE_EXTENSIONS

    out = []
    for root, subdirs, files in os.walk(folder, followlinks=True):
        subdirs.sort()
        out.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
    return out


def index_image_folder(split: str = "train", data_dir: str | os.PathLike[str] | None = None,
                       limit: int | None = None, image_size: int | None = None,
                       name: str = "imagenet") -> FolderIndex:
    """List ``<root>/train/<class>/*`` (or ``val/`` / ``test/`` for ``split="test"``); classes are the
    sorted sub-folders of ``train/`` so labels agree between splits. ``limit`` keeps the first N files
    after a seeded shuffle (so a small limit still sees many classes)."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    size = DEFAULT_CROP if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ConfigError(f"image_size must be an integer >= 8 for {name}, got {image_size!r}")
    dirs = candidate_dirs(name, data_dir)
    root = next((d for d in dirs if os.path.isdir(os.path.join(d, "train"))), None)
    if root is None:
        raise _error(split, "no folder with a train/ sub-folder found", dirs)
    train_dir = os.path.join(root, "train")
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise _error(split, f"{train_dir} has no class sub-folders", [root])
    if split == "train":
        split_dir = train_dir
    else:
        split_dir = next((os.path.join(root, s) for s in ("val", "test") if os.path.isdir(os.path.join(root, s))), "")
        if not split_dir:
            raise _error(split, f"{root} has neither val/ nor test/", [root])
        extra = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and e.name not in classes)
        if extra:
            raise _error(split, f"{split_dir} has classes absent from train/ (is val/ sorted into class "
                                f"folders?): {extra[:5]}", [root])
    samples: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        d = os.path.join(split_dir, cls)
        if os.path.isdir(d):
            samples.extend((p, label) for p in _images_in(d))
    if not samples:
        raise _error(split, f"no image files in the class folders of {split_dir}", [root])
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
        samples = [samples[i] for i in spread_subset(len(samples), limit)]
    info = dataclasses.replace(get_dataset_info(name), num_classes=len(classes), image_size=size)
    return FolderIndex(samples, info, tuple(classes), split_dir)


def spread_subset(n: int, limit: int) -> list[int]:
    """``min(limit, n)`` indices of a class-sorted list, drawn with a fixed seed and kept in order: a small
    limit still sees many classes (the first ``limit`` would be the first classes only)."""
    return sorted(random.Random(derive_seed(_TAG_PERM, 0, -1)).sample(range(n), min(limit, n)))


# ----------------------------------------------------------------------------------------- transforms


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) of torchvision's RandomResizedCrop: 10 tries of a random area and log-uniform
    aspect ratio, then a centre crop clamped to the ratio range."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, size: int, resize: int) -> tuple[float, float, float, float]:
    """(left, top, w, h) in source pixels of "resize the shorter side to ``resize``, centre-crop ``size``"."""
    s = min(width, height) / resize  # source pixels per resized pixel
    w = h = min(size * s, width, height)
    return (width - w) / 2, (height - h) / 2, w, h


def decode_image(path: str, size: int, train: bool, rng: random.Random | None = None,
                 resize: int | None = None) -> torch.Tensor:
    """One file -> uint8 ``[3, size, size]`` (RGB) with the train or eval transform."""
    from PIL import Image

    resize = resize or int(round(size * EVAL_RESIZE_RATIO))
    try:
        with Image.open(path) as im:
            if not train and getattr(im, "format", None) == "JPEG":
                im.draft("RGB", (resize, resize))  # decode at 1/2, 1/4, 1/8 scale when still >= resize
            im = im.convert("RGB")
            w, h = im.size
            if train:
                left, top, cw, ch = random_resized_crop_box(w, h, rng or random.Random(0))
            else:
                left, top, cw, ch = center_crop_box(w, h, size, resize)
            im = im.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
            if train and (rng or random.Random(0)).random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # UnidentifiedImageError, truncated files, ...
        raise DatasetError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class _FolderDataset(Dataset):
    """Keys are ``(epoch, index)`` so each image's augmentation depends on (seed, epoch, index) only."""

    def __init__(self, samples: list[tuple[str, int]], size: int, train: bool, seed: int) -> None:
        self.samples, self.size, self.train, self.seed = samples, size, train, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        path, label = self.samples[index]
        rng = random.Random(derive_seed(_TAG_AUG, self.seed, epoch, index)) if self.train else None
        return decode_image(path, self.size, self.train, rng), label


class StreamingLoader(EpochOrder):
    """The :class:`~manlearn.data.BatchLoader` interface (``len``, ``epoch(e, start_batch)``) over a
    :class:`FolderIndex`, decoding in ``workers`` processes into pinned uint8 batches.

    Yields ``(x, y)``: float32 images normalised with the dataset's mean/std and int64 labels, on ``device``.
    """

    perm_tag = _TAG_PERM

    def __init__(self, data: FolderIndex, batch_size: int, *, train: bool, shuffle: bool | None = None,
                 drop_last: bool | None = None, device: str | torch.device = "cpu", seed: int = 0,
                 channels_last: bool = False, workers: int | None = None, pin_memory: bool | None = None,
                 prefetch_factor: int = 4) -> None:
        self._setup(data.info, batch_size, train, shuffle, drop_last, device, seed, channels_last)
        self.data = data
        self.workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self.dataset = _FolderDataset(data.samples, data.info.image_size, self.train, self.seed)
        self._mean = torch.tensor(data.info.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(data.info.std, dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def num_samples(self) -> int:
        return len(self.data)

    def batches(self, epoch: int, start_batch: int = 0) -> list[list[tuple[int, int]]]:
        """The dataset keys of batches ``start_batch ..`` of ``epoch``."""
        order = self.order(epoch).tolist()
        bs, n = self.batch_size, self.num_samples
        return [[(epoch, i) for i in order[b * bs:min((b + 1) * bs, n)]] for b in range(start_batch, len(self))]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start_batch = int(epoch), int(start_batch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must lie in 0..{len(self)}, got {start_batch}")
        return self.load_batches(self.batches(epoch, start_batch))

    def load_batches(self, batches: list[list[tuple[int, int]]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decode and yield the given batches of dataset keys (``(epoch, index)``; see :meth:`batches`).
        Data parallelism passes each rank's slice of the global batches, so a rank decodes only its rows."""
        if not batches:
            return
        kw = {}
        if self.workers > 0:
            kw = dict(num_workers=self.workers, prefetch_factor=self.prefetch_factor, persistent_workers=False)
        loader = DataLoader(self.dataset, batch_sampler=batches, pin_memory=self.pin_memory, **kw)
        mean, std = self._mean.to(self.device), self._std.to(self.device)
        non_blocking = self.pin_memory and self.device.type == "cuda"
        for xb, yb in loader:
            x = xb.to(self.device, non_blocking=non_blocking).float().div_(255.0).sub_(mean).div_(std)
            y = yb.to(self.device, non_blocking=non_blocking).long()
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y
