"""Ctrl-C during training: stop at the next step boundary, save, say where; a second Ctrl-C exits at once.

Python raises KeyboardInterrupt wherever the interpreter happens to be when SIGINT arrives — inside a
saved-tensor hook, a ``__del__``, a weak-reference callback — and an exception raised in a finaliser is
printed and swallowed, so the run would go on.  While :class:`DeferredInterrupt` is active, the first
SIGINT only sets a flag, which the trainer reads between steps (and after a save): the step in flight
finishes, the state of that completed step is saved atomically, and :class:`TrainingInterrupted` says
what was saved.  In an *immediate* section (evaluation: no autograd hooks, nothing half-updated) the
first SIGINT raises at once.  A second SIGINT prints one line and ends the process with status 130
at once (``os._exit``): every checkpoint on disk is complete, since checkpoints are written to a
temporary file and renamed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

__all__ = ["DeferredInterrupt", "TrainingInterrupted"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run; ``str(e)`` is the one line for the user (what was saved, at which step)."""


class DeferredInterrupt:
    """Context manager: defer SIGINT to step boundaries (main thread, default handler only; else a no-op).

    ``last_words()`` gives the line printed when a second Ctrl-C ends the process."""

    def __init__(self, last_words: Callable[[], str]) -> None:
        self.requested = False
        self.installed = False
        self._immediate = 0
        self._last_words = last_words
        self._old: object = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:  # the second Ctrl-C: out now
            try:
                sys.stdout.flush()
                print(f"\nsecond Ctrl-C: stopped at once; {self._last_words()}", file=sys.stderr, flush=True)
            finally:
                os._exit(130)
        self.requested = True
        if self._immediate:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def immediate(self) -> Iterator[None]:
        """A section a first Ctrl-C may interrupt at once (a pending request raises on entry)."""
        if self.requested and self.installed:
            raise KeyboardInterrupt
        self._immediate += 1
        try:
            yield
        finally:
            self._immediate -= 1

    def __enter__(self) -> "DeferredInterrupt":
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._old = signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self._old)  # type: ignore[arg-type]
            self.installed = False
