"""Stopping a run on SIGINT or SIGTERM (Ctrl+C, ``ray job stop``, a scheduler's kill).

The first signal asks the run to stop: training stops at the next optimizer step and saves a
mid-epoch last.pt there (a checkpoint being written is never cut short). In process, evaluation
stops at its next batch too. On Ray, the driver passes the request to the run's callback actor,
which the workers poll (``StopListener``), and waits for them a bounded time (``stop_grace``);
they vote on it like on a preemption notice, save, deliver their records and end. Either way the
run's callbacks flush and the run ends KILLED with the signal as its reason; resuming continues at
the batch after the stop (on Ray, from the last finished epoch if the workers did not stop in time).
A second signal gets the default action: the process ends at once, and the run's journal keeps what
was acknowledged.
"""
from __future__ import annotations

import os
import signal
import threading

from trainers.engine.preemption import STOPPED

SIGNALS = {signal.SIGINT: "SIGINT (Ctrl+C)", signal.SIGTERM: "SIGTERM"}
BOUNDARIES = ("on_train_batch_end", "on_val_batch_end", "on_predict_batch_end")


class RunStopped(KeyboardInterrupt):
    """The run was asked to stop by a signal; ``str()`` names it."""


class HeardStop:
    """A stop this process heard of (``reason``), as the trainer's step vote reads it (``notice``)."""

    reason: str | None = None

    def requested(self) -> bool:
        return self.reason is not None

    def notice(self) -> int:
        """A trainer's ``preemption_notice``."""
        return STOPPED if self.reason is not None else 0


class StopSignals(HeardStop):
    """While active, the first SIGINT/SIGTERM is noted (``reason``): a trainer here reads it as its
    notice (``notice``) and at the boundaries passed to ``watch``, a Ray run's driver passes it on."""

    def __init__(self):
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

    def watch(self, registry: dict, events=BOUNDARIES) -> None:
        """Raise ``RunStopped`` at the step boundaries (``events``) of the trainer owning ``registry``."""
        for event in events:
            registry[event].append(self._check)

    def _check(self, owner) -> None:
        if self.reason is not None:
            raise RunStopped(self.reason)


STOP_POLL = 0.5  # seconds between a worker's questions to the callback actor
STOP_WAIT = 30.0  # seconds the driver waits for its Ray Train workers to stop (outside a Ray job)
FINISH_TIME = 1.5  # seconds of a job's stop grace kept for closing the sinks
JOB_GRACE = 3.0  # Ray's job stop grace before its SIGKILL (``RAY_JOB_STOP_WAIT_TIME_S``)


def stop_grace() -> float:
    """How long a driver waits for its workers to stop: under ``ray job submit`` the part of Ray's
    stop grace that leaves time to close the sinks before Ray's SIGKILL, else ``STOP_WAIT``."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return STOP_WAIT
    return max(0.5, float(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", JOB_GRACE)) - FINISH_TIME)


class StopListener(HeardStop):
    """A Ray Train worker's ear for the driver's stop request: a thread asks the callback actor
    every ``STOP_POLL`` s; ``notice()`` is what the trainer's step vote reads (a flag, no call).
    Only rank 0 listens while training (``listen``): the vote tells the other ranks, and the
    actor gets two calls a second however many ranks the run has."""

    def __init__(self, actor):
        self.actor = actor
        self.reason: str | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def listen(self) -> "StopListener":
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="stop-listener", daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        import ray

        while self.reason is None and not self._closed.wait(STOP_POLL):
            try:
                self.reason = ray.get(self.actor.stop_requested.remote(), timeout=10)
            except Exception:  # the actor restarting: ask again
                pass

    def close(self) -> None:
        self._closed.set()
