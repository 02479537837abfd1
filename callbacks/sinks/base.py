"""What every driver-side sink shares: event-named methods, cheap pickling, a spool directory.

Sinks are built on the driver and pickled into the callback actor; a restarted actor rebuilds
them from the same arguments. So a sink pickles as its constructor arguments only, and opens
clients, threads and directories lazily on first use.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from trainers.events import EVENT, EVENTS
from callbacks.records import record_of


class Sink:
    """Base: ``self.<event>(record)`` calls ``self.handle(event, record)`` for every event.

    ``handle_rows`` takes a worker's batch whole (the callback actor's path for batches that
    arrive in order); a sink that only needs some events names them in ``events``, so the rows
    of other events never become record dicts.
    """

    events: frozenset[str] | None = None  # the events this sink acts on; None: all

    def __init__(self, **args):
        """Keep the constructor arguments (for pickling) and expose each as an attribute."""
        self._args = args
        self.__dict__.update(args)

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
