"""Stopping cleanly when the cluster takes the machine back.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM before they kill a job; a user presses Ctrl-C
(SIGINT). While :func:`handle_preemption` is active, the first of either only *asks* the run to stop: a learned
method saves its checkpoint at the end of the step under way and the run stops (a static method or the loading
in progress finishes first; the run stops before the next method). The run raises :class:`RunPreempted` and
the command exits with :data:`PREEMPTED_EXIT_CODE`, printing the command that resumes it.

A second signal exits at once with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM), the status a shell gives
a process killed by that signal: no checkpoint is written, and the last one stays intact because checkpoints are
only ever replaced by an atomic rename (:mod:`adamerge.storage.atomic`, whose unfinished temporary files are removed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adamerge.errors import AdamergeError
from adamerge.storage.atomic import remove_files_in_flight

# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": the run stopped cleanly, saved
# what it had and can be resumed. It differs on purpose from 143/130 (killed by SIGTERM/SIGINT, maybe mid-write),
# so a requeue policy can tell "resume me" from "I was killed".
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunPreempted(AdamergeError, RuntimeError):
    """A stop signal arrived; the run saved its progress and stopped. Resume it with ``resume=true``."""

    def __init__(self, signum: int, where: str, checkpoint: Path | None = None) -> None:
        self.signum, self.where, self.checkpoint = signum, where, checkpoint
        saved = f"; progress saved to {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}{saved}")


class _StopRequest:
    """The first stop signal received while a run is active (None: none yet)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            # os.write, not print: a handler runs between any two bytecodes, possibly inside a print to stderr.
            _say(f"adamerge: received {name}: stopping at the next step boundary after saving a checkpoint "
                 f"(send {name} again to exit at once without saving)")
            return
        remove_files_in_flight()
        _say(f"adamerge: received {name} again: exiting now; the last saved checkpoint is kept as it was")
        os._exit(128 + signum)  # no cleanup that could block: the point of a second signal is to stop now


def _say(message: str) -> None:
    os.write(2, (message + "\n").encode())


_active: _StopRequest | None = None


@contextlib.contextmanager
def handle_preemption() -> Iterator[None]:
    """Within this block, SIGTERM and SIGINT request a clean stop instead of ending the process.

    Outside the main thread (signal handlers can only be installed there) the block changes nothing.
    """
    global _active
    if threading.current_thread() is not threading.main_thread() or _active is not None:
        yield
        return
    request = _StopRequest()
    previous = {signum: signal.signal(signum, request.handle) for signum in STOP_SIGNALS}
    _active = request
    try:
        yield
    finally:
        _active = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_requested() -> int | None:
    """The signal that asked this run to stop, if one did."""
    return _active.signum if _active is not None else None


def stop_if_requested(where: str) -> None:
    """Raise :class:`RunPreempted` at a point where stopping loses nothing (between methods)."""
    signum = stop_requested()
    if signum is not None:
        raise RunPreempted(signum, where)


def keep_lightning_off_signals(trainer: Any) -> None:
    """Stop the trainer from installing its own SIGTERM handler.

    Lightning's handler makes ``fit`` raise a ``SystemExit`` with status 0 at the next batch, before any
    checkpoint: a preempted run would look finished and lose its progress. adamerge's handler (above) owns
    SIGTERM and SIGINT instead, and :class:`adamerge.training.resume.StepCheckpoint` saves and stops at the boundary.
    """
    connector = getattr(trainer, "_signal_connector", None)  # Lightning >= 2.0 registers through this object
    if connector is not None:
        connector.register_signal_handlers = lambda: None
