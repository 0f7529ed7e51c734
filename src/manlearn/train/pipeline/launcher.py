"""Starting a pipeline run on this host: plan, spawn the workers, watch them, summarise.

The launching process trains nothing.  It plans (:func:`~.planner.make_plan`), spawns one process per
worker, and watches every worker's exit: the first non-zero exit stops the run, the others get a
moment to report (their neighbours fail at once when a worker's sockets close) and are then stopped,
and :class:`~.errors.PipelineError` names the root cause — a worker that died without reporting
(killed, with the signal), else the first to report.

Ctrl-C and SIGTERM keep the contract of a one-process run (:mod:`..interrupt`): the launcher defers
them and raises a flag that worker 0 turns into an end every worker agrees on (see :mod:`.worker`);
that step is saved, and :class:`~..interrupt.TrainingInterrupted` says where (exit status 130 after
Ctrl-C, 143 after SIGTERM).  A second one kills the workers and exits at once; every checkpoint on
disk is complete (atomic writes).  ``resume=True`` continues from ``last.pt`` exactly.
"""

from __future__ import annotations

import json
import multiprocessing.connection
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

import manlearn

from manlearn.config import TrainConfig, config_to_dict, config_to_yaml, validate
from manlearn.distributed.dist import free_port, gloo_available
from manlearn.errors import CheckpointError, ConfigError, DivergenceError, ManlearnError
from manlearn.files import write_text_atomic
from manlearn.rules import modifier_base

from ..checkpoint import check_resume_compatible, load_checkpoint
from ..interrupt import DeferredInterrupt, TrainingInterrupted
from ..metrics import JsonlWriter
from ..run_logs import SUMMARY_NAME
from ..outputs import (check_writable_dir, drop_aside, move_aside, present_run_files, remove_run_files,
                       restore_aside, settle)
from ..trainer import CKPT_NAME, METRICS_NAME
from .errors import PipelineError
from .planner import PipelinePlan, make_plan
from .worker import Control, worker_main

_SIGNALS = {signal.SIGINT, signal.SIGTERM}

__all__ = ["run_pipeline"]


