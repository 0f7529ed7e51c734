"""Never lose a run (issue 16): divergence, Ctrl-C, overwrites, bad output paths, bad data and API input.

Runs use the bundled ``digits`` data with a ResNet-20 cut into 4 pieces (4 steps per epoch), as in
tests/test_trainer.py; subprocess runs go through ``python -m manlearn``.
"""

from __future__ import annotations

import math
import os
import re
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
            progress=False, lambda_schedule="linear")


def tiny(out_dir: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": str(out_dir), **kw})


def cli_args(out_dir: Path, **kw) -> list[str]:
    return [f"{k}={v}" for k, v in {**TINY, "out_dir": out_dir, **kw}.items()]


def all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def poison_grad_at(trainer: Trainer, step: int, name: str = "blocks.1") -> None:
    """Make the gradient of the first parameter under ``name`` NaN during step ``step`` (0-based)."""
    p = next(p for n, p in trainer.learner.named_parameters() if n.startswith(name + "."))
    p.register_hook(lambda g: g * math.nan if trainer.step == step else g)


# ---------------------------------------------------------------------------- 1. divergence


def test_nonfinite_gradient_stops_the_run_and_keeps_the_finite_checkpoint(tmp_path):
    tr = Trainer.from_config(tiny(tmp_path, ckpt_every_steps=1))
    poison_grad_at(tr, 2)  # the losses stay finite: only the gradient check can see it
    with pytest.raises(DivergenceError, match=r"at step 3: the gradient of blocks\.1\.\S+ \(block 1\) is not finite"):
        tr.fit()
    ckpt = load_checkpoint(tmp_path / CKPT_NAME)
    assert ckpt["step"] == 2 and all_finite(ckpt["model"])


def test_nonfinite_skip_drops_the_update_and_counts_it(tmp_path):
    tr = Trainer.from_config(tiny(tmp_path, nonfinite="skip", epochs=1))
    poison_grad_at(tr, 1)
    summary = tr.fit()
    assert summary["skipped_steps"] == 1 and summary["steps"] == SPE
    ckpt = load_checkpoint(tmp_path / CKPT_NAME)
    assert ckpt["nonfinite_skipped"] == 1 and all_finite(ckpt["model"])


def test_a_skipped_step_changes_no_buffer_and_no_ema_unit(tmp_path):
    """BN running statistics and MAN's ema units are updated inside the step: a skipped step puts them back,
    so only the skipped step's update is missing (the run went on diverging before)."""
    from manlearn.train import read_jsonl

    tr = Trainer.from_config(tiny(tmp_path, nonfinite="skip", epochs=1, log_every=1))
    seen = {}

    def frozen(t):
        return {k: v.clone() for k, v in t.learner.state_dict().items()
                if k in dict(t.learner.named_buffers()) or not dict(t.learner.named_parameters()).get(k, v).requires_grad}

    tr.callbacks.items.append(type("Spy", (), {"on_step_end": lambda self, t: seen.__setitem__(t.step, frozen(t))})())
    poison_grad_at(tr, 1)
    tr.fit()
    assert any("ema" in k for k in seen[1]) and any("running_mean" in k for k in seen[1])
    assert all(torch.equal(seen[1][k], seen[2][k]) for k in seen[1]), "the skipped step 2 changed state"
    assert not all(torch.equal(seen[2][k], seen[3][k]) for k in seen[2])  # (a step that is not skipped does)
    rec = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["type"] == "train"}
    assert rec[2]["skipped"] == 1 and rec[3]["skipped"] == 0


def test_non_finite_weights_are_never_saved(tmp_path):
    tr = Trainer.from_config(tiny(tmp_path, epochs=1, max_steps=1))
    tr.fit()
    before = (tmp_path / CKPT_NAME).read_bytes()
    with torch.no_grad():
        next(tr.learner.parameters()).fill_(math.inf)
    with pytest.raises(DivergenceError, match=r"not finite, so it is not saved; .*last\.pt \(step 1\) is kept"):
        tr.save()
    assert (tmp_path / CKPT_NAME).read_bytes() == before


