"""What each supported dataset is: its shape as the model sees it, where its files live, how to get it.

Kept separate from the readers so that the rest of manlearn (model builders, configs, the CLI) can ask
"how many classes / channels / pixels?" without touching the disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import os

import torch

from manlearn.errors import DatasetError

__all__ = [
    "DatasetInfo",
    "ImageData",
    "list_datasets",
    "get_dataset_info",
    "dataset_files",
    "ENV_DATA_DIR",
]

#: Environment variable naming a root folder that holds datasets (one sub-folder per dataset, or the files).
ENV_DATA_DIR = "MANLEARN_DATA"


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset *as the model sees it* (after :class:`BatchTransform`).

    ``in_channels`` / ``image_size`` describe the transformed tensor, not the stored one: Fashion-MNIST is
    stored 1x28x28 but the FM-R32 protocol feeds 3x32x32.  ``mean`` / ``std`` are in [0, 1] pixel units, one
    entry per model channel.  ``how_to_get`` is pasted into every error about a missing or broken copy.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    how_to_get: str

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"DatasetInfo({self.name!r}): mean/std need {self.in_channels} entries "
                f"(one per model channel), got {len(self.mean)}/{len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"DatasetInfo({self.name!r}): std must be positive, got {self.std}")


@dataclass
class ImageData:
    """A whole split held in memory as uint8, the cheapest form to keep and to move to a device once.

    ``images`` is ``[N, C_stored, H, W]`` uint8 (``C_stored`` may be 1 for grey data that the transform
    replicates), ``labels`` is ``[N]`` int64.  ``classes`` optionally names the labels (set for imagefolder,
    whose labels would otherwise be meaningless).  ``source`` says where the split was read from (a folder,
    or the package that ships it), for the run's header and summary.
    """

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo
    classes: tuple[str, ...] | None = field(default=None)
    source: str = ""

    def __post_init__(self) -> None:
        # Checked here so that a reader bug shows up at load time, not as a shape error mid-training.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(
                f"{self.info.name}: images must be uint8 [N, C, H, W], got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DatasetError(
                f"{self.info.name}: labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.labels.shape[0] != self.images.shape[0]:
            raise DatasetError(
                f"{self.info.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        if not self.images.is_contiguous():
            self.images = self.images.contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------

_HALF3 = (0.5, 0.5, 0.5)

_HOW_TO_GET: dict[str, str] = {
    "fashion-mnist": (
        "Install the Debian package with `apt-get install dataset-fashion-mnist`, which puts "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz in /usr/share/datasets/fashion-mnist (searched by default). Alternatively "
        "copy those four IDX files (raw or .gz, from the official release at "
        "https://github.com/zalandoresearch/fashion-mnist, folder data/fashion) into a folder and pass "
        f"data_dir=<folder> or set ${ENV_DATA_DIR}=<root> (files in <root>/fashion-mnist or <root>)."
    ),
    "mnist": (
        "Download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz from the official MNIST page (http://yann.lecun.com/exdb/mnist/) or one "
        "of its mirrors, keep them raw or .gz in one folder, and pass data_dir=<folder> or set "
        f"${ENV_DATA_DIR}=<root> (files in <root>/mnist or <root>)."
    ),
    "cifar10": (
        "Download the 'CIFAR-10 python version' (cifar-10-python.tar.gz) from "
        "https://www.cs.toronto.edu/~kriz/cifar.html and extract it; pass data_dir=<folder containing "
        f"cifar-10-batches-py> (or the cifar-10-batches-py folder itself) or set ${ENV_DATA_DIR}=<root>."
    ),
    "cifar100": (
        "Download the 'CIFAR-100 python version' (cifar-100-python.tar.gz) from "
        "https://www.cs.toronto.edu/~kriz/cifar.html and extract it; pass data_dir=<folder containing "
        f"cifar-100-python> (or the cifar-100-python folder itself) or set ${ENV_DATA_DIR}=<root>."
    ),
    "svhn": (
        "Download train_32x32.mat and test_32x32.mat (Format 2: cropped digits) from "
        "http://ufldl.stanford.edu/housenumbers/ into one folder and pass data_dir=<folder> or set "
        f"${ENV_DATA_DIR}=<root> (files in <root>/svhn or <root>)."
    ),
    "stl10": (
        "Download stl10_binary.tar.gz (binary format) from https://cs.stanford.edu/~acoates/stl10/ and "
        "extract it; pass data_dir=<folder containing stl10_binary> (or stl10_binary itself) or set "
        f"${ENV_DATA_DIR}=<root>."
    ),
    "digits": (
        "Bundled with scikit-learn (sklearn.datasets.load_digits); nothing to download, only "
        "`pip install scikit-learn` is needed."
    ),
    "imagefolder": (
        "Arrange Pillow-readable images (png, jpg, jpeg, bmp, gif, webp, ppm, tif) as "
        "<root>/train/<class>/<image> and <root>/test/<class>/<image> (val/ is accepted instead of test/); "
        "class names are the sorted sub-folder names of train/. Pass data_dir=<root> or set "
        f"${ENV_DATA_DIR}=<root> (searched as <root>/imagefolder and <root>)."
    ),
    "imagenet": (
        "ImageNet (ILSVRC-2012) cannot be downloaded automatically: get it from https://image-net.org, "
        "extract the training archives into <root>/train/<wnid>/*.JPEG and sort the validation images into "
        "<root>/val/<wnid>/*.JPEG (e.g. with the common valprep.sh script). Any class-per-folder tree in that "
        "layout works (classes = sorted folders of train/). Pass data_dir=<root> or set "
        f"${ENV_DATA_DIR}=<root> (searched as <root>/imagenet, <root>/ILSVRC2012 and <root>). It is streamed "
        "from disk with DataLoader workers, never loaded into memory."
    ),
}

_CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
_CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)

_INFOS: dict[str, DatasetInfo] = {
    # FM-R32 protocol (SPEC section 8): 28x28 grey -> zero-pad to 32, replicate to 3 channels, 0.5/0.5.
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 3, 32, _HALF3, _HALF3, _HOW_TO_GET["fashion-mnist"]),
    "mnist": DatasetInfo("mnist", 10, 3, 32, _HALF3, _HALF3, _HOW_TO_GET["mnist"]),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, _CIFAR_MEAN, _CIFAR_STD, _HOW_TO_GET["cifar10"]),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, _CIFAR_MEAN, _CIFAR_STD, _HOW_TO_GET["cifar100"]),
    "svhn": DatasetInfo("svhn", 10, 3, 32, _HALF3, _HALF3, _HOW_TO_GET["svhn"]),
    "stl10": DatasetInfo("stl10", 10, 3, 96, _HALF3, _HALF3, _HOW_TO_GET["stl10"]),
    "digits": DatasetInfo("digits", 10, 1, 8, (0.5,), (0.5,), _HOW_TO_GET["digits"]),
    # Placeholder: num_classes (0 here) and image_size are only known once a folder is loaded;
    # load_dataset("imagefolder", ...) returns ImageData whose .info carries the real values.
    "imagefolder": DatasetInfo("imagefolder", 0, 3, 32, _HALF3, _HALF3, _HOW_TO_GET["imagefolder"]),
    # Streamed (manlearn.data.imagenet); num_classes comes from the folder (1000 for ILSVRC-2012),
    # image_size is the training crop (224; evaluation resizes to 256 and centre-crops 224).
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                            _HOW_TO_GET["imagenet"]),
}

_IDX_FILES = {
    "train": ["train-images-idx3-ubyte[.gz]", "train-labels-idx1-ubyte[.gz]"],
    "test": ["t10k-images-idx3-ubyte[.gz]", "t10k-labels-idx1-ubyte[.gz]"],
}

_FILES: dict[str, dict[str, list[str]]] = {
    "fashion-mnist": _IDX_FILES,
    "mnist": _IDX_FILES,
    "cifar10": {
        "train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
        "test": ["cifar-10-batches-py/test_batch"],
    },
    "cifar100": {"train": ["cifar-100-python/train"], "test": ["cifar-100-python/test"]},
    "svhn": {"train": ["train_32x32.mat"], "test": ["test_32x32.mat"]},
    "stl10": {
        "train": ["stl10_binary/train_X.bin", "stl10_binary/train_y.bin"],
        "test": ["stl10_binary/test_X.bin", "stl10_binary/test_y.bin"],
    },
    "digits": {"train": ["(bundled with scikit-learn)"], "test": ["(bundled with scikit-learn)"]},
    "imagefolder": {"train": ["train/<class>/<image>"], "test": ["test/<class>/<image> (or val/<class>/<image>)"]},
    "imagenet": {"train": ["train/<wnid>/<image>"], "test": ["val/<wnid>/<image> (or test/<wnid>/<image>)"]},
}

#: Sub-folders of data_dir / $MANLEARN_DATA that may hold a dataset's files (tried as well as the folder itself).
_FOLDERS: dict[str, list[str]] = {
    "fashion-mnist": ["fashion-mnist", "fashion_mnist", "FashionMNIST/raw"],
    "mnist": ["mnist", "MNIST/raw"],
    "cifar10": ["cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"],
    "cifar100": ["cifar-100-python", "cifar100/cifar-100-python", "cifar100"],
    "svhn": ["svhn", "SVHN"],
    "stl10": ["stl10_binary", "stl10/stl10_binary", "stl10"],
    "digits": [],
    "imagefolder": ["imagefolder"],
    "imagenet": ["imagenet", "ILSVRC2012", "ilsvrc2012"],
}

#: Locations searched when neither data_dir nor $MANLEARN_DATA finds the files.
_DEFAULT_DIRS: dict[str, list[str]] = {
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` / :func:`get_dataset_info`, in a stable order."""
    return list(_INFOS)


