"""Group commit in the callback actor: concurrent ingest calls share fsyncs, and no acknowledged
record is lost, stored twice or reordered, also when the actor is killed among them.

Real pieces only: the ``CallbackActor`` with a durable ``Journal`` on disk and the event-log sink
in a local store, fed by Ray tasks (and, for the kill, by real forwarders of simulated ranks).
Counts are taken on the raw event-log rows and the journal's own entries, never de-duplicated.
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import defaultdict

import ray

from benchmarks.scale import Sender, rank_script, raw_counts
from callbacks.actor import start_callback_actor
from callbacks.dispatcher import Dispatcher
from callbacks.journal import Journal
from callbacks.sinks import EventLogSink, read_event_log
from callbacks.sinks.base import Sink
from trainers.events import make_row

TASKS, RANKS_PER_TASK, ROUNDS, ROWS = 6, 8, 10, 20  # 480 calls of 20 rows, 48 in flight at once


def step_rows(rank: int, first: int, n: int) -> list:
    return [make_row("on_train_batch_end", {"step": first + i, "metrics": {"loss": float(rank)}}, now=1e9 + first + i)
            for i in range(n)]


@ray.remote(num_cpus=0)
def send_rounds(actor, run_id: str, ranks: list[int]) -> list[tuple]:
    """Each round one ``ingest_rows`` call per rank, all in flight together; ``(rank, end, ack)``."""
    acks = []
    for first in range(0, ROUNDS * ROWS, ROWS):
        streams = [(run_id, rank, 0) for rank in ranks]
        refs = [actor.ingest_rows.remote(s, first, step_rows(s[1], first, ROWS), {s: first}) for s in streams]
        acks += [(s[1], first + ROWS, ack["next_seq"][s]) for s, ack in zip(streams, ray.get(refs))]
    return acks


def journal_rows(folder, run_id: str) -> dict[int, list[int]]:
    """rank -> seqs of the entries on disk, as a reader after a crash sees them (whole entries)."""
    seqs = defaultdict(list)
    for _, (_, rank, _), first, rows in Journal(folder, run_id).entries():
        seqs[rank] += range(first, first + len(rows))
    return dict(seqs)


def test_batch_ahead_of_its_predecessor_waits_whole(tmp_path):
    """The actor's threads may start a stream's calls out of order: a batch ahead of the one before
    it waits whole and becomes one journal entry once the stream reaches it (not one per row);
    a resend cut elsewhere dispatches only what is new; at the end a batch behind a hole that no
    resend filled is dispatched, the hole counted."""
    run_id, folder = "early", tmp_path / "journal"
    journal = Journal(folder, run_id)
    dispatcher = Dispatcher([], journal=journal)
    stream = (run_id, 0, 0)
    assert dispatcher.ingest_rows(stream, 20, step_rows(0, 20, 20))["next_seq"] == {stream: 0}
    assert dispatcher.ingest_rows(stream, 0, step_rows(0, 0, 20))["next_seq"] == {stream: 40}
    assert dispatcher.ingest_rows(stream, 50, step_rows(0, 50, 10))["next_seq"] == {stream: 40}
    assert dispatcher.ingest_rows(stream, 45, step_rows(0, 45, 10))["next_seq"] == {stream: 40}
    assert dispatcher.ingest_rows(stream, 40, step_rows(0, 40, 5))["next_seq"] == {stream: 60}
    assert dispatcher.ingest_rows(stream, 70, step_rows(0, 70, 10))["next_seq"] == {stream: 60}
    entries = [(first, len(rows)) for _, _, first, rows in Journal(folder, run_id).entries()]
    assert entries == [(0, 20), (20, 20), (40, 5), (45, 10), (55, 5)]
    report = dispatcher.finish("FINISHED")
    assert journal.next_entry == 5 + 10  # the batch behind the hole: released at the end, record by record
    assert report["dispatched"] == 70 and report["duplicates"] == 5 and report["gaps"] == 10


class GatedJournal(Journal):
    """A journal whose fsyncs wait, each, until the test opens its gate: ``gates`` (staged entries,
    event) in the order the fsyncs began; ``synced`` the most entries an fsync has ended with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gates: list[tuple[int, threading.Event]] = []
        self.synced = 0

    def sync(self, staged: tuple) -> None:
        if staged[0] is not None:  # an fsync to make (the one finish makes has nothing left to sync)
            gate = threading.Event()
            self.gates.append((staged[1], gate))
            assert gate.wait(30)
        super().sync(staged)
        self.synced = max(self.synced, staged[1])


