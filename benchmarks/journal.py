"""The run journal's cost: records/s into a journaled dispatcher with fsync on vs. off, and the
time from a worker's emit to the durable acknowledgement.

1. Throughput (no Ray): a ``Dispatcher`` with a journal and a counting sink takes batches of
   ``--batch`` rows of a detection run's per-step mix. Rounds alternate fsync on / off (same
   process, same files); the figure is the median of the rounds. Goal: on / off >= 0.8.
2. Latency (Ray): a real ``EventForwarder`` in this process emits ``--rate`` rows/s for
   ``--seconds`` s to a real callback actor with a durable journal; for each row, the time from
   its emit to its journal append, measured in the actor; the fsync that makes it durable follows
   in the same call, before the acknowledgement. It includes the forwarder's batching
   (``--flush-interval``, 1 s in runs).

    python benchmarks/journal.py [--rows N] [--batch B] [--rounds R] [--rate R] [--seconds S]

``--tiny`` runs both parts briefly (a test runs it): its figures are not measurements.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import tiny
from callbacks.dispatcher import Dispatcher
from callbacks.journal import Journal
from trainers.events import TIME, wire_row

GOAL = 0.8
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


def ingest_rate(folder: Path, durable: bool, rows: int, batch: int) -> float:
    """Rows/s through a journaled dispatcher (journal append, sink, fsync per call)."""
    dispatcher = Dispatcher([CountingSink()], journal=Journal(folder, "bench", durable=durable))
    batches = [step_rows(start, min(batch, rows - start)) for start in range(0, rows, batch)]
    stream = ("bench", 0, 0)
    start = time.perf_counter()
    seq = 0
    for chunk in batches:
        dispatcher.ingest_rows(stream, seq, chunk)
        seq += len(chunk)
    return rows / (time.perf_counter() - start)


def throughput(args, root: Path) -> None:
    rates = {True: [], False: []}
    for i in range(args.rounds):
        for durable in ((True, False) if i % 2 == 0 else (False, True)):
            rates[durable].append(ingest_rate(root / f"r{i}-{durable}", durable, args.rows, args.batch))
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"journal fsync on: {on:,.0f} records/s, off: {off:,.0f} records/s (median of {args.rounds} rounds, "
          f"batches of {args.batch})")
    print(f"ratio on/off: {on / off:.3f} (goal >= {GOAL})")


class ArrivalSink(CountingSink):
    """In the actor: how long each row took from its emit (its time stamp) to the journal; the
    fsync of the same call follows (part 1 gives its cost per batch)."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def handle_rows(self, stream, first_seq, rows):
        now = time.time()
        self.waits.extend(now - row[TIME] for row in rows)

    def close(self, status="FINISHED"):
        waits = sorted(self.waits)
        return {"count": len(waits), "p50": waits[len(waits) // 2],
                "p99": waits[min(len(waits) - 1, int(len(waits) * 0.99))]}


def latency(args, root: Path) -> None:
    import ray

    from callbacks.actor import start_callback_actor
    from callbacks.forwarder import EventForwarder
    from trainers.registry import CallbackMixin, new_registry, run_callbacks

    class Owner(CallbackMixin):
        step = 0

        def record_row(self, event):
            return step_rows(self.step, 1)[0]

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    actor = start_callback_actor([ArrivalSink()], journal=Journal(root / "ray", "bench"))
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
    waits = ray.get(actor.finish.remote())["sinks"]["ArrivalSink"]
    print(f"emit to journal: {waits['count']} records at {args.rate:,.0f}/s, p50 {waits['p50'] * 1000:.0f} ms, "
          f"p99 {waits['p99'] * 1000:.0f} ms, then one fsync (forwarder flush interval {args.flush_interval} s)")
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=float, default=2_000.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--flush-interval", type=float, default=1.0)
    args = tiny.parse(parser, "2 rounds of 5,000 rows, 3 s of latency", rows=5_000, rounds=2, seconds=3.0)
    with tempfile.TemporaryDirectory(prefix="journal-bench-") as folder:
        throughput(args, Path(folder))
        latency(args, Path(folder))
    tiny.end(args)


if __name__ == "__main__":
    main()
