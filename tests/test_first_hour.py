"""The README's "Your first hour" walk-through, run line by line as a user would (a smaller budget: every
`manlearn train` line gets the same extra overrides, which the command line accepts in any order)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = ["dataset=digits", "model=resnet20", "K=4", "lambda_schedule=linear", "batch_size=32", "train_limit=256",
         "eval_limit=64", "eval_batch_size=64"]


def walkthrough() -> list[str]:
    m = re.search(r"<!-- first-hour -->\n```bash\n(.*?)```\n<!-- /first-hour -->", README.read_text(), re.S)
    assert m, "README lost its tested first-hour walk-through"
    return [ln for ln in m.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_the_first_hour_walkthrough_runs_and_shows_what_it_says(tmp_path):
    pytest.importorskip("matplotlib")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MANLEARN_TEST_THREADS": "1"}
    outputs = []
    for line in walkthrough():
        argv = shlex.split(line)
        if argv[0] == ".venv/bin/manlearn":
            argv = [sys.executable, "-m", "manlearn", *argv[1:]]
            if argv[3] == "train":
                argv += [*SMALL, "max_steps=" + re.search(r"max_steps=(\d+)", line).group(1)[:-1]]  # 30 -> 3
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
        outputs.append((line, r.stdout))
    run = tmp_path / "runs" / "hour"
    listing = dict(outputs)[next(ln for ln, _ in outputs if ln.startswith("ls "))].split()
    assert {"config.yaml", "last.pt", "metrics.jsonl", "metrics.csv", "summary.json"} <= set(listing)
    table = next(out for ln, out in outputs if " runs " in ln)
    assert all(name in table for name in ("manpp", "dgl", "e2e")) and " metric " in table and " acc " in table
    assert (run / "curves.png").stat().st_size > 1000
    evaluated = next(out for ln, out in outputs if " eval " in ln)
    assert "test accuracy" in evaluated
    header = next(out for ln, out in outputs if "out_dir=runs/hour/manpp" in ln and "--resume" not in ln)
    assert "blocks: " in header and "from scikit-learn" in header and "memory (counted" in header
    assert json.loads((run / "manpp" / "summary.json").read_text())["steps"] == 6  # resumed: 3 more steps
