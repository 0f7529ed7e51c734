"""A real-image detection / segmentation task built from Fashion-MNIST ("mosaic").

COCO and Cityscapes cannot be downloaded on these machines, but the dense-prediction code (detection
heads, DeepLabV3, their local-learning variants) still needs a real task with instance boxes, masks and
classes to be trained and tested on.  :func:`make_mosaic` pastes 1-4 Fashion-MNIST garments at random
positions, scales and tints onto dark, mildly noisy canvases and writes the result in two standard formats:

* COCO: ``images/{train,val}/{id:06d}.png`` + ``annotations/instances_{train,val}.json`` (boxes, areas,
  RLE masks, categories named after the Fashion-MNIST classes; category ids 1..10);
* image/mask folders: the same ``images/`` plus ``masks/{train,val}/{id:06d}.png`` (single-channel uint8,
  0 = background, c + 1 for Fashion-MNIST class c), read by :mod:`manlearn.segmentation.datasets`.

Occlusion: later items are painted over earlier ones, and every annotation describes the *visible*
pixels only.  A placement that would leave an earlier item with less than ``keep_visible`` of its own
pixels is re-drawn (then, after a few tries, the new item is dropped), so no nearly-hidden item is ever
painted: every painted pixel belongs to an annotated item, and no annotation is a sliver.

Training canvases draw their garments from the Fashion-MNIST train split, val canvases from its test
split, so the two never share a source image.  Everything is a pure function of ``seed``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from manlearn.errors import ConfigError, optional_import
from manlearn.files import no_space, write_failure

__all__ = ["make_mosaic", "MOSAIC_SOURCES", "FASHION_MNIST_CLASSES"]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_MNIST_CLASSES = tuple(str(d) for d in range(10))

#: source name accepted by make_mosaic -> (dataset name for load_dataset, class names)
MOSAIC_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fashion_mnist": ("fashion-mnist", FASHION_MNIST_CLASSES),
    "fashion-mnist": ("fashion-mnist", FASHION_MNIST_CLASSES),
    "mnist": ("mnist", _MNIST_CLASSES),
}

#: (mosaic split, source split); the val canvases use held-out garments.
_SPLITS = (("train", "train"), ("val", "test"))

_TMP_PREFIX = ".mosaic-tmp-"
_PLACEMENT_TRIES = 4
#: PNG encoding and file creation dominate the run time and release the GIL: a few writer threads.
_WRITER_THREADS = 4


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"make_mosaic: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _resize_items(src: np.ndarray, sides: np.ndarray, flips: np.ndarray) -> list[np.ndarray]:
    """Resize every item to its square side, one interpolate call per distinct side (the vectorised part).

    Downscaling uses antialiasing (a plain bilinear 0.75x drops thin straps); upscaling plain bilinear.
    """
    out: list[np.ndarray] = [np.empty((0, 0), np.uint8)] * len(sides)
    x_all = torch.from_numpy(src)
    for side in np.unique(sides):
        idx = np.nonzero(sides == side)[0]
        x = x_all[torch.from_numpy(idx)].float()[:, None]
        y = F.interpolate(x, size=(int(side), int(side)), mode="bilinear", align_corners=False,
                          antialias=bool(side < src.shape[-1]))
        y = y[:, 0].round_().clamp_(0, 255).to(torch.uint8).numpy()
        for k, i in enumerate(idx):
            out[i] = y[k, :, ::-1] if flips[i] else y[k]
    return out


def _render_split(
    images: np.ndarray,
    labels: np.ndarray,
    n: int,
    size: int,
    min_items: int,
    max_items: int,
    scale: tuple[float, float],
    threshold: int,
    keep_visible: float,
    rng: np.random.Generator,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]]:
    """Yield ``n`` canvases: (rgb [H,W,3] uint8, owner [H,W] int16 with -1 = background, items).

    Per-item parameters are drawn and the items resized for the whole split up front (vectorised); the
    canvases are then composed one at a time so that memory does not grow with ``n``.
    """
    counts = rng.integers(min_items, max_items + 1, size=n)
    total = int(counts.sum())
    src_idx = rng.integers(0, len(images), size=total)
    sides = np.clip(np.rint(28 * rng.uniform(scale[0], scale[1], size=total)), 4, size).astype(np.int64)
    flips = rng.random(total) < 0.5
    # Tint: per-channel gain; one item in four stays grey.  Brightness floor keeps dark garments visible.
    tints = rng.uniform(0.35, 1.0, size=(total, 3))
    grey = rng.random(total) < 0.25
    tints[grey] = tints[grey, :1]
    bg_base = rng.integers(0, 33, size=(n, 3))
    bg_noise = rng.uniform(0.0, 5.0, size=n)
    resized = _resize_items(images[src_idx], sides, flips)

    start = 0
    for c in range(n):
        noise = rng.normal(0.0, 1.0, size=(size, size, 1)) * bg_noise[c]
        canvas = np.clip(bg_base[c] + noise, 0, 255).astype(np.uint8)
        owner = np.full((size, size), -1, dtype=np.int16)
        full: list[int] = []      # own mask area of each placed item
        visible = np.zeros(0, dtype=np.int64)
        items: list[dict[str, Any]] = []
        for j in range(start, start + int(counts[c])):
            g = resized[j]
            m = g > threshold
            area = int(m.sum())
            if area < 16:  # a (near) empty source image: nothing to annotate
                continue
            side = g.shape[0]
            for _ in range(_PLACEMENT_TRIES):
                y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                region = owner[y0:y0 + side, x0:x0 + side]
                if items:
                    covered = np.bincount(region[m].astype(np.int64) + 1, minlength=len(items) + 1)[1:]
                    if np.any(visible - covered < keep_visible * np.asarray(full)):
                        continue
                    visible = visible - covered
                region[m] = len(items)
                colour = (64.0 + g[m].astype(np.float64) * (191.0 / 255.0))[:, None] * tints[j]
                canvas[y0:y0 + side, x0:x0 + side][m] = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
                items.append({"label": int(labels[src_idx[j]]), "source_index": int(src_idx[j])})
                full.append(area)
                visible = np.append(visible, area)
                break
        start += int(counts[c])
        yield canvas, owner, items


def _encode_items(owner: np.ndarray, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Visible mask, tight box, area and COCO RLE of each item of one canvas."""
    mask_utils = optional_import("pycocotools.mask", "detection", "the mosaic dataset's COCO masks")

    if not items:
        return []
    masks = owner[:, :, None] == np.arange(len(items), dtype=np.int16)[None, None, :]
    rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8)))
    anns = []
    for k, (item, rle) in enumerate(zip(items, rles)):
        rows = np.nonzero(masks[:, :, k].any(axis=1))[0]
        cols = np.nonzero(masks[:, :, k].any(axis=0))[0]
        x, y = int(cols[0]), int(rows[0])
        w, h = int(cols[-1]) - x + 1, int(rows[-1]) - y + 1
        anns.append({
            "category_id": item["label"] + 1,
            "bbox": [x, y, w, h],
            "area": int(masks[:, :, k].sum()),
            "iscrowd": 0,
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        })
    return anns


