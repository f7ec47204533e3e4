"""The exceptions a user can act on: one base class, one subclass per kind of mistake.

Every error adamerge raises for bad input derives from :class:`AdamergeError` and names the file, parameter
or value to change. The CLI prints such a message on one line and exits 1; the Python API raises it as is.
Each subclass also derives from the builtin a caller would have caught before (``ValueError`` for settings,
``RuntimeError`` for data and exports), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

import sys


class AdamergeError(Exception):
    """Base of every error that reports a user's input or a run's state, not a bug in adamerge."""


def adamerge_cause(error: BaseException) -> AdamergeError | None:
    """The first adamerge error in ``error``'s cause chain (itself included): frameworks such as Hydra wrap the
    errors raised while they build objects, and the adamerge one is what names the setting to change."""
    while error is not None and not isinstance(error, AdamergeError):
        error = error.__cause__
    return error


def report_cli_error(prog: str, message: object, status: int = 2) -> int:
    """Print ``<prog>: error: <message>`` on stderr (no traceback) and return the exit status to use."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


class ConfigError(AdamergeError, ValueError):
    """A setting (method hyperparameter, trainer budget, run option) is out of range or of the wrong type."""


class PoolDataMismatchError(AdamergeError, ValueError):
    """The model pool and the data disagree: task names, class counts or feature sizes."""


class RunDirectoryError(AdamergeError, RuntimeError):
    """The run directory cannot be written, or would overwrite (or resume) something it must not."""


class ExportError(AdamergeError, RuntimeError):
    """An export could not be written, or a directory is not a loadable export (a file missing, modified or unreadable)."""


class SignatureError(ExportError):
    """A signed export does not match its signature (a file changed, added or missing), or is not signed by that key."""


class NonFiniteError(AdamergeError, FloatingPointError):
    """A NaN/Inf objective or gradient: learning stops before it can reach the coefficients or an export."""
