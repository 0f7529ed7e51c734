"""Dense training (issue #6) through the one Trainer: the task section, exact resume, the CLI, the recipes."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from manlearn import cli
from manlearn.config import DetectionTask, TrainConfig, apply_overrides, load_config
from manlearn.errors import CheckpointError, ConfigError, DatasetError
from manlearn.recipes import packaged_recipes_dir
from manlearn.runtime import epoch_order
from manlearn.train import Trainer, lr_at

REAL_FM = "/usr/share/datasets/fashion-mnist"
CONFIGS = packaged_recipes_dir()  # src/manlearn/configs, shipped in the wheel
DENSE_RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if "task" in (yaml.safe_load(p.read_text()) or {}))

needs_fm = pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_FM, "train-images-idx3-ubyte.gz")),
                              reason=f"Fashion-MNIST not installed at {REAL_FM}")
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

# A tiny run: narrow bottleneck ResNet-50 (8 planes per stage), 64x64 mosaic, batch 4 on 16 images.
TASK = ["task.model_widths=[8,8,8,8]", "task.stem_width=8", "task.train_split=train", "task.val_split=val"]
DET = ["task.fpn_channels=16", "task.head_convs=1", "task.min_size=64", "task.max_size=64"]
SEG = ["task.aspp_channels=16"]
TINY = ["model=resnet50", "method=manpp", "K=4", "batch_size=4", "iterations=6", "schedule=step-warmup",
        "lr_steps=[4]", "warmup_iters=2", "nesterov=false", "eval_limit=4", "eval_batch_size=4",
        "eval_every_epochs=0", "progress=false", "log_every=1", "device=cpu", "data_workers=0",
        "ckpt_every_steps=0", "lr=0.01", "channels_last=false"]


def tiny_items(task: str) -> list[str]:
    return [f"task.name={task}", *TASK, *(DET if task == "detection" else SEG), *TINY]


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> Path:
    if not os.path.isfile(os.path.join(REAL_FM, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST not installed at {REAL_FM}")
    from manlearn.data.mosaic import make_mosaic

    out = tmp_path_factory.mktemp("dense") / "mosaic"
    make_mosaic(out, n_train=16, n_val=8, size=64, data_dir=REAL_FM)
    return out


def tiny_cfg(mosaic: Path, out_dir: Path, task: str = "detection", *extra: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), [*tiny_items(task), f"data_dir={mosaic}", f"out_dir={out_dir}", *extra])


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------- config


def test_detection_section_defaults_are_the_coco_retinanet_setting():
    t = DetectionTask()
    assert (t.data_format, t.min_size, t.max_size, t.fpn_channels, t.head_convs, t.train_split,
            t.val_split) == ("coco", 600, 1000, 256, 4, "train2017", "val2017")
    seg = apply_overrides(TrainConfig(), ["task.name=segmentation", "model=resnet50", "K=4", "data_dir=d"])
    assert seg.task.data_format == "mask-folder" and seg.task.train_split == "train"


def test_dense_overrides_are_typed():
    cfg = apply_overrides(TrainConfig(), [*tiny_items("segmentation"), "data_dir=d", "lr=2e-2", "K=2",
                                          "task.hflip=no", "lr_steps=[10,20]", "eval_limit=none",
                                          "task.seg_scale=[0.5, 2]"])
    assert cfg.lr == 0.02 and cfg.K == 2 and cfg.task.model_widths == [8, 8, 8, 8] and cfg.task.hflip is False
    assert cfg.lr_steps == [10, 20] and cfg.eval_limit is None and cfg.task.seg_scale == [0.5, 2.0]


@pytest.mark.parametrize("item, expected", [("K=1.5", "expects int"), ("lr_steps=7", "expects list of int"),
                                            ("task.hflip=maybe", "expects bool"),
                                            ("task.model_widths=[a]", "list of int")])
def test_type_errors_name_the_key(item, expected):
    with pytest.raises(ConfigError, match=expected):
        apply_overrides(TrainConfig(), [*tiny_items("detection"), "data_dir=d", item])


def test_unknown_keys_get_a_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'lr_steps'"):
        apply_overrides(TrainConfig(), ["lr_step=[1]"])
    p = tmp_path / "r.yaml"
    p.write_text("task:\n  name: detection\n  fpn_channel: 64\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'task.fpn_channel' in .*r\.yaml \(did you mean "
                                          r"'task.fpn_channels'"):
        load_config(p)


def test_validate_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), ["task.name=detection", "data_dir=d", "model=resnet32", "K=7",
                                        "lr_steps=[500, 100]", "task.min_size=1200", "lr=0"])
    msg = str(e.value)
    for part in ("model='resnet32'", "K must be in 1..4", "lr_steps must be strictly increasing",
                 "min_size <= task.max_size", "lr must be > 0"):
        assert part in msg
    dense = [*tiny_items("detection"), "data_dir=d"]
    assert apply_overrides(TrainConfig(), [*dense, "method=e2e", "K=4"]).K == 4  # K ignored by e2e
    with pytest.raises(ConfigError, match="K=1 is plain backprop"):
        apply_overrides(TrainConfig(), [*dense, "method=manpp", "K=1"])
    with pytest.raises(ConfigError, match="task.data_format='coco'"):
        apply_overrides(TrainConfig(), [*tiny_items("segmentation"), "data_dir=d", "task.data_format=coco"])


def test_lr_schedule_is_warmup_then_steps():
    cfg = apply_overrides(TrainConfig(), ["schedule=step-warmup", "lr=0.01", "warmup_iters=10",
                                          "warmup_factor=0.001", "lr_steps=[20, 30]", "iterations=40"])
    assert lr_at(cfg, 0, 7) == pytest.approx(1e-5)
    assert lr_at(cfg, 5, 7) == pytest.approx(0.01 * (0.001 * 0.5 + 0.5))
    assert lr_at(cfg, 10, 7) == lr_at(cfg, 19, 7) == pytest.approx(0.01)
    assert lr_at(cfg, 20, 7) == pytest.approx(0.001) and lr_at(cfg, 30, 7) == pytest.approx(1e-4)


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    assert torch.equal(epoch_order(0, 3, 50), epoch_order(0, 3, 50))
    assert not torch.equal(epoch_order(0, 3, 50), epoch_order(0, 4, 50))
    assert sorted(epoch_order(1, 0, 50).tolist()) == list(range(50))


@pytest.mark.parametrize("path", DENSE_RECIPES, ids=[p.stem for p in DENSE_RECIPES])
def test_dense_recipes_load_validate_and_build(path):
    from manlearn.train import build_learner

    cfg = load_config(path)
    assert cfg.out_dir == f"runs/{path.stem}"
    assert cfg.task.name in ("detection", "segmentation")
    assert cfg.schedule == "step-warmup" and cfg.iterations > 0 and cfg.eval_every_epochs == 0
    if path.stem.startswith("coco"):
        assert (cfg.batch_size, cfg.lr, cfg.iterations, cfg.lr_steps, cfg.task.min_size, cfg.task.max_size) == \
            (16, 0.01, 90000, [60000, 80000], 600, 1000)
        assert (cfg.method, cfg.K) in (("e2e", 1), ("manpp", 4))
    else:  # the mosaic recipes' narrow backbones are cheap to build
        learner = build_learner(cfg, type("Info", (), {"num_classes": 11})())
        assert learner.K == (1 if cfg.method == "e2e" else cfg.K)


def test_required_dense_recipes_exist():
    names = {p.stem.replace("_", "-") for p in DENSE_RECIPES}  # (the recipes may be renamed with hyphens)
    for m in ("r50", "r101", "r152"):
        assert {f"coco-retinanet-{m}-e2e", f"coco-retinanet-{m}-k4-manpp"} <= names
    assert {"mosaic-retinanet-r50-e2e", "mosaic-retinanet-r50-k4-manpp", "mosaic-deeplab-r50-e2e",
            "mosaic-deeplab-r50-k4-manpp"} <= names


# ------------------------------------------------------------------------------------------- runs


def test_detection_smoke_through_cli_then_eval(mosaic, tmp_path, capsys):
    out_dir = tmp_path / "det"
    rc, out, err = run_cli(capsys, "train", *tiny_items("detection"), f"data_dir={mosaic}", f"out_dir={out_dir}",
                           "max_steps=2")
    assert rc == 0, err
    assert "AP" in out and "seconds/iter" in out and "peak memory" in out and "stopped at max_steps" in out
    ckpt = torch.load(out_dir / "last.pt", weights_only=True)
    assert ckpt["task"] == "detection" and ckpt["step"] == 2 and ckpt["config"]["task"]["name"] == "detection"
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and len(train[0]["losses"]) == 4  # MAN++ K=4: 4 block losses
    assert any(r["type"] == "eval" and "AP50" in r["metrics"] for r in recs)
    rc, out, err = run_cli(capsys, "eval", str(out_dir / "last.pt"), "eval_limit=4")
    assert rc == 0, err
    assert out.startswith("detection: AP") and "step 2" in out
    # `manlearn runs` names the base in use (greedy, not the config's infopro) and the task's figure (AP, not
    # test_acc), and labels what the peak counts; `manlearn plot` reads the AP of the eval records the same way
    summary = json.loads((out_dir / "summary.json").read_text())
    rc, out, err = run_cli(capsys, "runs", str(out_dir))
    assert rc == 0, err
    header, row = out.splitlines()
    assert header.split()[5:8] == ["metric", "last", "best"]
    cells = row.split()
    assert cells[1:4] == ["detection", "manpp+greedy", "4"] and cells[5] == "AP"
    assert cells[6] == f"{summary['headline'][1]:.4f}" and row.split()[10] in ("RSS", "act.", "CUDA")
    assert summary["rule"] == "manpp+greedy" and summary["headline"][0] == "AP"
    from manlearn.train.report import _load, _score

    ev = [r for r in _load(out_dir)["records"] if r["type"] == "eval"]
    assert ev and _score(ev[-1], "AP") == ev[-1]["metrics"]["AP"]
    rc, _, err = run_cli(capsys, "plot", str(out_dir), "--out", str(tmp_path / "det.png"))
    assert rc == 0 and (tmp_path / "det.png").stat().st_size > 10_000, err
    # a second fresh run into the same folder is refused
    rc, _, err = run_cli(capsys, "train", *tiny_items("detection"), f"data_dir={mosaic}", f"out_dir={out_dir}",
                         "max_steps=1")
    assert rc == 2 and "--overwrite" in err


def test_segmentation_recipe_smoke_through_cli(mosaic, tmp_path, capsys):
    out_dir = tmp_path / "seg"
    rc, out, err = run_cli(capsys, "train", "mosaic-deeplab-r50-k4-manpp", f"data_dir={mosaic}",
                           f"out_dir={out_dir}", "task.model_widths=[8,8,8,8]", "task.stem_width=8",
                           "task.aspp_channels=16", "batch_size=4", "max_steps=2", "eval_limit=4", "progress=false",
                           "device=cpu")
    assert rc == 0, err
    assert "mIoU" in out and "pixel acc" in out
    rc, out, err = run_cli(capsys, "eval", str(out_dir / "last.pt"))
    assert rc == 0, err
    assert out.startswith("segmentation: mIoU")


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.learner.state_dict().items()}


@pytest.mark.parametrize("task, extra", [("detection", ()), ("segmentation", ("task.seg_scale=[0.75, 1.25]",
                                                                               "task.seg_crop=[48, 48]"))])
def test_resume_is_exact(mosaic, tmp_path, task, extra):
    """3 steps, stop, resume for 3 more (across an epoch end: 4 steps/epoch) == 6 steps straight."""
    sink = io.StringIO()
    a = tmp_path / "a"
    Trainer.from_config(tiny_cfg(mosaic, a, task, "max_steps=3", *extra), out=sink).fit()
    resumed = Trainer.from_config(tiny_cfg(mosaic, a, task, *extra), resume=True, out=sink)
    assert resumed.step == 3
    resumed.fit()
    straight = Trainer.from_config(tiny_cfg(mosaic, tmp_path / "b", task, *extra), out=sink)
    straight.fit()
    pa, pb = _params(resumed), _params(straight)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    recs = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["type"] == "train"]
    assert steps == list(range(1, 7))  # nothing written twice
    assert [r["step"] for r in recs if r["type"] == "epoch"] == [4]  # epoch ends are recorded for every task


def test_evaluation_and_checkpoint_periods_are_in_steps(mosaic, tmp_path):
    """eval_every_steps / ckpt_every_steps count optimiser steps whatever the task; the end always evaluates."""
    saved: list[int] = []
    t = Trainer.from_config(tiny_cfg(mosaic, tmp_path, "segmentation", "eval_every_steps=2", "ckpt_every_steps=3",
                         "max_steps=5"), out=io.StringIO(),
                callbacks=[lambda tr: saved.append(torch.load(tr.ckpt_path, weights_only=True)["step"])
                       if tr.ckpt_path.exists() else None])
    summary = t.fit()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "eval"] == [2, 4, 5]
    assert [r["step"] for r in recs if r["type"] == "epoch" and r["metrics"] is not None] == [4]  # reused
    assert saved == [3, 3, 4]  # (hooks of steps 3, 4, 5) written at step 3, then at the epoch end (step 4)
    assert summary["headline"][0] == "miou" and summary["stopped_early"]


def test_resume_with_another_config_is_refused(mosaic, tmp_path, capsys):
    a = tmp_path / "a"
    Trainer.from_config(tiny_cfg(mosaic, a, "detection", "max_steps=1"), out=io.StringIO()).fit()
    with pytest.raises(CheckpointError, match=r"another configuration; differing keys: lr: checkpoint 0\.01"):
        Trainer.from_config(tiny_cfg(mosaic, a, "detection", "lr=0.02"), resume=True)
    # free keys (length, evaluation, logging) may change
    t = Trainer.from_config(tiny_cfg(mosaic, a, "detection", "iterations=9", "eval_limit=2", "log_every=3",
                         "eval_every_steps=2"), resume=True, out=io.StringIO())
    assert t.step == 1
    rc, _, err = run_cli(capsys, "train", *tiny_items("detection"), f"data_dir={mosaic}", f"out_dir={a}",
                         "method=e2e", "--resume")
    assert rc == 2 and "differing keys" in err and "method" in err


def test_missing_data_says_how_to_get_it(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=f"manlearn data make-mosaic --out {missing}"):
        Trainer.from_config(apply_overrides(TrainConfig(), [*tiny_items("detection"), f"data_dir={missing}",
                                                f"out_dir={tmp_path / 'r'}"]))
    rc, _, err = run_cli(capsys, "train", *tiny_items("segmentation"), f"data_dir={missing}",
                         f"out_dir={tmp_path / 's'}")
    assert rc == 2 and "make-mosaic" in err


@needs_fm
def test_wrong_split_name_lists_the_splits_there(mosaic, tmp_path):
    cfg = tiny_cfg(mosaic, tmp_path, "detection", "task.train_split=train2017")  # (COCO's name)
    with pytest.raises(DatasetError, match="has the splits train, val"):
        Trainer.from_config(cfg)


def test_standard_coco_layout_is_read(mosaic, tmp_path):
    """<root>/train2017/ + annotations/instances_train2017.json (COCO's own names) with the default splits."""
    import shutil

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split, coco in (("train", "train2017"), ("val", "val2017")):
        shutil.copytree(mosaic / "images" / split, root / coco)
        shutil.copy(mosaic / "annotations" / f"instances_{split}.json", root / "annotations" / f"instances_{coco}.json")
    cfg = tiny_cfg(mosaic, tmp_path / "r", "detection", f"data_dir={root}", "task.train_split=train2017",
                   "task.val_split=val2017", "max_steps=1")
    t = Trainer.from_config(cfg, out=io.StringIO())
    assert t.run.data.n_train == 16 and t.run.data.num_classes == 10
    assert t.fit()["steps"] == 1


def test_decoding_workers_give_the_same_training_as_the_in_memory_set(mosaic, tmp_path, monkeypatch):
    """A set too large to cache is decoded by DataLoader workers; the batches (and so the run) are the same."""
    sink = io.StringIO()
    cached = Trainer.from_config(tiny_cfg(mosaic, tmp_path / "a", "detection", "max_steps=2"), out=sink)
    assert cached.run.data.train._cache is not None
    cached.fit()
    import manlearn.detection.coco as coco_mod

    monkeypatch.setattr(coco_mod, "_AUTO_CACHE_BYTES", 0)
    streamed = Trainer.from_config(tiny_cfg(mosaic, tmp_path / "b", "detection", "max_steps=2", "data_workers=2"), out=sink)
    assert streamed.run.data.train._cache is None
    streamed.fit()
    pa, pb = _params(cached), _params(streamed)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)

