"""Starting a pipeline run on this host: plan, spawn the workers, watch them, summarise.

The launching process trains nothing.  It plans (:func:`~.planner.make_plan`), spawns one process per
worker, and watches every worker's exit: the first non-zero exit stops the run, the others get a
moment to report (their neighbours fail at once when a worker's sockets close) and are then stopped,
and :class:`~.errors.PipelineError` names the root cause — a worker that died without reporting
(killed, with the signal), else the first to report.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

from manlearn.config import TrainConfig, config_to_dict, config_to_yaml, validate
from manlearn.distributed.dist import free_port, gloo_available
from manlearn.errors import CheckpointError, ConfigError

from ..outputs import check_writable_dir, present_run_files
from .errors import PipelineError
from .planner import PipelinePlan, make_plan
from .worker import worker_main

__all__ = ["run_pipeline"]


def run_pipeline(cfg: TrainConfig, *, threads: int | None = None, overwrite: bool = False,
                 on_start: Callable[[list[Any]], None] | None = None, out: Any = None) -> dict[str, Any]:
    """Train ``cfg`` with its K blocks spread over ``cfg.pipeline_workers`` processes (this host).

    ``threads`` is the intra-op thread count of each worker (default: CPU cores / workers).
    ``on_start(processes)`` is called once the workers are started (tests use it to kill one).
    Returns a summary like :meth:`Trainer.fit`'s; raises :class:`PipelineError` when a worker fails.
    """
    cfg = validate(cfg)
    _check_runnable(cfg, overwrite)
    plan = make_plan(cfg)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // plan.workers)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(config_to_yaml(cfg))
    (out_dir / "metrics.jsonl").write_text("")
    if cfg.progress:
        print(_describe_plan(cfg, plan, threads), file=out or sys.stdout, flush=True)
    t0 = time.perf_counter()
    result = _Run(cfg, plan, threads).wait(on_start)
    return _summary(cfg, plan, result, time.perf_counter() - t0)


def _check_runnable(cfg: TrainConfig, overwrite: bool) -> None:
    if cfg.pipeline_workers < 2:
        raise ConfigError("run_pipeline needs pipeline_workers >= 2")
    if not gloo_available():
        raise ConfigError("the pipeline needs torch.distributed with the gloo backend")
    if cfg.amp != "off" or cfg.compile:
        raise ConfigError("the pipeline does not support amp or compile yet; use amp=off compile=false")
    existing = present_run_files(Path(cfg.out_dir))
    if existing and not overwrite:
        what = "a checkpoint (last.pt)" if "last.pt" in existing else ", ".join(existing)
        raise CheckpointError(f"{cfg.out_dir} already holds {what} of an earlier run; pass --overwrite to start "
                              "over or choose another out_dir (pipeline runs cannot be resumed yet)")
    check_writable_dir(cfg.out_dir, "out_dir")


def _describe_plan(cfg: TrainConfig, plan: PipelinePlan, threads: int) -> str:
    blocks = " | ".join(f"w{i}: {r.start}-{r.stop - 1} ({s:.0%} of FLOPs)"
                        for i, (r, s) in enumerate(zip(plan.ranges, plan.shares())))
    return (f"manlearn pipeline: {cfg.model} {cfg.method} K={len(plan.costs)} over {plan.workers} workers x "
            f"{threads} thread(s); blocks {blocks}; {plan.stop_at} steps, queue depth {cfg.pipeline_queue_depth}, "
            f"MAN sync every {cfg.pipeline_param_sync_every} step(s), delay {cfg.pipeline_param_delay}")


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

    def __init__(self, cfg: TrainConfig, plan: PipelinePlan, threads: int) -> None:
        self.plan = plan
        ctx = mp.get_context("spawn")
        self.errq = ctx.SimpleQueue()
        self.res_recv, res_send = ctx.Pipe(duplex=False)  # watched with the sentinels: never blocks a worker
        port, cfg_dict = free_port(), config_to_dict(cfg)
        self.procs = [ctx.Process(target=worker_main, name=f"manlearn-pipeline-{r}", daemon=True,
                                  args=(r, port, cfg_dict, plan, threads, self.errq, res_send))
                      for r in range(plan.workers)]
        self.result: dict[str, Any] | None = None
        self.failed: list[int] = []  # workers that exited non-zero, in the order seen
        self.hung: list[int] = []    # workers still running after a failure (killed)

    def wait(self, on_start: Callable[[list[Any]], None] | None) -> dict[str, Any]:
        """Run to the end; worker 0's result, or :class:`PipelineError` naming the root cause."""
        for p in self.procs:
            p.start()
        if on_start is not None:
            on_start(self.procs)
        try:
            self._watch()
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

    def _watch(self) -> None:
        """Until every worker has exited or one has failed: collect worker 0's result on the way."""
        alive: dict[Any, int] = {p.sentinel: i for i, p in enumerate(self.procs)}
        while alive and not self.failed:
            watched = [*alive, self.res_recv] if self.result is None else list(alive)
            for s in multiprocessing.connection.wait(watched, timeout=1.0):
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
                p.terminate()
        for p in self.procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()

    def _failure(self) -> PipelineError:
        reports: dict[int, tuple[float, str]] = {}
        while not self.errq.empty():
            r, ts, msg = self.errq.get()
            reports.setdefault(r, (ts, msg))
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
    return result
