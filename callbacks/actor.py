"""The callback actor: one per run, the Dispatcher (``callbacks/dispatcher.py``) as a Ray actor.

Ray restarts it if its process dies (``max_restarts=-1``); the forwarders resend what it had
not acknowledged.

Ingest calls run on a pool of threads (the ``ingest`` concurrency group, started in the order
they were submitted), the other methods on one thread of their own; the Dispatcher's lock lets
one in at a time. A call waits for the journal's fsync after it has let go of that lock, so calls
that arrive while the journal is being synced append meanwhile and share the next fsync
(``callbacks/group_commit.py``).
"""
from __future__ import annotations

import gc
import os
import tempfile
import threading
import time
from typing import Iterable

import ray

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from callbacks.dispatcher import Dispatcher, driver_entries
from callbacks.forwarder import ACTOR_ERRORS, PROBE_INTERVAL
from callbacks.journal import Journal
from callbacks.records import record_key
from trainers.utils import LOGGER, MLFLOW_LEVEL, log_details_to, mlflow_level


SEND_TIMEOUT = 30.0  # seconds the driver waits for the actor to journal a record of its own
INGEST_THREADS = 16  # ingest calls in the actor at once: those waiting for a lock or an fsync
# Arrow's default allocator, mimalloc, keeps a heap per thread, and this process encodes event-log
# parts on whichever of its ingest threads cuts them: the pages freed stayed with the heaps, its
# RSS grew 1.5-2 MB/s at 5,000 rows/s and kept growing. With the system allocator it stays flat.
# Read once, when Arrow first allocates: so it is set for the actor's process, not from inside it.
ACTOR_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system"}


def actor_env() -> dict:
    """MLflow's INFO lines (its system-metrics monitor's start, ...) would reach the user's console
    through Ray, prefixed: the actor's process gets ``mlflow_level``."""
    return {**ACTOR_ENV, MLFLOW_LEVEL: mlflow_level()}


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, concurrency_groups={"ingest": INGEST_THREADS})
class CallbackActor(Dispatcher):
    """The Ray actor: one per run, on the driver's node; restarted by Ray if its process dies.

    It runs at a lower CPU priority (nice +NICE): where it shares cores with training workers
    (a laptop, a small head node), logging takes the idle time and training keeps the CPU.
    Falling behind is safe: workers buffer, and backpressure (counted) bounds the lag.
    """

    def __init__(self, driver_callbacks: Iterable = (), journal: Journal | None = None,
                 orphan_after: float | None = None):
        lower_priority()
        log_details_to(ray_log_file(f"callback-actor-{os.getpid()}.log"))
        super().__init__(driver_callbacks, journal)
        self._frozen = False
        if self._restarted:
            self._catch_up()
        self._heard = time.monotonic()  # the driver's heartbeat or a worker's batch
        self._stop_reason: str | None = None  # the driver's stop request, which workers poll
        self._orphan_after = orphan_after
        self._job_id = ray.get_runtime_context().get_job_id()  # the driver's job (detached: it stays)
        if orphan_after:
            threading.Thread(target=self._watch_driver, name="driver-watch", daemon=True).start()

    def _catch_up(self) -> None:
        """Start the sinks and hand them the journal's entries after their watermarks, before this
        incarnation takes any call. Ray rebuilds a dead actor by its constructor alone, and the
        driver's one ``start`` call went to the incarnation that died: without this, entries it
        had journaled and acknowledged but its sinks had not delivered would never reach them
        (the workers do not resend acknowledged rows), and each sink's count of the entries it
        was handed (``Progress.fed``) would lag the journal's numbering, so its watermark would
        name the wrong entries."""
        self.start()

    @ray.method(concurrency_group="ingest")
    def ingest(self, batch: list[dict], floors: dict | None = None) -> dict:
        self._freeze_once()
        self._heard = time.monotonic()
        return super().ingest(batch, floors)

    @ray.method(concurrency_group="ingest")
    def ingest_rows(self, stream: tuple, first_seq: int, rows: list, floors: dict | None = None,
                    wait: bool = True) -> dict:
        self._freeze_once()
        self._heard = time.monotonic()
        return super().ingest_rows(stream, first_seq, rows, floors, wait)

    @ray.method(concurrency_group="ingest")
    def durable(self, stream: tuple) -> dict:
        self._heard = time.monotonic()
        return super().durable(stream)

    # ----------------------------------------------------------------- a stop, a lost driver
    def request_stop(self, reason: str) -> None:
        """The driver was asked to stop (a signal): workers save and end at their next step
        (``stop_requested``); should the driver die meanwhile, the run ends with this reason."""
        self._stop_reason = reason

    def stop_requested(self) -> str | None:
        """The driver's stop request, polled by the workers (``orchestrator/stops.py``)."""
        return self._stop_reason

    def heartbeat(self) -> bool:
        """The driver is alive (it calls this every few seconds while its run trains)."""
        self._heard = time.monotonic()
        return True

    def _driver_lost(self) -> str | None:
        """Why this run's driver is taken for gone, else None. Its Ray job's end says so at once
        (a killed driver ends its job; Ray then ends its workers), checked only once the driver
        has been quiet for a while; long silence says so where the job table cannot, until the
        run has ended (the driver stops beating while the sinks close, which may take long)."""
        quiet = time.monotonic() - self._heard
        if quiet > self._orphan_after and self._status is None:
            return f"no word from it or its workers for {self._orphan_after:.0f} s"
        if quiet > ASK_RAY_AFTER and job_ended(self._job_id):
            return "its Ray job ended"
        return None

    def _watch_driver(self) -> None:
        """A detached actor outlives its driver; its workers do not (Ray ends them with the
        driver). End the run from here once the driver is gone, through the actor's own queue,
        after the calls already waiting in it; a driver killed while it ended the run leaves the
        actor to go the same way."""
        while True:
            time.sleep(1.0)
            why = self._driver_lost()
            if why:
                me = ray.get_runtime_context().current_actor
                me.finish_orphan.remote(f"the driver was lost ({why}); ended by its callback actor")
                return

    def finish_orphan(self, reason: str) -> None:
        """Deliver the journal, end the run KILLED with ``reason`` (the driver's stop request's,
        if it had one: a ``ray job stop`` whose grace ran out), and leave (detached: nobody else
        would)."""
        if self._driver_lost() is None:
            return
        if self._status is None:
            LOGGER.warning(f"callback actor: {reason}")
            self.finish("KILLED", self._stop_reason or reason)
        ray.actor.exit_actor()

    def _freeze_once(self) -> None:
        if not self._frozen:  # see freeze_startup_objects
            with self._lock:  # once, whichever ingest thread comes first
                if not self._frozen:
                    freeze_startup_objects()
                    self._frozen = True

    def _stats(self) -> dict:
        return {**super()._stats(), "frozen_objects": gc.get_freeze_count()}


