"""COCO-format reader, collate / flip, and COCO mAP, on a tiny COCO set written by the test."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from manlearn.detection import CocoDetection, coco_map, collate, hflip_batch, load_coco_annotations, resized_size
from manlearn.errors import ConfigError, DatasetError

# image id -> (file, height, width, PIL mode)
IMAGES = {11: ("a.png", 48, 64, "RGB"), 12: ("b.png", 80, 40, "L"), 13: ("c.png", 64, 64, "RGB")}
# (id, image, category, [x, y, w, h], iscrowd)
ANNS = [(1, 11, 7, [4, 6, 20, 10], 0), (2, 11, 3, [30, 10, 25, 30], 0), (3, 11, 3, [0, 0, 10, 10], 1),
        (4, 12, 3, [5, 5, 20, 40], 0), (5, 12, 7, [10, 50, 25, 25], 0)]
CATS = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]  # sorted: 3 -> label 0, 7 -> label 1


def _pixels(h, w, seed, mode):
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, 3)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _coco_dict():
    return {
        "images": [{"id": i, "file_name": f, "height": h, "width": w} for i, (f, h, w, _) in IMAGES.items()],
        "annotations": [{"id": a, "image_id": i, "category_id": c, "bbox": b, "iscrowd": cr,
                         **({"area": b[2] * b[3]} if a % 2 else {})} for a, i, c, b, cr in ANNS],
        "categories": CATS,
    }


@pytest.fixture()
def coco(tmp_path):
    img_dir = tmp_path / "images" / "train"
    img_dir.mkdir(parents=True)
    for i, (f, h, w, mode) in IMAGES.items():
        Image.fromarray(_pixels(h, w, i, mode), mode).save(img_dir / f)
    (tmp_path / "annotations").mkdir()
    ann = tmp_path / "annotations" / "instances_train.json"
    ann.write_text(json.dumps(_coco_dict()))
    return tmp_path, str(img_dir), str(ann)


def _write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


# ------------------------------------------------------------------ reader

@pytest.mark.parametrize("cache", [True, False])
def test_reader_without_resize(coco, cache):
    _, img_dir, ann = coco
    ds = CocoDetection(img_dir, ann, min_size=None, max_size=None, cache_images=cache)
    assert len(ds) == 3 and ds.image_ids == [11, 12, 13]
    assert ds.num_classes == 2 and ds.label_to_category == [3, 7] and ds.category_to_label == {3: 0, 7: 1}
    assert ds.class_names == ["three", "seven"]
    img, target, iid, scale = ds[0]
    assert iid == 11 and scale == (1.0, 1.0)
    assert img.dtype == torch.uint8 and img.shape == (3, 48, 64)
    assert torch.equal(img, torch.from_numpy(_pixels(48, 64, 11, "RGB")).permute(2, 0, 1))
    # crowd box dropped, xywh -> xyxy, category ids -> labels
    assert target["boxes"].tolist() == [[4, 6, 24, 16], [30, 10, 55, 40]]
    assert target["labels"].tolist() == [1, 0]
    img, target, _, _ = ds[1]  # a grey image comes out as 3 equal channels
    assert img.shape == (3, 80, 40) and torch.equal(img[0], img[2])
    assert torch.equal(img[1], torch.from_numpy(_pixels(80, 40, 12, "L")))
    assert target["labels"].tolist() == [0, 1]
    img, target, _, _ = ds[2]  # an image without annotations stays, with an empty target
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["labels"].dtype == torch.long
    assert len(CocoDetection(img_dir, ann, min_size=None, max_size=None, skip_empty=True)) == 2


def test_reader_resizes_images_and_boxes(coco):
    _, img_dir, ann = coco
    assert resized_size(48, 64, 32, 50) == (32, 43)  # shorter side 32
    assert resized_size(80, 40, 32, 50) == (50, 25)  # longer side capped at 50
    assert resized_size(128, 128, 128, 128) == (128, 128)
    ds = CocoDetection(img_dir, ann, min_size=32, max_size=50)
    img, target, _, (sx, sy) = ds[0]
    assert img.shape == (3, 32, 43) and (sx, sy) == (43 / 64, 32 / 48)
    assert torch.allclose(target["boxes"], torch.tensor([[4 * sx, 6 * sy, 24 * sx, 16 * sy],
                                                         [30 * sx, 10 * sy, 55 * sx, 40 * sy]]))
    img, target, _, (sx, sy) = ds[1]
    assert img.shape == (3, 50, 25) and sx == sy == 0.625
    # already at the target size (e.g. 64x64 mosaics with min_size = max_size = 64): untouched
    ds = CocoDetection(img_dir, ann, min_size=64, max_size=64)
    img, _, _, scale = ds[2]
    assert scale == (1.0, 1.0) and torch.equal(img, torch.from_numpy(_pixels(64, 64, 13, "RGB")).permute(2, 0, 1))


def test_from_root_layout(coco):
    root, _, _ = coco
    ds = CocoDetection.from_root(root, "train", min_size=None, max_size=None)
    assert len(ds) == 3


def test_reader_errors(coco, tmp_path):
    root, img_dir, ann = coco
    with pytest.raises(DatasetError, match="annotation file not found.*\n.*make-mosaic"):
        CocoDetection(img_dir, str(tmp_path / "nope.json"))
    with pytest.raises(DatasetError, match="not valid JSON"):
        CocoDetection(img_dir, _write(tmp_path / "bad.json", '{"images": [1, 2'))
    with pytest.raises(DatasetError, match="not a JSON object"):
        load_coco_annotations(_write(tmp_path / "list.json", "[]"))
    d = _coco_dict()
    del d["categories"]
    with pytest.raises(DatasetError, match="no 'categories' key"):
        load_coco_annotations(_write(tmp_path / "nocat.json", d))
    d = _coco_dict()
    d["annotations"][1]["image_id"] = 99
    with pytest.raises(DatasetError, match="image id 99, which is not in 'images'"):
        load_coco_annotations(_write(tmp_path / "badimg.json", d))
    d = _coco_dict()
    d["annotations"][0]["category_id"] = 5
    with pytest.raises(DatasetError, match="category id 5"):
        load_coco_annotations(_write(tmp_path / "badcat.json", d))
    d = _coco_dict()
    d["annotations"][0]["bbox"] = [1, 2, 3]
    with pytest.raises(DatasetError, match="bbox"):
        load_coco_annotations(_write(tmp_path / "badbox.json", d))
    d = _coco_dict()
    del d["images"][0]["file_name"]
    with pytest.raises(DatasetError, match="'file_name'"):
        load_coco_annotations(_write(tmp_path / "noname.json", d))
    os.remove(os.path.join(img_dir, "b.png"))
    with pytest.raises(DatasetError, match=r"1 of the 3 images .* missing.*b\.png"):
        CocoDetection(img_dir, ann)
    lazy = CocoDetection(img_dir, ann, check_files=False, cache_images=False)
    with pytest.raises(DatasetError, match="not found"):
        lazy[1]
    with open(os.path.join(img_dir, "b.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(DatasetError, match="not a readable image"):
        CocoDetection(img_dir, ann, cache_images=False)[1]
    with pytest.raises(DatasetError, match="image folder not found"):
        CocoDetection(str(root / "missing"), ann)
    with pytest.raises(ConfigError):
        CocoDetection(img_dir, ann, min_size=100, max_size=50)


# ------------------------------------------------------------------ collate / flip

def test_collate_pads_to_multiples_of_32_and_flips(coco):
    _, img_dir, ann = coco
    ds = CocoDetection(img_dir, ann, min_size=None, max_size=None)
    batch = collate([ds[0], ds[1]])
    assert batch.images.shape == (2, 3, 96, 64) and batch.images.dtype == torch.uint8
    assert batch.image_sizes == [(48, 64), (80, 40)] and batch.image_ids == [11, 12]
    assert batch.scales == [(1.0, 1.0), (1.0, 1.0)]
    assert torch.equal(batch.images[0, :, :48, :64], ds[0].image)
    assert batch.images[0, :, 48:].sum() == 0 and batch.images[1, :, :, 40:].sum() == 0
    assert ds.get_batch([1, 0]).image_ids == [12, 11]

    flipped = hflip_batch(batch, p=1.0)
    # each image mirrored within its own width; padding stays at the right
    assert torch.equal(flipped.images[1, :, :80, :40], ds[1].image.flip(-1))
    assert flipped.images[1, :, :, 40:].sum() == 0
    assert flipped.targets[0]["boxes"].tolist() == [[40, 6, 60, 16], [9, 10, 34, 40]]
    assert flipped.targets[0]["labels"].tolist() == [1, 0]
    twice = hflip_batch(flipped, p=1.0)
    assert torch.equal(twice.images, batch.images)
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(twice.targets, batch.targets))
    assert hflip_batch(batch, p=0.0) is batch
    # same-width batch: the whole-batch path; the pixel under a box moves with it
    same = collate([ds[2], ds[2]], size_divisible=32)
    g = torch.Generator().manual_seed(3)
    out = hflip_batch(same, p=0.5, generator=g)
    g = torch.Generator().manual_seed(3)
    chosen = torch.rand(2, generator=g) < 0.5
    for k in range(2):
        want = same.images[k].flip(-1) if chosen[k] else same.images[k]
        assert torch.equal(out.images[k], want)


# ------------------------------------------------------------------ COCO mAP

def _perfect(ds):
    preds = {}
    for k in range(len(ds)):
        _, t, iid, _ = ds[k]
        preds[iid] = {"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
    return preds


@pytest.mark.parametrize("sizes", [(None, None), (32, 50)])
def test_coco_map_perfect_predictions(coco, sizes):
    _, img_dir, ann = coco
    ds = CocoDetection(img_dir, ann, min_size=sizes[0], max_size=sizes[1])
    m = coco_map(ds, _perfect(ds))
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for v in m.values())


def test_coco_map_with_annotation_file_in_original_pixels(coco):
    _, img_dir, ann = coco
    ds = CocoDetection(img_dir, ann, min_size=None, max_size=None)
    assert coco_map(ann, _perfect(ds))["AP"] == pytest.approx(1.0)


def test_coco_map_wrong_predictions_score_low(coco):
    _, img_dir, ann = coco
    ds = CocoDetection(img_dir, ann, min_size=None, max_size=None)
    perfect = _perfect(ds)
    # labels swapped: every box has the other class
    swapped = {i: {**p, "labels": 1 - p["labels"]} for i, p in perfect.items()}
    assert coco_map(ds, swapped)["AP"] == pytest.approx(0.0)
    # boxes shifted to the wrong place in the image
    moved = {i: {**p, "boxes": p["boxes"].flip(0)} for i, p in perfect.items()}
    assert coco_map(ds, moved)["AP"] < 0.2
    # boxes a few pixels off: found at IoU 0.5 only sometimes, never at 0.75
    nudged = {i: {**p, "boxes": p["boxes"] + 3} for i, p in perfect.items()}
    m = coco_map(ds, nudged)
    assert 0.0 < m["AP"] < 0.5 and m["AP75"] == 0.0
    # predictions of another image
    crossed = {11: perfect[12], 12: perfect[11]}
    assert coco_map(ds, crossed)["AP"] < 0.2
    # no detections at all: zeros, no crash
    empty = {i: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
             for i in perfect}
    assert coco_map(ds, empty) == {k: 0.0 for k in coco_map(ds, {})}
    assert coco_map(ds, {})["AP"] == 0.0
    with pytest.raises(ConfigError, match="image id 5"):
        coco_map(ds, {5: perfect[11]})
