"""Exceptions that carry a message meant for the user, not a traceback from deep inside."""


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
