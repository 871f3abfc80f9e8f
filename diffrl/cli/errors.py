"""How every ``diffrl`` command reports the errors it knows: one line on stderr and an exit code, the same for all.

* **2**, bad input, refused before any long work: a config key or value (``ConfigError``), an option, a path that
  does not exist or is not writable, a prompt file, a reward name or module (``ValueError``, ``OSError`` such as
  ``FileNotFoundError``, ``FileExistsError`` or ``PermissionError``, ``ImportError``, ``AttributeError``,
  ``NotImplementedError``); argparse's own usage errors exit 2 as well;
* **1**, the work failed: a run stopped (``TrainingAborted``), a reward failed during a run (``RewardError``), a hub
  file could not be fetched (``DownloadError``), the disk is full (``OSError`` ENOSPC or EDQUOT) at any point, and
  any ``OSError`` once a command has said that its work started (:meth:`CommandErrors.started`: ``diffrl train``
  once the trainer is built, ``diffrl download`` once it fetches), such as a checkpoint that cannot be written;
* **130**, interrupted (Ctrl-C), without a traceback;
* **128 + the signal's number** (143 for SIGTERM, 138 for SIGUSR1 on Linux), a run that stopped cleanly on that
  signal (``TrainingStopped``: its checkpoint written, :mod:`diffrl.trainers.stopping`), as a process the signal
  ended would.

Anything else is a bug and keeps its traceback. ``diffrl doctor`` also exits 1 when a check FAILs: its report, not
an error.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

__all__ = ["USAGE", "FAILED", "INTERRUPTED", "INPUT_ERRORS", "exit_code", "CommandErrors"]

USAGE = 2
FAILED = 1
INTERRUPTED = 130

#: Errors that mean bad input while a command checks what it was given (exit :data:`USAGE`).
INPUT_ERRORS = (ValueError, OSError, ImportError, AttributeError, NotImplementedError)
#: ``OSError.errno`` values that mean the disk is full: the work failed, whenever it happens.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _stop_code(err: BaseException) -> int | None:
    """``128 + signum`` for a run stopped cleanly on a signal, else None."""
    try:
        from diffrl.trainers.common import TrainingStopped
    except ImportError:  # torch itself is missing: no run got far enough to raise it
        return None
    if isinstance(err, TrainingStopped):
        import signal

        return 128 + (err.signum or signal.SIGTERM)
    return None


def _run_errors() -> tuple[type[BaseException], ...]:
    """The project's errors for work that started and failed (imported only when there is an error to classify)."""
    from diffrl.hub import DownloadError

    try:
        from diffrl.trainers.engine import RewardError, TrainingAborted
    except ImportError:  # torch itself is missing: no run got far enough to raise these
        return (DownloadError,)
    return (TrainingAborted, RewardError, DownloadError)


def exit_code(err: BaseException, *, started: bool = False) -> int | None:
    """The exit code of a command that stopped with ``err``, or None for an error it does not know (a bug).
    ``started``: the command's long work had begun (see :meth:`CommandErrors.started`)."""
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED
    stop = _stop_code(err)
    if stop is not None:
        return stop
    if isinstance(err, _run_errors()):
        return FAILED
    if isinstance(err, OSError) and (started or err.errno in DISK_FULL):
        return FAILED
    if not started and isinstance(err, INPUT_ERRORS):
        return USAGE
    return None


class CommandErrors:
    """``with CommandErrors() as errors: ...`` then ``return errors.code``: a known error inside the block prints
    ``<prefix>: <message>`` on stderr and sets :attr:`code` (see the module docstring); 0 when the block ends."""

    def __init__(self, prefix: str = "error"):
        self.prefix = prefix
        self.code = 0
        self._started = False
        self._cleanup: Callable[[], None] | None = None

    def started(self, cleanup: Callable[[], None] | None = None) -> None:
        """The long work begins: an ``OSError`` from now on is a failure (exit 1); ``cleanup`` runs after the
        message of a failure (e.g. ending the trainer's process group)."""
        self._started = True
        self._cleanup = cleanup

    def __enter__(self) -> CommandErrors:
        return self

    def __exit__(self, kind, err, traceback) -> bool:
        if err is None:
            return False
        code = exit_code(err, started=self._started)
        if code is None:
            return False
        # a clean stop on a signal is no error: its message says what was saved and how to go on
        label = "" if _stop_code(err) is not None else f"{self.prefix}: "
        print(f"{label}{err if code != INTERRUPTED else 'interrupted'}", file=sys.stderr, flush=True)
        if self._cleanup is not None and code != INTERRUPTED:
            self._cleanup()
        self.code = code
        return True
