"""Ctrl-C and SIGTERM during training: stop at the next step boundary, save, say where; a second one exits
at once.

SIGTERM is what ``docker stop``, Slurm preemption, Kubernetes and systemd send: it is handled like the first
Ctrl-C, and the run ends with :data:`EXIT_TERMINATED` (143 = 128 + SIGTERM) instead of 130, so that a job
script can tell "saved, requeue me with --resume" from a failure (2, 3) or a Ctrl-C (130).

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

__all__ = ["DeferredInterrupt", "TrainingInterrupted", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

#: exit status of a run stopped by Ctrl-C (SIGINT) / by SIGTERM, its last completed step saved
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a training run; ``str(e)`` is the one line for the user: ``what`` (what was
    saved, at which step), then "continue with --resume" when there is a checkpoint to continue from
    (``resumable``); ``exit_code`` is the process's status (130 after Ctrl-C, 143 after SIGTERM). A caller
    that resumes runs itself (a benchmark sweep) gives its own advice after ``what``."""

    def __init__(self, what: str, exit_code: int = EXIT_INTERRUPTED, resumable: bool = True) -> None:
        super().__init__(what + ("; continue with --resume" if resumable else ""))
        self.what, self.exit_code, self.resumable = what, exit_code, resumable


_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


class DeferredInterrupt:
    """Context manager: defer SIGINT and SIGTERM to step boundaries (main thread, default handlers only; else
    a no-op). ``signals``: which of the two (a data-parallel rank defers SIGTERM only).

    ``last_words()`` gives the line printed when a second signal ends the process; ``on_exit()``, if given,
    runs just before that exit (a pipeline's launcher stops its worker processes there)."""

    def __init__(self, last_words: Callable[[], str],
                 signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
                 on_exit: Callable[[], None] | None = None) -> None:
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self.installed = False
        self._signals = signals
        self._immediate = 0
        self._last_words = last_words
        self._on_exit = on_exit
        self._old: dict[int, object] = {}

    @property
    def terminated(self) -> bool:
        return self.signum == signal.SIGTERM

    @property
    def exit_code(self) -> int:
        return EXIT_TERMINATED if self.terminated else EXIT_INTERRUPTED

    def reason(self) -> str:
        """How the run was stopped, for its last line."""
        return "terminated (SIGTERM)" if self.terminated else "interrupted"

    def request(self, signum: int) -> None:
        """Ask for a stop at the next step boundary (a signal, or another rank's signal)."""
        if not self.requested:
            self.signum = signum
        self.requested = True

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:  # the second signal: out now
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            try:
                sys.stdout.flush()
                print(f"\nsecond {name}: stopped at once; {self._last_words()}", file=sys.stderr, flush=True)
                if self._on_exit is not None:
                    self._on_exit()
            finally:
                os._exit(EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED)
        self.request(signum)
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
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                if signal.getsignal(sig) is _DEFAULTS[sig]:
                    self._old[sig] = signal.signal(sig, self._handle)
            self.installed = bool(self._old)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old = {}
        self.installed = False
