"""Group commit: calls that wait for the journal to be durable share one fsync.

The callback actor takes ingest calls on several threads (``callbacks/actor.py``). Each call
appends its entries under the dispatcher's lock and must not return its acknowledgement before
they are on disk. One fsync per call capped one actor at a few hundred calls per second whatever
their size. Here a call that finds no fsync running claims a *round*: it stages every entry
appended so far (``Journal.stage``) before it lets go of the dispatcher's lock, then syncs them
with no lock held. Calls that append meanwhile wait for the next round, which one of them claims.

The waiting happens on this object's own lock, not the dispatcher's: a call lets go of the
dispatcher's lock as soon as it has appended (the next call appends during the fsync), and a round
that ends wakes the calls it covered without any of them queueing for the dispatcher's lock again;
of the calls it did not cover, it wakes one, to claim the next round. (Calls used to wait on a
condition of the dispatcher's lock: every woken call, and the committer, to roll and wake the
others, queued for that lock again behind the appends; at 8 concurrent calls that cost ~8
voluntary context switches per call instead of ~6, and ~25% more time per call.)

A call does not claim a round while more than ``ARRIVING_AT_CLAIM`` other calls are on their way
to append (``arrive``, counted before they queue for the dispatcher's lock): it sleeps until one of
them claims, and the round covers them all. Calls that arrive together so share one fsync, and
the one call left on its way appends while it runs. Claiming at once, a round covered ~2 of 8
concurrent calls (an fsync takes about as long as an append), and the fsyncs' own CPU was much of
what durability cost on 2 cores (``benchmarks/journal.py``: on / off ~0.71; now ~6 calls a round,
~0.79). Leaving none on its way (0) did no better (~0.73): the fsync then overlapped no append.
A call alone never waits.

A call that does not wait for its acknowledgement (a saturated forwarder's: a later call's
acknowledgement names its rows, ``Dispatcher.ingest_rows``) is ``owe``d instead: a syncer thread
claims the rounds nobody waits for, one after another while entries are owed, and its rounds end
as any other. Such calls take no thread of the actor's while their fsync runs and wake nobody:
calls that each waited cost ~6 context switches apiece, and the fsync then cost ~30% of what
the actor took in (``benchmarks/journal.py``).

Lock order: the dispatcher's lock, then this one; never the other way round. A round is claimed
only with the dispatcher's lock held and its fsync needs only this object's lock to end, so
``drain`` may wait for it with the dispatcher's lock held. One round runs at a time, and only the
claim stages (and rolls a full segment): no fsync races a roll or a close.
"""
from __future__ import annotations

import threading
import time

from callbacks.journal import Journal
from trainers.utils import LOGGER

ARRIVING_AT_CLAIM = 1  # calls on their way to append that a claim leaves to the next round, at most
SYNCER_LINGER = 0.05  # seconds the syncer thread waits for more owed entries before it ends


