"""Importing a user's own code (rules, tasks, models) so that registries see it by name.

``manlearn --import my_rules.py train method=my-rule`` and the config key ``imports`` both come here. A
spec is a module name importable from the current directory (``my_package.rules``) or a path to a ``.py``
file. Registering happens as a side effect of the import (``@manlearn.register_rule``,
``@manlearn.register_model``), exactly as for manlearn's own modules.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable

from .errors import ConfigError

__all__ = ["import_user_code"]


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


def import_user_code(specs: Iterable[str]) -> list[ModuleType]:
    """Import every spec (module name or ``.py`` path), in order; refuse a missing one clearly.

    An exception raised by the user's module itself is left alone (its traceback is the useful part).
    """
    modules = []
    for spec in specs:
        spec = str(spec).strip()
        if not spec:
            continue
        path = Path(spec)
        if spec.endswith(".py") or path.suffix == ".py":
            if not path.is_file():
                raise ConfigError(f"--import {spec}: no such file")
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
