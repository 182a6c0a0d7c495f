"""What tokenmix raises for bad input: a value, shape, file or request that the caller can fix.

Each class also derives from the built-in exception that Python code would expect (``ValueError``,
``TypeError``, ``FileNotFoundError``, ...), so ``except ValueError`` keeps working. The command line
prints an ``InputError``'s message on one line and exits with status 2; any other exception is a bug in
tokenmix and shows its traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input: the message names the argument (or file) and what was expected."""


class InvalidValueError(InputError, ValueError):
    """A value, shape or option out of range."""


class InvalidTypeError(InputError, TypeError):
    """A value of the wrong kind (not a tensor, not an int, an unknown option name)."""


class MissingFileError(InputError, FileNotFoundError):
    """A file or run directory that does not exist, or lacks what was asked of it."""


class RunDirectoryError(InputError, FileExistsError):
    """An output directory that tokenmix may not write to: a user's files, another run, a held lock."""


class UnavailableError(InputError, RuntimeError):
    """A request this machine or this object cannot serve: a missing GPU or Triton, decoding a
    bidirectional model."""


class DivergedError(InputError, FloatingPointError):
    """Training produced a non-finite loss (usually too high a learning rate)."""


__all__ = [
    "DivergedError",
    "InputError",
    "InvalidTypeError",
    "InvalidValueError",
    "MissingFileError",
    "RunDirectoryError",
    "UnavailableError",
]
