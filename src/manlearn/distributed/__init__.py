"""Scaling out on torch.distributed: communication primitives only.

- :mod:`.dist`: process-group setup from the ``torchrun`` environment, rank helpers, broadcasting
  a module's state and averaging its buffers.
- :mod:`.data_parallel`: :class:`GradReducer`, one asynchronous gradient all-reduce per local block.

The loops that use them live in :mod:`manlearn.train`: the data-parallel helpers (sharded loading
and evaluation) in :mod:`manlearn.train.data_parallel`, the block pipeline in
:mod:`manlearn.train.pipeline`.  Nothing here imports from ``manlearn.train``.
"""

from .data_parallel import GradReducer, block_buckets
from .dist import (SINGLE, DistInfo, average_buffers, broadcast_state, cleanup, env_world_size, free_port,
                   gloo_available, setup_from_env)

__all__ = ["DistInfo", "SINGLE", "GradReducer", "block_buckets", "average_buffers", "broadcast_state",
           "cleanup", "env_world_size", "free_port", "gloo_available", "setup_from_env"]
