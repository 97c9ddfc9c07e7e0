"""The one base class of the errors that are the user's to fix.

Each module keeps its own error type next to the code that raises it (`DataError` in data.py, ...), and each
derives from `UserError` as well as from the builtin type it always had (ValueError, RuntimeError, OSError),
so callers that catch those keep working. The CLI catches `UserError` alone: its message is printed as one
line, without a traceback, and the exit status is 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad data, a bad config value, an unusable file: the message names it and says what to do."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on safely (raised by the loop and by the checkpoint writer); the message says what
    was kept and what to change."""


class Interrupted(TrainingError):
    """Stopped on request (SIGINT/SIGTERM) after a complete step, with last.pt written; the message says how to
    continue. The CLI exits with status 130 on it."""