def until(check, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_call_returns_only_once_an_fsync_covers_its_entries(tmp_path):
    """Calls append while an fsync runs (the dispatcher's lock is not held across it) and share
    the next one; no call returns its acknowledgement before an fsync that covers its entry has
    ended, and the calls a round did not cover get the next round when it ends."""
    run_id = "gated"
    journal = GatedJournal(tmp_path / "journal", run_id)
    dispatcher = Dispatcher([], journal=journal)
    acks, early, threads = {}, [], []

    def call(rank: int) -> None:
        stream = (run_id, rank, 0)
        ack = dispatcher.ingest_rows(stream, 0, step_rows(rank, 0, 5))
        if journal.synced < rank + 1:  # entry `rank` is this call's: not durable yet
            early.append(rank)
        acks[rank] = ack["next_seq"][stream]

    def start(rank: int) -> None:  # call `rank` appends entry `rank`
        threads.append(threading.Thread(target=call, args=(rank,), daemon=True))
        threads[-1].start()
        until(lambda: journal.next_entry == rank + 1)

    def gates_then_settle(n: int) -> None:
        until(lambda: len(journal.gates) == n)
        time.sleep(0.05)  # a call returning too early would have returned by now

    for rank in range(3):
        start(rank)  # 1 and 2 append while call 0's fsync waits at its gate
    gates_then_settle(1)
    assert journal.gates[0][0] == 1 and acks == {}
    journal.gates[0][1].set()
    gates_then_settle(2)  # one of calls 1 and 2 claims the next round, for both
    assert journal.gates[1][0] == 3 and sorted(acks) == [0]
    start(3)  # appends while that round's fsync waits
    journal.gates[1][1].set()
    gates_then_settle(3)
    assert journal.gates[2][0] == 4 and sorted(acks) == [0, 1, 2]
    journal.gates[2][1].set()
    for thread in threads:
        thread.join(10)
    assert acks == {rank: 5 for rank in range(4)} and early == []
    assert dispatcher.finish("FINISHED")["dispatched"] == 20


def test_a_call_that_does_not_wait_acknowledges_only_what_is_durable(tmp_path):
    """A saturated forwarder's calls do not wait for the fsync: each returns at once, ``taken``
    its rows and ``next_seq`` only rows an fsync has covered; the journal's syncer makes them
    durable meanwhile, a round after another, and ``durable`` returns once all of them are."""
    run_id = "unwaited"
    journal = GatedJournal(tmp_path / "journal", run_id)
    dispatcher = Dispatcher([], journal=journal)
    stream = (run_id, 0, 0)
    first = dispatcher.ingest_rows(stream, 0, step_rows(0, 0, 5), None, False)
    assert first["taken"] == {stream: 5} and first["next_seq"] == {stream: 0}
    until(lambda: len(journal.gates) == 1)  # the syncer's round for entry 0 waits at its gate
    second = dispatcher.ingest_rows(stream, 5, step_rows(0, 5, 5), None, False)
    assert second["taken"] == {stream: 10} and second["next_seq"] == {stream: 0}
    journal.gates[0][1].set()
    until(lambda: len(journal.gates) == 2)  # the next round, for entry 1
    assert journal.gates[1][0] == 2
    third = dispatcher.ingest_rows(stream, 10, step_rows(0, 10, 5), None, False)
    assert third["taken"] == {stream: 15} and third["next_seq"] == {stream: 5}
    acks = []
    waiter = threading.Thread(target=lambda: acks.append(dispatcher.durable(stream)), daemon=True)
    waiter.start()
    time.sleep(0.05)
    journal.gates[1][1].set()
    until(lambda: len(journal.gates) == 3)
    time.sleep(0.05)
    assert acks == [] and journal.gates[2][0] == 3  # entry 2 is not durable yet
    journal.gates[2][1].set()
    waiter.join(10)
    assert acks[0]["next_seq"] == {stream: 15} and acks[0]["taken"] == {stream: 15}
    assert dispatcher.finish("FINISHED")["dispatched"] == 15


def test_calls_on_their_way_share_the_round_of_the_call_before_them(tmp_path):
    """Three calls queue for the dispatcher's lock together: the first to append does not claim
    an fsync of its own entry while two others are on their way; the second claims one round for
    both, and the third appends while its fsync runs (``ARRIVING_AT_CLAIM``): two fsyncs for
    three calls, where claiming at once made three. Nothing returns before its entry is durable."""
    run_id = "queued"
    journal = GatedJournal(tmp_path / "journal", run_id)
    dispatcher = Dispatcher([], journal=journal)
    acks, threads = {}, []

    def call(rank: int) -> None:
        stream = (run_id, rank, 0)
        acks[rank] = (dispatcher.ingest_rows(stream, 0, step_rows(rank, 0, 5))["next_seq"][stream], journal.synced)

    with dispatcher._lock:  # the three queue behind it, as behind a long append
        for rank in range(3):
            threads.append(threading.Thread(target=call, args=(rank,), daemon=True))
            threads[-1].start()
        time.sleep(0.2)  # all three on their way
    until(lambda: journal.gates and journal.next_entry == 3)
    time.sleep(0.05)
    assert [entries for entries, _ in journal.gates] == [2] and acks == {}
    journal.gates[0][1].set()
    until(lambda: len(journal.gates) == 2 and len(acks) == 2)
    assert journal.gates[1][0] == 3 and sorted(acks.values()) == [(5, 2), (5, 2)]
    journal.gates[1][1].set()
    for thread in threads:
        thread.join(10)
    assert sorted(acks.values()) == [(5, 2), (5, 2), (5, 3)]  # each returned after the fsync of its entry


def test_after_a_failed_fsync_its_calls_get_the_round_a_call_on_its_way_claims(tmp_path, monkeypatch):
    """The fsync of a round fails (its claimer's call raises) while two more calls queue for the
    dispatcher's lock: the calls that round covered sleep until one of those claims the next
    round, which covers them too; every call but the claimer's returns once its entry is durable."""
    import callbacks.journal

    fdatasync, failures = os.fdatasync, [OSError(28, "No space left on device")]

    def fails_once(fd):
        if failures:
            raise failures.pop()
        fdatasync(fd)

    monkeypatch.setattr(callbacks.journal.os, "fdatasync", fails_once)
    run_id = "failed"
    journal = GatedJournal(tmp_path / "journal", run_id)
    dispatcher = Dispatcher([], journal=journal)
    acks, raised, threads = {}, {}, []

    def call(rank: int) -> None:
        stream = (run_id, rank, 0)
        try:
            acks[rank] = dispatcher.ingest_rows(stream, 0, step_rows(rank, 0, 5))["next_seq"][stream]
        except OSError as exc:
            raised[rank] = exc

    def queue(ranks) -> None:
        for rank in ranks:
            threads.append(threading.Thread(target=call, args=(rank,), daemon=True))
            threads[-1].start()
        time.sleep(0.2)  # all on their way, queued for the lock

    with dispatcher._lock:
        queue(range(3))
    until(lambda: journal.gates and journal.next_entry == 3)  # the second claimed for two; the third appended
    assert journal.gates[0][0] == 2
    with dispatcher._lock:
        queue(range(3, 5))
        journal.gates[0][1].set()  # this fsync fails
        until(lambda: len(raised) == 1)
        time.sleep(0.1)
    until(lambda: len(journal.gates) == 2)
    assert journal.gates[1][0] == 4  # the first of the two queued claimed, for the failed round's calls too
    journal.gates[1][1].set()
    until(lambda: len(journal.gates) == 3)  # the last appended during that fsync
    assert journal.gates[2][0] == 5
    journal.gates[2][1].set()
    for thread in threads:
        thread.join(10)
    assert len(raised) == 1 and sorted(acks.values()) == [5] * 4 and journal.durable_entries == 5


class EagerSink(Sink):
    """Delivers each entry as it is handed over, before the fsync that makes it durable."""

    tracks_delivery = True

    def handle_rows(self, stream, first_seq, rows):
        self.progress.deliver(self.progress.fed)

    def on_train_batch_end(self, record):  # a sink of these rows; handle_rows takes them
        pass


def saved_mark(sink) -> int:
    path = sink.progress.path
    return json.loads(path.read_text())["delivered"] if path.is_file() else 0


def test_a_watermark_on_disk_counts_only_durable_entries(tmp_path):
    """A sink delivered an entry whose fsync has not ended: a crash now would lose the entry, and
    after the restart its number would go to other rows, which a watermark counting it would
    skip. The file counts an entry once it is durable (saved as its fsync ends)."""
    run_id = "eager"
    journal = GatedJournal(tmp_path / "journal", run_id)
    sink = EagerSink()
    dispatcher = Dispatcher([sink], journal=journal)
    dispatcher.start()
    calls = []

    def call(rank: int) -> None:
        calls.append(threading.Thread(target=dispatcher.ingest_rows, args=((run_id, rank, 0), 0, step_rows(rank, 0, 5)),
                                      daemon=True))
        calls[-1].start()
        until(lambda: len(journal.gates) == rank + 1)  # its entry appended and handed over; its fsync waits

    call(0)
    assert sink.progress.mark == 1 and saved_mark(sink) == 0  # delivered, not durable: not on disk
    journal.gates[0][1].set()
    calls[0].join(10)
    call(1)
    assert sink.progress.mark == 2 and saved_mark(sink) == 1  # entry 0 is durable now, entry 1 not yet
    journal.gates[1][1].set()
    calls[1].join(10)
    assert saved_mark(sink) == 2  # saved as the fsync that covers it ends
    assert dispatcher.finish("FINISHED")["dispatched"] == 10


class SlowJournal(Journal):
    """A journal whose fsyncs take a few milliseconds and which checks that no segment is sealed
    (rolled or closed) while an fsync runs; it counts the fsyncs running at once (``most``) and the
    rolls, and notes each batch's entry (``entry_of``, by rank and first seq) and the most entries
    an fsync has ended with (``synced``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.running = self.most = self.rolls = self.synced = 0
        self.entry_of: dict[tuple[int, int], int] = {}
        self._count = threading.Lock()

    def append(self, stream: tuple, first_seq: int, rows: list) -> int:
        self.entry_of[(stream[1], first_seq)] = entry = super().append(stream, first_seq, rows)
        return entry

    def sync(self, staged: tuple) -> None:
        with self._count:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(random.uniform(0.001, 0.004))
            super().sync(staged)
        finally:
            with self._count:
                self.running -= 1
                self.synced = max(self.synced, self.durable_entries)

    def _close_segment(self) -> None:
        assert self.running == 0, "a segment sealed while an fsync runs"
        self.rolls += self._writer is not None
        super()._close_segment()


def test_concurrent_calls_roll_segments_with_no_fsync_running(tmp_path):
    """16 threads of calls into a journal with small segments and slow fsyncs: one fsync at a
    time, segments roll and close with none running, no call is acknowledged before an fsync that
    covers its batch has ended, each exactly its rows, and the journal holds each stream's rows
    once, in order."""
    run_id, folder = "rolls", tmp_path / "journal"
    journal = SlowJournal(folder, run_id, segment_rows=60)
    dispatcher = Dispatcher([], journal=journal)

    def stream_calls(rank: int) -> None:
        stream = (run_id, rank, 0)
        for first in range(0, 120, 8):
            ack = dispatcher.ingest_rows(stream, first, step_rows(rank, first, 8))
            assert ack["next_seq"] == {stream: first + 8}
            assert journal.synced > journal.entry_of[(rank, first)], "acknowledged before its fsync ended"

    errors = []

    def guarded(rank: int) -> None:
        try:
            stream_calls(rank)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(rank,)) for rank in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert journal_rows(folder, run_id) == {rank: list(range(120)) for rank in range(16)}  # as a crash leaves it
    report = dispatcher.finish("FINISHED")
    assert report["dispatched"] == 16 * 120 and report["duplicates"] == 0
    assert journal.most == 1 and journal.rolls >= 10  # a segment takes what comes until a stage rolls it


def test_concurrent_calls_share_fsyncs_and_every_record_is_durable_once(ray_session, tmp_path):
    run_id, store, folder = "group", str(tmp_path / "store"), tmp_path / "journal"
    # small segments: rolls happen while other calls append
    actor = start_callback_actor([EventLogSink(store, run_id)], journal=Journal(folder, run_id, segment_rows=500))
    ray.get(actor.ping.remote())
    ranks = list(range(TASKS * RANKS_PER_TASK))
    acks = [a for done in ray.get([send_rounds.remote(actor, run_id, ranks[t::TASKS]) for t in range(TASKS)])
            for a in done]
    assert len(acks) == TASKS * RANKS_PER_TASK * ROUNDS
    assert all(ack == end for _, end, ack in acks)  # each call acknowledged exactly its rows

    expected = list(range(ROUNDS * ROWS))
    on_disk = journal_rows(folder, run_id)  # every acknowledged row, read back from the segments
    assert sorted(on_disk) == ranks and all(on_disk[rank] == expected for rank in ranks)
    assert len(Journal(folder, run_id).segments()) > 1

    stats = ray.get(actor.stats.remote())
    calls, syncs = stats["batches"], stats["journal_syncs"]
    print(f"{calls} ingest calls made durable by {syncs} fsyncs")
    assert calls == len(acks) and 0 < syncs < calls  # one fsync per call would make them equal

    report = ray.get(actor.finish.remote("FINISHED"))
    ray.kill(actor)
    assert report["dispatched"] == len(ranks) * len(expected) and report["duplicates"] == 0
    raw = read_event_log(store, run_id, dedup_rows=False)
    stored = defaultdict(list)
    for rank, seq in zip(raw.column("rank").to_pylist(), raw.column("seq").to_pylist()):
        stored[rank].append(seq)
    assert sorted(stored) == ranks and all(stored[rank] == expected for rank in ranks)


def test_actor_killed_among_concurrent_calls_loses_nothing_acknowledged(ray_session, tmp_path):
    """Real forwarders of 32 ranks send ~20 calls/s each; the actor is killed (SIGKILL) among
    them and Ray restarts it: the event log (its sinks are fed again from the journal) holds
    every record of every rank exactly once."""
    run_id, store, folder = "group-kill", str(tmp_path / "store"), tmp_path / "journal"
    plan, ranks = dict(epochs=2, steps=10, val_batches=2), list(range(32))
    actor = start_callback_actor([EventLogSink(store, run_id)], journal=Journal(folder, run_id))
    ray.get(actor.ping.remote())
    senders = [Sender.remote() for _ in range(4)]
    ray.get([s.ready.remote() for s in senders])
    start = time.time() + 0.5
    calls = [s.run.remote(actor, run_id, ranks[i::4], plan, 40.0, None, start, 0.05) for i, s in enumerate(senders)]
    time.sleep(2.0)  # about half the records sent
    ray.kill(actor, no_restart=False)
    counts = [ray.get(call, timeout=300) for call in calls]
    assert sum(c["lost"] for c in counts) == 0 and sum(c["resends"] for c in counts) > 0
    stats = ray.get(actor.stats.remote())
    assert stats["restarted"] is True
    ray.get(actor.finish.remote("FINISHED"))
    ray.kill(actor)
    expected = {rank: len(rank_script(rank, **plan)) for rank in ranks}
    rows = raw_counts(store, run_id, expected)
    assert rows == {"rows": sum(expected.values()), "lost": 0, "twice": 0}
