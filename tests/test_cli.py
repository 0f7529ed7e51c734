"""The ``manlearn`` command line: train / eval / list, recipes, and error reporting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from manlearn import cli
from manlearn.train import CKPT_NAME, load_checkpoint

TINY = ["dataset=digits", "model=resnet20", "K=4", "train_limit=128", "eval_limit=64", "batch_size=32",
        "eval_batch_size=64", "epochs=1", "device=cpu", "progress=false"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_list(capsys):
    rc, out, _ = run(capsys, "list")
    assert rc == 0
    for word in ("resnet32", "resnet110", "manpp", "infopro", "dgl", "e2e", "digits", "fashion-mnist",
                 "fm-r32-infopro-manpp", "cifar10-resnet32-k16-dgl-manpp"):
        assert word in out
    assert {line.split(":")[0] for line in out.splitlines()} >= {"models", "methods", "datasets", "recipes"}


def test_train_then_eval(tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc, out, err = run(capsys, "train", *TINY, f"out_dir={out_dir}", "max_steps=3")
    assert rc == 0, err
    assert "test accuracy:" in out and "seconds/iter:" in out and "peak memory:" in out
    ck = load_checkpoint(out_dir / CKPT_NAME)
    assert ck["step"] == 3 and ck["config"]["K"] == 4

    # continue the same run to the end of its epoch
    rc, out, err = run(capsys, "train", *TINY, f"out_dir={out_dir}", "--resume")
    assert rc == 0, err
    assert "resuming from" in out
    assert load_checkpoint(out_dir / CKPT_NAME)["step"] == 4

    rc, out, err = run(capsys, "eval", str(out_dir / CKPT_NAME), "eval_limit=20")
    assert rc == 0, err
    line = [l for l in out.splitlines() if l.startswith("test accuracy:")][0]
    assert "/20 digits test images" in line
    acc = float(line.split()[2])
    assert 0.0 <= acc <= 1.0


def test_train_from_yaml_file_with_overrides(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("\n".join(item.replace("=", ": ", 1) for item in TINY) + "\nmethod: dgl\n")
    rc, out, err = run(capsys, "train", str(cfg), f"out_dir={tmp_path / 'y'}", "max_steps=1", "K=3")
    assert rc == 0, err
    saved = load_checkpoint(tmp_path / "y" / CKPT_NAME)["config"]
    assert (saved["method"], saved["K"], saved["dataset"]) == ("dgl", 3, "digits")


def test_recipe_names_resolve():
    p = cli.resolve_recipe("fm-r32-infopro-manpp")
    assert p.name == "fm-r32-infopro-manpp.yaml" and p.is_file()
    assert cli.resolve_recipe("fm-r32-infopro-manpp.yaml") == p
    assert cli.resolve_recipe("fm-r32-manpp-infopro") == p  # same words, other order
    assert set(cli.list_recipes()) >= {"fm-r32-e2e", "cifar10-resnet110-k55-infopro-manpp"}


@pytest.mark.parametrize("argv, needle", [
    (["train", "lrr=0.1"], "did you mean 'lr'"),
    (["train", "model=resnet7"], "model='resnet7'"),
    (["train", "K=abc"], "expects int"),
    (["train", "no-such-recipe"], "no config file or recipe"),
    (["train", "fm-r32-e2e", "oops"], "key=value"),
    (["train", "dataset=fashion-mnist", "data_dir=/nonexistent/bogus", "out_dir={tmp}/x"], "files not found"),
    (["train", "dataset=digits", "amp=fp16", "device=cpu", "out_dir={tmp}/x"], "CUDA"),
    (["eval", "{tmp}/missing.pt"], "checkpoint not found"),
    (["eval", "{tmp}/garbage.pt"], "cannot read checkpoint"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    rc, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert rc == 2
    assert err.startswith("error: ") and needle in err
    assert "Traceback" not in err


def test_eval_with_bogus_data_dir(tmp_path, capsys):
    rc, _, err = run(capsys, "train", *TINY, f"out_dir={tmp_path}", "max_steps=1")
    assert rc == 0, err
    # a checkpoint of a dataset that lives in files: --data-dir pointing nowhere must be refused
    ck = tmp_path / CKPT_NAME
    import torch

    state = load_checkpoint(ck)
    state["config"]["dataset"] = "fashion-mnist"
    torch.save(state, tmp_path / "fm.pt")
    rc, _, err = run(capsys, "eval", str(tmp_path / "fm.pt"), "data_dir=/nonexistent/bogus")
    assert rc == 2 and err.startswith("error: ") and "fashion-mnist" in err


def test_refuses_to_resume_another_config(tmp_path, capsys):
    rc, _, err = run(capsys, "train", *TINY, f"out_dir={tmp_path}", "max_steps=1")
    assert rc == 0, err
    rc, _, err = run(capsys, "train", *TINY, f"out_dir={tmp_path}", "lr=0.5", "--resume")
    assert rc == 2 and err.startswith("error: ") and "lr: checkpoint" in err
    rc, _, err = run(capsys, "train", *TINY, f"out_dir={tmp_path}")
    assert rc == 2 and "--resume" in err


def test_python_dash_m_entry_point(tmp_path):
    """``python -m manlearn``: real exit codes, ``error:`` on stderr, no traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run([sys.executable, "-m", "manlearn", "list"], capture_output=True, text=True,
                        env=env, timeout=120)
    assert ok.returncode == 0 and "recipes:" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "manlearn", "train", "method=nope"], capture_output=True,
                         text=True, env=env, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
