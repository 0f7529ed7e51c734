"""Planning a pipeline run: which worker owns which blocks, and when MAN's back-sync happens.

The plan is computed once, by the launching process, on a throwaway learner built with the run's
seed and config; the workers receive it (a picklable :class:`PipelinePlan`) instead of re-deriving it.
Block costs are FLOP counts, not timings: deterministic, so the plan never depends on how busy the
machine was.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from manlearn.split import balanced_ends
from manlearn.config import TrainConfig
from manlearn.errors import ConfigError
from manlearn.rules import LocalBatch

from ..build import build_learner, load_split, make_loader, seed_everything
from ..schedule import total_steps

__all__ = ["PipelinePlan", "make_plan", "partition", "block_costs", "param_version", "sync_versions",
           "needs_image"]


@dataclass(frozen=True)
class PipelinePlan:
    """What every worker must agree on before the first step."""

    ranges: tuple[range, ...]      # the contiguous blocks of each worker
    costs: tuple[float, ...]       # FLOPs of each block's local step (the partition's input)
    steps_per_epoch: int
    total_steps: int               # length of the lr schedule
    stop_at: int                   # steps actually run (``max_steps`` may stop early)
    info: Any                      # the dataset's description (shapes, classes, normalisation)

    @property
    def workers(self) -> int:
        return len(self.ranges)

    def shares(self) -> list[float]:
        """Each worker's fraction of the summed block FLOPs."""
        whole = sum(self.costs)
        return [sum(self.costs[r.start:r.stop]) / whole for r in self.ranges]


def partition(costs: Sequence[float], P: int) -> list[range]:
    """Contiguous ranges of blocks for P workers minimising the largest summed cost (exact DP)."""
    K = len(costs)
    if not 2 <= P <= K:
        raise ConfigError(f"pipeline_workers={P} needs 2 <= workers <= K={K} blocks")
    ends = balanced_ends(costs, P)  # the same exact min-max DP that balances a split's memory
    return [range(a, b) for a, b in zip((0, *ends[:-1]), ends)]


def block_costs(learner: nn.Module, batch: int = 2) -> list[float]:
    """FLOPs of each block's whole local step (forward, local loss, backward) on ``batch`` images.

    Deterministic (unlike timings on a busy machine), so every process computes the same plan.  The
    learner is deep-copied: the probe step does not touch its weights or EMA units.
    """
    lr = copy.deepcopy(learner).float().train()
    dev = next(lr.parameters()).device
    x = torch.randn(batch, lr.in_channels, lr.image_size, lr.image_size, device=dev)
    y = torch.zeros(batch, dtype=torch.long, device=dev)
    x = lr.prepare_input(x)
    b = LocalBatch(x, y, lr.norm_mean, lr.norm_std)
    costs, h = [], x
    for k in range(lr.K):
        with FlopCounterMode(display=False) as fc:
            h, _ = lr.local_step(k, h, b)
        costs.append(float(fc.get_total_flops()) + 1.0)
    return costs


def param_version(t: int, every: int, delay: int) -> int:
    """Number of updates of the next worker's first unit that the EMA uses at step ``t``.

    ``v(t) = every·floor((t − delay)/every)``, 0 while ``t − delay < every`` (see the package doc).
    """
    if t - delay < every:
        return 0
    return every * ((t - delay) // every)


def sync_versions(every: int, stop_at: int) -> list[int]:
    """The versions of MAN's back-sync that a run of ``stop_at`` steps sends: every, 2·every, ... up to
    ``stop_at``, also those that only a longer (resumed) run uses: a checkpoint at step ``S`` then holds
    every version ``<= S`` that a later step needs, whatever the run's length."""
    return list(range(every, stop_at + 1, every))


def needs_image(cfg: TrainConfig) -> bool:
    """Whether the local losses read the input image (InfoPro's decoder): then it travels too."""
    base = cfg.base if cfg.method in ("man", "manpp") else cfg.method
    return base.startswith("infopro")


def make_plan(cfg: TrainConfig) -> PipelinePlan:
    """Plan ``cfg`` on a throwaway CPU learner (same seed and config as the workers' learners)."""
    P = cfg.pipeline_workers
    train = load_split(cfg, "train", cfg.train_limit)
    spe = len(make_loader(cfg, train, train=True, device="cpu"))
    if spe == 0:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {len(train)} training images")
    total = total_steps(cfg, spe)
    stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
    cpu_cfg = cfg.model_copy(update={"device": "cpu", "amp": "off", "compile": False})
    seed_everything(cfg.seed)
    probe = build_learner(cpu_cfg, train.info, "cpu")
    if getattr(probe, "reaches_back", 0):
        raise ConfigError(f"method={cfg.method}: its loss re-runs earlier blocks (a window reaching "
                          f"{probe.reaches_back} block(s) back), which a pipeline worker does not hold; train it "
                          "without pipeline_workers")
    if probe.K < P:
        raise ConfigError(f"pipeline_workers={P} is more than the K={probe.K} blocks")
    costs = block_costs(probe)
    return PipelinePlan(ranges=tuple(partition(costs, P)), costs=tuple(costs), steps_per_epoch=spe,
                        total_steps=total, stop_at=stop_at, info=train.info)
