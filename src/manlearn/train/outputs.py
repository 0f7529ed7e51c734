"""Output folders: checked before any expensive work, guarded against silent overwrites, replaced atomically.

- :func:`check_writable_dir`: a folder a command will write into exists or can be made, is a folder, and
  takes a file — else one :class:`~manlearn.errors.OutputError` line naming the path and the cause.
- A run's files (:data:`RUN_FILES`) are guarded as a whole: an ``out_dir`` holding any of them belongs to an
  earlier run. ``--overwrite`` moves them aside (:data:`ASIDE`) when the new run starts; its first checkpoint
  removes them, and a run that fails before it puts them back (:func:`settle`, at the next start, does the
  same after a ``kill -9``). :func:`settle` also removes the temporary file of a checkpoint write that was
  killed midway.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from manlearn.errors import OutputError
from manlearn.files import os_error_text

__all__ = ["RUN_FILES", "ASIDE", "check_writable_dir", "present_run_files", "move_aside",
           "drop_aside", "restore_aside", "settle"]

RUN_FILES = ("last.pt", "metrics.jsonl", "config.yaml", "metrics.csv", "summary.json", "tb")
ASIDE = ".overwritten"  # the earlier run's files while an --overwrite run has not checkpointed yet


def check_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Make sure ``path`` is (or can be made) a folder that takes files; create it. OutputError otherwise."""
    path = Path(path)
    for p in (path, *path.parents):  # the deepest part that exists must be a folder
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "" if p == path else f" ({p} is in the way)"
                raise OutputError(f"{what} {path} cannot be used: {p} is a file, not a folder{where}")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".manlearn-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what} {path} is not writable: {os_error_text(e)}") from None
    return path


def present_run_files(out_dir: Path) -> list[str]:
    return [n for n in RUN_FILES if (out_dir / n).exists()]


def move_aside(out_dir: Path) -> bool:
    """Move the earlier run's files into ``out_dir/.overwritten`` (True when there were any)."""
    names = present_run_files(out_dir)
    if not names:
        return False
    aside = out_dir / ASIDE
    aside.mkdir(exist_ok=True)
    for n in names:  # last.pt first (RUN_FILES order): a kill in between leaves no new-looking last.pt
        os.replace(out_dir / n, aside / n)
    return True


def drop_aside(out_dir: Path) -> None:
    """The new run has a checkpoint: the earlier run's files go."""
    shutil.rmtree(out_dir / ASIDE, ignore_errors=True)


def remove_run_files(out_dir: Path, names: list[str]) -> None:
    """Remove the run files ``names`` (a start that failed before its first checkpoint)."""
    for n in names:
        p = out_dir / n
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink(missing_ok=True)


def restore_aside(out_dir: Path) -> bool:
    """The new run failed before its first checkpoint: put the earlier run's files back (True if there were)."""
    aside = out_dir / ASIDE
    if not aside.is_dir():
        return False
    for n in RUN_FILES:
        new = out_dir / n  # written by the failed run: goes, whether or not the earlier run had one
        if new.is_dir() and not new.is_symlink():
            shutil.rmtree(new, ignore_errors=True)
        elif new.exists():
            new.unlink()
        if (aside / n).exists():
            os.replace(aside / n, new)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def settle(out_dir: Path) -> list[str]:
    """Finish what a killed run left half-done in ``out_dir``; returns what was done, for the log."""
    done: list[str] = []
    if not out_dir.is_dir():
        return done
    if (out_dir / ASIDE).is_dir():
        if (out_dir / "last.pt").exists():  # the --overwrite run had checkpointed: it replaced the earlier run
            drop_aside(out_dir)
        elif restore_aside(out_dir):
            done.append(f"an --overwrite run killed before its first checkpoint: the earlier run's files in "
                        f"{out_dir} are restored")
    for tmp in out_dir.glob(".last.pt.*.tmp"):  # a checkpoint write killed midway (kill -9, power loss)
        try:
            tmp.unlink()
            done.append(f"removed {tmp.name}, left by a checkpoint write that was killed midway")
        except OSError:
            pass
    return done
