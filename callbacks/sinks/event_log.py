"""The durable event log: every record of a run as immutable Parquet part files, one schema.

Layout under a store: ``events/run_id=<id>/part-<rank>-<attempt>-<first seq>.parquet``. A part
holds consecutive records of one (rank, attempt); its name is fixed by its content, so a part
re-sent after an uncertain failure overwrites itself. Parts may overlap after an actor restart
re-sends records; ``read_event_log`` keeps one row per (rank, attempt, seq).
"""
from __future__ import annotations

import io
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

from callbacks.records import row_of, spans_after
from trainers.events import ROW_FIELDS
from callbacks.sinks.base import Sink, make_spool_dir
from callbacks.sinks.delivery import Courier
from callbacks.sinks.spool import FileStage
from callbacks.sinks.storage import ObjectStore
from trainers.utils import LOGGER

SCHEMA = pa.schema([
    ("event", pa.string()),
    ("rank", pa.int32()),
    ("attempt", pa.int64()),  # a start time in ms under Ray (callbacks/records.py)
    ("seq", pa.int64()),
    ("epoch", pa.int32()),
    ("step", pa.int64()),
    ("time", pa.float64()),
    ("metrics", pa.map_(pa.string(), pa.float64())),
    ("artifacts", pa.map_(pa.string(), pa.string())),
    ("final_eval", pa.bool_()),
])
PARTITION = pa.schema([("run_id", pa.string())])
KEY_COLUMNS = ("rank", "attempt", "seq")


def run_prefix(run_id: str) -> str:
    return f"events/run_id={run_id}/"


def part_key(run_id: str, rank: int, attempt: int, first_seq: int) -> str:
    return f"{run_prefix(run_id)}part-{rank}-{attempt}-{first_seq:09d}.parquet"


