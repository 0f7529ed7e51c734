"""Block pipeline on CPU: 2 worker processes (1 thread each) over gloo on loopback.

- without momentum units the pipeline computes exactly what one process computes;
- MAN's EMA across the worker boundary tracks the next worker's first unit, at the documented version;
- it trains on a small real set (sklearn digits) to a sensible accuracy;
- a killed or stuck worker ends the run with an error naming it, within the timeout;
- SIGTERM and Ctrl-C (real signals to a real `manlearn train` process) save an agreed step, exit 143 / 130 with
  one line, and --resume continues bit-identically (every record and tensor); so does a run killed with -9,
  from its epoch checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from manlearn.config import TrainConfig
from manlearn.distributed import gloo_available
from manlearn.errors import CheckpointError, ConfigError
from manlearn.train import Trainer, load_checkpoint
from manlearn.train.pipeline import PipelineError, param_version, partition, run_pipeline

pytestmark = pytest.mark.skipif(not gloo_available(), reason="torch.distributed gloo backend not available")


def cfg_(out_dir, **kw) -> TrainConfig:
    base = dict(dataset="digits", model="resnet20", method="infopro", K=4, lambda_schedule="linear",
                train_limit=128, eval_limit=100, batch_size=32, eval_batch_size=100, epochs=2, lr=0.05,
                device="cpu", out_dir=str(out_dir), log_every=0, progress=False, pipeline_workers=2,
                pipeline_timeout_s=30.0)
    base.update(kw)
    return TrainConfig(**base)


def run(cfg, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_pipeline(cfg, threads=1, **kw)


# ------------------------------------------------------------------ planning (no processes)

def test_partition_is_contiguous_and_balanced():
    assert [tuple(r) for r in partition([1, 1, 1, 1], 2)] == [(0, 1), (2, 3)]
    rs = partition([5, 1, 1, 1, 1, 1], 2)
    assert (rs[0].start, rs[0].stop, rs[1].stop) == (0, 1, 6)
    rs = partition([1, 2, 3, 4, 5, 6, 7], 3)
    assert rs[0].start == 0 and rs[-1].stop == 7 and all(a.stop == b.start for a, b in zip(rs, rs[1:]))
    assert max(sum(range(r.start + 1, r.stop + 1)) for r in rs) == 11  # optimum of 1..7 over 3
    with pytest.raises(ConfigError):
        partition([1, 1], 3)


def test_param_version_staleness_is_as_documented():
    for every in (1, 2, 3):
        for delay in (1, 2, 4):
            for t in range(40):
                v = param_version(t, every, delay)
                assert v % every == 0 and v <= t - delay or v == 0
                if t - delay >= every:
                    assert delay <= t - v <= delay + every - 1


# ------------------------------------------------------------------ exactness without momentum units

@pytest.mark.parametrize("blocks_in_flight", [1, 2])
def test_pipeline_equals_single_process_without_momentum_units(tmp_path, blocks_in_flight):
    """InfoPro (image travels with the activations) over 2 workers == the Trainer, bit for bit up to
    float noise: each worker's step t sees activations made with the previous worker's step-t weights.
    With 2 blocks in flight each worker overlaps its own blocks (LocalLearner.train_blocks): same result."""
    s = run(cfg_(tmp_path / "pipe", blocks_in_flight=blocks_in_flight))
    ck = load_checkpoint(tmp_path / "pipe" / "last.pt")
    tr = Trainer.from_config(cfg_(tmp_path / "single", pipeline_workers=0), out=open(os.devnull, "w"))
    ref = tr.fit()
    want = tr.learner.state_dict()
    assert ck["model"].keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(ck["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert s["steps"] == ref["steps"] == 8
    assert s["test_acc"] == pytest.approx(ref["test_acc"], abs=1e-9)


def test_pipeline_under_bf16_autocast_equals_single_process(tmp_path):
    """amp=bf16: every worker runs its blocks under the same autocast as the Trainer, and the bf16
    activations cross the boundary as they are (half the bytes of float32)."""
    s = run(cfg_(tmp_path / "pipe", amp="bf16"))
    ck = load_checkpoint(tmp_path / "pipe" / "last.pt")
    tr = Trainer.from_config(cfg_(tmp_path / "single", pipeline_workers=0, amp="bf16"), out=open(os.devnull, "w"))
    ref = tr.fit()
    for k, v in tr.learner.state_dict().items():
        torch.testing.assert_close(ck["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert s["test_acc"] == pytest.approx(ref["test_acc"], abs=1e-9)
    run(cfg_(tmp_path / "f32"))  # and bf16 did change what was computed: not the float32 weights
    f32 = load_checkpoint(tmp_path / "f32" / "last.pt")["model"]
    assert any(not torch.allclose(f32[k], v, rtol=1e-3, atol=1e-4) for k, v in ck["model"].items()
               if v.is_floating_point())
    for kw, said in ((dict(amp="fp16"), "amp=fp16 .one gradient scaler spans all blocks.; use amp=bf16"),
                     (dict(compile=True), "does not support compile yet")):
        with pytest.raises(ConfigError, match=said):
            run(cfg_(tmp_path / "refused", **kw))


def test_a_diverging_pipeline_stops_with_exit_3_and_keeps_its_finite_checkpoint(tmp_path, capsys):
    """It trained on with NaN losses, saved a checkpoint of NaN weights and exited 0 (the Trainer exits 3)."""
    from manlearn.cli import main

    items = ["dataset=digits", "model=resnet20", "method=infopro", "K=4", "lambda_schedule=linear",
             "train_limit=128", "eval_limit=64", "batch_size=32", "epochs=2", "device=cpu", "progress=false",
             "pipeline_workers=2", "pipeline_timeout_s=30"]
    # lr=100 diverges in the second epoch (4 steps each), after the first epoch's checkpoint (as the Trainer does)
    assert main(["train", *items, "lr=100", f"out_dir={tmp_path / 'run'}"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: training diverged") and err.count("\n") == 1, err
    assert f"{tmp_path / 'run' / 'last.pt'} (step 4) is kept" in err, err
    kept = load_checkpoint(tmp_path / "run" / "last.pt")
    assert kept["step"] == 4 and all(bool(torch.isfinite(v).all()) for v in kept["model"].values()
                                     if v.is_floating_point())
    # a fresh run that diverges before its first checkpoint leaves nothing behind
    assert main(["train", *items, "lr=1e12", f"out_dir={tmp_path / 'fresh'}"]) == 3
    assert "no checkpoint was written yet" in capsys.readouterr().err
    assert not (tmp_path / "fresh" / "last.pt").exists() and not (tmp_path / "fresh" / "config.yaml").exists()
    assert main(["train", *items, "nonfinite=skip", f"out_dir={tmp_path / 'skip'}"]) == 2
    assert "does not support nonfinite=skip" in capsys.readouterr().err


# ------------------------------------------------------------------ MAN's EMA source across workers

def test_ema_tracks_the_next_workers_first_unit_at_the_documented_version(tmp_path):
    """momentum=0 makes the EMA unit a copy of its source at the last update, so the EMA of the last
    auxiliary network on worker 0 must equal worker 1's first unit as of v(T-1) updates, which a run
    stopped after v(T-1) steps (same schedule, deterministic) shows."""
    every, delay, T = 2, 1, 8
    kw = dict(method="manpp", base="dgl", momentum=0.0, pipeline_param_sync_every=every,
              pipeline_param_delay=delay)
    a = run(cfg_(tmp_path / "a", **kw))
    v = param_version(T - 1, every, delay)
    assert v == 6
    run(cfg_(tmp_path / "b", max_steps=v, **kw))
    A = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    B = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    first, second = a["ranges"]
    k = first[1] - 1  # worker 0's last block: its aux tracks the first unit of block k+1 (worker 1)
    ema = {n[len(f"auxes.{k}.ema."):]: t for n, t in A.items() if n.startswith(f"auxes.{k}.ema.")}
    src = {n[len(f"blocks.{k + 1}.0."):]: t for n, t in B.items() if n.startswith(f"blocks.{k + 1}.0.")}
    params = [n for n in ema if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert params
    for n in params:
        torch.testing.assert_close(ema[n], src[n], rtol=0, atol=0, msg=n)
    # ... and that is genuinely stale: the unit moved on after version v
    now = {n[len(f"blocks.{k + 1}.0."):]: t for n, t in A.items() if n.startswith(f"blocks.{k + 1}.0.")}
    assert any(not torch.equal(ema[n], now[n]) for n in params)


# ------------------------------------------------------------------ a real (small) data set

def test_pipeline_trains_digits_to_a_sensible_accuracy(tmp_path):
    s = run(cfg_(tmp_path, method="manpp", base="dgl", train_limit=1024, eval_limit=297, batch_size=64,
                 epochs=4, lr=0.1, eval_every_epochs=0))
    assert s["steps"] == 64
    assert s["test_acc"] >= 0.8, s["test_acc"]
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["pipeline"]["workers"] == 2 and ck["last_test_acc"] == s["test_acc"]
    assert s["data"] == "digits: 1024 train / 297 test from scikit-learn's bundled copy"  # what was read, where


# ------------------------------------------------------------------ failures

def training(out_dir, limit: float = 120.0) -> None:
    """Return once the run has finished its first epoch (worker 0 wrote a metrics line)."""
    end = time.monotonic() + limit
    path = out_dir / "metrics.jsonl"
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return
        time.sleep(0.1)


def _long(tmp_path, **kw):
    return cfg_(tmp_path, method="manpp", base="dgl", epochs=500, **kw)


def test_a_killed_worker_stops_the_run_with_an_error_naming_it(tmp_path):
    killed_at: list[float] = []

    def kill_later(procs):
        def go():
            training(tmp_path)
            killed_at.append(time.monotonic())
            os.kill(procs[1].pid, signal.SIGKILL)
        threading.Thread(target=go, daemon=True).start()

    with pytest.raises(PipelineError, match=r"worker 1 .*killed by SIGKILL") as ei:
        run(_long(tmp_path), on_start=kill_later)
    assert killed_at and time.monotonic() - killed_at[0] < 30, "the run did not stop within 30 s"
    assert "blocks" in str(ei.value)


def test_a_stuck_worker_ends_the_run_after_the_timeout(tmp_path):
    stopped_at: list[float] = []

    def stop_later(procs):
        def go():
            training(tmp_path)  # past start-up, whose waits have the long dist_timeout_s
            stopped_at.append(time.monotonic())
            os.kill(procs[1].pid, signal.SIGSTOP)  # alive but silent
            # Watchdog: if the run has not ended in 60 s, kill our workers so the test fails, not hangs.
            time.sleep(60.0)
            for p in procs:
                if p.is_alive():
                    p.kill()
        threading.Thread(target=go, daemon=True).start()

    with pytest.raises(PipelineError, match=r"worker 0 .*nothing for 3 s") as ei:
        run(_long(tmp_path, pipeline_timeout_s=3.0), on_start=stop_later)
    assert stopped_at and time.monotonic() - stopped_at[0] < 30
    assert "worker 1" in str(ei.value)


def test_cli_refusals_for_the_pipeline(tmp_path, capsys):
    from manlearn.cli import main

    assert main(["train", "dataset=digits", f"out_dir={tmp_path}", "pipeline_workers=2", "--resume", "--overwrite"]) == 2
    assert "opposite things" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="run_pipeline"):
        Trainer.from_config(cfg_(tmp_path))


# ------------------------------------------------------------------ Ctrl-C, SIGTERM, kill -9 and --resume

# MAN++ across the worker boundary with a delayed back-sync, where an exact resume is hard: at any stop, versions
# of the next worker's first unit are received but not installed yet, and (installs at odd steps only) the
# shadow unit installed earlier is still in use. 8 steps per epoch, 32 steps.
STOP = dict(method="manpp", base="dgl", train_limit=256, epochs=4, pipeline_param_delay=3, pipeline_param_sync_every=2)
STEPS, SPE = 32, 8
TIMING = ("images_per_s", "worker_busy_s", "worker_compute_s")


def stop_cfg(out_dir: Path) -> TrainConfig:
    return cfg_(out_dir, **STOP)


def outcome(out_dir: Path) -> dict:
    """What must not depend on an interruption: the records (timings aside) and every tensor and value of the
    final checkpoint (the whole model; each worker's optimiser, RNG, shadow unit and received versions)."""
    from manlearn.train import read_jsonl

    ck = load_checkpoint(out_dir / "last.pt")
    recs = [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(out_dir / "metrics.jsonl")]
    keep = ("model", "pipeline", "step", "metrics", "best_acc", "last_test_acc", "last_eval_step")
    ck = {k: ck[k] for k in keep}
    ck["metrics"] = [{k: v for k, v in r.items() if k not in TIMING} for r in ck["metrics"]]
    return {"records": recs, "checkpoint": ck}


def assert_identical(a, b, where: str = "") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    s = run(stop_cfg(out))
    assert s["steps"] == STEPS
    got = outcome(out)
    assert [v for v, _ in got["checkpoint"]["pipeline"]["states"][0]["received"]] == [30, 32]  # v + delay >= 32: not installed
    return SimpleNamespace(dir=out, outcome=got)


def start_cli(out_dir: Path, *extra: str) -> subprocess.Popen:
    """``manlearn train`` of :func:`stop_cfg` as a real process, in its own session (a process group, as a
    terminal's job or a scheduler's step)."""
    c = stop_cfg(out_dir)
    keys = ["dataset", "model", "method", "base", "K", "lambda_schedule", "train_limit", "eval_limit", "batch_size",
            "eval_batch_size", "epochs", "lr", "device", "out_dir", "log_every", "pipeline_workers",
            "pipeline_timeout_s", "pipeline_param_delay", "pipeline_param_sync_every"]
    args = [f"{k}={getattr(c, k)}" for k in keys]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "manlearn", "train", *args, *extra], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, limit: float = 180.0) -> None:
    end = time.monotonic() + limit
    while not (path.exists() and path.stat().st_size) and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.02)
    assert path.exists(), f"the run never wrote {path.name}: {proc.communicate()[1][-2000:]}"


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def group_gone(pgid: int, limit: float = 10.0) -> bool:
    """Whether every process of the run (launcher and workers) has exited."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig, code, reason", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                               (signal.SIGINT, 130, "interrupted")])
def test_a_signal_saves_an_agreed_step_exits_with_its_code_and_resumes_exactly(tmp_path, uninterrupted, sig, code,
                                                                              reason):
    """The signal (to the launcher only, or a terminal's Ctrl-C to the whole group: workers ignore it) lands
    after epoch 1; every worker stops after the same step S, saved in one checkpoint named in one line."""
    out = tmp_path / "run"
    proc = start_cli(out)
    wait_for(out / "metrics.jsonl", proc)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # as a terminal does
    else:
        proc.send_signal(sig)
    r = finish(proc)
    assert r.returncode == code, r.stderr[-3000:]
    ckpt = out / "last.pt"
    m = re.search(re.escape(f"{reason}: saved {ckpt} at step ") + r"(\d+) \(epoch (\d+), batch (\d+)\); "
                  r"continue with --resume", r.stderr)
    assert m, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stderr.count("saved") == 1
    step = int(m.group(1))
    assert SPE < step < STEPS and (int(m.group(2)), int(m.group(3))) == (step // SPE + 1, step % SPE)
    assert group_gone(proc.pid)
    saved = load_checkpoint(ckpt)
    assert saved["step"] == step and saved["pipeline"]["resumable"]
    if sig == signal.SIGTERM:  # through the CLI
        r = finish(start_cli(out, "--resume"))
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"steps: {STEPS}" in r.stdout
    else:  # through the Python API
        assert run(stop_cfg(out), resume=True)["steps"] == STEPS
    assert_identical(outcome(out), uninterrupted.outcome)


def test_a_run_killed_with_sigkill_resumes_exactly_from_its_epoch_checkpoint(tmp_path, uninterrupted):
    """Only the launcher is killed (the hardest case: its workers must notice and stop, not train on)."""
    out = tmp_path / "run"
    proc = start_cli(out)
    wait_for(out / "last.pt", proc)  # epoch 1's checkpoint
    proc.kill()
    finish(proc)
    assert group_gone(proc.pid, 30.0), "the workers outlived their launcher"
    step = load_checkpoint(out / "last.pt")["step"]
    assert step % SPE == 0 and step < STEPS, "the workers trained on without their launcher"
    # the queue depth only schedules the same computation: a resumed run may change it
    assert run(cfg_(out, **{**STOP, "pipeline_queue_depth": 1}), resume=True)["steps"] == STEPS
    assert_identical(outcome(out), uninterrupted.outcome)


def test_resuming_a_finished_run_changes_nothing(tmp_path, uninterrupted):
    """A requeued job whose run had finished (the signal came during its last step)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted.dir, out)
    s = run(stop_cfg(out), resume=True)
    assert s["steps"] == STEPS and s["test_acc"] == uninterrupted.outcome["checkpoint"]["last_test_acc"]
    assert_identical(outcome(out), uninterrupted.outcome)


