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
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq

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


def to_table(records: list[dict]) -> pa.Table:
    """Records -> one Arrow table in SCHEMA (the run id lives in the partition path)."""
    columns = {name: [] for name in SCHEMA.names}
    for r in records:
        columns["event"].append(r["event"])
        columns["rank"].append(int(r.get("rank", -1)))
        columns["attempt"].append(int(r.get("attempt", 0)))
        columns["seq"].append(int(r.get("seq", 0)))
        columns["epoch"].append(int(r.get("epoch", 0)))
        columns["step"].append(int(r.get("step", 0)))
        columns["time"].append(float(r.get("time", 0.0)))
        columns["metrics"].append(list((r.get("metrics") or {}).items()))
        columns["artifacts"].append([(k, str(v)) for k, v in (r.get("artifacts") or {}).items()])
        columns["final_eval"].append(bool(r.get("final_eval", False)))
    return pa.table(columns, schema=SCHEMA)


def to_parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


class PartBuffer:
    """Collects records and cuts them into parts: one per (rank, attempt), ordered by seq."""

    def __init__(self):
        self._rows: dict[tuple[int, int], list[dict]] = defaultdict(list)
        self.count = 0
        self.first_time: float | None = None

    def add(self, record: dict) -> None:
        key = (int(record.get("rank", -1)), int(record.get("attempt", 0)))
        self._rows[key].append(record)
        self.count += 1
        if self.first_time is None:
            self.first_time = time.monotonic()

    def age(self) -> float:
        return 0.0 if self.first_time is None else time.monotonic() - self.first_time

    def cut(self, run_id: str | None = None) -> list[tuple[str, bytes]]:
        """(key, parquet bytes) per group; ``run_id`` defaults to the records' own."""
        parts = []
        for (rank, attempt), rows in sorted(self._rows.items()):
            rows.sort(key=lambda r: r.get("seq", 0))
            rid = run_id or rows[0]["run_id"]
            key = part_key(rid, rank, attempt, int(rows[0].get("seq", 0)))
            parts.append((key, to_parquet(to_table(rows))))
        self._rows.clear()
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
            self._buffer.add(record if record.get("event") else {**record, "event": event})
        if (self._buffer.count >= self.max_rows or self._buffer.age() >= self.max_age
                or event == "on_fit_epoch_end"):
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
