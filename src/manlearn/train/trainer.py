"""The training loop: optimiser step, lr schedule, evaluation, metrics, checkpoints, resume.

The learner owns the modules and the local-learning step (forward, every local backward, EMA
updates); the trainer owns everything around it.  Its one hard promise is **exact resume**: a run
killed at any point and resumed from ``last.pt`` ends bit-identical (on CPU) to a run that never
stopped.  That is why

- the lr is a pure function of the global step (``schedule.lr_at``), not a scheduler object;
- the position is stored as (epoch, batch-within-epoch) and training batches depend only on
  (seed, epoch, batch index), so ``loader.epoch(e, start_batch=b)`` replays the rest of an epoch;
- the checkpoint carries parameters *and* buffers (EMA units, BN statistics), the optimiser state,
  the RNG states and the running epoch statistics;
- ``metrics.jsonl`` is rewritten from the checkpoint's records on resume, so lines written after
  the last checkpoint (and then redone) do not appear twice.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from manlearn.config import TrainConfig, validate
from manlearn.errors import ConfigError

from .build import amp_dtype, build_learner, load_split, make_loader
from .checkpoint import check_resume_compatible
from .optim import build_optimizer, trainable_parameters
from .run import CKPT_NAME, METRICS_NAME, TrainerBase
from .schedule import lr_at, total_steps

try:  # the memory accounting is optional: the trainer works without it
    from manlearn.memory import PeakMemory
except ImportError:  # pragma: no cover
    PeakMemory = None  # type: ignore[assignment,misc]

__all__ = ["Trainer", "evaluate", "StepHook", "CKPT_NAME", "METRICS_NAME"]

#: Called after every optimiser step (after any periodic checkpoint) with the trainer.
StepHook = Callable[["Trainer"], None]


@torch.no_grad()
def evaluate(learner: torch.nn.Module, loader: Any) -> tuple[float, int, int]:
    """Top-1 accuracy of ``learner`` (backbone + head only) over one pass of ``loader``.

    Returns ``(accuracy, correct, total)``.  The learner is put in eval mode and restored to its
    previous mode afterwards; nothing in it changes (no BN statistics, no RNG draws).
    """
    was_training = learner.training
    learner.eval()
    correct: torch.Tensor | int = 0
    total = 0
    try:
        for x, y in loader.epoch(0):
            logits = learner(x)
            correct = correct + (logits.argmax(dim=1) == y).sum()
            total += int(y.numel())
    finally:
        learner.train(was_training)
    n = int(correct) if isinstance(correct, int) else int(correct.item())
    return (n / total if total else math.nan), n, total



class Trainer(TrainerBase):
    """Train a :class:`~manlearn.LocalLearner` as described by a :class:`TrainConfig`.

    The arguments (``cfg``, ``resume``, ``overwrite``, ``hooks``, ``out``) are those of every manlearn
    trainer, described on :class:`~manlearn.train.run.TrainerBase`.  Launched by torchrun
    (``WORLD_SIZE > 1``) it trains data parallel.
    """

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                 hooks: Iterable[StepHook] = (), out: Any = None) -> None:
        self.cfg = validate(cfg)
        self._out = out if out is not None else sys.stdout
        self.hooks: list[StepHook] = list(hooks)
        # Data parallel when launched by torchrun (WORLD_SIZE > 1): join the group, take this rank's
        # device; otherwise a single process (self.dist.enabled is False, nothing else changes).
        if cfg.pipeline_workers:
            raise ConfigError("pipeline_workers is set: a block pipeline is run by "
                              "manlearn.train.pipeline.run_pipeline (or `manlearn train`), not by Trainer")
        from manlearn.distributed.dist import setup_from_env

        self.dist, self.device = setup_from_env(cfg.dist_backend, cfg.device, cfg.dist_timeout_s)
        if cfg.sync_bn and self.dist.enabled and self.device.type != "cuda":
            raise ConfigError("sync_bn=true needs CUDA devices (torch's SyncBatchNorm does not run on CPU); "
                              "on CPU each rank normalises over its own shard")
        amp_dtype(cfg.amp, self.device)  # refuse amp on a CPU before loading anything
        # Read (and vet) the checkpoint before the expensive work: a refusal should be instant.
        ckpt = self._open_run(cfg.out_dir, resume=resume, overwrite=overwrite)

        self.train_data = load_split(cfg, "train", cfg.train_limit)
        self.test_data = load_split(cfg, "test", cfg.test_limit)
        self.info = self.train_data.info
        self.train_loader = make_loader(cfg, self.train_data, train=True, device=self.device)
        self.test_loader = make_loader(cfg, self.test_data, train=False, device=self.device)
        if self.dist.enabled:  # each rank trains on its slice of every global batch
            from .data_parallel import ShardedLoader

            self.train_loader = ShardedLoader(self.train_loader, self.dist.rank, self.dist.world_size)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {len(self.train_data)} "
                              "training images (the last partial batch is dropped): nothing to train")

        self._seed(cfg.seed)
        self.learner = build_learner(cfg, self.info, self.device)
        self.reducer: Any = None
        if self.dist.enabled:
            from manlearn.distributed import GradReducer, broadcast_state

            if cfg.sync_bn:
                self.learner = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.learner)
            broadcast_state(self.learner)  # identical start on every rank, whatever the seeding
            self.reducer = GradReducer(self.learner, self.dist.world_size)
        if cfg.compile:
            self._compile()
        self.optimizer = build_optimizer(cfg, self.learner)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

        # Position and history.
        self._reset_counters()
        self.epoch = 0  # current epoch (0-based)
        self.batch = 0  # next batch index within the current epoch
        self.best_acc: float | None = None
        self.last_test_acc: float | None = None
        self._pm: Any = None
        self._start_from(ckpt)

    def _compile(self) -> None:
        """``torch.compile`` the blocks, auxiliary networks and head (see LocalLearner.compile_parts)."""
        self.learner.compile_parts()

    # ------------------------------------------------------------------ output
    def _is_main(self) -> bool:
        return self.dist.is_main

    def _peak(self) -> int | None:
        cur: int | None = None
        # Measured when the allocator (CUDA) or the activation tracker (fit() decides) is on.
        if self._pm is not None and (self.device.type == "cuda" or self._pm.tracker is not None):
            cur = int(self._pm.peak_bytes)
        elif self.device.type == "cuda":
            cur = int(torch.cuda.max_memory_allocated(self.device))
        vals = [v for v in (cur, self.peak_mem_saved) if v is not None]
        return max(vals) if vals else None

    # ------------------------------------------------------------------ checkpoints
    def _check_resumable(self, ckpt: dict[str, Any]) -> None:
        check_resume_compatible(ckpt, self.cfg, self.ckpt_path)

    def _extra_state(self) -> dict[str, Any]:
        """The position as (epoch, batch) and the accuracy bookkeeping (see module docstring)."""
        return {"epoch": self.epoch, "batch": self.batch, "best_acc": self.best_acc,
                "last_test_acc": self.last_test_acc}

    def save(self) -> Path:
        """Write ``<out_dir>/last.pt`` atomically (data parallel: every rank calls it, the BN
        statistics are averaged over the ranks, rank 0 writes)."""
        if self.dist.enabled:
            from manlearn.distributed import average_buffers

            average_buffers(self.learner)
            if not self.dist.is_main:
                return self.ckpt_path
        return super().save()

    def _restore_own(self, ckpt: dict[str, Any]) -> None:
        step, epoch, batch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch"])
        spe = self.steps_per_epoch
        if ckpt.get("steps_per_epoch", spe) != spe or batch > spe or step != epoch * spe + batch:
            raise self._spe_mismatch(ckpt.get("steps_per_epoch"))
        self.step, self.epoch, self.batch = step, epoch, batch
        self.best_acc = ckpt.get("best_acc")
        self.last_test_acc = ckpt.get("last_test_acc")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> float:
        """Test accuracy now; updates the best/last accuracy bookkeeping."""
        if self.dist.enabled:  # sharded over the ranks, counts summed: every rank gets the result
            from manlearn.distributed import average_buffers

            from .data_parallel import sharded_evaluate

            average_buffers(self.learner)
            acc, _, _ = sharded_evaluate(self.learner, self.test_loader, self.dist, self.device)
        else:
            acc, _, _ = evaluate(self.learner, self.test_loader)
        self.last_test_acc = acc
        self.last_eval_step = self.step
        if self.best_acc is None or acc > self.best_acc:
            self.best_acc = acc
        return acc

    # ------------------------------------------------------------------ the loop
    def _train_one(self, x: torch.Tensor, y: torch.Tensor) -> None:
        cfg = self.cfg
        lr = lr_at(cfg, self.step, self.steps_per_epoch)
        scale = self._set_lr(lr)
        t = time.perf_counter()
        hook = self.reducer.block_done if self.reducer is not None else None
        out = self.learner.train_step(x, y, grad_scale=scale, after_block=hook)
        n = int(y.numel())
        if self.reducer is not None:
            # Gradients averaged over the ranks (exactly once) before the step; the step's losses
            # and correct count travel in the last bucket: [losses..., correct, n].
            local = torch.tensor([*out.losses, float((out.logits.argmax(dim=1) == y).sum()), float(n)],
                                 dtype=torch.float64, device=self.device)
            tot = self.reducer.finish(local).cpu()
            out.losses[:] = (tot[:-2] / self.dist.world_size).tolist()
            correct, n = int(round(float(tot[-2]))), int(round(float(tot[-1])))
        self._optimizer_step()
        if self.reducer is None:
            correct = int((out.logits.argmax(dim=1) == y).sum().item())  # also syncs the device
        dt = time.perf_counter() - t
        self.step += 1
        self.batch += 1
        self.meters.update(n=n, acc=correct / n, **{f"loss{k}": v for k, v in enumerate(out.losses)})
        self.meters.update(time=dt, images=n)
        self._step_done(dt, n, out.losses[-1], lr)
        if cfg.ckpt_every_steps and self.step % cfg.ckpt_every_steps == 0:
            self.save()
        for hook in self.hooks:
            hook(self)

    def _position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch}

    def _window_stats(self) -> dict[str, Any]:
        return {"train_acc": self.meters["acc"].global_avg, "images_per_s": self._take_window_rate()}

    def _step_line(self, rec: dict[str, Any], lr: float, eta_s: float) -> str:
        peak = rec["peak_mem_bytes"]
        mem = f"  peak mem {peak / 2**20:.0f} MiB" if peak else ""
        return (f"step {self.step}/{self._stop_at}  loss {rec['losses'][-1]:.4f}  lr {lr:.4g}  "
                f"{(rec['images_per_s'] or 0):.0f} img/s  ETA {eta_s / 60:.1f} min{mem}")

    def _end_epoch(self) -> None:
        cfg = self.cfg
        e = self.epoch
        do_eval = (cfg.eval_every > 0 and (e + 1) % cfg.eval_every == 0) or e + 1 >= cfg.epochs
        test_acc = self.evaluate() if do_eval else None
        losses = self._block_losses(window=False)
        m = self.meters.meters
        t_ep = m["time"].total if "time" in m else 0.0
        ips = m["images"].total / t_ep if t_ep > 0 else None
        rec = {
            "type": "epoch", "epoch": e + 1, "step": self.step,
            "lr": lr_at(cfg, max(self.step - 1, 0), self.steps_per_epoch),
            "losses": losses, "loss": losses[-1] if losses else None,
            "train_acc": m["acc"].global_avg if "acc" in m else None,
            "test_acc": test_acc, "best_acc": self.best_acc, "images_per_s": ips,
            "seconds_per_iter": t_ep / m["time"].count if "time" in m and m["time"].count else None,
            "peak_mem_bytes": self._peak(), "elapsed_s": self._elapsed(),
        }
        self._record(rec)
        acc_s = f"{test_acc:.4f}" if test_acc is not None else "-"
        self._say(f"epoch {e + 1}/{cfg.epochs}  step {self.step}  loss {rec['loss']:.4f}  "
                  f"train_acc {rec['train_acc']:.4f}  test_acc {acc_s}  lr {rec['lr']:.4g}  "
                  f"{(ips or 0):.0f} img/s")
        self.epoch += 1
        self.batch = 0
        self.meters.reset()
        self._win_time, self._win_images = 0.0, 0
        self.save()

    def _header(self) -> None:
        cfg = self.cfg
        lr_ = self.learner
        n_params = sum(p.numel() for p in trainable_parameters(lr_))
        method = cfg.method + (f"/{cfg.base}" if cfg.method in ("man", "manpp") else "")
        split = getattr(getattr(lr_, "split", None), "source", cfg.split)
        self._say(f"manlearn: {cfg.model} {method} K={getattr(lr_, 'K', cfg.K)} (split {split}) | "
                  f"{cfg.dataset}: {len(self.train_data)} train / {len(self.test_data)} test | "
                  f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs | device {self.device} | "
                  f"{n_params:,} trainable parameters | out_dir {self.out_dir}")
        if self.dist.enabled:
            self._say(f"data parallel: {self.dist.world_size} ranks ({self.dist.backend}), global batch "
                      f"{cfg.batch_size} = {self.dist.world_size} x {cfg.batch_size // self.dist.world_size}"
                      + (", SyncBatchNorm" if cfg.sync_bn else ""))
        if self.resumed:
            self._say(f"resuming from {self.ckpt_path} at step {self.step} "
                      f"(epoch {self.epoch + 1}, batch {self.batch})")

    def fit(self) -> dict[str, Any]:
        """Train until ``epochs`` are done or ``max_steps`` is reached; return a summary dict.

        The summary holds ``test_acc`` (final), ``best_acc``, ``steps``, ``epochs``,
        ``seconds_per_iter`` (training steps only, over the whole run), ``images_per_s``,
        ``peak_mem_bytes``, ``elapsed_s``, ``stopped_early`` and the checkpoint path.
        """
        cfg = self.cfg
        spe = self.steps_per_epoch
        total = total_steps(cfg, spe)
        stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
        self._begin_fit(stop_at, "train")
        mem: Any = contextlib.nullcontext()
        if PeakMemory is not None:
            mem = PeakMemory(self.device, exclude=list(self.learner.parameters()),
                             # on CUDA the allocator peak is the measure; the per-tensor hooks would
                             # only slow the GPU step down
                             track_activations=self.device.type != "cuda" and not cfg.compile)
        stopped = False
        try:
            with mem as pm:
                self._pm = pm
                while self.epoch < cfg.epochs:
                    if self.batch < spe:
                        if self.step >= stop_at:
                            stopped = True
                            break
                        for x, y in self.train_loader.epoch(self.epoch, start_batch=self.batch):
                            self._train_one(x, y)
                            if self.step >= stop_at:
                                break
                        if self.batch < spe:
                            stopped = True
                            break
                    self._end_epoch()
                peak = self._peak()
        finally:
            self._close_bar()
            self._pm = None
        self.peak_mem_saved = peak
        if self.last_eval_step != self.step:
            acc = self.evaluate()
            self._record({"type": "final", "epoch": self.epoch, "step": self.step, "test_acc": acc,
                          "best_acc": self.best_acc, "elapsed_s": self._elapsed()})
        self.save()
        return {
            "test_acc": self.last_test_acc,
            "best_acc": self.best_acc,
            "steps": self.step,
            "epochs": self.epoch + (self.batch / spe if spe else 0.0),
            **self._speed_summary(),
            **self._end_summary(stopped),
        }
