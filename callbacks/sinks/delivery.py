"""A background delivery thread with backoff, so a sink's record methods never wait on a network.

The sink owns its queues; ``Courier`` calls the sink's ``pump()`` when kicked or every
``interval`` seconds. ``pump`` sends what is queued and returns True when nothing is left; when
it raises, the courier waits (exponential backoff with jitter) and tries again, for as long as
the sink lives. ``flush``/``close`` wait a bounded time for a pump that started after them.
``FileCourier`` is a courier with its own ``FileStage``: what a sink that only uploads files needs.
"""
from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Callable

from callbacks.sinks.spool import FileStage
from trainers.utils import LOGGER


CLOSING_RETRY_S = 2.0  # at most between attempts while closing
# At most between attempts while an endpoint is down: a sink catches up within ~10 s of its return,
# and a down server gets one probe per sink every ~10 s.
RETRY_MAX_S = 10.0


class Backoff:
    """Exponential delays ``initial * 2**n`` capped at ``maximum``, with +-25% jitter."""

    def __init__(self, initial: float = 0.5, maximum: float = RETRY_MAX_S):
        self.initial, self.maximum, self.failures = initial, maximum, 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * 2 ** self.failures)
        self.failures += 1
        return delay * random.uniform(0.75, 1.25)

    def reset(self) -> None:
        self.failures = 0


class Courier:
    """Runs ``pump`` on a daemon thread until it reports idle; retries failures with backoff."""

    def __init__(self, name: str, pump: Callable[[], bool], interval: float = 2.0,
                 backoff: Backoff | None = None):
        self.name, self.pump, self.interval = name, pump, interval
        self.backoff = backoff or Backoff()
        self.last_error: str | None = None
        self.failures = 0
        self._cond = threading.Condition()
        self._ticket = 0          # bumped by every kick
        self._done = -1           # ticket of the latest pump that finished idle
        self._retry_at = 0.0      # no attempt before this time (backoff after a failure)
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"sink-{self.name}", daemon=True)
            self._thread.start()

    def kick(self) -> int:
        with self._cond:
            self._ticket += 1
            self._cond.notify_all()
            return self._ticket

    def flush(self, timeout: float) -> bool:
        """Kick and wait up to ``timeout`` s for everything queued so far to be delivered."""
        self.start()
        ticket = self.kick()
        end = time.monotonic() + timeout
        with self._cond:
            while self._done < ticket:
                left = end - time.monotonic()
                if left <= 0 or not self.running:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self, timeout: float) -> bool:
        """Deliver what is left within ``timeout`` s (retrying), then stop; True if all went out."""
        self.start()
        with self._cond:
            self._deadline = time.monotonic() + timeout
            self._retry_at = min(self._retry_at, time.monotonic())
        ok = self.flush(timeout)
        with self._cond:
            self._deadline = time.monotonic()
            self._cond.notify_all()
        self._thread.join(timeout=5.0)
        return ok

    def _loop(self) -> None:
        while True:
            ticket = self._wait()
            if ticket is None:
                return
            try:
                idle = self.pump()
            except Exception as exc:  # any failure: keep data queued, retry later
                self._failed(exc)
                continue
            self._succeeded(ticket if idle else None)

    def _wait(self) -> int | None:
        """Sleep until kicked / interval / backoff end; None once stopping time has come."""
        with self._cond:
            seen = self._ticket
            while True:
                now = time.monotonic()
                if self._deadline is not None and now >= self._deadline:
                    return None
                wake = self._retry_at if self._retry_at > now else now + self.interval
                if self._deadline is not None:
                    wake = min(wake, self._deadline)
                if self._retry_at <= now and (self._ticket != seen or self._done < seen):
                    return self._ticket
                self._cond.wait(max(0.0, wake - now))
                if time.monotonic() >= wake and self._retry_at <= time.monotonic():
                    return self._ticket

    def _failed(self, exc: Exception) -> None:
        if self.failures == 0:
            LOGGER.warning(f"{self.name}: delivery failed ({type(exc).__name__}: {_short(exc)}); "
                           f"keeping data queued and retrying")
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {_short(exc)}"
        delay = self.backoff.next()
        with self._cond:
            if self._deadline is not None:  # closing: the run's end waits for us, so notice a return soon
                delay = min(delay, CLOSING_RETRY_S)
            self._retry_at = time.monotonic() + delay

    def _succeeded(self, ticket: int | None) -> None:
        if self.failures:
            LOGGER.info(f"{self.name}: delivering again after {self.failures} failed attempts")
        self.failures = 0
        self.backoff.reset()
        with self._cond:
            if ticket is not None:
                self._done = max(self._done, ticket)
            self._cond.notify_all()


class FileCourier(Courier):
    """Snapshots staged in ``directory`` and uploaded with ``upload(target, path)`` in the
    background: staging never waits on the endpoint, and what was not delivered stays on disk.
    ``before`` runs at the start of every round (the event log cuts a part that has grown old);
    ``sent_one(target)`` after each upload; ``idle(token)`` after a round that left nothing staged,
    with what ``before`` returned (a sink's watermark at the start of the round)."""

    def __init__(self, name: str, directory: str | os.PathLike, upload: Callable[[str, Path], None],
                 before: Callable[[], object] | None = None, sent_one: Callable[[str], None] | None = None,
                 idle: Callable[[object], None] | None = None):
        super().__init__(name, self._send)
        self.stage = FileStage(directory)
        self.upload, self.before, self.sent_one, self.idle = upload, before, sent_one, idle
        self.sent = 0
        self.start()

    def _send(self) -> bool:
        """One round; ``idle(what before() returned)`` when it left nothing staged."""
        token = self.before() if self.before is not None else None
        self.sent += len(self.stage.send(self.upload, self.sent_one))
        done = len(self.stage) == 0
        if done and self.idle is not None:
            self.idle(token)
        return done

    def put_file(self, target: str, source: str | os.PathLike) -> bool:
        """Snapshot ``source`` for ``target`` now; False when that content was staged or sent already."""
        staged = self.stage.stage(target, source)
        if staged:
            self.kick()
        return staged

    def put_bytes(self, target: str, data: bytes) -> None:
        if self.stage.stage_bytes(target, data):
            self.kick()

    def pending(self) -> list[str]:
        """Targets not delivered yet."""
        return self.stage.targets()

    def spool_dir(self) -> str | None:
        """Where undelivered snapshots are kept, while there are any."""
        return str(self.stage.dir) if len(self.stage) else None


def _short(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."
