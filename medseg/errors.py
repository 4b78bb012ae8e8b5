"""User-facing error types.

Every error a user can cause (a bad file, a wrong option, an inconsistent data set) is raised as a
:class:`MedsegError` whose message is one line: the file or argument, what is wrong, and what would be right.
The CLI prints that line and exits non-zero without a traceback; programming errors stay ordinary exceptions.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MedsegError", "InputError", "ConfigError"]


class MedsegError(Exception):
    """Base class of errors caused by user input; ``str(err)`` is a complete one-line message."""


class InputError(MedsegError):
    """A file or folder given by the user cannot be used.

    Args:
        path: the offending file or folder.
        problem: what is wrong with it, e.g. ``"not a valid NIfTI file (truncated gzip stream)"``.
        expected: what would be right, e.g. ``"a 3D image"``; optional.
    """

    def __init__(self, path: str | Path | None, problem: str, expected: str | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        self.expected = expected
        msg = problem if self.path is None else f"{self.path}: {problem}"
        if expected:
            msg += f"; expected {expected}"
        super().__init__(" ".join(msg.split()))


class ConfigError(MedsegError):
    """An option, config value or plan entry is invalid.

    Args:
        name: the option or key, e.g. ``"--folds"`` or ``"train.epochs"``.
        value: the value given.
        expected: what would be valid.
    """

    def __init__(self, name: str, value: object, expected: str):
        self.name = name
        self.value = value
        self.expected = expected
        super().__init__(f"{name}={value!r} is invalid; expected {expected}")
