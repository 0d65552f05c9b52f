"""Stopping a run cleanly when the scheduler asks: a signal sets a flag, the loop checkpoints at the
next iteration boundary (all processes at the same one) and raises ``Interrupted``.

Schedulers announce the end of an allocation with a signal: Slurm sends SIGTERM on preemption,
``scancel`` and ``scontrol requeue``, and the signal of ``--signal`` (SIGUSR1 here) before a time
limit. Killing the process there loses every iteration since the last periodic checkpoint.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupted(RuntimeError):
    """Training stopped on a signal after writing a checkpoint that resumes at ``step``."""

    def __init__(self, step: int, checkpoint: Path, signum: int):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        super().__init__(f"{signal.Signals(signum).name} at iteration {step}; resume from {checkpoint}")


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
