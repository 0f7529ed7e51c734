"""Block pipeline: the K local blocks spread over P worker processes.

Local learning's promise is that block k never waits for a backward pass of a later block.  Here
worker w owns a contiguous range of blocks (with their auxiliary networks; the last worker owns the
head) and, for every micro-batch, runs its blocks' forward, local loss, backward, EMA update and its
own optimiser step, then sends the *detached* block output (with the targets, and the input image
when an InfoPro decoder needs it) to worker w+1.  While w+1 works on micro-batch t, w already works
on t+1: with P workers, P micro-batches are processed at once.

Exactly what is computed
    Worker w's step t uses its own weights after t updates, and receives h_t computed by worker
    w-1 with *its* weights after t updates: the same as the sequential step of SPEC §1.  So for
    every rule without momentum units (greedy, dgl, infopro, ...) the pipeline computes exactly what
    one process computes (tests/test_pipeline.py checks it against the Trainer).  The one difference
    is MAN/MAN++'s EMA across a worker boundary, below.

MAN/MAN++ parameter back-sync and its staleness
    The auxiliary network of worker w's last block tracks u, the first unit of worker w+1's first
    block.  Worker w keeps a local copy of u (the "shadow"), and worker w+1 sends u's parameters
    back every ``n = pipeline_param_sync_every`` steps.  To stay deterministic (and deadlock-free)
    the version is fixed, not "whatever has arrived": at step t worker w uses u as of
    ``v(t) = n·floor((t − d)/n)`` updates (the initial u while t − d < n), where
    ``d = pipeline_param_delay ≥ 1``.  The sequential algorithm uses v(t) = t, so the staleness is
    ``t − v(t) ∈ [d, d + n − 1]`` steps.  With the EMA momentum 0.995 (an average over ~200 steps)
    a few steps of staleness are negligible; d should be at least the number of micro-batches
    worker w may run ahead of w+1 (about ``pipeline_queue_depth``) so that waiting for a version
    rarely stalls worker w.  EMA updates of boundaries inside one worker are exact.

Transport: torch.distributed point-to-point (gloo on CPU, nccl on CUDA)
    ``isend``/``irecv`` from the worker's main thread: non-blocking, so sends and receives overlap
    compute without extra threads, and the same code spans devices and nodes (torch.multiprocessing
    queues would be simpler on one CPU host but cannot cross nodes and need CUDA IPC on GPUs).  A
    gloo send completes only when the receiver has posted the matching receive, which gives
    back-pressure for free.

Bounded queues (flat memory)
    A worker has at most ``pipeline_queue_depth`` (D) sends outstanding per link: before sending
    micro-batch t it waits for the send of t − D to complete; a receiver posts at most D receives
    ahead.  So at most about 2·D micro-batches are in flight on a link and worker w can run at most
    ~D+1 micro-batches ahead of w+1, whatever their speeds.

Failures
    Every wait has a timeout (``pipeline_timeout_s``): a worker that hears nothing from a live but
    stuck neighbour raises an error naming it.  A worker that dies closes its sockets, so its
    neighbours fail at once ("connection closed"), and the launching process, which watches every
    worker's exit, stops the others and raises :class:`PipelineError` naming the first worker that
    died (and the signal that killed it).

Evaluation and checkpoints
    At the end of an epoch every worker sends its part of the state (blocks, auxiliary networks,
    head) and its loss statistics to worker 0 (one ``gather_object`` on a control group: this is
    also a pipeline flush); worker 0 assembles the whole learner, evaluates the whole backbone and
    writes ``metrics.jsonl`` and an atomic ``last.pt`` that ``manlearn eval`` reads.  Resuming a
    pipeline run is not supported yet (the in-flight EMA versions would have to be saved too).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from manlearn.config import TrainConfig, config_from_dict, config_to_dict, config_to_yaml, validate
from manlearn.errors import CheckpointError, ConfigError, ManlearnError

__all__ = ["PipelineError", "run_pipeline", "partition", "block_costs", "param_version",
           "needs_image"]

_TAG_H, _TAG_X, _TAG_Y, _TAG_PARAM = 1, 2, 3, 4


class PipelineError(ManlearnError):
    """A pipeline run that could not finish: a worker died, raised, or stopped answering."""


# ------------------------------------------------------------------------------------ planning

def partition(costs: Sequence[float], P: int) -> list[range]:
    """Contiguous ranges of blocks for P workers minimising the largest summed cost (exact DP)."""
    K = len(costs)
    if not 2 <= P <= K:
        raise ConfigError(f"pipeline_workers={P} needs 2 <= workers <= K={K} blocks")
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + float(c))
    INF = float("inf")
    # best[p][j]: minimal max-cost of splitting the first j blocks over p workers
    best = [[INF] * (K + 1) for _ in range(P + 1)]
    cut = [[0] * (K + 1) for _ in range(P + 1)]
    best[0][0] = 0.0
    for p in range(1, P + 1):
        for j in range(p, K - (P - p) + 1):
            for i in range(p - 1, j):
                v = max(best[p - 1][i], pre[j] - pre[i])
                if v < best[p][j]:
                    best[p][j], cut[p][j] = v, i
    bounds, j = [], K
    for p in range(P, 0, -1):
        i = cut[p][j]
        bounds.append(range(i, j))
        j = i
    return bounds[::-1]


def block_costs(learner: nn.Module, batch: int = 2) -> list[float]:
    """FLOPs of each block's whole local step (forward, local loss, backward) on ``batch`` images.

    Deterministic (unlike timings on a busy machine), so every process computes the same plan.  The
    learner is deep-copied: the probe step does not touch its weights or EMA units.
    """
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from manlearn.rules import LocalBatch

    lr = copy.deepcopy(learner).float().train()
    dev = next(lr.parameters()).device
    x = torch.randn(batch, lr.in_channels, lr.image_size, lr.image_size, device=dev)
    y = torch.zeros(batch, dtype=torch.long, device=dev)
    x = lr.prepare_input(x)
    b = LocalBatch(x, y, lr.norm_mean, lr.norm_std)
    costs, h = [], x
    for k in range(lr.K):
        with FlopCounterMode(display=False) as fc:
            h, _ = lr.local_step(k, h, b)
        costs.append(float(fc.get_total_flops()) + 1.0)
    return costs


def param_version(t: int, every: int, delay: int) -> int:
    """Number of updates of the next worker's first unit that the EMA uses at step ``t`` (see module doc)."""
    if t - delay < every:
        return 0
    return every * ((t - delay) // every)


def needs_image(cfg: TrainConfig) -> bool:
    """Whether the local losses read the input image (InfoPro's decoder): then it travels too."""
    base = cfg.base if cfg.method in ("man", "manpp") else cfg.method
    return base.startswith("infopro")


# ------------------------------------------------------------------------------------ worker

def _wait(work: Any, timeout_s: float, what: str) -> None:
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "closed" in msg.lower() or "reset" in msg.lower() or "broken pipe" in msg.lower():
            raise PipelineError(f"{what}: the peer worker is gone ({msg})") from None
        if "timed out" in msg.lower() or "timeout" in msg.lower():
            raise PipelineError(f"{what}: nothing for {timeout_s:g} s (pipeline_timeout_s); "
                                "the peer worker is stuck or too slow") from None
        raise PipelineError(f"{what}: {msg}") from None


class _Worker:
    """One pipeline stage: owns blocks ``ranges[rank]`` of the learner (see module doc)."""

    def __init__(self, cfg: TrainConfig, rank: int, ranges: list[range], total: int, stop_at: int,
                 threads: int, info: Any, spe: int) -> None:
        from manlearn.train.build import build_learner, load_split, make_loader, resolve_device, seed_everything
        from manlearn.train.optim import build_optimizer

        self.cfg, self.rank, self.ranges = cfg, rank, ranges
        self.P = len(ranges)
        self.own = ranges[rank]
        self.total, self.stop_at = total, stop_at
        self.timeout = float(cfg.pipeline_timeout_s)
        torch.set_num_threads(max(1, threads))
        dev = resolve_device(cfg.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
            torch.cuda.set_device(dev)
        self.device = dev
        self.first, self.last = rank == 0, rank == self.P - 1
        # Control groups (gloo, also next to nccl): `ctrl` for the epoch-end gather, with the
        # pipeline timeout; `slow` for waits that legitimately last long (start-up, evaluation).
        self.ctrl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout))
        self.slow = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))

        # Data: only worker 0 reads images (training batches, and the test set for evaluation).
        self.info, self.spe = info, spe
        self.loader = self.test_loader = None
        if self.first:
            self.loader = make_loader(cfg, load_split(cfg, "train", cfg.train_limit), train=True, device=dev)
            self.test_loader = make_loader(cfg, load_split(cfg, "test", cfg.eval_limit), train=False, device=dev)
            if len(self.loader) != spe:
                raise PipelineError(f"worker 0 sees {len(self.loader)} batches per epoch, the plan {spe}")

        seed_everything(cfg.seed)
        self.learner = build_learner(cfg, self.info, dev)  # same seed: every worker starts identical
        L = self.learner
        self.K = L.K
        self.in_shape = self._input_shape()
        # MAN: the shadow we receive into is the EMA source of our last auxiliary network (the next
        # worker's first unit); the unit we send back is the source of the previous worker's one.
        last_aux = self.own.stop - 1
        self.shadow = getattr(L.auxes[last_aux], "source", None) if not self.last else None
        self.send_unit = getattr(L.auxes[self.own.start - 1], "source", None) if not self.first else None
        self.tracks_shadow = self.shadow is not None
        self.sends_params = self.send_unit is not None
        # Keep what this worker trains, plus the next worker's first block (its first unit is the
        # shadow that our last auxiliary network's EMA tracks); drop the rest.
        keep_blocks = set(self.own) | ({self.own.stop} if not self.last else set())
        for k in range(self.K):
            if k not in keep_blocks:
                L.blocks[k] = nn.Sequential()
            if k < self.K - 1 and k not in self.own:
                L.auxes[k] = nn.Identity()
        if not self.last:
            L.head = nn.Identity()
        self.owned_modules = [L.blocks[k] for k in self.own] + [L.auxes[k] for k in self.own if k < self.K - 1]
        if self.last:
            self.owned_modules.append(L.head)
        holder = nn.ModuleList(self.owned_modules)
        self.optimizer = build_optimizer(cfg, holder)
        self.owned_prefixes = tuple([f"blocks.{k}." for k in self.own] +
                                    [f"auxes.{k}." for k in self.own if k < self.K - 1] +
                                    (["head."] if self.last else []))

    # ---------------------------------------------------------------- helpers
    @torch.no_grad()
    def _input_shape(self) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of the tensor this worker receives (output of block own.start - 1)."""
        L = self.learner
        bs = self.cfg.batch_size
        x = torch.zeros(1, L.in_channels, L.image_size, L.image_size, device=self.device)
        x = L.prepare_input(x)
        modes = [b.training for b in L.blocks]
        try:
            L.eval()
            with L.autocast(x):
                for k in range(self.own.start):
                    x = L.blocks[k](x)
        finally:
            for b, m in zip(L.blocks, modes):
                b.train(m)
            L.train()
        return (bs, *x.shape[1:]), x.dtype

    def _flat_params(self, unit: nn.Module) -> list[torch.Tensor]:
        return [p for _, p in unit.named_parameters()]

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any] | None:
        from manlearn.rules import LocalBatch
        from manlearn.train.schedule import lr_at

        cfg, L, dev = self.cfg, self.learner, self.device
        bs = cfg.batch_size
        depth = cfg.pipeline_queue_depth
        every, delay = cfg.pipeline_param_sync_every, cfg.pipeline_param_delay
        need_x = needs_image(cfg)
        img_shape = (bs, L.in_channels, L.image_size, L.image_size)
        (h_shape, h_dtype) = self.in_shape
        prev, nxt = self.rank - 1, self.rank + 1

        recvs: list[tuple[int, list, list]] = []  # (step, works, tensors) posted ahead
        next_post = [0]

        def fill_recvs() -> None:  # keep at most `depth` receives posted ahead
            while len(recvs) < depth and next_post[0] < self.stop_at:
                post_recv(next_post[0])
                next_post[0] += 1

        def post_recv(t: int) -> None:
            h = torch.empty(h_shape, dtype=h_dtype, device=dev)
            y = torch.empty(bs, dtype=torch.long, device=dev)
            ts = [h, y] + ([torch.empty(img_shape, device=dev)] if need_x else [])
            works = [dist.irecv(ts[0], prev, tag=_TAG_H), dist.irecv(ts[1], prev, tag=_TAG_Y)]
            if need_x:
                works.append(dist.irecv(ts[2], prev, tag=_TAG_X))
            recvs.append((t, works, ts))

        sends: list[tuple[int, list, list]] = []

        def bound_sends(limit: int) -> None:
            while len(sends) > limit:
                t, works, _ = sends.pop(0)
                for w in works:
                    _wait(w, self.timeout, f"worker {self.rank}: sending micro-batch {t} to worker {nxt}")

        # MAN back-sync: versions v = every, 2·every, ... used at steps v + delay < stop_at.
        versions = [v for v in range(every, self.stop_at, every) if v + delay <= self.stop_at - 1]
        version_set = set(versions)
        shadow_params = self._flat_params(self.shadow) if self.tracks_shadow else []
        param_recv: list[Any] = []

        def post_param_recv(v: int) -> None:
            buf = torch.empty(sum(p.numel() for p in shadow_params), device=dev)
            param_recv.append((v, dist.irecv(buf, nxt, tag=_TAG_PARAM), buf))

        next_version = [0]  # index into versions of the next receive to post
        param_sends: list[Any] = []
        send_params = self._flat_params(self.send_unit) if self.sends_params else []

        stats = _Stats(self.K)
        records: list[dict[str, Any]] = []
        best_acc: float | None = None
        last_acc: float | None = None
        t = 0
        epoch = 0
        busy = 0.0  # wall time in the training loop, evaluation pauses excluded
        compute = 0.0  # time in this worker's own block work and optimiser step
        data_iter = None
        dist.barrier(group=self.slow)  # everyone built: start the clocks together
        while t < self.stop_at:
            e = t // self.spe
            if self.first and (data_iter is None or e != epoch):
                data_iter = iter(self.loader.epoch(e))
            epoch = e
            t_loop = time.perf_counter()
            # -------- input
            if self.first:
                x, y = next(data_iter)
                h = x
            else:
                fill_recvs()
                rt, works, ts = recvs.pop(0)
                assert rt == t
                for w in works:
                    _wait(w, self.timeout, f"worker {self.rank}: waiting for micro-batch {t} from worker {prev}")
                h, y = L.prepare_input(ts[0]), ts[1]
                x = L.prepare_input(ts[2]) if need_x else None
                fill_recvs()  # post the next receive before computing: the transfer overlaps
            # -------- MAN: post the receives of every version <= t+1 now, before micro-batch t goes
            # out: the next worker sends version t+1 right after its step t, and must never wait for
            # us to get past step t (that would be a cycle, e.g. with the epoch-end gather).
            while (self.tracks_shadow and next_version[0] < len(versions)
                   and versions[next_version[0]] <= t + 1):
                post_param_recv(versions[next_version[0]])
                next_version[0] += 1
            # -------- MAN: install the shadow version this step uses
            if param_recv and param_recv[0][0] + delay == t:
                v, work, buf = param_recv.pop(0)
                _wait(work, self.timeout, f"worker {self.rank}: waiting for the parameters of worker {nxt}'s "
                      f"first unit (version {v})")
                with torch.no_grad():
                    off = 0
                    for p in shadow_params:
                        p.copy_(buf[off:off + p.numel()].view_as(p))
                        off += p.numel()
            # -------- this worker's blocks
            tc = time.perf_counter()
            lr = lr_at(cfg, t, self.spe)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            batch = LocalBatch(x if x is not None else h, y, L.norm_mean, L.norm_std)
            for k in self.own:
                h, loss = L.local_step(k, h, batch)
                stats.add_loss(k, loss)
            if self.last:
                stats.add_correct((h.argmax(dim=1) == y).sum(), int(y.numel()))
            else:
                # -------- send on (detached), bounded
                bound_sends(depth - 1)
                out = [h.contiguous(), y]
                works = [dist.isend(out[0], nxt, tag=_TAG_H), dist.isend(out[1], nxt, tag=_TAG_Y)]
                if need_x:
                    xs = (x if x is not None else batch.x).contiguous()
                    out.append(xs)
                    works.append(dist.isend(xs, nxt, tag=_TAG_X))
                sends.append((t, works, out))
            self.optimizer.step()
            # -------- MAN: send our first unit back after the step that makes version t+1
            if self.sends_params and (t + 1) in version_set:
                while param_sends:
                    pv, w, _ = param_sends.pop(0)
                    _wait(w, self.timeout, f"worker {self.rank}: sending parameters (version {pv}) to worker {prev}")
                with torch.no_grad():
                    buf = torch.cat([p.detach().reshape(-1) for p in send_params])
                param_sends.append((t + 1, dist.isend(buf, prev, tag=_TAG_PARAM), buf))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            now = time.perf_counter()
            compute += now - tc
            busy += now - t_loop
            t += 1
            stats.images += bs
            # -------- epoch end: flush, gather, evaluate on worker 0
            end_of_epoch = t % self.spe == 0
            if end_of_epoch or t == self.stop_at:
                done_epoch = t // self.spe
                do_eval = t == self.stop_at or (cfg.eval_every_epochs > 0 and done_epoch % cfg.eval_every_epochs == 0
                                                 and end_of_epoch)
                bound_sends(0)
                acc, rec = self._sync_epoch(stats, t, done_epoch if end_of_epoch else done_epoch + (t % self.spe) / self.spe,
                                            do_eval, busy, compute, lr)
                if acc is not None:
                    last_acc = acc
                    best_acc = acc if best_acc is None else max(best_acc, acc)
                if rec is not None:
                    rec["best_acc"] = best_acc
                    records.append(rec)
                    self._write(rec, t, records, best_acc, last_acc)
                stats = _Stats(self.K)
                busy = compute = 0.0  # per-epoch figures
        bound_sends(0)
        while param_sends:
            pv, w, _ = param_sends.pop(0)
            _wait(w, self.timeout, f"worker {self.rank}: sending parameters (version {pv}) to worker {prev}")
        self._collective(lambda: dist.barrier(group=self.ctrl), "the final synchronisation")
        if not self.first:
            return None
        return {"test_acc": last_acc, "best_acc": best_acc, "steps": t, "records": records,
                "ranges": [(r.start, r.stop) for r in self.ranges]}

    # ---------------------------------------------------------------- epoch sync (collective)
    def _sync_epoch(self, stats: "_Stats", step: int, epoch: float, do_eval: bool, busy: float,
                    compute: float, lr: float):
        part = {"rank": self.rank, "losses": stats.loss_means(self.own), "correct": stats.correct_value(),
                "n": stats.n, "images": stats.images, "busy_s": busy, "compute_s": compute}
        if do_eval:
            part["state"] = {k: v.detach().cpu() for k, v in self.learner.state_dict().items()
                             if k.startswith(self.owned_prefixes)}
        parts: list[Any] = [None] * self.P if self.first else None  # type: ignore[assignment]
        self._collective(lambda: dist.gather_object(part, parts, dst=0, group=self.ctrl),
                         f"the end-of-epoch synchronisation at step {step}")
        acc = None
        rec = None
        if self.first:
            from manlearn.train.trainer import evaluate

            losses: list[float] = [math.nan] * self.K
            for p in parts:
                for k, v in p["losses"].items():
                    losses[k] = v
            lastp = parts[-1]
            busy_max = max(p["busy_s"] for p in parts)
            if do_eval:
                full = self._full_learner()
                state = {}
                for p in parts:
                    state.update(p["state"])
                full.load_state_dict(state)
                acc, _, _ = evaluate(full, self.test_loader)
                self._last_state = full.state_dict()
        if do_eval:
            # Everyone waits here (control group, dist_timeout_s) while worker 0 evaluates, so no
            # pipeline receive runs into pipeline_timeout_s during a long evaluation.
            box = [acc]
            dist.broadcast_object_list(box, src=0, group=self.slow)
            acc = box[0]
        if self.first:
            rec = {"type": "epoch", "epoch": epoch, "step": step, "lr": lr, "losses": losses,
                   "loss": losses[-1], "train_acc": lastp["correct"] / lastp["n"] if lastp["n"] else None,
                   "test_acc": acc, "images_per_s": lastp["images"] / busy_max if busy_max > 0 else None,
                   "worker_busy_s": [p["busy_s"] for p in parts],
                   "worker_compute_s": [p["compute_s"] for p in parts]}
        return acc, rec

    def _collective(self, fn: Callable[[], Any], what: str) -> None:
        try:
            fn()
        except RuntimeError as e:
            msg = (str(e).splitlines() or [type(e).__name__])[0]
            others = ", ".join(str(r) for r in range(self.P) if r != self.rank)
            if "timed out" in msg.lower() or "timeout" in msg.lower():
                raise PipelineError(f"worker {self.rank}: {what}: nothing for {self.timeout:g} s "
                                    f"(pipeline_timeout_s) from worker(s) {others}") from None
            raise PipelineError(f"worker {self.rank}: {what} failed, a peer worker is gone ({msg})") from None

    def _full_learner(self) -> nn.Module:
        if getattr(self, "_full", None) is None:
            from manlearn.train.build import build_learner

            self._full = build_learner(self.cfg, self.info, self.device)
        return self._full

    def _write(self, rec: dict[str, Any], step: int, records: list, best_acc, last_acc) -> None:
        """Worker 0 only: metrics line, progress line and an atomic checkpoint of the whole model."""
        import manlearn
        from manlearn.train.checkpoint import CKPT_FORMAT, CKPT_VERSION, save_checkpoint
        from manlearn.train.metrics import JsonlWriter

        cfg = self.cfg
        out_dir = Path(cfg.out_dir)
        JsonlWriter(out_dir / "metrics.jsonl").write(rec)
        acc_s = f"{rec['test_acc']:.4f}" if rec["test_acc"] is not None else "-"
        if cfg.progress:
            ips = rec["images_per_s"] or 0.0
            print(f"epoch {rec['epoch']:g}/{cfg.epochs}  step {step}  loss {rec['loss']:.4f}  "
                  f"train_acc {rec['train_acc']:.4f}  test_acc {acc_s}  {ips:.0f} img/s (pipeline)", flush=True)
        if getattr(self, "_last_state", None) is None:
            return
        payload = {
            "format": CKPT_FORMAT, "version": CKPT_VERSION,
            "manlearn_version": str(getattr(manlearn, "__version__", "?")), "torch_version": str(torch.__version__),
            "model": self._last_state, "optimizer": {}, "step": step, "epoch": step // self.spe,
            "batch": step % self.spe, "steps_per_epoch": self.spe, "config": config_to_dict(cfg),
            "metrics": records, "best_acc": best_acc, "last_test_acc": last_acc, "last_eval_step": step,
            "pipeline": {"workers": self.P, "ranges": [(r.start, r.stop) for r in self.ranges],
                         "resumable": False},
        }
        save_checkpoint(out_dir / "last.pt", payload)
        self._last_state = None


class _Stats:
    """Per-epoch loss sums (kept on the device: no sync per step) and the last worker's accuracy."""

    def __init__(self, K: int) -> None:
        self.loss_sum: dict[int, torch.Tensor] = {}
        self.count = 0
        self.correct: torch.Tensor | int = 0
        self.n = 0
        self.images = 0
        self._k0: int | None = None

    def add_loss(self, k: int, loss: torch.Tensor) -> None:
        if self._k0 is None:
            self._k0 = k
        if k == self._k0:
            self.count += 1
        self.loss_sum[k] = self.loss_sum.get(k, 0) + loss.float()

    def add_correct(self, c: torch.Tensor, n: int) -> None:
        self.correct = self.correct + c
        self.n += n

    def correct_value(self) -> int:
        return int(self.correct) if isinstance(self.correct, int) else int(self.correct.item())

    def loss_means(self, own: range) -> dict[int, float]:
        return {k: float(v) / max(self.count, 1) for k, v in self.loss_sum.items()}


