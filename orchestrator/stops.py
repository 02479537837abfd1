"""Stopping a run on SIGINT or SIGTERM (Ctrl+C, ``ray job stop``, a scheduler's kill).

The first signal asks the run to stop: training in this process stops at the next optimizer step
and saves a mid-epoch last.pt there (a checkpoint being written is never cut short; evaluation
stops at its next batch), a driver waiting on Ray Train workers stops waiting at once; either way
the run's callbacks flush and the run ends KILLED with the signal as its reason. Resuming
continues from the last checkpoint: in process, at the batch after the stop. A second signal gets the
default action: the process ends at once, and the run's journal keeps what was acknowledged.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = {signal.SIGINT: "SIGINT (Ctrl+C)", signal.SIGTERM: "SIGTERM"}
BOUNDARIES = ("on_train_batch_end", "on_val_batch_end", "on_predict_batch_end")


class RunStopped(KeyboardInterrupt):
    """The run was asked to stop by a signal; ``str()`` names it."""


class StopSignals:
    """While active, the first SIGINT/SIGTERM becomes ``RunStopped``: raised at once by the
    handler (``immediate``), or at the next step boundary of the trainers passed to ``watch``."""

    def __init__(self, immediate: bool):
        self.immediate = immediate
        self.reason: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # only the main thread may
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.reason = f"stopped by {SIGNALS[signum]}"
        for sig in SIGNALS:  # a second signal: the default action, at once
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        if self.immediate:
            raise RunStopped(self.reason)

    def requested(self) -> bool:
        return self.reason is not None

    def watch(self, registry: dict, events=BOUNDARIES) -> None:
        """Raise ``RunStopped`` at the step boundaries (``events``) of the trainer owning ``registry``."""
        for event in events:
            registry[event].append(self._check)

    def _check(self, owner) -> None:
        if self.reason is not None:
            raise RunStopped(self.reason)
