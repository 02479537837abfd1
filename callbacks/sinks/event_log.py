"""The durable event log: every record of a run as immutable Parquet parts in an object store.

Layout under a store: ``events/run_id=<id>/part-<rank>-<attempt>-<seq>.parquet``, a part per cut
named after its first row (the format and the cutting are ``callbacks/sinks/event_parts.py``).
Parts may overlap after an actor restart re-sends records; ``read_event_log`` keeps one row per
(rank, attempt, seq). Beside them,
``events/run_id=<id>/_journal/<journal folder>/seg-<first entry>.arrow``: copies of the run's
sealed journal segments (``callbacks/journal.py``; the folder is ``<id>``, or ``<id>.1``, ... for
a resumed session). The ``_`` keeps them out of Parquet readers of ``events/`` (pyarrow, Spark
and Hive skip such names).
"""
from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa

from callbacks.sinks.event_parts import MAX_AGE, MAX_ROWS, SCHEMA, EventParts, run_prefix
from callbacks.sinks.storage import ObjectStore
from callbacks.sinks.store_sink import StoreSink

PARTITION = pa.schema([("run_id", pa.string())])
KEY_COLUMNS = ("rank", "attempt", "seq")


def journal_key(run_id: str, segment: Path) -> str:
    """Where the copy of a journal segment goes: named by its folder and file, which never hold
    other content (a sealed segment is never written again), so a copy sent twice overwrites itself."""
    return f"{run_prefix(run_id)}_journal/{segment.parent.name}/{segment.name}"


class EventLogSink(StoreSink):
    """Every record (all events, all ranks) to Parquet parts in ``store_uri``.

    Parts are cut when ``max_rows`` records are buffered, when the oldest is ``max_age`` s old,
    after the batch that ends an epoch on the last rank (``EpochEnds``) and at close. A cut part
    goes to a local spool file at once and is uploaded in the background, so an unreachable store
    only grows the spool. ``parts`` hands the same encoded parts to other subscribers (a bound
    MLflow sink).

    Its watermark moves when every part of a cut is in the store, before any later part goes:
    a restart re-cuts from there, so a part uploaded just before a crash is cut again with the
    same first rows, under the same name, and overwritten, never duplicated.
    """

    kind, label, pending_key = "eventlog", "event log", "pending_parts"
    events = None  # all: the event log is the run's complete record

    def __init__(self, store_uri: str, run_id: str, spool_dir: str | None = None,
                 max_rows: int = MAX_ROWS, max_age: float = MAX_AGE, close_timeout: float = 60.0, s3=None):
        super().__init__(store_uri, run_id, spool_dir, close_timeout, s3, max_rows=max_rows, max_age=max_age)
        self.parts = EventParts(run_id, max_rows, max_age)
        self._cuts: list[tuple[int, set[str]]] = []  # (mark, parts not yet uploaded), oldest first
        self._cuts_lock = threading.Lock()

    def start(self) -> None:
        self._start()

    def _opened(self, courier) -> None:
        self.parts.subscribe(courier.put_bytes)
        self.parts.watch(self._cut)
        self.parts.encode_in_background()  # not under the callback actor's lock (EventParts)

    def _cut(self, mark: int, keys: list[str]) -> None:
        with self._cuts_lock:
            staged = set(self._courier.pending())
            self._cuts.append((mark, {key for key in keys if key in staged}))
            self._settle()

    def take_segment(self, path: Path, first_entry: int) -> None:
        """A sealed journal segment (the dispatcher's ``Journal.watch_seals``): copied into the
        stage now, so the journal may delete it once the run is delivered, and uploaded by the
        courier. The run is not delivered (``Progress.hold``) until the copy is in the store."""
        if self._closed is None:
            key = journal_key(self.run_id, Path(path))
            self.parts.encode_cut()  # the cuts set aside hold rows of this segment: their parts go first
            self._start().put_file(key, path)
            with self._cuts_lock:
                if key in self._courier.pending():  # else it went up already
                    self.progress.hold(key, first_entry)

    def _sent_one(self, target: str) -> None:
        with self._cuts_lock:
            self.progress.release(target)
            for _, waiting in self._cuts:
                waiting.discard(target)
            self._settle()

    def _settle(self) -> None:
        while self._cuts and not self._cuts[0][1]:
            self.progress.deliver(self._cuts.pop(0)[0])

    def _idle(self, taken: int) -> None:
        """Rows not cut yet are not delivered: the watermark follows the cuts (``_sent_one``)."""

    def handle(self, event: str, record: dict) -> None:
        if self._closed is None:
            self._start()
            self.parts.add(record, event)

    def handle_rows(self, stream: tuple, first_seq: int, rows: list) -> None:
        """A worker's batch (one journal entry) as it came: stored as rows, cut after it when it
        holds an epoch end."""
        if self._closed is None:
            self._start()
            self.parts.add_rows(stream, first_seq, rows, self.progress.fed)

    def _before_pump(self) -> int:
        self.parts.cut_if_old()
        return 0

    def _before_close(self) -> None:
        self.parts.close()

    def _counts(self) -> dict:
        return {"rows": self.parts.rows}


def read_event_log(store_uri: str, run_id: str, dedup_rows: bool = True, s3=None) -> pa.Table:
    """All records of ``run_id`` via ``pyarrow.dataset``: one row per rank/attempt/seq, sorted;
    ``dedup_rows=False`` gives every stored row, sorted the same way (to check that none is there
    twice: a part holds many ranks' rows, so the parts' order is not any rank's)."""
    import pyarrow.dataset as ds
    store = ObjectStore.from_uri(store_uri, s3)
    keys = [k for k in store.list(run_prefix(run_id)) if k.endswith(".parquet")]
    schema = SCHEMA.append(PARTITION.field("run_id"))
    if not keys:
        return schema.empty_table()
    fs, base = store.arrow_fs()
    dataset = ds.dataset([f"{base}/{k}" for k in keys], schema=schema, format="parquet", filesystem=fs,
                         partitioning=ds.partitioning(PARTITION, flavor="hive"),
                         partition_base_dir=f"{base}/events")
    table = dataset.to_table()
    return dedup(table) if dedup_rows else in_stream_order(table)


def dedup(table: pa.Table) -> pa.Table:
    """First row of each (rank, attempt, seq), sorted by rank, attempt, seq."""
    if table.num_rows == 0:
        return table
    indexed = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    firsts = indexed.group_by(list(KEY_COLUMNS), use_threads=False).aggregate([("_row", "min")])
    return in_stream_order(table.take(firsts["_row_min"]))


def in_stream_order(table: pa.Table) -> pa.Table:
    """Sorted by rank, attempt and seq; rows stored twice stay in their stored order (a stable sort)."""
    return table.sort_by([(c, "ascending") for c in KEY_COLUMNS])


EPOCH_EVENTS = ("on_train_epoch_start", "on_train_epoch_end", "on_model_save", "on_fit_epoch_end")


def epoch_events(table: pa.Table) -> list[dict]:
    """Epoch-level events as the run finally had them: after a Ray Train restart, the restarted
    attempt re-runs the interrupted epoch, so per (event, rank, epoch, final_eval) the latest
    attempt wins."""
    latest: dict[tuple, dict] = {}
    for row in table.to_pylist():
        if row["event"] in EPOCH_EVENTS:
            key = (row["event"], row["rank"], row["epoch"], row["final_eval"])
            if key not in latest or row["attempt"] >= latest[key]["attempt"]:
                latest[key] = row
    return sorted(latest.values(), key=lambda r: (r["rank"], r["attempt"], r["seq"]))
