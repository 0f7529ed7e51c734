"""Segmentation readers (Cityscapes, image/mask folders) on tiny trees written here, and the augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from manlearn.errors import ConfigError, DatasetError
from manlearn.segmentation import (
    CITYSCAPES_CLASSES,
    SegmentationAugment,
    load_cityscapes,
    load_mask_folder,
    load_segmentation,
)


def _save(arr: np.ndarray, path, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- Cityscapes

# (labelId written, trainId expected) on row 0 of the first frame
PROBES = [(7, 0), (8, 1), (26, 13), (33, 18), (24, 11), (0, 255), (6, 255), (30, 255), (255, 255), (11, 2),
          (21, 8), (23, 10), (31, 16), (9, 255), (17, 5), (19, 6)]


def _cityscapes(root, split="train", h=8, w=16):
    frames = [("aachen", "aachen_000001_000019"), ("aachen", "aachen_000000_000019"), ("bonn", "bonn_000000_000019")]
    for k, (city, base) in enumerate(frames):
        _save(_rgb(h, w, k), root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png")
        lab = np.full((h, w), 7, dtype=np.uint8)
        lab[1:, :] = 26
        if k == 1:  # the first frame once sorted
            lab[0, : len(PROBES)] = [p for p, _ in PROBES]
        _save(lab, root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png")
        # Files a Cityscapes release also has next to labelIds; they must be ignored.
        _save(np.zeros((h, w, 3), np.uint8), root / "gtFine" / split / city / f"{base}_gtFine_color.png")
    return root


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    d = load_cityscapes(_cityscapes(tmp_path))
    assert d.num_classes == 19 and d.classes == CITYSCAPES_CLASSES and d.ignore_index == 255
    assert d.names == ("aachen_000000_000019", "aachen_000001_000019", "bonn_000000_000019")
    assert tuple(d.images.shape) == (3, 3, 8, 16) and d.images.dtype == torch.uint8
    assert tuple(d.masks.shape) == (3, 8, 16) and d.masks.dtype == torch.uint8
    assert d.masks[0, 0, : len(PROBES)].tolist() == [t for _, t in PROBES]
    assert (d.masks[:, 1:] == 13).all() and (d.masks[1:, 0] == 0).all()
    raw = np.asarray(Image.open(tmp_path / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"))
    np.testing.assert_array_equal(d.images[0].permute(1, 2, 0).numpy(), raw)
    assert load_segmentation("cityscapes", tmp_path, "train", limit=2).names == d.names[:2]


def test_cityscapes_resize_and_crop(tmp_path):
    root = _cityscapes(tmp_path)
    d = load_cityscapes(root, size=(4, 8))
    assert tuple(d.images.shape) == (3, 3, 4, 8) and tuple(d.masks.shape) == (3, 4, 8)
    assert set(d.masks.unique().tolist()) <= {0, 13, 255} | {t for _, t in PROBES}  # nearest: no blends
    assert (d.masks[:, 2:] == 13).all()
    c = load_cityscapes(root, crop=(4, 6))
    full = load_cityscapes(root)
    assert torch.equal(c.masks, full.masks[:, 2:6, 5:11]) and torch.equal(c.images, full.images[:, :, 2:6, 5:11])
    with pytest.raises(ConfigError, match="larger"):
        load_cityscapes(root, crop=(9, 4))


def test_cityscapes_errors(tmp_path):
    with pytest.raises(DatasetError, match="leftImg8bit.*does not exist.*Cityscapes layout"):
        load_cityscapes(tmp_path)
    root = _cityscapes(tmp_path / "a")
    with pytest.raises(DatasetError, match="gtFine/val does not exist"):
        (root / "leftImg8bit" / "val").mkdir()
        load_cityscapes(root, "val")
    # image without its labelIds
    (root / "gtFine/train/bonn/bonn_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetError, match="1 of 3 images.*no \\*_gtFine_labelIds.png.*bonn_000000_000019"):
        load_cityscapes(root)

    root = _cityscapes(tmp_path / "b")
    (root / "gtFine/train/bonn/bonn_000000_000019_gtFine_labelIds.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DatasetError, match="bonn_000000_000019_gtFine_labelIds.png: not a readable image"):
        load_cityscapes(root)

    root = _cityscapes(tmp_path / "c")
    _save(np.full((8, 15), 7, np.uint8), root / "gtFine/train/bonn/bonn_000000_000019_gtFine_labelIds.png")
    with pytest.raises(DatasetError, match="mask is 8x15 but its image .* is 8x16"):
        load_cityscapes(root)

    root = _cityscapes(tmp_path / "d")
    bad = np.full((8, 16), 7, np.uint8)
    bad[3, 3] = 40
    _save(bad, root / "gtFine/train/bonn/bonn_000000_000019_gtFine_labelIds.png")
    with pytest.raises(DatasetError, match="labelIds 40 are out of range"):
        load_cityscapes(root)

    root = _cityscapes(tmp_path / "e")
    _save(np.zeros((8, 16, 3), np.uint8), root / "gtFine/train/bonn/bonn_000000_000019_gtFine_labelIds.png")
    with pytest.raises(DatasetError, match="single-channel.*mode RGB"):
        load_cityscapes(root)


# --------------------------------------------------------------------------------------------- mask folders


def _folder(root, n=3, h=6, w=10, split="train"):
    for i in range(n):
        _save(_rgb(h, w, i), root / "images" / split / f"img{i}.png")
        m = np.zeros((h, w), np.uint8)
        m[:, : w // 2] = i
        m[0, 0] = 255
        _save(m, root / "masks" / split / f"img{i}.png")
    return root


def test_mask_folder_reads_pairs(tmp_path):
    root = _folder(tmp_path)
    _save(_rgb(6, 10, 9), root / "images" / "train" / "img3.jpg")
    _save(np.full((6, 10), 2, np.uint8), root / "masks" / "train" / "img3.png")
    _save(np.ones((6, 10), np.uint8), root / "masks" / "train" / "orphan.png")  # mask without image: ignored
    d = load_mask_folder(root, "train")
    assert d.names == ("img0", "img1", "img2", "img3")
    assert d.num_classes == 3 and d.classes is None  # inferred: largest non-ignored value + 1
    assert tuple(d.images.shape) == (4, 3, 6, 10) and tuple(d.masks.shape) == (4, 6, 10)
    assert d.masks[2, 0, 0] == 255 and (d.masks[2, 1:, :5] == 2).all() and (d.masks[2, :, 5:] == 0).all()
    np.testing.assert_array_equal(d.images[1].permute(1, 2, 0).numpy(), _rgb(6, 10, 1))
    assert load_mask_folder(root, "train", num_classes=5).num_classes == 5
    r = load_mask_folder(root, "train", size=3, limit=2)
    assert tuple(r.images.shape) == (2, 3, 3, 3) and set(r.masks.unique().tolist()) <= {0, 1, 255}


def test_mask_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="images/train does not exist.*make-mosaic"):
        load_mask_folder(tmp_path / "nothing")
    root = _folder(tmp_path / "a")
    (root / "masks/train/img1.png").unlink()
    with pytest.raises(DatasetError, match="1 of 3 images .* have no mask .*img1.png"):
        load_mask_folder(root)

    root = _folder(tmp_path / "b")
    with pytest.raises(DatasetError, match="img2.png: mask values 2 are out of range.*0..1"):
        load_mask_folder(root, num_classes=2)

    root = _folder(tmp_path / "c")
    _save(np.zeros((6, 9), np.uint8), root / "masks/train/img0.png")
    with pytest.raises(DatasetError, match="mask is 6x9 but its image .* is 6x10"):
        load_mask_folder(root)

    root = _folder(tmp_path / "d")
    (root / "images/train/img1.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="img1.png: not a readable image"):
        load_mask_folder(root)

    root = _folder(tmp_path / "e")
    _save(_rgb(7, 10, 0), root / "images/train/img2.png")
    _save(np.zeros((7, 10), np.uint8), root / "masks/train/img2.png")
    with pytest.raises(DatasetError, match="share a size.*size="):
        load_mask_folder(root)
    assert tuple(load_mask_folder(root, size=(5, 5)).masks.shape) == (3, 5, 5)


# --------------------------------------------------------------------------------------------- augmentation


def _paired_batch(b=6, h=24, w=32):
    """Masks of large blocks; the image's first channel is 20 * mask, so alignment can be checked."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 5, (b, h // 8, w // 8), generator=g, dtype=torch.uint8)
    masks = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    masks[:, :, :3] = torch.arange(3, dtype=torch.uint8)  # left edge is asymmetric, so a flip is visible
    images = torch.stack([masks * 20, torch.full_like(masks, 7), masks], dim=1)
    return images, masks


