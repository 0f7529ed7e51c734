"""Optional dependencies (issue #26, item 6): a plain install brings only what `import manlearn` and the
CLI's core need; plots, COCO evaluation and two dataset readers name the extra that brings theirs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from manlearn.cli import main
from manlearn.errors import ManlearnError, MissingExtraError

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"matplotlib": "plots", "pycocotools": "detection", "scipy": "data", "sklearn": "data"}


def _plots():
    from manlearn.bench.report import _pyplot

    _pyplot()


def _coco():
    from manlearn.detection.evaluate import coco_map

    coco_map("nothing.json", {})


def _digits():
    from manlearn.data import load_dataset

    load_dataset("digits", "train")


def _svhn(tmp_path: Path):
    from manlearn.data.formats import read_svhn_mat

    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file")
    read_svhn_mat(str(tmp_path / "train_32x32.mat"))


@pytest.mark.parametrize("blocked,call", [("matplotlib", _plots), ("pycocotools.coco", _coco),
                                          ("sklearn.datasets", _digits), ("scipy.io", _svhn)],
                         ids=["plots", "coco", "digits", "svhn"])
def test_a_missing_extra_is_one_line_naming_it(blocked, call, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, blocked, None)  # what an install without the extra sees
    args = (tmp_path,) if call is _svhn else ()
    with pytest.raises(ManlearnError) as got:
        call(*args)
    msg = str(got.value)
    extra = EXTRAS[blocked.split(".")[0]]
    assert f"pip install 'manlearn[{extra}]'" in msg and "\n" not in msg, msg


def test_the_cli_says_which_extra_a_dataset_needs(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    rc = main(["train", "dataset=digits", "model=resnet20", "method=dgl", "K=2", "max_steps=1",
               "progress=false", f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "manlearn[data]" in err and "Traceback" not in err, err


def test_the_core_imports_and_runs_without_any_extra(tmp_path):
    """`import manlearn`, every subpackage and a short CLI run, with every optional library unimportable."""
    code = (
        "import sys\n"
        f"for m in {sorted(EXTRAS)!r}: sys.modules[m] = None\n"
        "import manlearn, manlearn.cli, manlearn.bench, manlearn.detection, manlearn.segmentation, manlearn.data\n"
        "from manlearn.cli import main\n"
        f"sys.exit(main(['train', 'model=resnet20', 'dataset=fashion-mnist', 'method=dgl', 'K=2', 'max_steps=2', "
        f"'batch_size=8', 'eval_limit=8', 'progress=false', 'out_dir={tmp_path / 'run'}']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert issubclass(MissingExtraError, ManlearnError)