def _save_png(arr: np.ndarray, path: str) -> None:
    from PIL import Image

    # compress_level 1: PNG writing dominates the run time; level 6 buys ~10 % smaller files at 3x the cost.
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _remove(path: str) -> None:
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Create ``out_dir``; refuse a non-empty one unless ``overwrite``. Nothing of an earlier mosaic is
    removed here: it is replaced only once the new one is complete (:func:`_swap_in`)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"make_mosaic: out_dir {out_dir} exists and is not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"make_mosaic: cannot create {out_dir}: {e.strerror or e}") from None
    if not os.access(out_dir, os.W_OK):
        raise ConfigError(f"make_mosaic: {out_dir} is not writable")
    entries = sorted(os.listdir(out_dir))
    for e in entries:
        if e.startswith(_TMP_PREFIX):  # staging left by an interrupted run
            _remove(os.path.join(out_dir, e))
    others = [e for e in entries if not e.startswith(_TMP_PREFIX)]
    if others and not overwrite:
        raise ConfigError(
            f"make_mosaic: {out_dir} is not empty ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); "
            "pass overwrite=True (CLI: --overwrite) to replace a mosaic there, or choose another folder")


def _drop_if_created(out_dir: str, created: bool) -> None:
    """A failed first write leaves no empty folder behind."""
    if created:
        try:
            os.rmdir(out_dir)
        except OSError:
            pass


def _bytes_needed(stage: str, n_files: int) -> float:
    """The whole mosaic's size, extrapolated from the PNG files staged so far (``n_files`` in all)."""
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(stage) for f in files]
    written = [s for s in sizes if s > 0]
    return sum(written) / max(len(written), 1) * n_files


