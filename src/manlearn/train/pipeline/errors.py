"""The pipeline's errors, by kind (the launcher and the tests match on the class, not on text)."""

from __future__ import annotations

from manlearn.errors import ManlearnError

__all__ = ["PipelineError", "WorkerTimeout", "WorkerGone"]


class PipelineError(ManlearnError):
    """A pipeline run that could not finish: a worker died, raised, or stopped answering."""


class WorkerTimeout(PipelineError):
    """A peer worker sent or took nothing within ``pipeline_timeout_s``: alive but stuck, or too slow."""


class WorkerGone(PipelineError):
    """A link to a peer worker failed before the timeout: the peer died (its sockets closed) or the
    transfer itself failed."""
