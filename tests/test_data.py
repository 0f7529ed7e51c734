"""Tests for manlearn.data: readers on small files written in the real formats, transforms, loader."""

from __future__ import annotations

import gzip
import os
import re
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from manlearn.errors import ConfigError, DatasetError
from manlearn.data import (
    BatchLoader,
    BatchTransform,
    DatasetInfo,
    ImageData,
    dataset_files,
    get_dataset_info,
    list_datasets,
    load_dataset,
)

REAL_FM = "/usr/share/datasets/fashion-mnist"
FM_HINT = "apt-get install dataset-fashion-mnist"


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch):
    """Tests must not pick up a developer's $MANLEARN_DATA."""
    monkeypatch.delenv("MANLEARN_DATA", raising=False)


# ------------------------------------------------------------------------------------------ file writers


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_file(path, data: bytes, gz: bool) -> str:
    path = str(path) + (".gz" if gz else "")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    return path


def make_idx_dir(folder, n_train=7, n_test=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        write_file(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), idx_bytes(x, 2051), gz)
        write_file(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), idx_bytes(y, 2049), gz)
        out[prefix] = (x, y)
    return out


def make_cifar(root, n_per_batch=3, n_test=2, hundred=False, seed=0):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python" if hundred else "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    k = 100 if hundred else 10
    written = {"train": [], "test": []}
    for split, files, n in (("train", names, n_per_batch), ("test", ["test" if hundred else "test_batch"], n_test)):
        for fname in files:
            data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, k, size=n)]
            d = {b"data": data, b"batch_label": b"x"}
            if hundred:
                d[b"fine_labels"] = labels
                d[b"coarse_labels"] = [v // 5 for v in labels]
            else:
                d[b"labels"] = labels
            with open(os.path.join(folder, fname), "wb") as f:
                pickle.dump(d, f)
            written[split].append((data, labels))
    return folder, written


# ------------------------------------------------------------------------------------------- registry


def test_registry_names_and_infos():
    assert set(list_datasets()) == {
        "fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "stl10", "digits", "imagefolder", "imagenet"
    }
    fm = get_dataset_info("fashion-mnist")
    assert (fm.num_classes, fm.in_channels, fm.image_size) == (10, 3, 32)
    assert fm.mean == (0.5, 0.5, 0.5) and fm.std == (0.5, 0.5, 0.5)
    assert FM_HINT in fm.how_to_get
    assert get_dataset_info("cifar100").num_classes == 100
    assert get_dataset_info("cifar10").mean[0] == pytest.approx(125.3 / 255)
    assert get_dataset_info("stl10").image_size == 96
    dg = get_dataset_info("digits")
    assert (dg.in_channels, dg.image_size, len(dg.mean)) == (1, 8, 1)
    assert get_dataset_info("imagefolder").num_classes == 0  # placeholder, real value at load time
    assert "t10k-labels-idx1-ubyte[.gz]" in dataset_files("fashion-mnist")
    assert dataset_files("cifar10", "test") == ["cifar-10-batches-py/test_batch"]


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DatasetError) as e:
        get_dataset_info("imagenet-22k")
    assert "imagenet-22k" in str(e.value) and "fashion-mnist" in str(e.value) and "cifar100" in str(e.value)
    with pytest.raises(DatasetError):
        load_dataset("nope")


def test_bad_arguments_are_config_errors(tmp_path):
    make_idx_dir(tmp_path)
    with pytest.raises(ConfigError, match="split"):
        load_dataset("fashion-mnist", "validation", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="limit"):
        load_dataset("fashion-mnist", data_dir=tmp_path, limit=0)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("cifar10", image_size=64)


def test_dataset_info_checks_mean_length():
    with pytest.raises(ValueError):
        DatasetInfo("x", 10, 3, 32, (0.5,), (0.5, 0.5, 0.5), "")


