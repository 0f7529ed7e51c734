"""A full disk during any write is one line naming the path and the space needed, and nothing saved is lost.

Each test runs on a real small filesystem (a tmpfs mounted for the test, where this machine lets us mount
one) that is filled up to the byte count the case needs: checkpoints (the first one, a later one), the run's
config and metrics, the mosaic dataset, benchmark results and plots.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from manlearn.config import TrainConfig
from manlearn.errors import OutputError
from manlearn.train import CKPT_NAME, Trainer, load_checkpoint

REAL_FM = "/usr/share/datasets/fashion-mnist"
TINY = dict(dataset="digits", model="resnet20", method="manpp", base="infopro", K=4, train_limit=128,
            eval_limit=64, batch_size=32, eval_batch_size=64, epochs=2, lr=0.05, device="cpu", log_every=1,
            progress=False, lambda_schedule="linear")
NO_SPACE = r"No space left on device: about [\d.]+ (KiB|MiB) needed, [\d.]+ (KiB|MiB) free( \(ENOSPC\))?"


def tiny(out_dir: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": str(out_dir), **kw})


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size_kib, leave=None)``: a real tmpfs of that size; with ``leave``, filled up to that many
    free bytes by a filler file."""
    mnt = tmp_path / "disk"
    mnt.mkdir()

    def mount(size_kib: int, leave: int | None = None) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        if leave is not None:
            fill(mnt, leave)
        return mnt

    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` free bytes."""
    with open(disk / ".filler", "ab") as f:
        f.write(b"\0" * max(shutil.disk_usage(disk).free - leave, 0))
    assert shutil.disk_usage(disk).free <= leave + 4096


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def _ckpt_bytes(tmp_path) -> int:
    Trainer.from_config(tiny(tmp_path / "probe", max_steps=1)).fit()
    return (tmp_path / "probe" / CKPT_NAME).stat().st_size


def test_a_full_disk_at_the_first_checkpoint_is_one_line_and_leaves_nothing(tmp_path, small_disk):
    size = _ckpt_bytes(tmp_path)
    disk = small_disk(size // 2048)  # half a checkpoint: the first one cannot be written
    with pytest.raises(OutputError, match=r"cannot write the checkpoint .*last\.pt: " + NO_SPACE):
        Trainer.from_config(tiny(disk / "run", max_steps=2)).fit()
    assert visible(disk / "run") == []


def test_a_full_disk_later_keeps_the_previous_checkpoint(tmp_path, small_disk):
    size = _ckpt_bytes(tmp_path)
    disk = small_disk(int(size * 1.5) // 1024)  # one checkpoint fits, not a second one beside it (atomic write)
    with pytest.raises(OutputError, match=r"No space left on device.*\(step 1\) is kept"):
        Trainer.from_config(tiny(disk / "run", ckpt_every_steps=1, max_steps=3)).fit()
    assert load_checkpoint(disk / "run" / CKPT_NAME)["step"] == 1


def test_a_full_disk_at_the_start_is_one_line_and_leaves_no_run_files(small_disk):
    disk = small_disk(256, leave=0)  # not even config.yaml fits
    with pytest.raises(OutputError, match=r"cannot write into .*run: " + NO_SPACE) as e:
        Trainer.from_config(tiny(disk / "run", max_steps=2)).fit()
    assert "\n" not in str(e.value)
    assert visible(disk / "run") == []


def test_a_full_disk_during_the_metrics_leaves_whole_lines(tmp_path, small_disk):
    size = _ckpt_bytes(tmp_path)
    disk = small_disk(4 * size // 1024 + 256)
    long_epochs = dict(train_limit=1024, eval_every_epochs=0)  # 32 steps to the next checkpoint
    Trainer.from_config(tiny(disk / "run", max_steps=1, **long_epochs)).fit()
    fill(disk, 4096)  # then the disk fills up: one page left for the records
    with pytest.raises(OutputError, match=r"cannot write .*metrics\.jsonl: " + NO_SPACE + r"; .*\(step 1\) is kept"):
        Trainer.from_config(tiny(disk / "run", max_steps=30, **long_epochs), resume=True).fit()
    text = (disk / "run" / "metrics.jsonl").read_text()
    assert text.endswith("\n") and len(text) > 1000 and all(json.loads(line)["step"] for line in text.splitlines())
    assert load_checkpoint(disk / "run" / CKPT_NAME)["step"] == 1


def test_append_and_replace_leave_the_file_as_it_was(small_disk):
    from manlearn.bench.common import append_rows
    from manlearn.files import write_text_atomic

    disk = small_disk(256)
    (disk / "results.jsonl").write_text('{"a": 1}\n')
    (disk / "tables.md").write_text("old\n")
    fill(disk, 4096)
    with pytest.raises(OutputError, match=r"cannot write .*results\.jsonl: No space left on device: about "
                                          r"9\.8 KiB needed"):
        append_rows(disk / "results.jsonl", [{"pad": "x" * 10000}])
    assert (disk / "results.jsonl").read_text() == '{"a": 1}\n'
    with pytest.raises(OutputError, match=r"cannot write .*tables\.md: " + NO_SPACE):
        write_text_atomic(disk / "tables.md", "y" * 20000)
    assert (disk / "tables.md").read_text() == "old\n" and visible(disk) == ["results.jsonl", "tables.md"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "manlearn", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.mark.skipif(not Path(REAL_FM).is_dir(), reason="needs the system's Fashion-MNIST (dataset-fashion-mnist)")
def test_make_mosaic_on_a_full_disk_is_one_line_and_leaves_no_folder(tmp_path, small_disk):
    disk = small_disk(192)
    r = _cli("data", "make-mosaic", "--out", str(disk / "mosaic"), "--train", "200", "--val", "20", "--size", "64",
             "--data-dir", REAL_FM, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot write the mosaic into {disk / 'mosaic'}" in lines[0]
    assert "No space left on device: about" in lines[0] and " needed" in lines[0]
    assert not (disk / "mosaic").exists() and visible(disk) == []


def test_plot_on_a_full_disk_is_one_line(tmp_path, small_disk):
    pytest.importorskip("matplotlib")
    Trainer.from_config(tiny(tmp_path / "run", max_steps=3)).fit()
    disk = small_disk(64, leave=0)
    r = _cli("plot", str(tmp_path / "run"), "--out", str(disk / "curves.png"), cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(r"cannot write .*curves\.png: " + NO_SPACE, r.stderr), r.stderr
    assert visible(disk) == [] and not list(disk.glob(".curves*"))


def test_a_pipeline_run_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk):
    from manlearn.distributed import gloo_available
    from manlearn.train.pipeline import PipelineError, run_pipeline

    if not gloo_available():
        pytest.skip("torch.distributed gloo backend not available")
    disk = small_disk(256)  # the config and the records fit, the first checkpoint does not
    cfg = tiny(disk / "run", method="infopro", pipeline_workers=2, pipeline_timeout_s=30.0, log_every=0)
    with pytest.raises(PipelineError, match=r"cannot write the checkpoint .*last\.pt: " + NO_SPACE
                                            + "; no checkpoint was written yet") as e:
        run_pipeline(cfg, threads=1)
    assert "Traceback" not in str(e.value)
    assert visible(disk / "run") == []
