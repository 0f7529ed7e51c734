"""Semantic-segmentation data: image/mask folders (the mosaic) and Cityscapes, plus batched augmentation.

Like the classification readers (:mod:`manlearn.data`), a split is loaded once into uint8 tensors
(images ``[N, 3, H, W]``, masks ``[N, H, W]``) and augmented per batch on the training device, so that
decoding PNGs never limits a training step.  Every problem with the files on disk is a
:class:`~manlearn.errors.DatasetError` naming the file and saying what was expected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from manlearn.errors import ConfigError, DatasetError

__all__ = [
    "SegmentationData",
    "load_mask_folder",
    "load_cityscapes",
    "load_segmentation",
    "SegmentationAugment",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_TO_TRAIN",
    "cityscapes_lut",
]

_IMAGE_EXTS = (".png", ".jpg", ".jpeg")

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
#: Cityscapes labelId -> trainId for the 19 evaluated classes; every other labelId (void, flat/parking,
#: rail track, guard rail, bridge, tunnel, pole group, caravan, trailer, license plate) becomes 255.
CITYSCAPES_LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                             25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITYSCAPES_MAX_LABEL = 33  # labelIds are 0..33; 255 (the license plate's -1 as uint8) is also accepted

_CITYSCAPES_LAYOUT = ("Cityscapes layout: <root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
                      "<root>/gtFine/<split>/<city>/<name>_gtFine_labelIds.png (from leftImg8bit_trainvaltest.zip "
                      "and gtFine_trainvaltest.zip at https://www.cityscapes-dataset.com)")
_FOLDER_LAYOUT = ("mask-folder layout: <root>/images/<split>/<name>.png|jpg and <root>/masks/<split>/<name>.png "
                  "(single-channel class ids, 255 = ignore), as written by `manlearn data make-mosaic`")


def cityscapes_lut(ignore_index: int = 255) -> np.ndarray:
    """256-entry uint8 table mapping a labelId to its trainId (``ignore_index`` for the others)."""
    lut = np.full(256, ignore_index, dtype=np.uint8)
    for label, train in CITYSCAPES_LABEL_TO_TRAIN.items():
        lut[label] = train
    return lut


@dataclass
class SegmentationData:
    """One split in memory: ``images`` uint8 [N, 3, H, W], ``masks`` uint8 [N, H, W] of class ids in
    0..num_classes-1 or ``ignore_index``; ``names`` are the file stems (for reports and predictions)."""

    images: torch.Tensor
    masks: torch.Tensor
    num_classes: int
    ignore_index: int = 255
    classes: tuple[str, ...] | None = None
    names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DatasetError(f"segmentation images must be uint8 [N, 3, H, W], got {self.images.dtype} "
                               f"{tuple(self.images.shape)}")
        if self.masks.dtype != torch.uint8 or self.masks.dim() != 3:
            raise DatasetError(f"segmentation masks must be uint8 [N, H, W], got {self.masks.dtype} "
                               f"{tuple(self.masks.shape)}")
        if self.masks.shape[0] != self.images.shape[0] or self.masks.shape[1:] != self.images.shape[2:]:
            raise DatasetError(f"images {tuple(self.images.shape)} and masks {tuple(self.masks.shape)} do not match")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _hw(value: int | Sequence[int] | None, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    hw = (int(value), int(value)) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(hw) != 2 or min(hw) < 1:
        raise ConfigError(f"{what} must be a positive int or (height, width), got {value!r}")
    return hw  # type: ignore[return-value]


def _open(path: str):  # noqa: ANN202 - PIL image
    from PIL import Image

    try:
        im = Image.open(path)
        im.load()
        return im
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
        raise DatasetError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _read_pair(img_path: str, mask_path: str, size: tuple[int, int] | None,
               crop: tuple[int, int] | None, check: Callable[[np.ndarray, str], None]) -> tuple[np.ndarray, np.ndarray]:
    """(image [3,H,W], mask [H,W]) uint8, checked (``check`` on the raw mask), resized, centre-cropped."""
    from PIL import Image

    im = _open(img_path)
    mk = _open(mask_path)
    if mk.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
        raise DatasetError(f"{mask_path}: a mask must be a single-channel image of class ids (PNG mode L or P), "
                           f"found mode {mk.mode}")
    if im.size != mk.size:
        raise DatasetError(f"{mask_path}: mask is {mk.size[1]}x{mk.size[0]} but its image {img_path} is "
                           f"{im.size[1]}x{im.size[0]} (height x width); they must be the same size")
    raw = np.asarray(mk)
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise DatasetError(f"{mask_path}: mask values {int(raw.min())}..{int(raw.max())} do not fit 0..255")
        raw = raw.astype(np.uint8)
    check(raw, mask_path)
    im = im.convert("RGB")
    if size is not None:
        h, w = size
        im = im.resize((w, h), Image.BILINEAR)
        raw = np.asarray(Image.fromarray(raw).resize((w, h), Image.NEAREST))
    img = np.asarray(im, dtype=np.uint8)
    if crop is not None:
        ch, cw = crop
        h, w = raw.shape
        if ch > h or cw > w:
            raise ConfigError(f"crop {ch}x{cw} is larger than the {'resized ' if size else ''}image "
                              f"{h}x{w} of {img_path}")
        top, left = (h - ch) // 2, (w - cw) // 2
        img = img[top:top + ch, left:left + cw]
        raw = raw[top:top + ch, left:left + cw]
    return img.transpose(2, 0, 1), raw


def _stack(pairs: list[tuple[str, str]], size: tuple[int, int] | None, crop: tuple[int, int] | None,
           check: Callable[[np.ndarray, str], None], lut: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    for i, (ip, mp) in enumerate(pairs):
        img, mask = _read_pair(ip, mp, size, crop, check)
        if x is None:
            x = np.empty((len(pairs),) + img.shape, dtype=np.uint8)
            y = np.empty((len(pairs),) + mask.shape, dtype=np.uint8)
        elif img.shape != x.shape[1:]:
            raise DatasetError(f"{ip} is {img.shape[1]}x{img.shape[2]} but {pairs[0][0]} is {x.shape[2]}x{x.shape[3]}: "
                               "images of one split must share a size to be held as one tensor; pass size=(H, W) "
                               "to resize or crop=(H, W) to centre-crop")
        x[i] = img
        y[i] = mask if lut is None else lut[mask]  # type: ignore[index]
    assert x is not None and y is not None
    return torch.from_numpy(x), torch.from_numpy(y)


def _limit(items: list, limit: int | None) -> list:
    if limit is None:
        return items
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    return items[:limit]


def _need_dir(path: str, layout: str) -> None:
    if not os.path.isdir(path):
        what = "does not exist" if not os.path.exists(path) else "is not a folder"
        raise DatasetError(f"{path} {what}; expected the {layout}")


# ------------------------------------------------------------------------------------------ mask folders


def load_mask_folder(root: str | os.PathLike[str], split: str = "train", *, num_classes: int | None = None,
                     ignore_index: int = 255, size: int | Sequence[int] | None = None,
                     crop: int | Sequence[int] | None = None, limit: int | None = None) -> SegmentationData:
    """Images ``root/images/<split>/*.png|jpg`` with masks ``root/masks/<split>/<same stem>.png``.

    ``num_classes`` (background included) defaults to the ``classes`` of ``root/mosaic.json`` plus one when
    that file exists (the mosaic), otherwise to the largest non-ignored mask value plus one.  Masks without
    an image are ignored; an image without a mask is an error.  ``size`` resizes (bilinear images, nearest
    masks), ``crop`` centre-crops after that, ``limit`` keeps the first images (sorted by name).
    """
    root = os.fspath(root)
    size_hw, crop_hw = _hw(size, "size"), _hw(crop, "crop")
    img_dir, mask_dir = os.path.join(root, "images", split), os.path.join(root, "masks", split)
    _need_dir(img_dir, _FOLDER_LAYOUT)
    _need_dir(mask_dir, _FOLDER_LAYOUT)
    files = sorted(f for f in os.listdir(img_dir) if f.lower().endswith(_IMAGE_EXTS)
                   and os.path.isfile(os.path.join(img_dir, f)))
    if not files:
        raise DatasetError(f"{img_dir} holds no .png/.jpg images; expected the {_FOLDER_LAYOUT}")
    stems = [os.path.splitext(f)[0] for f in files]
    dup = sorted({s for s in stems if stems.count(s) > 1}) if len(set(stems)) != len(stems) else []
    if dup:
        raise DatasetError(f"{img_dir}: several images share a name stem ({', '.join(dup[:3])}): "
                           "each needs its own mask <stem>.png")
    missing = [f for f, s in zip(files, stems) if not os.path.isfile(os.path.join(mask_dir, s + ".png"))]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(files)} images in {img_dir} have no mask in {mask_dir} "
                           f"(e.g. {', '.join(missing[:3])} -> <stem>.png)")
    classes = None
    meta = os.path.join(root, "mosaic.json")
    if os.path.isfile(meta):
        try:
            with open(meta) as f:
                classes = ("background",) + tuple(json.load(f)["classes"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{meta}: not a readable mosaic description ({type(e).__name__}: {e})") from None
        if num_classes is None:
            num_classes = len(classes)
    keep = _limit(list(zip(files, stems)), limit)
    pairs = [(os.path.join(img_dir, f), os.path.join(mask_dir, s + ".png")) for f, s in keep]

    def check(mask: np.ndarray, path: str) -> None:
        if num_classes is None:
            return
        bad = (mask >= num_classes) & (mask != ignore_index)
        if bad.any():
            vals = np.unique(mask[bad])
            raise DatasetError(f"{path}: mask values {', '.join(map(str, vals[:5].tolist()))} are out of range: "
                               f"class ids must lie in 0..{num_classes - 1} or be {ignore_index} (ignore)")

    images, masks = _stack(pairs, size_hw, crop_hw, check, None)
    if num_classes is None:
        valid = masks[masks != ignore_index]
        num_classes = max(2, int(valid.max()) + 1 if valid.numel() else 2)
    if classes is not None and len(classes) != num_classes:
        classes = None
    return SegmentationData(images, masks, int(num_classes), ignore_index, classes,
                            tuple(s for _, s in keep))


# -------------------------------------------------------------------------------------------- Cityscapes


def load_cityscapes(root: str | os.PathLike[str], split: str = "train", *, size: int | Sequence[int] | None = None,
                    crop: int | Sequence[int] | None = None, limit: int | None = None,
                    ignore_index: int = 255) -> SegmentationData:
    """Cityscapes fine annotations: labelIds mapped to the 19 trainIds, everything else ``ignore_index``.

    Full-resolution Cityscapes is 1024x2048 (6 MB a frame as uint8): pass ``size`` (e.g. (512, 1024)) to
    hold a whole split in memory.  Frames are ordered by city, then name.
    """
    root = os.fspath(root)
    size_hw, crop_hw = _hw(size, "size"), _hw(crop, "crop")
    img_root, gt_root = os.path.join(root, "leftImg8bit", split), os.path.join(root, "gtFine", split)
    _need_dir(img_root, _CITYSCAPES_LAYOUT)
    _need_dir(gt_root, _CITYSCAPES_LAYOUT)
    suffix = "_leftImg8bit.png"
    pairs: list[tuple[str, str]] = []
    names: list[str] = []
    missing: list[str] = []
    for city in sorted(e.name for e in os.scandir(img_root) if e.is_dir()):
        for f in sorted(os.listdir(os.path.join(img_root, city))):
            if not f.endswith(suffix):
                continue
            base = f[: -len(suffix)]
            gt = os.path.join(gt_root, city, base + "_gtFine_labelIds.png")
            if not os.path.isfile(gt):
                missing.append(os.path.join(city, f))
            pairs.append((os.path.join(img_root, city, f), gt))
            names.append(base)
    if not pairs:
        raise DatasetError(f"{img_root} holds no <city>/*{suffix} images; expected the {_CITYSCAPES_LAYOUT}")
    if missing:
        raise DatasetError(f"{len(missing)} of {len(pairs)} images in {img_root} have no "
                           f"*_gtFine_labelIds.png in {gt_root} (e.g. {', '.join(missing[:3])})")
    keep = _limit(list(zip(pairs, names)), limit)

    def check(mask: np.ndarray, path: str) -> None:
        bad = (mask > _CITYSCAPES_MAX_LABEL) & (mask != 255)
        if bad.any():
            vals = np.unique(mask[bad])
            raise DatasetError(f"{path}: labelIds {', '.join(map(str, vals[:5].tolist()))} are out of range "
                               f"(Cityscapes labelIds lie in 0..{_CITYSCAPES_MAX_LABEL}); is this a labelIds "
                               "file (not *_color.png / *_instanceIds.png)?")

    images, masks = _stack([p for p, _ in keep], size_hw, crop_hw, check, cityscapes_lut(ignore_index))
    return SegmentationData(images, masks, len(CITYSCAPES_CLASSES), ignore_index, CITYSCAPES_CLASSES,
                            tuple(n for _, n in keep))


def load_segmentation(kind: str, root: str | os.PathLike[str], split: str = "train", **kwargs) -> SegmentationData:
    """``kind`` = ``"folder"`` / ``"mosaic"`` (:func:`load_mask_folder`) or ``"cityscapes"``."""
    if kind in ("folder", "mosaic"):
        return load_mask_folder(root, split, **kwargs)
    if kind == "cityscapes":
        return load_cityscapes(root, split, **kwargs)
    raise ConfigError(f"unknown segmentation dataset format {kind!r}; choose folder, mosaic or cityscapes")


# ------------------------------------------------------------------------------------------ augmentation


class SegmentationAugment:
    """Batched augmentation applied identically to images and their masks, on whatever device they are.

    * ``flip``: each sample is mirrored left-right with probability 1/2.
    * ``scale=(lo, hi)``: each sample is rescaled by a factor drawn uniformly from [lo, hi] and a random
      window of the output size is cut from it (areas outside the image are 0 in the image and
      ``ignore_index`` in the mask), with bilinear sampling for images and nearest for masks.
    * ``crop=(h, w)``: output size (default: the input size); without ``scale`` a plain random crop.

    ``images`` may be uint8 (returned uint8) or float; ``masks`` keep their dtype.  All randomness comes
    from ``generator`` (CPU), so a seeded generator reproduces a batch exactly.
    """

    def __init__(self, flip: bool = True, scale: Sequence[float] | None = None,
                 crop: int | Sequence[int] | None = None, ignore_index: int = 255) -> None:
        if scale is not None:
            lo, hi = (float(s) for s in scale)
            if not 0 < lo <= hi:
                raise ConfigError(f"scale must be (low, high) with 0 < low <= high, got {tuple(scale)}")
            self.scale: tuple[float, float] | None = (lo, hi)
        else:
            self.scale = None
        self.flip = bool(flip)
        self.crop = _hw(crop, "crop")
        self.ignore_index = int(ignore_index)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or masks.dim() != 3 or images.shape[0] != masks.shape[0] \
                or images.shape[-2:] != masks.shape[-2:]:
            raise ValueError(f"expected images [B, C, H, W] and masks [B, H, W] of one size, got "
                             f"{tuple(images.shape)} and {tuple(masks.shape)}")
        b, _, h, w = images.shape
        dev = images.device
        flips = torch.rand(b, generator=generator) < 0.5 if self.flip else torch.zeros(b, dtype=torch.bool)
        if self.scale is None and self.crop is None:  # exact, no resampling
            f = flips.to(dev)
            images = torch.where(f[:, None, None, None], images.flip(-1), images)
            masks = torch.where(f[:, None, None], masks.flip(-1), masks)
            return images, masks
        ch, cw = self.crop or (h, w)
        if self.scale is None:
            s = torch.ones(b, dtype=torch.float64)
        else:
            lo, hi = self.scale
            s = lo + (hi - lo) * torch.rand(b, generator=generator, dtype=torch.float64)
        # Top-left corner of the window in the scaled image, integer pixels; negative = padding.
        oy = (torch.rand(b, generator=generator, dtype=torch.float64) * (s * h - ch)).round()
        ox = (torch.rand(b, generator=generator, dtype=torch.float64) * (s * w - cw)).round()
        # Output pixel (u + 0.5) maps to source pixel (o + u + 0.5) / s; in normalised coordinates
        # (align_corners=False) that is x_src = cw / (s w) * x_out + (2 ox + cw) / (s w) - 1.
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        sign = torch.where(flips, -1.0, 1.0).to(torch.float64)
        theta[:, 0, 0] = sign * cw / (s * w)
        theta[:, 0, 2] = sign * ((2 * ox + cw) / (s * w) - 1)
        theta[:, 1, 1] = ch / (s * h)
        theta[:, 1, 2] = (2 * oy + ch) / (s * h) - 1
        grid = F.affine_grid(theta.to(dev, torch.float32), [b, 1, ch, cw], align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if images.dtype == torch.uint8:
            out = out.round_().clamp_(0, 255).to(torch.uint8)
        # Masks shifted by one so that zero padding marks "outside" and becomes ignore_index.
        m = F.grid_sample((masks.float() + 1)[:, None], grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)[:, 0]
        m = torch.where(m == 0, torch.full_like(m, self.ignore_index), m - 1)
        return out, m.to(masks.dtype)
