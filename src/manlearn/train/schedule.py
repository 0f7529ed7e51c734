"""Learning-rate schedules as pure functions of the global step (every task, one module).

Why pure functions instead of ``torch.optim.lr_scheduler`` objects: the lr of step ``s`` depends
only on ``s`` and the config, so a resumed run needs no scheduler state to reproduce the exact
lr sequence of an uninterrupted one, and the schedule can be unit-tested without an optimiser.
"""

from __future__ import annotations

import math

from manlearn.config import TrainConfig

__all__ = ["lr_at", "total_steps", "total_epochs"]


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Length of the schedule: ``iterations`` when it is > 0, else ``epochs × steps_per_epoch``.

    ``max_steps`` deliberately does *not* shorten the schedule: it is a stop signal (smoke tests,
    interrupting a run), so a run stopped at ``max_steps`` and resumed follows the same lr curve
    as one that never stopped.
    """
    return cfg.iterations if cfg.iterations > 0 else cfg.epochs * steps_per_epoch


def total_epochs(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Epochs the run starts (the last one partial when ``iterations`` is not a multiple of an epoch)."""
    return -(-total_steps(cfg, steps_per_epoch) // max(1, steps_per_epoch))


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
    - ``step-warmup`` (Detectron's WarmupMultiStepLR, the dense recipes): ``lr · γ^(#lr_steps ≤ step)``,
      times a linear warm-up factor ``f + (1 − f)·step/W`` for ``step < W = warmup_iters``
      (``f = warmup_factor``, ``γ = lr_gamma``); independent of the run's length.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine-iter":
        t = max(1, total_steps(cfg, steps_per_epoch))
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, t) / t))
    if cfg.schedule == "cosine-warmup":
        epochs = total_epochs(cfg, steps_per_epoch)
        e = step // max(1, steps_per_epoch) + 1
        e = min(e, epochs)
        c = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * e / epochs))
        w = cfg.warmup_epochs
        if w > 0 and e <= w:
            return c * (e - 1) / w + cfg.warmup_lr * (w + 1 - e) / w
        return c
    if cfg.schedule == "step-warmup":
        lr = cfg.lr * cfg.lr_gamma ** sum(1 for s in cfg.lr_steps if step >= s)
        if step < cfg.warmup_iters:
            alpha = step / cfg.warmup_iters
            lr *= cfg.warmup_factor * (1.0 - alpha) + alpha
        return lr
    raise ValueError(f"unknown schedule {cfg.schedule!r}")  # validate() refuses it earlier
