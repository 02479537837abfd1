"""The event record: what a worker forwards to the driver for each lifecycle event (SPEC §8).

Records are plain dicts of JSON-like values (no tensors), small enough to batch by the
thousand. Fields:

- ``run_id``     str   the orchestrator's run id (stable across worker restarts)
- ``event``      str   an event name from ``trainers.events.EVENTS``
- ``rank``       int   global rank of the sending worker (-1 for a single process, and for the
                       records the driver sends itself: ``driver_record``)
- ``attempt``    int   worker-group attempt: larger after each Ray Train restart (a start time in ms;
                       0 in a single process and for the driver's records)
- ``seq``        int   per (run, rank, attempt) sequence number, from 0, no gaps
- ``epoch``      int   0-based epoch (``epochs`` during the final evaluation)
- ``step``       int   optimizer steps taken so far in the run (global, survives resume)
- ``time``       float wall clock (``time.time()``) when the event fired
- ``metrics``    dict[str, float]  what is known at that event (losses, lr, val metrics, fitness; in the
                 final evaluation rank 0 adds per-class values, ``trainers.metrics.base``)
- ``artifacts``  dict[str, str]    name -> local path or URI of a file made at that event
- ``final_eval`` bool  True for events of the final evaluation of best.pt

Driver callbacks receive one record. A driver callback is either a function registered for
one event (``add_callback(event, fn, where="driver")``) or a *sink*: an object whose methods
named after events take a record, plus optional ``start()``, ``flush()`` and ``close(status)``
where status is "FINISHED", "FAILED" or "KILLED".
"""
from __future__ import annotations

import time

from trainers.events import (ARTIFACTS, EPOCH, EVENT, FINAL_EVAL, METRICS, STEP, TIME, clean_metrics,
                             make_row)

# Where a forwarder sends what it holds without waiting for a full batch; and its last event.
FLUSH_EVENTS = frozenset({"on_train_epoch_end", "on_fit_epoch_end", "on_train_end",
                          "on_val_end", "on_predict_end", "on_export_end"})
CLOSE_EVENT = "teardown"

FIELDS = ("run_id", "event", "rank", "attempt", "seq", "epoch", "step", "time",
          "metrics", "artifacts", "final_eval")


def make_record(*, run_id: str, event: str, rank: int, attempt: int, seq: int, epoch: int,
                step: int, metrics: dict | None = None, artifacts: dict | None = None,
                final_eval: bool = False, now: float | None = None) -> dict:
    return {
        "run_id": run_id, "event": event, "rank": int(rank), "attempt": int(attempt),
        "seq": int(seq), "epoch": int(epoch), "step": int(step),
        "time": time.time() if now is None else now,
        "metrics": clean_metrics(metrics or {}), "artifacts": {k: str(v) for k, v in (artifacts or {}).items()},
        "final_eval": bool(final_eval),
    }


def driver_record(run_id: str, event: str, seq: int, epoch: int, metrics: dict,
                  artifacts: dict | None = None, attempt: int = 0) -> dict:
    """A record the driver itself sends to the run's callback actor (a ``DRIVER`` event of
    ``trainers.events``): a stream of its own, (run_id, -1, ``attempt``), numbered by its sender
    from 0, so the actor journals, orders and de-duplicates it like a worker's. A sweep trial has no
    rank -1 of its own (its workers are Ray Train's), and its actor's journal is new with each
    driver: the sweep's driver sends as attempt 0, each start of the trial (another process) as
    its start time in ms. ``step`` is 0: the driver does not count optimizer steps."""
    return make_record(run_id=run_id, event=event, rank=-1, attempt=attempt, seq=seq, epoch=epoch, step=0,
                       metrics=metrics, artifacts=artifacts)


def row_of(record: dict, event: str | None = None) -> list:
    """A record (any source: a worker, a test, a user) -> its row, each field coerced to its type."""
    return make_row(str(record.get("event") or event), record, now=float(record.get("time") or 0.0))


def record_of(stream: tuple, seq: int, row: list) -> dict:
    """One row of ``stream`` at ``seq`` -> its record."""
    return {"run_id": stream[0], "event": row[EVENT], "rank": stream[1], "attempt": stream[2], "seq": seq,
            "epoch": row[EPOCH], "step": row[STEP], "time": row[TIME], "metrics": row[METRICS],
            "artifacts": row[ARTIFACTS], "final_eval": row[FINAL_EVAL]}


def records_from_rows(stream: tuple, first_seq: int, rows: list) -> list[dict]:
    """Rows of one stream, consecutive from ``first_seq`` -> records (SPEC §8 dicts)."""
    return [record_of(stream, first_seq + i, row) for i, row in enumerate(rows)]


def record_key(record: dict) -> tuple:
    """Identity of a record for de-duplication: resends after an actor restart share it."""
    return record["run_id"], record["rank"], record["attempt"], record["seq"]
