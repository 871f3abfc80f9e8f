"""Stopping a run cleanly on a signal: SIGTERM (a scheduler's time limit or preemption, ``kill``, a container's
stop, torchrun passing on its own stop) or SIGUSR1 (e.g. SLURM's early warning ``--signal=USR1@<seconds>`` to a
one-process run; ``accelerate launch`` dies of SIGUSR1 without passing it on, so send it SIGTERM: docs/launch.md).

While :meth:`diffrl.trainers.engine.Trainer.train` runs, :class:`StopSignals` records the first such signal instead of
letting it end the process. The training loop asks after every step (all processes agree, so every process stops
after the same step), writes a checkpoint of that step, marks ``status.json`` ``stopped`` and raises
:class:`~diffrl.trainers.common.TrainingStopped`; ``diffrl train`` then exits with ``128 + the signal's number``
(143 for SIGTERM), as a process ended by the signal would. ``resume_from_checkpoint=latest`` continues from there,
bit for bit. More signals while it stops change nothing: launchers and schedulers often deliver one twice (SLURM
to every process of a job step, torchrun passing on its own), and a second must not cut the checkpoint short. To
stop at once, Ctrl-C (SIGINT) or SIGKILL; the checkpoints on disk stay whole, as after any kill.

Handlers can only be installed from the main thread; elsewhere (a run started from a worker thread) the signals
keep their usual effect.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["STOP_SIGNALS", "StopSignals"]

#: The signals a run stops cleanly on (SIGUSR1 where the platform has it).
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


class StopSignals:
    """``with StopSignals() as stop:`` records the first of :data:`STOP_SIGNALS` in :attr:`signum` while the block
    runs (later ones are ignored), then restores the previous handlers."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        """The recorded signal's name (e.g. ``SIGTERM``), or an empty string."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False