def freeze_startup_objects() -> None:
    """Leave the ~0.5M objects of the sinks' imports (MLflow, SQLAlchemy, pyarrow) out of garbage
    collections: the records a run buffers trigger full collections that rescan them, which
    doubled the actor's CPU per record. Done at the first batch, once the sinks have started;
    this process serves one run, and records (acyclic) are still freed as they are released."""
    gc.freeze()


NICE = 10
HEARTBEAT = 5.0  # seconds between a driver's heartbeats to its callback actor
ASK_RAY_AFTER = 1.5 * HEARTBEAT  # s of quiet (a heartbeat late) before the actor asks Ray about the driver's job


def job_ended(job_id: str) -> bool:
    """Whether Ray's job table marks ``job_id`` ended (its driver exited or was killed)."""
    from ray._private.state import jobs  # the job table; Ray has no public call for one job's state

    try:
        return any(job["JobID"] == job_id and job["IsDead"] for job in jobs())
    except Exception:  # the GCS restarting: the silence rule still applies
        return False


def ray_log_file(name: str) -> str:
    """A file in this Ray session's log folder (``logs/train``, beside Ray Train's own), for a
    process's details. The folder as Ray Train's ``LoggingManager`` finds it; importing that
    would import Ray Train (pandas, Ray Data) into the callback actor, ~0.5 s of each run's start."""
    node = ray._private.worker._global_node
    folder = os.path.join(node.get_session_dir_path(), "logs", "train") if node else tempfile.gettempdir()
    return os.path.join(folder, "orchestrator", name)


def lower_priority() -> None:
    """Raise this thread's nice value (Linux: per thread; threads started later inherit it)."""
    try:
        os.nice(NICE)
    except (AttributeError, OSError):  # not on this platform: run at normal priority
        pass


def start_callback_actor(driver_callbacks: Iterable, name: str | None = None,
                         namespace: str | None = None, journal: Journal | None = None,
                         orphan_after: float | None = None):
    """Validate driver callbacks here (errors surface on the driver) and start the actor on this
    node: the journal's folder and the files records name are on this node's disk. With
    ``orphan_after`` the actor is detached: it outlives a killed driver, notices the silence
    (``heartbeat``) and ends the run itself; the driver kills it after ``finish``."""
    callbacks = list(driver_callbacks or ())
    driver_entries(callbacks)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    lifetime = "detached" if orphan_after else None
    actor = CallbackActor.options(num_cpus=0, max_restarts=-1, max_task_retries=0, name=name,
                                  namespace=namespace, scheduling_strategy=here, lifetime=lifetime,
                                  runtime_env={"env_vars": actor_env()}).remote(callbacks, journal, orphan_after)
    actor.start.remote()  # not awaited: sinks connect while the workers start
    return actor


def send_record(actor, record: dict, timeout: float = SEND_TIMEOUT) -> None:
    """Hand ``actor`` one record the driver made itself (``records.driver_record``) and wait until
    it is journaled. While Ray restarts the actor the record is sent again (the actor drops a copy
    it has by ``seq``); its floor, its own ``seq``, settles the stream up to it, so a record the
    driver gave up on never holds a later one back."""
    key = record_key(record)
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.get(actor.ingest.remote([record], {key[:3]: key[3]}), timeout=max(deadline - time.monotonic(), 0.1))
            return
        except ACTOR_ERRORS:
            if time.monotonic() >= deadline:
                raise
            time.sleep(PROBE_INTERVAL)