def _swap_in(stage: str, out_dir: str) -> None:
    """Replace the mosaic in ``out_dir`` by the complete one in ``stage``. The old annotations go first
    and the new ones come last, so an interruption never leaves a valid-looking mixed dataset."""
    old = os.path.join(out_dir, "annotations")
    if os.path.exists(old):
        _remove(old)
    for e in ("images", "masks", "mosaic.json", "annotations"):  # annotations last: the "done" marker
        target = os.path.join(out_dir, e)
        if e != "annotations" and os.path.exists(target):
            _remove(target)
        os.replace(os.path.join(stage, e), target)


@dataclass(frozen=True)
class _MosaicParams:
    n_train: int
    n_val: int
    size: int
    min_items: int
    max_items: int
    scale: tuple[float, float]
    seed: int
    source: str
    threshold: int
    keep_visible: float

    def record(self) -> dict[str, Any]:
        """What ``mosaic.json`` says of the set."""
        return {"size": self.size, "seed": self.seed, "source": self.source,
                "classes": list(MOSAIC_SOURCES[self.source][1]), "n_train": self.n_train, "n_val": self.n_val,
                "min_items": self.min_items, "max_items": self.max_items, "scale": list(self.scale),
                "threshold": self.threshold, "keep_visible": self.keep_visible}


def _params(n_train: Any, n_val: Any, size: Any, min_items: Any, max_items: Any, scale: Sequence[float],
            seed: Any, source: str, threshold: int, keep_visible: float) -> _MosaicParams:
    """Check every argument of :func:`make_mosaic` before any work."""
    n_train = _check_int("n_train", n_train, 0)
    n_val = _check_int("n_val", n_val, 0)
    if n_train + n_val == 0:
        raise ConfigError("make_mosaic: n_train + n_val must be at least 1")
    min_items = _check_int("min_items", min_items, 1)
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi:
        raise ConfigError(f"make_mosaic: scale must be (low, high) with 0 < low <= high, got {tuple(scale)}")
    if not 0.0 <= keep_visible <= 1.0:
        raise ConfigError(f"make_mosaic: keep_visible must lie in [0, 1], got {keep_visible}")
    if not 0 <= threshold < 255:
        raise ConfigError(f"make_mosaic: threshold must lie in 0..254, got {threshold}")
    if source not in MOSAIC_SOURCES:
        raise ConfigError(f"make_mosaic: unknown source {source!r}; choose one of {', '.join(MOSAIC_SOURCES)}")
    return _MosaicParams(n_train, n_val, _check_int("size", size, 16), min_items,
                         _check_int("max_items", max_items, min_items), (lo, hi), _check_int("seed", seed, 0),
                         source, int(threshold), float(keep_visible))