def rows_table(rank: int, attempt: int, seqs: list[int], rows: list[list]) -> pa.Table:
    """Rows of one (rank, attempt) (``trainers.events.ROW_FIELDS``) -> an Arrow table in SCHEMA
    (the run id lives in the partition path). Columns are built by Arrow, not per row in Python:
    this runs on every record of a run."""
    n = len(rows)
    columns = list(zip(*rows)) if rows else [()] * len(ROW_FIELDS)
    by_name = dict(zip(ROW_FIELDS, columns))
    by_name.update(rank=[rank] * n, attempt=[attempt] * n, seq=seqs)
    arrays = [pa.array(by_name[f.name], f.type) for f in SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _coerced(seqs: list[int], rows: list) -> tuple[list[int], list[list]]:
    """Rows with each field coerced to its type; a row that cannot be is dropped, with a warning."""
    kept_seqs, kept_rows = [], []
    for seq, row in zip(seqs, rows):
        try:
            kept_rows.append(row_of(dict(zip(ROW_FIELDS, row))))
        except (TypeError, ValueError, AttributeError) as exc:
            LOGGER.warning(f"event log: dropped a malformed row ({type(exc).__name__}: {exc}): {str(row)[:200]}")
            continue
        kept_seqs.append(seq)
    return kept_seqs, kept_rows


def to_parquet(table: pa.Table) -> bytes:
    """Dictionary encoding for the event names only: tried on every column (the default) it
    doubled the time and the size, since times, steps and seqs never repeat."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", use_dictionary=["event"])
    return sink.getvalue()


class _Group:
    """Rows of one (rank, attempt) waiting for the next cut, with their seqs."""

    __slots__ = ("run_id", "seqs", "rows")

    def __init__(self, run_id):
        self.run_id, self.seqs, self.rows = run_id, [], []


class PartBuffer:
    """Collects rows and cuts them into parts: one per (rank, attempt), ordered by seq.

    Rows arrive whole from the callback actor (``add_rows``: a worker's batch, consecutive seqs)
    or one record at a time (``add``); either way they are kept as rows and turned into columns
    only at the cut."""

    def __init__(self):
        self._groups: dict[tuple[int, int], _Group] = {}
        self.count = 0
        self.first_time: float | None = None

    def _group(self, run_id, rank: int, attempt: int) -> _Group:
        group = self._groups.get((rank, attempt))
        if group is None:
            group = self._groups[(rank, attempt)] = _Group(run_id)
        if self.first_time is None:
            self.first_time = time.monotonic()
        return group

    def add(self, record: dict, event: str | None = None) -> None:
        group = self._group(record.get("run_id"), int(record.get("rank", -1)), int(record.get("attempt", 0)))
        group.seqs.append(int(record.get("seq", 0)))
        group.rows.append(row_of(record, event))
        self.count += 1

    def add_rows(self, stream: tuple, first_seq: int, rows: list) -> None:
        run_id, rank, attempt = stream
        group = self._group(run_id, int(rank), int(attempt))
        group.seqs.extend(range(first_seq, first_seq + len(rows)))
        group.rows.extend(rows)
        self.count += len(rows)

    def age(self) -> float:
        return 0.0 if self.first_time is None else time.monotonic() - self.first_time

    def cut(self, run_id: str | None = None) -> list[tuple[str, bytes]]:
        """(key, parquet bytes) per group; ``run_id`` defaults to the records' own."""
        parts = []
        for (rank, attempt), group in sorted(self._groups.items()):
            seqs, rows = group.seqs, group.rows
            if any(b < a for a, b in zip(seqs, seqs[1:])):  # records added out of order
                order = sorted(range(len(seqs)), key=seqs.__getitem__)
                seqs, rows = [seqs[i] for i in order], [rows[i] for i in order]
            try:
                table = rows_table(rank, attempt, seqs, rows)
            except (pa.ArrowException, TypeError, ValueError):  # a malformed row: coerce each
                table = rows_table(rank, attempt, *_coerced(seqs, rows))
            key = part_key(run_id or group.run_id, rank, attempt, seqs[0])
            parts.append((key, to_parquet(table)))
        self._groups.clear()
        self.count, self.first_time = 0, None
        return parts


class EventLogSink(Sink):
    """Every record (all events, all ranks) to Parquet parts in ``store_uri``.

    Parts are cut when ``max_rows`` records are buffered, when the oldest is ``max_age`` s old,
    at each epoch end and at close. A cut part goes to a local spool file at once and is
    uploaded in the background, so an unreachable store only grows the spool.
    """

    kind = "eventlog"

    def __init__(self, store_uri: str, run_id: str, spool_dir: str | None = None,
                 max_rows: int = 20_000, max_age: float = 30.0, close_timeout: float = 60.0):
        super().__init__(store_uri=str(store_uri), run_id=run_id, spool_dir=spool_dir,
                         max_rows=max_rows, max_age=max_age, close_timeout=close_timeout)
        self._store = self._stage = self._courier = None
        self._buffer = PartBuffer()
        self._lock = threading.Lock()
        self._rows_written = 0
        self._closed: dict | None = None

    def start(self) -> None:
        self._start()

    def _start(self) -> None:
        if self._courier is None:
            self._store = ObjectStore.from_uri(self.store_uri)
            self._stage = FileStage(make_spool_dir(self.spool_dir, self.kind, self.run_id))
            self._courier = Courier(f"event log {self._store.uri()}", self._pump)
            self._courier.start()

    def handle(self, event: str, record: dict) -> None:
        if self._closed is not None:
            return
        self._start()
        with self._lock:
            self._buffer.add(record, event)
        self._maybe_cut(event == "on_fit_epoch_end")

    def handle_rows(self, stream: tuple, first_seq: int, rows: list) -> None:
        """A worker's batch as it came: stored as rows, cut at the same epoch ends as per record."""
        if self._closed is not None:
            return
        self._start()
        for start, end, epoch_end in spans_after(rows, "on_fit_epoch_end"):
            with self._lock:
                self._buffer.add_rows(stream, first_seq + start, rows[start:end])
            self._maybe_cut(epoch_end)

    def _maybe_cut(self, epoch_end: bool) -> None:
        if epoch_end or self._buffer.count >= self.max_rows or self._buffer.age() >= self.max_age:
            self._cut()

    def _cut(self) -> None:
        with self._lock:
            rows = self._buffer.count
            for key, data in self._buffer.cut(self.run_id):
                self._stage.stage_bytes(key, data)
        if rows:
            self._rows_written += rows
            self._courier.kick()

    def _pump(self) -> bool:
        if self._buffer.age() >= self.max_age:
            self._cut()
        for key, path in self._stage.pending():
            try:
                self._store.put_file(key, path)
            except Exception:
                self._stage.done(key, path, delivered=False)
                raise
            self._stage.done(key, path)
        return len(self._stage) == 0

    def flush(self) -> None:
        """Parts are cut by size, age, epoch end and close; this only hurries their upload."""
        if self._courier is not None:
            self._courier.kick()

    def report(self) -> dict:
        pending = self._stage.targets() if self._stage else []
        return {"sink": "eventlog", "store": self.store_uri, "run_id": self.run_id,
                "rows": self._rows_written, "pending_parts": pending,
                "spool_dir": str(self._stage.dir) if self._stage and pending else None,
                "last_error": self._courier.last_error if self._courier else None}

    def close(self, status: str = "FINISHED") -> dict:
        if self._closed is not None:
            return self._closed
        if self._courier is not None:
            self._cut()
            self._courier.close(self.close_timeout)
        self._closed = report = self.report()
        if report["pending_parts"]:
            LOGGER.warning(f"event log: {len(report['pending_parts'])} part files of run {self.run_id} "
                           f"were not delivered to {self.store_uri} (last error: {report['last_error']}); "
                           f"kept in {report['spool_dir']}")
        return report


def read_event_log(store_uri: str, run_id: str) -> pa.Table:
    """All records of ``run_id`` (one row per rank/attempt/seq) via ``pyarrow.dataset``."""
    import pyarrow.dataset as ds
    store = ObjectStore.from_uri(store_uri)
    keys = [k for k in store.list(run_prefix(run_id)) if k.endswith(".parquet")]
    schema = SCHEMA.append(PARTITION.field("run_id"))
    if not keys:
        return schema.empty_table()
    fs, base = store.arrow_fs()
    dataset = ds.dataset([f"{base}/{k}" for k in keys], schema=schema, format="parquet", filesystem=fs,
                         partitioning=ds.partitioning(PARTITION, flavor="hive"),
                         partition_base_dir=f"{base}/events")
    return dedup(dataset.to_table())


def dedup(table: pa.Table) -> pa.Table:
    """First row of each (rank, attempt, seq), sorted by rank, attempt, seq."""
    import pyarrow.compute as pc
    if table.num_rows == 0:
        return table
    indexed = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    firsts = indexed.group_by(list(KEY_COLUMNS), use_threads=False).aggregate([("_row", "min")])
    keep = pc.sort_indices(firsts["_row_min"])
    table = table.take(firsts["_row_min"].take(keep))
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
