"""Event-log parts: a run's rows as immutable Parquet files in one schema, each encoded once.

A part holds every row of one cut, of all ranks (sorted by rank, attempt and seq), named
``part-<rank>-<attempt>-<seq>.parquet`` under ``events/run_id=<id>/`` after the first row the cut
took: its name is fixed by its content, so a part re-sent after an uncertain failure, or cut again
from the same journal entry by a sink restarted from its watermark, overwrites itself. (A part per
rank would make 256 parts a cut at 256 ranks: ~4,000 small files a minute in the store and in
MLflow, and most of the actor's encoding time.) ``EventParts`` buffers rows, decides when to cut
(size, age, epoch end, close) and hands each part's bytes to every subscriber: the event-log
sink's object store, and the MLflow sink's ``events/`` artifacts. Encoding is most of what the
event log costs the callback actor, so when both sinks serve a run the MLflow sink subscribes to
the event-log sink's parts (``Sink.bind``) instead of encoding the same rows again; either sink
alone keeps its own ``EventParts``, cut the same way.
"""
from __future__ import annotations

import io
import threading
import time
import weakref
from collections import deque
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from callbacks.records import row_of
from trainers.events import EVENT, ROW_FIELDS
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
MAX_ROWS = 20_000  # rows per part at most (bounds the actor's memory)
MAX_AGE = 30.0  # seconds the oldest buffered row waits for its part at most
ENCODER_IDLE_S = 5.0  # how often an idle background encoder checks that its parts are still in use
EPOCH_END = "on_fit_epoch_end"  # every epoch's records are in parts once the epoch is over


def run_prefix(run_id: str) -> str:
    return f"events/run_id={run_id}/"


def part_key(run_id: str, rank: int, attempt: int, first_seq: int) -> str:
    return f"{run_prefix(run_id)}part-{rank}-{attempt}-{first_seq:09d}.parquet"


