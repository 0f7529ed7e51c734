"""A command line that forgives the usual order (#27): overrides around flags, --import after the subcommand,
eval with key=value, imports recorded by absolute path and re-imported by eval and --resume."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from manlearn import cli
from manlearn.errors import one_line_warning
from manlearn.train import load_checkpoint

TINY = ["dataset=digits", "model=resnet20", "K=3", "train_limit=64", "eval_limit=32", "batch_size=32",
        "eval_batch_size=32", "device=cpu", "progress=false"]

USER_RULE = '''
import torch.nn.functional as F
from torch import nn
import manlearn

class Probe(nn.Module):
    def __init__(self, c, n):
        super().__init__()
        self.fc = nn.Linear(c, n)
    def forward(self, h, batch):
        return F.cross_entropy(self.fc(h.mean(dim=(2, 3))), batch.y)

@manlearn.register_rule
class ProbeRule(manlearn.Rule):
    name = "order-probe"
    def build_aux(self, ctx, h_shape=None):
        return Probe((h_shape or ctx.h_shape)[0], ctx.num_classes)
'''


def test_overrides_after_flags_and_import_after_the_subcommand(tmp_path, capsys, monkeypatch):
    rule = tmp_path / "my_rule.py"
    rule.write_text(USER_RULE)
    out = tmp_path / "run"
    rc = cli.main(["train", "--import", str(rule), *TINY[:3], "--overwrite", "method=order-probe", *TINY[3:],
                   "max_steps=2", f"out_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    saved = load_checkpoint(out / "last.pt")["config"]["imports"]
    assert saved == [str(rule.resolve())]
    # from another directory, with no --import: eval and --resume import the recorded file again
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["eval", str(out), "eval_limit=16", "device=cpu"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    rc = cli.main(["train", *TINY, "method=order-probe", "--resume", "max_steps=3", f"out_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    assert load_checkpoint(out / "last.pt")["step"] == 3


def test_eval_speaks_train_s_language(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "max_steps=1", f"out_dir={out}"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(out)]) == 0  # the whole test set, not the run's eval_limit of 32
    line = capsys.readouterr().out
    assert "/32 " not in line and "digits test images" in line
    assert cli.main(["eval", str(out), "eval_lmit=5"]) == 2
    assert "did you mean 'eval_limit'" in capsys.readouterr().err
    assert cli.main(["eval", str(out), "eval_limit=0"]) == 2


def test_an_unknown_method_suggests_import(capsys):
    assert cli.main(["train", "method=probe"]) == 2
    assert "--import" in capsys.readouterr().err


def test_a_recorded_import_that_changed_or_vanished_is_said(tmp_path, capsys):
    """Imports are recorded with their content's digest: eval/--resume warn when the file changed since and
    refuse in one line when it is gone (#27 point 3)."""
    rule = tmp_path / "my_rule.py"
    rule.write_text(USER_RULE)
    out = tmp_path / "run"
    assert cli.main(["--import", str(rule), "train", *TINY, "method=order-probe", "max_steps=1",
                     f"out_dir={out}"]) == 0
    digests = load_checkpoint(out / "last.pt")["config"]["import_digests"]
    assert list(digests) == [str(rule.resolve())] and digests[str(rule.resolve())].startswith("sha256:")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unchanged: not a word
        assert cli.main(["eval", str(out), "eval_limit=8", "device=cpu"]) == 0
    rule.write_text(USER_RULE + "\n# edited\n")
    with pytest.warns(UserWarning, match=r"my_rule\.py changed since the run imported it \(sha256:") as seen:
        assert cli.main(["eval", str(out), "eval_limit=8", "device=cpu"]) == 0
    assert sum("changed since" in str(w.message) for w in seen) == 1  # said once, not at every import
    with pytest.warns(UserWarning, match="changed since the run imported it"):  # --resume keeps the first digest
        assert cli.main(["train", *TINY, "method=order-probe", "--resume", "max_steps=2", f"out_dir={out}"]) == 0
    assert load_checkpoint(out / "last.pt")["config"]["import_digests"] == digests
    # on the terminal the warning is one line in manlearn's words, not Python's "file:line: UserWarning" pair
    done = subprocess.run([sys.executable, "-m", "manlearn", "eval", str(out), "eval_limit=8", "device=cpu"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "changed since" in line]
    assert len(said) == 1 and said[0].startswith(f"warning: {rule.resolve()} changed since"), done.stderr
    assert "UserWarning" not in done.stderr and "warnings.warn(" not in done.stderr, done.stderr
    rule.unlink()
    capsys.readouterr()
    assert cli.main(["eval", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the run imported {rule.resolve()} (sha256:" in err and "is gone" in err


def test_another_librarys_warning_keeps_its_origin_on_one_line():
    """Warnings from torch or the user's code still say where they came from, on the same line."""
    line = one_line_warning(UserWarning("TypedStorage is deprecated.\n  It will be removed"), UserWarning,
                            "/site-packages/torch/storage.py", 414)
    assert line == "warning: TypedStorage is deprecated. It will be removed (UserWarning, storage.py:414)\n"
    errors_file = __import__("manlearn.errors").errors.__file__  # a file of manlearn's own
    own = one_line_warning(UserWarning("amp=bf16: emulated"), UserWarning, errors_file, 1)
    assert own == "warning: amp=bf16: emulated\n"
