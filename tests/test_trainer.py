"""Trainer: schedule, optimiser, metrics, checkpoints (atomic, validated) and exact resume.

Every run here uses the bundled ``digits`` data (8x8 grey) with a ResNet-20 cut into 4 pieces,
128 training images, batch 32 (4 steps per epoch): a whole run takes about a second on one core.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from manlearn.config import TrainConfig, apply_overrides
from manlearn.errors import CheckpointError, ConfigError
from manlearn.train import (CKPT_NAME, Trainer, build_optimizer, load_checkpoint, lr_at,
                            read_jsonl, save_checkpoint)
from manlearn.train.checkpoint import capture_rng_state, restore_rng_state
from manlearn.cli import main

SPE = 4  # steps per epoch of tiny()


def tiny(out_dir: Path, **kw) -> TrainConfig:
    base = dict(dataset="digits", model="resnet20", method="manpp", base="infopro", K=4,
                train_limit=128, eval_limit=64, batch_size=32, eval_batch_size=64, epochs=2,
                lr=0.05, device="cpu", out_dir=str(out_dir), log_every=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


class Crash(RuntimeError):
    pass


def crash_at(step: int):
    def hook(trainer: Trainer) -> None:
        if trainer.step == step:
            raise Crash(f"simulated crash after step {step}")
    return hook


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for name, v in a["state"][i].items():
            w = b["state"][i][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, f"optimizer state {i}.{name}"


def training_records(records: list[dict]) -> list[tuple]:
    """The deterministic part of the metric records (timings and memory dropped)."""
    out = []
    for r in records:
        if r["type"] == "eval":  # the end-of-run evaluation of a run stopped early
            continue
        out.append((r["type"], r["step"], r["epoch"], r.get("lr"), tuple(r.get("losses", ())),
                    r.get("train_acc"), r.get("test_acc")))
    return out


@pytest.fixture
def one_thread():
    """Bit-identity across processes needs the same intra-op thread count everywhere."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-epoch run (8 steps): final weights, optimiser state, metric records."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref")
    try:
        tr = Trainer.from_config(tiny(out))
        summary = tr.fit()
    finally:
        torch.set_num_threads(old)
    return {
        "model": {k: v.clone() for k, v in tr.learner.state_dict().items()},
        "optimizer": tr.optimizer.state_dict(),
        "records": training_records(read_jsonl(out / "metrics.jsonl")),
        "summary": summary,
        "out": out,
    }


# ---------------------------------------------------------------------------- schedule


def test_cosine_iter_schedule_runs_from_lr_to_zero():
    cfg = TrainConfig(lr=0.1, epochs=3, schedule="cosine-iter")
    lrs = [lr_at(cfg, s, 10) for s in range(31)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[15] == pytest.approx(0.05)
    assert lrs[30] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # per iteration, not per epoch


def test_cosine_warmup_schedule_matches_authors_formula():
    cfg = TrainConfig(lr=0.8, epochs=400, schedule="cosine-warmup", warmup_epochs=10, warmup_lr=0.01)
    spe = 49
    per_epoch = [lr_at(cfg, e * spe, spe) for e in range(400)]
    # constant within an epoch
    assert lr_at(cfg, 5 * spe + 17, spe) == per_epoch[5]
    assert per_epoch[0] == pytest.approx(0.01)  # starts at warmup_lr

    def cos(e):  # e is 1-based, as in the authors' adjust_learning_rate
        return 0.5 * 0.8 * (1 + math.cos(math.pi * e / 400))

    assert per_epoch[4] == pytest.approx(cos(5) * 4 / 10 + 0.01 * 6 / 10)
    assert per_epoch[10] == pytest.approx(cos(11))
    assert all(a < b for a, b in zip(per_epoch[:10], per_epoch[1:11]))  # warm-up rises
    assert per_epoch[-1] == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule():
    cfg = TrainConfig(lr=0.3, schedule="constant")
    assert {lr_at(cfg, s, 7) for s in range(100)} == {0.3}


# ---------------------------------------------------------------------------- optimiser


def test_optimizer_covers_trainable_params_only(tmp_path):
    import manlearn

    learner = manlearn.LocalLearner(model="resnet20", method="manpp", base="dgl", K=3,
                                    in_channels=1, image_size=8)
    frozen = [p for p in learner.parameters() if not p.requires_grad]
    assert frozen, "MAN++ has frozen EMA units"
    opt = build_optimizer(TrainConfig(), learner)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in learner.parameters() if p.requires_grad}
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD) and g["nesterov"] and g["momentum"] == 0.9
    assert g["weight_decay"] == 1e-4
    adamw = build_optimizer(TrainConfig(optimizer="adamw", weight_decay=0.05), learner)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05


