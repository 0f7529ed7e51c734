"""Moving tensors between pipeline workers: bounded point-to-point links and MAN's back-sync.

Every wait has a deadline (``pipeline_timeout_s``), and every wait or post that fails ends in a typed
error naming the peer: :class:`~.errors.WorkerTimeout` when the peer stayed silent for the whole
timeout, :class:`~.errors.WorkerGone` when the link failed before it (a dead peer's sockets close at
once; posting a send or receive on such a link fails at once too).
gloo reports both as a bare ``RuntimeError`` (and nccl as ``torch.distributed.DistError``, also a
``RuntimeError``), so the kind is told by the clock: a failure that took the whole timeout is a timeout.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .errors import WorkerGone, WorkerTimeout

__all__ = ["guarded", "wait", "Inbox", "Outbox", "ShadowReceiver", "UnitSender",
           "TAG_H", "TAG_X", "TAG_Y", "TAG_PARAM", "TAG_END"]

TAG_H, TAG_X, TAG_Y, TAG_PARAM, TAG_END = 1, 2, 3, 4, 5
TENSOR_TAGS = (TAG_H, TAG_Y, TAG_X)  # a micro-batch travels as (activations, targets[, image]) ...
NO_END = -1  # ... and the step at which the stream ends, once announced (Ctrl-C, SIGTERM), else NO_END


def _tags(n: int) -> tuple[int, ...]:
    return (*TENSOR_TAGS[:n], TAG_END)


def guarded(fn: Callable[[], Any], timeout_s: float, what: str, peers: str) -> Any:
    """``fn()`` (a wait or a collective bounded by ``timeout_s``), its failure raised as a typed error.

    ``what`` says what was being done (it starts the message), ``peers`` who we were waiting for.
    """
    start = time.monotonic()
    try:
        return fn()
    except RuntimeError as e:  # torch.distributed.DistError is a RuntimeError too
        if time.monotonic() - start >= timeout_s:
            raise WorkerTimeout(f"{what}: nothing for {timeout_s:g} s (pipeline_timeout_s) from {peers}; "
                                "the peer worker is stuck or too slow") from None
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise WorkerGone(f"{what}: the link to {peers} failed, the peer worker is gone ({msg})") from None


def wait(work: Any, timeout_s: float, what: str, peer: int) -> None:
    """Wait for one point-to-point operation with ``peer``."""
    guarded(lambda: work.wait(timeout=datetime.timedelta(seconds=timeout_s)), timeout_s, what, f"worker {peer}")


class Inbox:
    """Micro-batches from the previous worker, with at most ``depth`` receives posted ahead.

    Posting ahead lets the next micro-batch's transfer overlap this worker's compute; the bound keeps
    the memory flat whatever the relative speeds.

    Every micro-batch also carries the step at which the stream ends when one was announced (the run
    is stopping early).  A sender announces ``S >= t + depth`` with micro-batch ``t``: when that
    micro-batch is taken, at most steps ``< t + depth`` have receives posted, so ``stop_at`` drops to
    ``S`` before any receive for a step ``>= S`` is posted, and none is left unanswered.
    """

    def __init__(self, rank: int, src: int, shapes: Sequence[tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device, depth: int, stop_at: int, timeout_s: float, start: int = 0) -> None:
        self.rank, self.src, self.shapes, self.device = rank, src, list(shapes), device
        self.depth, self.stop_at, self.timeout_s = depth, stop_at, timeout_s
        self.posted: list[tuple[int, list[Any], list[torch.Tensor]]] = []  # (step, works, tensors)
        self.next_post = start  # the first micro-batch (a resumed run's step)

    def _post(self, t: int) -> None:
        ts = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self.shapes]
        ts.append(torch.empty(1, dtype=torch.long, device=self.device))  # the announced end
        works = guarded(lambda: [dist.irecv(x, self.src, tag=tag) for x, tag in zip(ts, _tags(len(ts) - 1))],
                        self.timeout_s, f"worker {self.rank}: receiving micro-batch {t}", f"worker {self.src}")
        self.posted.append((t, works, ts))

    def fill(self) -> None:
        """Post receives until ``depth`` are outstanding (or every step has one)."""
        while len(self.posted) < self.depth and self.next_post < self.stop_at:
            self._post(self.next_post)
            self.next_post += 1

    def take(self, t: int) -> list[torch.Tensor]:
        """The tensors of micro-batch ``t`` (waits for them); the next receive is posted before returning.

        An end announced with it lowers :attr:`stop_at` (before the next receive is posted)."""
        self.fill()
        rt, works, ts = self.posted.pop(0)
        assert rt == t, (rt, t)
        for w in works:
            wait(w, self.timeout_s, f"worker {self.rank}: waiting for micro-batch {t} from worker {self.src}",
                 self.src)
        end = int(ts.pop().item())
        if end != NO_END:
            self.stop_at = min(self.stop_at, end)
        self.fill()  # post the next receive before computing: the transfer overlaps
        return ts


class Outbox:
    """Micro-batches to the next worker, with at most ``depth`` sends outstanding.

    A gloo send completes only when the receiver has posted the matching receive, so waiting for the
    send of ``t − depth`` before sending ``t`` is the back-pressure that bounds the queue.
    """

    def __init__(self, rank: int, dst: int, depth: int, timeout_s: float) -> None:
        self.rank, self.dst, self.depth, self.timeout_s = rank, dst, depth, timeout_s
        self.pending: list[tuple[int, list[Any], list[torch.Tensor]]] = []  # (step, works, tensors)

    def bound(self, limit: int) -> None:
        """Wait for the oldest sends until at most ``limit`` are outstanding."""
        while len(self.pending) > limit:
            t, works, _ = self.pending.pop(0)
            for w in works:
                wait(w, self.timeout_s, f"worker {self.rank}: sending micro-batch {t} to worker {self.dst}",
                     self.dst)

    def send(self, t: int, tensors: Sequence[torch.Tensor], end: int = NO_END) -> None:
        """Send micro-batch ``t`` (kept alive until its send completes) with the stream's announced ``end``."""
        self.bound(self.depth - 1)
        out = [x.contiguous() for x in tensors]
        out.append(torch.tensor([end], dtype=torch.long, device=out[0].device))
        works = guarded(lambda: [dist.isend(x, self.dst, tag=tag) for x, tag in zip(out, _tags(len(out) - 1))],
                        self.timeout_s, f"worker {self.rank}: sending micro-batch {t}", f"worker {self.dst}")
        self.pending.append((t, works, out))

    def flush(self) -> None:
        self.bound(0)


