"""Learning-rate schedules as pure functions of the global step.

Why pure functions instead of ``torch.optim.lr_scheduler`` objects: the lr of step ``s`` depends
only on ``s`` and the config, so a resumed run needs no scheduler state to reproduce the exact
lr sequence of an uninterrupted one, and the schedule can be unit-tested without an optimiser.
"""

from __future__ import annotations

import math

from manlearn.config import TrainConfig

__all__ = ["lr_at", "total_steps"]


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Length of the schedule: ``epochs × steps_per_epoch``.

    ``max_steps`` deliberately does *not* shorten the schedule: it is a stop signal (smoke tests,
    interrupting a run), so a run stopped at ``max_steps`` and resumed follows the same lr curve
    as one that never stopped.
    """
    return cfg.epochs * steps_per_epoch


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate used for optimiser step ``step`` (0-based).

    - ``constant``: ``lr``.
    - ``cosine-iter`` (FM-R32, SPEC §8): per-iteration cosine from ``lr`` to 0 over the run,
      ``lr · ½(1 + cos(π·step/T))``, no warm-up.
    - ``cosine-warmup`` (the papers' CIFAR/SVHN/STL recipe): set once per epoch, as in the
      authors' ``adjust_learning_rate`` with 1-based epoch ``e`` and ``E`` epochs:
      ``c(e) = lr · ½(1 + cos(π·e/E))``; for ``e ≤ W`` (warm-up epochs)
      ``lr(e) = c(e)·(e−1)/W + warmup_lr·(W+1−e)/W`` — a linear blend that starts at exactly
      ``warmup_lr`` in epoch 1 — and ``c(e)`` afterwards (so the last epoch runs at lr 0).
    """
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine-iter":
        t = max(1, total_steps(cfg, steps_per_epoch))
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, t) / t))
    if cfg.schedule == "cosine-warmup":
        e = step // max(1, steps_per_epoch) + 1
        e = min(e, cfg.epochs)
        c = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * e / cfg.epochs))
        w = cfg.warmup_epochs
        if w > 0 and e <= w:
            return c * (e - 1) / w + cfg.warmup_lr * (w + 1 - e) / w
        return c
    raise ValueError(f"unknown schedule {cfg.schedule!r}")  # validate() refuses it earlier
