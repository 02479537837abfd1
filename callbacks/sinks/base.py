"""What every driver-side sink shares: event-named methods, cheap pickling, a spool directory.

Sinks are built on the driver and pickled into the callback actor; a restarted actor rebuilds
them from the same arguments. So a sink pickles as its constructor arguments only, and opens
clients, threads and directories lazily on first use.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

from trainers.events import EVENT, EVENTS
from trainers.utils import write_atomic
from callbacks.records import record_of


class Sink:
    """Base: ``self.<event>(record)`` calls ``self.handle(event, record)`` for every event.

    ``handle_rows`` takes a worker's batch whole (the callback actor's path for batches that
    arrive in order); a sink that only needs some events names them in ``events``, so the rows
    of other events never become record dicts.
    """

    events: frozenset[str] | None = None  # the events this sink acts on; None: all
    # True: the sink calls ``self.progress.deliver(n)`` once the first n journal entries it was
    # handed are delivered for good, so a restart hands it only the rest. False: its state lives
    # in memory, and a restarted actor hands it the whole run again.
    tracks_delivery = False

    def __init__(self, **args):
        """Keep the constructor arguments (for pickling) and expose each as an attribute."""
        self._args = args
        self.__dict__.update(args)
        self.progress = Progress()  # the dispatcher's, once it takes the sink

    def __getstate__(self):
        return {"_args": self._args}

    def __setstate__(self, state):
        self.__init__(**state["_args"])

    def bind(self, peers: list) -> None:
        """See the run's other sinks (the dispatcher calls this once, before ``start``), so a sink
        can take over work a peer does anyway: the MLflow sink uploads the event-log sink's
        encoded parts instead of encoding the same rows again. By default a sink works alone."""

    def start(self) -> None:
        """Open clients and threads now rather than on the first record (the callback actor calls
        this at start-up, while workers are still starting, so training does not pay for it)."""

    def handle(self, event: str, record: dict) -> None:
        raise NotImplementedError

    def handle_rows(self, stream: tuple, first_seq: int, rows: list) -> None:
        """Consecutive rows of ``stream`` (run_id, rank, attempt) from ``first_seq`` (wire form,
        ``trainers.events.ROW_FIELDS``); by default each row of an event in ``events`` goes to
        the event's method as a record."""
        wanted = self.events
        for i, row in enumerate(rows):
            if wanted is None or row[EVENT] in wanted:
                getattr(self, row[EVENT])(record_of(stream, first_seq + i, row))

    def full(self) -> bool:
        """Whether the sink should take no more entries for now: what it queues for an endpoint
        that is down has reached its memory bound. With a journal the dispatcher then leaves later
        entries there and hands them over, in order, once this is False again, so an outage
        costs the journal's disk, not memory."""
        return False

    def flush(self) -> None:
        """Ask for delivery of what is queued; never blocks on the network."""

    def close(self, status: str = "FINISHED") -> dict:
        raise NotImplementedError


def _event_method(event: str):
    def method(self, record: dict) -> None:
        self.handle(event, record)
    method.__name__ = method.__qualname__ = event
    method.__doc__ = f"Handle one ``{event}`` record."
    return method


for _event in EVENTS:
    setattr(Sink, _event, _event_method(_event))


def make_spool_dir(spool_dir: str | None, kind: str, name: str | None) -> Path:
    """A fresh directory of this sink instance for undelivered data (under ``spool_dir`` if given)."""
    parent = None
    if spool_dir is not None:
        parent = Path(spool_dir).expanduser()
        parent.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name or "run"))[:60]
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{safe}-", dir=parent))


def drop_spool_dir(path: Path | None) -> None:
    """Remove a sink's spool folder once everything in it went out (at a clean close): what it
    held is delivered, and the journal keeps the run's entries. One left with data stays (the
    close's warning names it)."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


class Progress:
    """A sink's watermark: entries below ``delivered`` are delivered for good.

    The dispatcher sets ``fed`` (entries handed to the sink so far) before each hand-over; the
    sink's delivery thread calls ``deliver(n)`` once everything from the first ``n`` entries is out.
    That ``mark`` is kept in a file: a restarted sink is handed the entries after it again. Work a
    restarted sink is handed again anyway (the copy of a sealed journal segment) is held instead
    (``hold``): ``delivered`` waits for it, the file does not, so it never moves where a restart
    starts. Without a path (a sink used alone) it is kept in memory only.

    A sink is handed an entry before the fsync that makes it durable, and may deliver it first. A
    crash then loses the entry, and after the restart its number goes to other rows: a file that
    counted it would skip them. So the file keeps the latest mark that ``durable()`` (the journal's
    durable entry count) covers, and the marks past it are saved once the fsync that covers them
    ends (``settle``); a crash before that hands the sink those entries again, which it takes
    idempotently."""

    def __init__(self, path: str | os.PathLike | None = None, durable: Callable[[], int] | None = None):
        self.path = Path(path) if path is not None else None
        self.mark = 0
        if self.path is not None and self.path.is_file():
            self.mark = int(json.loads(self.path.read_text())["delivered"])
        self.fed = self.mark
        self._durable = durable
        self._unsaved: list[int] = []  # marks past what was durable when they were delivered
        self._holds: dict[str, int] = {}  # work not delivered yet -> the first entry it covers
        self._lock = threading.Lock()

    @property
    def delivered(self) -> int:
        with self._lock:
            return min([self.mark, *self._holds.values()])

    def deliver(self, n: int) -> None:
        with self._lock:
            if n <= self.mark:
                return
            self.mark = n
            if self.path is not None:
                self._unsaved.append(n)
                self._save()

    def settle(self) -> None:
        """Save the marks that became durable since they were delivered (the journal calls this
        after each fsync)."""
        with self._lock:
            if self._unsaved:
                self._save()

    def _save(self) -> None:
        """The latest mark the journal holds for good goes to the file (marks are cut boundaries:
        a sink that cuts parts by entries cuts them again from there under the same names)."""
        ceiling = self._durable() if self._durable is not None else math.inf
        kept = [m for m in self._unsaved if m <= ceiling]
        if kept:
            write_atomic(self.path, json.dumps({"delivered": kept[-1]}).encode())
            self._unsaved = self._unsaved[len(kept):]

    def hold(self, key: str, entry: int) -> None:
        """Work ``key``, covering entries from ``entry`` on, is not delivered yet: ``delivered``
        stays at or below ``entry`` until ``release(key)``."""
        with self._lock:
            self._holds[key] = entry

    def release(self, key: str) -> None:
        with self._lock:
            self._holds.pop(key, None)
