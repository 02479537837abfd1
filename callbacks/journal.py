"""A run's durable journal: every batch the dispatcher takes, on disk before it is acknowledged.

Layout of ``<journal>/<run id>/`` (a session that continues the run, ``resume=``, gets
``<run id>.1``, ``.2``, ...: its own entries and watermarks, the same run id):
- ``seg-<first entry>.arrow``: Arrow IPC stream segments. An *entry* is one in-order batch of
  one stream (the rows of ``trainers.events.ROW_FIELDS`` plus rank, attempt, seq), numbered
  from 0 across the run; a segment is rolled once it holds ``segment_rows`` rows. ``commit`` fsyncs
  (or ``stage``, appends held off, then ``sync``, which need not be: the fsync of concurrent calls'
  entries at once, ``callbacks/group_commit.py``), and the dispatcher acknowledges a batch to its
  worker only after.
  A segment rolled or closed at the run's end is *sealed*, never written again; ``watch_seals``
  hands each to the dispatcher, whose event-log sink copies it to the object store.
- ``progress/<sink>.json``: how many entries a sink has delivered for good (its watermark). A
  sink that restarts (a new actor, ``orchestrator recover``) is fed the entries after it again;
  sinks are idempotent on such redelivery.
- ``sinks.pkl``: the run's sinks (they pickle as their arguments), for ``orchestrator recover``.
- ``finished.json``: the run's end status and whether every sink delivered everything.
- ``run_id``: the run whose records the folder holds.
- ``lock``: held (``flock``) by the process that writes the journal; the OS frees it when that
  process dies, so ``orchestrator recover`` never takes over a live run.

A segment cut short by a crash keeps its whole entries: an entry not fully written was never
acknowledged, and its worker sends it again.
"""
from __future__ import annotations

import json
import os
import pickle
import weakref
from functools import partial
from pathlib import Path
from typing import Callable

import pyarrow as pa

from callbacks.sinks.base import Progress
from callbacks.sinks.event_parts import SCHEMA, stream_table
from trainers.events import ROW_FIELDS
from trainers.utils import try_lock, write_atomic

ENTRY = "entry"
JOURNAL_SCHEMA = SCHEMA.append(pa.field(ENTRY, pa.int64()))
SEGMENT_ROWS = 50_000
# Segments are written through Arrow's own buffered file, and ``stage`` hands what it holds to the
# OS: an entry's ~30 writes then take the GIL back no more (into a Python file each did, under the
# dispatcher's lock, and a woken call or a returning fsync took the GIL from the appending thread).
WRITE_BUFFER = 1 << 20
FINISHED, SINKS, LOCK, RUN_ID = "finished.json", "sinks.pkl", "lock", "run_id"


def session_folder(root: str | os.PathLike, run_id: str) -> Path:
    """A fresh journal folder for a session of ``run_id``: ``<root>/<run id>``, then ``<run id>.<n>``
    for each session that continues the run."""
    root, n = Path(root), 0
    folder = root / run_id
    while folder.exists():
        n += 1
        folder = root / f"{run_id}.{n}"
    return folder


