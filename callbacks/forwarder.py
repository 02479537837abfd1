"""Worker side of event forwarding: one record per event, sent to the callback actor in batches.

Runs inside each Ray Train worker. The training step never waits for the driver: records are
buffered as compact rows, sent as ``actor.ingest_rows.remote(stream, first_seq, rows, floors)``
calls, and at most ``max_inflight`` calls are outstanding. Completion is checked with
``ray.wait(timeout=0)`` only at batch or time boundaries, because one ``ray.wait`` costs tens of
microseconds and events can fire at tens of kHz.

Delivery is at-least-once and ordered by ``seq``. A record stays in memory until the actor
acknowledges it; the actor acknowledges only what it has dispatched and journaled for good, as
the next expected ``seq`` of the stream. A full batch (the stream is saturated: more follow) does
not wait for the journal's fsync: its answer acknowledges what is durable by then and says what
the actor has *taken*, which is not sent again while that actor lives; later answers acknowledge
the rest, and a stream with nothing more to send asks for it (``durable``). If the actor dies
(and Ray restarts it), the forwarder waits until it answers a ping, then resends everything not
acknowledged; the actor drops duplicates by ``record_key``. Each batch carries the stream's
acknowledged floor so that a restarted actor, which has lost its state, knows where the stream
resumes.

A sender thread sends, once their time is due, rows the training thread has not: the rows before
a stall (a long step, a collective waiting on a dead peer) and rows whose files finished shipping
meanwhile, so a rank killed in a stall has sent what it emitted up to a flush interval before.
The two threads take turns on one lock.

Use one forwarder per (run_id, rank, attempt): sequence numbers restart at 0 in each.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent import futures
from functools import partial
from typing import Iterable

import ray
from ray.exceptions import RayActorError, RayError

from callbacks.records import CLOSE_EVENT, FLUSH_EVENTS
from trainers.events import ARTIFACTS, EVENTS, TIME, check_event
from trainers.utils import LOGGER

# Calls that fail for these reasons are resent once the actor answers again.
ACTOR_ERRORS = (RayActorError,)  # ActorDiedError and ActorUnavailableError derive from it

PROBE_INTERVAL = 0.2        # seconds between pings while the actor does not answer
MAX_TASK_ERRORS = 3         # consecutive non-actor failures of one batch before giving it up
# A row waits at most this long before it is sent: it bounds the emit-to-durable delay of a rank
# whose events do not fill a batch. Each flush is a call; group commit in the actor keeps the
# fsyncs from growing with the calls.
FLUSH_INTERVAL = 0.5


def _check_positive(name: str, value, minimum=1):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"EventForwarder {name}={value!r}: must be a number >= {minimum}")
    return value


class EventForwarder:
    """Turns fired events into records and streams them, batched, to the callback actor."""

    def __init__(self, actor, run_id: str, rank: int, attempt: int = 0,
                 events: Iterable[str] | None = None, max_batch: int = 1000,
                 flush_interval: float = FLUSH_INTERVAL, max_inflight: int = 4, max_buffer: int = 200_000,
                 close_timeout: float = 60.0, give_up_after: float = 300.0, publish=None):
        self.actor, self.run_id, self.rank, self.attempt = actor, str(run_id), int(rank), int(attempt)
        self.events = tuple(EVENTS) if events is None else tuple(check_event(e) for e in events)
        self.max_batch = int(_check_positive("max_batch", max_batch))
        self.flush_interval = float(_check_positive("flush_interval", flush_interval, 0))
        self.max_inflight = int(_check_positive("max_inflight", max_inflight))
        self.max_buffer = int(_check_positive("max_buffer", max_buffer, self.max_batch))
        self.close_timeout = float(_check_positive("close_timeout", close_timeout, 0))
        self.give_up_after = float(_check_positive("give_up_after", give_up_after, 0))
        self.stream = (self.run_id, self.rank, self.attempt)
        self.publish = publish  # artifacts -> a future of artifacts the driver can read (callbacks/artifacts.py)
        self._held: deque = deque()  # (seq, future): rows whose files are still shipping, oldest first
        # Retained rows (trainers.events.ROW_FIELDS): seq ``_seq0 + i`` is ``_records[i]``;
        # all seq < _acked are done.
        self._records: list[list] = []
        self._seq0 = 0
        self._acked = 0          # every seq below this was dispatched by the actor, and is durable
        self._taken = 0          # every seq below this was dispatched by the actor ``_incarnation``
        self._incarnation = 0
        self._sent = 0           # next seq to send
        self._inflight: list[tuple] = []  # (ref, first_seq, end_seq), oldest first
        self._suspect = False    # a call failed: hold sending until the actor answers a ping
        self._probe = None
        self._next_probe = 0.0
        self._task_errors = 0
        self._pump_at = self.max_batch
        self._next_flush = time.time() + self.flush_interval  # wall time: compared with rows' times
        self._counts = dict(sent=0, acked=0, batches=0, backpressure_waits=0,
                            backpressure_seconds=0.0, resends=0, failed_calls=0, lost=0)
        self._lock = threading.RLock()  # the training thread and the sender thread take turns
        self._closed = threading.Event()
        self._sender: threading.Thread | None = None

    # ----------------------------------------------------------------- registry side
    def attach(self, registry: dict) -> "EventForwarder":
        """Register on the forwarded events, plus flush-only hooks where a flush is due."""
        for event in EVENTS:
            forwarded = event in self.events
            if forwarded or event in FLUSH_EVENTS or event == CLOSE_EVENT:
                registry.setdefault(event, []).append(self._hook(event, forwarded))
        if self._sender is None:
            self._start_sender()
        return self

    def _hook(self, event: str, forwarded: bool):
        if event != CLOSE_EVENT and event not in FLUSH_EVENTS:
            hook = partial(self.emit, event)  # per-step events: called in C, no frame of its own
        else:
            def hook(owner):
                if forwarded:
                    self.emit(event, owner)
                if event == CLOSE_EVENT:
                    self.close()
                else:
                    self.flush()
        hook.__qualname__ = hook.__name__ = f"EventForwarder.{event}"
        return hook

    # ----------------------------------------------------------------- hot path
    def emit(self, event: str, owner) -> list:
        """Build the row for ``event`` fired by ``owner`` and queue it; sends when due."""
        row = owner.record_row(event)  # owners are CallbackMixins (trainers/registry.py)
        with self._lock:
            if row[ARTIFACTS] and self.publish is not None:
                self._held.append((self._next_seq, self.publish(row[ARTIFACTS])))
            records = self._records
            records.append(row)
            # the flush deadline is kept in wall time, so the row's own time stamp serves to check it
            due = row[TIME] >= self._next_flush
            if due or self._seq0 + len(records) >= self._pump_at:
                self._pump(force=due)
        return row

    def _start_sender(self) -> None:
        self._sender = threading.Thread(target=self._send_late, name=f"forwarder-rank{self.rank}", daemon=True)
        self._sender.start()

    def _send_late(self) -> None:
        """Every flush interval: send the rows that are due and that the training thread has not
        sent (it has not emitted since), acknowledgements collected on the way."""
        while not self._closed.wait(self.flush_interval):
            with self._lock:
                if time.time() >= self._next_flush and (self._sendable() > self._sent or self._inflight
                                                        or self._acked < self._sent):
                    self._pump(force=True)

    # ----------------------------------------------------------------- sending
    @property
    def _next_seq(self) -> int:
        return self._seq0 + len(self._records)

    def _retained(self) -> int:
        return self._next_seq - self._acked

    def _sendable(self) -> int:
        """The end of what may be sent: rows wait behind the oldest row whose files still ship;
        a shipped row takes its files' URIs."""
        while self._held and self._held[0][1].done():
            seq, shipped = self._held.popleft()
            self._records[seq - self._seq0][ARTIFACTS] = shipped.result()
        return self._held[0][0] if self._held else self._next_seq

    def _pump(self, force: bool) -> None:
        """Collect finished calls, send what is due, and apply backpressure if over budget."""
        self._poll()
        self._send_due(force)
        if self._retained() > self.max_buffer:
            self._backpressure()
        if force or self._next_seq - self._sent == 0:
            self._next_flush = time.time() + self.flush_interval
        unsent = self._next_seq - self._sent
        # Blocked by the in-flight cap or a down actor: look again after a quarter batch.
        self._pump_at = self._next_seq + max(1, self.max_batch // 4) if unsent >= self.max_batch \
            else self._sent + self.max_batch

    def _send_due(self, force: bool) -> None:
        while not self._suspect and len(self._inflight) < self.max_inflight:
            unsent = self._sendable() - self._sent
            if unsent == 0 or (unsent < self.max_batch and not force):
                return
            self._send(min(unsent, self.max_batch))

    def _send(self, n: int) -> None:
        start = self._sent - self._seq0
        batch = self._records[start:start + n]
        ref = self.actor.ingest_rows.remote(self.stream, self._sent, batch, {self.stream: self._acked},
                                            n < self.max_batch)  # a full batch: more follow, do not wait
        self._inflight.append((ref, self._sent, self._sent + n))
        self._sent += n
        self._counts["sent"] += n
        self._counts["batches"] += 1

    # ----------------------------------------------------------------- acknowledgements
    def _poll(self, timeout: float = 0.0) -> None:
        refs = [entry[0] for entry in self._inflight]
        if self._probe is not None:
            refs.append(self._probe)
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
            ready = set(ready)
            done = [entry for entry in self._inflight if entry[0] in ready]
            self._inflight = [entry for entry in self._inflight if entry[0] not in ready]
            for entry in done:
                self._settle(*entry)
            if self._probe is not None and self._probe in ready:
                self._settle_probe()
        self._recover()

    def _settle(self, ref, first: int, end: int) -> None:
        try:
            ack = ray.get(ref)
        except ACTOR_ERRORS:
            self._counts["failed_calls"] += 1
            self._suspect = True
            self._taken = self._acked  # what it had not made durable may be gone with it
            return
        except RayError as exc:  # ingest itself raised: should not happen, never loop forever
            self._counts["failed_calls"] += 1
            self._task_errors += 1
            LOGGER.warning(f"event forwarder: ingest of seq {first}..{end - 1} failed: {exc}")
            if self._task_errors >= MAX_TASK_ERRORS:
                self._give_up(end, f"ingest failed {self._task_errors} times")
            return
        self._task_errors = 0
        self._note_taken(ack)
        self._advance(int(ack["next_seq"].get(self.stream, 0)))

    def _note_taken(self, ack: dict) -> None:
        """What the actor has dispatched, durable or not yet; an answer from a newer incarnation
        (a restarted actor) replaces what the one before had taken."""
        incarnation = ack["incarnation"]
        if incarnation > self._incarnation:
            self._incarnation, self._taken = incarnation, 0
        if incarnation == self._incarnation:
            self._taken = max(self._taken, int(ack["taken"].get(self.stream, 0)))

    def _advance(self, watermark: int) -> None:
        """Forget records below the actor's dispatched watermark."""
        watermark = min(watermark, self._next_seq)
        if watermark <= self._acked:
            return
        self._acked = watermark
        self._counts["acked"] = watermark
        self._sent = max(self._sent, watermark)
        drop = watermark - self._seq0
        if drop >= max(self.max_batch, len(self._records) // 2):
            del self._records[:drop]
            self._seq0 = watermark

    def _settle_probe(self) -> None:
        probe, self._probe = self._probe, None
        try:
            ray.get(probe)
        except RayError:
            self._next_probe = time.monotonic() + PROBE_INTERVAL
            return
        self._suspect = False
        self._task_errors = 0

    def _recover(self) -> None:
        """Once no call is outstanding: resend what was sent but not taken, or ask for the
        acknowledgement of what was taken but not acknowledged."""
        if self._inflight:
            return
        if self._suspect:
            if self._probe is None and time.monotonic() >= self._next_probe:
                self._probe = self.actor.ping.remote()
            return
        resume = max(self._acked, min(self._taken, self._sent))
        if self._sent > resume:
            self._counts["resends"] += self._sent - resume
            self._sent = resume
        elif self._sent > self._acked:
            self._inflight.append((self.actor.durable.remote(self.stream), self._sent, self._sent))

    def _give_up(self, end: int, reason: str) -> None:
        lost = end - self._acked
        LOGGER.error(f"event forwarder rank {self.rank}: {lost} event records (seq "
                     f"{self._acked}..{end - 1}) could not be delivered to the driver: {reason}")
        self._counts["lost"] += lost
        self._task_errors = 0
        self._advance(end)

    # ----------------------------------------------------------------- blocking paths
    def _wait_some(self, deadline: float) -> None:
        """Block until the oldest call or the ping completes (or the deadline)."""
        remaining = max(0.0, deadline - time.monotonic())
        if self._inflight:
            ray.wait([self._inflight[0][0]], timeout=remaining)
        elif self._probe is not None:
            ray.wait([self._probe], timeout=min(remaining, 1.0))
        elif self._held:
            futures.wait([self._held[0][1]], timeout=remaining)
        else:
            time.sleep(min(remaining, max(0.0, self._next_probe - time.monotonic()), PROBE_INTERVAL))
        self._poll()

    def _backpressure(self) -> None:
        start = time.monotonic()
        deadline = start + self.give_up_after
        self._counts["backpressure_waits"] += 1
        while self._retained() > self.max_buffer:
            if time.monotonic() >= deadline:
                self._give_up(self._next_seq, f"the callback actor did not answer for "
                                              f"{self.give_up_after:.0f}s")
                self._sent = self._next_seq
                break
            self._wait_some(deadline)
            self._send_due(force=not self._inflight)
        self._counts["backpressure_seconds"] += time.monotonic() - start

    # ----------------------------------------------------------------- public controls
    def flush(self, wait: bool = False, timeout: float | None = None) -> bool:
        """Send everything buffered; with ``wait``, block (bounded) until all is acknowledged."""
        with self._lock:
            return self._flush(wait, timeout)

    def _flush(self, wait: bool, timeout: float | None) -> bool:
        self._pump(force=True)
        if not wait:
            return self._retained() == 0
        deadline = time.monotonic() + (self.close_timeout if timeout is None else timeout)
        return self._wait_acked(deadline, shipping_until=math.inf)

    def deliver(self, timeout: float, shipping: float = 5.0) -> bool:
        """Send, and wait (bounded by ``timeout``) until the actor has acknowledged, every record
        so far. Records behind a file still shipping to the object store are waited for only
        ``shipping`` seconds: an outage of the store holds training up that long at most."""
        with self._lock:
            self._pump(force=True)
            start = time.monotonic()
            return self._wait_acked(start + timeout, shipping_until=start + shipping)

    def _wait_acked(self, deadline: float, shipping_until: float) -> bool:
        """Block until the records ``_due_end`` names are acknowledged, or the deadline (a warning
        then says how many are not); whether they all are."""
        while self._acked < self._due_end(shipping_until) and time.monotonic() < deadline:
            self._wait_some(min(deadline, time.monotonic() + PROBE_INTERVAL))
            self._send_due(force=True)
        missing = self._due_end(shipping_until) - self._acked
        if missing > 0:
            LOGGER.warning(f"event forwarder rank {self.rank}: {missing} event records not yet "
                           f"acknowledged by the callback actor")
        return missing <= 0

    def _due_end(self, shipping_until: float) -> int:
        """The end of the records a wait is for: all of them until ``shipping_until``, then those
        before the oldest file still shipping."""
        return self._next_seq if time.monotonic() < shipping_until else self._sendable()

    def close(self, timeout: float | None = None) -> bool:
        """Final flush at teardown: wait, bounded, for every acknowledgement; then say whether
        training ever waited for the actor, or records were lost (nothing is said otherwise)."""
        done = self.flush(wait=True, timeout=timeout)
        self._closed.set()
        waits, lost = self._counts["backpressure_waits"], self._counts["lost"]
        if waits or lost:
            LOGGER.warning(f"event forwarder rank {self.rank}: training waited {waits} times "
                           f"({self._counts['backpressure_seconds']:.1f} s) for the callback actor to catch "
                           f"up; {lost} event records lost")
        return done

    def stats(self) -> dict:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict:
        out = dict(self._counts)
        out["records"] = self._next_seq  # one seq per record emitted
        out["acked"] -= out["lost"]
        out.update(inflight=len(self._inflight), buffered=self._retained(), shipping=len(self._held),
                   unsent=self._next_seq - self._sent, actor_suspect=self._suspect)
        return out
