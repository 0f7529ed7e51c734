"""Never lose a run (issue 16): divergence, Ctrl-C, overwrites, bad output paths, bad data and API input.

Runs use the bundled ``digits`` data with a ResNet-20 cut into 4 pieces (4 steps per epoch), as in
tests/test_trainer.py; subprocess runs go through ``python -m manlearn``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from manlearn.config import TrainConfig
from manlearn.errors import DivergenceError
from manlearn.train import CKPT_NAME, Trainer, load_checkpoint

SPE = 4
TINY = dict(dataset="digits", model="resnet20", method="manpp", base="infopro", K=4, train_limit=128,
            eval_limit=64, batch_size=32, eval_batch_size=64, epochs=2, lr=0.05, device="cpu", log_every=1,
            progress=False, lambda_schedule="module")


def tiny(out_dir: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": str(out_dir), **kw})


def cli_args(out_dir: Path, **kw) -> list[str]:
    return [f"{k}={v}" for k, v in {**TINY, "out_dir": out_dir, **kw}.items()]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "manlearn", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def poison_grad_at(trainer: Trainer, step: int, name: str = "blocks.1") -> None:
    """Make the gradient of the first parameter under ``name`` NaN during step ``step`` (0-based)."""
    p = next(p for n, p in trainer.learner.named_parameters() if n.startswith(name + "."))
    p.register_hook(lambda g: g * math.nan if trainer.step == step else g)


# ---------------------------------------------------------------------------- 1. divergence


def test_nonfinite_gradient_stops_the_run_and_keeps_the_finite_checkpoint(tmp_path):
    tr = Trainer(tiny(tmp_path, ckpt_every_steps=1))
    poison_grad_at(tr, 2)  # the losses stay finite: only the gradient check can see it
    with pytest.raises(DivergenceError, match=r"at step 3: the gradient of blocks\.1\.\S+ \(block 1\) is not finite"):
        tr.fit()
    ckpt = load_checkpoint(tmp_path / CKPT_NAME)
    assert ckpt["step"] == 2 and all_finite(ckpt["model"])


def test_nonfinite_skip_drops_the_update_and_counts_it(tmp_path):
    tr = Trainer(tiny(tmp_path, nonfinite="skip", epochs=1))
    poison_grad_at(tr, 1)
    summary = tr.fit()
    assert summary["skipped_steps"] == 1 and summary["steps"] == SPE
    ckpt = load_checkpoint(tmp_path / CKPT_NAME)
    assert ckpt["nonfinite_skipped"] == 1 and all_finite(ckpt["model"])


def test_non_finite_weights_are_never_saved(tmp_path):
    tr = Trainer(tiny(tmp_path, epochs=1, max_steps=1))
    tr.fit()
    before = (tmp_path / CKPT_NAME).read_bytes()
    with torch.no_grad():
        next(tr.learner.parameters()).fill_(math.inf)
    with pytest.raises(DivergenceError, match=r"not finite, so it is not saved; .*last\.pt \(step 1\) is kept"):
        tr.save()
    assert (tmp_path / CKPT_NAME).read_bytes() == before


def test_cli_divergence_is_one_line_exit_3_and_last_checkpoint_finite(tmp_path):
    r = run_cli("train", *cli_args(tmp_path, lr=1e6, ckpt_every_steps=1))
    assert r.returncode == 3, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert "training diverged at step" in errors[0] and "block" in errors[0]
    ckpt = load_checkpoint(tmp_path / CKPT_NAME)
    assert f"(step {ckpt['step']}) is kept" in errors[0] and all_finite(ckpt["model"])