class GroupCommit:
    """One journal's durability; ``appends`` is the dispatcher's lock, under which entries are
    appended and rounds staged.

    Each round has a condition of its own, on this object's lock: the calls it covers sleep on it
    and all wake when it ends; calls that appended after it was staged sleep on the next one's."""

    def __init__(self, journal: Journal, appends: threading.Lock):
        self._journal = journal
        self._appends = appends
        self._mutex = threading.Lock()  # guards what follows; the rounds' conditions share it
        self._syncing = False  # a round is claimed and its fsync has not ended
        self._round = threading.Condition(self._mutex)  # the claimed round's sleepers
        self._round_entries = 0  # the entries that round makes durable
        self._next = threading.Condition(self._mutex)  # sleepers for the round not claimed yet
        self.seconds = 0.0  # time spent in fsync, by all rounds
        self._arriving = 0  # calls between ``arrive`` and ``appended`` (durable journals only)
        self._owed = 0  # entries appended by calls that do not wait: the syncer makes them durable
        self._syncer: threading.Thread | None = None
        self._kick = threading.Condition(self._mutex)  # the syncer, idle, waits here for owed entries

    def arrive(self) -> None:
        """Before the dispatcher's lock: a call is on its way to append (claims wait for it)."""
        if self._journal.durable:
            with self._mutex:
                self._arriving += 1

    def appended(self, failed: bool = False) -> None:
        """Under the dispatcher's lock: the arrived call appended (and goes on to ``enter``), or
        failed to, in which case a call asleep for the next round may have to claim it."""
        if not self._journal.durable:
            return
        with self._mutex:
            self._arriving -= 1
            if failed and not self._syncing and self._arriving <= ARRIVING_AT_CLAIM:
                self._next.notify()

    def enter(self, entries: int) -> tuple:
        """With the dispatcher's lock held, the caller's last step under it: its ticket for
        ``wait``, which returns once the first ``entries`` are durable. If no fsync runs, the caller
        claims the round and stages them now, while appends are held off."""
        return entries, self._claim(entries)

    def wait(self, ticket: tuple) -> None:
        """Without the dispatcher's lock: return once the ticket's entries are durable, syncing
        them itself when its call claimed the round. A failed fsync raises in that call only; the
        calls it covered claim another round."""
        entries, staged = ticket
        while True:
            if staged is not None:
                self._sync(staged)
            with self._mutex:
                if not self._sleep_until_claimable(entries):
                    return
            with self._appends:
                staged = self._claim(entries)

    def owe(self, entries: int) -> None:
        """With the dispatcher's lock held: a call that does not wait appended up to ``entries``;
        the syncer thread (started if none runs) syncs them in a round of its own or joins one."""
        with self._mutex:
            self._owed = max(self._owed, entries)
            if self._syncer is None:
                self._syncer = threading.Thread(target=self._sync_owed, name="journal-sync", daemon=True)
                self._syncer.start()
            else:
                self._kick.notify()

    def _sync_owed(self) -> None:
        """The syncer: rounds for owed entries, as a waiting call claims them, until none are owed
        for ``SYNCER_LINGER``. A failed fsync ends it (the next owed call starts another)."""
        try:
            while (entries := self._next_owed()) is not None:
                self.wait((entries, None))
        except OSError as exc:
            LOGGER.warning(f"run journal: fsync failed ({exc}); it is tried again at the next call")
        finally:
            with self._mutex:
                if self._syncer is threading.current_thread():
                    self._syncer = None

    def _next_owed(self) -> int | None:
        with self._mutex:
            if self._owed <= self._journal.durable_entries:
                self._kick.wait(SYNCER_LINGER)
            if self._owed <= self._journal.durable_entries:
                self._syncer = None
                return None
            return self._owed

    def drain(self) -> None:
        """With the dispatcher's lock held: wait for the fsync under way, then sync what is left,
        so that every entry is durable and no fsync runs (none can start before the caller lets go
        of the lock): the journal may be closed."""
        with self._mutex:
            while self._syncing:
                self._round.wait()
        staged = self._claim(self._journal.next_entry, linger=False)
        if staged is not None:
            self._sync(staged)

    def _sleep_until_claimable(self, entries: int) -> bool:
        """With this object's lock held: sleep while an fsync runs and ``entries`` are not durable;
        False once they are, True when no fsync runs and the caller should claim a round."""
        while self._journal.durable_entries < entries:
            if self._syncing:
                (self._round if entries <= self._round_entries else self._next).wait()
            elif self._arriving <= ARRIVING_AT_CLAIM:
                return True
            else:  # a call on its way claims the next round, for this one too (also after a failed fsync)
                self._next.wait()
        return False

    def _claim(self, entries: int, linger: bool = True) -> tuple | None:
        """With the dispatcher's lock held: stage a round if no fsync runs, the first ``entries``
        are not durable yet and (``linger``) few calls are on their way; what ``_sync`` takes, or
        None (the round under way, or one a call on its way claims, covers them). Every call
        asleep on ``_next`` appended before this: the round covers them all."""
        with self._mutex:
            if self._syncing or self._journal.durable_entries >= entries:
                return None
            if linger and self._arriving > ARRIVING_AT_CLAIM:
                return None
            self._syncing = True
            self._round, self._next = self._next, threading.Condition(self._mutex)
            self._round_entries = self._journal.next_entry
        try:
            return self._journal.stage()
        except BaseException:
            self._end_round(0.0)
            raise

    def _sync(self, staged: tuple) -> None:
        """The claimed round's fsync, with no lock held; then its calls wake."""
        started = time.perf_counter()
        try:
            self._journal.sync(staged)
        finally:
            self._end_round(time.perf_counter() - started)

    def _end_round(self, seconds: float) -> None:
        """Wake the calls the round covered, and one of those after it, to claim the next round
        (unless a call that appends claims it first)."""
        with self._mutex:
            self._syncing = False
            self.seconds += seconds
            self._round.notify_all()
            self._next.notify()