def test_cli_divergence_is_one_line_exit_3_and_last_checkpoint_finite(tmp_path, capsys):
    from manlearn.cli import main

    assert main(["train", *cli_args(tmp_path, lr=1e6, ckpt_every_steps=1)]) == 3
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "training diverged at step" in errors[0] and "block" in errors[0]
    ckpt = load_checkpoint(tmp_path / CKPT_NAME)
    assert f"(step {ckpt['step']}) is kept" in errors[0] and all_finite(ckpt["model"])


# ---------------------------------------------------------------------------- 2. Ctrl-C (real signals)

# Run first in the child process: slows one moment down and touches a marker file when
# it is reached, so the test can send SIGINT right then.
SLOW_PLUGIN = '''
import os, pathlib, time
import torch
from manlearn.memory import SavedTensorTracker
from manlearn.train import trainer as _trainer
from manlearn.train.task_runs import ClassificationRun

MOMENT, AT = os.environ["ROBUST_MOMENT"], int(os.environ["ROBUST_AT"])
MARKER, SLEEP = pathlib.Path(os.environ["ROBUST_MARKER"]), float(os.environ.get("ROBUST_SLEEP", "0.5"))
state = {"step": -1, "saves": 0, "evals": 0}

def reached():
    MARKER.touch()

_train_one = _trainer.Trainer._train_one
def train_one(self, *a, **k):
    state["step"] = self.step
    return _train_one(self, *a, **k)
_trainer.Trainer._train_one = train_one

_pack = SavedTensorTracker._pack
def pack(self, t):  # the activation tracker's hook: Python code in the hot path
    if MOMENT == "step" and state["step"] == AT:
        reached()
        time.sleep(0.001)
    return _pack(self, t)
SavedTensorTracker._pack = pack

_save = torch.save
def save(*a, **k):
    state["saves"] += 1
    if MOMENT == "save" and state["saves"] == AT:
        reached()
        time.sleep(SLEEP)
    return _save(*a, **k)
torch.save = save

_evaluate = ClassificationRun.evaluate
def evaluate(self, learner):
    state["evals"] += 1
    if MOMENT == "eval" and state["evals"] == AT:
        reached()
        time.sleep(SLEEP)
    return _evaluate(self, learner)
ClassificationRun.evaluate = evaluate
'''

CTRL_C = dict(ckpt_every_steps=1, eval_every_steps=3)


def records(path: Path) -> list[tuple]:
    from manlearn.train import read_jsonl

    return [(r["type"], r["step"], tuple(r.get("losses", ())), r.get("train_acc"), r.get("test_acc"))
            for r in read_jsonl(path)]


@pytest.fixture(scope="module")
def ctrl_c_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctrl_c_ref")
    tr = Trainer.from_config(tiny(out, **CTRL_C))
    tr.fit()
    return {"model": {k: v.clone() for k, v in tr.learner.state_dict().items()},
            "records": records(out / "metrics.jsonl")}


def interrupt_run(tmp_path: Path, moment: str, at: int, signals: int = 1, sleep: float = 0.5, sig: str = "SIGINT",
                  **kw) -> tuple[subprocess.CompletedProcess, float]:
    """A CLI training run that receives ``signals`` real ``sig`` signals (SIGINT: Ctrl-C) when ``moment`` number
    ``at`` is reached; returns the finished process and the seconds from the last signal to its exit."""
    import signal
    import time

    plugin, marker = tmp_path / "slow_plugin.py", tmp_path / "reached"
    plugin.write_text(SLOW_PLUGIN)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ROBUST_MOMENT=moment, ROBUST_AT=str(at),
               ROBUST_MARKER=str(marker), ROBUST_SLEEP=str(sleep))
    out = tmp_path / "run"
    # the CLI's main with the plugin run first (not --import: the run's config would record it)
    code = "import sys; exec(open(sys.argv[1]).read()); from manlearn.cli import main; sys.exit(main(sys.argv[2:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, str(plugin), "train", *cli_args(out, **{**CTRL_C, **kw})],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert marker.exists(), f"the run never reached the {moment}: {proc.communicate()[1]}"
        for i in range(signals):
            if i:
                time.sleep(0.3)
            proc.send_signal(getattr(signal, sig))
        t = time.time()
        stdout, stderr = proc.communicate(timeout=120)
        waited = time.time() - t
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), waited