class Journal:
    """Append-only entries of one run in ``directory``; pickles as its arguments (the actor's
    restart opens the same folder and carries on)."""

    def __init__(self, directory: str | os.PathLike, run_id: str, durable: bool = True,
                 segment_rows: int = SEGMENT_ROWS):
        self.dir, self.run_id = Path(directory), str(run_id)
        self.durable, self.segment_rows = bool(durable), int(segment_rows)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / RUN_ID).is_file():
            write_atomic(self.dir / RUN_ID, self.run_id.encode())
        self.next_entry, self.positions = 0, {}
        for batch in self._batches(columns=("rank", "attempt", "seq", ENTRY)):
            self._note(batch)
        self._file = self._writer = self._lock = None
        self._fd: int | None = None  # the open segment's descriptor, for fdatasync
        self._path: Path | None = None  # the open segment's
        self._on_seal: Callable[[Path, int], None] | None = None
        self._segment_rows = 0
        self._dirty = False
        self.durable_entries = self.next_entry  # entries below this are on disk for good
        self.durable_positions = dict(self.positions)  # per stream, the seq its durable entries end at
        self._watermarks: list[Progress] = []  # the sinks' (``progress``): saved as entries become durable
        self.syncs = 0  # fdatasync calls: with group commit, fewer than the calls acknowledged

    @classmethod
    def for_session(cls, root: str | os.PathLike, run_id: str, sinks: list) -> "Journal":
        """A fresh journal for a session of ``run_id`` under the journal root ``root``, with the
        sinks ``orchestrator recover`` rebuilds."""
        journal = cls(session_folder(Path(root).expanduser().resolve(), run_id), run_id)
        journal.save_sinks(sinks)
        return journal

    @staticmethod
    def run_id_in(folder: Path) -> str:
        """The run a journal folder holds (its name, for a folder written before ``run_id`` was)."""
        path = Path(folder) / RUN_ID
        return path.read_text().strip() if path.is_file() else Path(folder).name

    def claim(self) -> bool:
        """Take the journal for writing in this process (an advisory lock the OS drops when the
        process dies); False while a live process holds it."""
        if self._lock is None:
            self._lock = try_lock(self.dir / LOCK)
        return self._lock is not None

    def __reduce__(self):
        return Journal, (str(self.dir), self.run_id, self.durable, self.segment_rows)

    # ----------------------------------------------------------------- writing
    def append(self, stream: tuple, first_seq: int, rows: list) -> int:
        """Write one entry (not yet durable: ``commit``); its number."""
        n = self.next_entry
        table = stream_table(stream, first_seq, rows)
        table = table.append_column(ENTRY, pa.array([n] * table.num_rows, pa.int64()))
        self._open_segment(n).write_table(table)
        self._segment_rows += table.num_rows
        self.next_entry = n + 1
        key = (self.run_id, int(stream[1]), int(stream[2]))
        self.positions[key] = max(self.positions.get(key, 0), first_seq + len(rows))
        self._dirty = True
        return n

    def commit(self) -> None:
        """Make every appended entry durable (one fsync for all of them)."""
        self.sync(self.stage())

    def stage(self) -> tuple:
        """Hand the appended entries to the OS: ``(descriptor, entries, positions)`` for ``sync``,
        which makes the first ``entries`` (each stream up to its position) durable. Called while
        appends are held off; ``sync`` need not be, so concurrent calls append during the fsync and
        their entries wait for the next one. Called while no ``sync`` runs either: a full segment
        is rolled first (``roll``)."""
        self.roll()
        return self._handover()

    def _handover(self) -> tuple:
        fd = None
        if self._dirty and self._file is not None:
            self._file.flush()
            fd = self._fd
        self._dirty = False
        return fd, self.next_entry, dict(self.positions)

    def sync(self, staged: tuple) -> None:
        """Make what ``stage`` handed over durable; a failed fsync leaves it to sync again."""
        fd, entries, positions = staged
        if fd is not None and self.durable:
            try:
                os.fdatasync(fd)  # the data and the size; not the timestamps
            except OSError:
                self._dirty = True
                raise
            self.syncs += 1
        if entries >= self.durable_entries:
            self.durable_entries, self.durable_positions = entries, positions
        for progress in self._watermarks:  # marks a sink reached before this fsync may be saved now
            progress.settle()

    def durable_position(self, stream: tuple) -> int:
        """The seq up to which ``stream``'s entries are durable."""
        return self.durable_positions.get((self.run_id, int(stream[1]), int(stream[2])), 0)

    def roll(self) -> None:
        """Seal the segment once it is full and start a new one at the next append. Called while
        appends are held off and no ``sync`` runs; what was appended since the last ``stage`` is
        made durable first (a sealed segment is copied elsewhere: ``watch_seals``)."""
        if self._segment_rows >= self.segment_rows:
            self.sync(self._handover())
            self._close_segment()

    def _open_segment(self, first_entry: int):
        if self._writer is None:
            self._path = self.dir / f"seg-{first_entry:010d}.arrow"
            raw = pa.OSFile(str(self._path), "wb")
            self._fd, self._file = raw.fileno(), pa.BufferedOutputStream(raw, WRITE_BUFFER)
            self._writer = pa.ipc.new_stream(self._file, JOURNAL_SCHEMA)
            self._segment_rows = 0
        return self._writer

    def _close_segment(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._writer = self._file = None
            if self._on_seal is not None:
                self._on_seal(self._path, _first_entry(self._path))

    def watch_seals(self, on_seal: Callable[[Path, int], None]) -> None:
        """Call ``on_seal(path, first entry)`` for each sealed segment, one that is never written
        again (the event-log sink copies it to the object store): now for those an earlier process
        left (this one starts a segment of its own; one that holds no whole entry is left out: its
        name is taken again), then as this one rolls or closes each of its own."""
        self._on_seal = on_seal
        for path in self.segments():
            if path != self._path and _first_entry(path) < self.next_entry:
                on_seal(path, _first_entry(path))

    def close(self) -> None:
        self.commit()
        self._close_segment()

    # ----------------------------------------------------------------- reading
    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("seg-*.arrow"))

    def _batches(self, columns=None, since: int = 0):
        """Record batches of whole entries from entry ``since`` on (a torn tail is left out)."""
        for path in self.segments():
            if since > 0 and self._segment_end(path) <= since:
                continue
            for batch in read_segment(path):
                if columns:
                    batch = batch.select(list(columns))
                yield batch

    def _segment_end(self, path: Path) -> int:
        """First entry of the next segment (entries of one segment are below it)."""
        later = [_first_entry(p) for p in self.segments() if _first_entry(p) > _first_entry(path)]
        return min(later) if later else self.next_entry

    def _note(self, batch: pa.RecordBatch) -> None:
        entries = batch.column(ENTRY).to_pylist()
        if entries:
            self.next_entry = max(self.next_entry, entries[-1] + 1)
        for rank, attempt, seq in zip(*(batch.column(c).to_pylist() for c in ("rank", "attempt", "seq"))):
            key = (self.run_id, rank, attempt)
            if seq >= self.positions.get(key, 0):
                self.positions[key] = seq + 1

    def entries(self, since: int = 0):
        """``(entry, stream, first_seq, rows)`` of every durable entry from ``since`` on, in order.
        Batches wholly before ``since`` are skipped unconverted: a sink catching up reads from the
        middle of a segment again and again (``Dispatcher._from_journal``)."""
        for batch in self._batches(since=since):
            if batch.num_rows and batch.column(ENTRY)[batch.num_rows - 1].as_py() >= since:
                yield from _split_entries(self.run_id, batch, since)

    # ----------------------------------------------------------------- run-level files
    def progress(self, name: str) -> "Progress":
        progress = Progress(self.dir / "progress" / f"{name}.json", durable=partial(_durable_entries, weakref.ref(self)))
        self._watermarks.append(progress)
        return progress

    def save_sinks(self, sinks: list) -> None:
        write_atomic(self.dir / SINKS, pickle.dumps(sinks))

    def load_sinks(self) -> list:
        return pickle.loads((self.dir / SINKS).read_bytes())

    def finish(self, status: str, delivered: bool, reason: str | None = None) -> None:
        """Record the run's end and let the journal go; once every sink delivered everything the
        segments go (the object store holds their copies, and the event log the same records)."""
        self.close()
        if delivered:
            for path in self.segments():
                path.unlink(missing_ok=True)
        write_atomic(self.dir / FINISHED, json.dumps({"status": status, "delivered": delivered,
                                                       "reason": reason}).encode())
        self._release()

    def _release(self) -> None:
        """An ended run's journal is free for ``orchestrator recover``, whether or not the process
        that ran it (a notebook) goes on."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def finished(self) -> dict | None:
        return self.read_finished(self.dir / FINISHED)

    @staticmethod
    def read_finished(path: Path) -> dict | None:
        """How a run ended (``finish``), or None while it has not."""
        return json.loads(path.read_text()) if path.is_file() else None


def _durable_entries(journal_ref) -> int:
    """A sink's watermark reads it without keeping the journal (and its lock) alive: 0 once the
    journal is gone, so nothing more is saved (as if the process had died)."""
    journal = journal_ref()
    return journal.durable_entries if journal is not None else 0


def read_segment(path: Path):
    """The whole entries of one segment; a crash may have cut its last entry short."""
    try:
        reader = pa.ipc.open_stream(pa.OSFile(str(path)))
    except (pa.ArrowInvalid, OSError):
        return
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError):  # a torn tail
            return
        yield batch


def _first_entry(path: Path) -> int | None:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def _split_entries(run_id: str, batch: pa.RecordBatch, since: int):
    """One written table can hold several record batches, one record batch one entry (or part of
    one when Arrow splits a large table): group consecutive rows by entry."""
    data = batch.to_pydict()
    entries, n = data[ENTRY], len(data[ENTRY])
    start = 0
    while start < n:
        end = start
        while end < n and entries[end] == entries[start]:
            end += 1
        if entries[start] >= since:
            rows = [_row(data, i) for i in range(start, end)]
            stream = (run_id, data["rank"][start], data["attempt"][start])
            yield entries[start], stream, data["seq"][start], rows
        start = end


def _row(data: dict, i: int) -> list:
    row = []
    for field in ROW_FIELDS:
        value = data[field][i]
        row.append(dict(value or ()) if field in ("metrics", "artifacts") else value)
    return row
