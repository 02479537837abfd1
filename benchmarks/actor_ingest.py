"""Callback actor ingest rate: 2 sender processes, each with a real EventForwarder.

Each sender is a Ray actor that fires step events through a real callback registry (as a
trainer does); the forwarder asks the event's owner for its compact wire row
(``CallbackMixin.record_row``: ``make_row`` of ``record_fields``, every field checked) and batches
the rows to one CallbackActor whose sink counts records. The rate is records dispatched by the
actor per second of wall time, from the start signal until both senders' teardown flush has been
acknowledged (an ack means dispatched). Target: >= 100,000 events/s.

    python benchmarks/actor_ingest.py [--events-per-sender N] [--max-batch B]

``--tiny`` runs the same code path end to end with 5,000 events per sender (~10 s, for the
tests): its figures are not measurements.
"""
from __future__ import annotations

import argparse
import time

import ray

import tiny
from cluster import start_ray
from callbacks.actor import start_callback_actor
from callbacks.forwarder import EventForwarder
from trainers.registry import CallbackMixin, new_registry, run_callbacks

TARGET = 100_000  # events/s the driver side must absorb
TINY_EVENTS = 5_000  # per sender in --tiny mode
STEP_CYCLE = ("on_train_batch_start", "optimizer_step", "on_before_zero_grad",
              "on_params_update", "on_train_batch_end")


class CountingSink:
    """Cheapest possible sink: counts what it receives, so the figure is the actor's own cost."""

    def __init__(self):
        self.count = 0

    def _count(self, record):
        self.count += 1

    on_train_batch_start = optimizer_step = on_before_zero_grad = _count
    on_params_update = on_train_batch_end = teardown = _count


class Step(CallbackMixin):
    """What a trainer exposes to the forwarder at a step event: the forwarder calls its
    ``record_row`` (CallbackMixin's: the checked row of ``record_fields``)."""

    def __init__(self):
        self.epoch, self.step = 0, 0

    def record_fields(self, event):
        return {"epoch": self.epoch, "step": self.step,
                "metrics": {"loss": 0.5, "lr": 0.01}, "artifacts": {}, "final_eval": False}


@ray.remote(num_cpus=1)
class Sender:
    def __init__(self, actor, rank: int, max_batch: int):
        self.registry = new_registry()
        self.forwarder = EventForwarder(actor, "bench", rank, max_batch=max_batch).attach(self.registry)

    def ready(self) -> bool:
        return True

    def run(self, events: int) -> dict:
        owner, registry = Step(), self.registry
        start = time.perf_counter()
        for i in range(events):
            event = STEP_CYCLE[i % len(STEP_CYCLE)]
            if event == "on_train_batch_end":
                owner.step += 1
            run_callbacks(registry, event, owner)
        fired = time.perf_counter()
        run_callbacks(registry, "teardown", owner)  # waits for every acknowledgement
        out = self.forwarder.stats()
        out.update(emit_seconds=fired - start, total_seconds=time.perf_counter() - start)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events-per-sender", type=int, default=300_000)
    parser.add_argument("--max-batch", type=int, default=1000)
    args = tiny.parse(parser, f"{TINY_EVENTS:,} events per sender, seconds", events_per_sender=TINY_EVENTS)

    start_ray(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    actor = start_callback_actor([CountingSink()])
    senders = [Sender.remote(actor, rank, args.max_batch) for rank in range(2)]
    ray.get([actor.ping.remote()] + [s.ready.remote() for s in senders])

    start = time.perf_counter()
    results = ray.get([s.run.remote(args.events_per_sender) for s in senders])
    elapsed = time.perf_counter() - start
    report = ray.get(actor.finish.remote("FINISHED"))
    ray.shutdown()

    total = sum(r["records"] for r in results)
    assert report["dispatched"] == total, f"actor dispatched {report['dispatched']} of {total}"
    rate = total / elapsed
    for rank, r in enumerate(results):
        print(f"sender {rank}: {r['records']} events, emit {r['records'] / r['emit_seconds']:,.0f} ev/s "
              f"({1e6 * r['emit_seconds'] / r['records']:.1f} us/event), batches {r['batches']}, "
              f"backpressure waits {r['backpressure_waits']} ({r['backpressure_seconds']:.2f} s)")
    print(f"actor ingest: {total} events from 2 senders in {elapsed:.2f} s = {rate:,.0f} events/s")
    busy = report["busy_seconds"]
    print(f"actor busy in ingest {busy:.2f} s ({100 * busy / elapsed:.0f}% of wall time): "
          f"{total / busy:,.0f} events/s per busy second (deserialization not included)")
    print(f"ratio to target {TARGET:,} events/s: {rate / TARGET:.2f}")
    tiny.end(args)


if __name__ == "__main__":
    main()
