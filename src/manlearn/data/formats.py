"""Parsers for the standard on-disk dataset formats, returning numpy uint8 arrays.

Each parser validates everything it can (magic numbers, sizes, counts, label ranges) and raises
:class:`FormatProblem` with a one-line description naming the file.  They know nothing about which dataset
they read: :mod:`manlearn.data.datasets` turns a FormatProblem into a DatasetError that also says which
dataset was wanted, where it was searched and how to get it.  No raw struct/pickle/gzip/scipy/PIL
exception is allowed out of here.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zlib
from typing import Any

import numpy as np

from ..errors import optional_import

__all__ = [
    "FormatProblem",
    "read_idx",
    "read_cifar_pickle",
    "read_svhn_mat",
    "read_stl10_bin",
    "read_image_file",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


class FormatProblem(Exception):
    """A file exists but is not what the format says it must be (internal; never escapes the package)."""


def _read_bytes(path: str) -> bytes:
    """Whole file, transparently gunzipped when the name ends in .gz."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise FormatProblem(f"{path}: cannot be read ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------------------------ IDX

_IDX_UBYTE = 0x08


def read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Read an IDX file (MNIST format) of unsigned bytes.

    The header is a big-endian magic ``0x0000TTDD`` (TT = 0x08 for ubyte, DD = number of dimensions),
    then DD big-endian uint32 sizes.  2051 = images (3 dims), 2049 = labels (1 dim).  The payload length
    must match the header exactly, which catches truncated downloads.
    """
    buf = _read_bytes(path)
    name = os.path.basename(path)
    if len(buf) < 4:
        raise FormatProblem(f"{name}: file is truncated ({len(buf)} bytes, no IDX header)")
    (magic,) = struct.unpack_from(">I", buf, 0)
    if magic != expected_magic:
        raise FormatProblem(
            f"{name}: wrong magic number {magic} (expected {expected_magic}); not an IDX "
            f"{'image' if expected_magic == 2051 else 'label'} file"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise FormatProblem(f"{name}: file is truncated inside the IDX header ({len(buf)} bytes)")
    dims = struct.unpack_from(f">{ndim}I", buf, 4)
    expected = int(np.prod(dims, dtype=np.int64)) if dims else 0
    got = len(buf) - header
    if got != expected:
        what = "truncated" if got < expected else "longer than its header says"
        raise FormatProblem(
            f"{name}: file is {what}: header says {'x'.join(map(str, dims))} = {expected} bytes of data, "
            f"found {got}"
        )
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(dims)


# ---------------------------------------------------------------------------------------------- CIFAR

# Globals a CIFAR batch may reference: numpy array reconstruction only (old py2 pickles and new ones).
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, so a tampered batch file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _get(d: dict, key: str) -> Any:
    """CIFAR dicts have bytes keys (py2 pickles read with encoding='bytes'); accept str keys too."""
    if key.encode() in d:
        return d[key.encode()]
    if key in d:
        return d[key]
    raise KeyError(key)


def read_cifar_pickle(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch -> (images uint8 [N,3,32,32], labels int64 [N])."""
    name = os.path.basename(path)
    raw = _read_bytes(path)
    try:
        d = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... on a corrupt file
        raise FormatProblem(f"{name}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise FormatProblem(f"{name}: expected a pickled dict, found {type(d).__name__}")
    try:
        data = _get(d, "data")
        labels = _get(d, label_key)
    except KeyError as e:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d)
        raise FormatProblem(f"{name}: missing key {e.args[0]!r} (keys present: {keys})") from None
    try:
        data = np.asarray(data)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise FormatProblem(f"{name}: labels are not integers ({e})") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise FormatProblem(
            f"{name}: 'data' must be uint8 Nx3072, found {data.dtype} {'x'.join(map(str, data.shape))}"
        )
    if labels.shape[0] != data.shape[0]:
        raise FormatProblem(f"{name}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data.reshape(-1, 3, 32, 32), labels


# ----------------------------------------------------------------------------------------------- SVHN


def read_svhn_mat(path: str) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped-digits .mat -> (images uint8 [N,3,32,32], labels int64 [N] in 0..9).

    The file stores X as 32x32x3xN and y as Nx1 with the digit 0 labelled 10.
    """
    name = os.path.basename(path)
    loadmat = optional_import("scipy.io", "data", "reading SVHN's .mat files").loadmat
    try:
        mat = loadmat(path)
    except Exception as e:  # MatReadError, ValueError, OSError, NotImplementedError (v7.3/HDF5)
        raise FormatProblem(f"{name}: not a readable MATLAB file ({type(e).__name__}: {e})") from e
    if "X" not in mat or "y" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise FormatProblem(f"{name}: missing variable 'X' or 'y' (found {found})")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise FormatProblem(f"{name}: X must be 32x32x3xN, found {'x'.join(map(str, x.shape))}")
    if x.dtype != np.uint8:
        raise FormatProblem(f"{name}: X must be uint8, found {x.dtype}")
    y = y.reshape(-1)
    if y.shape[0] != x.shape[3]:
        raise FormatProblem(f"{name}: {x.shape[3]} images but {y.shape[0]} labels")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() > 10):
        raise FormatProblem(f"{name}: labels must lie in 1..10 (10 = digit 0), found {y.min()}..{y.max()}")
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


# ---------------------------------------------------------------------------------------------- STL10

_STL_PIXELS = 3 * 96 * 96


def read_stl10_bin(x_path: str, y_path: str) -> tuple[np.ndarray, np.ndarray]:
    """STL-10 binary pair -> (images uint8 [N,3,96,96], labels int64 [N] in 0..9).

    Each image is stored channel by channel in column-major order, hence the final transpose of H and W.
    Labels are stored 1..10.
    """
    xb, yb = _read_bytes(x_path), _read_bytes(y_path)
    xn, yn = os.path.basename(x_path), os.path.basename(y_path)
    if len(xb) == 0 or len(xb) % _STL_PIXELS:
        raise FormatProblem(
            f"{xn}: size {len(xb)} bytes is not a positive multiple of 3*96*96 = {_STL_PIXELS} "
            "(truncated or not an STL-10 image file)"
        )
    n = len(xb) // _STL_PIXELS
    if len(yb) != n:
        raise FormatProblem(f"{yn}: {len(yb)} labels but {xn} holds {n} images")
    y = np.frombuffer(yb, dtype=np.uint8).astype(np.int64)
    if y.min() < 1 or y.max() > 10:
        raise FormatProblem(f"{yn}: labels must lie in 1..10, found {y.min()}..{y.max()}")
    x = np.frombuffer(xb, dtype=np.uint8).reshape(n, 3, 96, 96).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(x), y - 1


# --------------------------------------------------------------------------------------- image files


def read_image_file(path: str, size: int) -> np.ndarray:
    """One image via Pillow -> uint8 [3, size, size] (converted to RGB, resized bilinearly to a square)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
        raise FormatProblem(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    return arr.transpose(2, 0, 1)