def _worker_main(rank: int, P: int, port: int, cfg_dict: dict, ranges: list[tuple[int, int]],
                 total: int, stop_at: int, threads: int, info: Any, spe: int, errq: Any, resq: Any) -> None:
    """Entry point of a spawned pipeline worker."""
    torch.set_num_threads(max(1, threads))
    try:
        cfg = config_from_dict(cfg_dict, check=False)
        dev_is_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if dev_is_cuda else "gloo")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P,
                                timeout=datetime.timedelta(seconds=cfg.pipeline_timeout_s))
        w = _Worker(cfg, rank, [range(a, b) for a, b in ranges], total, stop_at, threads, info, spe)
        out = w.run()
        if rank == 0:
            resq.send(out)
        dist.destroy_process_group()
    except BaseException as e:  # report, then exit non-zero: the launcher stops the others
        msg = str(e) if isinstance(e, ManlearnError) else traceback.format_exc()
        try:
            errq.put((rank, time.time(), msg[-4000:]))
        finally:
            os._exit(1)


# ------------------------------------------------------------------------------------ launcher

def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run_pipeline(cfg: TrainConfig, *, threads: int | None = None, overwrite: bool = False,
                 on_start: Callable[[list[Any]], None] | None = None, out: Any = None) -> dict[str, Any]:
    """Train ``cfg`` with its K blocks spread over ``cfg.pipeline_workers`` processes (this host).

    ``threads`` is the intra-op thread count of each worker (default: CPU cores / workers).
    ``on_start(processes)`` is called once the workers are started (tests use it to kill one).
    Returns a summary like :meth:`Trainer.fit`'s; raises :class:`PipelineError` when a worker fails.
    """
    from manlearn.distributed.dist import free_port, gloo_available
    from manlearn.train.build import build_learner, load_split, make_loader, seed_everything
    from manlearn.train.schedule import total_steps

    cfg = validate(cfg)
    say = (lambda m: print(m, file=out or sys.stdout, flush=True)) if cfg.progress else (lambda m: None)
    P = cfg.pipeline_workers
    if P < 2:
        raise ConfigError("run_pipeline needs pipeline_workers >= 2")
    if not gloo_available():
        raise ConfigError("the pipeline needs torch.distributed with the gloo backend")
    if cfg.amp != "off" or cfg.compile:
        raise ConfigError("the pipeline does not support amp or compile yet; use amp=off compile=false")
    out_dir = Path(cfg.out_dir)
    if (out_dir / "last.pt").exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already holds a checkpoint (last.pt); pass --overwrite to start over "
                              "or choose another out_dir (pipeline runs cannot be resumed yet)")

    # Plan on a throwaway learner: same seed and config as the workers' learners.
    train = load_split(cfg, "train", cfg.train_limit)
    spe = len(make_loader(cfg, train, train=True, device="cpu"))
    if spe == 0:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {len(train)} training images")
    total = total_steps(cfg, spe)
    stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
    cpu_cfg = dataclasses.replace(cfg, device="cpu", amp="off", compile=False)
    seed_everything(cfg.seed)
    probe = build_learner(cpu_cfg, train.info, "cpu")
    if probe.K < P:
        raise ConfigError(f"pipeline_workers={P} is more than the K={probe.K} blocks")
    costs = block_costs(probe)
    ranges = partition(costs, P)
    info = train.info
    del probe, train
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // P)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(config_to_yaml(cfg))
    (out_dir / "metrics.jsonl").write_text("")
    share = [sum(costs[r.start:r.stop]) / sum(costs) for r in ranges]
    say(f"manlearn pipeline: {cfg.model} {cfg.method} K={len(costs)} over {P} workers x {threads} thread(s); "
        f"blocks " + " | ".join(f"w{i}: {r.start}-{r.stop - 1} ({s:.0%} of FLOPs)" for i, (r, s)
                                 in enumerate(zip(ranges, share)))
        + f"; {stop_at} steps, queue depth {cfg.pipeline_queue_depth}, MAN sync every "
          f"{cfg.pipeline_param_sync_every} step(s), delay {cfg.pipeline_param_delay}")

    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    res_recv, res_send = ctx.Pipe(duplex=False)  # watched with the sentinels: never blocks a worker
    port = free_port()
    cfg_dict = config_to_dict(cfg)
    procs = [ctx.Process(target=_worker_main, name=f"manlearn-pipeline-{r}",
                         args=(r, P, port, cfg_dict, [(x.start, x.stop) for x in ranges], total, stop_at,
                               threads, info, spe, errq, res_send), daemon=True) for r in range(P)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    if on_start is not None:
        on_start(procs)
    failed: list[tuple[int, float]] = []
    hung: list[int] = []
    result = None
    try:
        alive: dict[Any, int] = {p.sentinel: i for i, p in enumerate(procs)}
        while alive:
            ready = multiprocessing.connection.wait([*alive, res_recv] if result is None else list(alive),
                                                    timeout=1.0)
            for s in ready:
                if s is res_recv:
                    result = res_recv.recv()
                    continue
                i = alive.pop(s)
                procs[i].join()
                if procs[i].exitcode != 0:
                    failed.append((i, time.time()))
            if failed:
                break
        if failed:
            # Let the others notice (connection closed) and report for a moment, then stop them.
            deadline = time.time() + 3.0
            for p in procs:
                p.join(max(0.0, deadline - time.time()))
            hung = [i for i, p in enumerate(procs) if p.is_alive()]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()
    if failed:
        reports: dict[int, tuple[float, str]] = {}
        while not errq.empty():
            r, ts, msg = errq.get()
            reports.setdefault(r, (ts, msg))
        # Root cause: a worker that died without reporting (killed) or, else, the first to report.
        first = failed[0][0]
        silent = [i for i, _ in failed if i not in reports]
        if silent:
            first = silent[0]
        elif reports:
            first = min(reports, key=lambda r: reports[r][0])
        rng = ranges[first]
        detail = reports.get(first, (0, ""))[1].strip()
        others = [f"worker {r}: {m.strip().splitlines()[-1]}" for r, (_, m) in sorted(reports.items()) if r != first]
        raise PipelineError(
            f"pipeline worker {first} (blocks {rng.start}-{rng.stop - 1}) {_describe_exit(procs[first].exitcode)}"
            + (f": {detail.splitlines()[-1]}" if detail else "")
            + "; the run was stopped" + (f" (then {'; '.join(others)})" if others else "")
            + "".join(f"; worker {i} was still running but unresponsive and was killed" for i in hung))
    if result is None and res_recv.poll():
        result = res_recv.recv()
    if result is None:
        raise PipelineError("the pipeline workers exited without a result")
    elapsed = time.perf_counter() - t0
    recs = result.pop("records")
    ips = [r["images_per_s"] for r in recs if r.get("images_per_s")]
    busy = [max(r["worker_busy_s"]) for r in recs]
    result.update({
        "epochs": result["steps"] / spe, "elapsed_s": elapsed, "out_dir": str(out_dir),
        "checkpoint": str(out_dir / "last.pt"), "stopped_early": stop_at < total,
        "images_per_s": cfg.batch_size * result["steps"] / sum(busy) if sum(busy) > 0 else None,
        "seconds_per_iter": sum(busy) / result["steps"] if result["steps"] else None,
        "worker_busy_s": [sum(x) for x in zip(*[r["worker_busy_s"] for r in recs])],
        "worker_compute_s": [sum(x) for x in zip(*[r["worker_compute_s"] for r in recs])],
        "block_flops": costs, "records": recs, "peak_mem_bytes": None,
    })
    del ips
    return result