# ---------------------------------------------------------------------------- a run


def test_fit_writes_metrics_checkpoint_and_summary(reference):
    out = reference["out"]
    s = reference["summary"]
    assert s["steps"] == 2 * SPE and not s["stopped_early"]
    assert 0.0 <= s["test_acc"] <= 1.0 and s["seconds_per_iter"] > 0
    assert s["peak_mem_bytes"] is None or s["peak_mem_bytes"] > 0
    recs = read_jsonl(out / "metrics.jsonl")
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["step"] for r in epochs] == [SPE, 2 * SPE]
    for r in epochs:
        for key in ("step", "epoch", "losses", "train_acc", "test_acc", "lr", "images_per_s",
                    "peak_mem_bytes", "elapsed_s"):
            assert key in r
        assert len(r["losses"]) == 4  # one per block
        assert r["test_acc"] is not None
    assert [r["step"] for r in recs if r["type"] == "train"] == list(range(1, 2 * SPE + 1))
    ck = load_checkpoint(out / CKPT_NAME)
    assert (ck["step"], ck["epoch"], ck["batch"]) == (2 * SPE, 2, 0)
    assert ck["config"]["dataset"] == "digits" and ck["version"] >= 1
    assert "torch" in ck["rng"]
    assert ck["best_acc"] is not None and len(ck["metrics"]) == len(recs)
    assert (out / "config.yaml").is_file()


def test_runs_are_repeatable(tmp_path, reference, one_thread):
    tr = Trainer.from_config(tiny(tmp_path, max_steps=SPE))  # max_steps stops the run, the lr curve is unchanged
    tr.fit()
    # same seed: the first epoch of the reference ran through identical weights
    ref_first = [r for r in reference["records"] if r[0] == "train" and r[1] <= SPE]
    assert training_records([r for r in tr.records if r["type"] == "train"]) == ref_first


# ---------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("ckpt_every, crash_step, resume_step, resume_batch", [
    (0, 7, 4, 0),  # epoch-end checkpoints only: steps 5-7 are lost and redone
    (3, 7, 6, 2),  # mid-epoch checkpoint at step 6: resume inside epoch 2
    (2, 4, 4, 4),  # checkpoint after the last batch of epoch 1, crash before its evaluation
])
def test_resume_after_crash_is_bit_identical(tmp_path, reference, one_thread, ckpt_every, crash_step,
                                             resume_step, resume_batch):
    cfg = tiny(tmp_path, ckpt_every_steps=ckpt_every)
    with pytest.raises(Crash):
        Trainer.from_config(cfg, callbacks=[crash_at(crash_step)]).fit()
    saved = load_checkpoint(tmp_path / CKPT_NAME)
    assert (saved["step"], saved["batch"]) == (resume_step, resume_batch)
    resumed = Trainer.from_config(cfg, resume=True)
    assert resumed.step == saved["step"]
    resumed.fit()
    assert resumed.step == 2 * SPE
    assert_same_state(reference["model"], resumed.learner.state_dict())
    assert_same_optimizer(reference["optimizer"], resumed.optimizer.state_dict())
    # metrics.jsonl holds each record once, exactly as in the uninterrupted run
    assert training_records(read_jsonl(tmp_path / "metrics.jsonl")) == reference["records"]


