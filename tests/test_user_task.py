"""A task of the user's own, defined in their file, trains through `manlearn train --import FILE task.name=...`."""
from __future__ import annotations

import re
from pathlib import Path

from manlearn import cli
from manlearn.train import load_checkpoint
from manlearn.train.registry import get_task, list_tasks

README = Path(__file__).resolve().parents[1] / "README.md"


def _user_task() -> str:
    m = re.search(r"<!-- the test suite runs this file \(tests/test_user_task.py\) -->\n```python\n(.*?)```",
                  README.read_text(), re.S)
    assert m, "README lost its tested user-task example"
    return m.group(1)


TINY = ["dataset=digits", "model=resnet20", "K=3", "train_limit=64", "eval_limit=32", "batch_size=32",
        "eval_batch_size=32", "max_steps=2", "device=cpu", "progress=false"]


def test_a_users_task_trains_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "noisy.py"
    path.write_text(_user_task())
    out_dir = tmp_path / "run"
    rc = cli.main(["--import", str(path), "train", "task.name=noisy-labels", "task.flip=0.5", *TINY,
                   f"out_dir={out_dir}"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "noisy-labels" in list_tasks() and get_task("noisy-labels").section.__name__ == "NoisyLabelsSection"
    ckpt = load_checkpoint(out_dir / "last.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["task"] == {"name": "noisy-labels", "flip": 0.5}
    assert "test accuracy" in out
    rc = cli.main(["--import", str(path), "train", "task.name=noisy-labels", "task.flip=2.0", *TINY,
                   f"out_dir={tmp_path / 'bad'}"])
    assert rc == 2 and "task.flip must lie in [0, 1]" in capsys.readouterr().err


def test_an_unknown_task_points_to_import(capsys):
    rc = cli.main(["train", "task.name=noisy-lables", *TINY])
    assert rc == 2 and "--import" in capsys.readouterr().err
