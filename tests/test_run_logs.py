"""Run outputs that tools read: metrics.csv, summary.json and TensorBoard events, through the callbacks."""
from __future__ import annotations

import csv
import io
import json

import pytest

from manlearn.config import TrainConfig
from manlearn.train import Trainer, read_jsonl

TINY = dict(dataset="digits", model="resnet20", method="manpp", base="dgl", K=3, train_limit=96, eval_limit=64,
            batch_size=32, eval_batch_size=64, epochs=2, lr=0.05, device="cpu", log_every=1, progress=False)


def _events(tb_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_run_writes_csv_summary_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    summary = Trainer.from_config(TrainConfig(**TINY, out_dir=str(tmp_path)), out=io.StringIO()).fit()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == len(records) and {"loss0", "loss2", "s/0", "lr", "test_acc"} <= set(rows[0]) | set(rows[-1])
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["steps"] == summary["steps"] == 6 and doc["config"]["method"] == "manpp"
    assert doc["test_acc"] == summary["test_acc"] and "digits" in doc["data"]
    ev = _events(tmp_path / "tb")
    assert [s for s, _ in ev["loss/block0"]] == list(range(1, 7))
    assert {"aux/s/block0", "aux/s/block1", "train/lr", "eval/acc"} <= set(ev)


def test_a_resumed_run_drops_the_events_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = TrainConfig(**TINY, out_dir=str(tmp_path))
    Trainer.from_config(TrainConfig(**{**TINY, "max_steps": 4}, out_dir=str(tmp_path)), out=io.StringIO()).fit()
    Trainer.from_config(cfg, resume=True, out=io.StringIO()).fit()
    steps = [s for s, _ in _events(tmp_path / "tb")["loss/block0"]]
    assert steps == sorted(set(steps)) == list(range(1, 7))


def test_a_failed_run_tells_its_callbacks_and_closes_the_event_files(tmp_path):
    """on_exception gets the error (then raised on); the TensorBoard writer is closed before a failed start's
    files are removed, so no writer thread is left writing into a removed folder."""
    pytest.importorskip("tensorboard")
    from manlearn.train.run_logs import TensorBoardLog

    seen = []

    class Stop:
        def on_step_end(self, trainer):
            if trainer.step == 2:
                raise RuntimeError("user callback failed")

        def on_exception(self, trainer, error):
            seen.append((trainer.step, str(error)))

    tb = TensorBoardLog()
    trainer = Trainer.from_config(TrainConfig(**TINY, out_dir=str(tmp_path / "run")), out=io.StringIO(),
                                  callbacks=[Stop(), tb])
    with pytest.raises(RuntimeError, match="user callback failed"):
        trainer.fit()
    assert seen == [(2, "user callback failed")] and tb._writer is None
    assert not (tmp_path / "run" / "tb").exists()  # nothing checkpointed: the failed start's files are gone


def test_one_progress_format_for_every_task_and_a_first_line_at_once(tmp_path):
    out = io.StringIO()
    Trainer.from_config(TrainConfig(**{**TINY, "log_every": 10, "max_steps": 3, "progress": True}, out_dir=str(tmp_path)),
                        out=out).fit()
    text = out.getvalue()
    first = next(line for line in text.splitlines() if line.startswith("step 1/"))
    assert "losses [" in first and first.count(".") >= 3 and "peak activations" in first  # every block's loss
    assert "blocks: 0: stem" in text  # the split, before training
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in recs if r["type"] == "train"] == [1]  # epochs counted from 1, as the lines


def test_runs_table_and_plot_compare_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from manlearn import cli

    for method in ("dgl", "manpp"):
        Trainer.from_config(TrainConfig(**{**TINY, "method": method, "max_steps": 2},
                                        out_dir=str(tmp_path / method)), out=io.StringIO()).fit()
    assert cli.main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "task", "method", "K"] and len(lines) == 3
    assert lines[1].split()[:3] == ["dgl", "classification", "dgl"] and "manpp+dgl" in lines[2]
    assert cli.main(["plot", str(tmp_path / "dgl"), str(tmp_path / "manpp"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert cli.main(["runs", str(tmp_path / "c.png")]) == 2  # not a folder: one line
    capsys.readouterr()
    # a suffix matplotlib cannot write was its ValueError's traceback
    assert cli.main(["plot", str(tmp_path / "dgl"), "--out", str(tmp_path / "c.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write a plot as .txt") and ".png" in err and err.count("\n") == 1, err
    assert not (tmp_path / "c.txt").exists()
    assert cli.main(["plot", str(tmp_path / "dgl"), "--out", str(tmp_path / "c.SVG")]) == 0  # any case