class _PngWriter:
    """PNG files written by a few threads, with a bounded queue that surfaces write errors early."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(_WRITER_THREADS, thread_name_prefix="mosaic-png")
        self.pending: list[Future] = []

    def save(self, arr: np.ndarray, path: str) -> None:
        self.pending.append(self.pool.submit(_save_png, arr, path))
        if len(self.pending) >= 256:  # bound the queue (memory)
            for fut in self.pending[:128]:
                fut.result()
            del self.pending[:128]

    def wait(self) -> None:
        for fut in self.pending:
            fut.result()
        self.pending.clear()

    def close(self) -> None:
        for fut in self.pending:
            fut.cancel()
        self.pool.shutdown(wait=True)


def _write_split(p: _MosaicParams, split: str, src_split: str, ss: np.random.SeedSequence, stage: str,
                 data_dir: Any, writer: _PngWriter) -> dict[str, Any]:
    """Render and write one split into ``stage``; return its COCO dict."""
    from manlearn.data.datasets import load_dataset

    n = p.n_train if split == "train" else p.n_val
    os.makedirs(os.path.join(stage, "images", split))
    os.makedirs(os.path.join(stage, "masks", split))
    images_json: list[dict[str, Any]] = []
    anns_json: list[dict[str, Any]] = []
    if n:
        data = load_dataset(MOSAIC_SOURCES[p.source][0], src_split, data_dir=data_dir)
        canvases = _render_split(data.images[:, 0].numpy(), data.labels.numpy(), n, p.size, p.min_items,
                                 p.max_items, p.scale, p.threshold, p.keep_visible, np.random.default_rng(ss))
        for i, (canvas, owner, items) in enumerate(canvases):
            image_id = i + 1
            name = f"{image_id:06d}.png"
            writer.save(canvas, os.path.join(stage, "images", split, name))
            cls = np.array([it["label"] + 1 for it in items] + [0], dtype=np.uint8)
            writer.save(cls[owner], os.path.join(stage, "masks", split, name))  # owner -1 -> 0
            images_json.append({"id": image_id, "file_name": name, "width": p.size, "height": p.size})
            for ann in _encode_items(owner, items):
                ann["id"] = len(anns_json) + 1
                ann["image_id"] = image_id
                anns_json.append(ann)
    categories = [{"id": i + 1, "name": name, "supercategory": p.source}
                  for i, name in enumerate(MOSAIC_SOURCES[p.source][1])]
    return {"info": {"description": f"manlearn mosaic of {p.source} ({split})", "seed": p.seed, "version": "1"},
            "images": images_json, "annotations": anns_json, "categories": categories}


def _write_metadata(p: _MosaicParams, coco: dict[str, dict[str, Any]], stage: str) -> None:
    with open(os.path.join(stage, "mosaic.json"), "w") as f:
        json.dump(p.record(), f, indent=1)
    ann_stage = os.path.join(stage, "annotations")
    os.makedirs(ann_stage)
    for split, d in coco.items():
        with open(os.path.join(ann_stage, f"instances_{split}.json"), "w") as f:
            json.dump(d, f)


def make_mosaic(
    out_dir: str | os.PathLike[str],
    n_train: int = 4000,
    n_val: int = 500,
    size: int = 128,
    min_items: int = 1,
    max_items: int = 4,
    scale: Sequence[float] = (0.75, 2.5),
    seed: int = 0,
    source: str = "fashion_mnist",
    data_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    threshold: int = 24,
    keep_visible: float = 0.5,
) -> dict[str, Any]:
    """Generate the mosaic detection/segmentation dataset in ``out_dir`` (COCO + image/mask folders).

    Args:
        out_dir: destination folder; must be empty or absent unless ``overwrite``.
        n_train, n_val: number of canvases per split (train garments from the source's train split, val
            garments from its test split).
        size: canvas side in pixels (square, RGB).
        min_items, max_items: items drawn per canvas (fewer may survive the occlusion rule).
        scale: range of item scales relative to the 28-px source (side = round(28 * s), at most ``size``).
        seed: everything (counts, garments, scales, tints, positions, noise) follows from it.
        source: ``"fashion_mnist"`` (default) or ``"mnist"``, read with :func:`manlearn.data.load_dataset`.
        data_dir: where the source IDX files are (default: its usual search path).
        overwrite: replace an existing mosaic (only ``annotations/``, ``images/``, ``masks/``, ``mosaic.json``
            are replaced, and only once the new set is complete: a failed run keeps the old one).
        threshold: a resized garment pixel belongs to the item when its grey value exceeds this.
        keep_visible: every item keeps at least this fraction of its pixels visible (see module docstring).

    Returns:
        a summary dict: out_dir, counts of images and annotations per split, size, seed, seconds.

    Files are written to a hidden staging folder inside ``out_dir`` and moved into place at the end,
    ``annotations/`` last, so an interrupted run leaves no valid-looking partial dataset.
    """
    t0 = time.perf_counter()
    p = _params(n_train, n_val, size, min_items, max_items, scale, seed, source, threshold, keep_visible)
    out_dir = os.fspath(out_dir)
    created = not os.path.exists(out_dir)
    _check_out_dir(out_dir, overwrite)
    try:
        stage = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out_dir)
    except OSError as e:
        _drop_if_created(out_dir, created)
        raise write_failure(out_dir, e, "write the mosaic into") from None
    summary: dict[str, Any] = {"out_dir": out_dir, "size": p.size, "seed": p.seed, "source": p.source,
                               "classes": list(MOSAIC_SOURCES[p.source][1])}
    writer = _PngWriter()
    try:
        coco = {}
        for (split, src_split), ss in zip(_SPLITS, np.random.SeedSequence(p.seed).spawn(len(_SPLITS))):
            coco[split] = _write_split(p, split, src_split, ss, stage, data_dir, writer)
            summary[f"n_{split}"] = len(coco[split]["images"])
            summary[f"annotations_{split}"] = len(coco[split]["annotations"])
        writer.wait()
        _write_metadata(p, coco, stage)
        _swap_in(stage, out_dir)
    except OSError as e:  # a full disk, permissions: one line; an earlier mosaic there is kept
        if e.errno == errno.ENOSPC:
            e = no_space(_bytes_needed(stage, 2 * (p.n_train + p.n_val)), out_dir)
        writer.close()
        shutil.rmtree(stage, ignore_errors=True)
        _drop_if_created(out_dir, created)
        kept = "" if created else "what was in the folder before is kept"
        raise write_failure(out_dir, e, "write the mosaic into", kept) from None
    finally:
        writer.close()
        shutil.rmtree(stage, ignore_errors=True)
    summary["seconds"] = time.perf_counter() - t0
    return summary
