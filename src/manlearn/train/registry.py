"""Tasks as plug-ins: a registered task owns its config section, its engine task and its run.

The CLI and the :class:`~manlearn.train.Trainer` reach a task only through this registry: no code
outside a task names it. A task is

- ``section``: its typed config section (``task.<key>`` on the command line, ``task:`` in YAML), a class
  whose ``name`` field defaults to the task's name;
- ``build(cfg, num_classes)``: the engine task object (final head, loss, predict, local head; see
  :class:`manlearn.tasks.Task`);
- ``learner_options(cfg, info)``: the data side of the :class:`~manlearn.LocalLearner` keywords (input
  channels and probe size, normalisation, split);
- ``run(cfg, device, train=True)``: the task run (data, batches, evaluation, metrics; see
  :mod:`manlearn.train.task_runs`);
- ``data_parallel`` / ``plannable``: whether torchrun data parallelism and ``manlearn plan`` cover it.

A file passed with ``--import`` may call :func:`register_task`; ``manlearn train --import FILE
task.name=NAME`` then trains it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from manlearn.config import register_task_section
from manlearn.errors import ConfigError, refuse_clash

__all__ = ["TaskSpec", "register_task", "get_task", "list_tasks"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    section: type
    build: Callable[[Any, int], Any]
    learner_options: Callable[[Any, Any], dict]
    run: Callable[..., Any]
    data_parallel: bool = False
    plannable: bool = False


_TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, *, section: type, build: Callable[[Any, int], Any],
                  learner_options: Callable[[Any, Any], dict], run: Callable[..., Any],
                  data_parallel: bool = False, plannable: bool = False, override: bool = False) -> TaskSpec:
    """Make ``task.name=<name>`` a task of the config, the CLI and the Trainer (see the module docstring); a
    built-in's name is refused unless ``override=True``."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a task needs a name, got {name!r}")
    for what, fn in (("build", build), ("learner_options", learner_options), ("run", run)):
        if not callable(fn):
            raise ConfigError(f"register_task({name!r}): {what} must be callable, got {type(fn).__name__}")
    old = _TASKS.get(name)
    refuse_clash("task", name, old.run if old is not None else None, run, override)
    register_task_section(name, section)
    spec = TaskSpec(name, section, build, learner_options, run, data_parallel, plannable)
    _TASKS[name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """The task ``name`` (the built-in ones are registered by :mod:`manlearn.train.task_runs`, which
    ``import manlearn.train`` loads)."""
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; registered tasks: {', '.join(list_tasks())} (a task of your "
                          "own: register it with manlearn.register_task in a file passed with --import)")
    return _TASKS[name]


def list_tasks() -> list[str]:
    return sorted(_TASKS)