def _check_name(name: str) -> str:
    if name not in _INFOS:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}")
    return name


def get_dataset_info(name: str) -> DatasetInfo:
    """The static :class:`DatasetInfo` for ``name``.

    For ``imagefolder`` this is a placeholder (``num_classes == 0``, ``image_size == 32``, the default resize
    target): the real values come from the folder, so use ``load_dataset(...).info`` there.
    """
    return _INFOS[_check_name(name)]


def dataset_files(name: str, split: str | None = None) -> list[str]:
    """Files (relative to the dataset folder) that ``name`` needs, for ``split`` or for both splits.

    ``[.gz]`` marks files that may be stored raw or gzip-compressed.  Used to build error messages.
    """
    files = _FILES[_check_name(name)]
    if split is None:
        out: list[str] = []
        for s in ("train", "test"):
            out.extend(f for f in files[s] if f not in out)
        return out
    return list(files[split])


def candidate_dirs(name: str, data_dir: str | os.PathLike[str] | None) -> list[str]:
    """Folders to search for ``name``, best first.

    An explicit ``data_dir`` is authoritative (only it and its dataset-named sub-folders are tried, so a
    typo is reported instead of silently loading another copy); otherwise ``$MANLEARN_DATA/<folder>`` and
    ``$MANLEARN_DATA``, then the built-in defaults.
    """
    _check_name(name)
    out: list[str] = []
    if data_dir is not None:
        root = os.fspath(data_dir)
        out.append(root)
        out.extend(os.path.join(root, sub) for sub in _FOLDERS[name])
    else:
        env = os.environ.get(ENV_DATA_DIR)
        if env and not os.path.isdir(env):  # used exactly or refused: never a silent fall-back to another copy
            from manlearn.errors import DatasetError

            what = "a file" if os.path.exists(env) else "it does not exist"
            raise DatasetError(f"${ENV_DATA_DIR}={env} is not a folder ({what}): point it at the folder holding "
                               "the datasets, or unset it")
        if env:
            out.extend(os.path.join(env, sub) for sub in _FOLDERS[name])
            out.append(env)
        out.extend(_DEFAULT_DIRS.get(name, []))
    seen: set[str] = set()
    return [d for d in out if not (d in seen or seen.add(d))]
