"""The run journal's cost: records/s into a journaled dispatcher with fsync on vs. off, and the
time from a worker's emit to the durable acknowledgement.

1. Throughput (no Ray): a ``Dispatcher`` with a journal and a counting sink takes batches of
   ``--batch`` rows of a detection run's per-step mix from K concurrent callers (``--callers``),
   threads as the actor's ``ingest`` concurrency group runs them, each a rank's stream sending its
   batches one after another as a saturated forwarder does: full batches that do not wait for the
   fsync (their rows are acknowledged by later answers), then one call that waits until all its
   rows are durable (``Dispatcher.durable``). The journal's syncer thread fsyncs what the calls
   append (group commit, ``callbacks/group_commit.py``) while they go on: K=1 is one stream, K=8
   what a 2-worker run offers at saturation (2 ranks x up to 4 calls in flight per forwarder),
   K=16 the actor's thread count. Then one more fsync-on round at K=8, each journal entry timed
   from its append to the end of the fsync that makes it durable: how long a call that did not
   wait leaves its rows unacknowledged.
   For each K, rounds alternate fsync on / off (same process, fresh journals); the figures are the
   medians of the rounds. Goal: on / off >= 0.8, judged at K=8.
2. Latency (Ray): a real ``EventForwarder`` in this process emits ``--rate`` rows/s for
   ``--seconds`` s to a real callback actor with a durable journal; for each row, the time from
   its emit to the end of the fsync that makes it durable, measured in the actor (a call that
   waited answers right after; a full batch is acknowledged by the stream's next answer). It
   includes the forwarder's batching (``--flush-interval``, the forwarder's default unless given).

    python benchmarks/journal.py [--rows N] [--batch B] [--rounds R] [--callers 1,2,8,16]
                                 [--rate R] [--seconds S] [--flush-interval F]

``--tiny`` runs both parts briefly (a test runs it): its figures are not measurements.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tiny
from cluster import start_ray
from callbacks.dispatcher import Dispatcher
from callbacks.forwarder import FLUSH_INTERVAL
from callbacks.journal import Journal
from trainers.events import TIME, wire_row

GOAL = 0.8
CALLERS_NOTE = {1: " - one stream",
                8: " - a 2-worker run at saturation", 16: " - as many as the actor's ingest threads"}
GOAL_CALLERS = 8  # concurrent calls a 2-worker run can have in the actor: 2 ranks x max_inflight 4
STEP_CYCLE = ("on_train_batch_start", "optimizer_step", "on_before_zero_grad", "on_params_update",
              "on_train_batch_end")


class CountingSink:
    def __init__(self):
        self.count = 0

    def handle_rows(self, stream, first_seq, rows):
        self.count += len(rows)

    def on_train_batch_end(self, record):  # makes it a sink; handle_rows takes the batches
        pass


def step_rows(first: int, n: int) -> list:
    """A detection run's per-step rows: five events per step, losses and lr on batch ends."""
    out = []
    for i in range(first, first + n):
        event = STEP_CYCLE[i % 5]
        metrics = {"train/box_loss": 1.0, "train/cls_loss": 2.0, "train/dfl_loss": 1.5, "lr/pg0": 0.01,
                   "lr/pg1": 0.01, "lr/pg2": 0.01} if event == "on_train_batch_end" else {}
        out.append(wire_row(event, 0, i // 5, time.time(), metrics, {}, False))
    return out


def cut(rows: list, batch: int) -> list[list]:
    """A rank's rows as its forwarder sends them: consecutive batches of ``batch`` rows."""
    return [rows[start:start + batch] for start in range(0, len(rows), batch)]


def send_stream(dispatcher: Dispatcher, rank: int, batches: list[list], gate: threading.Barrier) -> int:
    """One rank's calls, one after another on one of the actor's ingest threads, then the wait
    until they are durable; the ``gate`` starts every caller at once, so the clock measures only
    the calls. Rows acknowledged."""
    stream, seq = ("bench", rank, 0), 0
    gate.wait()
    for chunk in batches:
        ack = dispatcher.ingest_rows(stream, seq, chunk, None, False)
        seq += len(chunk)
        assert ack["taken"][stream] == seq, ack  # every row taken in order, none twice
    ack = dispatcher.durable(stream)
    assert ack["next_seq"][stream] == seq, ack  # and every one durable
    return seq


def ingest_round(journal: Journal, batches: list[list], callers: int) -> tuple[float, int, int]:
    """Rows/s through a dispatcher with a fresh ``journal`` from ``callers`` concurrent streams of
    ``batches`` each; also the calls made and the fsyncs that made them durable."""
    sink = CountingSink()
    dispatcher = Dispatcher([sink], journal=journal)
    gate = threading.Barrier(callers + 1)
    with ThreadPoolExecutor(callers, thread_name_prefix="ingest") as pool:
        sent = [pool.submit(send_stream, dispatcher, rank, batches, gate) for rank in range(callers)]
        gate.wait()
        start = time.perf_counter()
        rows = sum(future.result() for future in sent)
        seconds = time.perf_counter() - start
    syncs = journal.syncs  # before finish(), whose closing fsync is not a call's
    dispatcher.finish()
    assert sink.count == rows, (sink.count, rows)
    return rows / seconds, callers * len(batches), syncs


def throughput_at(args, root: Path, rows: list, callers: int) -> float:
    """Median records/s with fsync on and off (alternating rounds) at ``callers`` concurrent
    streams sharing ``args.rows`` rows; prints them and returns the ratio on / off."""
    batches = cut(rows[:max(1, args.rows // callers)], args.batch)
    rates, calls, syncs = {True: [], False: []}, 0, 0
    for i in range(args.rounds):
        for durable in ((True, False) if i % 2 == 0 else (False, True)):
            journal = Journal(root / f"k{callers}-r{i}-{durable}", "bench", durable=durable)
            rate, n, synced = ingest_round(journal, batches, callers)
            rates[durable].append(rate)
            if durable:
                calls, syncs = calls + n, syncs + synced
    on, off, note = statistics.median(rates[True]), statistics.median(rates[False]), CALLERS_NOTE.get(callers, "")
    print(f"K={callers} concurrent callers: fsync on {on:,.0f} records/s, off {off:,.0f} records/s, "
          f"ratio on/off {on / off:.3f}; {syncs / calls:.2f} fsyncs per call ({calls} calls){note}")
    return on / off


def warm_up(root: Path, batches: list[list]) -> None:
    """A round of each kind, not counted: the process's first round runs ~2x slower (Arrow's and
    the allocator's first use), which would fall on whichever kind went first."""
    for durable in (False, True):
        ingest_round(Journal(root / f"warm-{durable}", "bench", durable=durable), batches, 1)


class TimedJournal(Journal):
    """Times what each fsync makes durable, as it ends: each entry from its append, each row from
    its emit (its time stamp). With ``report`` (in the actor) it writes the rows' figures there as
    it closes."""

    def __init__(self, directory, run_id: str, report: str | None = None):
        super().__init__(directory, run_id)
        self.report = report
        self._appended: list[tuple[float, list]] = []  # per entry: its append's time, its rows' emits
        self.entry_delays: list[float] = []
        self.row_delays: list[float] = []

    def __reduce__(self):
        return TimedJournal, (str(self.dir), self.run_id, self.report)

    def append(self, stream: tuple, first_seq: int, rows: list) -> int:
        self._appended.append((time.time(), [row[TIME] for row in rows]))
        return super().append(stream, first_seq, rows)

    def sync(self, staged: tuple) -> None:
        super().sync(staged)
        now = time.time()
        for appended, emits in self._appended[len(self.entry_delays):staged[1]]:
            self.entry_delays.append(now - appended)
            self.row_delays.extend(now - emit for emit in emits)

    def close(self) -> None:
        super().close()
        if self.report:
            Path(self.report).write_text(json.dumps(summary(self.row_delays)))


def summary(delays: list[float]) -> dict:
    ordered = sorted(delays)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"count": len(ordered), "p50": pick(0.5), "p99": pick(0.99), "max": ordered[-1]}


def durable_delay(root: Path, rows: list, batch: int, callers: int) -> None:
    """One more fsync-on round at ``callers``, each entry timed from its append to durable."""
    journal = TimedJournal(root / f"delay-k{callers}", "bench")
    ingest_round(journal, cut(rows, batch), callers)
    took = summary(journal.entry_delays)
    print(f"append to durable at K={callers}: p50 {took['p50'] * 1000:.1f} ms, p99 {took['p99'] * 1000:.1f} ms, "
          f"max {took['max'] * 1000:.1f} ms ({took['count']} entries)")


def throughput(args, root: Path) -> None:
    callers = sorted({int(k) for k in args.callers.split(",")})
    rows = step_rows(0, max(1, args.rows // min(callers)))  # built once, before any clock
    warm_up(root, cut(rows[:args.rows], args.batch))
    print(f"journal throughput: {args.rows:,} rows per round in batches of {args.batch}, split among K "
          f"concurrent callers (one stream each); median of {args.rounds} rounds, fsync on/off alternating")
    ratios = {k: throughput_at(args, root, rows, k) for k in callers}
    k = GOAL_CALLERS if GOAL_CALLERS in ratios else max(callers)
    durable_delay(root, rows[:max(1, args.rows // k)], args.batch, k)
    if GOAL_CALLERS in ratios:
        verdict = "met" if ratios[GOAL_CALLERS] >= GOAL else "MISSED"
        print(f"goal at K={GOAL_CALLERS} (a 2-worker run at saturation: 2 ranks x up to 4 calls in flight "
              f"each): ratio {ratios[GOAL_CALLERS]:.3f} (goal >= {GOAL}): {verdict}")


def latency(args, root: Path) -> None:
    import ray

    from callbacks.actor import start_callback_actor
    from callbacks.forwarder import EventForwarder
    from trainers.registry import CallbackMixin, new_registry, run_callbacks

    class Owner(CallbackMixin):
        step = 0

        def record_row(self, event):
            return step_rows(self.step, 1)[0]

    start_ray(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    report = root / "emit-to-durable.json"
    actor = start_callback_actor([CountingSink()], journal=TimedJournal(root / "ray", "bench", str(report)))
    ray.get(actor.ping.remote())
    registry = new_registry()
    forwarder = EventForwarder(actor, "bench", 0, flush_interval=args.flush_interval).attach(registry)
    owner, n = Owner(), int(args.rate * args.seconds)
    start = time.perf_counter()
    for i in range(n):
        owner.step = i
        run_callbacks(registry, STEP_CYCLE[i % 5], owner)
        pause = start + (i + 1) / args.rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    forwarder.close()
    ray.get(actor.finish.remote())
    took = json.loads(report.read_text())
    print(f"emit to durable: {took['count']} records at {args.rate:,.0f}/s, p50 {took['p50'] * 1000:.0f} ms, "
          f"p99 {took['p99'] * 1000:.0f} ms (forwarder flush interval {args.flush_interval} s)")
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows per round, split among the callers")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--callers", default="1,2,8,16", help="the K concurrent callers to measure, comma-separated")
    parser.add_argument("--rate", type=float, default=2_000.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--flush-interval", type=float, default=FLUSH_INTERVAL)
    args = tiny.parse(parser, "2 rounds of 5,000 rows, 1 s of latency", rows=5_000, rounds=2, seconds=1.0)
    with tempfile.TemporaryDirectory(prefix="journal-bench-") as folder:
        throughput(args, Path(folder))
        latency(args, Path(folder))
    tiny.end(args)


if __name__ == "__main__":
    main()