def test_stop_at_max_steps_then_resume_is_bit_identical(tmp_path, reference, one_thread):
    first = Trainer.from_config(tiny(tmp_path, max_steps=6)).fit()
    assert first["stopped_early"] and first["steps"] == 6
    ck = load_checkpoint(tmp_path / CKPT_NAME)
    assert (ck["step"], ck["epoch"], ck["batch"]) == (6, 1, 2)
    tr = Trainer.from_config(tiny(tmp_path), resume=True)  # max_steps may change on resume
    tr.fit()
    assert_same_state(reference["model"], tr.learner.state_dict())
    assert_same_optimizer(reference["optimizer"], tr.optimizer.state_dict())


def test_resume_after_sigkill_is_bit_identical(tmp_path, reference, one_thread):
    """Kill a real training process (SIGKILL) after a checkpoint, resume, compare with a straight run."""
    cfg = tiny(tmp_path, ckpt_every_steps=1, epochs=2)
    args = [f"{k}={getattr(cfg, k)}" for k in type(cfg).model_fields
            if getattr(cfg, k) is not None and k != "task"] + [f"task.name={cfg.task.name}"]
    # Make the victim slow enough to be caught mid-run: it sleeps in a step hook.
    code = ("import sys, time; from manlearn.config import TrainConfig, apply_overrides; "
            "from manlearn.train import Trainer; "
            "cfg = apply_overrides(TrainConfig(), sys.argv[1:]); "
            "Trainer.from_config(cfg, callbacks=[lambda t: time.sleep(0.3)]).fit()")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / CKPT_NAME
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and load_checkpoint(ckpt)["step"] >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = load_checkpoint(ckpt)["step"]
    assert 3 <= killed_at < 2 * SPE
    tr = Trainer.from_config(cfg, resume=True)
    tr.fit()
    assert_same_state(reference["model"], tr.learner.state_dict())
    assert training_records(read_jsonl(tmp_path / "metrics.jsonl")) == reference["records"]


def test_epochs_may_be_extended_on_resume(tmp_path):
    Trainer.from_config(tiny(tmp_path, epochs=1)).fit()
    tr = Trainer.from_config(tiny(tmp_path, epochs=2), resume=True)
    assert tr.step == SPE
    assert tr.fit()["steps"] == 2 * SPE


# ---------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    Trainer.from_config(tiny(out, epochs=1, max_steps=2)).fit()
    return out


@pytest.mark.parametrize("change, keys", [
    ({"lr": 0.2}, ["lr"]),
    ({"K": 3, "method": "dgl"}, ["K", "method"]),
    ({"seed": 1, "batch_size": 16}, ["batch_size", "seed"]),
])
def test_checkpoint_from_another_config_is_refused(finished, change, keys):
    cfg = tiny(finished, epochs=1).model_copy(update=change)
    with pytest.raises(CheckpointError) as e:
        Trainer.from_config(cfg, resume=True)
    assert set(re.findall(r"(\w+): checkpoint ", str(e.value))) == set(keys)


def test_fresh_run_will_not_clobber_a_checkpoint(finished, tmp_path):
    with pytest.raises(CheckpointError, match="--resume"):
        Trainer.from_config(tiny(finished, epochs=1))
    # overwrite=True starts again from step 0 (in a copy, to keep the shared fixture intact)
    import shutil

    shutil.copytree(finished, tmp_path / "copy")
    tr = Trainer.from_config(tiny(tmp_path / "copy", epochs=1, max_steps=1), overwrite=True)
    assert tr.step == 0


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    tr = Trainer.from_config(tiny(tmp_path), resume=True)
    assert tr.step == 0 and not tr.resumed


