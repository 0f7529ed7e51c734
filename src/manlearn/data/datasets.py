"""``load_dataset``: find a dataset's files, parse them, and hand back a uint8 :class:`ImageData`.

Every failure (nothing found, a file truncated, a wrong magic number, mismatched counts, ...) becomes a
:class:`~manlearn.errors.DatasetError` whose message names the dataset, the files expected, the folders
searched and how to get the data, because that is what a user needs to fix it.
"""

from __future__ import annotations

import dataclasses
import warnings
import os
from typing import Callable

import numpy as np
import torch

from manlearn.errors import ConfigError, DatasetError, optional_import

from . import formats
from .formats import FormatProblem
from .imagenet import spread_subset
from .info import ENV_DATA_DIR, DatasetInfo, ImageData, candidate_dirs, dataset_files, get_dataset_info

__all__ = ["load_dataset", "DEFAULT_IMAGEFOLDER_SIZE"]

#: Resize target for imagefolder images when ``image_size`` is not given.
DEFAULT_IMAGEFOLDER_SIZE = 32

_SPLITS = ("train", "test")


def _describe_dir(d: str) -> str:
    if os.path.isdir(d):
        return d
    return f"{d} (does not exist)" if not os.path.exists(d) else f"{d} (not a folder)"


def _error(name: str, split: str, problem: str, searched: list[str] | None) -> DatasetError:
    """The one message format for every dataset problem: what is wrong, what is needed, where we looked."""
    info = get_dataset_info(name)
    lines = [
        f"dataset {name!r} ({split} split): {problem}",
        f"  files expected: {', '.join(dataset_files(name, split))}",
        "  folders searched: "
        + (
            ", ".join(_describe_dir(d) for d in searched)
            if searched
            else "(none: data ships with scikit-learn)"
            if searched is None
            else f"(none: pass data_dir=... or set ${ENV_DATA_DIR})"
        ),
        f"  how to get it: {info.how_to_get}",
    ]
    return DatasetError("\n".join(lines))


def _find(names: list[str], folder: str, gz_ok: bool) -> tuple[list[str], list[str]]:
    """(paths found, names missing) for ``names`` inside ``folder``; raw is preferred over .gz."""
    found, missing = [], []
    for n in names:
        options = [n, n + ".gz"] if gz_ok else [n]
        hit = next((os.path.join(folder, o) for o in options if os.path.isfile(os.path.join(folder, o))), None)
        if hit is None:
            missing.append(n + "[.gz]" if gz_ok else n)
        else:
            found.append(hit)
    return found, missing


def _locate(name: str, split: str, names: list[str], dirs: list[str], gz_ok: bool = False) -> list[str]:
    """The files of the first folder in ``dirs`` that holds all of ``names``."""
    for d in dirs:
        found, missing = _find(names, d, gz_ok)
        if not missing:
            return found
        if found:  # a folder with some of the files is a broken copy: never completed from another copy
            raise _error(name, split, f"{d} holds {', '.join(os.path.basename(f) for f in found)} but lacks "
                         f"{', '.join(missing)}; the data is not taken from another copy (put the missing files "
                         "there, or pass data_dir=)", dirs)
        if _holds_other_split(name, d):
            # a copy with the other split only: never take this split from another copy (silent mixing)
            raise _error(name, split, f"{d} holds the other split's files but lacks {', '.join(missing)}; this "
                         "split is not taken from another copy (put the missing files there, or pass data_dir=)",
                         dirs)
    raise _error(name, split, "files not found", dirs)


def _holds_other_split(name: str, folder: str) -> bool:
    """Whether ``folder`` holds any file of ``name`` (either split): it is a copy of that dataset."""
    files = [f[: -len("[.gz]")] if f.endswith("[.gz]") else f for f in dataset_files(name)]
    found, _ = _find([os.path.basename(f) for f in files], folder, gz_ok=True)
    return bool(found)


