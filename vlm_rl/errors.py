"""Errors a user fixes from the message alone: the `vlm-rl` command prints them as one line, without a traceback.

Each also derives from the built-in type callers of the Python API already catch (`ValueError`,
`FileNotFoundError`), so raising one changes nothing for them.
"""

from __future__ import annotations


class UsageError(Exception):
    """A mistake in what the user gave (a recipe field, a flag, a path), named in the message with its fix."""


class InvalidValueError(UsageError, ValueError):
    """A value the user gave cannot be used."""


class MissingPathError(UsageError, FileNotFoundError):
    """A file or directory the user named does not exist, or holds not what the command needs."""


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (the Hub client's run to a dozen lines), for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class RunStopped(Exception):
    """Training stopped on a fault outside the program (a full disk, a server gone), after doing what it could to
    make the same command resume; the message names the fault and what to do, and is printed as one line."""
