"""The errors a user acts on. The CLI prints each as one line ``error: …`` and exits with its code.

Every class names what went wrong in its message (the key, the file, the parameter); none carries
a traceback to the terminal. They keep the built-in base their callers have always caught
(``ValueError`` for bad input, ``RuntimeError`` for what happened while running).
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors the CLI reports as one line; ``exit_code`` is its exit status."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration or command-line problem, with a message that names the offending key or flag."""


class DataError(UserError, ValueError):
    """A missing, corrupt or unusable data file or corpus; the message is one line naming it."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or written."""


class ParametrizationError(UserError, ValueError):
    """A parameter not claimed by exactly one parametrization rule."""


class TrainingError(UserError, RuntimeError):
    """Training stopped for a reason the user must act on (a one-line message)."""

    exit_code = 1
