"""torch.distributed plumbing shared by data parallelism and the block pipeline.

- :func:`setup_from_env` joins the process group that ``torchrun`` (or any launcher setting the
  usual ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` variables)
  describes; a plain ``python -m manlearn train`` stays a single process and never touches
  ``torch.distributed``.  Multi-node runs work the same way: torchrun sets the variables per node.
- :class:`DistInfo` answers "which rank am I, how many are we, may I write files".
- :func:`broadcast_state` and :func:`average_buffers` are the collectives on a whole module.

Loop-level pieces (sharding a loader, sharded evaluation) are in :mod:`manlearn.train.data_parallel`.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from manlearn.errors import ConfigError
from manlearn.runtime import resolve_device

__all__ = ["DistInfo", "SINGLE", "env_world_size", "setup_from_env", "resolve_backend", "free_port",
           "broadcast_state", "average_buffers", "cleanup", "gloo_available"]

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a distributed run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main rank writes logs, metrics and checkpoints."""
        return self.rank == 0


SINGLE = DistInfo()


def gloo_available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset or not an integer)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface (for single-node launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` → ``nccl`` for CUDA devices, ``gloo`` otherwise; refuse combinations that cannot work."""
    if backend not in BACKENDS:
        raise ConfigError(f"dist_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"dist_backend=nccl needs CUDA devices (device resolves to {device}); use gloo")
    if not dist.is_available():
        raise ConfigError("torch.distributed is not available in this torch build")
    if backend == "gloo" and not dist.is_gloo_available():
        raise ConfigError("the gloo backend is not available in this torch build")
    if backend == "nccl" and not dist.is_nccl_available():
        raise ConfigError("the nccl backend is not available in this torch build")
    return backend


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of this rank: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` when CUDA is present."""
    dev = resolve_device(name)
    if dev.type == "cuda" and dev.index is None:
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ConfigError(f"LOCAL_RANK={local_rank} but only {n} CUDA device(s) on this node")
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def setup_from_env(backend: str = "auto", device: str = "auto",
                   timeout_s: float = 1800.0) -> tuple[DistInfo, torch.device]:
    """Join the process group described by the environment, or stay single-process.

    Returns ``(info, device)``.  Idempotent: an already initialised default group is reused.
    """
    world = env_world_size()
    if world <= 1 and not dist.is_initialized():
        return SINGLE, resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = rank_device(device, local_rank)
    if not dist.is_initialized():
        be = resolve_backend(backend, dev)
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if key not in os.environ:
                raise ConfigError(f"WORLD_SIZE={world} is set but {key} is not: launch with torchrun "
                                  "(or set RANK, MASTER_ADDR and MASTER_PORT yourself)")
        dist.init_process_group(be, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    backend=str(dist.get_backend()))
    return info, dev


def cleanup(sync: bool = True, timeout_s: float = 120.0) -> None:
    """Leave the default process group if this process is in one.

    With ``sync`` (a run that ended normally) every rank first waits at a barrier, so no rank tears
    its connections down while another still uses them: rank 0 writes the last checkpoint after the
    others are done, and a gloo rank that shut down early could abort at exit (seen once in CI, rank
    1 killed by SIGABRT after its work was done).  On gloo the barrier is ``monitored_barrier`` with
    ``timeout_s``, so a rank that has died makes this raise-and-continue rather than hang.  Pass
    ``sync=False`` on an error path, where the other ranks may never arrive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if sync and dist.get_world_size() > 1:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
            else:
                dist.barrier()
        except RuntimeError:  # a rank is gone: leave anyway, its own error is what the user needs
            pass
    dist.destroy_process_group()
    gc.collect()  # drop backend objects now, not during interpreter shutdown


@torch.no_grad()
def broadcast_state(module: nn.Module, src: int = 0, group: Any = None) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks (start of a run:
    the ranks are seeded alike, this makes "identical" a guarantee rather than a hope)."""
    tensors = [p.data for p in module.parameters()] + [b for b in module.buffers()]
    for t in tensors:
        if t.is_contiguous():
            dist.broadcast(t, src, group=group)
        else:  # channels-last weights: broadcast a contiguous copy
            c = t.contiguous()
            dist.broadcast(c, src, group=group)
            t.copy_(c)


@torch.no_grad()
def average_buffers(module: nn.Module, group: Any = None) -> None:
    """Average the floating-point buffers (BN running statistics) over the ranks.

    In training mode BatchNorm normalises with the statistics of each rank's own shard, so the
    running estimates drift apart between ranks; they only matter at evaluation, so they are
    averaged before every evaluation and every checkpoint (DDP would instead broadcast rank 0's
    at every forward, which costs a collective per step and discards the other ranks' estimates).
    Integer buffers (``num_batches_tracked``) are identical on every rank and left alone.
    """
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    world = dist.get_world_size(group)
    flat = torch._utils._flatten_dense_tensors([b.contiguous() for b in bufs])
    dist.all_reduce(flat, group=group)
    flat.div_(world)
    for b, v in zip(bufs, torch._utils._unflatten_dense_tensors(flat, bufs)):
        b.copy_(v)
