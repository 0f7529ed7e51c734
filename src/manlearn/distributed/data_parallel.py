"""Data parallelism for local learning: one gradient all-reduce per block, overlapped with the rest.

Why not ``DistributedDataParallel`` (one wrapper per block)?  Local learning runs K separate
backward passes per iteration, and the auxiliary network of block k reads the *next* block's first
unit (MAN's EMA source) without training it.  DDP would need 2K-1 wrappers (blocks, auxiliary
networks, head), each with its own reducer, unused-parameter detection for the momentum units and a
collective on every wrapper call, and it would also broadcast BN buffers at every forward.  The
learner already tells us when each block's gradients are final (``train_step(after_block=...)``):
block k and its auxiliary network receive gradients only from block k's local loss.  So
:class:`GradReducer` keeps one bucket per block (block k + auxiliary network k, the head with the
last block), flattens it and starts an *asynchronous* all-reduce the moment block k's backward is
done.  That gives what DDP's bucketing gives — communication of block k overlapping the compute of
blocks k+1..K-1 — with exactly one all-reduce per parameter per iteration, no module wrappers
(state-dict keys and checkpoints unchanged), and every rule supported without special cases
(backbone, auxiliary networks, MAN ``lb`` units and MAN++ scales are all just trainable
parameters of some bucket).  :meth:`GradReducer.finish` waits for the buckets before the optimiser
step and also carries the step's statistics (losses, correct count) in the last bucket, so logging
costs no extra collective.

EMA units never need communication: they have no gradient, and their update
``θ_ema ← m·θ_ema + (1−m)·θ_u`` reads only parameters that are identical on every rank (same
initial broadcast, same averaged gradients, same optimiser step), so they stay identical too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GradReducer", "block_buckets"]


def block_buckets(learner: nn.Module) -> list[list[nn.Parameter]]:
    """Trainable parameters grouped by the block whose backward produces their gradients.

    Bucket k = block k + auxiliary network k (the last bucket also holds the head).  Parameters of
    the learner that belong to none of these (there are none in a LocalLearner, but a subclass may
    add some) go to the last bucket, so nothing is left unreduced.
    """
    K = len(learner.blocks)
    buckets: list[list[nn.Parameter]] = []
    seen: set[int] = set()

    def take(mod: nn.Module) -> list[nn.Parameter]:
        out = []
        for p in mod.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    for k in range(K):
        ps = take(learner.blocks[k])
        if k < len(learner.auxes):
            ps += take(learner.auxes[k])
        if k == K - 1:
            ps += take(learner.head)
        buckets.append(ps)
    buckets[-1] += take(learner)
    return buckets


class GradReducer:
    """Averages the gradients of every trainable parameter over the ranks, once per iteration.

    Use: ``learner.train_step(x, y, after_block=r.block_done)`` then ``stats = r.finish(stats)``
    before the optimiser step.  With equal shards per rank (:class:`manlearn.train.data_parallel.ShardedLoader`), the average of the
    per-rank mean-loss gradients is the gradient of the mean loss over the global batch.
    """

    def __init__(self, learner: nn.Module, world_size: int, group: Any = None) -> None:
        self.buckets = block_buckets(learner)
        self.world_size = world_size
        self.group = group
        self._pending: list[tuple[Any, torch.Tensor, list[torch.Tensor]]] = []
        self._launched: set[int] = set()

    def _launch(self, k: int, extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Start the all-reduce of bucket k (plus ``extra`` appended); returns the flat buffer."""
        self._launched.add(k)
        grads = [p.grad for p in self.buckets[k] if p.grad is not None]
        # Ranks run the same code on equal-size shards, so the set of parameters with a gradient
        # is the same on every rank and the flat buffers line up.
        parts = [g.contiguous().view(-1) for g in grads]
        if extra is not None:
            parts.append(extra.to(dtype=grads[0].dtype if grads else extra.dtype).view(-1))
        if not parts:
            return None
        flat = torch.cat(parts)
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._pending.append((work, flat, grads))
        return flat

    def block_done(self, k: int) -> None:
        """Block k's gradients are final: start their all-reduce (the last block waits for finish)."""
        if k < len(self.buckets) - 1:
            self._launch(k)

    @torch.no_grad()
    def finish(self, stats: torch.Tensor | None = None) -> torch.Tensor | None:
        """Wait for every bucket, write the averaged gradients back; return ``stats`` summed over ranks."""
        last = len(self.buckets) - 1
        for k in range(len(self.buckets)):
            if k not in self._launched:
                self._launch(k, stats if k == last else None)
        out = None
        inv = 1.0 / self.world_size
        for work, flat, grads in self._pending:
            work.wait()
            n = sum(g.numel() for g in grads)
            if grads:
                views = torch._utils._unflatten_dense_tensors(flat[:n].mul_(inv), grads)
                torch._foreach_copy_(grads, list(views))
            if flat.numel() > n:
                out = flat[n:].to(stats.dtype) if stats is not None else None
        self._pending.clear()
        self._launched.clear()
        return out