def _flat_size(unit: nn.Module) -> int:
    return sum(p.numel() for p in unit.parameters())


class ShadowReceiver:
    """MAN back-sync, receiving side: the next worker's first unit, version by version, into our shadow.

    Step ``t`` uses version ``param_version(t)``: the receive of a version ``v`` is posted by step
    ``v − 1`` (before micro-batch ``v − 1`` goes out, so the sender never waits on us: no cycle) and
    installed at step ``v + delay``.  So after step ``S − 1`` the versions ``<= S`` are received or
    on their way, and those not installed yet (``v + delay >= S``) are what a checkpoint at step ``S``
    must keep: :meth:`received` waits for them, :meth:`restore` puts them back.
    """

    def __init__(self, rank: int, src: int, shadow: nn.Module, versions: Sequence[int], delay: int,
                 device: torch.device, timeout_s: float) -> None:
        self.rank, self.src, self.delay, self.device, self.timeout_s = rank, src, delay, device, timeout_s
        self.params = list(shadow.parameters())
        self.size = _flat_size(shadow)
        self.versions = list(versions)
        self.next_version = 0  # index into versions of the next receive to post
        self.posted: list[tuple[int, Any, torch.Tensor]] = []  # (version, work or None once received, buffer)

    def received(self) -> list[tuple[int, torch.Tensor]]:
        """The versions received but not installed yet (waiting for every posted receive), on the CPU."""
        for i, (v, work, buf) in enumerate(self.posted):
            if work is not None:
                wait(work, self.timeout_s, f"worker {self.rank}: waiting for the parameters of worker {self.src}'s "
                     f"first unit (version {v})", self.src)
                self.posted[i] = (v, None, buf)
        return [(v, buf.cpu()) for v, _, buf in self.posted]

    def restore(self, received: Sequence[tuple[int, torch.Tensor]], step: int) -> None:
        """Continue at ``step`` with the versions a checkpoint kept (see :meth:`received`)."""
        self.posted = [(int(v), None, buf.to(self.device)) for v, buf in received]
        self.next_version = sum(1 for v in self.versions if v <= step)

    def post_upto(self, t: int) -> None:
        """Post the receives of every version <= t + 1 (the next worker sends t + 1 after its step t)."""
        while self.next_version < len(self.versions) and self.versions[self.next_version] <= t + 1:
            v = self.versions[self.next_version]
            buf = torch.empty(self.size, device=self.device)
            work = guarded(lambda: dist.irecv(buf, self.src, tag=TAG_PARAM), self.timeout_s,
                           f"worker {self.rank}: receiving parameters (version {v})", f"worker {self.src}")
            self.posted.append((v, work, buf))
            self.next_version += 1

    @torch.no_grad()
    def install(self, t: int) -> None:
        """Copy the version that step ``t`` uses into the shadow, if it is a new one."""
        if not self.posted or self.posted[0][0] + self.delay != t:
            return
        v, work, buf = self.posted.pop(0)
        if work is not None:
            wait(work, self.timeout_s, f"worker {self.rank}: waiting for the parameters of worker {self.src}'s "
                 f"first unit (version {v})", self.src)
        off = 0
        for p in self.params:
            p.copy_(buf[off:off + p.numel()].view_as(p))
            off += p.numel()


class UnitSender:
    """MAN back-sync, sending side: our first unit's parameters to the previous worker, per version."""

    def __init__(self, rank: int, dst: int, unit: nn.Module, versions: Sequence[int], timeout_s: float) -> None:
        self.rank, self.dst, self.timeout_s = rank, dst, timeout_s
        self.params = list(unit.parameters())
        self.versions = set(versions)
        self.pending: list[tuple[int, Any, torch.Tensor]] = []  # (version, work, buffer)

    def after_step(self, t: int) -> None:
        """Send the unit if step ``t`` made a version that the previous worker uses (version t + 1)."""
        if (t + 1) not in self.versions:
            return
        self.flush()
        with torch.no_grad():
            buf = torch.cat([p.detach().reshape(-1) for p in self.params])
        work = guarded(lambda: dist.isend(buf, self.dst, tag=TAG_PARAM), self.timeout_s,
                       f"worker {self.rank}: sending parameters (version {t + 1})", f"worker {self.dst}")
        self.pending.append((t + 1, work, buf))

    def flush(self) -> None:
        while self.pending:
            v, work, _ = self.pending.pop(0)
            wait(work, self.timeout_s, f"worker {self.rank}: sending parameters (version {v}) to worker {self.dst}",
                 self.dst)