def run_pipeline(cfg: TrainConfig, *, threads: int | None = None, overwrite: bool = False, resume: bool = False,
                 on_start: Callable[[list[Any]], None] | None = None, out: Any = None) -> dict[str, Any]:
    """Train ``cfg`` with its K blocks spread over ``cfg.pipeline_workers`` processes (this host).

    ``threads`` is the intra-op thread count of each worker (default: CPU cores / workers).
    ``resume`` continues the run in ``cfg.out_dir`` from its ``last.pt`` exactly as if it had never
    stopped (a new run when there is none); ``overwrite`` replaces an earlier run there.
    ``on_start(processes)`` is called once the workers are started (tests use it to kill one).
    Returns a summary like :meth:`Trainer.fit`'s; raises :class:`PipelineError` when a worker fails and
    :class:`TrainingInterrupted` (saved, with the step) after Ctrl-C or SIGTERM.
    """
    cfg = validate(cfg)
    _check_runnable(cfg)
    stream = out or sys.stdout
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CKPT_NAME
    ckpt = _open_run(cfg, resume=resume, overwrite=overwrite, say=lambda m: print(m, file=stream, flush=True))
    # --overwrite: the earlier run's files wait aside until this run's first checkpoint (as in the Trainer)
    aside = overwrite and ckpt is None and move_aside(out_dir)
    fresh = ckpt is None and not present_run_files(out_dir)  # nothing of an earlier run is there
    ctx = mp.get_context("spawn")
    control = Control(stop=ctx.RawValue("b", 0), saved_step=ctx.RawValue("q", ckpt["step"] if ckpt else -1),
                      launcher_pid=os.getpid(), resume_from=str(ckpt_path) if ckpt else None)
    procs: list[Any] = []

    def kept() -> str:
        step = control.saved_step.value
        return f"{ckpt_path} (step {step}) is kept" if step >= 0 else "no checkpoint was written yet"

    try:
        with DeferredInterrupt(kept, on_exit=lambda: _kill(procs)) as intr:
            plan = make_plan(cfg)
            if ckpt is not None:
                _check_same_plan(ckpt, plan, ckpt_path)
            if intr.requested:
                raise TrainingInterrupted(f"{intr.reason()} before the first step; {kept()}", intr.exit_code,
                                          resumable=False)
            if threads is None:
                threads = max(1, (os.cpu_count() or 1) // plan.workers)
            write_text_atomic(out_dir / "config.yaml", config_to_yaml(cfg))
            JsonlWriter(out_dir / METRICS_NAME).rewrite(ckpt["metrics"] if ckpt else [])  # later lines go
            if cfg.progress:
                print(_describe_plan(cfg, plan, threads) + (f"; resumed at step {ckpt['step']}" if ckpt else ""),
                      file=stream, flush=True)
            t0 = time.perf_counter()
            result = _Run(cfg, plan, threads, control, procs).wait(on_start, intr)
    except BaseException as e:
        if control.saved_step.value < 0:  # failed before its first checkpoint: no half-run left behind
            if aside:
                restore_aside(out_dir)
                print(f"the earlier run's files in {out_dir} are restored", file=stream, flush=True)
            elif fresh:
                remove_run_files(out_dir, ["config.yaml", METRICS_NAME])
        elif aside:
            drop_aside(out_dir)
        if isinstance(e, DivergenceError):  # say what is kept, as the Trainer does
            raise DivergenceError(f"{e}; {kept()}") from None
        raise
    if aside:  # this run has its checkpoint: the earlier run it replaces goes
        drop_aside(out_dir)
    if intr.requested:
        step, spe = result["steps"], plan.steps_per_epoch
        raise TrainingInterrupted(f"{intr.reason()}: saved {ckpt_path} at step {step} (epoch {step // spe + 1}, "
                                  f"batch {step % spe})", intr.exit_code)
    return _summary(cfg, plan, result, time.perf_counter() - t0)


def _check_runnable(cfg: TrainConfig) -> None:
    if cfg.pipeline_workers < 2:
        raise ConfigError("run_pipeline needs pipeline_workers >= 2")
    if not gloo_available():
        raise ConfigError("the pipeline needs torch.distributed with the gloo backend")
    if cfg.amp == "fp16":  # its gradient scaler skips a step for every block at once: one process's job
        raise ConfigError("the pipeline does not support amp=fp16 (one gradient scaler spans all blocks); "
                          "use amp=bf16 or amp=off")
    if cfg.compile:
        raise ConfigError("the pipeline does not support compile yet; use compile=false")
    if cfg.task.name != "classification":  # worker 0 reads the dataset's batches itself, not the task's run
        raise ConfigError(f"the pipeline trains classification runs; task.name={cfg.task.name} runs in one process "
                          "(without pipeline_workers)")
    mixing = [k for k in ("mixup_alpha", "cutmix_alpha") if getattr(cfg.task, k, 0)]
    if mixing:
        raise ConfigError(f"the pipeline does not support task.{mixing[0]} (it trains the batches as they are); "
                          "train it in one process")
    if cfg.method == "predsim" and cfg.rule_options.get("optimizer") == "per-block":
        raise ConfigError("the pipeline does not support predsim's optimizer='per-block' (each block's own Adam); "
                          "use optimizer='shared', or train it in one process")
    if cfg.eval_every_steps:
        raise ConfigError("the pipeline evaluates at epoch ends (eval_every_epochs) and at the end, not every "
                          "eval_every_steps; use eval_every_steps=0")
    if cfg.nonfinite == "skip":  # skipping one step means every worker restoring its state: not built
        raise ConfigError("the pipeline does not support nonfinite=skip (it stops on a non-finite loss, keeping the "
                          "last checkpoint); use nonfinite=stop")


def _open_run(cfg: TrainConfig, *, resume: bool, overwrite: bool, say: Callable[[str], None]) -> dict[str, Any] | None:
    """The vetted checkpoint to continue from, or None for a new run (refusing to mix with an earlier run)."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite ask for opposite things (continue the run in out_dir / "
                          "replace it): pass one of them")
    out_dir = Path(cfg.out_dir)
    for line in settle(out_dir):  # what a killed run left half-done
        say(line)
    check_writable_dir(cfg.out_dir, "out_dir")
    ckpt_path = out_dir / CKPT_NAME
    existing = present_run_files(out_dir)
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        check_resume_compatible(ckpt, cfg, ckpt_path)
        if not (ckpt.get("pipeline") or {}).get("resumable"):
            raise CheckpointError(f"checkpoint {ckpt_path} was written by a pipeline run of an earlier manlearn, "
                                  "which kept no worker state: it cannot be resumed; start over with --overwrite")
        return ckpt
    if resume:
        if existing:
            raise CheckpointError(f"--resume: {out_dir} holds {', '.join(existing)} of another run but no checkpoint "
                                  f"({CKPT_NAME}) to continue from; choose another out_dir, or --overwrite to replace "
                                  "that run")
        say(f"no checkpoint at {ckpt_path}; starting a new run")
    elif existing and not overwrite:
        what = "a checkpoint (last.pt)" if CKPT_NAME in existing else ", ".join(existing)
        raise CheckpointError(f"{out_dir} already holds {what} of an earlier run; pass --resume to continue it, "
                              "--overwrite to start over, or choose another out_dir")
    return None


def _check_same_plan(ckpt: dict[str, Any], plan: PipelinePlan, path: Path) -> None:
    """A checkpoint continues only on the same blocks per worker and the same epochs."""
    saved = [tuple(r) for r in ckpt["pipeline"]["ranges"]]
    now = [(r.start, r.stop) for r in plan.ranges]
    if saved != now:
        def show(rs: list[tuple[int, int]]) -> str:
            return ", ".join(f"w{i}: {a}-{b - 1}" for i, (a, b) in enumerate(rs))
        raise CheckpointError(f"checkpoint {path} has the blocks over the workers as {show(saved)}, this run as "
                              f"{show(now)}: it can only be resumed with the same split")
    if ckpt["steps_per_epoch"] != plan.steps_per_epoch:
        raise CheckpointError(f"checkpoint {path} was written with {ckpt['steps_per_epoch']} steps per epoch, this run "
                              f"has {plan.steps_per_epoch}: the training set changed, so it cannot be resumed exactly")


def _kill(procs: list[Any]) -> None:
    """Stop the workers at once (they ignore SIGTERM: the launcher coordinates their stop)."""
    for p in procs:
        if p.pid is not None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _describe_plan(cfg: TrainConfig, plan: PipelinePlan, threads: int) -> str:
    blocks = " | ".join(f"w{i}: {r.start}-{r.stop - 1} ({s:.0%} of FLOPs)"
                        for i, (r, s) in enumerate(zip(plan.ranges, plan.shares())))
    return (f"manlearn pipeline: {cfg.model} {cfg.method} K={len(plan.costs)} over {plan.workers} workers x "
            f"{threads} thread(s); blocks {blocks}; {plan.stop_at} steps, queue depth {cfg.pipeline_queue_depth}, "
            f"MAN sync every {cfg.pipeline_param_sync_every} step(s), delay {cfg.pipeline_param_delay}; "
            "records at epoch ends (log_every does not apply)"
            + (f"; amp {cfg.amp}" if cfg.amp != "off" else ""))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Run:
    """The spawned workers of one run: started at construction, watched and stopped by :meth:`wait`."""

    def __init__(self, cfg: TrainConfig, plan: PipelinePlan, threads: int, control: Control,
                 procs: list[Any]) -> None:
        self.plan, self.control = plan, control
        ctx = mp.get_context("spawn")
        self.errq = ctx.SimpleQueue()
        self.res_recv, res_send = ctx.Pipe(duplex=False)  # watched with the sentinels: never blocks a worker
        port, cfg_dict = free_port(), config_to_dict(cfg)
        procs[:] = [ctx.Process(target=worker_main, name=f"manlearn-pipeline-{r}", daemon=True,
                                args=(r, port, cfg_dict, plan, threads, self.errq, res_send, control))
                    for r in range(plan.workers)]
        self.procs = procs
        self.result: dict[str, Any] | None = None
        self.failed: list[int] = []  # workers that exited non-zero, in the order seen
        self.hung: list[int] = []    # workers still running after a failure (killed)

    def wait(self, on_start: Callable[[list[Any]], None] | None, intr: DeferredInterrupt) -> dict[str, Any]:
        """Run to the end (or the agreed stop after ``intr``'s signal); worker 0's result, or
        :class:`PipelineError` naming the root cause."""
        # Started with SIGINT and SIGTERM blocked (the children inherit the mask until they ignore both),
        # so a signal during their start-up is neither lost here nor fatal there.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for p in self.procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if on_start is not None:
            on_start(self.procs)
        try:
            self._watch(intr)
            if self.failed:
                # Let the others notice (connection closed) and report for a moment, then stop them.
                deadline = time.time() + 3.0
                for p in self.procs:
                    p.join(max(0.0, deadline - time.time()))
                self.hung = [i for i, p in enumerate(self.procs) if p.is_alive()]
        finally:
            self._stop()
        if self.failed:
            raise self._failure()
        if self.result is None and self.res_recv.poll():
            self.result = self.res_recv.recv()
        if self.result is None:
            raise PipelineError("the pipeline workers exited without a result")
        return self.result

    def _watch(self, intr: DeferredInterrupt) -> None:
        """Until every worker has exited or one has failed: collect worker 0's result on the way, pass a
        stop request on (a signal handler only sets a flag: it is read here, a few times a second)."""
        alive: dict[Any, int] = {p.sentinel: i for i, p in enumerate(self.procs)}
        while alive and not self.failed:
            if intr.requested:
                self.control.stop.value = 1
            watched = [*alive, self.res_recv] if self.result is None else list(alive)
            for s in multiprocessing.connection.wait(watched, timeout=0.2):
                if s is self.res_recv:
                    self.result = self.res_recv.recv()
                    continue
                i = alive.pop(s)
                self.procs[i].join()
                if self.procs[i].exitcode != 0:
                    self.failed.append(i)

    def _stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()  # (a worker ignores SIGTERM)
        for p in self.procs:
            p.join()

    def _failure(self) -> ManlearnError:
        """The root cause as a PipelineError, or a DivergenceError when a worker's training diverged."""
        reports: dict[int, tuple[float, str]] = {}
        diverged: set[int] = set()
        while not self.errq.empty():
            r, ts, msg, divergence = self.errq.get()
            reports.setdefault(r, (ts, msg))
            if divergence:
                diverged.add(r)
        # Root cause: a worker that died without reporting (killed) or, else, the first to report.
        silent = [i for i in self.failed if i not in reports]
        if silent:
            first = silent[0]
        elif reports:
            first = min(reports, key=lambda r: reports[r][0])
        else:
            first = self.failed[0]
        rng = self.plan.ranges[first]
        detail = reports.get(first, (0.0, ""))[1].strip()
        if first in diverged:  # the run's own failure (exit status 3), not the pipeline's
            return DivergenceError(f"{detail} (pipeline worker {first}, blocks {rng.start}-{rng.stop - 1})")
        others = [f"worker {r}: {m.strip().splitlines()[-1]}" for r, (_, m) in sorted(reports.items()) if r != first]
        return PipelineError(
            f"pipeline worker {first} (blocks {rng.start}-{rng.stop - 1}) {_describe_exit(self.procs[first].exitcode)}"
            + (f": {detail.splitlines()[-1]}" if detail else "")
            + "; the run was stopped" + (f" (then {'; '.join(others)})" if others else "")
            + "".join(f"; worker {i} was still running but unresponsive and was killed" for i in self.hung))


def _summary(cfg: TrainConfig, plan: PipelinePlan, result: dict[str, Any], elapsed: float) -> dict[str, Any]:
    """Worker 0's result completed into a summary like :meth:`Trainer.fit`'s."""
    out_dir = Path(cfg.out_dir)
    recs = result.pop("records")
    steps = result["steps"]
    busy = sum(max(r["worker_busy_s"]) for r in recs)
    result.update({
        "epochs": steps / plan.steps_per_epoch, "elapsed_s": elapsed, "out_dir": str(out_dir),
        "checkpoint": str(out_dir / "last.pt"), "stopped_early": plan.stop_at < plan.total_steps,
        "images_per_s": cfg.batch_size * steps / busy if busy > 0 else None,
        "seconds_per_iter": busy / steps if steps else None,
        "worker_busy_s": [sum(x) for x in zip(*[r["worker_busy_s"] for r in recs])],
        "worker_compute_s": [sum(x) for x in zip(*[r["worker_compute_s"] for r in recs])],
        "block_flops": list(plan.costs), "records": recs, "peak_mem_bytes": None,
    })
    base = modifier_base(cfg.method, cfg.base)
    result.update({"task": cfg.task.name, "rule": f"{cfg.method}+{base}" if base else cfg.method,
                   "headline": ("acc", result["test_acc"]), "best": result["best_acc"]})
    doc = {k: v for k, v in result.items() if k != "records"}  # summary.json, as the Trainer's SummaryJson writes it
    doc.update({"origin": "pipeline", "manlearn_version": manlearn.__version__, "torch_version": torch.__version__,
                "config": config_to_dict(cfg)})
    write_text_atomic(out_dir / SUMMARY_NAME, json.dumps(doc, indent=2, default=str) + "\n")
    return result
