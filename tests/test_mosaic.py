"""The Fashion-MNIST mosaic (manlearn.data.mosaic, `manlearn data make-mosaic`): COCO + mask folders."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from manlearn import cli
from manlearn.data import mosaic as mosaic_mod
from manlearn.data.mosaic import FASHION_MNIST_CLASSES, make_mosaic
from manlearn.errors import ConfigError, DatasetError

REAL_FM = "/usr/share/datasets/fashion-mnist"
pytestmark = [
    pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_FM, "train-images-idx3-ubyte.gz")),
                       reason=f"Fashion-MNIST not installed at {REAL_FM} (apt-get install dataset-fashion-mnist)"),
    # pycocotools' own decode() under numpy 2; not ours to fix.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

SMALL = dict(n_train=8, n_val=4, size=64, seed=0, data_dir=REAL_FM)


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch):
    monkeypatch.delenv("MANLEARN_DATA", raising=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("mosaic") / "m"
    summary = make_mosaic(out, **SMALL)
    return out, summary


def _png(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _tight_box(m: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def test_layout_and_summary(small):
    out, s = small
    assert sorted(os.listdir(out)) == ["annotations", "images", "masks", "mosaic.json"]
    assert s["n_train"] == 8 and s["n_val"] == 4
    for split, n in (("train", 8), ("val", 4)):
        names = sorted(os.listdir(out / "images" / split))
        assert names == [f"{i:06d}.png" for i in range(1, n + 1)]
        assert sorted(os.listdir(out / "masks" / split)) == names
        img = _png(out / "images" / split / names[0])
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        mask = _png(out / "masks" / split / names[0])
        assert mask.shape == (64, 64) and mask.dtype == np.uint8 and mask.max() <= 10


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_annotations_match_masks(small, split):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    out, s = small
    coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
    cats = coco.loadCats(coco.getCatIds())
    assert [c["id"] for c in cats] == list(range(1, 11))
    assert [c["name"] for c in cats] == list(FASHION_MNIST_CLASSES)
    assert len(coco.getImgIds()) == s[f"n_{split}"]
    assert len(coco.getAnnIds()) == s[f"annotations_{split}"] >= s[f"n_{split}"]  # >= 1 item each here
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids) and min(ann_ids) >= 1
    for img in coco.loadImgs(coco.getImgIds()):
        assert (img["width"], img["height"]) == (64, 64)
        class_map = _png(out / "masks" / split / img["file_name"])
        rebuilt = np.zeros_like(class_map)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert anns, "every canvas holds at least one item"
        for a in anns:
            assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= 10
            assert isinstance(a["segmentation"]["counts"], str)
            m = coco.annToMask(a).astype(bool)
            assert m.sum() == a["area"] > 0
            assert a["bbox"] == _tight_box(m)
            np.testing.assert_allclose(mask_utils.toBbox(a["segmentation"]), a["bbox"])
            assert not rebuilt[m].any(), "visible masks of one canvas must not overlap"
            rebuilt[m] = a["category_id"]
        np.testing.assert_array_equal(rebuilt, class_map)
        # The painted garments are what the masks say: background pixels are dark, item pixels brighter.
        rgb = _png(out / "images" / split / img["file_name"]).astype(int)
        assert rgb[class_map == 0].max() <= 32 + 30
        assert rgb[class_map > 0].max(axis=-1).mean() > rgb[class_map == 0].max(axis=-1).mean() + 20


def test_deterministic_and_seed_dependent(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    make_mosaic(again, **SMALL)
    for rel in ("images/train/000003.png", "masks/val/000002.png"):
        np.testing.assert_array_equal(_png(out / rel), _png(again / rel))
    for split in ("train", "val"):
        a = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        b = json.loads((again / "annotations" / f"instances_{split}.json").read_text())
        assert a == b
    other = tmp_path / "other"
    make_mosaic(other, **{**SMALL, "seed": 1})
    assert not np.array_equal(_png(out / "images/train/000001.png"), _png(other / "images/train/000001.png"))


def test_mask_folder_reader_reads_the_mosaic(small):
    from manlearn.segmentation import load_mask_folder

    out, _ = small
    d = load_mask_folder(out, "val")
    assert d.num_classes == 11 and d.classes[0] == "background" and d.classes[1:] == FASHION_MNIST_CLASSES
    assert tuple(d.images.shape) == (4, 3, 64, 64) and tuple(d.masks.shape) == (4, 64, 64)
    np.testing.assert_array_equal(d.masks[1].numpy(), _png(out / "masks/val/000002.png"))
    np.testing.assert_array_equal(d.images[1].permute(1, 2, 0).numpy(), _png(out / "images/val/000002.png"))


def test_refuses_to_overwrite(small, tmp_path):
    out, _ = small
    with pytest.raises(ConfigError, match="not empty.*overwrite"):
        make_mosaic(out, **SMALL)
    d = tmp_path / "x"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        make_mosaic(d, **SMALL)
    s = make_mosaic(d, **{**SMALL, "n_train": 2, "n_val": 1}, overwrite=True)
    assert s["n_train"] == 2 and len(os.listdir(d / "images" / "train")) == 2
    assert (d / "notes.txt").read_text() == "mine", "overwrite removes only the mosaic's own entries"


def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = mosaic_mod._save_png

    def failing(arr, path):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        real(arr, path)

    monkeypatch.setattr(mosaic_mod, "_save_png", failing)
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        make_mosaic(out, **SMALL)
    assert os.listdir(out) == [], "nothing half-written may stay behind"


def test_failed_overwrite_keeps_the_old_mosaic(small, tmp_path):
    """--overwrite builds the new set aside; when that fails (missing source data) the old set stays whole."""
    out, _ = small
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DatasetError):
        make_mosaic(out, **{**SMALL, "data_dir": tmp_path / "no-such-data"}, overwrite=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="max_items"):
        make_mosaic(tmp_path / "a", n_train=1, n_val=1, min_items=3, max_items=2)
    with pytest.raises(ConfigError, match="source"):
        make_mosaic(tmp_path / "b", n_train=1, n_val=1, source="coco")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_make_mosaic(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli.main(["data", "make-mosaic", "--out", str(out), "--train", "3", "--val", "2", "--size", "48",
                   "--seed", "5", "--data-dir", REAL_FM])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("mosaic: 3 train / 2 val images") and str(out) in line and "\n" not in line
    assert len(os.listdir(out / "images" / "val")) == 2
    assert _png(out / "images/train/000001.png").shape == (48, 48, 3)
    rc = cli.main(["data", "make-mosaic", "--out", str(out), "--train", "3", "--val", "2", "--size", "48"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "--overwrite" in err
    assert cli.main(["data", "make-mosaic", "--out", str(out), "--train", "2", "--val", "1", "--size", "48",
                     "--overwrite", "--data-dir", REAL_FM]) == 0
    assert len(os.listdir(out / "images" / "train")) == 2
