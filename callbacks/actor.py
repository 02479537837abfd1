"""The callback actor: one per run, the Dispatcher (``callbacks/dispatcher.py``) as a Ray actor.

Ray restarts it if its process dies (``max_restarts=-1``); the forwarders resend what it had
not acknowledged.
"""
from __future__ import annotations

import gc
import os
from typing import Iterable

import ray

from callbacks.dispatcher import Dispatcher, driver_entries


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class CallbackActor(Dispatcher):
    """The Ray actor: one per run, on the driver's node; restarted by Ray if its process dies.

    It runs at a lower CPU priority (nice +NICE): where it shares cores with training workers
    (a laptop, a small head node), logging takes the idle time and training keeps the CPU.
    Falling behind is safe: workers buffer, and backpressure (counted) bounds the lag.
    """

    def __init__(self, driver_callbacks: Iterable = ()):
        lower_priority()
        super().__init__(driver_callbacks)
        self._frozen = False

    def ingest(self, batch: list[dict], floors: dict | None = None) -> dict:
        self._freeze_once()
        return super().ingest(batch, floors)

    def ingest_rows(self, stream: tuple, first_seq: int, rows: list, floors: dict | None = None) -> dict:
        self._freeze_once()
        return super().ingest_rows(stream, first_seq, rows, floors)

    def _freeze_once(self) -> None:
        if not self._frozen:  # see freeze_startup_objects
            freeze_startup_objects()
            self._frozen = True

    def stats(self) -> dict:
        return {**super().stats(), "frozen_objects": gc.get_freeze_count()}


def freeze_startup_objects() -> None:
    """Leave the ~0.5M objects of the sinks' imports (MLflow, SQLAlchemy, pyarrow) out of garbage
    collections: the records a run buffers trigger full collections that rescan them, which
    doubled the actor's CPU per record. Done at the first batch, once the sinks have started;
    this process serves one run, and records (acyclic) are still freed as they are released."""
    gc.freeze()


NICE = 10


def lower_priority() -> None:
    """Raise this thread's nice value (Linux: per thread; threads started later inherit it)."""
    try:
        os.nice(NICE)
    except (AttributeError, OSError):  # not on this platform: run at normal priority
        pass


def start_callback_actor(driver_callbacks: Iterable, name: str | None = None,
                         namespace: str | None = None):
    """Validate driver callbacks here (errors surface on the driver) and start the actor."""
    callbacks = list(driver_callbacks or ())
    driver_entries(callbacks)
    actor = CallbackActor.options(num_cpus=0, max_restarts=-1, max_task_retries=0, name=name,
                                  namespace=namespace).remote(callbacks)
    actor.start.remote()  # not awaited: sinks connect while the workers start
    return actor
