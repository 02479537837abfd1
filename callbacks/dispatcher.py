"""Driver side of event forwarding: the dispatcher of worker records to driver callbacks.

It runs inside the callback actor (``callbacks/actor.py``) on Ray, and in the training process
itself when a run has no Ray workers.

Driver callbacks are ``(event, fn)`` pairs (``fn(record)``) and sink objects (event-named
methods taking a record, optional ``start()``, ``flush()`` and ``close(status)``); both run here,
in registration order, so a slow or failing logger never runs in a training process.

Each stream (run_id, rank, attempt) is dispatched strictly in ``seq`` order: early arrivals
wait until the gap fills, duplicates are dropped. ``ingest`` returns only after dispatching and
after the journal holds the batch for good, and acknowledges the next expected ``seq`` per
stream, so an acknowledged record has reached every callback and survives a crash. Calls may come
on several threads: one lock lets one dispatch at a time (in journal order); a call waits for the
disk after it has let go of the lock, and calls waiting together share one fsync
(``callbacks/group_commit.py``). A saturated forwarder's calls do not wait (``wait=False``):
they return at once, acknowledging what is durable by then, and the rest is acknowledged by a
later call (its ``taken`` says what the actor holds meanwhile). The actor is restartable
(``max_restarts=-1``): Ray rebuilds it from the same constructor arguments, the forwarders
resend what was not acknowledged, and each batch's ``floors`` tell the new incarnation where each
stream resumes.

A failing callback is isolated: logged once per callback and event, counted, and listed in the
report; it never raises into ``ingest``.
"""
from __future__ import annotations

import math
import threading
import time
import warnings
import weakref
from typing import Callable, Iterable

import ray

from trainers.events import EVENT, EVENTS, check_event
from trainers.registry import callback_name
from callbacks.group_commit import GroupCommit
from callbacks.journal import Journal
from callbacks.records import record_key, record_of, records_from_rows, row_of
from callbacks.sinks.base import Progress, Sink
from trainers.utils import LOGGER, UserError

STATUSES = ("FINISHED", "FAILED", "KILLED")
# A sink that fell behind (it was full) takes the journal's entries in chunks of this many rows,
# the lock held (~10-40 ms): ingest calls wait that long at most behind a chunk.
CATCH_UP_ROWS = 5_000
CATCH_UP_EVERY = 0.2  # seconds between looks at sinks that fell behind, at ingest calls


class _Entry:
    """One driver callback: a function for one event, or a sink with event-named methods (and
    maybe ``handle_rows``, which takes in-order batches whole)."""

    __slots__ = ("name", "obj", "handlers", "is_sink", "rows")

    def __init__(self, name: str, obj, handlers: dict[str, Callable], is_sink: bool, takes_rows: bool = False):
        self.name, self.obj, self.handlers, self.is_sink = name, obj, handlers, is_sink
        rows = getattr(obj, "handle_rows", None) if takes_rows else None
        self.rows: Callable | None = rows if callable(rows) else None


def _entry(item, index: int) -> _Entry:
    if isinstance(item, tuple):
        if len(item) != 2 or not isinstance(item[0], str):
            raise UserError(f"driver callback #{index}: expected (event, fn) or a sink object, got {item!r}")
        event, fn = check_event(item[0]), item[1]
        if not callable(fn):
            raise UserError(f"driver callback #{index} for {event!r} is not callable: {fn!r}")
        return _Entry(callback_name(fn), fn, {event: fn}, is_sink=False)
    named = item.events if isinstance(item, Sink) else None  # a Sink may name the events it acts on
    wanted = EVENTS if named is None else named  # (an empty set: none, e.g. a node sampler)
    handlers = {e: getattr(item, e) for e in EVENTS if e in wanted and callable(getattr(item, e, None))}
    if not handlers and not isinstance(item, Sink):  # a Sink may act on start and close alone
        raise UserError(f"driver callback #{index} ({type(item).__name__}) is neither an (event, fn) "
                        f"pair nor a sink with a method named after an event")
    return _Entry(type(item).__name__, item, handlers, is_sink=True, takes_rows=bool(wanted))  # naming none: no rows


