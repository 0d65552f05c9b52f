"""Stopping a run cleanly when the scheduler asks: a signal sets a flag, the loop checkpoints at the
next iteration boundary (all processes at the same one) and raises ``Interrupted``.

Schedulers announce the end of an allocation with a signal: Slurm sends SIGTERM on preemption,
``scancel`` and ``scontrol requeue``, and the signal of ``--signal`` (SIGUSR1 here) before a time
limit. Killing the process there loses every iteration since the last periodic checkpoint.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The time-limit warning (``sbatch --signal=USR1@...``): the job should go on in a later launch.
# A SIGTERM is a cancellation or a preemption, which the scheduler requeues itself if it means to.
REQUEUE_SIGNAL = signal.SIGUSR1
# What a stopped run's process exits with when it wants to be launched again: the job script
# requeues on it ("try again later").
REQUEUE_EXIT_CODE = os.EX_TEMPFAIL


class Interrupted(RuntimeError):
    """Training stopped on a signal after writing a checkpoint that resumes at ``step``."""

    def __init__(self, step: int, checkpoint: Path, signum: int):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        super().__init__(f"{signal.Signals(signum).name} at iteration {step}; resume from {checkpoint}")


def wants_requeue(exc: Interrupted) -> bool:
    return exc.signum == REQUEUE_SIGNAL


def exit_code(exc: Interrupted) -> int:
    """The one rule for both command lines: requeue on the time-limit warning, else the shell's
    128 + signal, which no job script mistakes for "launch me again"."""
    return REQUEUE_EXIT_CODE if wants_requeue(exc) else 128 + exc.signum


class StopRequest:
    """While entered, the stop signals set ``signum`` instead of ending the process.

    Outside the main thread (a notebook's worker, a test runner's thread) handlers cannot be
    installed; the run then keeps the process's own signal handling.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader workers: Slurm signals every process of a step, and a worker that dies of it
    would fail the loop before it can checkpoint; workers end with their parent instead."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
