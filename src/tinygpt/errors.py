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


class Interrupted(TinyGPTError):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; exits 128 + the signal number (130,
    143)."""

    def __init__(self, signum: int, checkpoint: object, run_dir: object):
        import signal

        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved in {checkpoint}. "
                         f"Resume with: tinygpt train --out {run_dir} --resume")