def driver_entries(driver_callbacks: Iterable) -> list[_Entry]:
    """Validate and normalize driver callbacks, keeping their registration order."""
    return [_entry(item, i) for i, item in enumerate(driver_callbacks or ())]


def listened_events(driver_callbacks: Iterable) -> set[str]:
    """The events some driver callback handles: what forwarders need to send (``events=``)."""
    return {event for entry in driver_entries(driver_callbacks) for event in entry.handlers}


def bind_sinks(entries: list[_Entry]) -> None:
    """Introduce each ``Sink`` to the others (``Sink.bind``) before any of them starts."""
    sinks = [entry.obj for entry in entries if isinstance(entry.obj, Sink)]
    for sink in sinks:
        sink.bind([peer for peer in sinks if peer is not sink])


class _Feed:
    """A bulk sink's intake: its ``handle_rows``, its count of entries handed (``progress.fed``;
    None for a bulk callback that is no ``Sink``) and whether it has room (``Sink.full``)."""

    __slots__ = ("index", "handle_rows", "progress", "full")

    def __init__(self, index: int, handle_rows: Callable, progress: Progress | None, obj):
        self.index, self.handle_rows, self.progress = index, handle_rows, progress
        self.full = obj.full if progress is not None else None

    def takes(self, entry: int | None) -> bool:
        """Whether journal entry ``entry`` (None: no journal) goes to the sink as it is dispatched:
        only while the sink has taken every entry before it and has room. Otherwise it comes
        later from the journal, in order, after the entries the sink is missing."""
        if entry is None or self.progress is None:
            return True
        return self.progress.fed == entry and not self.full()


class _Stream:
    """Where one stream is: records waiting behind a gap (``pending``, by seq), or whole batches
    that arrived ahead of the one before them (``early``, by first seq; never both at once)."""

    __slots__ = ("key", "next_seq", "pending", "early")

    def __init__(self, key: tuple, next_seq: int = 0):
        self.key, self.next_seq = key, next_seq
        self.pending: dict[int, dict] = {}
        self.early: dict[int, list] = {}


