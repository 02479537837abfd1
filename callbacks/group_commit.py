"""Group commit: calls that wait for the journal to be durable share one fsync.

The callback actor takes ingest calls on several threads (``callbacks/actor.py``). Each call
appends its entries under the dispatcher's lock and must not return its acknowledgement before
they are on disk. One fsync per call capped one actor at a few hundred calls per second whatever
their size; here the first call that finds no fsync running becomes the committer: it syncs
every entry appended so far with the lock released (other calls append meanwhile), then wakes
the calls waiting, whose entries are durable now or go into the next round's fsync.
"""
from __future__ import annotations

import threading
import time

from callbacks.journal import Journal


class GroupCommit:
    """One journal's durability for callers holding ``lock`` (the dispatcher's)."""

    def __init__(self, journal: Journal, lock: threading.Lock):
        self._journal = journal
        self._lock = lock
        self._synced = threading.Condition(lock)
        self._syncing = False
        self.seconds = 0.0  # time spent in fsync, by all committers

    def wait(self, entries: int, idle: bool = False) -> None:
        """Return, the lock held, once the first ``entries`` journal entries are durable (and,
        with ``idle``, no fsync is running: the journal may then be closed)."""
        while self._journal.durable_entries < entries or (idle and self._syncing):
            if self._syncing:
                self._synced.wait()
            else:
                self._commit()

    def _commit(self) -> None:
        """Sync every entry appended so far, then wake the waiting calls. A failed fsync raises
        in this call only; the next waiter tries again."""
        self._syncing = True
        try:
            self._sync_unlocked(self._journal.stage())
            self._journal.roll()
        finally:
            self._syncing = False
            self._synced.notify_all()

    def _sync_unlocked(self, staged: tuple) -> None:
        started = time.perf_counter()
        self._lock.release()
        try:
            self._journal.sync(staged)
        finally:
            self._lock.acquire()
            self.seconds += time.perf_counter() - started
