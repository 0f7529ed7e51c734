"""Callbacks: the training loop's one extension point (logging, early stopping, your own code).

A callback is an object with any of these methods; the :class:`~manlearn.train.Trainer` calls them in the
order the callbacks were given. A plain function is taken as ``on_step_end``.

- ``on_step_end(trainer)``: after every optimiser step (and after that step's periodic evaluation and
  checkpoint); ``trainer.step``, ``trainer.epoch``, ``trainer.records`` are current;
- ``on_eval_end(trainer, metrics)``: after every evaluation, with its metrics (``{"acc": ...}``);
- ``on_checkpoint(trainer, path)``: after ``last.pt`` was written (atomically) to ``path``;
- ``on_fit_start(trainer)`` / ``on_fit_end(trainer, summary)``: around ``fit()`` (the run's files are open;
  ``summary`` is what ``fit()`` returns);
- ``on_exception(trainer, error)``: ``fit()`` ends with ``error`` instead (an interruption, a refusal, a
  divergence): close what ``on_fit_start`` opened; the error is raised on afterwards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from manlearn.errors import ConfigError

__all__ = ["Callback", "Callbacks"]

HOOKS = ("on_step_end", "on_eval_end", "on_checkpoint", "on_fit_start", "on_fit_end", "on_exception")


class Callback:
    """Base class with every hook a no-op: override the ones you need."""

    def on_step_end(self, trainer: Any) -> None:
        pass

    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        pass

    def on_fit_start(self, trainer: Any) -> None:
        pass

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        pass

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        pass


class _StepFunction(Callback):
    def __init__(self, fn: Callable[[Any], None]) -> None:
        self.fn = fn

    def on_step_end(self, trainer: Any) -> None:
        self.fn(trainer)


class Callbacks:
    """The callbacks of one run, called in order."""

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        self.items: list[Any] = []
        if isinstance(callbacks, Callback) or callable(callbacks):
            callbacks = [callbacks]  # one callback (or class), not in a list
        elif isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
            raise ConfigError(f"callbacks must be a list of callbacks, got {type(callbacks).__name__}")
        for cb in callbacks:
            if isinstance(cb, type):
                raise ConfigError(f"callbacks: {cb.__name__} is a class; pass an instance, {cb.__name__}()")
            if not any(callable(getattr(cb, h, None)) for h in HOOKS):
                if not callable(cb):
                    raise ConfigError(f"a callback needs one of {', '.join(HOOKS)} (or is a function called at "
                                      f"each step's end), got {type(cb).__name__}")
                cb = _StepFunction(cb)
            self.items.append(cb)

    def call(self, hook: str, *args: Any) -> None:
        for cb in self.items:
            fn = getattr(cb, hook, None)
            if callable(fn):
                fn(*args)