def _limit(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def _to_data(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    limit: int | None,
    info: DatasetInfo | None = None,
    classes: tuple[str, ...] | None = None,
    source: str = "",
) -> ImageData:
    k = _limit(len(y), limit)
    # copy: detaches from read-only / larger buffers so the full file can be freed after a `limit` load
    images = torch.from_numpy(np.array(x[:k], dtype=np.uint8, order="C", copy=True))
    labels = torch.from_numpy(np.array(y[:k], dtype=np.int64, copy=True))
    return ImageData(images, labels, info or get_dataset_info(name), classes, source)


def _check_labels(y: np.ndarray, num_classes: int, what: str) -> None:
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise FormatProblem(
            f"{what}: labels must lie in 0..{num_classes - 1}, found {int(y.min())}..{int(y.max())}"
        )


# ---------------------------------------------------------------------------------------------- readers


def _load_idx(name: str, split: str, dirs: list[str], limit: int | None, size: int | None) -> ImageData:
    prefix = "train" if split == "train" else "t10k"
    img_path, lbl_path = _locate(
        name, split, [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"], dirs, gz_ok=True
    )
    try:
        x = formats.read_idx(img_path, 2051)
        y = formats.read_idx(lbl_path, 2049)
        if x.shape[1:] != (28, 28):
            raise FormatProblem(
                f"{os.path.basename(img_path)}: images are {x.shape[1]}x{x.shape[2]}, expected 28x28"
            )
        if x.shape[0] != y.shape[0]:
            raise FormatProblem(
                f"count mismatch: {os.path.basename(img_path)} holds {x.shape[0]} images but "
                f"{os.path.basename(lbl_path)} holds {y.shape[0]} labels"
            )
        _check_labels(y, 10, os.path.basename(lbl_path))
    except FormatProblem as e:
        raise _error(name, split, str(e), [os.path.dirname(img_path)]) from None
    return _to_data(name, x[:, None], y, limit, source=os.path.dirname(img_path))


def _load_cifar(name: str, split: str, dirs: list[str], limit: int | None, size: int | None) -> ImageData:
    files = [os.path.basename(f) for f in dataset_files(name, split)]
    paths = _locate(name, split, files, dirs)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    num_classes = get_dataset_info(name).num_classes
    xs, ys, have = [], [], 0
    try:
        for p in paths:
            x, y = formats.read_cifar_pickle(p, label_key)
            _check_labels(y, num_classes, os.path.basename(p))
            xs.append(x)
            ys.append(y)
            have += len(y)
            if limit is not None and have >= limit:
                break  # later batches are not needed for a smoke run
    except FormatProblem as e:
        raise _error(name, split, str(e), [os.path.dirname(paths[0])]) from None
    return _to_data(name, np.concatenate(xs), np.concatenate(ys), limit, source=os.path.dirname(paths[0]))


def _load_svhn(name: str, split: str, dirs: list[str], limit: int | None, size: int | None) -> ImageData:
    (path,) = _locate(name, split, [f"{split}_32x32.mat"], dirs)
    try:
        x, y = formats.read_svhn_mat(path)
    except FormatProblem as e:
        raise _error(name, split, str(e), [os.path.dirname(path)]) from None
    return _to_data(name, x, y, limit, source=os.path.dirname(path))


def _load_stl10(name: str, split: str, dirs: list[str], limit: int | None, size: int | None) -> ImageData:
    x_path, y_path = _locate(name, split, [f"{split}_X.bin", f"{split}_y.bin"], dirs)
    try:
        x, y = formats.read_stl10_bin(x_path, y_path)
    except FormatProblem as e:
        raise _error(name, split, str(e), [os.path.dirname(x_path)]) from None
    return _to_data(name, x, y, limit, source=os.path.dirname(x_path))


_DIGITS_TRAIN = 1500  # of 1797; the rest (297) is the test split
_DIGITS_SEED = 0


def _load_digits(name: str, split: str, dirs: list[str], limit: int | None, size: int | None) -> ImageData:
    """sklearn's 8x8 digits with a fixed-seed permutation split, so train/test never overlap or change."""
    load_digits = optional_import("sklearn.datasets", "data", "the digits dataset").load_digits
    try:
        bunch = load_digits()
    except Exception as e:  # ImportError or a broken install
        raise _error(name, split, f"scikit-learn could not load it ({type(e).__name__}: {e})", None) from None
    images = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8] in 0..16
    x = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    y = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.RandomState(_DIGITS_SEED).permutation(len(y))
    order = order[:_DIGITS_TRAIN] if split == "train" else order[_DIGITS_TRAIN:]
    return _to_data(name, x[order], y[order], limit, source="scikit-learn's bundled copy")


def _list_images(folder: str) -> list[str]:
    out = []
    for root, subdirs, files in os.walk(folder, followlinks=True):
        subdirs.sort()
        out.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(formats.IMAGE_EXTENSIONS))
    return out