def test_a_run_failing_before_its_first_checkpoint_leaves_nothing_behind(tmp_path):
    def kill_at_once(procs):
        os.kill(procs[1].pid, signal.SIGKILL)

    with pytest.raises(PipelineError, match="worker 1"):
        run(cfg_(tmp_path / "run"), on_start=kill_at_once)
    assert not any((tmp_path / "run").iterdir())


def test_an_overwrite_run_keeps_the_earlier_run_until_its_first_checkpoint(tmp_path):
    """--overwrite moves the earlier run aside: a run failing before its first checkpoint puts it back; one
    that checkpoints replaces it (#28 item 4, as in the Trainer)."""
    out = tmp_path / "run"
    run(cfg_(out, epochs=1))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def kill_at_once(procs):
        os.kill(procs[1].pid, signal.SIGKILL)

    with pytest.raises(PipelineError, match="worker 1"):
        run(cfg_(out, epochs=1, lr=0.01), on_start=kill_at_once, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not (out / ".overwritten").exists()
    run(cfg_(out, epochs=1, lr=0.01), overwrite=True)
    assert load_checkpoint(out / "last.pt")["config"]["lr"] == 0.01 and not (out / ".overwritten").exists()


def test_a_second_ctrl_c_stops_the_launcher_and_its_workers_at_once(tmp_path):
    out = tmp_path / "run"
    proc = start_cli(out)
    wait_for(out / "metrics.jsonl", proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    t = time.monotonic()
    r = finish(proc)
    assert r.returncode == 130 and time.monotonic() - t < 10, r.stderr[-3000:]
    assert re.search(r"second Ctrl-C: stopped at once; (.*last\.pt \(step \d+\) is kept|no checkpoint was "
                     r"written yet)", r.stderr), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert group_gone(proc.pid, 5.0), "a worker outlived its launcher"


def test_resuming_needs_the_same_workers_and_a_resumable_checkpoint(tmp_path, uninterrupted):
    from manlearn.train import save_checkpoint

    ck = load_checkpoint(uninterrupted.dir / "last.pt")
    save_checkpoint(tmp_path / "three" / "last.pt", ck)
    with pytest.raises(CheckpointError, match=r"pipeline_workers: checkpoint 2 vs now 3"):
        run(cfg_(tmp_path / "three", **{**STOP, "pipeline_workers": 3}), resume=True)
    ck["pipeline"] = {"workers": 2, "ranges": ck["pipeline"]["ranges"], "resumable": False}  # an earlier version's
    save_checkpoint(tmp_path / "old" / "last.pt", ck)
    with pytest.raises(CheckpointError, match="kept no worker state: it cannot be resumed; start over with --overwrite"):
        run(stop_cfg(tmp_path / "old"), resume=True)


def test_a_pipeline_run_says_a_build_warning_once_on_one_line(tmp_path):
    """The launcher's plan and every worker build the same learner: its memory warning is said once, by the
    launcher, in the CLI's one-line form (workers said it again, in Python's two-line form, 3 more times)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    args = ["dataset=digits", "model=resnet20", "method=manpp", "base=dgl", "K=2", "train_limit=64", "eval_limit=32",
            "batch_size=32", "epochs=1", "device=cpu", "progress=false", "pipeline_workers=2",
            f"out_dir={tmp_path / 'run'}"]
    done = subprocess.run([sys.executable, "-m", "manlearn", "train", *args], env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "the activations of end-to-end backprop" in line]
    assert len(said) == 1 and said[0].startswith("warning: dgl+manpp at K=2"), done.stderr
    assert "MemoryWarning" not in done.stderr, done.stderr


def test_max_steps_mid_epoch_resumes_to_the_uninterrupted_run_with_step_checkpoints_between(tmp_path, uninterrupted):
    """A run stopped by max_steps mid-epoch handed a fresh epoch's figures to its resume (the resumed epoch's
    record lost the steps before the stop). Now it resumes to the uninterrupted run's checkpoint and epoch
    records, with ckpt_every_steps' mid-epoch saves (flushes) on the way changing nothing, and a finished run
    writes summary.json (manlearn runs called it unfinished)."""
    from manlearn.train import read_jsonl
    from manlearn.train.report import run_rows

    out = tmp_path / "run"
    run(stop_cfg(out).model_copy(update={"max_steps": 11}))  # 3 steps into epoch 2
    assert load_checkpoint(out / "last.pt")["step"] == 11
    run(stop_cfg(out).model_copy(update={"ckpt_every_steps": 6, "max_steps": 20}), resume=True)
    assert load_checkpoint(out / "last.pt")["step"] == 20  # a mid-epoch checkpoint (an epoch is 8 steps)
    run(stop_cfg(out).model_copy(update={"ckpt_every_steps": 6}), resume=True)
    got = outcome(out)
    # the stops evaluated too (as the Trainer's do): their records, and best_acc over them, are extra
    same = lambda ck: {k: v for k, v in ck.items() if k not in ("metrics", "best_acc")}  # noqa: E731
    assert_identical(same(got["checkpoint"]), same(uninterrupted.outcome["checkpoint"]))
    epoch_ends = [r for r in got["records"] if float(r["epoch"]).is_integer()]
    assert epoch_ends == uninterrupted.outcome["records"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if not float(r["epoch"]).is_integer()] == [11, 20]
    row, = run_rows(out)
    assert row["finished"] and row["method"] == "manpp+dgl" and row["last"] == got["checkpoint"]["last_test_acc"]


def test_what_the_pipeline_cannot_honour_is_refused_in_one_line(tmp_path):
    """mixup/cutmix and eval_every_steps were silently ignored (worker 0 reads the dataset's batches itself)."""
    from manlearn.config import apply_overrides

    for items, said in ((["task.mixup_alpha=0.2"], "does not support task.mixup_alpha"),
                        (["task.cutmix_alpha=1.0"], "does not support task.cutmix_alpha"),
                        (["eval_every_steps=5"], "evaluates at epoch ends"),
                        (["nonfinite=skip"], "does not support nonfinite=skip"),
                        (["method=predsim", "rule_options={optimizer: per-block}"], "optimizer='per-block'")):
        cfg = apply_overrides(cfg_(tmp_path / "r"), items)
        with pytest.raises(ConfigError, match=said):
            run(cfg)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
