"""Errors a user can act on.

Everything raised as a ``TinyGPTError`` reaches the user as one line on stderr
(``error: ...``) and a non-zero exit code, never as a traceback: the message must
name the problem and, where there is one, the fix.
"""

from __future__ import annotations


class TinyGPTError(Exception):
    """A problem with the user's input or environment (exit code 1)."""

    exit_code = 1


class UsageError(TinyGPTError):
    """A bad command line or config value (exit code 2, as argparse uses)."""

    exit_code = 2