def _load_imagefolder(name: str, split: str, dirs: list[str], limit: int | None, size: int | None) -> ImageData:
    size = DEFAULT_IMAGEFOLDER_SIZE if size is None else size
    root = next((d for d in dirs if os.path.isdir(os.path.join(d, "train"))), None)
    if root is None:
        raise _error(name, split, "no folder with a train/ sub-folder found", dirs)
    # Classes always come from train/ so that labels mean the same thing in both splits.
    train_dir = os.path.join(root, "train")
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise _error(name, split, f"{train_dir} has no class sub-folders", [root])
    if split == "train":
        split_dir = train_dir
    else:
        options = [os.path.join(root, s) for s in ("test", "val")]
        split_dir = next((d for d in options if os.path.isdir(d)), "")
        if not split_dir:
            raise _error(name, split, f"{root} has neither test/ nor val/", [root])
        extra = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and e.name not in classes)
        if extra:
            raise _error(name, split, f"{split_dir} has classes absent from train/: {extra}", [root])
    samples: list[tuple[str, int]] = []
    empty = []
    for label, cls in enumerate(classes):
        images = _list_images(os.path.join(split_dir, cls))
        if not images:
            empty.append(cls)
        samples.extend((p, label) for p in images)
    if empty and split == "train" and samples:  # a class nothing can teach: refuse rather than train around it
        raise _error(name, split, f"class folder(s) with no image files in {split_dir}: {', '.join(empty)} (remove "
                     "them, or add images)", [root])
    if empty and samples:
        warnings.warn(f"imagefolder {split_dir}: no images of class(es) {', '.join(empty)}", stacklevel=2)
    if not samples:
        raise _error(name, split, f"no image files in the class folders of {split_dir}", [root])
    if limit is not None:  # before decoding: smoke runs stay cheap; spread over the classes, sorted as they are
        samples = [samples[i] for i in spread_subset(len(samples), limit)]
    x = np.empty((len(samples), 3, size, size), dtype=np.uint8)
    try:
        for i, (p, _) in enumerate(samples):
            x[i] = formats.read_image_file(p, size)
    except FormatProblem as e:
        raise _error(name, split, str(e), [root]) from None
    y = np.fromiter((lbl for _, lbl in samples), dtype=np.int64, count=len(samples))
    info = dataclasses.replace(get_dataset_info(name), num_classes=len(classes), image_size=size)
    return _to_data(name, x, y, None, info=info, classes=tuple(classes), source=split_dir)


def _load_imagenet(name: str, split: str, dirs: list[str], limit: int | None, size: int | None) -> ImageData:
    raise ConfigError("imagenet is streamed from disk, not loaded into memory: use "
                      "manlearn.data.index_image_folder(...) with manlearn.data.StreamingLoader (the trainer "
                      "does this for dataset=imagenet); for a small in-memory folder use dataset 'imagefolder'")


_LOADERS: dict[str, Callable[[str, str, list[str], int | None, int | None], ImageData]] = {
    "fashion-mnist": _load_idx,
    "mnist": _load_idx,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "svhn": _load_svhn,
    "stl10": _load_stl10,
    "digits": _load_digits,
    "imagefolder": _load_imagefolder,
    "imagenet": _load_imagenet,
}


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    image_size: int | None = None,
) -> ImageData:
    """Load one split of a dataset into memory as uint8.

    Args:
        name: one of :func:`list_datasets` (unknown names raise DatasetError listing the valid ones).
        split: ``"train"`` or ``"test"``.
        data_dir: folder holding the files (or a parent of the dataset's standard sub-folder).  When
            omitted: ``$MANLEARN_DATA/<dataset folder>``, ``$MANLEARN_DATA``, then built-in defaults
            (``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST).
        limit: keep only the first ``limit`` samples (cheap smoke runs); for ``imagefolder``, whose samples are
            sorted by class, a fixed-seed subset of ``limit`` spread over the classes.
        image_size: imagefolder only: square resize target (default 32).  For other datasets it must be
            omitted or equal to the dataset's fixed size.

    Raises:
        DatasetError: the data is missing, truncated or corrupt (message says how to get it).
        ConfigError: ``split``, ``limit`` or ``image_size`` is invalid.
    """
    info = get_dataset_info(name)
    if split not in _SPLITS:
        raise ConfigError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"image_size must be a positive integer or None, got {image_size!r}")
        if name not in ("imagefolder", "imagenet") and image_size != info.image_size:
            raise ConfigError(
                f"image_size applies to imagefolder only; {name} has a fixed size of {info.image_size}"
            )
    dirs = candidate_dirs(name, data_dir)
    return _LOADERS[name](name, split, dirs, limit, image_size)