# ------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_roundtrip(tmp_path, gz, name):
    ref = make_idx_dir(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        d = load_dataset(name, split, data_dir=tmp_path)
        x, y = ref[prefix]
        assert d.images.dtype == torch.uint8 and d.labels.dtype == torch.int64
        assert d.images.shape == (len(y), 1, 28, 28) and d.images.is_contiguous()
        assert np.array_equal(d.images[:, 0].numpy(), x)
        assert np.array_equal(d.labels.numpy(), y.astype(np.int64))
        assert len(d) == len(y) and d.info == get_dataset_info(name)
    d = load_dataset(name, data_dir=tmp_path, limit=3)
    assert len(d) == 3 and np.array_equal(d.images[:, 0].numpy(), ref["train"][0][:3])


def test_data_dir_resolution(tmp_path, monkeypatch):
    env_ref = make_idx_dir(tmp_path / "env" / "fashion-mnist", seed=1)
    explicit_ref = make_idx_dir(tmp_path / "explicit", seed=2)
    monkeypatch.setenv("MANLEARN_DATA", str(tmp_path / "env"))
    # $MANLEARN_DATA/<dataset folder>
    d = load_dataset("fashion-mnist")
    assert np.array_equal(d.images[:, 0].numpy(), env_ref["train"][0])
    # explicit data_dir wins over the environment
    d = load_dataset("fashion-mnist", data_dir=tmp_path / "explicit")
    assert np.array_equal(d.images[:, 0].numpy(), explicit_ref["train"][0])
    # $MANLEARN_DATA itself holding the files
    monkeypatch.setenv("MANLEARN_DATA", str(tmp_path / "explicit"))
    d = load_dataset("mnist", "test")
    assert np.array_equal(d.images[:, 0].numpy(), explicit_ref["t10k"][0])


def test_missing_dir_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", data_dir=missing)
    msg = str(e.value)
    for word in ("fashion-mnist", "train-images-idx3-ubyte", str(missing), "does not exist", FM_HINT):
        assert word in msg


def test_partial_dir_names_missing_file(tmp_path):
    make_idx_dir(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert "lacks t10k-labels-idx1-ubyte" in str(e.value) and FM_HINT in str(e.value)
    load_dataset("fashion-mnist", "train", data_dir=tmp_path)  # the other split is still fine


@pytest.mark.parametrize("gz", [False, True])
def test_wrong_magic(tmp_path, gz):
    make_idx_dir(tmp_path, gz=gz)
    x = np.zeros((7, 28, 28), np.uint8)
    write_file(tmp_path / "train-images-idx3-ubyte", idx_bytes(x, 2049), gz)  # label magic in image file
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    msg = str(e.value)
    assert "magic" in msg and "train-images-idx3-ubyte" in msg and FM_HINT in msg and str(tmp_path) in msg


def test_truncated_raw_file(tmp_path):
    make_idx_dir(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert "truncated" in str(e.value) and "train-images-idx3-ubyte" in str(e.value)
    assert FM_HINT in str(e.value)
    p.write_bytes(b"\x00\x00")  # shorter than the header
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_truncated_and_corrupt_gz(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-12])  # cut inside the gzip trailer/stream
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert "train-labels-idx1-ubyte" in str(e.value) and FM_HINT in str(e.value)
    p.write_bytes(b"this is not gzip at all")
    with pytest.raises(DatasetError, match="cannot be read"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_count_mismatch_and_bad_labels(tmp_path):
    make_idx_dir(tmp_path, n_train=7)
    write_file(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(6, np.uint8), 2049), False)
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert "mismatch" in str(e.value) and "7 images" in str(e.value) and "6 labels" in str(e.value)
    write_file(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.full(7, 10, np.uint8), 2049), False)
    with pytest.raises(DatasetError, match="0..9"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_wrong_image_dims(tmp_path):
    make_idx_dir(tmp_path)
    write_file(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((7, 32, 32), np.uint8), 2051), False)
    with pytest.raises(DatasetError, match="28x28"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


@pytest.mark.skipif(not os.path.isdir(REAL_FM), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    tr = load_dataset("fashion-mnist", "train")  # found through the built-in default location
    te = load_dataset("fashion-mnist", "test", data_dir=REAL_FM)
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    assert tr.images.dtype == torch.uint8 and tr.labels.dtype == torch.int64
    # Fashion-MNIST is exactly balanced: 6000 / 1000 per class
    assert torch.bincount(tr.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(te.labels, minlength=10).tolist() == [1000] * 10
    assert int(tr.images.max()) == 255 and int(tr.images.min()) == 0


# ----------------------------------------------------------------------------------------------- CIFAR


def test_cifar10_roundtrip(tmp_path):
    folder, ref = make_cifar(tmp_path)
    for split in ("train", "test"):
        for data_dir in (tmp_path, folder):  # parent of cifar-10-batches-py, or the folder itself
            d = load_dataset("cifar10", split, data_dir=data_dir)
            data = np.concatenate([b for b, _ in ref[split]])
            labels = sum((l for _, l in ref[split]), [])
            assert d.images.shape == (len(labels), 3, 32, 32)
            assert np.array_equal(d.images.numpy(), data.reshape(-1, 3, 32, 32))
            assert d.labels.tolist() == labels
    # limit stops early: a broken last batch is never read
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").write_bytes(b"garbage")
    d = load_dataset("cifar10", data_dir=tmp_path, limit=4)
    assert len(d) == 4 and d.labels.tolist() == (ref["train"][0][1] + ref["train"][1][1])[:4]


def test_cifar100_fine_labels(tmp_path):
    _, ref = make_cifar(tmp_path, hundred=True, n_per_batch=6)
    d = load_dataset("cifar100", data_dir=tmp_path)
    assert d.labels.tolist() == ref["train"][0][1]
    assert d.info.num_classes == 100 and len(d) == 6


def test_cifar_errors(tmp_path):
    folder, _ = make_cifar(tmp_path)
    os.remove(os.path.join(folder, "data_batch_3"))
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", data_dir=tmp_path)
    msg = str(e.value)
    assert "lacks data_batch_3" in msg and "cifar-10-python.tar.gz" in msg and "cifar10" in msg
    make_cifar(tmp_path)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        f.write(b"\x80\x04garbage")
    with pytest.raises(DatasetError, match="CIFAR pickle"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match="labels"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match="3072"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar_old_numpy_pickle(tmp_path):
    """The real batches were pickled by Python 2 with numpy.core.multiarray: they must still load."""
    folder, _ = make_cifar(tmp_path)
    data = np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)
    raw = pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        f.write(raw)
    d = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert np.array_equal(d.images.numpy(), data.reshape(2, 3, 32, 32)) and d.labels.tolist() == [3, 4]


class _Evil:
    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder, _ = make_cifar(tmp_path)
    evil = _Evil()
    evil.target = str(tmp_path / "pwned")
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({b"data": evil, b"labels": []}, f)
    with pytest.raises(DatasetError, match="refusing"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------ SVHN


def test_svhn_roundtrip_and_label_10_is_zero(tmp_path):
    import scipy.io

    rng = np.random.default_rng(0)
    n = 6
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = np.array([[10], [1], [2], [9], [10], [5]], dtype=np.uint8)
    scipy.io.savemat(str(tmp_path / "train_32x32.mat"), {"X": x, "y": y})
    d = load_dataset("svhn", data_dir=tmp_path)
    assert d.images.shape == (n, 3, 32, 32)
    assert d.labels.tolist() == [0, 1, 2, 9, 0, 5]
    assert int(d.images[3, 2, 5, 7]) == int(x[5, 7, 2, 3])  # [n, c, h, w] <- X[h, w, c, n]
    assert np.array_equal(d.images.numpy(), x.transpose(3, 2, 0, 1))


def test_svhn_errors(tmp_path):
    import scipy.io

    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, but then nothing useful")
    with pytest.raises(DatasetError) as e:
        load_dataset("svhn", "test", data_dir=tmp_path)
    assert "test_32x32.mat" in str(e.value) and "ufldl.stanford.edu" in str(e.value)
    scipy.io.savemat(str(tmp_path / "test_32x32.mat"), {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": [[1], [2]]})
    with pytest.raises(DatasetError, match="32x32x3xN"):
        load_dataset("svhn", "test", data_dir=tmp_path)
    with pytest.raises(DatasetError, match="train_32x32.mat"):
        load_dataset("svhn", "train", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- STL10


def test_stl10_roundtrip_column_major(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(3, 3, 96, 96), dtype=np.uint8)
    labels = np.array([1, 10, 4], np.uint8)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    (folder / "train_X.bin").write_bytes(np.ascontiguousarray(imgs.transpose(0, 1, 3, 2)).tobytes())
    (folder / "train_y.bin").write_bytes(labels.tobytes())
    d = load_dataset("stl10", data_dir=tmp_path)
    assert d.images.shape == (3, 3, 96, 96)
    assert np.array_equal(d.images.numpy(), imgs)
    assert d.labels.tolist() == [0, 9, 3]


def test_stl10_errors(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    (folder / "test_X.bin").write_bytes(bytes(3 * 96 * 96 * 2 - 5))
    (folder / "test_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(DatasetError) as e:
        load_dataset("stl10", "test", data_dir=tmp_path)
    assert "test_X.bin" in str(e.value) and "truncated" in str(e.value) and "stl10_binary.tar.gz" in str(e.value)
    (folder / "test_X.bin").write_bytes(bytes(3 * 96 * 96 * 2))
    (folder / "test_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(DatasetError, match="3 labels"):
        load_dataset("stl10", "test", data_dir=tmp_path)
    (folder / "test_y.bin").write_bytes(bytes([0, 2]))
    with pytest.raises(DatasetError, match="1..10"):
        load_dataset("stl10", "test", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- digits


def test_digits_split():
    from sklearn.datasets import load_digits

    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert tr.images.shape == (1500, 1, 8, 8) and te.images.shape == (297, 1, 8, 8)
    assert int(tr.images.max()) == 255 and tr.labels.min() == 0 and tr.labels.max() == 9
    # train + test is exactly the sklearn set (as a multiset), and train is shuffled, not the first 1500
    ref = load_digits()
    ref_x = np.rint(ref.images * 255 / 16).astype(np.uint8)
    mine = sorted((x.tobytes(), int(y)) for d in (tr, te) for x, y in zip(d.images[:, 0].numpy(), d.labels))
    theirs = sorted((x.tobytes(), int(y)) for x, y in zip(ref_x, ref.target))
    assert mine == theirs
    assert not np.array_equal(tr.labels.numpy(), ref.target[:1500])
    assert torch.equal(load_dataset("digits", "train").labels, tr.labels)  # deterministic


# ----------------------------------------------------------------------------------------- imagefolder


def _png(path, colour, size=(10, 6)):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_imagefolder(tmp_path):
    colours = {"cat": (255, 0, 0), "dog": (0, 128, 255)}
    for cls, col in colours.items():
        for i in range(2):
            _png(tmp_path / "train" / cls / f"{i}.png", col)
        _png(tmp_path / "val" / cls / "a.png", col)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    d = load_dataset("imagefolder", data_dir=tmp_path, image_size=8)
    assert d.classes == ("cat", "dog") and d.info.num_classes == 2 and d.info.image_size == 8
    assert d.images.shape == (4, 3, 8, 8) and d.labels.tolist() == [0, 0, 1, 1]
    assert d.images[0, :, 3, 3].tolist() == [255, 0, 0] and d.images[3, :, 0, 0].tolist() == [0, 128, 255]
    te = load_dataset("imagefolder", "test", data_dir=tmp_path)  # falls back to val/, default size 32
    assert te.images.shape == (2, 3, 32, 32) and te.labels.tolist() == [0, 1]
    assert len(load_dataset("imagefolder", data_dir=tmp_path, limit=3)) == 3


def test_imagefolder_limit_spreads_over_the_classes(tmp_path):
    """The samples are sorted by class: the first N were the first classes only (eval_limit scored class 0)."""
    for c in range(5):
        for i in range(20):
            _png(tmp_path / "train" / f"c{c}" / f"{i}.png", (50 * c, 0, 0))
            if i < 4:
                _png(tmp_path / "val" / f"c{c}" / f"{i}.png", (50 * c, 0, 0))
    full = load_dataset("imagefolder", data_dir=tmp_path, image_size=4)
    d = load_dataset("imagefolder", data_dir=tmp_path, image_size=4, limit=20)
    assert len(d) == 20 and len(set(d.labels.tolist())) >= 4 and d.labels.tolist() == sorted(d.labels.tolist())
    te = load_dataset("imagefolder", "test", data_dir=tmp_path, image_size=4, limit=8)
    assert len(te) == 8 and len(set(te.labels.tolist())) >= 3
    # the same subset every time, each image with its own label, a limit above the count keeps everything
    again = load_dataset("imagefolder", data_dir=tmp_path, image_size=4, limit=20)
    assert torch.equal(again.images, d.images) and torch.equal(again.labels, d.labels)
    assert torch.equal(d.images[:, 0, 0, 0], (50 * d.labels).to(torch.uint8))
    assert torch.equal(load_dataset("imagefolder", data_dir=tmp_path, image_size=4, limit=1000).labels, full.labels)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="train/"):
        load_dataset("imagefolder", data_dir=tmp_path)
    _png(tmp_path / "train" / "a" / "0.png", (1, 2, 3))
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError) as e:
        load_dataset("imagefolder", data_dir=tmp_path)
    assert "1.png" in str(e.value) and "<root>/train/<class>" in str(e.value)
    _png(tmp_path / "test" / "zebra" / "0.png", (1, 2, 3))
    with pytest.raises(DatasetError, match="zebra"):
        load_dataset("imagefolder", "test", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------ transforms


def _uint8(shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _normalise(x_uint8, info):
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (x_uint8.float() / 255 - mean) / std


def _windows(padded, size, flip):
    """Every size x size window of a [C, P, P] image, optionally also mirrored."""
    p = padded.shape[-1]
    out = []
    for i in range(p - size + 1):
        for j in range(p - size + 1):
            w = padded[:, i : i + size, j : j + size]
            out.append((i, j, False, w))
            if flip:
                out.append((i, j, True, w.flip(-1)))
    return out


def test_eval_transform_fm_r32():
    info = get_dataset_info("fashion-mnist")
    x = _uint8((5, 1, 28, 28))
    t = BatchTransform(info, train=False)
    out = t(x)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    centre = (x.float() / 255 - 0.5) / 0.5
    for c in range(3):
        assert torch.allclose(out[:, c, 2:30, 2:30], centre[:, 0], atol=1e-6)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(out[:, :, border] == -1.0)  # zero pixels normalise to -1
    assert torch.equal(t(x), out)  # deterministic
    assert torch.equal(t(x, generator=torch.Generator().manual_seed(5)), out)  # generator is ignored


def _check_train_windows(name, stored_shape, pad, mode, flip, seed=0):
    info = get_dataset_info(name)
    x = _uint8(stored_shape, seed)
    s = info.image_size
    base = (s - stored_shape[-1]) // 2
    t_train, t_eval = BatchTransform(info, train=True), BatchTransform(info, train=False)
    out = t_train(x, generator=torch.Generator().manual_seed(seed))
    assert out.shape == (stored_shape[0], info.in_channels, s, s) and out.dtype == torch.float32
    ev = t_eval(x)
    padded = F.pad(F.pad(x, (base,) * 4), (pad,) * 4, mode="constant" if mode == "zero" else "reflect")
    if info.in_channels == 3 and stored_shape[1] == 1:
        padded = padded.expand(-1, 3, -1, -1)
    ref = _normalise(padded, info)
    seen_offsets, seen_flips = set(), set()
    for k in range(out.shape[0]):
        hits = [(i, j, f) for i, j, f, w in _windows(ref[k], s, flip) if torch.allclose(w, out[k], atol=1e-5)]
        assert hits, f"sample {k} is not a (flipped) window of the padded image"
        i, j, f = hits[0]
        seen_offsets.add((i, j))
        seen_flips.add(f)
    assert len(seen_offsets) > 3  # crops really vary
    assert seen_flips == ({False, True} if flip else {False})
    differs = [not torch.equal(out[k], ev[k]) for k in range(out.shape[0])]
    assert any(differs)
    # same generator seed -> same batch; different seed -> different batch
    assert torch.equal(out, t_train(x, generator=torch.Generator().manual_seed(seed)))
    assert not torch.equal(out, t_train(x, generator=torch.Generator().manual_seed(seed + 1)))


def test_train_transform_fm_crop_flip():
    _check_train_windows("fashion-mnist", (24, 1, 28, 28), pad=2, mode="zero", flip=True)


def test_train_transform_cifar_reflect():
    _check_train_windows("cifar10", (24, 3, 32, 32), pad=4, mode="reflect", flip=True)


def test_train_transform_svhn_no_flip():
    _check_train_windows("svhn", (24, 3, 32, 32), pad=2, mode="zero", flip=False)


def test_train_transform_digits_one_channel():
    _check_train_windows("digits", (24, 1, 8, 8), pad=1, mode="zero", flip=False)


def test_cifar_normalisation_per_channel():
    info = get_dataset_info("cifar10")
    x = _uint8((3, 3, 32, 32))
    assert torch.allclose(BatchTransform(info, train=False)(x), _normalise(x, info), atol=1e-5)


def test_transform_rejects_bad_input():
    t = BatchTransform(get_dataset_info("fashion-mnist"), train=False)
    with pytest.raises(DatasetError):
        t(torch.zeros(2, 1, 28, 28))  # float, not uint8
    with pytest.raises(DatasetError):
        t(torch.zeros(2, 2, 28, 28, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_transform_on_cuda_matches_cpu():
    for name, shape in (("fashion-mnist", (16, 1, 28, 28)), ("cifar10", (16, 3, 32, 32))):
        info = get_dataset_info(name)
        x = _uint8(shape)
        for train in (False, True):
            t = BatchTransform(info, train=train)
            cpu = t(x, generator=torch.Generator().manual_seed(3))
            gpu = t(x.cuda(), generator=torch.Generator().manual_seed(3))
            assert gpu.device.type == "cuda"
            assert torch.allclose(gpu.cpu(), cpu, atol=1e-6)


# ---------------------------------------------------------------------------------------------- loader


def _id_data(n=10, name="digits"):
    """Images whose first pixel encodes the sample id; labels are the ids (so order is visible)."""
    info = get_dataset_info(name)
    imgs = _uint8((n, 1, 8, 8))
    return ImageData(imgs, torch.arange(n), info)


def test_loader_len_and_drop_last():
    d = _id_data(10)
    assert len(BatchLoader(d, 4, train=True)) == 2
    assert len(BatchLoader(d, 4, train=False)) == 3
    assert len(BatchLoader(d, 4, train=True, drop_last=False)) == 3
    assert len(BatchLoader(d, 5, train=True)) == 2
    sizes = [len(y) for _, y in BatchLoader(d, 4, train=False).epoch(0)]
    assert sizes == [4, 4, 2]
    with pytest.raises(ValueError):
        BatchLoader(d, 0, train=True)


def test_loader_sees_every_sample_once():
    d = _id_data(23)
    ys = torch.cat([y for _, y in BatchLoader(d, 5, train=True, drop_last=False).epoch(3)])
    assert sorted(ys.tolist()) == list(range(23))
    ys = torch.cat([y for _, y in BatchLoader(d, 5, train=True).epoch(3)])
    assert len(ys) == 20 and len(set(ys.tolist())) == 20
    ev = BatchLoader(d, 5, train=False)
    assert torch.cat([y for _, y in ev.epoch(0)]).tolist() == list(range(23))  # eval: natural order


def test_loader_outputs_match_labels_and_transform():
    d = _id_data(12)
    loader = BatchLoader(d, 4, train=False)
    t = BatchTransform(d.info, train=False)
    for x, y in loader.epoch(0):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 8, 8)
        assert torch.equal(x, t(d.images[y]))


def test_loader_resume_is_exact():
    d = load_dataset("digits", limit=300)
    loader = BatchLoader(d, 32, train=True, seed=7)
    full = list(loader.epoch(2))
    assert len(full) == 9
    for b in (0, 1, 5, 8, 9):
        tail = list(BatchLoader(d, 32, train=True, seed=7).epoch(2, start_batch=b))
        assert len(tail) == len(full) - b
        for (x1, y1), (x2, y2) in zip(tail, full[b:]):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError):
        loader.epoch(0, start_batch=10)


def test_loader_epochs_and_seeds():
    d = _id_data(64)

    def order(seed, epoch):
        return torch.cat([y for _, y in BatchLoader(d, 8, train=True, seed=seed).epoch(epoch)]).tolist()

    assert order(0, 0) == order(0, 0)  # same seed repeats exactly
    assert order(0, 0) != order(0, 1)  # epochs differ
    assert order(0, 0) != order(1, 0)  # seeds differ
    assert order(0, 0) != list(range(64))
    l1, l2 = BatchLoader(d, 8, train=True, seed=3), BatchLoader(d, 8, train=True, seed=3)
    for (x1, _), (x2, _) in zip(l1.epoch(4), l2.epoch(4)):
        assert torch.equal(x1, x2)  # augmentation repeats too


def test_loader_leaves_global_rng_alone():
    d = load_dataset("digits", limit=100)
    state = torch.get_rng_state()
    for _ in BatchLoader(d, 16, train=True).epoch(0):
        pass
    assert torch.equal(torch.get_rng_state(), state)


def test_loader_channels_last():
    d = ImageData(_uint8((8, 3, 32, 32)), torch.arange(8), get_dataset_info("cifar10"))
    plain = list(BatchLoader(d, 4, train=True, seed=1).epoch(0))
    cl = list(BatchLoader(d, 4, train=True, seed=1, channels_last=True).epoch(0))
    for (a, _), (b, _) in zip(plain, cl):
        assert b.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous(
            memory_format=torch.channels_last
        )
        assert torch.equal(a, b)


# ------------------------------------------------------------------ never mix two copies (issue 16)


def test_a_copy_missing_one_split_is_refused_not_completed_from_another_copy(tmp_path, monkeypatch):
    from manlearn.data import info

    make_idx_dir(tmp_path / "system", seed=1)  # a complete copy where the defaults look
    monkeypatch.setitem(info._DEFAULT_DIRS, "fashion-mnist", [str(tmp_path / "system")])
    env_ref = make_idx_dir(tmp_path / "env" / "fashion-mnist", seed=2)
    for f in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        os.remove(tmp_path / "env" / "fashion-mnist" / f)
    monkeypatch.setenv("MANLEARN_DATA", str(tmp_path / "env"))
    d = load_dataset("fashion-mnist", "train")
    assert np.array_equal(d.images[:, 0].numpy(), env_ref["train"][0])
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", "test")
    msg = str(e.value)
    assert f"{tmp_path / 'env' / 'fashion-mnist'} holds the other split's files but lacks t10k-images" in msg
    assert "not taken from another copy" in msg


def test_imagefolder_empty_class_folder_is_refused(tmp_path):
    _png(tmp_path / "train" / "cat" / "0.png", (255, 0, 0))
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(DatasetError, match=r"class folder\(s\) with no image files in .*train: dog"):
        load_dataset("imagefolder", data_dir=tmp_path)
    _png(tmp_path / "train" / "dog" / "0.png", (0, 0, 255))
    _png(tmp_path / "val" / "cat" / "0.png", (255, 0, 0))
    with pytest.warns(UserWarning, match="no images of class"):
        assert len(load_dataset("imagefolder", "test", data_dir=tmp_path)) == 1


def test_manlearn_data_is_used_exactly_or_refused(tmp_path, monkeypatch):
    """$MANLEARN_DATA on a file, on a missing folder, or on a copy with images but no labels is refused: never a
    silent fall-back to the system's copy (#28 item 7)."""
    from manlearn.data import info

    make_idx_dir(tmp_path / "system", seed=1)  # a complete copy where the defaults look
    monkeypatch.setitem(info._DEFAULT_DIRS, "fashion-mnist", [str(tmp_path / "system")])
    (tmp_path / "a_file").write_text("x")
    for env, needle in ((tmp_path / "a_file", "is not a folder (a file)"),
                        (tmp_path / "missing", "is not a folder (it does not exist)")):
        monkeypatch.setenv("MANLEARN_DATA", str(env))
        with pytest.raises(DatasetError, match=re.escape(needle)):
            load_dataset("fashion-mnist")
    make_idx_dir(tmp_path / "env" / "fashion-mnist", seed=2)
    os.remove(tmp_path / "env" / "fashion-mnist" / "train-labels-idx1-ubyte")
    monkeypatch.setenv("MANLEARN_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetError, match="lacks train-labels-idx1-ubyte.*not taken from another copy"):
        load_dataset("fashion-mnist", "train")


def test_the_header_and_summary_name_the_data_folder_of_every_split(tmp_path, monkeypatch, capsys):
    """A run says which copy it read (#28 item 7): the folder under $MANLEARN_DATA, not the system's copy."""
    import json

    from manlearn.config import TrainConfig
    from manlearn.train import Trainer

    make_idx_dir(tmp_path / "env" / "fashion-mnist", seed=2)
    monkeypatch.setenv("MANLEARN_DATA", str(tmp_path / "env"))
    assert load_dataset("fashion-mnist", "test").source == str(tmp_path / "env" / "fashion-mnist")
    cfg = TrainConfig(dataset="fashion-mnist", model="resnet20", method="dgl", K=2, batch_size=4, max_steps=1, device="cpu", out_dir=str(tmp_path / "run"),
                      log_every=0)
    Trainer.from_config(cfg).fit()
    header = capsys.readouterr().out.splitlines()[0]
    assert re.search(rf"fashion-mnist: \d+ train / \d+ test from {re.escape(str(tmp_path / 'env' / 'fashion-mnist'))} ",
                     header), header
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert str(tmp_path / "env" / "fashion-mnist") in summary["data"]