def assert_resumes_exactly(run: Path, reference: dict) -> None:
    """Resumed from its checkpoint, the stopped run ends with the uninterrupted run's every tensor and record."""
    tr = Trainer.from_config(tiny(run, **CTRL_C), resume=True)
    tr.fit()
    assert all(torch.equal(reference["model"][k], v) for k, v in tr.learner.state_dict().items())
    assert records(run / "metrics.jsonl") == reference["records"]


@pytest.mark.parametrize("moment, at, ckpt_every, step, line", [
    # inside the activation tracker's hook, no periodic checkpoint: the interrupt writes step 2
    ("step", 1, 0, 2, "interrupted: saved {ckpt} at step 2 (epoch 1, batch 2)"),
    ("save", 2, 1, 2, "interrupted: saved {ckpt} at step 2 (epoch 1, batch 2)"),  # while last.pt is written
    ("eval", 1, 0, 3, "interrupted during the evaluation at step 3: saved {ckpt} at step 3"),
])
def test_ctrl_c_saves_the_completed_step_exits_130_and_resumes_exactly(tmp_path, ctrl_c_reference, moment, at,
                                                                      ckpt_every, step, line):
    r, _ = interrupt_run(tmp_path, moment, at, ckpt_every_steps=ckpt_every)
    ckpt = tmp_path / "run" / CKPT_NAME
    assert r.returncode == 130, r.stderr
    assert line.format(ckpt=ckpt) in r.stderr and "Traceback" not in r.stderr
    assert load_checkpoint(ckpt)["step"] == step
    assert_resumes_exactly(tmp_path / "run", ctrl_c_reference)


@pytest.mark.parametrize("moment, at, step, line", [
    ("step", 1, 2, "terminated (SIGTERM): saved {ckpt} at step 2 (epoch 1, batch 2); continue with --resume"),
    ("eval", 1, 3, "terminated (SIGTERM) during the evaluation at step 3: saved {ckpt} at step 3"),
])
def test_sigterm_saves_the_completed_step_exits_143_and_resumes_exactly(tmp_path, ctrl_c_reference, moment, at,
                                                                         step, line):
    """Preemption (docker stop, Slurm, Kubernetes): handled like the first Ctrl-C, with its own exit status."""
    r, _ = interrupt_run(tmp_path, moment, at, sig="SIGTERM", ckpt_every_steps=0)
    ckpt = tmp_path / "run" / CKPT_NAME
    assert r.returncode == 143, r.stderr
    assert line.format(ckpt=ckpt) in r.stderr and "Traceback" not in r.stderr
    assert load_checkpoint(ckpt)["step"] == step
    assert_resumes_exactly(tmp_path / "run", ctrl_c_reference)


def test_second_sigterm_exits_at_once_with_143(tmp_path):
    r, waited = interrupt_run(tmp_path, "save", 2, signals=2, sleep=30, sig="SIGTERM")
    assert r.returncode == 143 and waited < 10, r.stderr
    assert "second SIGTERM: stopped at once" in r.stderr