def test_corrupt_checkpoints_are_refused(finished, tmp_path):
    good = (finished / CKPT_NAME).read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "garbage": b"this is not a checkpoint",
        "empty": b"",
    }
    for name, data in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / CKPT_NAME).write_bytes(data)
        with pytest.raises(CheckpointError, match="cannot read checkpoint"):
            Trainer.from_config(tiny(d, epochs=1), resume=True)
    # a readable file that is not a manlearn checkpoint
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a manlearn checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    # a newer format version
    ck = load_checkpoint(finished / CKPT_NAME)
    ck["version"] = 999
    torch.save(ck, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_of_an_earlier_version_is_refused_in_one_line(finished, tmp_path, capsys):
    """0.x keeps no upgraders: a checkpoint whose config has an earlier shape (test_limit, eval_every) is
    refused, for resume and for eval, in one line that names the keys this version does not know."""
    ck = load_checkpoint(finished / CKPT_NAME)
    c = ck["config"]
    c["test_limit"], c["eval_every"] = c.pop("eval_limit"), c.pop("eval_every_epochs")
    d = tmp_path / "old"
    d.mkdir()
    torch.save(ck, d / CKPT_NAME)
    with pytest.raises(CheckpointError, match="keys unknown to this version: eval_every, test_limit") as got:
        Trainer.from_config(tiny(d, epochs=1), resume=True)
    assert "\n" not in str(got.value)
    assert main(["eval", str(d / CKPT_NAME)]) != 0
    err = capsys.readouterr().err.strip()
    assert "earlier version" in err and "test_limit" in err and len(err.splitlines()) == 1, err


def test_checkpoint_with_wrong_weights_is_refused(finished, tmp_path):
    ck = load_checkpoint(finished / CKPT_NAME)
    ck["model"].pop(next(iter(ck["model"])))
    d = tmp_path / "w"
    d.mkdir()
    torch.save(ck, d / CKPT_NAME)
    with pytest.raises(CheckpointError, match="does not fit"):
        Trainer.from_config(tiny(d, epochs=1), resume=True)


def test_fp16_amp_on_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="CUDA"):
        Trainer.from_config(tiny(tmp_path, amp="fp16"))


def test_batch_larger_than_dataset_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="nothing to train"):
        Trainer.from_config(tiny(tmp_path, batch_size=256))


# ---------------------------------------------------------------------------- atomic writes


def test_no_temp_files_after_a_run(reference):
    leftovers = [p.name for p in reference["out"].iterdir() if p.name.startswith(".") or "tmp" in p.name]
    assert leftovers == []


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CKPT_NAME
    save_checkpoint(path, {"format": "x", "n": torch.arange(3)})
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"format": "x", "n": torch.arange(5)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CKPT_NAME]


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = capture_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    restore_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_explicit_split_survives_checkpoint_and_resume(tmp_path):
    cfg = apply_overrides(tiny(tmp_path, max_steps=1), ["split=[[1,2],[2,2],[3,2]]"])
    tr = Trainer.from_config(cfg)
    assert tr.learner.K == 4
    tr.fit()
    saved = load_checkpoint(tmp_path / CKPT_NAME)["config"]["split"]
    assert [tuple(b) for b in saved] == [(1, 2), (2, 2), (3, 2)]
    assert Trainer.from_config(cfg.model_copy(update={"max_steps": 2}), resume=True).step == 1


def test_header_names_the_head_fidelity_and_checkpointing_and_records_carry_s(tmp_path):
    """A run's first line says what distinguishes it (every DGL result names its head), and a MAN++ run's
    step records carry each block's s (the trajectory the spread study reads)."""
    import io

    out = io.StringIO()
    tr = Trainer.from_config(tiny(tmp_path / "a", base="dgl", rule_options={"head": "mlp-sr"}, fidelity="authors",
                      max_steps=1), out=out)
    tr.fit()
    assert "manpp/dgl head=mlp-sr fidelity=authors" in out.getvalue().splitlines()[0]
    train = [r for r in tr.records if r.get("type") == "train"]
    assert train and {"s/0", "lb_vs_ema/0", "ema_vs_next/2"} <= set(train[0]["aux"])
