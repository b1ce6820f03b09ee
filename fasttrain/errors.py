"""The errors a user can fix, under one base class.

The command line prints a `FasttrainError` as one line (`error: ...`) and exits with its
`exit_code` (2 unless the class says otherwise); every other exception is a bug and keeps its
traceback. So raise a `FasttrainError` subclass for anything caused by the input: a bad flag, a
bad data file (name the file and line), a missing or damaged stage, a file-system failure; and
say what to do about it.
"""
from __future__ import annotations

import contextlib
import errno


class FasttrainError(Exception):
    """Something the user can fix; the message says what, where, and what to do."""
    exit_code = 2


class ConfigError(FasttrainError):
    """A flag out of range, or flags that do not fit together."""


class DataError(FasttrainError):
    """Input data that cannot be used as it is; the message names the file and line."""


class RunError(FasttrainError):
    """The run folder: a stage that is missing, locked by another run, already trained, or
    damaged; a checkpoint that cannot be read; a file-system failure while writing."""


class Diverged(FasttrainError):
    """Training stopped because the loss or the gradients went bad for too many steps in a row."""


class Interrupted(FasttrainError):
    """SIGTERM or SIGINT stopped the run after saving; exits 128 + the signal number (143, 130)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def os_error(doing: str, e: OSError) -> RunError:
    """A one-line RunError for a failed file-system call: `doing`, the path, the reason, the fix."""
    where = f" {e.filename}:" if e.filename else ""
    return RunError(f"{doing}:{where} {e.strerror or e}{_advice(e)}")


@contextlib.contextmanager
def file_system(doing: str):
    """Turn an OSError in the block into a one-line RunError (see `os_error`)."""
    try:
        yield
    except OSError as e:
        raise os_error(doing, e) from e


def _advice(e: OSError) -> str:
    return {errno.ENOSPC: "; free some disk space, then run again (with --resume to continue)",
            errno.EDQUOT: "; free some disk space, then run again (with --resume to continue)",
            errno.EFBIG: "; the file-size limit (ulimit -f) is too low for this file",
            errno.EACCES: "; make the folder writable or choose another --run",
            errno.EROFS: "; choose a --run on a writable file system",
            errno.ENOTDIR: "; a file stands where a folder is needed: move it or choose another --run",
            errno.EEXIST: "; a file stands where a folder is needed: move it or choose another --run",
            }.get(e.errno, "")
