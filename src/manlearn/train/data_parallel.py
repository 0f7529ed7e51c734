"""The data-parallel loop's helpers: each rank's share of the batches, and evaluation over the ranks.

The communication primitives (process group, :class:`~manlearn.distributed.GradReducer`, broadcast
and buffer averaging) are in :mod:`manlearn.distributed`; what is here knows about the training loop:
loaders and the learner's evaluation.  The Trainer uses both when launched by torchrun.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from manlearn.distributed import DistInfo
from manlearn.errors import ConfigError

__all__ = ["ShardedLoader", "sharded_evaluate"]


class ShardedLoader:
    """Each rank's share of a :class:`~manlearn.data.BatchLoader`'s *global* batches.

    ``batch_size`` stays the global batch (so recipes and learning rates keep their meaning); rank r
    gets rows ``[r·B/N, (r+1)·B/N)`` of global batch b.  The global batch is built (and augmented)
    exactly as a single process would build it and then sliced: N ranks together see precisely
    the single-process batches, which is what makes data parallelism reproduce single-process
    training.  For in-memory data, building the whole batch costs each rank one crop/flip of B
    images, small next to a training step; streamed data (ImageNet) is sharded by sample keys, so
    each rank decodes only its own images.
    """

    def __init__(self, loader: Any, rank: int, world_size: int) -> None:
        if loader.batch_size % world_size:
            raise ConfigError(f"batch_size={loader.batch_size} is the global batch and must be divisible by the "
                              f"{world_size} data-parallel ranks")
        self.loader, self.rank, self.world_size = loader, rank, world_size
        self.shard = loader.batch_size // world_size
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        lo, hi = self.rank * self.shard, (self.rank + 1) * self.shard
        if hasattr(self.loader, "batches") and hasattr(self.loader, "load_batches"):
            # StreamingLoader (ImageNet): a sample's augmentation depends only on its key (epoch,
            # index), so decoding just this rank's keys gives exactly the rows of the global batch
            # without decoding the other ranks' images.
            keys = self.loader.batches(epoch, start_batch)
            yield from self.loader.load_batches([b[lo:hi] for b in keys])
            return
        for x, y in self.loader.epoch(epoch, start_batch=start_batch):
            yield x[lo:hi], y[lo:hi]


@torch.no_grad()
def sharded_evaluate(learner: nn.Module, loader: Any, info: DistInfo,
                     device: torch.device | None = None) -> tuple[float, int, int]:
    """Top-1 accuracy with the test batches dealt round-robin over the ranks, counts summed.

    Every rank must call it (it ends with an all-reduce); every rank gets the same result.
    """
    was_training = learner.training
    learner.eval()
    dev = device or next(learner.parameters()).device
    counts = torch.zeros(2, dtype=torch.float64, device=dev)
    try:
        for b, (x, y) in enumerate(loader.epoch(0)):
            if b % info.world_size != info.rank:
                continue
            logits = learner(x)
            counts[0] += (logits.argmax(dim=1) == y).sum()
            counts[1] += y.numel()
    finally:
        learner.train(was_training)
    if info.enabled:
        dist.all_reduce(counts)
    n, total = int(counts[0].item()), int(counts[1].item())
    return (n / total if total else math.nan), n, total
