"""COCO-format detection data: ``instances_*.json`` + an image folder, read with ``json`` and Pillow.

:class:`CocoDetection` validates the annotation file up front (a wrong path, broken JSON, a missing key,
an annotation of an unknown image or category, a missing image file each raise a
:class:`~manlearn.errors.DatasetError` that says what is wrong and how to get the data), maps the COCO
category ids to contiguous labels ``0..C-1`` (sorted by id; the mapping is kept for evaluation), turns
``[x, y, w, h]`` into ``xyxy`` boxes and leaves crowd boxes out of the training targets (they stay in the
evaluation ground truth, where COCOeval ignores detections on them).

Images are resized so that the shorter side is ``min_size`` and the longer at most ``max_size`` (the
Detectron rule; images already that size, e.g. the 128x128 mosaics with ``min_size=max_size=128``, are
not touched). Small sets are decoded once and held in memory as uint8.

:func:`collate` pads a list of samples into one uint8 batch whose sides are multiples of 32 (the
stride of C5), and :func:`hflip_batch` is the batched training augmentation.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DatasetError

__all__ = ["CocoAnnotations", "load_coco_annotations", "CocoDetection", "DetectionSample", "DetectionBatch",
           "collate", "hflip_batch", "resized_size", "HOW_TO_GET"]

HOW_TO_GET = ("COCO cannot be downloaded on these machines; copy train2017/ val2017/ and "
              "annotations/instances_{train,val}2017.json from a machine that has them, or make the "
              "Fashion-MNIST mosaic toy set in the same format: `manlearn data make-mosaic --out DIR` "
              "(then images_dir=DIR/images/train, ann_file=DIR/annotations/instances_train.json)")

_AUTO_CACHE_BYTES = 512 * 2 ** 20


def _err(where: str, problem: str) -> DatasetError:
    return DatasetError(f"{where}: {problem}\n  how to get COCO-format data: {HOW_TO_GET}")


@dataclass
class CocoAnnotations:
    """A validated ``instances_*.json``: per image its boxes (original pixels), in file order.

    ``boxes_xywh[i]`` / ``category_ids[i]`` / ``iscrowd[i]`` / ``areas[i]`` are numpy arrays for image
    ``image_ids[i]``; ``categories`` are the category dicts sorted by id, so label ``k`` is category
    ``categories[k]["id"]``.
    """

    ann_file: str
    image_ids: list[int]
    file_names: list[str]
    sizes: list[tuple[int, int] | None]  # (height, width) from the json, when given
    boxes_xywh: list[np.ndarray]
    category_ids: list[np.ndarray]
    iscrowd: list[np.ndarray]
    areas: list[np.ndarray]
    categories: list[dict[str, Any]]
    index_of: dict[int, int] = field(default_factory=dict)

    @property
    def label_to_category(self) -> list[int]:
        return [int(c["id"]) for c in self.categories]

    @property
    def category_to_label(self) -> dict[int, int]:
        return {int(c["id"]): k for k, c in enumerate(self.categories)}

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def coco_gt_dict(self, sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
        """The ground truth as a minimal COCO dict for pycocotools (ids renumbered from 1, ``area`` and
        ``iscrowd`` filled in where the file left them out). ``sizes`` gives (h, w) per image when the
        json has none."""
        images, anns = [], []
        for i, img_id in enumerate(self.image_ids):
            hw = self.sizes[i] if self.sizes[i] is not None else (sizes[i] if sizes is not None else None)
            entry: dict[str, Any] = {"id": img_id, "file_name": self.file_names[i]}
            if hw is not None:
                entry["height"], entry["width"] = int(hw[0]), int(hw[1])
            images.append(entry)
            for b, c, crowd, area in zip(self.boxes_xywh[i], self.category_ids[i], self.iscrowd[i], self.areas[i]):
                anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(c),
                             "bbox": [float(v) for v in b], "area": float(area), "iscrowd": int(crowd)})
        return {"images": images, "annotations": anns, "categories": [dict(c) for c in self.categories]}


def _req(d: Any, key: str, kind: type | tuple[type, ...], where: str, ann_file: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _err(ann_file, f"{where} has no {key!r} key (a COCO instances file has 'images', "
                             f"'annotations' and 'categories'; images need 'id' and 'file_name', "
                             f"annotations 'image_id', 'category_id' and 'bbox', categories 'id')")
    v = d[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise _err(ann_file, f"{where}: {key!r} is {v!r}, not of type {getattr(kind, '__name__', kind)}")
    return v


def _read_json(ann_file: str) -> dict[str, Any]:
    if not os.path.isfile(ann_file):
        raise _err(ann_file, "annotation file not found")
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _err(ann_file, f"not valid JSON ({e}); the file is truncated or not a COCO annotation file") from None
    except OSError as e:
        raise _err(ann_file, f"cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise _err(ann_file, f"the top level is a {type(data).__name__}, not a JSON object")
    return data


def _parse_categories(categories: list, ann_file: str) -> dict[int, dict[str, Any]]:
    cats: dict[int, dict[str, Any]] = {}
    for k, c in enumerate(categories):
        cid = _req(c, "id", int, f"categories[{k}]", ann_file)
        if cid in cats:
            raise _err(ann_file, f"category id {cid} appears twice")
        cats[cid] = {"id": cid, "name": str(c.get("name", cid)) if isinstance(c, dict) else str(cid)}
    if not cats:
        raise _err(ann_file, "no categories: a detection set needs at least one")
    return cats


def _parse_images(images: list, ann_file: str):
    """(ids, file names, (h, w) or None per image, id -> index)."""
    ids: list[int] = []
    names: list[str] = []
    sizes: list[tuple[int, int] | None] = []
    index_of: dict[int, int] = {}
    for k, im in enumerate(images):
        iid = _req(im, "id", int, f"images[{k}]", ann_file)
        name = _req(im, "file_name", str, f"images[{k}]", ann_file)
        if iid in index_of:
            raise _err(ann_file, f"image id {iid} appears twice")
        index_of[iid] = len(ids)
        ids.append(iid)
        names.append(name)
        h, w = im.get("height"), im.get("width")
        sizes.append((int(h), int(w)) if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 else None)
    return ids, names, sizes, index_of


def _parse_annotation(k: int, a: Any, ann_file: str, index_of: dict[int, int], cats: dict[int, Any]):
    """(image index, (xywh box, category id, iscrowd, area)) of annotation ``k``, checked."""
    iid = _req(a, "image_id", int, f"annotations[{k}]", ann_file)
    cid = _req(a, "category_id", int, f"annotations[{k}]", ann_file)
    bbox = _req(a, "bbox", list, f"annotations[{k}]", ann_file)
    if iid not in index_of:
        raise _err(ann_file, f"annotations[{k}] (id {a.get('id')}) refers to image id {iid}, which is not "
                             f"in 'images'")
    if cid not in cats:
        raise _err(ann_file, f"annotations[{k}] (id {a.get('id')}) has category id {cid}, which is not in "
                             f"'categories' {sorted(cats)}")
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        raise _err(ann_file, f"annotations[{k}]: bbox must be [x, y, width, height], got {bbox!r}")
    crowd = int(a.get("iscrowd", 0) or 0)
    area = a.get("area")
    area = float(area) if isinstance(area, (int, float)) and not isinstance(area, bool) else \
        float(max(bbox[2], 0) * max(bbox[3], 0))
    return index_of[iid], ([float(v) for v in bbox], cid, crowd, area)


def load_coco_annotations(ann_file: str | os.PathLike) -> CocoAnnotations:
    """Parse and validate a COCO ``instances_*.json`` (detection part only; segmentations are ignored)."""
    ann_file = os.fspath(ann_file)
    data = _read_json(ann_file)
    images = _req(data, "images", list, "the file", ann_file)
    annotations = _req(data, "annotations", list, "the file", ann_file)
    cats = _parse_categories(_req(data, "categories", list, "the file", ann_file), ann_file)
    ids, names, sizes, index_of = _parse_images(images, ann_file)
    per_img: list[list[tuple[list[float], int, int, float]]] = [[] for _ in ids]
    for k, a in enumerate(annotations):
        i, row = _parse_annotation(k, a, ann_file, index_of, cats)
        per_img[i].append(row)

    def arr(rows: list, col: int, dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
        return np.array([r[col] for r in rows], dtype=dtype).reshape((len(rows),) + shape)

    return CocoAnnotations(
        ann_file=ann_file, image_ids=ids, file_names=names, sizes=sizes,
        boxes_xywh=[arr(r, 0, np.float64, (4,)) for r in per_img],
        category_ids=[arr(r, 1, np.int64) for r in per_img],
        iscrowd=[arr(r, 2, np.int64) for r in per_img],
        areas=[arr(r, 3, np.float64) for r in per_img],
        categories=[cats[c] for c in sorted(cats)], index_of=index_of)


def resized_size(height: int, width: int, min_size: int | None, max_size: int | None) -> tuple[int, int]:
    """``(h, w)`` after scaling the shorter side to ``min_size`` while keeping the longer side at most
    ``max_size`` (either may be None: no constraint)."""
    if min_size is None and max_size is None:
        return height, width
    scale = min_size / min(height, width) if min_size is not None else 1.0
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class DetectionSample(NamedTuple):
    """One image: uint8 ``[3, h, w]`` (resized), target ``{"boxes": [n, 4] xyxy, "labels": [n]}`` in the
    resized pixels, its COCO image id, and ``scale = (sx, sy)``: resized / original size."""

    image: torch.Tensor
    target: dict[str, torch.Tensor]
    image_id: int
    scale: tuple[float, float]


class DetectionBatch(NamedTuple):
    """A padded batch: uint8 ``images [B, 3, H, W]`` (H, W multiples of ``size_divisible``; zero padding
    at the bottom/right), per-image targets, image ids, scales ``(sx, sy)`` and the unpadded ``(h, w)``."""

    images: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    image_ids: list[int]
    scales: list[tuple[float, float]]
    image_sizes: list[tuple[int, int]]


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection dataset.

    Args:
        images_dir: folder holding the images named by ``file_name``.
        ann_file: the ``instances_*.json``.
        min_size, max_size: resize rule (600 / 1000, the MAN++ / InfoPro detection setting; None for no
            resizing).
        cache_images: ``True`` decodes every image at construction and keeps it as uint8 in memory,
            ``False`` decodes on access, ``"auto"`` caches when the resized set takes at most 512 MiB.
        check_files: verify up front that every image file exists (fail now, not at step 10k).
        skip_empty: leave out images without any (non-crowd) box; by default they stay, as background.
    """

    def __init__(self, images_dir: str | os.PathLike, ann_file: str | os.PathLike, min_size: int | None = 600,
                 max_size: int | None = 1000, *, cache_images: bool | str = "auto", check_files: bool = True,
                 skip_empty: bool = False) -> None:
        if cache_images not in (True, False, "auto"):
            raise ConfigError(f"cache_images must be True, False or 'auto', got {cache_images!r}")
        for name, v in (("min_size", min_size), ("max_size", max_size)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {v!r}")
        if min_size is not None and max_size is not None and max_size < min_size:
            raise ConfigError(f"max_size ({max_size}) must be at least min_size ({min_size})")
        self.images_dir = os.fspath(images_dir)
        self.min_size, self.max_size = min_size, max_size
        self.annotations = ann = load_coco_annotations(ann_file)
        if not os.path.isdir(self.images_dir):
            raise _err(self.images_dir, f"image folder not found (images of {ann.ann_file})")
        self.category_to_label = ann.category_to_label
        self.label_to_category = ann.label_to_category
        self.num_classes = ann.num_classes
        self.class_names = [c["name"] for c in ann.categories]
        if check_files:
            missing = [n for n in ann.file_names if not os.path.isfile(os.path.join(self.images_dir, n))]
            if missing:
                raise _err(self.images_dir, f"{len(missing)} of the {len(ann.file_names)} images listed in "
                                            f"{ann.ann_file} are missing, e.g. {missing[:3]}")
        self._indices = [i for i in range(len(ann.image_ids))
                         if not skip_empty or bool((ann.iscrowd[i] == 0).any())]
        self._sizes: dict[int, tuple[int, int]] = {}
        self._cache: list[torch.Tensor] | None = None
        if cache_images == "auto":
            cache_images = self._estimated_bytes() <= _AUTO_CACHE_BYTES
        if cache_images:
            self._cache = [self._decode(i) for i in self._indices]

    @property
    def cached(self) -> bool:
        """True when the decoded images are held in memory (``cache_images``), so batches need no
        decode workers."""
        return self._cache is not None

    # ------------------------------------------------------------------ sizes

    def _estimated_bytes(self) -> float:
        total = 0.0
        for i in self._indices:
            hw = self.annotations.sizes[i]
            if hw is None:
                return float("inf")  # unknown sizes: do not guess, decode on access
            h, w = resized_size(*hw, self.min_size, self.max_size)
            total += 3 * h * w
        return total

    def original_size(self, i: int) -> tuple[int, int]:
        """``(height, width)`` of annotation-file image ``i`` (from the json, else the image header)."""
        hw = self.annotations.sizes[i]
        if hw is not None:
            return hw
        if i not in self._sizes:
            from PIL import Image

            path = os.path.join(self.images_dir, self.annotations.file_names[i])
            try:
                with Image.open(path) as im:
                    self._sizes[i] = (im.height, im.width)
            except (OSError, ValueError) as e:
                raise _err(path, f"not a readable image ({type(e).__name__}: {e})") from None
        return self._sizes[i]

    def scale_of(self, i: int) -> tuple[float, float]:
        """``(sx, sy)``: resized / original size of annotation-file image ``i``."""
        h, w = self.original_size(i)
        nh, nw = resized_size(h, w, self.min_size, self.max_size)
        return nw / w, nh / h

    # ------------------------------------------------------------------ access

    @property
    def image_ids(self) -> list[int]:
        """COCO ids of the images of this dataset, in index order."""
        return [self.annotations.image_ids[i] for i in self._indices]

    def __len__(self) -> int:
        return len(self._indices)

    def _decode(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = os.path.join(self.images_dir, self.annotations.file_names[i])
        if not os.path.isfile(path):
            raise _err(path, f"image file of image id {self.annotations.image_ids[i]} not found")
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                h, w = im.height, im.width
                self._sizes.setdefault(i, (h, w))
                nh, nw = resized_size(h, w, self.min_size, self.max_size)
                if (nh, nw) != (h, w):
                    im = im.resize((nw, nh), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise _err(path, f"not a readable image ({type(e).__name__}: {e})") from None
        if self.annotations.sizes[i] is not None and self.annotations.sizes[i] != (h, w):
            raise _err(path, f"image is {h}x{w} but {self.annotations.ann_file} says "
                             f"{self.annotations.sizes[i][0]}x{self.annotations.sizes[i][1]}")
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def target(self, i: int) -> dict[str, torch.Tensor]:
        """Training target of annotation-file image ``i`` in resized pixels: non-crowd boxes with positive
        width and height, labels ``0..C-1``."""
        ann = self.annotations
        keep = (ann.iscrowd[i] == 0) & (ann.boxes_xywh[i][:, 2] > 0) & (ann.boxes_xywh[i][:, 3] > 0)
        xywh = ann.boxes_xywh[i][keep]
        sx, sy = self.scale_of(i)
        boxes = np.stack([xywh[:, 0] * sx, xywh[:, 1] * sy, (xywh[:, 0] + xywh[:, 2]) * sx,
                          (xywh[:, 1] + xywh[:, 3]) * sy], axis=1) if len(xywh) else np.zeros((0, 4))
        labels = [self.category_to_label[int(c)] for c in ann.category_ids[i][keep]]
        return {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.as_tensor(labels, dtype=torch.long)}

    def __getitem__(self, index: int) -> DetectionSample:
        i = self._indices[index]
        image = self._cache[index] if self._cache is not None else self._decode(i)
        return DetectionSample(image, self.target(i), self.annotations.image_ids[i], self.scale_of(i))

    def get_batch(self, indices: Sequence[int], size_divisible: int = 32) -> DetectionBatch:
        """``collate([self[i] for i in indices])``: the in-process path for cached small sets."""
        return collate([self[int(i)] for i in indices], size_divisible)

    @classmethod
    def from_root(cls, root: str | os.PathLike, split: str, **kwargs: Any) -> "CocoDetection":
        """The usual layouts: ``root/annotations/instances_{split}.json`` with images in
        ``root/images/{split}`` (the mosaic) or ``root/{split}`` (COCO's ``train2017``/``val2017``)."""
        root = os.fspath(root)
        ann = os.path.join(root, "annotations", f"instances_{split}.json")
        images = os.path.join(root, "images", split)
        if not os.path.isdir(images):
            images = os.path.join(root, split)
        return cls(images, ann, **kwargs)


def collate(samples: Sequence[DetectionSample | tuple], size_divisible: int = 32) -> DetectionBatch:
    """Stack samples into one zero-padded uint8 batch whose height and width are multiples of
    ``size_divisible`` (32: C5's stride, so every FPN level lines up with the image)."""
    if not samples:
        raise ConfigError("collate needs at least one sample")
    if size_divisible < 1:
        raise ConfigError(f"size_divisible must be >= 1, got {size_divisible}")
    images = [s[0] for s in samples]
    for im in images:
        if im.dim() != 3 or im.shape[0] != images[0].shape[0]:
            raise ConfigError(f"collate needs [C, H, W] images with the same C, got {tuple(im.shape)}")
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    h, w = -(-h // size_divisible) * size_divisible, -(-w // size_divisible) * size_divisible
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for k, im in enumerate(images):
        out[k, :, :im.shape[1], :im.shape[2]] = im
    return DetectionBatch(out, [s[1] for s in samples], [int(s[2]) for s in samples],
                          [tuple(s[3]) for s in samples], [(int(im.shape[1]), int(im.shape[2])) for im in images])


def hflip_batch(batch: DetectionBatch, p: float = 0.5, generator: torch.Generator | None = None) -> DetectionBatch:
    """Flip each image (and its boxes) left-right with probability ``p``, within its own width, so the
    padding stays at the right. One whole-batch op when all images fill the padded width."""
    images, targets = batch.images, batch.targets
    b, _, _, w_pad = images.shape
    flip = torch.rand(b, generator=generator) < p
    if not bool(flip.any()):
        return batch
    widths = [w for _, w in batch.image_sizes]
    if all(w == w_pad for w in widths):
        mask = flip.to(images.device)[:, None, None, None]
        new_images = torch.where(mask, images.flip(-1), images)
    else:
        new_images = images.clone()
        for k in torch.nonzero(flip).flatten().tolist():
            h, w = batch.image_sizes[k]
            new_images[k, :, :h, :w] = images[k, :, :h, :w].flip(-1)
    new_targets = []
    for k, t in enumerate(targets):
        if flip[k]:
            boxes = t["boxes"]
            w = float(widths[k])
            boxes = torch.stack((w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]), dim=1)
            t = {**t, "boxes": boxes}
        new_targets.append(t)
    return batch._replace(images=new_images, targets=new_targets)
