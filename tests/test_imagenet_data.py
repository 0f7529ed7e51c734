"""Streamed class-per-folder data at ImageNet scale: indexing, Pillow decoding, random-resized-crop +
flip, resize/centre-crop for evaluation, determinism independent of workers, exact resume, trainer."""
from __future__ import annotations

import os
import random

import pytest
import torch

from manlearn import ConfigError, DatasetError
from manlearn.config import TrainConfig
from manlearn.data import StreamingLoader, get_dataset_info, index_image_folder, load_dataset
from manlearn.data.imagenet import center_crop_box, decode_image, random_resized_crop_box

CLASSES = ("n01", "n02", "n03")


def _img(path, w, h, seed, fmt):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    k = 0
    for c, cls in enumerate(CLASSES):
        for i in range(4):
            w, h = (50 + 7 * i, 40 + 5 * c)
            _img(str(root / "train" / cls / f"{i}.JPEG"), w, h, k, "JPEG")
            k += 1
        _img(str(root / "val" / cls / "v.png"), 48, 36, 100 + c, "PNG")
    return root


def test_index_and_info(folder):
    tr = index_image_folder("train", data_dir=folder, image_size=32)
    assert tr.classes == CLASSES and len(tr) == 12 and tr.info.num_classes == 3 and tr.info.image_size == 32
    assert [lbl for _, lbl in tr.samples] == [0] * 4 + [1] * 4 + [2] * 4
    assert tr.info.mean == pytest.approx((0.485, 0.456, 0.406))
    te = index_image_folder("test", data_dir=folder)  # val/ ; default crop 224
    assert len(te) == 3 and te.info.image_size == 224
    small = index_image_folder("train", data_dir=folder, limit=5)
    assert len(small) == 5 and len({lbl for _, lbl in small.samples}) > 1  # a seeded sample, not the first 5
    assert get_dataset_info("imagenet").num_classes == 1000
    with pytest.raises(ConfigError, match="streamed"):
        load_dataset("imagenet", data_dir=folder)


def test_index_errors(tmp_path):
    with pytest.raises(DatasetError, match="train/"):
        index_image_folder("train", data_dir=tmp_path)
    _img(str(tmp_path / "train" / "a" / "0.png"), 20, 20, 0, "PNG")
    with pytest.raises(DatasetError, match="neither val/ nor test/"):
        index_image_folder("test", data_dir=tmp_path)
    _img(str(tmp_path / "val" / "zebra" / "0.png"), 20, 20, 0, "PNG")
    with pytest.raises(DatasetError, match="zebra"):
        index_image_folder("test", data_dir=tmp_path)
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"\x89PNG broken")
    data = index_image_folder("train", data_dir=tmp_path, image_size=16)
    with pytest.raises(DatasetError, match="1.png"):
        list(StreamingLoader(data, 2, train=False, workers=0).epoch(0))


def test_crop_boxes():
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(20, 400), rng.randint(20, 400)
        left, top, cw, ch = random_resized_crop_box(w, h, rng)
        assert 0 <= left and 0 <= top and left + cw <= w and top + ch <= h and cw > 0 and ch > 0
        area = cw * ch / (w * h)
        assert area <= 1.0
    # resize the shorter side to 256, centre-crop 224 == centre square of 224/256 of the shorter side
    assert center_crop_box(512, 400, 224, 256) == pytest.approx((81.0, 25.0, 350.0, 350.0))


def test_decode_train_and_eval(folder):
    path = str(folder / "val" / "n01" / "v.png")
    from PIL import Image

    ev = decode_image(path, 16, train=False)
    assert ev.dtype == torch.uint8 and ev.shape == (3, 16, 16)
    with Image.open(path) as im:  # same as Pillow's resize of the centre box
        # 48x36, resize 18 (= 16 * 256/224) then crop 16: a 32x32 source box at (8, 2)
        want = im.convert("RGB").resize((16, 16), Image.BILINEAR, box=(8.0, 2.0, 40.0, 34.0))
    want = torch.from_numpy(__import__("numpy").asarray(want).transpose(2, 0, 1).copy())
    assert torch.equal(ev, want)
    a = decode_image(path, 16, train=True, rng=random.Random(3))
    b = decode_image(path, 16, train=True, rng=random.Random(3))
    c = decode_image(path, 16, train=True, rng=random.Random(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_loader_batches_are_deterministic_and_resume_exactly(folder):
    data = index_image_folder("train", data_dir=folder, image_size=24)
    inline = StreamingLoader(data, 4, train=True, seed=7, workers=0)
    assert len(inline) == 3
    batches = list(inline.epoch(1))
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 24, 24) and batches[0][0].dtype == torch.float32
    assert batches[0][1].dtype == torch.int64
    again = list(StreamingLoader(data, 4, train=True, seed=7, workers=0).epoch(1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    resumed = list(inline.epoch(1, start_batch=2))
    assert len(resumed) == 1 and torch.equal(resumed[0][0], batches[2][0])
    other_epoch = list(inline.epoch(2))
    assert not torch.equal(other_epoch[0][0], batches[0][0])
    # normalised with the ImageNet mean/std: values cover roughly [-2.1, 2.6]
    x = torch.cat([b[0] for b in batches])
    assert x.min() >= -2.2 and x.max() <= 2.7
    ev = StreamingLoader(data, 5, train=False, workers=0)
    assert len(ev) == 3 and [len(y) for _, y in ev.epoch(0)] == [5, 5, 2]
    assert torch.equal(torch.cat([y for _, y in ev.epoch(0)]), torch.tensor([0] * 4 + [1] * 4 + [2] * 4))


def test_workers_give_the_same_batches(folder):
    data = index_image_folder("train", data_dir=folder, image_size=24)
    inline = list(StreamingLoader(data, 4, train=True, seed=1, workers=0).epoch(0))
    pooled = list(StreamingLoader(data, 4, train=True, seed=1, workers=2).epoch(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(inline, pooled))


def test_trainer_runs_on_a_streamed_folder(folder, tmp_path):
    from manlearn.train import Trainer

    cfg = TrainConfig(dataset="imagenet", data_dir=str(folder), image_size=32, model="resnet20", method="manpp",
                      base="infopro", K=3, batch_size=4, eval_batch_size=8, epochs=1, max_steps=2, lr=0.01,
                      device="cpu", out_dir=str(tmp_path / "run"), data_workers=0, progress=False, log_every=1)
    trainer = Trainer.from_config(cfg)
    assert trainer.info.num_classes == 3 and trainer.learner.image_size == 32
    result = trainer.fit()
    assert trainer.step == 2 and isinstance(result, dict)
