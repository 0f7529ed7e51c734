"""The training loop of every task: optimiser step, lr schedule, evaluation, metrics, checkpoints, resume.

The learner owns the modules and the local-learning step (forward, every local backward, EMA
updates); the task run (:mod:`manlearn.train.task_runs`) owns the data, the targets and the
evaluation metric; the trainer owns everything around them.  Its one hard promise is **exact
resume**: a run killed at any point and resumed from ``last.pt`` ends bit-identical (on CPU) to a
run that never stopped.  That is why

- the lr is a pure function of the global step (``schedule.lr_at``), not a scheduler object;
- the position is stored as (epoch, batch-within-epoch) and training batches depend only on
  (seed, epoch, batch index), so ``run.batches(e, b, ...)`` replays the rest of an epoch;
- the checkpoint carries parameters *and* buffers (EMA units, BN statistics), the optimiser state,
  the RNG states and the running epoch statistics;
- ``metrics.jsonl`` is rewritten from the checkpoint's records on resume, so lines written after
  the last checkpoint (and then redone) do not appear twice.

Checkpoints are atomic (``last.pt`` is replaced, never truncated), written at every epoch end, every
``ckpt_every_steps`` steps and at the end; a fresh run never silently replaces an earlier run's
``last.pt`` (``overwrite``); resuming with another model / optimisation config is refused
(:data:`~manlearn.train.RESUME_FREE_KEYS` may change).
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

import manlearn
from manlearn.config import TrainConfig, config_from_dict, config_to_dict, config_to_yaml, validate
from manlearn.distributed import GradReducer, average_buffers, broadcast_state
from manlearn.distributed.dist import SINGLE, setup_from_env
from manlearn.learner import LocalLearner
from manlearn.errors import CheckpointError, ConfigError, DivergenceError, ManlearnError
from manlearn.files import replace_text, write_failure
from manlearn.memory import PeakMemory, peak_rss_bytes
from manlearn.planning import check_plannable, plan_learner
from manlearn.recompute import checkpoint_granularity

from .build import amp_dtype, build_learner, resolve_device, seed_everything
from .callbacks import Callback, Callbacks
from .data_parallel import ShardedLoader, sharded_evaluate
from .checkpoint import (CKPT_FORMAT, CKPT_VERSION, capture_rng_state, check_resume_compatible, checkpoint_config,
                         eval_config, load_checkpoint, load_model_state, restore_rng_state, save_checkpoint)
from .interrupt import DeferredInterrupt, TrainingInterrupted
from .loader_run import LoaderRun
from .run_logs import CsvLog, SummaryJson, TensorBoardLog
from .registry import get_task
from .metrics import JsonlWriter, MetricLogger
from .outputs import (RUN_FILES, check_writable_dir, drop_aside, move_aside, present_run_files, remove_run_files,
                      restore_aside, settle)
from .optim import build_optimizer, trainable_parameters
from .schedule import lr_at, total_epochs, total_steps
from .task_runs import evaluate, make_task_run


__all__ = ["Trainer", "Callback", "evaluate", "evaluate_checkpoint", "CKPT_NAME", "METRICS_NAME", "LOOP_KEYS"]

CKPT_NAME = "last.pt"
METRICS_NAME = "metrics.jsonl"

#: The config keys a Trainer built from your objects takes as keywords: the loop's own (the learner, data
#: and device are yours).
LOOP_KEYS = frozenset({
    "iterations", "lr", "sgd_momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs", "warmup_lr",
    "lr_steps", "lr_gamma", "warmup_iters", "warmup_factor", "seed", "eval_every_epochs", "eval_every_steps",
    "ckpt_every_steps", "log_every", "progress", "nonfinite",
})


class Trainer:
    """The training loop of a :class:`~manlearn.LocalLearner`: optimiser step, lr schedule, evaluation,
    metrics, atomic checkpoints, exact resume, Ctrl-C saved.

    ``Trainer(learner, train_data, eval_data=None, ...)`` trains your own objects: ``train_data`` and
    ``eval_data`` are iterables of ``(inputs, targets)`` batches with a length (a
    ``torch.utils.data.DataLoader``, a list of batches); evaluation reports top-1 accuracy.

    - ``optimizer``: yours (its lr is the schedule's peak unless ``lr=`` is given; other parameter groups keep
      their lr's ratio to the first group's), or ``"sgd"`` /
      ``"adamw"`` / None to build one (SGD 0.9 Nesterov, wd 1e-4) over every trainable parameter;
    - ``out_dir``: where ``last.pt`` and ``metrics.jsonl`` go; ``epochs``, ``max_steps``: the length, and a
      cap on the steps of this call (the schedule is unchanged);
    - ``callbacks``: the loop's extension point (:mod:`manlearn.train.callbacks`): objects with
      ``on_step_end(trainer)``, ``on_eval_end(trainer, metrics)``, ``on_checkpoint(trainer, path)``,
      or functions called at each step's end;
    - ``resume``: continue from ``<out_dir>/last.pt`` when it exists; ``overwrite``: allow a fresh run in an
      ``out_dir`` that already holds one; ``out``: where progress lines go (default stdout);
    - ``settings``: the loop's config keys (:data:`LOOP_KEYS`: ``lr``, ``schedule``, ``seed``,
      ``eval_every_steps``, ``ckpt_every_steps``, ``log_every``, ``nonfinite``, ...).

    :meth:`from_config` builds everything from a :class:`~manlearn.config.TrainConfig` (``manlearn train``);
    launched by torchrun (``WORLD_SIZE > 1``) such a classification run trains data parallel.
    """

    def __init__(self, learner: LocalLearner, train_data: Iterable, eval_data: Iterable | None = None, *,
                 optimizer: torch.optim.Optimizer | str | None = None, out_dir: str | Path = "runs/fit",
                 epochs: int = 1, max_steps: int | None = None, callbacks: Iterable[Any] = (),
                 resume: bool = False, overwrite: bool = False, out: Any = None, **settings: Any) -> None:
        if not isinstance(learner, LocalLearner):
            raise ConfigError(f"Trainer(learner, train_data, ...) trains a manlearn.LocalLearner, got "
                              f"{type(learner).__name__}; to train from a config use Trainer.from_config(cfg)")
        device = _device_of(learner)
        cfg = _loop_config(learner, train_data, optimizer, out_dir, epochs, max_steps, device, settings)
        self._prepare(cfg, callbacks, out, origin="python")
        self.dist, self.device = SINGLE, device
        ckpt = self._open_run(cfg.out_dir, resume=resume, overwrite=overwrite)
        self.run = LoaderRun(learner, train_data, eval_data, device, cfg.seed)
        self.info = None
        self._check_steps()
        self.run.check_eval_data(learner)
        # fp16 needs a loss scaler (gradients underflow without one), as from_config gives a run with amp=fp16
        scaler = torch.amp.GradScaler(device.type) if learner.amp_dtype == torch.float16 else None
        self.learner, self.reducer, self.scaler = learner, None, scaler
        self.optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else build_optimizer(cfg, learner)
        self._grad_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._finish_init(ckpt)

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                    callbacks: Iterable[Any] = (), out: Any = None) -> "Trainer":
        """The Trainer of ``manlearn train``: the learner, data, optimiser and device described by ``cfg``
        (validated here; any task)."""
        self = cls.__new__(cls)
        cfg = validate(cfg)
        self._prepare(cfg, [*run_logs(), *Callbacks(callbacks).items], out, origin="config")
        if cfg.pipeline_workers:
            raise ConfigError("pipeline_workers is set: a block pipeline is run by "
                              "manlearn.train.pipeline.run_pipeline (or `manlearn train`), not by Trainer")
        self._setup_process(cfg)
        # Read (and vet) the checkpoint before the expensive work: a refusal should be instant.
        ckpt = self._open_run(cfg.out_dir, resume=resume, overwrite=overwrite)
        self._setup_data(cfg)
        self._setup_model(cfg, fresh=ckpt is None)
        self._finish_init(ckpt)
        return self

    def _prepare(self, cfg: TrainConfig, callbacks: Iterable[Any], out: Any, origin: str) -> None:
        self.cfg = cfg
        self.origin = origin  # "config" (built from a TrainConfig) or "python" (your objects)
        self._out = out if out is not None else sys.stdout
        self.callbacks = Callbacks(callbacks)
        self._bar: tqdm | None = None

    def _finish_init(self, ckpt: dict[str, Any] | None) -> None:
        # The schedule scales every parameter group's lr by the same factor: groups keep their ratio to the
        # first group's lr (your optimizer's, read before a checkpoint's lrs replace them), whose peak is cfg.lr.
        groups = self.optimizer.param_groups
        first = float(groups[0]["lr"])
        self._lr_ratios = [float(g["lr"]) / first if first > 0 else 1.0 for g in groups]
        self._reset_position()
        self.resumed = ckpt is not None
        if ckpt is not None:
            self._restore(ckpt)

    def _check_steps(self) -> None:
        self.steps_per_epoch = self.run.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size={self.cfg.batch_size} is larger than the {self.run.n_train} "
                              "training images (the last partial batch is dropped): nothing to train"
                              if self.origin == "config" else "train_data holds no batch: nothing to train")

    def _setup_process(self, cfg: TrainConfig) -> None:
        """Data parallel when launched by torchrun (WORLD_SIZE > 1): join the group, take this rank's
        device; otherwise a single process (``self.dist.enabled`` is False, nothing else changes)."""
        self.dist, self.device = setup_from_env(cfg.dist_backend, cfg.device, cfg.dist_timeout_s)
        if self.dist.enabled and not get_task(cfg.task.name).data_parallel:
            raise ConfigError(f"data parallel (torchrun) trains classification runs; a {cfg.task.name} run "
                              "runs in one process")
        if cfg.sync_bn and self.dist.enabled and self.device.type != "cuda":
            raise ConfigError("sync_bn=true needs CUDA devices (torch's SyncBatchNorm does not run on CPU); "
                              "on CPU each rank normalises over its own shard")
        amp_dtype(cfg.amp, self.device)  # refuse amp=fp16 on a CPU before loading anything

    def _setup_data(self, cfg: TrainConfig) -> None:
        self.run = make_task_run(cfg, self.device)
        self.info = self.run.info
        if self.dist.enabled:  # each rank trains on its slice of every global batch
            self.run.train_loader = ShardedLoader(self.run.train_loader, self.dist.rank, self.dist.world_size)
        self._check_steps()

    def _setup_model(self, cfg: TrainConfig, fresh: bool) -> None:
        """The learner (seeded: its init is repeatable), its data-parallel reducer, optimiser and scaler.
        A resumed run's weights come from its checkpoint: a pretrained file is read only for a fresh run."""
        seed_everything(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.learner = build_learner(cfg, self.info, self.device, load_pretrained=fresh)
        self.reducer: Any = None
        if self.dist.enabled:
            if cfg.sync_bn:
                self.learner = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.learner)
            broadcast_state(self.learner)  # identical start on every rank, whatever the seeding
            self.reducer = GradReducer(self.learner, self.dist.world_size)
        if cfg.compile:
            self.learner.compile_parts()  # blocks, auxiliary networks and head (LocalLearner.compile_parts)
        self.optimizer = build_optimizer(cfg, self.learner)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        self._grad_params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def _reset_position(self) -> None:
        """Position and history of a fresh run (what _restore overwrites on resume)."""
        self.step = 0  # optimiser steps done
        self.epoch = 0  # current epoch (0-based)
        self.batch = 0  # next batch index within the current epoch
        self.records: list[dict[str, Any]] = []
        self.last_eval_step = -1
        self.last_metrics: dict[str, Any] | None = None
        self.best: float | None = None  # best headline figure so far (accuracy, AP, mIoU)
        self.meters = MetricLogger()  # running statistics of the current epoch
        self.elapsed_before = 0.0
        self.train_time = 0.0
        self.steps_timed = 0
        self.images_timed = 0
        self.peak_mem_saved: int | None = None
        self.skipped = 0  # steps whose update was dropped for a non-finite loss / gradient (nonfinite=skip)
        self._saved_step: int | None = None  # the step of the checkpoint on disk written or read by this run
        self._intr: DeferredInterrupt | None = None  # Ctrl-C and SIGTERM deferred to step boundaries (fit)
        self._stop_agreed = False  # data parallel: some rank received SIGTERM (from the step's all-reduce)
        self._eval_pending = False  # an eval record interrupted by Ctrl-C: redone first on resume
        self._in_eval_record = False
        self._eval_interrupted = False
        self._win_time = 0.0
        self._win_images = 0
        self._win_skipped = 0  # steps skipped (nonfinite=skip) since the last step record
        self._pm: Any = None
        self._t0 = time.perf_counter()
        self._stop_at = total_steps(self.cfg, self.steps_per_epoch)

    @property
    def best_acc(self) -> float | None:
        """The best top-1 accuracy so far (tasks whose headline is accuracy), else None."""
        return self.best if self.run.headline == "acc" else None

    @property
    def last_test_acc(self) -> float | None:
        return (self.last_metrics or {}).get("acc") if self.run.headline == "acc" else None

    # ------------------------------------------------------------------ set-up
    def _is_main(self) -> bool:
        """Whether this process writes files and prints (data parallel: rank 0 only)."""
        return self.dist.is_main

    def _open_run(self, out_dir: str, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
        """Set the run's paths; return the (vetted) checkpoint to resume from, or None for a fresh run."""
        self.out_dir = Path(out_dir)
        self.ckpt_path = self.out_dir / CKPT_NAME
        self.metrics_path = self.out_dir / METRICS_NAME
        self._aside = False  # the earlier run's files are moved aside (an --overwrite run not yet checkpointed)
        self._replace_earlier = False
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite ask for opposite things (continue the run in out_dir / "
                              "replace it): pass one of them")
        if self._is_main():
            for line in settle(self.out_dir):  # what a killed run left half-done
                self._say(line)
            check_writable_dir(self.out_dir, "out_dir")
        if resume and self.ckpt_path.exists():
            ckpt = load_checkpoint(self.ckpt_path)
            check_resume_compatible(ckpt, self.cfg, self.ckpt_path)
            return ckpt
        if resume:
            existing = present_run_files(self.out_dir)
            if existing:  # another run's records with nothing to continue from: never dropped
                raise CheckpointError(
                    f"--resume: {self.out_dir} holds {', '.join(existing)} of another run but no checkpoint "
                    f"({CKPT_NAME}) to continue from; choose another out_dir, or --overwrite to replace that run")
            self._say(f"no checkpoint at {self.ckpt_path}; starting a new run")
        else:
            existing = present_run_files(self.out_dir)
            if existing and not overwrite:
                what = "a checkpoint (last.pt)" if CKPT_NAME in existing else f"{', '.join(existing)}"
                raise CheckpointError(
                    f"{self.out_dir} already holds {what} of an earlier run; pass --resume to continue it, "
                    "--overwrite to start over, or choose another out_dir")
            self._replace_earlier = bool(existing)
        return None

    # ------------------------------------------------------------------ output
    def _say(self, msg: str) -> None:
        if not self._is_main():
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(msg, file=self._out)
        else:
            print(msg, file=self._out, flush=True)

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0)

    def _record(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if self._is_main():
            try:
                JsonlWriter(self.metrics_path).write(rec)
            except OSError as e:
                raise write_failure(self.metrics_path, e, "write", self._kept()) from None

    @property
    def peak_mem_kind(self) -> str:
        """What :meth:`_peak` measures on this device for this task."""
        if self.device.type == "cuda":
            return "CUDA allocator peak"
        if self.run.track_activations and not self.cfg.compile:
            return "activations kept for backward, peak"
        return "process peak RSS"

    def _peak(self) -> int | None:
        cur: int | None = None
        # Measured when the allocator (CUDA) or the activation tracker (fit() decides) is on.
        if self._pm is not None and (self.device.type == "cuda" or self._pm.tracker is not None):
            cur = int(self._pm.peak_bytes)
        elif self.device.type == "cuda":
            cur = int(torch.cuda.max_memory_allocated(self.device))
        elif not self.run.track_activations:
            cur = peak_rss_bytes()
        vals = [v for v in (cur, self.peak_mem_saved) if v is not None]
        return max(vals) if vals else None

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        payload: dict[str, Any] = {
            "format": CKPT_FORMAT,
            "version": CKPT_VERSION,
            "manlearn_version": str(getattr(manlearn, "__version__", "?")),
            "torch_version": str(torch.__version__),
            "task": self.cfg.task.name,
            "origin": self.origin,
            "sources": self._sources(),
            "model": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "steps_per_epoch": self.steps_per_epoch,
            "config": config_to_dict(self.cfg),
            "rng": capture_rng_state(),
            "metrics": self.records,
            "last_eval_step": self.last_eval_step,
            "last_metrics": self.last_metrics,
            "best": self.best,
            "meters": self.meters.state_dict(),
            "elapsed_s": self._elapsed(),
            "train_time_s": self.train_time,
            "steps_timed": self.steps_timed,
            "images_timed": self.images_timed,
            "peak_mem_bytes": self._peak(),
            "nonfinite_skipped": self.skipped,
            "eval_pending": self._eval_pending,
            **self.run.checkpoint_fields(),
        }
        if self.run.headline == "acc":  # the names the pipeline's checkpoints use too
            payload["best_acc"], payload["last_test_acc"] = self.best_acc, self.last_test_acc
        if self.scaler is not None:
            payload["scaler"] = self.scaler.state_dict()
        return payload

    def _sources(self) -> dict[str, str]:
        """Which code each name of the run came from (a module of manlearn, or the user's)."""
        from manlearn.models.registry import model_source

        rule = getattr(self.learner, "rule", None)
        out = {"method": type(rule).__module__ if rule is not None else "?",
               "task": type(getattr(self.learner, "task", None)).__module__}
        if self.origin == "config":
            out["model"] = model_source(self.cfg.model)
        return out

    def save(self) -> Path:
        """Write ``<out_dir>/last.pt`` atomically (data parallel: every rank calls it, the BN
        statistics are averaged over the ranks, rank 0 writes)."""
        if self.dist.enabled:
            average_buffers(self.learner)
        self._check_finite_weights()  # never replace a finite checkpoint by a diverged one
        if self.dist.enabled and not self.dist.is_main:
            return self.ckpt_path
        try:
            path = save_checkpoint(self.ckpt_path, self.state())
        except OSError as e:  # no space, permissions...: one line; the previous last.pt is untouched
            raise write_failure(self.ckpt_path, e, "write the checkpoint", self._kept()) from None
        self._saved_step = self.step
        if self._aside:  # this run has a checkpoint now: the earlier run it replaces goes
            drop_aside(self.out_dir)
            self._aside = False
        self.callbacks.call("on_checkpoint", self, path)
        return path

    # ------------------------------------------------------------------ divergence
    def _kept(self) -> str:
        """What is on disk: the checkpoint this run last wrote (or resumed from), and its step."""
        if self._saved_step is not None:
            return f"{self.ckpt_path} (step {self._saved_step}) is kept"
        return "no checkpoint was written yet"

    def _param_names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.learner.named_parameters()}

    def _block_of(self, name: str) -> str:
        m = re.match(r"(blocks|auxes)\.(\d+)\.", name)
        if m:
            return f"block {int(m.group(2))}"
        return f"block {getattr(self.learner, 'K', 1) - 1}" if name.startswith("head.") else "the learner"

    def _nonfinite_grad(self) -> str | None:
        """None when every gradient is finite (one fused norm per tensor list, one host sync); else the name of
        the first parameter whose gradient is not."""
        grads = [p.grad for p in self._grad_params if p.grad is not None]
        if not grads:
            return None
        norms = torch._foreach_norm(grads, math.inf)  # max |g|: NaN or inf exactly when a value is (no overflow)
        if bool(torch.isfinite(torch.stack(norms)).all()):
            return None
        names = self._param_names()
        for p in self._grad_params:
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return names.get(id(p), "?")
        return "?"  # pragma: no cover

    def _check_finite_weights(self) -> None:
        state = [v for v in self.learner.state_dict().values() if v.is_floating_point()]
        if not state or bool(torch.isfinite(torch.stack(torch._foreach_norm(state, math.inf))).all()):
            return
        bad = next(n for n, v in self.learner.state_dict().items() if v.is_floating_point()
                   and not bool(torch.isfinite(v).all()))
        raise DivergenceError(f"training diverged before step {self.step}: the weight {bad} ({self._block_of(bad)}) is "
                              f"not finite, so it is not saved; {self._kept()}. Lower lr or lengthen the warm-up")

    def _step_state(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(the tensors a step changes outside the optimiser: buffers and frozen parameters such as MAN's ema
        units, copies of them now)."""
        live = [b for b in self.learner.buffers() if b.is_floating_point() or b.dtype == torch.long]
        live += [p for p in self.learner.parameters() if not p.requires_grad]
        with torch.no_grad():
            return live, [v.detach().clone() for v in live]

    def _nonfinite_step(self, losses: list[float], lr: float) -> bool:
        """Whether this step's losses and gradients are finite; a non-finite one stops the run (``nonfinite=stop``,
        :class:`DivergenceError`) or drops the step's update (``skip``, counted). fp16 with a gradient scaler
        leaves overflowing gradients to the scaler, which skips those steps itself."""
        if self.scaler is not None:
            return False
        bad = next((k for k, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:
            what = f"the loss of block {bad} is {losses[bad]}"
        else:
            name = self._nonfinite_grad()
            if name is None:
                return False
            what = f"the gradient of {name} ({self._block_of(name)}) is not finite"
        if self.cfg.nonfinite == "skip":
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            self._say(f"step {self.step + 1}: {what} (lr {lr:.4g}); update skipped, buffers and EMA units restored "
                      f"({self.skipped} skipped so far)")
            return True
        raise DivergenceError(f"training diverged at step {self.step + 1}: {what} (lr {lr:.4g}); {self._kept()}. "
                              "Lower lr or lengthen the warm-up (nonfinite=skip drops such steps instead)")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        try:
            self.learner.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scaler is not None and "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self.ckpt_path} does not fit the model built from its config: {e}") from None
        step, epoch, batch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch"])
        spe = self.steps_per_epoch
        if ckpt.get("steps_per_epoch", spe) != spe or batch > spe or step != epoch * spe + batch:
            raise CheckpointError(
                f"checkpoint {self.ckpt_path} was written with {ckpt.get('steps_per_epoch')} steps per epoch, "
                f"this run has {spe}: the training set changed, so the run cannot be resumed exactly")
        self.step, self.epoch, self.batch = step, epoch, batch
        self.last_metrics = ckpt.get("last_metrics")
        if self.last_metrics is None and ckpt.get("last_test_acc") is not None:  # an earlier version's
            self.last_metrics = {"acc": ckpt["last_test_acc"]}
        self.best = ckpt.get("best", ckpt.get("best_acc"))
        self.records = list(ckpt.get("metrics", []))
        self.last_eval_step = int(ckpt.get("last_eval_step", -1))
        self.meters.load_state_dict(ckpt.get("meters", {}))
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        self.train_time = float(ckpt.get("train_time_s", 0.0))
        self.steps_timed = int(ckpt.get("steps_timed", 0))
        self.images_timed = int(ckpt.get("images_timed", 0))
        self.peak_mem_saved = ckpt.get("peak_mem_bytes")
        self.skipped = int(ckpt.get("nonfinite_skipped", 0))
        self._eval_pending = bool(ckpt.get("eval_pending", False))
        self._saved_step = step
        restore_rng_state(ckpt.get("rng", {}))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, Any]:
        """The task's metrics now (classification: ``acc``; detection: ``AP``...; segmentation: ``miou``...);
        updates the last/best bookkeeping."""
        if not getattr(self.run, "evaluates", True):  # your objects, no eval_data
            return {}
        if self.dist.enabled:  # sharded over the ranks, counts summed: every rank gets the result
            average_buffers(self.learner)
            acc, correct, total = sharded_evaluate(self.learner, self.run.test_loader, self.dist, self.device)
            m: dict[str, Any] = {"acc": acc, "correct": correct, "total": total}
        else:
            try:
                with self._intr.immediate() if self._intr is not None else contextlib.nullcontext():
                    m = self.run.evaluate(self.learner)  # (Ctrl-C may stop an evaluation at once)
            except KeyboardInterrupt:
                self._eval_interrupted = True
                raise
        self.last_metrics = m
        self.last_eval_step = self.step
        head = m.get(self.run.headline)
        if head is not None and not (isinstance(head, float) and math.isnan(head)):
            if self.best is None or head > self.best:
                self.best = head
        self.callbacks.call("on_eval_end", self, m)
        return m

    def _eval_record(self) -> dict[str, Any]:
        """Evaluate now and record an ``eval`` line (an evaluation that is not part of an epoch's record)."""
        if not getattr(self.run, "evaluates", True):  # your objects, no eval_data
            self.last_eval_step = self.step
            return {}
        t = time.perf_counter()
        self._in_eval_record = True
        m = self.evaluate()
        self._in_eval_record = False
        rec = {"type": "eval", "step": self.step, "epoch": self.epoch + 1, "batch": self.batch,
               **self.run.record_fields(m, self.best), "eval_s": time.perf_counter() - t,
               "elapsed_s": self._elapsed()}
        self._record(rec)
        self._say(f"eval at step {self.step} ({self.run.n_eval} images, {rec['eval_s']:.1f} s): "
                  f"{self.run.eval_text(m)}")
        return m

    # ------------------------------------------------------------------ the step
    def _set_lr(self, lr: float) -> None:
        """Set the lr of every parameter group: ``lr`` for the first, the same fraction of their peak for the rest."""
        for group, ratio in zip(self.optimizer.param_groups, self._lr_ratios):
            group["lr"] = lr * ratio

    def _train_one(self, x: torch.Tensor, targets: Any, n: int) -> None:
        cfg = self.cfg
        lr = lr_at(cfg, self.step, self.steps_per_epoch)
        self._set_lr(lr)
        t = time.perf_counter()
        after = self.reducer.block_done if self.reducer is not None else None
        # nonfinite=skip: what the step changes besides the optimiser's update (BN statistics, EMA units), kept
        # to be put back if the step is skipped
        kept = self._step_state() if cfg.nonfinite == "skip" and self.scaler is None else None
        out = self.learner.train_step(x, targets, scaler=self.scaler, after_block=after)  # scaler: fp16 only
        counts = self.run.step_counts(out, targets, n)
        if self.reducer is not None:
            # Gradients averaged over the ranks (exactly once) before the step; the step's losses
            # and counts travel in the last bucket: [losses..., counts...].
            # A SIGTERM on any rank travels there too, so that every rank stops after the same step.
            stop = float(self._intr is not None and self._intr.requested)
            local = torch.tensor([*out.losses, *(float(c) for c in counts), stop], dtype=torch.float64,
                                 device=self.device)
            tot = self.reducer.finish(local).cpu()
            k = len(out.losses)
            losses = (tot[:k] / self.dist.world_size).tolist()
            counts = [round(float(c)) for c in tot[k:-1]]
            n = int(counts[-1])
            self._stop_agreed = float(tot[-1]) > 0
            if self._stop_agreed and self._intr is not None:
                self._intr.request(signal.SIGTERM)
        else:
            losses = [float(v) for v in out.losses]
            counts = [int(c.item()) if isinstance(c, torch.Tensor) else c for c in counts]  # syncs the device
        skipped = self._nonfinite_step(losses, lr)
        if skipped and kept is not None:
            torch._foreach_copy_(kept[0], kept[1])
            self._win_skipped += 1
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not skipped:
            self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t
        self.step += 1
        self.batch += 1
        if not skipped:
            self.meters.update(n=n, **self.run.step_stats(counts), **{f"loss{k}": v for k, v in enumerate(losses)})
        self.meters.update(time=dt, images=n)
        self.train_time += dt
        self.steps_timed += 1
        self.images_timed += n
        self._win_time += dt
        self._win_images += n
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.3g}", img_s=f"{n / max(dt, 1e-9):.1f}",
                                  refresh=False)
        if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == 1):
            self._log_step(lr)  # (and the run's first step: a short run is never silent)
        if cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0 and self.step < self._stop_at:
            self._eval_record()  # (the end of the run evaluates anyway; an epoch end reuses this one)
        if cfg.ckpt_every_steps and self.step % cfg.ckpt_every_steps == 0 and self.step < self._stop_at:
            self.save()
        self.callbacks.call("on_step_end", self)
        if self._stop_requested():
            self._stop_interrupted()

    # ------------------------------------------------------------------ Ctrl-C, SIGTERM
    def _stop_requested(self) -> bool:
        """Whether to stop at this step boundary: a signal was received (data parallel: on some rank, as agreed
        in the step's last all-reduce, so that every rank stops after the same step)."""
        if self._intr is None:
            return False
        return self._stop_agreed if self.dist.enabled else self._intr.requested

    def _stop_interrupted(self) -> None:
        """Ctrl-C or SIGTERM came during the step just completed: save that step (unless it is saved), stop."""
        if self._saved_step != self.step:
            self.save()
        intr = self._intr
        assert intr is not None
        raise TrainingInterrupted(f"{intr.reason()}: saved {self.ckpt_path} at step {self.step} (epoch "
                                  f"{self.epoch + 1}, batch {self.batch})", intr.exit_code)

    def _interrupted_elsewhere(self) -> TrainingInterrupted:
        """A KeyboardInterrupt that did not come through the step-boundary check: an evaluation stopped at once
        (the completed step is saved, that evaluation is redone on resume), or one raised where the state may
        be half-updated (nothing saved)."""
        reason = self._intr.reason() if self._intr is not None else "interrupted"
        code = self._intr.exit_code if self._intr is not None else 130
        if self._eval_interrupted:  # an evaluation changes nothing in the state until it returns
            self._eval_pending = self._in_eval_record
            self.save()
            return TrainingInterrupted(f"{reason} during the evaluation at step {self.step}: saved "
                                       f"{self.ckpt_path} at step {self.step} (epoch {self.epoch + 1}, batch "
                                       f"{self.batch})", code)
        return TrainingInterrupted(f"{reason} at step {self.step}; {self._kept()}", code,
                                   resumable=self._saved_step is not None)

    def _block_losses(self, window: bool) -> list[float]:
        """The per-block losses: over the recent steps (``window``) or the whole epoch."""
        keys = sorted((k for k in self.meters.meters if k.startswith("loss")), key=lambda k: int(k[4:]))
        return [self.meters[k].avg if window else self.meters[k].global_avg for k in keys]

    def _take_window_rate(self) -> float | None:
        """Images per second since the last log line; starts a new window."""
        rate = self._win_images / self._win_time if self._win_time > 0 else None
        self._win_time, self._win_images = 0.0, 0
        return rate

    def _plain_progress(self) -> bool:
        """Progress wanted but no bar on a terminal (logs, CI): print plain lines instead."""
        return bool(self.cfg.progress) and (self._bar is None or self._bar.disable)

    def _log_step(self, lr: float) -> None:
        """Record a ``train`` line in metrics.jsonl; without a progress bar on a terminal (logs, CI), also
        print it as a plain line with throughput, ETA and memory."""
        rec = {
            "type": "train", "step": self.step, "epoch": self.epoch + 1, "batch": self.batch, "lr": lr,
            "losses": self._block_losses(window=True),
            **self.run.window_fields(self.meters),
            "images_per_s": self._take_window_rate(), "seconds_per_iter": self.meters["time"].avg,
            "peak_mem_bytes": self._peak(), "elapsed_s": self._elapsed(), "skipped": self._win_skipped,
        }
        self._win_skipped = 0
        report = getattr(self.learner, "diagnostics", None)
        aux = report() if callable(report) else None
        if aux:
            rec["aux"] = aux  # e.g. MAN++'s s of every block over the run
        self._record(rec)
        if self._plain_progress():
            eta = max(self._stop_at - self.step, 0) * self.train_time / max(self.steps_timed, 1)
            peak = rec["peak_mem_bytes"]
            kind = {"CUDA allocator peak": "CUDA", "process peak RSS": "RSS"}.get(self.peak_mem_kind, "activations")
            mem = f"  peak {kind} {peak / 2**20:.0f} MiB" if peak else ""
            skipped = f" ({rec['skipped']} skipped)" if rec["skipped"] else ""
            self._say(f"step {self.step}/{self._stop_at}  {self.run.step_text(rec)}{skipped}  lr {lr:.4g}  "
                      f"{(rec['images_per_s'] or 0):.1f} img/s  {rec['seconds_per_iter']:.3f} s/it  "
                      f"ETA {eta / 60:.1f} min{mem}")

    def _end_epoch(self) -> None:
        cfg = self.cfg
        e = self.epoch
        every = cfg.eval_every_epochs
        due = (every > 0 and (e + 1) % every == 0) or e + 1 >= total_epochs(cfg, self.steps_per_epoch)
        m = None
        if self.last_eval_step == self.step:
            m = self.last_metrics
        elif due:
            m = self.evaluate()
        losses = self._block_losses(window=False)
        mt = self.meters.meters
        t_ep = mt["time"].total if "time" in mt else 0.0
        ips = mt["images"].total / t_ep if t_ep > 0 else None
        rec = {
            "type": "epoch", "epoch": e + 1, "step": self.step,
            "lr": lr_at(cfg, max(self.step - 1, 0), self.steps_per_epoch),
            "losses": losses, "loss": losses[-1] if losses else None,
            **self.run.window_fields(self.meters),
            **self.run.record_fields(m, self.best), "images_per_s": ips,
            "seconds_per_iter": t_ep / mt["time"].count if "time" in mt and mt["time"].count else None,
            "peak_mem_bytes": self._peak(), "elapsed_s": self._elapsed(), "skipped_steps": self.skipped,
        }
        self._record(rec)
        train_acc = f"  train_acc {rec['train_acc']:.4f}" if rec.get("train_acc") is not None else ""
        self._say(f"epoch {e + 1}/{total_epochs(cfg, self.steps_per_epoch)}  step {self.step}  "
                  f"loss {'-' if rec['loss'] is None else format(rec['loss'], '.4f')}{train_acc}  "
                  f"{self.run.eval_text(m)}  lr {rec['lr']:.4g}  "
                  f"{(ips or 0):.0f} img/s")
        self.epoch += 1
        self.batch = 0
        self.meters.reset()
        self._win_time, self._win_images = 0.0, 0
        self.save()
        if self._stop_requested():
            self._stop_interrupted()

    # ------------------------------------------------------------------ fit
    def _header(self) -> None:
        if self.origin == "python":
            self._say(self._objects_header())
        else:
            self._config_header()
        line = self._memory_line()
        if line:
            self._say(line)
        split = self._split_line() if self._is_main() else None
        if split:
            self._say(split)
        if self.dist.enabled:
            self._say(f"data parallel: {self.dist.world_size} ranks ({self.dist.backend}), global batch "
                      f"{self.cfg.batch_size} = {self.dist.world_size} x {self.cfg.batch_size // self.dist.world_size}"
                      + (", SyncBatchNorm" if self.cfg.sync_bn else ""))
        if self.resumed:
            self._say(f"resuming from {self.ckpt_path} at step {self.step} "
                      f"(epoch {self.epoch + 1}, batch {self.batch})")

    def _objects_header(self) -> str:
        lr_, cfg = self.learner, self.cfg
        n_params = sum(p.numel() for p in trainable_parameters(lr_))
        method = lr_.method + (f"/{lr_.base}" if lr_.base else "")
        total = total_steps(cfg, self.steps_per_epoch)
        length = f"{cfg.iterations} iterations" if cfg.iterations else f"{cfg.epochs} epochs"
        amp = f" amp {lr_.amp_dtype}" if lr_.amp_dtype is not None else ""
        return (f"manlearn: {type(lr_.task).__name__} {method} K={lr_.K} (split {lr_.split.source}) | "
                f"{self.run.describe()} | {total} steps ({length}) | optimizer {type(self.optimizer).__name__} | "
                f"device {self.device}{amp} | {n_params:,} trainable parameters | out_dir {self.out_dir}")

    def _config_header(self) -> None:
        cfg = self.cfg
        lr_ = self.learner
        n_params = sum(p.numel() for p in trainable_parameters(lr_))
        method = cfg.method + (f"/{lr_.base}" if getattr(lr_, "base", None) else "")
        if cfg.rule_options:  # e.g. DGL's own head: every DGL result names its head
            method += " " + ", ".join(f"{k}={v}" for k, v in cfg.rule_options.items())
        if cfg.fidelity != "default":
            method += f" fidelity={cfg.fidelity}"
        granularity = checkpoint_granularity(cfg.grad_checkpoint)  # the config is validated: never raises
        if granularity:
            method += f" grad_checkpoint={granularity}"
        widths = f" widths {cfg.task.model_widths}" if getattr(cfg.task, "model_widths", None) else ""
        if lr_.task.reads == "stages":
            cut = f"{type(lr_.task).__name__}, cuts {lr_.stage_cuts}"
        else:
            cut = f"split {lr_.split.source}"
        authors_k = getattr(getattr(lr_, "rule", None), "authors_k", None)  # AugLocal counts its K differently
        if callable(authors_k):
            cut += f"; the authors' K={authors_k(lr_.K)}"
        total = total_steps(cfg, self.steps_per_epoch)
        length = f"{cfg.iterations} iterations" if cfg.iterations else f"{cfg.epochs} epochs"
        self._say(f"manlearn {cfg.task.name}: {cfg.model}{widths} {method} K={getattr(lr_, 'K', cfg.K)} ({cut}) | "
                  f"{self.run.describe()} | {self.steps_per_epoch} steps/epoch, {total} steps ({length}) x batch "
                  f"{cfg.batch_size} | device {self.device}{'' if cfg.amp == 'off' else f' amp {cfg.amp}'} | "
                  f"{n_params:,} trainable parameters | "
                  f"out_dir {self.out_dir}")

    def _memory_line(self) -> str | None:
        """This configuration's counted memory beside E2E and E2E with per-unit checkpointing, at the run's
        (per-rank) batch (:mod:`manlearn.planning`); None for runs a plan does not cover."""
        cfg = self.cfg
        global_batch = getattr(self.run, "batch_size", cfg.batch_size)  # your data: the DataLoader's, if it has one
        if not self._is_main() or getattr(self.learner, "K", 1) < 2 or not global_batch:
            return None
        try:
            check_plannable(self.learner)
        except ConfigError:
            return None
        batch = max(1, global_batch // (self.dist.world_size if self.dist.enabled else 1))
        optimizer = cfg.optimizer if cfg.optimizer != "sgd" or cfg.sgd_momentum else "sgd-nomomentum"
        if self.origin == "python" and not isinstance(self.optimizer, torch.optim.SGD):
            optimizer = "adamw"  # your optimiser: counted as one with two state tensors per parameter
        size = self.learner.image_size
        hw = self.run.input_hw() if self.origin == "python" else None  # your data: counted at its size
        try:
            plan = plan_learner(self.learner, batch, optimizer=optimizer, baselines=("e2e", "e2e+ckpt:unit"),
                                breakdown=False, input_hw=hw)
        except Exception:  # a size your network does not take: the first step says why, in one line
            if hw is None or hw == (size, size):
                raise
            return None
        self._plan = plan
        return plan.comparison_line()

    def _split_line(self) -> str | None:
        """Which modules went into which block (and, when a plan was counted, each block's activation peak)."""
        lr_ = self.learner
        pieces = getattr(getattr(lr_, "split", None), "pieces", None)
        if not callable(pieces) or getattr(lr_, "K", 1) < 2:
            return None
        paths = list(getattr(lr_, "unit_paths", []))
        peaks = {b.index: b.peak_bytes for b in getattr(getattr(self, "_plan", None), "blocks", [])}
        parts = []
        for k, (has_stem, rng) in enumerate(pieces()):
            names = (["stem"] if has_stem else []) + [paths[j] if j < len(paths) else f"units.{j}" for j in rng]
            shown = ", ".join(names) if len(names) <= 2 else f"{names[0]} .. {names[-1]} ({len(names)})"
            peak = f" {peaks[k] / 2**20:.1f} MiB" if k in peaks else ""
            parts.append(f"{k}: {shown}{peak}")
        return "blocks" + (" (activation peak while each trains)" if peaks else "") + ": " + " | ".join(parts)

    def _next_stop(self, stop_at: int) -> int:
        """The step at which the current chunk of batches ends: the epoch's end, the run's stop, or the
        next periodic evaluation / checkpoint (so that a data-loader pass never outlives them)."""
        nxt = min(stop_at, self.step + self.steps_per_epoch - self.batch)
        for every in (self.cfg.ckpt_every_steps, self.cfg.eval_every_steps):
            if every:
                nxt = min(nxt, (self.step // every + 1) * every)
        return nxt

    def _begin_fit(self, stop_at: int) -> None:
        """config.yaml, and metrics.jsonl rewritten from the records of the state we start from (drops lines
        written after the checkpoint by a killed run, and those of an overwritten run); clock, bar, header."""
        if self._is_main():
            # what this start creates goes again if it fails before its first checkpoint (the same command
            # must then work; an --overwrite run's earlier files come back from aside)
            self._created = [] if self._saved_step is not None else \
                [n for n in RUN_FILES if self._replace_earlier or not (self.out_dir / n).exists()]
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                if self._replace_earlier:  # --overwrite: the earlier run stays aside until our first checkpoint
                    self._aside = move_aside(self.out_dir)
                    self._replace_earlier = False
                if self.origin == "config":  # your objects have no config that could rebuild them
                    replace_text(self.out_dir / "config.yaml", config_to_yaml(self.cfg))
                JsonlWriter(self.metrics_path).rewrite(self.records)
            except OSError as e:
                raise write_failure(self.out_dir, e, "write into") from None
        self._t0 = time.perf_counter()
        show = bool(self.cfg.progress) and sys.stderr.isatty() and self._is_main()
        self._bar = tqdm(total=stop_at, initial=min(self.step, stop_at), disable=not show, unit="it",
                         dynamic_ncols=True, desc=self.cfg.task.name if self.origin == "config" else "train",
                         file=sys.stderr)
        self._header()
        self.callbacks.call("on_fit_start", self)

    def _memory_meter(self) -> PeakMemory:
        # on CUDA the allocator peak is the measure; the per-tensor hooks would only slow the GPU step down
        track = self.device.type != "cuda" and not self.cfg.compile and self.run.track_activations
        return PeakMemory(self.device, exclude=list(self.learner.parameters()), track_activations=track)

    def _train_until(self, stop_at: int) -> None:
        """Steps (and epoch ends) until ``stop_at``, in chunks that end at evaluation / checkpoint steps."""
        spe = self.steps_per_epoch
        while True:
            if self.batch >= spe:  # the epoch's batches are done, its end not yet
                self._end_epoch()
                continue
            if self.step >= stop_at:
                return
            nxt, before = self._next_stop(stop_at), self.step
            for x, targets, n in self.run.batches(self.epoch, self.batch, self.batch + nxt - self.step):
                self._train_one(x, targets, n)
            if self.step == before:  # pragma: no cover - a task run that yields no batch
                raise RuntimeError(f"the training data gave no batch at epoch {self.epoch}, batch {self.batch}")

    def _summary(self, total: int) -> dict[str, Any]:
        cfg, spe, m, head = self.cfg, self.steps_per_epoch, self.last_metrics, self.run.headline
        base = getattr(self.learner, "base", None)
        summary: dict[str, Any] = {
            "task": cfg.task.name,
            "rule": f"{self.learner.method}+{base}" if base else self.learner.method,  # the base in use, not cfg's
            "metrics": m,
            "headline": (head, (m or {}).get(head)),
            "best": self.best,
            "steps": self.step,
            "epochs": self.epoch + (self.batch / spe if spe else 0.0),
            "seconds_per_iter": self.train_time / self.steps_timed if self.steps_timed else None,
            "images_per_s": self.images_timed / self.train_time if self.train_time > 0 else None,
            "peak_mem_bytes": self.peak_mem_saved,
            "peak_mem_kind": self.peak_mem_kind,
            "elapsed_s": self._elapsed(),
            "stopped_early": self.step < total,
            "skipped_steps": self.skipped,
            "out_dir": str(self.out_dir),
            "checkpoint": str(self.ckpt_path),
        }
        if self.run.headline == "acc":
            summary["test_acc"], summary["best_acc"] = self.last_test_acc, self.best_acc
        return summary

    def fit(self) -> dict[str, Any]:
        """Train until the schedule's length (``iterations``, else ``epochs``) or ``max_steps`` is reached,
        evaluate, checkpoint; return a summary dict.

        The summary holds ``task``, ``metrics`` (the last evaluation), ``headline`` (name, value),
        ``best``, ``steps``, ``epochs`` (fractional), ``seconds_per_iter`` (training steps only, over the
        whole run), ``images_per_s``, ``peak_mem_bytes`` with ``peak_mem_kind``, ``elapsed_s``,
        ``stopped_early``, ``out_dir`` and ``checkpoint``; classification adds ``test_acc`` and ``best_acc``.
        """
        total = total_steps(self.cfg, self.steps_per_epoch)
        stop_at = min(total, self.cfg.max_steps) if self.cfg.max_steps else total
        self._stop_at = stop_at
        # Ctrl-C and SIGTERM are deferred to step boundaries; a data-parallel rank defers SIGTERM only (Ctrl-C
        # under torchrun stops every rank at once, as before)
        self._intr = DeferredInterrupt(self._kept, (signal.SIGTERM,) if self.dist.enabled else
                                       (signal.SIGINT, signal.SIGTERM))
        try:
            try:
                with self._intr if self._intr is not None else contextlib.nullcontext():
                    self._fit_inner(stop_at)
            except TrainingInterrupted:
                raise
            except KeyboardInterrupt:
                raise self._interrupted_elsewhere() from None
        except BaseException as e:
            if self._is_main():  # e.g. the TensorBoard writer closes its files; the error itself goes on
                with contextlib.suppress(Exception):
                    self.callbacks.call("on_exception", self, e)
            if self._aside and restore_aside(self.out_dir):  # failed before its first checkpoint: undo
                self._aside = False
                self._say(f"the earlier run's files in {self.out_dir} are restored")
            elif self._saved_step is None and self._is_main():  # nothing to resume: no half-run left behind
                remove_run_files(self.out_dir, getattr(self, "_created", []))
            raise
        finally:
            self._intr = None
        summary = self._summary(total)
        if self._is_main():
            self.callbacks.call("on_fit_end", self, summary)
        return summary

    def _fit_inner(self, stop_at: int) -> None:
        self._begin_fit(stop_at)
        try:
            with self._memory_meter() as pm:
                self._pm = pm
                if self._eval_pending:  # the evaluation a Ctrl-C stopped before the checkpoint was written
                    self._eval_record()
                    self._eval_pending = False
                self._train_until(stop_at)
                peak = self._peak()
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None
            self._pm = None
        self.peak_mem_saved = peak
        if self.last_eval_step != self.step:
            self._eval_record()
        self.save()


def run_logs() -> list[Callback]:
    """The run outputs of ``manlearn train``: metrics.csv, summary.json, and TensorBoard events when installed."""
    logs: list[Callback] = [CsvLog(), SummaryJson()]
    try:
        logs.append(TensorBoardLog())
    except ManlearnError:  # not installed: the other outputs say the same
        pass
    return logs


def _device_of(learner: torch.nn.Module) -> torch.device:
    p = next(learner.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _loop_config(learner: LocalLearner, train_data: Any, optimizer: Any, out_dir: str | Path, epochs: int,
                 max_steps: int | None, device: torch.device, settings: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of a Trainer built from your objects: the loop's keys (checked, with did-you-mean), and
    what describes your learner (method, K) so that a resume with another one is refused."""
    import difflib

    unknown = sorted(set(settings) - LOOP_KEYS)
    if unknown:
        named = sorted(LOOP_KEYS | {"optimizer", "out_dir", "epochs", "max_steps", "callbacks", "resume",
                                    "overwrite", "out"})
        hints = [f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, named, n=1)) else "")
                 for k in unknown]
        raise ConfigError(f"Trainer got unknown keyword {', '.join(hints)}; the loop takes: {', '.join(named)}")
    values: dict[str, Any] = {**settings, "out_dir": str(out_dir), "epochs": epochs, "max_steps": max_steps or 0,
                              "method": learner.method, "K": learner.K, "device": str(device)}
    if learner.base:
        values["base"] = learner.base
    if isinstance(optimizer, str):
        values["optimizer"] = optimizer
    elif isinstance(optimizer, torch.optim.Optimizer):
        values.setdefault("lr", float(optimizer.param_groups[0]["lr"]))
    elif optimizer is not None:
        raise ConfigError(f"optimizer must be a torch.optim.Optimizer, 'sgd', 'adamw' or None, got "
                          f"{type(optimizer).__name__}")
    return validate(config_from_dict(values, check=False), registries=False)


def evaluate_checkpoint(path: str | Path, *, device: str = "auto", data_dir: str | None = None,
                        limit: int | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """``manlearn eval``: rebuild the learner of a checkpoint (any task; a run's folder means its ``last.pt``)
    from its config and evaluate it on its test / validation split (``limit``: the first N images).

    Returns ``{"task", "metrics", "cfg", "step", "n_eval", "line"}`` (``line``: the one-line report).
    """
    path = Path(path)
    if path.is_dir():  # a run's folder: its checkpoint, when it has one
        if not (path / CKPT_NAME).is_file():
            raise CheckpointError(f"{path} is a folder, not a checkpoint file, and holds no {CKPT_NAME}: give the "
                                  f"checkpoint file (e.g. {path / CKPT_NAME})")
        path = path / CKPT_NAME
    ckpt = load_checkpoint(path)
    if ckpt.get("origin") == "python":
        raise CheckpointError(f"{path} was trained from Python objects (Trainer(learner, data)): no config rebuilds "
                              "its learner; load it into yours with learner.load_state_dict(torch.load(path)['model'])")
    cfg = checkpoint_config(ckpt, path)
    cfg = eval_config(cfg, device=device, data_dir=data_dir, limit_key="eval_limit", limit=limit,
                      batch_size=batch_size)
    cfg = validate(cfg if limit is not None else cfg.model_copy(update={"eval_limit": None}))  # the whole set
    dev = resolve_device(cfg.device)
    note = ""
    if cfg.amp == "fp16" and dev.type != "cuda":  # an fp16 run of a GPU, evaluated here: in float32
        cfg, note = cfg.model_copy(update={"amp": "off"}), f" (trained with amp=fp16; evaluated in float32 on {dev})"
    run = make_task_run(cfg, dev, train=False)
    run.adopt_checkpoint(ckpt)
    learner = build_learner(cfg, run.info, dev, load_pretrained=False)
    load_model_state(learner, ckpt, path)
    m = run.evaluate(learner)
    step = int(ckpt["step"])
    return {"task": cfg.task.name, "metrics": m, "cfg": cfg, "step": step, "n_eval": run.n_eval,
            "line": run.eval_summary(m, step) + note}