def test_flip_is_applied_identically():
    images, masks = _paired_batch()
    aug = SegmentationAugment(flip=True)
    x, m = aug(images, masks, torch.Generator().manual_seed(1))
    assert x.dtype == torch.uint8 and m.dtype == torch.uint8
    assert torch.equal(x[:, 0], m * 20) and torch.equal(x[:, 2], m)
    flipped = [bool(torch.equal(m[i], masks[i].flip(-1))) and not torch.equal(m[i], masks[i]) for i in range(6)]
    kept = [bool(torch.equal(m[i], masks[i])) for i in range(6)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    x2, m2 = aug(images, masks, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and torch.equal(m, m2)


def test_random_crop_without_scale_is_exact():
    images, masks = _paired_batch()
    aug = SegmentationAugment(flip=True, crop=(16, 20))
    x, m = aug(images, masks, torch.Generator().manual_seed(2))
    assert tuple(x.shape) == (6, 3, 16, 20) and tuple(m.shape) == (6, 16, 20)
    assert torch.equal(x[:, 0], m * 20) and (m != 255).all()
    for i in range(6):  # each output is a window of the (possibly flipped) input
        found = any(torch.equal(m[i], src[y:y + 16, x0:x0 + 20])
                    for src in (masks[i], masks[i].flip(-1)) for y in range(9) for x0 in range(13))
        assert found


def test_scale_crop_keeps_image_and_mask_aligned_and_pads_with_ignore():
    images, masks = _paired_batch()
    x, m = SegmentationAugment(flip=True, scale=(0.5, 2.0), crop=(24, 32))(images, masks,
                                                                      torch.Generator().manual_seed(3))
    assert tuple(x.shape) == (6, 3, 24, 32) and m.dtype == torch.uint8
    assert set(m.unique().tolist()) <= set(masks.unique().tolist()) | {255}
    inside = m != 255
    def agree(mask):  # image within half a class step of what the mask says
        return ((x[:, 0].int() - mask.int() * 20).abs() <= 10)[inside].float().mean()

    # Bilinear edges differ (~5 %); a mask off by one pixel agrees ~84 %, a mirrored one ~30 %.
    assert agree(m) > 0.92 and agree(m.roll(1, -1)) < agree(m) - 0.05 and agree(m.flip(-1)) < 0.6
    x, m = SegmentationAugment(flip=False, scale=(0.5, 0.5))(images, masks, torch.Generator().manual_seed(4))
    pad = m == 255
    assert pad.float().mean() == pytest.approx(0.75, abs=0.05) and (x[:, 0][pad] == 0).all()