class Dispatcher:
    """The actor's logic as a plain class; ``CallbackActor`` below is its Ray actor form."""

    def __init__(self, driver_callbacks: Iterable = (), journal: Journal | None = None):
        self._entries = driver_entries(driver_callbacks)
        self._row_table: dict[str, list[tuple[int, Callable]]] = {}  # event -> per-record handlers
        for index, entry in enumerate(self._entries):
            for event, fn in entry.handlers.items():
                if entry.rows is None:
                    self._row_table.setdefault(event, []).append((index, fn))
        self._bulk = [_Feed(index, entry.rows, _progress_of(entry.obj, index, journal), entry.obj)
                      for index, entry in enumerate(self._entries) if entry.rows]
        bind_sinks(self._entries)
        self._journal = journal
        self._lock = threading.Lock()  # the actor takes calls on several threads: one at a time in here
        self._group = GroupCommit(journal, self._lock) if journal is not None else None
        if journal is not None and not journal.claim():
            raise RuntimeError(f"journal {journal.dir} is in use by a live process")
        self._streams: dict[tuple, _Stream] = {key: _Stream(key, position) for key, position
                                               in (journal.positions.items() if journal else ())}
        self._counts = dict(received=0, duplicates=0, dispatched=0, malformed=0,
                            after_finish=0, gaps=0, batches=0, from_journal=0)
        self._next_look = 0.0  # monotonic time of the next look at sinks that fell behind
        self._failures: dict[tuple[int, str], list] = {}  # (entry, event) -> [count, first error]
        self._status: str | None = None
        self._busy = 0.0  # seconds spent inside ingest (dispatch included)
        self._sink_reports: dict = {}  # what each sink's close(status) returned
        self._restarted = _was_restarted()
        self._incarnation = time.time_ns()  # a restarted actor's is larger: what an old one took may be gone
        if self._restarted:
            LOGGER.warning("callback actor restarted: workers resend what was not acknowledged")
        if journal is not None:  # sealed segments to the sinks that copy them (the event log's), weakly:
            me = weakref.proxy(self)  # a dispatcher dropped unfinished frees its journal's lock at once
            journal.watch_seals(lambda path, first: me._call_sinks("take_segment", path, first))

    # ------------------------------------------------------------------ ingest
    def ping(self) -> bool:
        return True

    def ingest(self, batch: list[dict], floors: dict | None = None) -> dict:
        """Dispatch a batch in per-stream seq order; ack = next expected seq of each stream,
        returned once every entry it names is durable."""
        return self._take(lambda: self._ingest(batch, floors))

    def ingest_rows(self, stream: tuple, first_seq: int, rows: list, floors: dict | None = None,
                    wait: bool = True) -> dict:
        """``ingest`` for a forwarder's compact batch: consecutive rows of one stream. Without
        ``wait`` it returns at once: ``next_seq`` names only rows already durable, ``taken`` what
        the actor dispatched (the rest becomes durable within about an fsync)."""
        return self._take(lambda: self._ingest_rows(stream, first_seq, rows, floors), wait)

    def durable(self, stream: tuple) -> dict:
        """The acknowledgement of every row of ``stream`` taken so far, once they are durable: what
        a forwarder asks when calls that did not wait left rows unacknowledged and it has nothing
        more to send."""
        key = tuple(stream)
        return self._take(lambda: {"received": 0, "duplicates": 0, "next_seq": {key: self._stream(key).next_seq}})

    def _take(self, append, wait: bool = True) -> dict:
        """An ingest call: on its way (``GroupCommit.arrive``), ``append()`` under the lock, then
        the acknowledgement it returns once what it names is durable (or at once, naming only
        what is, without ``wait``)."""
        waits = wait and self._group is not None
        if waits:
            self._group.arrive()
        with self._lock:
            ack = self._appending(append, waits)
            ack["taken"], ack["incarnation"] = ack["next_seq"], self._incarnation
            if not waits:
                ack["next_seq"] = {key: self._durable_seq(key, seq) for key, seq in ack["taken"].items()}
            ticket = self._appended(waits)
        self._durable(ticket)
        return ack

    def _durable_seq(self, key: tuple, taken: int) -> int:
        """Where ``key``'s durable rows end, ``taken`` being where its dispatched rows do (rows
        below a floor its forwarder sent may be left out: that forwarder has them acknowledged)."""
        journal = self._journal
        if journal is None or journal.durable_entries >= journal.next_entry:
            return taken
        return min(taken, journal.durable_position(key))

    def _ingest(self, batch: list[dict], floors: dict | None) -> dict:
        started = time.perf_counter()
        touched = self._apply_floors(floors)
        duplicates = self._counts["duplicates"]
        self._counts["batches"] += 1
        for record in batch:
            stream = self._accept(record, touched)
            if stream is not None and stream.pending:
                self._drain(stream)
        self._busy += time.perf_counter() - started
        return {"received": len(batch), "duplicates": self._counts["duplicates"] - duplicates,
                "next_seq": {key: stream.next_seq for key, stream in touched.items()}}

    def _ingest_rows(self, stream: tuple, first_seq: int, rows: list, floors: dict | None) -> dict:
        """The common case, a batch that continues its stream with nothing waiting, is dispatched
        without building a record per row: sinks with ``handle_rows`` take the rows whole, and
        records are built only for rows that another callback listens to. Anything else (a gap,
        a resend) goes through ``ingest`` record by record, except a batch that comes ahead of the
        one before it (the actor's threads may start calls out of order): it waits whole, and is
        dispatched whole once the stream reaches it."""
        started = time.perf_counter()
        key, first_seq = tuple(stream), int(first_seq)
        touched = self._apply_floors(floors)
        current = touched.get(key) or self._stream(key)
        if self._status is not None or first_seq < current.next_seq or current.pending:
            return self._ingest(records_from_rows(key, first_seq, rows), floors)
        touched[key] = current
        self._counts["batches"] += 1
        self._counts["received"] += len(rows)
        if first_seq > current.next_seq:
            current.early[first_seq] = rows
        else:
            self._dispatch_rows(key, first_seq, rows)
            current.next_seq = first_seq + len(rows)
            self._drain_early(current)
        self._busy += time.perf_counter() - started
        return {"received": len(rows), "duplicates": 0,
                "next_seq": {k: s.next_seq for k, s in touched.items()}}

    def _apply_floors(self, floors: dict | None) -> dict[tuple, _Stream]:
        return {tuple(key): self._apply_floor(tuple(key), int(floor)) for key, floor in (floors or {}).items()}

    def _stream(self, key: tuple) -> _Stream:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(key)
        return stream

    def _apply_floor(self, key: tuple, floor: int) -> _Stream:
        """Everything below ``floor`` was dispatched already (maybe by an earlier incarnation)."""
        stream = self._stream(key)
        if floor > stream.next_seq:
            self._unstash(stream)
            for seq in [s for s in stream.pending if s < floor]:
                del stream.pending[seq]
                self._counts["duplicates"] += 1
            stream.next_seq = floor
            self._drain(stream)
        return stream

    def _accept(self, record, touched: dict) -> _Stream | None:
        self._counts["received"] += 1
        try:
            key = record_key(record)
            stream_key, seq = key[:3], int(key[3])
        except (KeyError, TypeError, ValueError, IndexError):
            self._count_malformed(record)
            return None
        stream = touched.get(stream_key) or self._stream(stream_key)
        touched[stream_key] = stream
        if stream.early:
            self._unstash(stream)
        if self._status is not None:  # sinks are closed: consume so senders stop resending
            if self._counts["after_finish"] == 0:
                LOGGER.warning(f"callback actor: records arrived after finish({self._status}); "
                               f"they are counted, not dispatched")
            self._counts["after_finish"] += 1
            stream.next_seq = max(stream.next_seq, seq + 1)
            return None
        if seq < stream.next_seq or seq in stream.pending:
            self._counts["duplicates"] += 1
        elif seq == stream.next_seq and not stream.pending:
            self._dispatch(record)
            stream.next_seq += 1
        else:
            stream.pending[seq] = record
        return stream

    def _drain_early(self, stream: _Stream) -> None:
        """Dispatch the early batches the stream has now reached, whole (one journal entry each);
        rows it has already passed (a resend cut elsewhere) are duplicates."""
        for first in sorted(stream.early):
            if first > stream.next_seq:
                return
            rows = stream.early.pop(first)
            fresh = rows[stream.next_seq - first:]
            self._counts["duplicates"] += len(rows) - len(fresh)
            if fresh:
                self._dispatch_rows(stream.key, stream.next_seq, fresh)
                stream.next_seq += len(fresh)

    def _unstash(self, stream: _Stream) -> None:
        """Early batches become records waiting by seq, for the record-by-record path."""
        for first, rows in stream.early.items():
            for seq, row in enumerate(rows, first):
                if seq < stream.next_seq or seq in stream.pending:
                    self._counts["duplicates"] += 1
                else:
                    stream.pending[seq] = record_of(stream.key, seq, row)
        stream.early.clear()

    def _drain(self, stream: _Stream) -> None:
        pending = stream.pending
        while stream.next_seq in pending:
            self._dispatch(pending.pop(stream.next_seq))
            stream.next_seq += 1

    def _count_malformed(self, record) -> None:
        if self._counts["malformed"] == 0:
            LOGGER.warning(f"callback actor: dropped a malformed record (further ones are counted): "
                           f"{str(record)[:200]}")
        self._counts["malformed"] += 1

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, record: dict) -> None:
        key = record_key(record)
        self._dispatch_rows(tuple(key[:3]), int(key[3]), [row_of(record)])

    def _appending(self, append, arrived: bool):
        """Under the lock: ``append()``, then sinks that fell behind may catch up; the group commit
        is told when that is done, or failed, if the call ``arrived`` (``GroupCommit.arrive``)."""
        try:
            ack = append()
            self._feed_lagging()
        except BaseException:
            if arrived:
                self._group.appended(failed=True)
            raise
        if arrived:
            self._group.appended()
        return ack

    def _appended(self, waits: bool) -> tuple | None:
        """An ingest call's last step under the lock: it takes its place in the group commit
        (``GroupCommit.enter``) for every entry appended so far (its own, and those of calls
        before it whose acknowledgements its own may repeat), or leaves them to its syncer."""
        if self._group is None:
            return None
        if waits:
            return self._group.enter(self._journal.next_entry)
        self._group.owe(self._journal.next_entry)
        return None

    def _durable(self, ticket: tuple | None) -> None:
        """Wait, the lock released, until the entries of ``ticket`` are durable, so the
        acknowledgement a call returns names nothing that is not; calls waiting together share
        one fsync, and others append meanwhile (``GroupCommit``)."""
        if ticket is not None:
            self._group.wait(ticket)

    def _call(self, handlers, event: str, record: dict) -> None:
        for index, fn in handlers:
            try:
                fn(record)
            except Exception as exc:  # isolate: a driver callback never breaks ingest
                self._fail(index, event, exc)

    def _dispatch_rows(self, stream: tuple, first_seq: int, rows: list) -> None:
        """An in-order batch (one journal entry): whole to bulk sinks, then record by record to
        other callbacks (each callback still sees every stream's records in seq order). A sink
        that is full, or behind, gets it later from the journal (``_feed_lagging``)."""
        entry = self._journal.append(stream, first_seq, rows) if self._journal is not None else None
        for feed in self._bulk:
            if feed.takes(entry):
                self._feed(feed, stream, first_seq, rows)
        table = self._row_table
        if table:
            for i, row in enumerate(rows):
                handlers = table.get(row[EVENT])
                if handlers:
                    self._call(handlers, row[EVENT], record_of(stream, first_seq + i, row))
        self._counts["dispatched"] += len(rows)

    def _feed(self, feed: _Feed, stream, first_seq, rows) -> None:
        """One entry to one bulk sink; its ``progress.fed`` counts it first (the sink reads it)."""
        if feed.progress is not None:
            feed.progress.fed += 1
        try:
            feed.handle_rows(stream, first_seq, rows)
        except Exception as exc:
            self._fail(feed.index, "handle_rows", exc)

    def _lagging(self) -> list[_Feed]:
        """Sinks not yet handed every durable journal entry (none without a journal)."""
        if self._journal is None:
            return []
        end = self._journal.durable_entries
        return [feed for feed in self._bulk if feed.progress is not None and feed.progress.fed < end]

    def _from_journal(self, feeds: list[_Feed], most_rows: float = math.inf, room: bool = True) -> int:
        """Hand each of ``feeds`` the journal's durable entries from its ``progress.fed`` on, in
        order, while it has room (regardless, without ``room``), until ``most_rows`` rows are
        handed; the entries read. How every sink that is behind catches up: at start
        (``_replay``), once it has room again (``_feed_lagging``), at the end (``_feed_rest``)."""
        end, handed, read = self._journal.durable_entries, 0, 0
        for entry, stream, first_seq, rows in self._journal.entries(min(f.progress.fed for f in feeds)):
            takers = [f for f in feeds if f.progress.fed == entry and not (room and f.full())]
            if entry >= end or handed >= most_rows or not takers and all(f.progress.fed <= entry for f in feeds):
                break
            for feed in takers:
                self._feed(feed, stream, first_seq, rows)
            handed += len(rows) * len(takers)
            read += 1
        return read

    def _replay(self) -> None:
        """Hand each sink the journal's entries after its watermark (a restarted actor, a
        recovered run): what it had taken but not delivered died with the old process."""
        behind = self._lagging()
        if behind:
            replayed = self._from_journal(behind)
            LOGGER.info(f"callback actor: {replayed} journal entries handed again to sinks that had not delivered them")

    def _feed_lagging(self, now: bool = False) -> None:
        """Sinks that fell behind (they were full) and have room again take the journal's entries
        from where they stopped, CATCH_UP_ROWS rows per call at most; looked at every
        CATCH_UP_EVERY s (``now``: at once)."""
        lagging = self._lagging()
        if not lagging or (not now and time.monotonic() < self._next_look):
            return
        self._next_look = time.monotonic() + CATCH_UP_EVERY
        ready = [feed for feed in lagging if not feed.full()]
        if ready:
            self._counts["from_journal"] += self._from_journal(ready, CATCH_UP_ROWS)

    def _feed_rest(self) -> None:
        """At the end, sinks still behind take the rest whether full or not: their ``close``
        makes the final, bounded attempt (and keeps on disk what it cannot deliver)."""
        lagging = self._lagging()
        if lagging:
            self._counts["from_journal"] += self._from_journal(lagging, room=False)

    def _fail(self, index: int, event: str, exc: BaseException) -> None:
        slot = self._failures.get((index, event))
        if slot is None:
            message = f"{type(exc).__name__}: {exc}"
            self._failures[(index, event)] = [1, message]
            LOGGER.warning(f"driver callback {self._entries[index].name} failed in {event}: {message} "
                           f"(later failures are counted in the run report)")
        else:
            slot[0] += 1

    def _call_sinks(self, method: str, *args) -> dict:
        """Call ``method`` on every sink that has it; what each returned, by sink name."""
        results = {}
        for index, entry in enumerate(self._entries):
            fn = getattr(entry.obj, method, None) if entry.is_sink else None
            if callable(fn):
                name = entry.name if entry.name not in results else f"{entry.name}#{index}"
                try:
                    results[name] = fn(*args)
                except Exception as exc:
                    self._fail(index, method, exc)
        return results

    # ------------------------------------------------------------------ lifecycle
    # Each public method takes the lock: the actor runs them on other threads than ingest's.
    def start(self) -> dict:
        """Let sinks open their clients before the first record arrives (``Sink.start``), and
        hand them again what the journal holds beyond their watermarks."""
        with self._lock:
            self._call_sinks("start")
            if self._journal is not None:
                self._replay()
            return self._stats()

    def flush(self) -> dict:
        """Ask every sink to flush what it buffers."""
        with self._lock:
            self._feed_lagging(now=True)
            self._call_sinks("flush")
            return self._stats()

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> dict:
        """Dispatch what waits behind a gap, flush, close sinks with ``status`` (``reason``, one
        line, goes to the sinks that keep it: why a run failed or was killed); the report (with
        each sink's own close() result under ``sinks``)."""
        if status not in STATUSES:
            raise ValueError(f"finish status={status!r}: must be one of {', '.join(STATUSES)}")
        with self._lock:
            self._end(status, reason)
            return self._report()

    def _end(self, status: str, reason: str | None) -> None:
        if self._status is None:
            self._release_pending()
            if self._group is not None:  # every entry durable, and no fsync runs: the journal may close
                self._group.drain()
            self._feed_rest()
            if self._journal is not None:  # seals the last segment: sinks copy it before they close
                self._journal.close()
            if reason:
                self._call_sinks("note_end", status, reason)
            self._call_sinks("flush")
            self._sink_reports = self._call_sinks("close", status)
            self._status = status
            if self._journal is not None:
                self._journal.finish(status, self.delivered(), reason)

    def delivered(self) -> bool:
        """Whether every sink that keeps a watermark has delivered every journal entry."""
        end = self._journal.next_entry if self._journal is not None else 0
        return all(feed.progress.delivered >= end for feed in self._bulk
                   if feed.progress is not None and feed.progress.path is not None)

    def _release_pending(self) -> None:
        """At the end no resend can fill a gap: dispatch the rest in order, counting the holes."""
        for key, stream in self._streams.items():
            self._unstash(stream)
            if stream.pending:
                missing = max(stream.pending) + 1 - stream.next_seq - len(stream.pending)
                LOGGER.warning(f"callback actor: stream {key} ends with {missing} missing records")
                self._counts["gaps"] += missing
                for seq in sorted(stream.pending):
                    self._dispatch(stream.pending.pop(seq))
                    stream.next_seq = seq + 1

    def stats(self) -> dict:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict:
        """Counts; ``busy_seconds`` is dispatch (under the lock), ``sync_seconds`` the fsyncs
        (which overlap other calls' dispatch); ``journal_syncs`` how many there were; ``behind``
        the most journal entries a sink has not been handed yet (it was full: they wait in the
        journal), ``from_journal`` the entries read back for such sinks."""
        group, journal = self._group, self._journal
        out = dict(self._counts)
        waiting = sum(len(s.pending) + sum(map(len, s.early.values())) for s in self._streams.values())
        out.update(pending=waiting,
                   streams={key: s.next_seq for key, s in self._streams.items()},
                   restarted=self._restarted, status=self._status, busy_seconds=self._busy,
                   failed_calls=sum(count for count, _ in self._failures.values()),
                   journal_syncs=journal.syncs if journal else 0, sync_seconds=group.seconds if group else 0.0,
                   behind=self._behind())
        return out

    def _behind(self) -> int:
        if self._journal is None:
            return 0
        end = self._journal.next_entry
        return max((end - feed.progress.fed for feed in self._bulk if feed.progress is not None), default=0)

    def take_lines(self) -> list[str]:
        """Console lines the driver callbacks made since the last call (``take_lines``), in order:
        under Ray the driver prints them, since this process's output reaches the user prefixed."""
        with self._lock:
            return [line for entry in self._entries if callable(getattr(entry.obj, "take_lines", None))
                    for line in entry.obj.take_lines()]

    def callback_objects(self, first: int = 0) -> list:
        """The driver callbacks from the ``first`` on as they are now (a pair's fn, or the object):
        under Ray they ran on copies in this process, and the user's process takes their state back."""
        with self._lock:
            return [entry.obj for entry in self._entries[first:]]

    def report(self) -> dict:
        """Counts plus, per failing callback and event, the failure count and first error."""
        with self._lock:
            return self._report()

    def _report(self) -> dict:
        out = self._stats()
        out["failures"] = [{"callback": self._entries[index].name, "event": event, "count": count,
                            "first_error": first}
                           for (index, event), (count, first) in sorted(self._failures.items())]
        out["sinks"] = dict(self._sink_reports)
        return out


def _progress_of(obj, index: int, journal: Journal | None) -> Progress | None:
    """A ``Sink``'s watermark: kept in the journal when the sink reports delivery itself
    (``Sink.tracks_delivery``), else in memory from 0, so a restarted actor hands such a sink
    (state in memory) the whole run again. Other bulk callbacks have none."""
    if not isinstance(obj, Sink):
        return None
    tracked = journal is not None and obj.tracks_delivery
    obj.progress = journal.progress(f"{index}-{type(obj).__name__}") if tracked else Progress()
    return obj.progress


def _was_restarted() -> bool:
    if not ray.is_initialized():  # a plain Dispatcher: asking the runtime would start Ray
        return False
    with warnings.catch_warnings():  # Ray's property warns about an internal deprecated call
        warnings.simplefilter("ignore")
        try:
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
        except Exception:  # not inside an actor (plain Dispatcher)
            return False
