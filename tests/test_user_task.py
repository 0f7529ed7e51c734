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


def test_the_users_task_flips_labels_on_the_batches_device(monkeypatch):
    """The example mixed CPU tensors into the batch's labels (a device error on a GPU), and no test looked at
    whether any label was flipped."""
    import types

    import torch

    from manlearn.train.task_runs import ClassificationRun

    namespace: dict = {}
    exec(compile(_user_task(), "README.md", "exec"), namespace)
    run = object.__new__(namespace["NoisyLabelsRun"])
    run.cfg = types.SimpleNamespace(task=types.SimpleNamespace(flip=0.5))
    run.info = types.SimpleNamespace(num_classes=10)
    for device in ("cpu", "meta"):  # meta: a device other than the generator's, as a GPU's would be
        y = torch.zeros(400, dtype=torch.long, device=device)
        monkeypatch.setattr(ClassificationRun, "batches", lambda self, e, a, b, y=y: iter([(None, y, 400)]))
        (_, noisy, n), = list(run.batches(0, 0, 1))
        assert noisy.device.type == device and n == 400
        if device == "cpu":
            changed = float((noisy != 0).float().mean())
    assert 0.35 < changed < 0.55  # half replaced by a random class, 1 in 10 of those by class 0 again