def test_second_ctrl_c_exits_at_once_keeping_the_last_checkpoint(tmp_path):
    r, waited = interrupt_run(tmp_path, "save", 2, signals=2, sleep=30)
    assert r.returncode == 130 and waited < 10, r.stderr
    ckpt = tmp_path / "run" / CKPT_NAME
    assert f"second Ctrl-C: stopped at once; {ckpt} (step 1) is kept" in r.stderr
    assert load_checkpoint(ckpt)["step"] == 1
    leftovers = list(ckpt.parent.glob(".last.pt.*.tmp"))  # the write the process was killed in
    assert leftovers
    tr = Trainer.from_config(tiny(ckpt.parent, **CTRL_C), resume=True)  # the next start cleans it up
    assert tr.step == 1 and not any(p.exists() for p in leftovers)


def test_the_activation_tracker_runs_no_python_when_autograd_frees_a_tensor():
    """A KeyboardInterrupt landing in a ``__del__`` is printed and swallowed by Python: the tracker has none
    (its releases are queued by a builtin weak-reference callback) and still counts exactly."""
    from manlearn.memory import SavedTensorTracker, _Held

    assert not hasattr(_Held, "__del__")
    x = torch.randn(64, 32, requires_grad=True)
    with SavedTensorTracker() as tr:
        y = (x * 2).sin()
        assert tr.live == 64 * 32 * 4
        y.sum().backward()
    assert tr.live == 0 and tr.peak == 64 * 32 * 4


