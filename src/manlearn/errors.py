"""Exceptions that carry a message meant for the user, not a traceback from deep inside; and the one-line
form in which a warning reaches the terminal."""

from pathlib import Path


class ManlearnError(ValueError):
    """Base class: a request manlearn refuses, with a message that says what is possible."""


class ConfigError(ManlearnError):
    """A model / method / split / option / config key that cannot be honoured."""


class DatasetError(ManlearnError):
    """A dataset that is missing, truncated or corrupt; the message says how to obtain it."""


class CheckpointError(ManlearnError):
    """A checkpoint that is unreadable or belongs to another configuration."""


class DivergenceError(ManlearnError):
    """Training diverged: a non-finite loss, gradient or weight (the message names the block and the step)."""


class OutputError(ManlearnError):
    """An output location that cannot be written (not a folder, no permission, no space)."""


class MissingExtraError(ManlearnError):
    """An optional dependency that is not installed; the message names the extra that brings it."""


def optional_import(module: str, extra: str, purpose: str):
    """Import an optional dependency, or refuse in one line naming ``pip install 'manlearn[extra]'``.

    Plots, COCO evaluation and two dataset readers need libraries that a plain install leaves out."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                                f"pip install 'manlearn[{extra}]'") from None


def refuse_clash(kind: str, name: str, existing: object, new: object, override: bool) -> None:
    """A registration under a built-in's name replaces it only when asked (``override=True``); anything else
    (re-importing a user's file, replacing one's own) goes through."""
    if existing is None or existing is new or override:
        return
    where = getattr(existing, "__module__", "") or ""
    if where.startswith("manlearn.") and getattr(new, "__module__", "") != where:
        raise ConfigError(f"{kind} {name!r} is built into manlearn ({where}); {getattr(new, '__module__', '?')} "
                          f"registers another under the same name: choose another name, or pass override=True "
                          "to replace the built-in")


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     line: str | None = None) -> str:
    """A ``warnings.formatwarning`` that puts a warning on one line: manlearn's own say what to do in their
    text; another library's keeps its category and where it came from, still on the same line."""
    text = " ".join(str(message).split())
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        return f"warning: {text}\n"
    return f"warning: {text} ({category.__name__}, {Path(filename).name}:{lineno})\n"
