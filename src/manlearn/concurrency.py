"""A step scheduler that overlaps blocks: block k's local loss, backward and EMA update run in one thread
while another already runs block k+1's forward.

Why this is correct: block k's auxiliary work reads only h_k (and the next block's first unit, read-only,
for MAN's EMA), writes only block k's and aux_k's gradients and aux_k's EMA unit; block k+1's forward
reads only h_k detached. So the overlapped step computes the sequential step's gradients, EMA units and
BN statistics (tests/test_concurrency.py checks it for every registered rule). ``after_block(k)`` (data
parallelism's all-reduce) is still called in block order, from the main thread, so every rank issues its
collectives in the same order. The block pipeline reuses it for each worker's share of the blocks
(``LocalLearner.train_blocks``), so ``blocks_in_flight`` means the same in all three ways of training.

``blocks_in_flight = N`` bounds how many blocks have a live graph at once (the memory price: N blocks'
activations instead of one); on the CPU N threads (the caller's and N−1 workers) each take the next block,
forward and local loss, in turn. Each thread gets its share
of the intra-op threads (``torch.get_num_threads() // N``, at least 1), so the threads do not oversubscribe
the cores. Blocks must not modify their input in place (the sequential step gives them a tensor nobody
else reads; here block k's auxiliary network may still be reading it).

On CUDA the overlap is the device's, not the host's (:func:`stream_step`): one host thread issues the
blocks in order, block k's whole local step on stream k mod N, and block k+1's forward waits (an event)
only for block k's forward, not for its auxiliary work. Autograd runs each backward op on its forward op's
stream, so block k's backward stays on its stream and overlaps block k+1's forward on the next one.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["overlapped_step", "stream_step", "CudaStreams"]

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def _pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """A shared pool of ``workers`` threads, each running torch ops on ``threads`` intra-op threads."""
    key = (workers, threads)
    with _LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="manlearn-block",
                                             initializer=torch.set_num_threads, initargs=(threads,))
        return _POOLS[key]


def _current_saved_tensor_hooks() -> tuple[Any, Any] | None:
    """The innermost ``saved_tensors_hooks`` of this thread (e.g. manlearn.memory's activation tracker), or
    None. The hooks are thread-local, so the workers re-enter them to be counted like the main thread."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # pragma: no cover - an older/newer torch without it: workers run untracked
        return None
    try:
        return top(False)
    except TypeError:  # pragma: no cover - signature without the tracing flag
        return top()


def _in_hooks(hooks: tuple[Any, Any] | None, fn: Callable, *args: Any) -> Any:
    if hooks is None:
        return fn(*args)
    with torch.autograd.graph.saved_tensors_hooks(*hooks):
        return fn(*args)


def overlapped_step(learner: Any, x: torch.Tensor, batch: Any, grad_scale: torch.Tensor | None,
                    after_block: Callable[[int], None] | None, blocks_in_flight: int,
                    blocks: range | None = None) -> tuple[Any, list[torch.Tensor]]:
    """One training step of ``learner`` with up to ``blocks_in_flight`` blocks in flight; returns (the final
    head's detached outputs, one detached loss per block), as the sequential loop of ``train_step`` does.

    ``blocks`` (default: all) runs only a consecutive range of blocks on ``x``, the input of its first block
    (a pipeline worker's share); the first value returned is then the last block's detached output unless the
    range ends with the final block, and the losses are those of the range's blocks.

    On CUDA this is :func:`stream_step` with ``blocks_in_flight`` streams. On the CPU, N = ``blocks_in_flight``
    threads (this one and N-1 workers) each take the next block in order, wait until the block before has
    finished its forward, run the forward, hand the detached output on, then run the block's local loss,
    backward and EMA update, and take the next block. The forwards so run strictly in order (each thread
    only ever waits for one), every thread holds at most one block's graph (the N bound), and no thread
    idles while another block's work is ready.
    """
    K, n = learner.K, max(2, int(blocks_in_flight))
    blocks = _check_range(blocks, K)
    if x.device.type == "cuda":
        return stream_step(learner, x, batch, grad_scale, after_block, CudaStreams.get(x.device, n), blocks)
    total = torch.get_num_threads()
    share = max(1, total // n)
    pool = _pool(n - 1, share)
    aux_end = min(blocks.stop, K - 1)  # blocks reported to after_block as they finish; K-1 at the end
    inputs: dict[int, torch.Tensor] = {blocks.start: x}  # block k's input, once block k-1's forward is done
    forwarded = {k: threading.Event() for k in blocks}
    finished = {k: threading.Event() for k in blocks}
    losses: dict[int, torch.Tensor] = {}
    result: list[Any] = [None]
    errors: list[BaseException] = []
    lock = threading.Lock()
    order = iter(blocks)

    def take() -> int | None:
        with lock:
            return None if errors else next(order, None)

    def fail(e: BaseException) -> None:
        with lock:
            errors.append(e)
        for ev in (*forwarded.values(), *finished.values()):  # wake every waiting thread: they stop
            ev.set()

    def run_blocks(report: Callable[[], None] | None = None) -> None:
        """Take blocks in order until none is left: this thread's share of the step."""
        try:
            while (k := take()) is not None:
                if k > blocks.start:
                    forwarded[k - 1].wait()
                    if errors:
                        return
                h_in = inputs.pop(k)
                if k == K - 1:  # the final block: forward, head, loss and backward in one
                    result[0], losses[k] = learner.local_step(k, h_in, batch, grad_scale)
                    forwarded[k].set()
                else:
                    h = learner.forward_block(k, h_in, batch)
                    inputs[k + 1] = h.detach()  # a range ending before the final block returns the last one
                    forwarded[k].set()
                    losses[k] = learner.local_loss(k, h, batch, grad_scale)
                    del h
                finished[k].set()
                if report is not None:
                    report()
        except BaseException as e:  # noqa: BLE001 - handed to the caller after every thread has stopped
            fail(e)

    reported = blocks.start

    def report() -> None:
        """after_block for the finished blocks, in block order and from this (the caller's) thread."""
        nonlocal reported
        while reported < aux_end and finished[reported].is_set() and not errors:
            if after_block is not None:
                after_block(reported)
            reported += 1

    hooks = _current_saved_tensor_hooks()
    torch.set_num_threads(share)
    futures = []
    try:
        futures = [pool.submit(_in_hooks, hooks, run_blocks) for _ in range(n - 1)]
        run_blocks(report)
        for fut in futures:
            fut.result()
        if errors:
            raise errors[0]
        report()
    except BaseException as e:  # e.g. Ctrl-C while waiting: stop the workers taking blocks, let them finish
        fail(e)
        for fut in futures:
            fut.exception()  # waits; run_blocks itself never raises
        raise
    finally:
        torch.set_num_threads(total)
    if after_block is not None and blocks.stop == K:
        after_block(K - 1)
    return (result[0] if blocks.stop == K else inputs[blocks.stop]), [losses[k] for k in blocks]


def _check_range(blocks: range | None, K: int) -> range:
    blocks = range(K) if blocks is None else blocks
    if not len(blocks) or blocks.step != 1 or blocks.start < 0 or blocks.stop > K:
        raise ValueError(f"blocks must be a consecutive range inside 0..{K - 1}, got {blocks}")
    return blocks


class CudaStreams:
    """N CUDA streams for :func:`stream_step` (created once per device and N, then reused: creating streams
    every step would cost more than it saves). The methods are the whole protocol the scheduler needs, so a
    stand-in with the same methods can check the order of operations where no GPU is present."""

    _cache: dict[tuple[str, int], "CudaStreams"] = {}

    def __init__(self, device: torch.device, n: int) -> None:
        self.device = device
        self.streams = [torch.cuda.Stream(device=device) for _ in range(n)]

    @classmethod
    def get(cls, device: torch.device, n: int) -> "CudaStreams":
        key = (str(device), n)
        with _LOCK:
            if key not in cls._cache:
                cls._cache[key] = cls(device, n)
            return cls._cache[key]

    def __len__(self) -> int:
        return len(self.streams)

    def fork(self) -> None:
        """Every stream waits for the work already queued on the caller's stream (the batch, zeroed grads)."""
        here = torch.cuda.current_stream(self.device)
        for s in self.streams:
            s.wait_stream(here)

    def use(self, i: int):
        """A context in which stream i is the current stream."""
        return torch.cuda.stream(self.streams[i])

    def mark(self, i: int) -> torch.cuda.Event:
        """An event recorded on stream i now."""
        ev = torch.cuda.Event()
        ev.record(self.streams[i])
        return ev

    def wait(self, i: int, event: torch.cuda.Event) -> None:
        self.streams[i].wait_event(event)

    def keep(self, t: torch.Tensor, i: int) -> None:
        """``t`` (allocated on another stream) is read on stream i: its memory must not be reused before."""
        t.record_stream(self.streams[i])

    def hand_back(self, t: torch.Tensor) -> None:
        """``t`` (made on a block stream) goes to the caller, who reads it on the caller's stream."""
        t.record_stream(torch.cuda.current_stream(self.device))

    def join(self) -> None:
        """The caller's stream waits for every stream (the losses, gradients and EMA units are then final)."""
        here = torch.cuda.current_stream(self.device)
        for s in self.streams:
            here.wait_stream(s)


def stream_step(learner: Any, x: torch.Tensor, batch: Any, grad_scale: torch.Tensor | None,
                after_block: Callable[[int], None] | None, streams: Any,
                blocks: range | None = None) -> tuple[Any, list[torch.Tensor]]:
    """:func:`overlapped_step` on a GPU: block k's local step (forward, auxiliary loss, backward, EMA
    update) is issued on stream k mod N, in block order, from this thread.

    Block k+1 waits for an event recorded right after block k's forward, so its forward overlaps block k's
    auxiliary work on the device. Block k+N shares block k's stream and so waits for all of block k's work:
    at most N blocks are in flight, and each stream's memory pool holds one block's graph (the memory
    price). The batch's de-normalised image is made before the fork, so no stream reads it before another
    has written it; a block's input, made on the stream before, is marked as read on its own stream
    (``record_stream``) so its memory is not reused early. ``after_block(k)`` is called in block order with
    block k's stream current, so a collective on block k's gradients is queued after them.
    """
    K, n = learner.K, len(streams)
    blocks = _check_range(blocks, K)
    batch.image01  # noqa: B018 - made once, on the caller's stream, before any block stream reads it
    streams.fork()
    losses: list[torch.Tensor] = []
    h_in, ready = x, None
    try:
        for k in blocks:
            i = k % n
            if k > blocks.start:  # the input is the previous block's output, made on the previous stream
                streams.wait(i, ready)
            with streams.use(i):
                if k > blocks.start:
                    streams.keep(h_in, i)
                if k < K - 1:
                    h = learner.forward_block(k, h_in, batch)
                    ready = streams.mark(i)
                    losses.append(learner.local_loss(k, h, batch, grad_scale))
                    h_in = h.detach()
                else:
                    h_in, loss = learner.local_step(k, h_in, batch, grad_scale)
                    losses.append(loss)
                if after_block is not None:
                    after_block(k)
    finally:
        streams.join()
    for t in [*losses, *(v for v in tree_leaves(h_in) if isinstance(v, torch.Tensor))]:
        streams.hand_back(t)  # made on a block stream, read by the caller on its own
    return h_in, losses
