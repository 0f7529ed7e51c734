"""One pipeline worker: its blocks' local steps, its own optimiser, its links, the epoch-end flush.

Worker ``rank`` owns blocks ``plan.ranges[rank]`` (with their auxiliary networks; the last worker
owns the head).  For every micro-batch it takes its input (images on worker 0, the previous
worker's detached output otherwise), runs its blocks' local steps, sends the detached output on,
and steps its optimiser.  Worker 0 also reads the data, evaluates and writes metrics and checkpoints.

Stopping early (Ctrl-C, SIGTERM) and resuming
    Workers ignore both signals: the launcher receives them and raises a shared flag.  Worker 0 reads
    it at a step boundary ``t`` and announces the end ``S = t + pipeline_queue_depth`` with its
    micro-batches (the ones already in flight are finished); every worker learns ``S`` from its
    inbox before it could post a receive for step ``S`` (see :class:`~.transport.Inbox`), so all
    stop after step ``S − 1``, and worker 0 writes one checkpoint of everyone's state at ``S``.
    Every checkpoint (epoch ends, the end, a stop) holds what continuing exactly needs: each
    worker's weights, optimiser, RNG, running epoch figures and, for MAN across a worker boundary,
    the shadow unit and the versions of it received but not installed yet.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import manlearn
from manlearn.config import TrainConfig, config_from_dict, config_to_dict
from manlearn.distributed import cleanup
from manlearn.errors import DivergenceError, ManlearnError, one_line_warning
from manlearn.planning import MemoryWarning
from manlearn.plugins import import_user_code
from manlearn.files import write_failure
from manlearn.rules import LocalBatch

from ..build import build_learner, load_split, make_loader, resolve_device, seed_everything
from ..checkpoint import (CKPT_FORMAT, CKPT_VERSION, capture_rng_state, load_checkpoint, restore_rng_state,
                          save_checkpoint)
from ..metrics import JsonlWriter
from ..optim import build_optimizer
from ..schedule import lr_at
from ..task_runs import describe_data
from ..trainer import evaluate
from .errors import PipelineError
from .planner import PipelinePlan, needs_image, sync_versions
from .transport import Inbox, Outbox, ShadowReceiver, UnitSender, guarded

__all__ = ["Worker", "EpochStats", "Control", "worker_main"]


@dataclass
class Control:
    """What the launcher shares with its workers besides the links (one host: shared memory)."""

    stop: Any                # RawValue('b'): raised by the launcher at the first Ctrl-C or SIGTERM
    saved_step: Any          # RawValue('q'): the step of the last checkpoint worker 0 wrote (-1: none yet)
    launcher_pid: int        # a worker whose launcher is gone (killed) stops at its next step
    resume_from: str | None  # the checkpoint to continue from (None: a new run)


def _cpu(obj: Any) -> Any:
    """Tensors (also inside dicts, lists and tuples) on the CPU, detached: what a checkpoint keeps."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class EpochStats:
    """Per-epoch loss sums (kept on the device: no sync per step), the last worker's accuracy, timings."""

    def __init__(self) -> None:
        self.loss_sum: dict[int, torch.Tensor] = {}
        self.count = 0
        self.correct: torch.Tensor | int = 0
        self.n = 0
        self.images = 0
        self.busy_s = 0.0     # wall time in the training loop, evaluation pauses excluded
        self.compute_s = 0.0  # time in this worker's own block work and optimiser step
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

    def state(self) -> dict[str, Any]:
        """The running figures, for a checkpoint taken mid-epoch (the epoch's record then comes out the same)."""
        return _cpu({"loss_sum": self.loss_sum, "count": self.count, "correct": self.correct, "n": self.n,
                     "images": self.images, "busy_s": self.busy_s, "compute_s": self.compute_s, "k0": self._k0})

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "EpochStats":
        stats = cls()
        stats.loss_sum = {int(k): v.to(device) for k, v in state["loss_sum"].items()}
        c = state["correct"]
        stats.correct = c.to(device) if isinstance(c, torch.Tensor) else int(c)
        stats.count, stats.n, stats.images = int(state["count"]), int(state["n"]), int(state["images"])
        stats.busy_s, stats.compute_s = float(state["busy_s"]), float(state["compute_s"])
        stats._k0 = state["k0"]
        return stats

    def part(self, rank: int) -> dict[str, Any]:
        """This worker's share of the epoch record (what worker 0 gathers)."""
        correct = int(self.correct) if isinstance(self.correct, int) else int(self.correct.item())
        return {"rank": rank, "losses": {k: float(v) / max(self.count, 1) for k, v in self.loss_sum.items()},
                "correct": correct, "n": self.n, "images": self.images, "busy_s": self.busy_s,
                "compute_s": self.compute_s}