def rows_table(ranks: list[int], attempts: list[int], seqs: list[int], rows: list[list]) -> pa.Table:
    """Rows (``trainers.events.ROW_FIELDS``) and their streams' keys, one each -> an Arrow table
    in SCHEMA (the run id lives in the partition path). Columns are built by Arrow, not per row in
    Python: this runs on every record of a run."""
    columns = list(zip(*rows)) if rows else [()] * len(ROW_FIELDS)
    by_name = dict(zip(ROW_FIELDS, columns))
    by_name.update(rank=ranks, attempt=attempts, seq=seqs)
    arrays = [pa.array(by_name[f.name], f.type) for f in SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _coerced(ranks: list[int], attempts: list[int], seqs: list[int], rows: list) -> tuple[list, list, list, list]:
    """Rows with each field coerced to its type; a row that cannot be is dropped, with a warning."""
    kept = []
    for rank, attempt, seq, row in zip(ranks, attempts, seqs, rows):
        try:
            kept.append((rank, attempt, seq, row_of(dict(zip(ROW_FIELDS, row)))))
        except (TypeError, ValueError, AttributeError) as exc:
            LOGGER.warning(f"event log: dropped a malformed row ({type(exc).__name__}: {exc}): {str(row)[:200]}")
    return tuple(map(list, zip(*kept))) if kept else ([], [], [], [])


def table_of(ranks: list[int], attempts: list[int], seqs, rows: list) -> pa.Table:
    """``rows_table``, coercing each row's fields when a malformed row makes Arrow refuse them."""
    seqs = list(seqs)
    try:
        return rows_table(ranks, attempts, seqs, rows)
    except (pa.ArrowException, TypeError, ValueError):
        return rows_table(*_coerced(ranks, attempts, seqs, rows))


def stream_table(stream: tuple, first_seq: int, rows: list) -> pa.Table:
    """``table_of`` the rows of one stream ``(run_id, rank, attempt)``, consecutive from ``first_seq``."""
    n = len(rows)
    return table_of([int(stream[1])] * n, [int(stream[2])] * n, range(first_seq, first_seq + n), rows)


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

    def in_order(self) -> tuple[list[int], list[list]]:
        """Its seqs and rows sorted by seq (records may have been added out of order)."""
        seqs, rows = self.seqs, self.rows
        if any(b < a for a, b in zip(seqs, seqs[1:])):
            order = sorted(range(len(seqs)), key=seqs.__getitem__)
            seqs, rows = [seqs[i] for i in order], [rows[i] for i in order]
        return seqs, rows


class PartBuffer:
    """Collects rows and cuts them into a part per run (one, in practice), named after the first
    row added for it, its rows ordered by rank, attempt and seq.

    Rows arrive whole from the callback actor (``add_rows``: a worker's batch, consecutive seqs)
    or one record at a time (``add``); either way they are kept as rows and turned into columns
    only at the cut."""

    def __init__(self, mark: int = 0):
        self._groups: dict[tuple[int, int], _Group] = {}
        self._firsts: dict = {}  # run id -> (rank, attempt, seq) of the first row added for it
        self.count = 0
        self.first_time: float | None = None
        self.mark = mark  # journal entries wholly added so far (``Progress.fed`` when rows came with it)

    def _group(self, run_id, rank: int, attempt: int, seq: int) -> _Group:
        group = self._groups.get((rank, attempt))
        if group is None:
            group = self._groups[(rank, attempt)] = _Group(run_id)
        self._firsts.setdefault(group.run_id, (rank, attempt, seq))
        if self.first_time is None:
            self.first_time = time.monotonic()
        return group

    def add(self, record: dict, event: str | None = None) -> None:
        seq = int(record.get("seq", 0))
        group = self._group(record.get("run_id"), int(record.get("rank", -1)), int(record.get("attempt", 0)), seq)
        group.seqs.append(seq)
        group.rows.append(row_of(record, event))
        self.count += 1

    def add_rows(self, stream: tuple, first_seq: int, rows: list, mark: int | None = None) -> None:
        run_id, rank, attempt = stream
        group = self._group(run_id, int(rank), int(attempt), first_seq)
        group.seqs.extend(range(first_seq, first_seq + len(rows)))
        group.rows.extend(rows)
        self.count += len(rows)
        if mark is not None:
            self.mark = max(self.mark, mark)

    def age(self) -> float:
        return 0.0 if self.first_time is None else time.monotonic() - self.first_time

    def cut(self, run_id: str | None = None) -> list[tuple[str, bytes]]:
        """(key, parquet bytes) per run; ``run_id`` names the parts' run instead of the records'."""
        parts = []
        for run, first in self._firsts.items():
            groups = [(key, group) for key, group in sorted(self._groups.items()) if group.run_id == run]
            parts.append((part_key(run_id or run, *first), to_parquet(_groups_table(groups))))
        self._groups.clear()
        self._firsts.clear()
        self.count, self.first_time = 0, None
        return parts


def _groups_table(groups: list[tuple[tuple[int, int], _Group]]) -> pa.Table:
    """One table of the groups' rows, group after group, each in seq order."""
    ranks, attempts, seqs, rows = [], [], [], []
    for (rank, attempt), group in groups:
        group_seqs, group_rows = group.in_order()
        ranks += [rank] * len(group_seqs)
        attempts += [attempt] * len(group_seqs)
        seqs += group_seqs
        rows += group_rows
    return table_of(ranks, attempts, seqs, rows)


class EpochEnds:
    """Whether an epoch is over on every rank: how many epoch ends each rank has sent.

    With N ranks, cutting at each rank's epoch end made ~N cuts and ~3.7 N small parts per epoch,
    most of the callback actor's time at N=256 (benchmarks/scale.py); one cut per epoch keeps every
    rank's rows of it in parts once the epoch is over. Ranks are counted across attempts (a Ray
    Train restart re-runs an epoch on every rank, so the counts stay in step); a rank silent for
    ``stale_after`` s (gone with a smaller world) no longer holds the cut back."""

    def __init__(self, stale_after: float):
        self.stale_after = stale_after
        self._ranks: dict[int, list] = {}  # rank -> [epoch ends sent, monotonic time of its last rows]
        self._cut = 0  # epoch ends every live rank had sent at the last epoch cut

    def over(self, rank: int, ends: int) -> bool:
        """Note ``ends`` epoch-end rows of ``rank``; True when every live rank is past one more."""
        now = time.monotonic()
        seen = self._ranks.setdefault(rank, [0, now])
        seen[0], seen[1] = seen[0] + ends, now
        if not ends:
            return False
        done = min(n for n, heard in self._ranks.values() if now - heard < self.stale_after)
        if done <= self._cut:
            return False
        self._cut = done
        return True


class EventParts:
    """A run's rows cut into parts, each encoded once and handed to every subscriber.

    Parts are cut when ``max_rows`` rows are buffered, when the oldest is ``max_age`` s old (seen
    as rows arrive, or by ``cut_if_old`` from a courier), once every rank ended an epoch
    (``EpochEnds``) and on ``cut``.
    A subscriber is ``fn(key, data)`` and should only stage the bytes: it runs on the thread that
    encodes. Thread-safe: rows come from the actor, age cuts from a courier thread.

    With ``encode_in_background`` a cut due as rows arrive only sets the buffered rows aside (with
    their journal mark) for a thread of this object's to encode (``encode_cut``). The callback actor
    adds rows with its dispatcher's lock held, and a cut of N ranks' rows is N Parquet parts: encoded
    there, every other ingest call waited for them (~10% of the actor's wall time at N=256,
    docs/architecture.md). The thread is not a courier's: a courier backing off from a down store
    would leave the rows in memory, where encoded parts go to its spool on disk at once. Set-aside
    cuts are encoded one at a time, oldest first, so parts and watermarks go out in order."""

    def __init__(self, run_id: str | None = None, max_rows: int = MAX_ROWS, max_age: float = MAX_AGE):
        self.run_id, self.max_rows, self.max_age = run_id, max_rows, max_age
        self.rows = 0  # rows cut into parts so far
        self._buffer = PartBuffer()
        self._epochs = EpochEnds(max_age)
        self._receivers: list[Callable[[str, bytes], None]] = []
        self._watchers: list[Callable[[int, list[str]], None]] = []
        self._lock = threading.Lock()
        self._set_aside: deque[PartBuffer] = deque()  # cuts not encoded yet, oldest first
        self._encoding = threading.Lock()  # one encoder at a time: parts go out in cut order
        self._background = False
        self._encoder: threading.Thread | None = None
        self._cuts_waiting = threading.Event()

    def encode_in_background(self) -> None:
        """Cuts due as rows arrive are encoded by a thread of this object's (``close`` ends it)."""
        self._background = True

    def close(self) -> None:
        """Cut and encode what is left; the background thread, if any, ends."""
        self._background = False
        self.cut()
        self._cuts_waiting.set()

    def subscribe(self, receiver: Callable[[str, bytes], None]) -> None:
        with self._lock:
            self._receivers.append(receiver)

    def watch(self, watcher: Callable[[int, list[str]], None]) -> None:
        """``watcher(mark, keys)`` after each cut: the parts holding the first ``mark`` entries."""
        self._watchers.append(watcher)

    def unsubscribe(self, receiver: Callable[[str, bytes], None]) -> None:
        with self._lock:
            if receiver in self._receivers:
                self._receivers.remove(receiver)

    def add(self, record: dict, event: str) -> None:
        """One record (cut after it when it ends an epoch on the last rank)."""
        with self._lock:
            self._buffer.add(record, event)
            over = self._epochs.over(int(record.get("rank", -1)), int(event == EPOCH_END))
        self._cut_if_due(over)

    def add_rows(self, stream: tuple, first_seq: int, rows: list, mark: int | None = None) -> None:
        """A worker's batch (one journal entry) whole, cut after it when it ends an epoch on the
        last rank: parts end on entry boundaries, so a sink restarted from its watermark cuts the
        same first part again. ``mark``: the journal entries wholly added with this one."""
        ends = sum(row[EVENT] == EPOCH_END for row in rows)
        with self._lock:
            self._buffer.add_rows(stream, first_seq, rows, mark)
            over = self._epochs.over(int(stream[1]), ends)
        self._cut_if_due(over)

    def _cut_if_due(self, epoch_over: bool) -> None:
        if epoch_over or self._buffer.count >= self.max_rows or self._buffer.age() >= self.max_age:
            if self._background:
                self._set_aside_buffer()
                self._wake_encoder()
            else:
                self.cut()

    def cut_if_old(self) -> None:
        if self._buffer.age() >= self.max_age:
            self.cut()

    def cut(self) -> None:
        """Encode what is buffered into parts now (after the cuts set aside) and hand them out."""
        self._set_aside_buffer()
        self.encode_cut()

    def _set_aside_buffer(self) -> None:
        with self._lock:
            self._set_aside.append(self._buffer)
            self._buffer = PartBuffer(self._buffer.mark)

    def _wake_encoder(self) -> None:
        with self._lock:
            if self._encoder is None:
                self._encoder = threading.Thread(target=_encode_loop, args=(weakref.ref(self), self._cuts_waiting),
                                                 name="event-parts", daemon=True)
                self._encoder.start()
        self._cuts_waiting.set()

    def encode_cut(self) -> None:
        """Encode the cuts set aside, oldest first, and hand out their parts, then their marks."""
        with self._encoding:
            while (taken := self._take_set_aside()) is not None:
                self._hand_out(*taken)

    def _take_set_aside(self) -> tuple | None:
        """The oldest cut set aside with the subscribers to hand it to, or None."""
        with self._lock:
            if not self._set_aside:
                return None
            return self._set_aside.popleft(), list(self._receivers), list(self._watchers)

    def _hand_out(self, buffer: PartBuffer, receivers: list, watchers: list) -> None:
        self.rows += buffer.count
        parts = buffer.cut(self.run_id)
        for key, data in parts:
            for receiver in receivers:
                _hand(receiver, key, data)
        for watcher in watchers:
            watcher(buffer.mark, [key for key, _ in parts])


def _encode_loop(parts_ref: "weakref.ref[EventParts]", waiting: threading.Event) -> None:
    """The background encoder: ends once its parts are closed, or dropped unclosed (it holds them
    only while it encodes)."""
    while True:
        waiting.wait(ENCODER_IDLE_S)
        waiting.clear()
        parts = parts_ref()
        if parts is None or not parts._background:
            return
        parts.encode_cut()
        del parts


def _hand(receiver: Callable[[str, bytes], None], key: str, data: bytes) -> None:
    """One destination failing to stage a part (a full disk) costs it that part, not the others."""
    try:
        receiver(key, data)
    except Exception as exc:
        LOGGER.warning(f"event log: part {key} could not be staged for "
                       f"{getattr(receiver, '__qualname__', receiver)}: {type(exc).__name__}: {exc}")