# ---------------------------------------------------------------------------- 3. overwrites


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.yaml", CKPT_NAME])
def test_the_guard_covers_every_file_a_run_writes(tmp_path, name):
    from manlearn.errors import CheckpointError

    (tmp_path / name).write_text("an earlier run's")
    with pytest.raises(CheckpointError, match=f"already holds .*{name}.* of an earlier run"):
        Trainer.from_config(tiny(tmp_path))
    assert (tmp_path / name).read_text() == "an earlier run's"


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    from manlearn.errors import ConfigError

    with pytest.raises(ConfigError, match="--resume and --overwrite"):
        Trainer.from_config(tiny(tmp_path), resume=True, overwrite=True)
    from manlearn.cli import main

    assert main(["train", *cli_args(tmp_path), "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite" in capsys.readouterr().err


@pytest.fixture
def earlier_run(tmp_path):
    """An out_dir holding a finished run's files (1 step), and their bytes (a folder: the names in it)."""
    Trainer.from_config(tiny(tmp_path, epochs=1, max_steps=1)).fit()
    return snapshot(tmp_path)


def snapshot(d: Path) -> dict:
    return {p.name: (p.read_bytes() if p.is_file() else sorted(q.name for q in p.iterdir())) for p in d.iterdir()
            if not p.name.startswith(".")}


def test_overwrite_run_failing_before_its_first_checkpoint_restores_the_earlier_run(tmp_path, earlier_run):
    def crash(trainer):
        assert not (tmp_path / CKPT_NAME).exists()  # the earlier run's files are aside meanwhile
        raise RuntimeError("simulated crash")

    tr = Trainer.from_config(tiny(tmp_path, lr=0.01), overwrite=True, callbacks=[crash])
    with pytest.raises(RuntimeError, match="simulated crash"):
        tr.fit()
    assert snapshot(tmp_path) == earlier_run
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(earlier_run)


def test_overwrite_run_replaces_the_earlier_run_at_its_first_checkpoint(tmp_path, earlier_run):
    seen = []
    tr = Trainer.from_config(tiny(tmp_path, lr=0.01, ckpt_every_steps=1, max_steps=2), overwrite=True,
                 callbacks=[lambda t: seen.append(sorted(p.name for p in tmp_path.iterdir()))])
    tr.fit()
    assert [n for n in seen[0] if n != "tb"] == ["config.yaml", "last.pt", "metrics.csv", "metrics.jsonl"]  # (tb:
    # TensorBoard, when installed) nothing of the earlier run left
    assert load_checkpoint(tmp_path / CKPT_NAME)["config"]["lr"] == 0.01


def test_a_killed_overwrite_run_and_a_killed_save_are_settled_by_the_next_start(tmp_path, earlier_run):
    from manlearn.errors import CheckpointError
    from manlearn.train.outputs import ASIDE, move_aside

    # what kill -9 leaves: the earlier run aside, the new run's config, half a checkpoint write
    move_aside(tmp_path)
    (tmp_path / "config.yaml").write_text("the killed run's")
    (tmp_path / ".last.pt.k2j4.tmp").write_bytes(b"half a checkpoint")
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        Trainer.from_config(tiny(tmp_path))
    assert snapshot(tmp_path) == earlier_run
    assert not (tmp_path / ASIDE).exists() and not list(tmp_path.glob(".last.pt.*"))


# ---------------------------------------------------------------------------- 4. bad output paths


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if a run gets as far as loading its data (paths must be checked before)."""
    from manlearn.train import trainer as trainer_module

    def refuse(*a, **k):
        raise AssertionError("the data was loaded before the output path was checked")

    monkeypatch.setattr(trainer_module, "make_task_run", refuse)


@pytest.mark.parametrize("out, cause", [
    ("file", r"out_dir .*file cannot be used: .*file is a file, not a folder"),
    ("file/sub", r"out_dir .*file/sub cannot be used: .*file is a file, not a folder"),
    ("/proc/manlearn-x", r"out_dir /proc/manlearn-x is not writable: No such file or directory \(ENOENT\)"),
])
def test_bad_out_dir_is_one_line_before_any_data_is_loaded(tmp_path, capsys, no_data, out, cause):
    from manlearn.cli import main

    (tmp_path / "file").write_text("x")
    out_dir = out if out.startswith("/") else str(tmp_path / out)
    assert main(["train", *cli_args(out_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(cause, err), err


def test_disk_full_during_a_save_is_one_line_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    import errno

    from manlearn.errors import OutputError
    from manlearn.train import checkpoint as checkpoint_module

    real_save = torch.save
    saves = []

    def save(obj, f, *a, **k):
        saves.append(obj["step"])
        if len(saves) == 3:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    tr = Trainer.from_config(tiny(tmp_path, ckpt_every_steps=1))
    with pytest.raises(OutputError) as e:
        tr.fit()
    ckpt = tmp_path / CKPT_NAME
    assert re.fullmatch(re.escape(f"cannot write the checkpoint {ckpt}: No space left on device: about ") +
                        r"[\d.]+ MiB needed, [\d.]+ MiB free \(ENOSPC\); " + re.escape(f"{ckpt} (step 2) is kept"),
                        str(e.value)), str(e.value)
    assert load_checkpoint(ckpt)["step"] == 2 and not list(tmp_path.glob(".last.pt.*"))


@pytest.mark.parametrize("argv, needle", [
    (["bench", "speed", "--iters", "0"], "--iters must be >= 1, got 0"),
    (["bench", "speed", "--results", "/proc/manlearn-x/speed.jsonl"], "/proc/manlearn-x is not writable"),
    (["bench", "memory", "--results", "{tmp}/file/memory.jsonl"], "file is a file, not a folder"),
    (["bench", "accuracy", "--results", "{tmp}"], "is a folder; give the path of a .jsonl file"),
    (["data", "make-mosaic", "--out", "/proc/manlearn-x"], "cannot create /proc/manlearn-x: No such file"),
    (["data", "make-mosaic", "--out", "{tmp}/file"], "exists and is not a folder"),
])
def test_bench_and_mosaic_outputs_are_checked_at_once(tmp_path, capsys, monkeypatch, argv, needle):
    import time

    from manlearn.cli import main

    (tmp_path / "file").write_text("x")
    t = time.perf_counter()
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert time.perf_counter() - t < 2


# ---------------------------------------------------------------------------- 5. eval of a folder


def test_eval_of_a_run_folder_uses_its_checkpoint_and_an_empty_folder_says_so(tmp_path, capsys):
    from manlearn.cli import main

    Trainer.from_config(tiny(tmp_path / "run", epochs=1, max_steps=1)).fit()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "device=cpu"]) == 0
    assert "step 1" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a checkpoint file" in err and "last.pt" in err


# ---------------------------------------------------------------------------- 6. the Python API checks its input


@pytest.fixture(scope="module")
def learner():
    import manlearn

    return manlearn.LocalLearner("resnet20", method="dgl", K=2, num_classes=10)


@pytest.mark.parametrize("make, needle", [
    (lambda x: (x, torch.tensor([0, 1, 10, 2])),
     r"class indices must lie in 0\.\.9 \(num_classes=10\), got labels 0\.\.10"),
    (lambda x: (x, torch.tensor([0, -1, 3, 2])), r"must lie in 0\.\.9 .*got labels -1\.\.3"),
    (lambda x: (x, torch.tensor([0, 1, 3, 2], dtype=torch.int32)), r"must be int64: y\.long\(\)"),
    (lambda x: (x, torch.tensor([True, False, True, True])), r"integer class indices .* got torch\.bool"),
    (lambda x: (x, torch.full((4, 10), math.nan)), "probabilities .* NaN or infinite"),
    (lambda x: (x.index_fill(0, torch.tensor([1]), math.nan), torch.tensor([0, 1, 3, 2])), "NaN or infinite"),
    (lambda x: (x.index_fill(0, torch.tensor([2]), math.inf), torch.tensor([0, 1, 3, 2])), "NaN or infinite"),
    (lambda x: ((x * 255).to(torch.uint8), torch.tensor([0, 1, 3, 2])), r"float tensors, got torch\.uint8"),
])
def test_train_step_refuses_bad_targets_and_inputs_with_config_errors(learner, make, needle):
    from manlearn.errors import ConfigError

    x, y = make(torch.rand(4, 3, 32, 32))
    with pytest.raises(ConfigError, match=needle):
        learner.train_step(x, y)


def test_a_custom_head_that_does_not_fit_the_last_unit_is_refused_at_construction():
    import manlearn
    from manlearn.errors import ConfigError

    def net(head):
        model = manlearn.create_model("resnet20", num_classes=10)
        model.head = head
        return model

    with pytest.raises(ConfigError, match=r"does not fit the last unit, whose output is \[B, 64, 8, 8\]"):
        manlearn.LocalLearner(net(torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(64, 10))), K=2,
                              method="dgl")
    with pytest.raises(ConfigError, match=r"maps the last unit's output \[B, 64, 8, 8\] to \[B, 7\]; a classifier "
                                          r"of num_classes=10 must give \[B, 10\]: pass num_classes=7"):
        manlearn.LocalLearner(net(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1),
                                                      torch.nn.Linear(64, 7))), K=2, method="dgl", num_classes=10)


def test_a_start_that_fails_before_its_first_checkpoint_leaves_nothing_and_the_same_command_works(tmp_path):
    def crash(trainer):
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer.from_config(tiny(tmp_path / "run"), callbacks=[crash]).fit()
    assert not any(p for p in (tmp_path / "run").iterdir() if not p.name.startswith("."))
    Trainer.from_config(tiny(tmp_path / "run", max_steps=1)).fit()  # the same command, no --overwrite needed
    assert load_checkpoint(tmp_path / "run" / CKPT_NAME)["step"] == 1


def test_resume_never_drops_another_runs_records(tmp_path):
    from manlearn.errors import CheckpointError

    (tmp_path / "metrics.jsonl").write_text('{"type": "train", "step": 1}\n')
    with pytest.raises(CheckpointError, match="holds metrics.jsonl of another run but no checkpoint"):
        Trainer.from_config(tiny(tmp_path), resume=True)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"type": "train", "step": 1}\n'
    fresh = tmp_path / "new"  # an empty or new folder: --resume starts the run (a requeued job's first try)
    assert Trainer.from_config(tiny(fresh, max_steps=1), resume=True).fit()["steps"] == 1
