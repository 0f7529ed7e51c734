"""Importing a user's own code (rules, tasks, models) so that registries see it by name.

``manlearn --import my_rules.py train method=my-rule`` and the config key ``imports`` both come here. A
spec is a module name importable from the current directory (``my_package.rules``) or a path to a ``.py``
file. Registering happens as a side effect of the import (``@manlearn.register_rule``,
``@manlearn.register_model``), exactly as for manlearn's own modules.

A run records each imported file by its absolute path and its content's digest (:func:`file_digests`), so
that ``manlearn eval`` and ``--resume`` import it again from any directory and say when it changed since
(a warning: the code now in the file is what runs) or vanished (refused: nothing could rebuild the run).
They check the digests once, where they first read the run's record (``checkpoint_config``, the CLI's
``--resume``); later imports of the same files only find them registered.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterable, Mapping

from .errors import ConfigError

__all__ = ["import_user_code", "file_digests"]


def _digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def file_digests(specs: Iterable[str]) -> dict[str, str]:
    """The content digest of every ``.py`` file among ``specs`` (module names have none)."""
    return {str(s): _digest(Path(s)) for s in specs if str(s).endswith(".py") and Path(s).is_file()}


def _import_file(path: Path) -> ModuleType:
    name = f"manlearn_user_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


def import_user_code(specs: Iterable[str], recorded: Mapping[str, str] | None = None) -> list[ModuleType]:
    """Import every spec (module name or ``.py`` path), in order; refuse a missing one clearly.

    ``recorded``: the digests a run recorded for its files (:func:`file_digests`): a file that changed since
    is imported with a warning, a file that is gone is refused with a line saying so.
    An exception raised by the user's module itself is left alone (its traceback is the useful part).
    """
    recorded = recorded or {}
    modules = []
    for spec in specs:
        spec = str(spec).strip()
        if not spec:
            continue
        path = Path(spec)
        if spec.endswith(".py") or path.suffix == ".py":
            if not path.is_file():
                if spec in recorded:
                    raise ConfigError(f"the run imported {spec} ({recorded[spec]}), which is gone: put the file "
                                      "back there to rebuild the run's rules, models or tasks")
                raise ConfigError(f"--import {spec}: no such file")
            if spec in recorded and _digest(path) != recorded[spec]:
                warnings.warn(f"{spec} changed since the run imported it ({recorded[spec]}, now {_digest(path)}): "
                              "the code now in the file is used", stacklevel=2)
            modules.append(_import_file(path))
            continue
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            modules.append(importlib.import_module(spec))
        except ModuleNotFoundError as e:
            if e.name and spec.startswith(e.name):
                raise ConfigError(f"--import {spec}: no module named {e.name!r} (give a module importable from the "
                                  "current directory or a path to a .py file)") from None
            raise
    return modules
