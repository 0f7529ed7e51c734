"""Optimiser construction: one optimiser over every trainable parameter of the learner.

Local learning still takes a single optimiser step per iteration (SPEC §1): backbone blocks,
auxiliary networks, MAN ``lb`` units and MAN++ scales all train together.  The frozen EMA units
have ``requires_grad=False`` and are left out, so the optimiser never touches them.
"""

from __future__ import annotations

import torch
from torch import nn

from manlearn.config import TrainConfig

__all__ = ["build_optimizer", "trainable_parameters"]


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad``, in ``module.parameters()`` order (stable for resume)."""
    return [p for p in module.parameters() if p.requires_grad]


def build_optimizer(cfg: TrainConfig, module: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW with weight decay applied to all parameters.

    Weight decay goes to every parameter (BN affine and MAN++ scales included), as in the
    authors' code; the initial lr is a placeholder that the trainer overwrites every step.
    """
    params = trainable_parameters(module)
    # Multi-tensor kernels everywhere (torch only picks them by default on CUDA): on CPU they halve
    # the cost of the SGD step over the hundreds of small tensors of DGL+MAN++.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, foreach=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")  # validate() refuses it earlier
