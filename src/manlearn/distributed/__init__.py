"""Scaling out on torch.distributed.

- :mod:`.dist`: process-group setup from the ``torchrun`` environment, rank helpers, sharded
  loading and evaluation.
- :mod:`.data_parallel`: :class:`GradReducer`, one asynchronous gradient all-reduce per local block.
- the block pipeline lives in :mod:`manlearn.train.pipeline` (it is a training loop).
"""

from .data_parallel import GradReducer, block_buckets
from .dist import (SINGLE, DistInfo, ShardedLoader, average_buffers, broadcast_state, cleanup,
                   env_world_size, free_port, gloo_available, setup_from_env, sharded_evaluate)

__all__ = ["DistInfo", "SINGLE", "GradReducer", "block_buckets", "ShardedLoader", "average_buffers",
           "broadcast_state", "cleanup", "env_world_size", "free_port", "gloo_available",
           "setup_from_env", "sharded_evaluate"]
