"""Run plumbing shared by the classification :class:`~manlearn.train.Trainer` and the dense
:class:`~manlearn.dense.DenseTrainer`.

Both trainers keep the same promises (exact resume, atomic ``last.pt``, no silent overwrite of an earlier
run, ``metrics.jsonl`` rewritten from the checkpoint's records on resume) and so share the code that keeps
them: the ``out_dir`` / checkpoint checks, the checkpoint fields common to both, the atomic save, the
restore of the optimiser / scaler / counters / RNG states, the step timing and throughput window, the
``metrics.jsonl`` records and the progress bar.  What differs (the model, the data, the evaluation, the
position in the run, the memory measure) stays in each trainer, behind the hooks listed on
:class:`TrainerBase`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from manlearn.config import config_to_dict, config_to_yaml
from manlearn.errors import CheckpointError

from manlearn.runtime import seed_everything
from .checkpoint import (CKPT_FORMAT, CKPT_VERSION, capture_rng_state, load_checkpoint, restore_rng_state,
                         save_checkpoint)
from .metrics import JsonlWriter, MetricLogger

__all__ = ["TrainerBase", "CKPT_NAME", "METRICS_NAME"]

CKPT_NAME = "last.pt"
METRICS_NAME = "metrics.jsonl"


class TrainerBase:
    """What every manlearn trainer does around its learner's step.

    Every trainer is built as ``Trainer(cfg, *, resume=False, overwrite=False, hooks=(), out=None)``:

    - ``cfg``: the run's configuration (validated by the trainer);
    - ``resume``: continue from ``<out_dir>/last.pt`` when it exists (a fresh run otherwise);
    - ``overwrite``: allow a fresh run in an ``out_dir`` that already holds a checkpoint;
    - ``hooks``: callables ``hook(trainer)`` run after every optimiser step (after any periodic
      checkpoint); tests use them to simulate a crash at a chosen step;
    - ``out``: where progress lines go (default stdout).

    A subclass sets ``cfg``, ``device``, ``learner``, ``optimizer``, ``scaler``, ``steps_per_epoch`` and
    ``_out`` and provides

    - ``_check_resumable(ckpt)``: refuse a checkpoint of another kind or configuration;
    - ``_extra_state()``: its own checkpoint fields (position, evaluation bookkeeping);
    - ``_restore_own(ckpt)``: the inverse of ``_extra_state`` (run after the modules are loaded);
    - ``_peak()``: the peak memory so far (bytes, or None where it is not measured);
    - ``_position()``, ``_window_stats()`` and ``_step_line(rec, lr, eta_s)``: its fields of a ``train``
      record of metrics.jsonl and the plain progress line made of one; ``_header()``: its first lines.
    """

    cfg: Any
    device: torch.device
    learner: Any
    optimizer: Any
    scaler: Any
    steps_per_epoch: int
    _out: Any
    _stop_at: int

    # ------------------------------------------------------------------ hooks
    def _is_main(self) -> bool:
        """Whether this process writes files and prints (data parallel: rank 0 only)."""
        return True

    def _check_resumable(self, ckpt: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _restore_own(self, ckpt: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _peak(self) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ set-up
    def _open_run(self, out_dir: str, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
        """Set the run's paths; return the (vetted) checkpoint to resume from, or None for a fresh run.

        Read before the expensive work so that a refusal is instant; a fresh run never silently
        replaces an earlier run's ``last.pt``.
        """
        self.out_dir = Path(out_dir)
        self.ckpt_path = self.out_dir / CKPT_NAME
        self.metrics_path = self.out_dir / METRICS_NAME
        self._bar: tqdm | None = None
        if resume and self.ckpt_path.exists():
            ckpt = load_checkpoint(self.ckpt_path)
            self._check_resumable(ckpt)
            return ckpt
        if resume:
            self._say(f"no checkpoint at {self.ckpt_path}; starting a new run")
        elif self.ckpt_path.exists() and not overwrite:
            raise CheckpointError(
                f"{self.out_dir} already holds a checkpoint ({CKPT_NAME}) of an earlier run; pass --resume to "
                "continue it, --overwrite to start over, or choose another out_dir")
        return None

    def _seed(self, seed: int) -> None:
        """Seed every RNG (the learner is built right after) and let cuDNN pick its fastest kernels."""
        seed_everything(seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _reset_counters(self) -> None:
        """The state of a run at step 0 (what :meth:`_restore` overwrites on resume)."""
        self.step = 0  # optimiser steps done
        self.records: list[dict[str, Any]] = []
        self.last_eval_step = -1
        self.meters = MetricLogger()  # running statistics (of the current epoch / log window)
        self.elapsed_before = 0.0
        self.train_time = 0.0
        self.steps_timed = 0
        self.peak_mem_saved: int | None = None
        self._win_time = 0.0
        self._win_images = 0
        self._t0 = time.perf_counter()

    def _start_from(self, ckpt: dict[str, Any] | None) -> None:
        """Last step of a trainer's construction: continue from ``ckpt`` (see :meth:`_open_run`), if any."""
        self.resumed = ckpt is not None
        if ckpt is not None:
            self._restore(ckpt)

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
            JsonlWriter(self.metrics_path).write(rec)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        import manlearn

        payload: dict[str, Any] = {
            "format": CKPT_FORMAT,
            "version": CKPT_VERSION,
            "manlearn_version": str(getattr(manlearn, "__version__", "?")),
            "torch_version": str(torch.__version__),
            "model": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "config": config_to_dict(self.cfg),
            "rng": capture_rng_state(),
            "metrics": self.records,
            "last_eval_step": self.last_eval_step,
            "meters": self.meters.state_dict(),
            "elapsed_s": self._elapsed(),
            "train_time_s": self.train_time,
            "steps_timed": self.steps_timed,
            "peak_mem_bytes": self._peak(),
        }
        payload.update(self._extra_state())
        if self.scaler is not None:
            payload["scaler"] = self.scaler.state_dict()
        return payload

    def save(self) -> Path:
        """Write ``<out_dir>/last.pt`` atomically."""
        return save_checkpoint(self.ckpt_path, self.state())

    def _restore(self, ckpt: dict[str, Any]) -> None:
        try:
            self.learner.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scaler is not None and "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self.ckpt_path} does not fit the model built from its config: {e}") from None
        self._restore_own(ckpt)
        self.records = list(ckpt.get("metrics", []))
        self.last_eval_step = int(ckpt.get("last_eval_step", -1))
        self.meters.load_state_dict(ckpt.get("meters", {}))
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        self.train_time = float(ckpt.get("train_time_s", 0.0))
        self.steps_timed = int(ckpt.get("steps_timed", 0))
        self.peak_mem_saved = ckpt.get("peak_mem_bytes")
        restore_rng_state(ckpt.get("rng", {}))

    def _spe_mismatch(self, saved: Any) -> CheckpointError:
        """The refusal for a checkpoint written with another number of steps per epoch."""
        return CheckpointError(
            f"checkpoint {self.ckpt_path} was written with {saved} steps per epoch, this run has "
            f"{self.steps_per_epoch}: the training set changed, so the run cannot be resumed exactly")

    # ------------------------------------------------------------------ the step
    def _set_lr(self, lr: float) -> Any:
        """Set the lr of every parameter group; return the loss scale to pass to the step (fp16) or None."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return self.scaler.scale(torch.ones((), device=self.device)) if self.scaler is not None else None

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _step_done(self, dt: float, n: int, loss: float, lr: float, img_s_fmt: str = ".0f") -> None:
        """Account a finished step of ``n`` images that took ``dt`` s: timers, throughput window, bar, log."""
        self.train_time += dt
        self.steps_timed += 1
        self._win_time += dt
        self._win_images += n
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", img_s=format(n / max(dt, 1e-9), img_s_fmt),
                                  refresh=False)
        if self.cfg.log_every and self.step % self.cfg.log_every == 0:
            self._log_step(lr)

    def _position(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _window_stats(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _step_line(self, rec: dict[str, Any], lr: float, eta_s: float) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _log_step(self, lr: float) -> None:
        """Record a ``train`` line in metrics.jsonl; without a progress bar on a terminal (logs, CI), also
        print it as a plain line with throughput, ETA and memory."""
        rec = {
            "type": "train", "step": self.step, **self._position(), "lr": lr,
            "losses": self._block_losses(window=True),
            **self._window_stats(),
            "peak_mem_bytes": self._peak(), "elapsed_s": self._elapsed(),
        }
        self._record(rec)
        if self._plain_progress():
            self._say(self._step_line(rec, lr, self._eta_s()))

    def _block_losses(self, window: bool) -> list[float]:
        """The per-block losses: over the log window (``window``) or the whole epoch."""
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

    def _eta_s(self) -> float:
        """Seconds left to ``_stop_at`` at the mean step time so far."""
        return max(self._stop_at - self.step, 0) * self.train_time / max(self.steps_timed, 1)

    # ------------------------------------------------------------------ fit
    def _header(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _begin_fit(self, stop_at: int, desc: str) -> None:
        """Write config.yaml, rewrite metrics.jsonl from the records of the state we start from (drops
        lines written after the checkpoint by a killed run, and those of an overwritten run), start the
        clock and the progress bar, print the header."""
        self._stop_at = stop_at
        if self._is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
            JsonlWriter(self.metrics_path).rewrite(self.records)
        self._t0 = time.perf_counter()
        show = bool(self.cfg.progress) and sys.stderr.isatty() and self._is_main()
        self._bar = tqdm(total=stop_at, initial=min(self.step, stop_at), disable=not show, unit="it",
                         dynamic_ncols=True, desc=desc, file=sys.stderr)
        self._header()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = None

    def _speed_summary(self) -> dict[str, Any]:
        """``seconds_per_iter`` (training steps only, over the whole run), ``images_per_s``, ``peak_mem_bytes``."""
        return {
            "seconds_per_iter": self.train_time / self.steps_timed if self.steps_timed else None,
            "images_per_s": (self.cfg.batch_size * self.steps_timed / self.train_time
                             if self.train_time > 0 else None),
            "peak_mem_bytes": self.peak_mem_saved,
        }

    def _end_summary(self, stopped: bool) -> dict[str, Any]:
        """``elapsed_s``, ``stopped_early``, ``out_dir``, ``checkpoint``."""
        return {
            "elapsed_s": self._elapsed(),
            "stopped_early": stopped,
            "out_dir": str(self.out_dir),
            "checkpoint": str(self.ckpt_path),
        }