class Worker:
    """One pipeline stage (see the package doc)."""

    def __init__(self, cfg: TrainConfig, rank: int, plan: PipelinePlan, threads: int,
                 control: Control | None = None) -> None:
        self.cfg, self.rank, self.plan = cfg, rank, plan
        self.control = control
        self.P, self.own, self.spe = plan.workers, plan.ranges[rank], plan.steps_per_epoch
        self.first, self.last = rank == 0, rank == plan.workers - 1
        self.timeout = float(cfg.pipeline_timeout_s)
        torch.set_num_threads(max(1, threads))
        self.device = self._pick_device()
        # Control groups (gloo, also next to nccl): `ctrl` for the epoch-end gather, with the
        # pipeline timeout; `slow` for waits that legitimately last long (start-up, evaluation).
        self.ctrl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout))
        self.slow = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
        self.loader = self.test_loader = None
        self.data_text = ""  # worker 0: what it read, from which folder
        if self.first:  # only worker 0 reads images (training batches, and the test set)
            self._open_data()
        seed_everything(cfg.seed)
        self.learner = build_learner(cfg, plan.info, self.device)  # same seed: every worker starts identical
        self.K = self.learner.K
        self.in_shape = self._input_shape()
        self.need_x = needs_image(cfg)
        # MAN (EMA units across a worker boundary): the shadow we receive into is the EMA source of
        # our last auxiliary network (the next worker's first unit); the unit we send back is the
        # source of the previous worker's last one.  Taken before the other workers' parts are freed.
        L = self.learner
        self.shadow = getattr(L.auxes[self.own.stop - 1], "source", None) if not self.last else None
        self.send_unit = getattr(L.auxes[self.own.start - 1], "source", None) if not self.first else None
        self._keep_own_parts()
        self.optimizer = build_optimizer(cfg, nn.ModuleList(self._owned_modules()))
        self.owned_prefixes = tuple([f"blocks.{k}." for k in self.own] +
                                    [f"auxes.{k}." for k in self.own if k < self.K - 1] +
                                    (["head."] if self.last else []))
        # Worker 0's bookkeeping: the whole learner for evaluation (built at the first one), the state
        # of the last evaluation waiting to be written, the records and accuracies so far.
        self.full: nn.Module | None = None
        self.records: list[dict[str, Any]] = []
        self.best_acc: float | None = None
        self.last_acc: float | None = None
        self.last_eval_step = -1
        self._data: Any = None
        self._data_epoch = -1
        # Where the run starts and ends: step 0 and the plan's end, unless resumed or stopped early.
        self.start, self.stop = 0, plan.stop_at
        self.announced: int | None = None  # worker 0: the end it announced after a stop request
        self.stats = EpochStats()
        self._received: list[tuple[int, torch.Tensor]] | None = None  # MAN versions kept by the checkpoint
        self._rng: dict[str, Any] | None = None
        self.receiver: ShadowReceiver | None = None
        if control is not None and control.resume_from:
            self._restore(load_checkpoint(control.resume_from))

    # ---------------------------------------------------------------- construction
    def _pick_device(self) -> torch.device:
        dev = resolve_device(self.cfg.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.rank % max(torch.cuda.device_count(), 1))
            torch.cuda.set_device(dev)
        return dev

    def _open_data(self) -> None:
        cfg, dev = self.cfg, self.device
        train, test = load_split(cfg, "train", cfg.train_limit), load_split(cfg, "test", cfg.eval_limit)
        self.data_text = describe_data(cfg.dataset, train, test)
        if cfg.progress:
            print(f"data: {self.data_text}", flush=True)
        self.loader = make_loader(cfg, train, train=True, device=dev)
        self.test_loader = make_loader(cfg, test, train=False, device=dev)
        if len(self.loader) != self.spe:
            raise PipelineError(f"worker 0 sees {len(self.loader)} batches per epoch, the plan {self.spe}")

    @torch.no_grad()
    def _input_shape(self) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of the tensor this worker receives (output of block own.start - 1)."""
        L = self.learner
        x = torch.zeros(1, L.in_channels, L.image_size, L.image_size, device=self.device)
        x = L.prepare_input(x)
        modes = [b.training for b in L.blocks]
        try:
            L.eval()
            with L.autocast(x):
                for k in range(self.own.start):
                    x = L.run_block(k, x)
        finally:
            for b, m in zip(L.blocks, modes):
                b.train(m)
            L.train()
        return (self.cfg.batch_size, *x.shape[1:]), x.dtype

    def _keep_own_parts(self) -> None:
        """Free what other workers train; keep the next worker's first block too: its first unit is
        the shadow that our last auxiliary network's EMA tracks (MAN)."""
        keep = set(self.own) | ({self.own.stop} if not self.last else set())
        self.learner.keep_parts(keep, [k for k in self.own if k < self.K - 1], head=self.last)

    def _owned_modules(self) -> list[nn.Module]:
        L = self.learner
        mods = [L.blocks[k] for k in self.own] + [L.auxes[k] for k in self.own if k < self.K - 1]
        return mods + ([L.head] if self.last else [])

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a pipeline checkpoint: this worker's part of it (the launcher vetted the plan)."""
        state = ckpt["pipeline"]["states"][self.rank]
        own = {k: v for k, v in ckpt["model"].items() if k.startswith(self.owned_prefixes)}
        missing, _ = self.learner.load_state_dict(own, strict=False)
        lacking = [k for k in missing if k.startswith(self.owned_prefixes)]
        if lacking:
            raise PipelineError(f"the checkpoint lacks {len(lacking)} tensor(s) of worker {self.rank}, e.g. {lacking[0]}")
        if self.shadow is not None:
            self.shadow.load_state_dict(state["shadow"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._received = [(int(v), buf) for v, buf in state["received"]]
        self.stats = EpochStats.from_state(state["stats"], self.device)
        self._rng = state["rng"]
        self.start = int(ckpt["step"])
        self.records = list(ckpt.get("metrics", []))
        self.best_acc, self.last_acc = ckpt.get("best_acc"), ckpt.get("last_test_acc")
        self.last_eval_step = int(ckpt.get("last_eval_step", -1))

    def _links(self) -> tuple[Inbox | None, Outbox | None, ShadowReceiver | None, UnitSender | None]:
        """This worker's links: micro-batches in and out; MAN's back-sync, when an EMA crosses a boundary."""
        cfg, dev, r = self.cfg, self.device, self.rank
        depth, stop_at = cfg.pipeline_queue_depth, self.plan.stop_at
        versions = sync_versions(cfg.pipeline_param_sync_every, stop_at)
        inbox = outbox = receiver = sender = None
        if not self.first:
            shapes = [self.in_shape, ((cfg.batch_size,), torch.long)]
            if self.need_x:
                L = self.learner
                shapes.append(((cfg.batch_size, L.in_channels, L.image_size, L.image_size),
                               torch.get_default_dtype()))
            inbox = Inbox(r, r - 1, shapes, dev, depth, stop_at, self.timeout, start=self.start)
            if self.send_unit is not None:
                sender = UnitSender(r, r - 1, self.send_unit, versions, self.timeout)
        if not self.last:
            outbox = Outbox(r, r + 1, depth, self.timeout)
            if self.shadow is not None:
                receiver = ShadowReceiver(r, r + 1, self.shadow, versions, cfg.pipeline_param_delay, dev,
                                          self.timeout)
                if self._received is not None:
                    receiver.restore(self._received, self.start)
        return inbox, outbox, receiver, sender

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any] | None:
        """Train every step of the plan (from the checkpoint's step when resumed, up to the announced end
        when stopped early); worker 0 returns the run's summary, the others None."""
        inbox, outbox, receiver, sender = self._links()
        self.receiver = receiver
        stats = self.stats
        dist.barrier(group=self.slow)  # everyone built: start the clocks together
        if self._rng is not None:
            restore_rng_state(self._rng)
        t, lr = self.start, 0.0
        while t < self.stop:
            self._check_launcher()
            if self.first:
                self._poll_stop(t)
            t_loop = time.perf_counter()
            h, y, x = self._next_input(t, inbox)
            if inbox is not None:
                self.stop = min(self.stop, inbox.stop_at)  # the end announced upstream, if any
            if receiver is not None:
                # Post the receives of every version <= t+1 now, before micro-batch t goes out: the
                # next worker sends version t+1 right after its step t, and must never wait for us to
                # get past step t (that would be a cycle, e.g. with the epoch-end gather).
                receiver.post_upto(t)
                receiver.install(t)
            t_compute = time.perf_counter()
            lr = self._step(t, h, y, x, stats, outbox)
            if sender is not None:
                sender.after_step(t)  # our first unit, after the step that makes version t+1
            self._account(stats, t_loop, t_compute)
            t += 1
            every = self.cfg.ckpt_every_steps
            if t % self.spe == 0 or t == self.plan.stop_at:
                if outbox is not None:
                    outbox.flush()
                # per-epoch figures; a run stopped mid-epoch (max_steps) carries them on to its resume
                finished, stats = stats, (EpochStats() if t % self.spe == 0 else stats)
                self._end_epoch(finished, t, lr, carry=stats)
            elif t == self.stop or (every and t % every == 0):  # stopped early (Ctrl-C, SIGTERM), or
                if outbox is not None:                          # ckpt_every_steps: save the completed steps
                    outbox.flush()
                self._save(t, stats)
        if outbox is not None:
            outbox.flush()
        if sender is not None:
            sender.flush()
        self._collective(lambda: dist.barrier(group=self.ctrl), "the final synchronisation")
        if not self.first:
            return None
        return {"test_acc": self.last_acc, "best_acc": self.best_acc, "steps": t, "records": self.records,
                "ranges": [(r.start, r.stop) for r in self.plan.ranges], "data": self.data_text}

    def _next_input(self, t: int, inbox: Inbox | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(block input, targets, image for the local losses or None) of micro-batch ``t``."""
        if inbox is None:  # worker 0: the training batches, epoch by epoch (a resumed one from its batch)
            e = t // self.spe
            if self._data is None or e != self._data_epoch:
                self._data, self._data_epoch = iter(self.loader.epoch(e, start_batch=t - e * self.spe)), e
            x, y = next(self._data)
            return x, y, x
        ts = inbox.take(t)
        L = self.learner
        return L.prepare_input(ts[0]), ts[1], (L.prepare_input(ts[2]) if len(ts) > 2 else None)

    def _step(self, t: int, h: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None, stats: EpochStats,
              outbox: Outbox | None) -> float:
        """This worker's blocks on micro-batch ``t``, the output sent on, the optimiser step; returns the lr."""
        L = self.learner
        lr = lr_at(self.cfg, t, self.spe)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        batch = LocalBatch(x if x is not None else h, y, L.norm_mean, L.norm_std)
        h, losses = L.train_blocks(self.own, h, batch)  # overlapped when blocks_in_flight > 1
        finite = torch.isfinite(torch.stack([v.detach().float() for v in losses]))
        if not bool(finite.all()):  # before this worker's step: its weights stay those of the last step
            k = self.own[int((~finite).nonzero()[0])]
            raise DivergenceError(f"training diverged at step {t + 1}: block {k}'s loss is not finite (lr {lr:.4g}); "
                                  "lower lr or lengthen the warm-up")
        for k, loss in zip(self.own, losses):
            stats.add_loss(k, loss)
        if outbox is None:  # the last worker: h is the logits
            stats.add_correct((h.argmax(dim=1) == y).sum(), int(y.numel()))
        else:  # send on (detached), bounded; the image too when the next losses read it
            outbox.send(t, [h, y, batch.x] if self.need_x else [h, y], end=self.stop)
        self.optimizer.step()
        return lr

    def _account(self, stats: EpochStats, t_loop: float, t_compute: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        stats.compute_s += now - t_compute
        stats.busy_s += now - t_loop
        stats.images += self.cfg.batch_size

    # ---------------------------------------------------------------- stopping early
    def _poll_stop(self, t: int) -> None:
        """Worker 0, before step ``t``: after a stop request, announce the end (the micro-batches already
        in flight are finished, see :class:`~.transport.Inbox`)."""
        if self.announced is None and self.control is not None and self.control.stop.value:
            self.announced = min(t + self.cfg.pipeline_queue_depth, self.plan.stop_at)
            self.stop = min(self.stop, self.announced)

    def _check_launcher(self) -> None:
        """A worker outliving its launcher (killed) stops instead of training on unobserved."""
        if self.control is not None and os.getppid() != self.control.launcher_pid:
            raise PipelineError(f"worker {self.rank}: the launching process is gone; stopping")

    # ---------------------------------------------------------------- epoch end, checkpoints (collective)
    def _part(self, stats: EpochStats, carry: EpochStats) -> dict[str, Any]:
        """What worker 0 gathers from this worker at a flush: its figures, its weights and what continuing
        exactly from here needs (``carry``: the running epoch figures the loop goes on with)."""
        part = stats.part(self.rank)
        part["state"] = {k: v.detach().cpu() for k, v in self.learner.state_dict().items()
                         if k.startswith(self.owned_prefixes)}
        bad = next((k for k, v in part["state"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())),
                   None)
        if bad is not None:  # a checkpoint of non-finite weights is never written
            raise DivergenceError(f"training diverged: {bad} holds non-finite values after the optimiser step; "
                                  "lower lr or lengthen the warm-up")
        part["resume"] = _cpu({
            "optimizer": self.optimizer.state_dict(),
            "shadow": self.shadow.state_dict() if self.shadow is not None else None,
            "received": self.receiver.received() if self.receiver is not None else [],
            "stats": carry.state(),
            "rng": capture_rng_state(),
        })
        return part

    def _gather(self, part: dict[str, Any], step: int) -> list[Any] | None:
        parts: list[Any] | None = [None] * self.P if self.first else None
        self._collective(lambda: dist.gather_object(part, parts, dst=0, group=self.ctrl),
                         f"the synchronisation at step {step}")
        return parts

    def _end_epoch(self, stats: EpochStats, step: int, lr: float, carry: EpochStats) -> None:
        """Flush point: gather the parts on worker 0, evaluate there if due, record, write the checkpoint."""
        spe, end_of_epoch = self.spe, step % self.spe == 0
        done = step // spe
        epoch = done if end_of_epoch else done + (step % spe) / spe
        do_eval = step == self.plan.stop_at or (self.cfg.eval_every_epochs > 0 and done % self.cfg.eval_every_epochs == 0
                                                and end_of_epoch)
        parts = self._gather(self._part(stats, carry), step)
        if self.first:
            acc = None
            if do_eval:
                acc = self._evaluate(parts)
                self.last_acc, self.last_eval_step = acc, step
                self.best_acc = acc if self.best_acc is None else max(self.best_acc, acc)
            rec = self._record(parts, step, epoch, lr, acc)
            self.records.append(rec)
            self._write(rec, step, parts)
        self._released_by_worker0()

    def _save(self, step: int, stats: EpochStats) -> None:
        """Stopped early mid-epoch: worker 0 writes everyone's state at ``step`` (no record: the epoch goes on)."""
        parts = self._gather(self._part(EpochStats(), stats), step)
        if self.first:
            self._save_checkpoint(step, parts)
        self._released_by_worker0()

    def _released_by_worker0(self) -> None:
        """The others wait here (long timeout, dist_timeout_s) while worker 0 evaluates and writes, so that no
        pipeline receive runs into pipeline_timeout_s meanwhile. Worker 0 does not wait for them (not a
        barrier): they were all at the gather just before, and one that hangs since is caught at the next
        micro-batch, within pipeline_timeout_s."""
        dist.broadcast(torch.zeros(1), src=0, group=self.slow)

    def _evaluate(self, parts: list[Any]) -> float:
        """Worker 0: assemble the whole learner from the parts' states and test it."""
        if self.full is None:
            with torch.random.fork_rng(devices=[]):  # built when first needed: the run's RNG stays as it was
                self.full = build_learner(self.cfg, self.plan.info, self.device)
        state: dict[str, torch.Tensor] = {}
        for p in parts:
            state.update(p["state"])
        self.full.load_state_dict(state)
        acc, _, _ = evaluate(self.full, self.test_loader)
        return acc

    def _record(self, parts: list[Any], step: int, epoch: float, lr: float, acc: float | None) -> dict[str, Any]:
        """Worker 0: the epoch's ``metrics.jsonl`` record from every worker's part."""
        losses: list[float] = [math.nan] * self.K
        for p in parts:
            for k, v in p["losses"].items():
                losses[k] = v
        lastp = parts[-1]
        busy_max = max(p["busy_s"] for p in parts)
        return {"type": "epoch", "epoch": epoch, "step": step, "lr": lr, "losses": losses,
                "loss": losses[-1], "train_acc": lastp["correct"] / lastp["n"] if lastp["n"] else None,
                "test_acc": acc, "images_per_s": lastp["images"] / busy_max if busy_max > 0 else None,
                "worker_busy_s": [p["busy_s"] for p in parts],
                "worker_compute_s": [p["compute_s"] for p in parts],
                "best_acc": self.best_acc}

    def _collective(self, fn: Callable[[], Any], what: str) -> None:
        others = ", ".join(str(r) for r in range(self.P) if r != self.rank)
        guarded(fn, self.timeout, f"worker {self.rank}: {what}", f"worker(s) {others}")

    # ---------------------------------------------------------------- output (worker 0)
    def _write(self, rec: dict[str, Any], step: int, parts: list[Any]) -> None:
        """Metrics line, progress line, then the atomic checkpoint (which holds that line too)."""
        cfg = self.cfg
        path = Path(cfg.out_dir) / "metrics.jsonl"
        try:
            JsonlWriter(path).write(rec)
        except OSError as e:  # a full disk: one line (the launcher keeps the workers' own lines)
            raise write_failure(path, e, "write", self._kept()) from None
        if cfg.progress:
            acc_s = f"{rec['test_acc']:.4f}" if rec["test_acc"] is not None else "-"
            ips = rec["images_per_s"] or 0.0
            print(f"epoch {rec['epoch']:g}/{cfg.epochs}  step {step}  loss {rec['loss']:.4f}  "
                  f"train_acc {rec['train_acc']:.4f}  test_acc {acc_s}  {ips:.0f} img/s (pipeline)", flush=True)
        self._save_checkpoint(step, parts)

    def _save_checkpoint(self, step: int, parts: list[Any]) -> None:
        path = Path(self.cfg.out_dir) / "last.pt"
        try:
            save_checkpoint(path, self._checkpoint(step, parts))
        except OSError as e:  # the previous last.pt is untouched
            raise write_failure(path, e, "write the checkpoint", self._kept()) from None
        if self.control is not None:
            self.control.saved_step.value = step

    def _kept(self) -> str:
        saved = self.control.saved_step.value if self.control is not None else -1
        return (f"{Path(self.cfg.out_dir) / 'last.pt'} (step {saved}) is kept" if saved >= 0
                else "no checkpoint was written yet")

    def _checkpoint(self, step: int, parts: list[Any]) -> dict[str, Any]:
        """The whole model (what ``manlearn eval`` reads) and every worker's state to continue exactly."""
        model: dict[str, torch.Tensor] = {}
        for p in parts:
            model.update(p["state"])
        return {
            "format": CKPT_FORMAT, "version": CKPT_VERSION,
            "manlearn_version": str(getattr(manlearn, "__version__", "?")), "torch_version": str(torch.__version__),
            "model": model, "optimizer": {}, "step": step, "epoch": step // self.spe,
            "batch": step % self.spe, "steps_per_epoch": self.spe, "config": config_to_dict(self.cfg),
            "metrics": self.records, "best_acc": self.best_acc, "last_test_acc": self.last_acc,
            "last_eval_step": self.last_eval_step,
            "pipeline": {"workers": self.P, "ranges": [(r.start, r.stop) for r in self.plan.ranges],
                         "resumable": True, "states": [p["resume"] for p in parts]},
        }


def worker_main(rank: int, port: int, cfg_dict: dict, plan: PipelinePlan, threads: int,
                errq: Any, resq: Any, control: Control | None = None) -> None:
    """Entry point of a spawned pipeline worker: join the group, run, report (worker 0) or fail loudly.

    Ctrl-C (which a terminal sends to the whole process group) and SIGTERM are the launcher's to handle:
    ignored here.  The launcher starts us with both blocked, so none is lost or fatal before this point."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    torch.set_num_threads(max(1, threads))
    # the launcher's plan built the same learner and said its memory warning once; the rest, on one line
    warnings.filterwarnings("ignore", category=MemoryWarning)
    warnings.formatwarning = one_line_warning
    try:
        # the user's files first (a spawned process starts bare): their task, rule or model names are in the config
        import_user_code(list(cfg_dict.get("imports") or []))
        cfg = config_from_dict(cfg_dict, check=False)
        dev_is_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if dev_is_cuda else "gloo")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=plan.workers,
                                timeout=datetime.timedelta(seconds=cfg.pipeline_timeout_s))
        out = Worker(cfg, rank, plan, threads, control).run()
        if rank == 0:
            resq.send(out)
        cleanup()  # every worker leaves together (a worker leaving early can abort at exit)
    except BaseException as e:  # report, then exit non-zero: the launcher stops the others
        msg = str(e) if isinstance(e, ManlearnError) else traceback.format_exc()
        try:
            errq.put((rank, time.time(), msg[-4000:], isinstance(e, DivergenceError)))
        finally:
            os._exit(1)
